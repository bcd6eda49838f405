"""The LVIS 2020 1st place's stage 2 as one leaf: the tiny leaf starts from a stage-1
checkpoint, loads every tensor of it that fits (the checkpointer skips exactly the
re-initialised classifier, the new mask-head convs and boundary branch and the box pooler's
offset branch), trains 2 iterations with the backbone, FPN and RPN bit-identical (parameters
and buffers); both leaves are wired to their stage 1 the same way."""

import json
import math

import pytest
import torch
import yaml
from conftest import REPO
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from fvcore.common.checkpoint import Checkpointer

from lvis_longtail.data.builtin import register_synthetic
from lvis_longtail.data.synthetic import generate
from lvis_longtail.engine import Trainer, setup_cfg

NUM_CLASSES = 8
STAGE1 = "mask_rcnn_R18_FPN_tiny_1st2020_stage1"
STAGE2 = "mask_rcnn_R18_FPN_tiny_1st2020_stage2"
LEAVES = {
    "tiny": (STAGE1, STAGE2),
    "LVISv1": ("mask_rcnn_R50_FPN_1st2020_stage1", "mask_rcnn_R50_FPN_1st2020_stage2"),
}
FROZEN = ("backbone.", "proposal_generator.")
FAST = [
    "MODEL.ROI_HEADS.NUM_CLASSES", NUM_CLASSES,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", 32,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
    "INPUT.MIN_SIZE_TRAIN", (64,),
    "INPUT.MAX_SIZE_TRAIN", 64,
    "SOLVER.IMS_PER_BATCH", 2,
    "SOLVER.WARMUP_ITERS", 1,
    "SOLVER.STEPS", (),
    "SOLVER.MAX_ITER", 2,
    "SOLVER.CHECKPOINT_PERIOD", 100,
    "DATALOADER.NUM_WORKERS", 0,
    "DATASETS.TEST", (),
    "DATASETS.TRAIN", ("lt_st2_train",),
]  # fmt: skip
# What the tiny stage 2 has and stage 1 lacks: 2 + 3 mask convs (GN), the boundary branch,
# the deformable box pooler's offset branch. The group softmax classifier (K + 1 + groups
# logits) replaces EQL's (K): a shape mismatch, so it keeps its fresh initialisation.
NEW_KEYS = sorted(
    [
        f"roi_heads.mask_head.mask_fcn{i}.{p}"
        for i in (3, 4, 5)
        for p in ("weight", "norm.weight", "norm.bias")
    ]
    + [f"roi_heads.mask_head.boundary_predictor.{p}" for p in ("weight", "bias")]
    + [f"roi_heads.box_pooler.offset_fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
)
CLASSIFIER = ["roi_heads.box_predictor.cls_score.bias", "roi_heads.box_predictor.cls_score.weight"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    generate(
        str(root / "lt_synthetic"), seed=3, num_train=12, num_val=2, num_test=1,
        image_size=(64, 64), num_classes=NUM_CLASSES, progress=False,
    )  # fmt: skip
    register_synthetic(str(root / "lt_synthetic"), prefix="lt_st2")
    return root


def cfg_of(leaf, output_dir, *extra):
    opts = [str(x) for x in FAST] + ["OUTPUT_DIR", str(output_dir), *map(str, extra)]
    return setup_cfg(str(REPO / "configs" / "tiny" / f"{leaf}.yaml"), opts)


def frozen_state(model):
    items = list(model.named_parameters()) + list(model.named_buffers())
    return {k: v.detach().clone() for k, v in items if k.startswith(FROZEN)}


@pytest.mark.slow
def test_stage2_fine_tunes_a_stage1_checkpoint(synthetic_root, tmp_path, monkeypatch):
    # stage 1: a model's initial weights, moved off any initial value so that every loaded
    # tensor can be told from stage 2's own initialisation
    torch.manual_seed(0)
    stage1 = build_model(cfg_of(STAGE1, tmp_path / "stage1"))
    with torch.no_grad():
        for p in stage1.parameters():
            p.add_(0.01 * torch.randn_like(p))
    (tmp_path / "stage1").mkdir()
    DetectionCheckpointer(stage1, save_dir=str(tmp_path / "stage1")).save("model_final")
    weights = tmp_path / "stage1" / "model_final.pth"

    reports = []
    log_incompatible = Checkpointer._log_incompatible_keys
    monkeypatch.setattr(
        Checkpointer,
        "_log_incompatible_keys",
        lambda self, incompatible: (
            reports.append(incompatible),
            log_incompatible(self, incompatible),
        ),
    )
    trainer = Trainer(cfg_of(STAGE2, tmp_path / "stage2", "MODEL.WEIGHTS", weights))
    trainer.resume_or_load(resume=False)
    (report,) = reports
    # the mismatched classifier is dropped from the checkpoint, so it is missing too
    assert sorted(report.missing_keys) == sorted(NEW_KEYS + CLASSIFIER)
    assert report.unexpected_keys == []
    model = trainer.model
    loaded, fresh = stage1.state_dict(), model.state_dict()
    assert sorted(report.incorrect_shapes) == [
        (k, tuple(loaded[k].shape), tuple(fresh[k].shape)) for k in CLASSIFIER
    ]
    skipped = set(NEW_KEYS) | set(CLASSIFIER)
    for k, v in model.state_dict().items():
        if k not in skipped:
            assert torch.equal(v, loaded[k]), k  # every compatible tensor is stage 1's

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("roi_heads.") for n in trainable)
    assert {n for n, _ in model.named_parameters() if n.startswith("roi_heads.")} == trainable
    before = frozen_state(model)
    heads_before = {
        k: v.clone() for k, v in model.state_dict().items() if k.startswith("roi_heads.")
    }
    trainer.train()
    after = frozen_state(trainer.model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), [
        k for k in before if not torch.equal(after[k], before[k])
    ]
    heads = trainer.model.state_dict()
    for k in ("roi_heads.box_predictor.cls_score.weight", "roi_heads.mask_head.mask_fcn1.weight",
              "roi_heads.mask_head.mask_fcn5.weight", "roi_heads.box_head.fc1.weight"):  # fmt: skip
        assert not torch.equal(heads[k], heads_before[k]), k  # the heads do train
    metrics = [
        json.loads(x) for x in (tmp_path / "stage2" / "metrics.json").read_text().splitlines()
    ]
    trained = [m for m in metrics if "total_loss" in m]
    assert trained and all(math.isfinite(m["total_loss"]) for m in trained)
    assert {"loss_mask", "loss_mask_dice", "loss_mask_boundary"} <= set(trained[-1])


def _leaf(path):
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("folder", ["tiny", "LVISv1"])
def test_stage2_leaf_starts_from_its_stage1_and_adds_three_mask_convs(folder):
    first, second = (
        setup_cfg(str(REPO / "configs" / folder / f"{name}.yaml")) for name in LEAVES[folder]
    )
    assert second.MODEL.WEIGHTS == f"{first.OUTPUT_DIR}/model_final.pth"
    assert second.MODEL.FROZEN_MODULES == ["backbone", "proposal_generator"]
    assert second.MODEL.ROI_MASK_HEAD.NUM_CONV == first.MODEL.ROI_MASK_HEAD.NUM_CONV + 3
    assert first.MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME == "EQL"
    box, mask = second.MODEL.ROI_BOX_HEAD, second.MODEL.ROI_MASK_HEAD
    assert (box.CLS_LOSS_NAME, box.POOLER_TYPE) == ("GroupSoftmax", "DeformROIAlignV2")
    assert mask.NAME == "DiceBCEMaskHead" and mask.BOUNDARY_LOSS_WEIGHT > 0
    assert (mask.LEVEL_ASSIGNMENT, mask.TEST_AREA_RATIO) == ("area_ratio", "two_pass")


def test_lvis_and_tiny_stage2_set_the_same_method_keys():
    def method_keys(folder):
        path = REPO / "configs" / folder / f"{LEAVES[folder][1]}.yaml"
        model = yaml.safe_load(path.read_text())["MODEL"]
        model.pop("WEIGHTS"), model["ROI_MASK_HEAD"].pop("NUM_CONV")  # tied to each base
        model["ROI_BOX_HEAD"].pop("DEFORM_POOL", None)  # the offset branch's width
        return model

    assert method_keys("tiny") == method_keys("LVISv1")
