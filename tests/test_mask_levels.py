"""Area-ratio-aware mask RoI level assignment, the area ratio of GT masks, and two-pass
test-time assignment."""

import numpy as np
import pytest
import torch
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from lvis_longtail.modeling.mask_levels import (
    AreaRatioROIPooler,
    assign_boxes_to_levels_by_area,
    gt_area_ratios,
    predicted_area_ratios,
    two_pass_mask_logits,
)

# (w, h, r, level): k = clamp(floor(4 + log2(sqrt(w h r) / 224)), 2, 5), worked by hand.
LEVEL_TABLE = [
    (224, 224, 1.0, 4),  # sqrt = 224: 4 + 0
    (224, 224, 0.25, 3),  # sqrt = 112: 4 - 1
    (448, 448, 0.25, 4),  # sqrt = 224
    (448, 448, 1.0, 5),  # sqrt = 448: 4 + 1
    (448, 112, 1.0, 4),  # sqrt = 224
    (112, 112, 1.0, 3),  # 4 - 1
    (56, 56, 1.0, 2),  # 4 - 2
    (28, 28, 1.0, 2),  # 4 - 3 = 1, clamped to 2
    (224, 224, 0.01, 2),  # sqrt = 22.4: 4 - 3.32 = 0.68 -> 0, clamped to 2
    (1000, 1000, 1.0, 5),  # 4 + log2(4.46) = 6.16 -> 6, clamped to 5
    (1000, 1000, 0.04, 3),  # sqrt = 200: 4 + log2(0.893) = 3.84 -> 3
    (800, 800, 0.01, 2),  # sqrt = 80: 4 + log2(0.357) = 2.51 -> 2
    (300, 300, 0.5, 3),  # sqrt = 212.1: 4 + log2(0.947) = 3.92 -> 3
]


def _boxes(whs):
    return Boxes(torch.tensor([[10.0, 20.0, 10.0 + w, 20.0 + h] for w, h in whs]))


def test_level_table():
    boxes = _boxes([(w, h) for w, h, _, _ in LEVEL_TABLE])
    ratios = torch.tensor([r for _, _, r, _ in LEVEL_TABLE])
    levels = assign_boxes_to_levels_by_area([boxes], ratios, 2, 5, 224, 4) + 2
    assert levels.tolist() == [k for _, _, _, k in LEVEL_TABLE]


def test_ratio_one_is_the_box_rule():
    from detectron2.modeling.poolers import assign_boxes_to_levels

    torch.manual_seed(0)
    xy = torch.rand(200, 2) * 500
    boxes = Boxes(torch.cat([xy, xy + torch.rand(200, 2) * 700 + 1], dim=1))
    ref = assign_boxes_to_levels([boxes], 2, 5, 224, 4)
    assert torch.equal(assign_boxes_to_levels_by_area([boxes], None, 2, 5, 224, 4), ref)
    assert torch.equal(assign_boxes_to_levels_by_area([boxes], torch.ones(200), 2, 5, 224, 4), ref)


