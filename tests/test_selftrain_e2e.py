"""The round-2 recipe end to end on a tiny synthetic split: pseudo labels from a model, the
tiny self-training config's DATASETS.IGNORE_BOXES, the mapper's ignore_boxes, and 2 training
iterations of LongTailRCNN + LongTailRPN with ignore regions."""

import json
import math

import pytest
from conftest import REPO

from lvis_longtail.data.builtin import register_synthetic
from lvis_longtail.data.mapper import LongTailDatasetMapper
from lvis_longtail.data.synthetic import generate
from lvis_longtail.engine import Trainer, setup_cfg
from lvis_longtail.tools.pseudo_label import main as pseudo_label

pytestmark = pytest.mark.slow  # end to end: trains on a generated dataset

CONFIG = REPO / "configs" / "tiny" / "mask_rcnn_R18_FPN_tiny_seesaw_selftrain.yaml"
FAST = ["MODEL.ROI_HEADS.NUM_CLASSES", "8", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.STEPS", "()", "SOLVER.MAX_ITER", "2", "DATALOADER.NUM_WORKERS", "0",
        "DATASETS.TEST", "()", "DATASETS.TRAIN", "('lt_st_train',)",
        "MODEL.DEVICE", "cpu"]  # fmt: skip


def test_round_two_trains_with_pseudo_label_ignore_boxes(tmp_path):
    generate(str(tmp_path / "syn"), seed=4, num_train=8, num_val=1, num_test=1,
             image_size=(64, 64), num_classes=8, withhold_fraction=0.4, progress=False)  # fmt: skip
    register_synthetic(str(tmp_path / "syn"), prefix="lt_st")
    pseudo = tmp_path / "pseudo.json"
    summary = pseudo_label(["--config-file", str(CONFIG), "--dataset", "lt_st_train", "--output",
                            str(pseudo), "--score-thresh", "0.0", *FAST])  # fmt: skip
    assert summary["images"] == 8
    assert summary["pseudo_labels"] > 0  # score threshold 0: every detection not on a GT
    opts = FAST + ["OUTPUT_DIR", str(tmp_path / "out"),
                   "DATASETS.IGNORE_BOXES", f"[['lt_st_train', '{pseudo}']]"]  # fmt: skip
    cfg = setup_cfg(str(CONFIG), opts)
    trainer = Trainer(cfg)
    from detectron2.data import DatasetCatalog

    records = DatasetCatalog.get("lt_st_train")
    with_ignore = [r for r in records if r.get("ignore_boxes")]
    assert with_ignore
    mapped = LongTailDatasetMapper(cfg, True)(with_ignore[0])
    assert len(mapped["ignore_boxes"]) > 0
    trainer.resume_or_load(resume=False)
    trainer.train()
    lines = (tmp_path / "out" / "metrics.json").read_text().splitlines()
    trained = [m for m in map(json.loads, lines) if "total_loss" in m]
    assert trained and all(math.isfinite(m["total_loss"]) for m in trained)
    register_synthetic(str(tmp_path / "syn"), prefix="lt_st")  # drop the wrap for later tests
