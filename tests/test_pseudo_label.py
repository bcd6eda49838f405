"""Pseudo-label export: the score, GT-overlap and negative-category filters, the written
LVIS-format file and its round trip through the loader (as ignore boxes and as a dataset)."""

# isort: off
import lvis_longtail  # noqa: F401  (first, also in spawned processes: detectron2's compat layer)

# isort: on
import json

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from lvis_longtail.data.ignore_boxes import attach_ignore_boxes
from lvis_longtail.data.lvis_format import (
    load_lvis_format_json,
    register_lvis_format,
    set_mask_format,
)
from lvis_longtail.tools.pseudo_label import keep_pseudo_labels, write_pseudo_labels

H = W = 32


def _dataset(tmp_path):
    cats = [{"id": 10 + k, "name": f"c{k}", "frequency": f, "image_count": 1, "instance_count": 1}
            for k, f in enumerate("rcf")]  # fmt: skip
    images = [{"id": i, "height": H, "width": W, "file_name": f"{i}.jpg", "neg_category_ids": [11]}
              for i in (1, 2)]  # fmt: skip
    seg = [[2, 2, 12, 2, 12, 12, 2, 12]]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 10, "bbox": [2, 2, 10, 10], "segmentation": seg}
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": images, "categories": cats, "annotations": anns}))
    for i in (1, 2):
        cv2.imwrite(str(tmp_path / f"{i}.jpg"), np.zeros((H, W, 3), np.uint8))
    register_lvis_format("lt_pseudo_unit", str(path), str(tmp_path))
    return str(path)


def _predictions(image_size):
    inst = Instances(image_size)
    # on the GT | class 1 = a negative | low score | kept (class 0, rare) | kept (class 2)
    inst.pred_boxes = Boxes(torch.tensor([[2.0, 2, 12, 12], [15, 15, 25, 25], [15, 2, 25, 12],
                                          [16, 16, 30, 30], [1, 20, 9, 30]]))  # fmt: skip
    inst.scores = torch.tensor([0.9, 0.9, 0.3, 0.8, 0.6])
    inst.pred_classes = torch.tensor([0, 1, 0, 0, 2])
    masks = torch.zeros(5, *image_size, dtype=torch.bool)
    for i, (a, b, c, d) in enumerate(inst.pred_boxes.tensor.int().tolist()):
        masks[i, b:d, a:c] = True
    inst.pred_masks = masks
    return inst


def test_filters_by_score_gt_overlap_and_negative_categories():
    inst = _predictions((H, W))
    gt = Boxes(torch.tensor([[2.0, 2, 12, 12]]))
    keep = keep_pseudo_labels(inst, gt, torch.tensor([1]), 0.5, 0.5)
    assert keep.tolist() == [False, False, False, True, True]
    # no GT, no negatives: only the score filter applies
    keep = keep_pseudo_labels(
        inst, Boxes(torch.zeros(0, 4)), torch.zeros(0, dtype=torch.long), 0.5, 0.5
    )
    assert keep.tolist() == [True, True, False, True, True]


def test_written_file_round_trips_through_the_loader(tmp_path):
    source = _dataset(tmp_path)
    records = DatasetCatalog.get("lt_pseudo_unit")
    loader = [[{"image_id": 1}], [{"image_id": 2}]]
    model = lambda inputs: [{"instances": _predictions((H, W))} for _ in inputs]  # noqa: E731
    out = tmp_path / "pseudo" / "train_pseudo.json"
    summary = write_pseudo_labels(
        model, loader, records, MetadataCatalog.get("lt_pseudo_unit"), str(out)
    )
    # image 1: its GT removes the first box -> 2 kept; image 2 (no GT) keeps it -> 3 (both
    # drop the negative c1 and the low score)
    assert summary["pseudo_labels"] == 5 and summary["per_frequency"] == {"r": 3, "c": 0, "f": 2}
    assert summary["box_only"] == 0  # masks: no warning
    assert (
        json.loads((tmp_path / "pseudo" / "train_pseudo.json.summary.json").read_text()) == summary
    )
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp left
    loaded = load_lvis_format_json(str(out), str(tmp_path))
    anns = [a for r in loaded for a in r["annotations"]]
    assert len(anns) == 5 and {a["category_id"] for a in anns} == {0, 2}
    assert sorted(tuple(a["bbox"]) for a in anns if a["category_id"] == 0) == [
        (2.0, 2.0, 10.0, 10.0),
        (16.0, 16.0, 14.0, 14.0),
        (16.0, 16.0, 14.0, 14.0),
    ]
    written = json.loads(out.read_text())["annotations"]
    assert all(isinstance(a["segmentation"], dict) for a in written)  # RLE masks in the file
    # ... which the loader turns into polygons under the default INPUT.MASK_FORMAT polygon
    assert all(isinstance(a["segmentation"], list) and a["segmentation"] for a in anns)
    with_ignore = attach_ignore_boxes(
        [dict(r) for r in load_lvis_format_json(source, str(tmp_path))], str(out)
    )
    assert sorted(map(tuple, with_ignore[0]["ignore_boxes"])) == [(1, 20, 9, 30), (16, 16, 30, 30)]


