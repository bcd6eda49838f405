"""Per-class csv and plot, ``compare_runs``, and the evaluator built from the config."""

import csv
import json
import logging
import uuid

import numpy as np
import pytest
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from lvis_random_split import model_outputs, random_results, random_split

import lvis_longtail  # noqa: F401  (applies the compat layer)
from lvis_longtail.engine.trainer import Trainer
from lvis_longtail.evaluation import LVISLongTailEvaluator, run_lvis_eval
from lvis_longtail.evaluation.diagnostics import read_csv
from lvis_longtail.tools import compare_runs


def register(tmp_path, dataset, **meta):
    json_file = tmp_path / f"split_{uuid.uuid4().hex[:8]}.json"
    json_file.write_text(json.dumps(dataset))
    name = f"lt_diag_{uuid.uuid4().hex}"
    DatasetCatalog.register(name, lambda: [])
    classes = [c["name"] for c in dataset["categories"]]
    MetadataCatalog.get(name).set(json_file=str(json_file), thing_classes=classes, **meta)
    return name


def test_per_class_csv_and_plot(tmp_path):
    dataset = random_split(3, num_images=8)
    records = random_results(dataset, 3)
    name = register(tmp_path, dataset)
    train_counts = [5 * (k + 1) ** 2 for k in range(len(dataset["categories"]))]
    evaluator = LVISLongTailEvaluator(
        name, str(tmp_path), distributed=False, class_image_count=train_counts
    )
    evaluator.reset()
    for inputs, outputs in model_outputs(dataset, records):
        evaluator.process([inputs], [outputs])
    results = evaluator.evaluate()
    png = (tmp_path / "lvis_per_class.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    with open(tmp_path / "lvis_per_class.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == [
        "category_id", "name", "frequency", "train_image_count", "gt_instances", "gt_images",
        "bbox_AP", "bbox_AP50", "bbox_detections", "segm_AP", "segm_AP50", "segm_detections",
    ]  # fmt: skip
    rows = read_csv(str(tmp_path / "lvis_per_class.csv"))
    assert [r["category_id"] for r in rows] == [c["id"] for c in dataset["categories"]]
    assert [r["train_image_count"] for r in rows] == train_counts
    exported = json.loads((tmp_path / "lvis_instances_results.json").read_text())
    for task in ("bbox", "segm"):
        expected = run_lvis_eval(dataset, exported, task)
        ap = expected.per_class_ap() * 100
        for row, value in zip(rows, ap):
            if np.isnan(value):
                assert row[f"{task}_AP"] is None  # no ground truth: blank
            else:
                assert row[f"{task}_AP"] == pytest.approx(value, abs=1e-9)
        # the mean of the per-class APs is AP
        known = [r[f"{task}_AP"] for r in rows if r[f"{task}_AP"] is not None]
        assert np.mean(known) == pytest.approx(results[task]["AP"], abs=1e-9)
    assert rows[-1]["gt_instances"] == 0 and rows[-1]["segm_AP"] is None
    assert sum(r["gt_instances"] for r in rows) == len(dataset["annotations"])


def fabricated(path, values):
    """A per-class csv with segm_AP ``values`` per (category id, name, frequency)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category_id", "name", "frequency", "train_image_count", "segm_AP"])
        for (cid, name, freq), v in values.items():
            w.writerow([cid, name, freq, cid * 10, "" if v is None else v])


def test_compare_runs_lists_gains_and_losses(tmp_path, capsys):
    a = {(1, "apple", "f"): 50.0, (2, "bus", "c"): 10.0, (3, "yak", "r"): 0.0,
         (4, "zebra", "r"): 20.0, (5, "kiwi", "c"): None, (6, "oar", "f"): 30.0}  # fmt: skip
    b = {(1, "apple", "f"): 52.5, (2, "bus", "c"): 4.0, (3, "yak", "r"): 12.0,
         (4, "zebra", "r"): 20.0, (5, "kiwi", "c"): 7.0, (6, "oar", "f"): 29.0}  # fmt: skip
    run_a, run_b = tmp_path / "a" / "inference" / "val", tmp_path / "b"
    run_a.mkdir(parents=True)
    run_b.mkdir()
    fabricated(run_a / "lvis_per_class.csv", a)
    fabricated(run_b / "lvis_per_class.csv", b)
    result = compare_runs.compare(
        read_csv(str(run_a / "lvis_per_class.csv")),
        read_csv(str(run_b / "lvis_per_class.csv")),
        "segm_AP",
        top=2,
    )
    assert [c["name"] for c in result["gains"]] == ["yak", "apple"]
    assert [c["name"] for c in result["losses"]] == ["bus", "oar"]
    assert result["missing"] == 1 and len(result["changes"]) == 5
    assert result["groups"]["r"] == (6.0, 2) and result["groups"]["c"] == (-6.0, 1)
    # folders are searched for the csv; the report is printed
    assert compare_runs.main([str(tmp_path / "a"), str(run_b), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "segm_AP of 5 classes with a value in both runs (1 left out)" in out
    assert out.index("yak") < out.index("apple") < out.index("bus") < out.index("oar")
    assert "+12.0" in out and "-6.0" in out
    assert compare_runs.main([str(tmp_path), str(run_b)]) == 2  # two csvs below: ambiguous
    assert "several lvis_per_class.csv" in capsys.readouterr().err


def test_build_evaluator_from_config(tmp_path, caplog):
    dataset = random_split(2, num_images=4)
    name = register(tmp_path, dataset)
    cfg = tiny_cfg(num_classes=len(dataset["categories"]))
    cfg.TEST.EVAL_PROTOCOL = "fixed"
    cfg.TEST.FIXED_AP.DETS_PER_CLASS = 7
    cfg.TEST.LVIS_EVALUATOR = "lvis_api"
    with caplog.at_level(logging.WARNING):
        evaluator = Trainer.build_evaluator(cfg, name, str(tmp_path))
    assert "Fixed AP is underestimated" in caplog.text  # DETECTIONS_PER_IMAGE is 100
    assert evaluator.protocol.name == "fixed" and evaluator.protocol.dets_per_class == 7
    assert evaluator._evaluator == "lvis_api"
    train = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    assert evaluator._class_image_count == {k + 1: c for k, c in enumerate(train.class_image_count)}
    cfg.TEST.DETECTIONS_PER_IMAGE = -1
    cfg.TEST.EVAL_PROTOCOL = "pooled"
    with pytest.raises(ValueError, match="unknown LVIS evaluation protocol 'pooled'"):
        Trainer.build_evaluator(cfg, name, str(tmp_path))
