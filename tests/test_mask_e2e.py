"""The mask options inside a tiny Mask R-CNN: one training iteration and inference, with all
options on, all off, class-agnostic, and without positive RoIs; the mask config leaves."""

import pytest
import torch
import yaml
from conftest import REPO, make_batch, tiny_cfg
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from lvis_longtail.config import ConfigError, add_longtail_config
from lvis_longtail.config_check import check_config
from lvis_longtail.modeling.mask_levels import AreaRatioROIPooler
from lvis_longtail.modeling.mask_scoring import MaskIoUHead

ALL_ON = [
    "MODEL.ROI_MASK_HEAD.NAME", "DiceBCEMaskHead",
    "MODEL.ROI_MASK_HEAD.NUM_CONV", 7,
    "MODEL.ROI_MASK_HEAD.BOUNDARY_LOSS_WEIGHT", 1.0,
    "MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE", "NormedConv",
    "MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT", "area_ratio",
    "MODEL.ROI_MASK_HEAD.TEST_AREA_RATIO", "two_pass",
    "MODEL.ROI_MASKIOU_HEAD.ENABLED", True,
]  # fmt: skip
ALL_ON_KEYS = {"loss_mask", "loss_mask_dice", "loss_mask_boundary", "loss_maskiou"}
AGNOSTIC = ["MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", True]
VARIANTS = {
    "all_on": (ALL_ON, ALL_ON_KEYS),
    "all_on_class_agnostic": (ALL_ON + AGNOSTIC, ALL_ON_KEYS),
    "all_off": ([], {"loss_mask"}),
    "detectron2_head_with_levels_and_scoring": (
        ALL_ON[8:] + ["MODEL.ROI_MASK_HEAD.NUM_CONV", 1], {"loss_mask", "loss_maskiou"}
    ),
}  # fmt: skip
MASK_KEYS = {"loss_mask", "loss_mask_dice", "loss_mask_boundary", "loss_maskiou"}
NUM_CLASSES = 5
# Fewer proposals, RoIs and detections than the tiny config: the tests stay fast on 2 cores.
SMALL = [
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 100, "MODEL.RPN.POST_NMS_TOPK_TEST", 32,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "TEST.DETECTIONS_PER_IMAGE", 10,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,  # an untrained model still detects something
]  # fmt: skip
SIZE = (80, 96)


def _model(opts):
    torch.manual_seed(0)
    return build_model(tiny_cfg(NUM_CLASSES, opts=list(opts) + SMALL))


def _train_step(model, batch):
    model.train()
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    return losses


@pytest.mark.parametrize("name", list(VARIANTS))
def test_train_and_infer(name, storage):
    opts, expected_keys = VARIANTS[name]
    model = _model(opts)
    roi_heads = model.roi_heads
    assert isinstance(roi_heads.mask_pooler, AreaRatioROIPooler) == ("area_ratio" in opts)
    assert isinstance(roi_heads.mask_iou_head, MaskIoUHead) == ("ROI_MASKIOU_HEAD" in str(opts))
    batch = make_batch(num_images=2, num_classes=NUM_CLASSES, size=SIZE)
    losses = _train_step(model, batch)
    assert set(losses) & MASK_KEYS == expected_keys
    model.eval()
    with torch.no_grad():
        outputs = model([{k: v for k, v in d.items() if k != "instances"} for d in batch])
    for out in outputs:
        inst = out["instances"]
        assert len(inst) > 0 and inst.pred_masks.shape[1:] == SIZE
        assert inst.has("mask_scores") == ("loss_maskiou" in expected_keys)
        if inst.has("mask_scores"):
            assert torch.all(inst.mask_scores <= inst.scores + 1e-6)
            assert torch.all(inst.mask_scores >= 0)


def test_no_positive_rois(storage):
    model = _model(ALL_ON)
    batch = make_batch(num_images=2, num_classes=NUM_CLASSES, size=SIZE)
    for d in batch:
        empty = Instances(SIZE)
        empty.gt_boxes = Boxes(torch.zeros(0, 4))
        empty.gt_classes = torch.zeros(0, dtype=torch.long)
        empty.gt_masks = BitMasks(torch.zeros((0,) + SIZE, dtype=torch.bool))
        d["instances"] = empty
    losses = _train_step(model, batch)
    assert {k: losses[k].item() for k in ALL_ON_KEYS} == dict.fromkeys(ALL_ON_KEYS, 0.0)
    mask_params = list(model.roi_heads.mask_head.parameters())
    mask_params += list(model.roi_heads.mask_iou_head.parameters())
    assert all(p.grad is not None for p in mask_params)  # same graph on every DDP rank


@pytest.mark.parametrize(
    "opts, match",
    [
        (["MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT", "mask"], "LEVEL_ASSIGNMENT"),
        (["MODEL.ROI_MASK_HEAD.TEST_AREA_RATIO", "two_pass"], "two_pass"),
        (["MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE", "NormedConv"], "DiceBCEMaskHead"),
        (["MODEL.ROI_MASK_HEAD.BOUNDARY_LOSS_WEIGHT", 1.0], "DiceBCEMaskHead"),
    ],
)
def test_inconsistent_options_rejected(opts, match):
    with pytest.raises(ConfigError, match=match):
        check_config(tiny_cfg(NUM_CLASSES, opts=list(opts) + SMALL))


METHODS = ["dicebce", "dicebce_arealevel", "maskscoring", "heavymask"]


@pytest.mark.parametrize("method", METHODS)
def test_mask_leaves(method):
    """The LVIS v1 leaf loads, its tiny counterpart builds, and both set the same mask keys."""
    lvis = REPO / "configs" / "LVISv1" / f"mask_rcnn_R50_FPN_1x_{method}.yaml"
    tiny = REPO / "configs" / "tiny" / f"mask_rcnn_R18_FPN_tiny_{method}.yaml"
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(str(lvis))
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1203 and cfg.OUTPUT_DIR.endswith(method)
    assert build_model(tiny_cfg(NUM_CLASSES, tiny, SMALL)).roi_heads.mask_on
    models = [yaml.safe_load(p.read_text())["MODEL"] for p in (lvis, tiny)]
    mask_keys = [{k: v for k, v in m.items() if k.startswith("ROI_MASK")} for m in models]
    assert mask_keys[0] == mask_keys[1] and mask_keys[0]  # ROI_MASK_HEAD, ROI_MASKIOU_HEAD