def _features(batch=1):
    """FPN-like maps p2..p5 (strides 4..32) of a 512 x 512 image, map of level l = l."""
    return [torch.full((batch, 2, 512 // 2**k, 512 // 2**k), float(k)) for k in range(2, 6)]


def _pooler(cls=AreaRatioROIPooler):
    return cls(output_size=4, scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32], sampling_ratio=0,
               pooler_type="ROIAlignV2")  # fmt: skip


def test_pooler_matches_detectron2_and_uses_ratio_levels():
    torch.manual_seed(0)
    x = [torch.randn(2, 3, 64 // 2**k, 64 // 2**k) for k in range(4)]
    boxes = [_boxes([(40, 30), (10, 12)]), _boxes([(60, 60)])]
    ours = _pooler()(x, boxes)
    assert torch.equal(ours, _pooler(ROIPooler)(x, boxes))
    # A 224 x 224 box with r = 0.25 is pooled from level 3 (the map filled with 3).
    feats = _features()
    out = _pooler()(feats, [_boxes([(224, 224), (224, 224)])], torch.tensor([1.0, 0.25]))
    assert out[0].unique().tolist() == [4.0] and out[1].unique().tolist() == [3.0]
    assert _pooler()(feats, [Boxes(torch.zeros(0, 4))]).shape == (0, 2, 4, 4)


def _instances(masks, boxes):
    inst = Instances((20, 20))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.gt_masks = masks
    return inst


def test_gt_area_ratios_bitmasks():
    m = torch.zeros(4, 20, 20, dtype=torch.bool)
    m[0, 0:5, 0:10] = True  # half of the 10 x 10 box
    m[2, 0:10, 0:10] = True  # the whole box: r = 1
    m[3, 0:12, 0:12] = True  # spills out of its box: 144 / 100, clamped to 1
    box = [0, 0, 10, 10]
    inst = _instances(BitMasks(m), [box] * 4)  # m[1] empty: r = 0 -> floor 0.01
    assert gt_area_ratios([inst]).tolist() == pytest.approx([0.5, 0.01, 1.0, 1.0])


def test_gt_area_ratios_polygons_and_degenerate_box():
    triangle = [np.array([0, 0, 10, 0, 0, 10], dtype=np.float64)]  # area 50
    square = [np.array([0, 0, 4, 0, 4, 4, 0, 4], dtype=np.float64)]  # area 16
    inst = _instances(PolygonMasks([triangle, square, square]),
                      [[0, 0, 10, 10], [0, 0, 8, 8], [3, 3, 3, 3]])  # fmt: skip
    assert gt_area_ratios([inst]).tolist() == pytest.approx([0.5, 0.25, 1.0])


def test_predicted_area_ratios():
    logits = torch.full((2, 3, 4, 4), -1.0)
    logits[0, 1, :2] = 1.0  # class 1: 8 of 16 pixels
    logits[1, 2] = 1.0  # class 2: all pixels; row 1 predicts class 0: no pixel -> floor
    ratios = predicted_area_ratios(logits, torch.tensor([1, 0]))
    assert ratios.tolist() == pytest.approx([0.5, 0.01])
    assert predicted_area_ratios(logits[:, 2:], torch.tensor([0, 0])).tolist() == pytest.approx(
        [0.01, 1.0]
    )


def test_two_pass_repools_only_when_level_changes():
    # Box rule: all three boxes are 224 x 224 -> level 4. First-pass masks cover:
    # RoI 0: 100% (r = 1, stays at 4); RoI 1: 25% (r = 0.25 -> level 3);
    # RoI 2: 50% (sqrt(0.5) = 0.707 -> 4 - 0.5 = 3.5 -> level 3);
    # RoI 3 (448 x 448, level 5): 75% -> 5 + log2(0.866) = 4.79 -> level 4.
    # RoI 4 (56 x 56, level 2): 1% -> stays at the finest level 2.
    boxes = [_boxes([(224, 224)] * 3 + [(448, 448), (56, 56)])]
    fractions = [16, 4, 8, 12, 0]  # foreground pixels of 16 in the first pass
    calls = []

    def predict(feats, classes):
        assert classes.shape == (feats.shape[0],)
        calls.append(feats.shape[0])
        if len(calls) == 1:
            logits = torch.full((feats.shape[0], 1, 4, 4), -5.0)
            for i, n in enumerate(fractions):
                logits[i, 0].view(-1)[:n] = 5.0
            return logits
        # Second pass: 100 x the level of the re-pooled map, upsampled to the mask size.
        return feats[:, :1] * 100

    feats, logits, changed = two_pass_mask_logits(
        _pooler(), _features(), boxes, torch.zeros(5, dtype=torch.long), predict
    )
    assert changed.tolist() == [False, True, True, True, False]
    assert calls == [5, 3]
    assert [feats[i].unique().item() for i in range(5)] == [4.0, 3.0, 3.0, 4.0, 2.0]
    assert logits[1].unique().item() == logits[2].unique().item() == 300.0
    assert logits[3].unique().item() == 400.0
    assert (logits[0] > 0).all() and (logits[4] < 0).all()  # first-pass predictions kept


def test_two_pass_no_boxes():
    feats, logits, changed = two_pass_mask_logits(
        _pooler(), _features(), [Boxes(torch.zeros(0, 4))], torch.zeros(0, dtype=torch.long),
        lambda f, c: torch.zeros(f.shape[0], 1, 8, 8),
    )  # fmt: skip
    assert feats.shape == (0, 2, 4, 4) and logits.shape == (0, 1, 8, 8) and changed.numel() == 0
