"""The Cascade, HTC-Lite and HTC leaves train end to end: every new tiny YAML trains 2 iterations
on a tiny synthetic split (the federated context loss gets each image's neg_category_ids),
--resume keeps every stage's Seesaw counts, 2 gloo processes train HTC-Lite, and the LVIS v1
leaves set the same method keys as their tiny twins."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO

from lvis_longtail.data.builtin import register_synthetic
from lvis_longtail.data.image_labels import NEG_CLASSES_FIELD, needs_image_labels
from lvis_longtail.data.mapper import LongTailDatasetMapper
from lvis_longtail.data.synthetic import generate
from lvis_longtail.engine import Trainer, setup_cfg

NUM_CLASSES = 8
TINY = REPO / "configs" / "tiny"
LEAVES = {
    "cascade_mask_rcnn_R18_FPN_tiny_seesaw": "cascade_mask_rcnn_R50_FPN_1x_seesaw",
    "htc_lite_R18_FPN_tiny_seesaw": "htc_lite_R50_FPN_1x_seesaw",
    "htc_lite_R18_FPN_tiny_seesaw_noctx": None,  # ablation of the tiny leaf only
    "htc_R18_FPN_tiny_seesaw": "htc_R50_FPN_1x_seesaw",
}
FAST = {
    "MODEL.ROI_HEADS.NUM_CLASSES": NUM_CLASSES,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 32,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32,
    "INPUT.MIN_SIZE_TRAIN": (64,),
    "INPUT.MAX_SIZE_TRAIN": 64,
    "SOLVER.IMS_PER_BATCH": 2,
    "SOLVER.WARMUP_ITERS": 1,
    "SOLVER.STEPS": (),
    "SOLVER.BASE_LR": 0.005,
    "SOLVER.CHECKPOINT_PERIOD": 1,
    "DATALOADER.NUM_WORKERS": 0,
    "DATASETS.TEST": (),
}


def opts_of(**extra):
    return [str(x) for kv in {**FAST, **extra}.items() for x in kv]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    generate(
        str(root / "lt_synthetic"), seed=2, num_train=12, num_val=2, num_test=1,
        image_size=(64, 64), num_classes=NUM_CLASSES, progress=False,
    )  # fmt: skip
    register_synthetic(str(root / "lt_synthetic"), prefix="lt_htc")
    return root


def cfg_of(leaf, output_dir, max_iter=2):
    opts = opts_of(**{"SOLVER.MAX_ITER": max_iter, "OUTPUT_DIR": str(output_dir)})
    return setup_cfg(str(TINY / f"{leaf}.yaml"), opts + ["DATASETS.TRAIN", "('lt_htc_train',)"])


def stage_counts(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("cum_samples")}


@pytest.mark.slow
@pytest.mark.parametrize("leaf", list(LEAVES))
def test_new_tiny_leaf_trains_two_iterations(leaf, synthetic_root, tmp_path):
    trainer = Trainer(cfg_of(leaf, tmp_path))
    trainer.resume_or_load(resume=False)
    trainer.train()
    metrics = [json.loads(x) for x in (tmp_path / "metrics.json").read_text().splitlines()]
    trained = [m for m in metrics if "total_loss" in m]
    assert trained and all(math.isfinite(m["total_loss"]) for m in trained)
    has_context = leaf == "htc_lite_R18_FPN_tiny_seesaw"
    assert any("loss_context" in m for m in trained) == has_context
    counts = stage_counts(trainer.model)
    assert len(counts) == 3 and all(v.sum() > 0 for v in counts.values())
    if not has_context:
        return
    # --resume into a longer schedule: every stage's loss state comes back.
    resumed = Trainer(cfg_of(leaf, tmp_path, max_iter=3))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    for k, v in stage_counts(resumed.model).items():
        torch.testing.assert_close(v, counts[k])


CONTEXT = ["MODEL.ROI_CONTEXT_HEAD.ENABLED", "True", "MODEL.ROI_CONTEXT_HEAD.CONV_DIM", "64",
           "MODEL.ROI_CONTEXT_HEAD.FEDERATED", "True"]  # fmt: skip


@pytest.mark.parametrize("leaf", ["htc_lite_R18_FPN_tiny_seesaw", "htc_R18_FPN_tiny_seesaw"])
def test_mapper_carries_verified_negatives(leaf, synthetic_root, tmp_path):
    """For a federated context head of HTC-Lite and of HTC (a subclass), not of the cascade."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    cfg = cfg_of(leaf, tmp_path)
    cfg.defrost()
    cfg.merge_from_list(CONTEXT)
    assert needs_image_labels(cfg)
    cascade = cfg.clone()
    cascade.MODEL.ROI_HEADS.NAME = "LongTailCascadeROIHeads"
    assert not needs_image_labels(cascade)
    id_map = MetadataCatalog.get("lt_htc_train").thing_dataset_id_to_contiguous_id
    records = [r for r in DatasetCatalog.get("lt_htc_train") if r["neg_category_ids"]]
    assert records
    out = LongTailDatasetMapper(cfg, True)(records[0])
    field = out["instances"].get(NEG_CLASSES_FIELD)
    assert field.shape[0] == len(out["instances"]) > 0
    expected = sorted(id_map[c] for c in records[0]["neg_category_ids"])
    assert sorted(field[0].tolist()) == expected and (field == field[0]).all()


@pytest.mark.slow
def test_htc_lite_trains_with_two_gloo_processes(synthetic_root, tmp_path):
    opts = opts_of(**{"SOLVER.MAX_ITER": 2, "OUTPUT_DIR": str(tmp_path)})
    env = dict(os.environ, DETECTRON2_DATASETS=str(synthetic_root))
    cmd = [sys.executable, str(REPO / "train_net.py"), "--num-gpus", "2", "--dist-url", "auto",
           "--config-file", str(TINY / "htc_lite_R18_FPN_tiny_seesaw.yaml"), *opts,
           "MODEL.DEVICE", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "World size: 2" in (tmp_path / "log.txt").read_text()
    metrics = [json.loads(x) for x in (tmp_path / "metrics.json").read_text().splitlines()]
    trained = [m for m in metrics if "loss_context" in m]
    assert trained and all(math.isfinite(m["total_loss"]) for m in trained)
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert sum(1 for k in saved["model"] if k.endswith("cum_samples")) == 3


@pytest.mark.parametrize("tiny, lvis", [(t, v) for t, v in LEAVES.items() if v])
def test_lvis_leaf_sets_the_tiny_leafs_method_keys(tiny, lvis):
    def method_keys(path):
        model = yaml.safe_load(path.read_text())["MODEL"]
        context = {k: v for k, v in model.get("ROI_CONTEXT_HEAD", {}).items()}
        context.pop("CONV_DIM", None), context.pop("NORM", None)  # sized to each backbone
        return model["ROI_HEADS"], model.get("ROI_BOX_HEAD"), context

    assert method_keys(TINY / f"{tiny}.yaml") == method_keys(
        REPO / "configs" / "LVISv1" / f"{lvis}.yaml"
    )
