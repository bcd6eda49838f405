"""Boundary AP through the evaluator, the protocols, the config, the outputs (metrics file,
per-class csv, summary, compare_runs) and the evaluation of an existing results file."""

import copy
import json
import uuid

import numpy as np
import pytest
from conftest import TINY_BASE, tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from lvis_random_split import model_outputs, random_results, random_split

import lvis_longtail  # noqa: F401  (applies the compat layer: lvis-api's np.float)
from lvis_longtail.config import ConfigError
from lvis_longtail.engine import setup_cfg
from lvis_longtail.engine.summary import format_summary
from lvis_longtail.engine.trainer import Trainer
from lvis_longtail.evaluation import EvalProtocol, LVISLongTailEvaluator, evaluate_lvis_results
from lvis_longtail.evaluation.diagnostics import read_csv
from lvis_longtail.tools import compare_runs

RESULTS = "lvis_instances_results.json"


def register(tmp_path, dataset):
    json_file = tmp_path / f"split_{uuid.uuid4().hex[:8]}.json"
    json_file.write_text(json.dumps(dataset))
    name = f"lt_boundary_{uuid.uuid4().hex}"
    DatasetCatalog.register(name, lambda: [])
    classes = [c["name"] for c in dataset["categories"]]
    MetadataCatalog.get(name).set(json_file=str(json_file), thing_classes=classes)
    return name


def run(evaluator, pairs):
    evaluator.reset()
    for inputs, outputs in pairs:
        evaluator.process([inputs], [outputs])
    return evaluator.evaluate()


def assert_close(ours, expected, tol=1e-9):
    assert list(ours) == list(expected)
    assert all(abs(ours[m] - expected[m]) <= tol for m in expected), (ours, expected)


def test_standard_protocol_with_boundary_ap(tmp_path):
    dataset = random_split(5, num_images=8)
    name = register(tmp_path, dataset)
    records = random_results(dataset, 5, false_positives=20)
    evaluator = LVISLongTailEvaluator(
        name, str(tmp_path), distributed=False, max_dets_per_image=6, tasks=("segm", "boundary")
    )
    results = run(evaluator, model_outputs(dataset, records))
    assert list(results) == ["segm", "boundary"]
    # the written results file, evaluated again: the numbers of the evaluation itself
    again = evaluate_lvis_results(copy.deepcopy(dataset), str(tmp_path / RESULTS), "boundary", 6)
    assert_close(results["boundary"], again)
    assert 0 < results["boundary"]["AP"] < results["segm"]["AP"]
    saved = json.loads((tmp_path / "lvis_metrics.json").read_text())
    assert saved["boundary"] == results["boundary"] and saved["boundary_dilation_ratio"] == 0.02
    rows = read_csv(str(tmp_path / "lvis_per_class.csv"))
    assert {"boundary_AP", "boundary_AP50", "boundary_detections"} <= set(rows[0])
    assert "bbox_AP" not in rows[0]
    # a class has a boundary AP exactly where it has a segm AP (ground truth that counts)
    assert [r["boundary_AP"] is None for r in rows] == [r["segm_AP"] is None for r in rows]
    assert any(r["boundary_AP"] for r in rows)
    assert (tmp_path / "lvis_per_class.png").stat().st_size > 0


def test_challenge2021_protocol_is_fixed_ap_with_boundary(tmp_path):
    dataset = random_split(9, num_images=8)
    name = register(tmp_path, dataset)
    records = random_results(dataset, 9, false_positives=25)
    rng = np.random.default_rng(0)
    for r in records:  # Mask Scoring: masks (segm, boundary, the file) ranked by these
        r["segm_score"] = round(float(rng.uniform(0, 1)), 2)
    k = 3
    evaluator = LVISLongTailEvaluator(
        name, str(tmp_path), distributed=False, protocol="challenge2021", dets_per_class=k
    )
    assert evaluator.protocol == EvalProtocol("challenge2021", -1, k)
    results = run(evaluator, model_outputs(dataset, records))
    assert list(results) == ["bbox", "segm", "boundary"]
    exported = json.loads((tmp_path / RESULTS).read_text())
    assert max(np.bincount([r["category_id"] for r in exported])) == k  # per class, not image
    # eval-only on the results file: what the LVIS Challenge 2021 computes from a submission
    again = evaluate_lvis_results(
        copy.deepcopy(dataset), str(tmp_path / RESULTS), "boundary", -1, dets_per_class=k
    )
    assert_close(results["boundary"], again)
    assert "AR@-1" in results["boundary"]
    saved = json.loads((tmp_path / "lvis_metrics.json").read_text())
    assert saved["protocol"] == {"name": "challenge2021", "max_dets_per_image": -1,
                                 "dets_per_class": k}  # fmt: skip


