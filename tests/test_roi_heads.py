"""RoI pooling levels follow MODEL.ROI_HEADS.CANONICAL_BOX_SIZE in every pooler."""

import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.structures import Boxes


@pytest.mark.parametrize("heads", ["LongTailROIHeads", "LongTailCascadeROIHeads"])
def test_canonical_box_size_reaches_box_and_mask_poolers(heads):
    opts = ["MODEL.ROI_HEADS.NAME", heads, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True,
            "MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT", "area_ratio"]  # fmt: skip
    roi_heads = build_model(tiny_cfg(opts=opts)).roi_heads
    assert roi_heads.box_pooler.canonical_box_size == 36  # the tiny base's value
    assert roi_heads.mask_pooler.canonical_box_size == 36
    default = build_model(tiny_cfg(opts=opts + ["MODEL.ROI_HEADS.CANONICAL_BOX_SIZE", 224]))
    assert default.roi_heads.box_pooler.canonical_box_size == 224


def test_tiny_objects_spread_over_levels_with_the_scaled_size():
    # sqrt(wh) = 12, 36, 72 px -> floor(4 + log2(s / 36)) = 2, 4, 5 (P2, P4, P5) vs all P2 at 224
    boxes = [Boxes(torch.tensor([[0.0, 0, 12, 12], [0, 0, 36, 36], [0, 0, 72, 72]]))]
    assert assign_boxes_to_levels(boxes, 2, 5, 36, 4).tolist() == [0, 2, 3]
    assert assign_boxes_to_levels(boxes, 2, 5, 224, 4).tolist() == [0, 0, 0]