def test_command_line_runs_a_model_over_a_synthetic_split(tmp_path):
    from conftest import TINY_BASE

    from lvis_longtail.data.builtin import register_synthetic
    from lvis_longtail.data.synthetic import generate
    from lvis_longtail.tools.pseudo_label import main

    generate(str(tmp_path / "syn"), seed=3, num_train=2, num_val=1, num_test=1,
             image_size=(64, 64), num_classes=8, progress=False)  # fmt: skip
    register_synthetic(str(tmp_path / "syn"), prefix="lt_pl")
    out = tmp_path / "pl.json"
    opts = [
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "8",
        "MODEL.DEVICE",
        "cpu",
        "DATASETS.TRAIN",
        "('lt_pl_train',)",
    ]
    summary = main(["--config-file", str(TINY_BASE), "--dataset", "lt_pl_train", "--output",
                    str(out), "--score-thresh", "0.0", *opts])  # fmt: skip
    assert summary["images"] == 2
    written = json.loads(out.read_text())["annotations"]
    assert len(written) == summary["pseudo_labels"]
    set_mask_format("bitmask")  # RLE masks as they are (polygon conversion drops empty ones)
    try:
        loaded = load_lvis_format_json(
            str(out), str(tmp_path / "syn" / "images"), check_files=False
        )
    finally:
        set_mask_format("polygon")
    assert sum(len(r["annotations"]) for r in loaded) == summary["pseudo_labels"]


@pytest.mark.parametrize("flag, value", [("--score-thresh", "5"), ("--score-thresh", "nan"),
                                         ("--gt-iou-thresh", "-1")])  # fmt: skip
def test_thresholds_must_be_in_0_1(tmp_path, capsys, flag, value):
    from conftest import TINY_BASE

    from lvis_longtail.tools.pseudo_label import main

    argv = ["--config-file", str(TINY_BASE), "--dataset", "lt_synthetic_train", "--output",
            str(tmp_path / "pl.json"), flag, value]  # fmt: skip
    with pytest.raises(SystemExit):
        main(argv)
    assert f"{flag} must be in [0, 1], got {float(value)}" in capsys.readouterr().err


def test_a_model_without_masks_writes_box_only_labels_with_a_warning(tmp_path, caplog):
    from conftest import TINY_BASE

    from lvis_longtail.config import ConfigError
    from lvis_longtail.tools.pseudo_label import main

    _dataset(tmp_path)
    records = DatasetCatalog.get("lt_pseudo_unit")

    def boxes_only(inputs):
        outs = _fake_model(inputs)
        for o in outs:
            o["instances"].remove("pred_masks")
        return outs

    out = tmp_path / "boxes.json"
    with caplog.at_level("WARNING", logger="lvis_longtail.tools.pseudo_label"):
        summary = write_pseudo_labels(boxes_only, [[{"image_id": 1}], [{"image_id": 2}]],
                                      records, MetadataCatalog.get("lt_pseudo_unit"), str(out))  # fmt: skip  # noqa: E501
    assert summary["pseudo_labels"] == summary["box_only"] == 5
    assert all(a["segmentation"] == [] for a in json.loads(out.read_text())["annotations"])
    assert f"{out}: 5 of 5 pseudo labels have no mask" in caplog.text
    assert "DATASETS.EXTRA_TRAIN) they are all dropped by the loader" in caplog.text
    # meant as a training set: refused before the model is built
    argv = ["--config-file", str(TINY_BASE), "--dataset", "lt_pseudo_unit", "--output",
            str(tmp_path / "x.json"), "--as-training-set", "MODEL.MASK_ON", "False"]  # fmt: skip
    with pytest.raises(ConfigError, match=rf"^{TINY_BASE}: MODEL.MASK_ON is False, so every"):
        main(argv)
    assert not (tmp_path / "x.json").exists()


def _fake_model(inputs):
    return [{"instances": _predictions((H, W))} for _ in inputs]


def _pseudo_label_worker(rank, tmp_path, out):
    import torch.distributed as dist

    # a file store: no TCP port another process could take between choosing and binding it
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg_store", rank=rank,
                            world_size=2)  # fmt: skip
    try:
        source = tmp_path / "train.json"
        register_lvis_format("lt_pseudo_unit", str(source), str(tmp_path))
        records = DatasetCatalog.get("lt_pseudo_unit")
        loader = [[{"image_id": 1 + rank}]]  # this rank's share, as InferenceSampler gives
        summary = write_pseudo_labels(
            _fake_model, loader, records, MetadataCatalog.get("lt_pseudo_unit"), out
        )
        assert (summary is None) == (rank != 0)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_write_the_file_one_process_writes(tmp_path):
    """Each rank streams its images to its own shard; the main process writes one file equal
    to the single-process one (annotation ids numbered across ranks), and no shard is left."""
    import torch.multiprocessing as mp

    _dataset(tmp_path)
    records = DatasetCatalog.get("lt_pseudo_unit")
    single = tmp_path / "single.json"
    write_pseudo_labels(_fake_model, [[{"image_id": 1}], [{"image_id": 2}]], records,
                        MetadataCatalog.get("lt_pseudo_unit"), str(single))  # fmt: skip
    two = tmp_path / "out" / "two.json"
    mp.spawn(_pseudo_label_worker, args=(tmp_path, str(two)), nprocs=2, join=True)
    assert json.loads(two.read_text()) == json.loads(single.read_text())
    summary = json.loads((tmp_path / "out" / "two.json.summary.json").read_text())
    assert summary["images"] == 2 and summary["pseudo_labels"] == 5
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "two.json", "two.json.summary.json"
    ]  # fmt: skip
    ids = [a["id"] for a in json.loads(two.read_text())["annotations"]]
    assert ids == list(range(1, 6))