def test_boundary_is_not_evaluated_without_masks_nor_with_lvis_api(tmp_path):
    dataset = random_split(2, num_images=4)
    name = register(tmp_path, dataset)
    records = random_results(dataset, 2, masks=False)
    evaluator = LVISLongTailEvaluator(name, None, distributed=False, protocol="challenge2021")
    pairs = model_outputs(dataset, records)
    for _, outputs in pairs:
        outputs["instances"].remove("pred_masks")
    assert set(run(evaluator, pairs)) == {"bbox"}  # a model without masks
    with pytest.raises(ValueError, match="fast evaluator only"):
        LVISLongTailEvaluator(name, None, evaluator="lvis_api", protocol="challenge2021")
    with pytest.raises(ValueError, match="tasks must be a non-empty subset"):
        LVISLongTailEvaluator(name, None, tasks=("mask",))


def test_config_keys_reach_the_evaluator_and_are_checked(tmp_path):
    dataset = random_split(2, num_images=4)
    name = register(tmp_path, dataset)
    cfg = tiny_cfg(num_classes=len(dataset["categories"]))
    cfg.TEST.LVIS_TASKS = ("bbox", "boundary")
    cfg.TEST.BOUNDARY_DILATION_RATIO = 0.05
    evaluator = Trainer.build_evaluator(cfg, name, str(tmp_path))
    assert evaluator._tasks == ("bbox", "boundary") and evaluator._dilation_ratio == 0.05
    cfg.TEST.EVAL_PROTOCOL = "challenge2021"
    cfg.TEST.LVIS_TASKS = ("segm",)
    evaluator = Trainer.build_evaluator(cfg, name, str(tmp_path))
    assert evaluator._tasks == ("segm", "boundary") and evaluator.protocol.per_class
    assert setup_cfg(str(TINY_BASE), ["TEST.EVAL_PROTOCOL", "challenge2021"])
    bad = {
        "TEST.LVIS_TASKS": ("('bbox', 'mask')", "must be a non-empty subset of"),
        "TEST.BOUNDARY_DILATION_RATIO": ("0.0", "must be > 0"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            setup_cfg(str(TINY_BASE), [key, value])
    with pytest.raises(ConfigError, match="Boundary AP is computed by the fast evaluator only"):
        setup_cfg(
            str(TINY_BASE),
            ["TEST.EVAL_PROTOCOL", "challenge2021", "TEST.LVIS_EVALUATOR", "lvis_api"],
        )


def test_summary_and_compare_runs_carry_boundary_ap(tmp_path, capsys):
    opts = ["OUTPUT_DIR", str(tmp_path), "DATASETS.TEST", "('lt_synthetic_val',)"]
    cfg = setup_cfg(str(TINY_BASE), opts)
    metrics = {"AP": 20.0, "APr": 1.0, "APc": 2.0, "APf": 3.0}
    text = format_summary(cfg, {"segm": metrics, "boundary": dict(metrics, AP=12.25)})
    assert "lt_synthetic_val boundary: AP 12.2, APr 1.0, APc 2.0, APf 3.0" in text
    for run_name, ap in (("a", 10.0), ("b", 13.5)):
        path = tmp_path / run_name / "lvis_per_class.csv"
        path.parent.mkdir()
        path.write_text(f"category_id,name,frequency,boundary_AP\n1,apple,f,{ap}\n2,yak,r,4\n")
    assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "boundary_AP of 2 classes" in out and "+3.5" in out
