"""build_mask_targets: one structure per batch with masks, classes, area ratios and GT area
fractions, golden values by hand; images without proposals are skipped."""

import torch
from detectron2.structures import BitMasks, Boxes, Instances

from lvis_longtail.modeling.mask_targets import build_mask_targets


def test_targets_golden():
    a = Instances((8, 8))
    a.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 8, 8], [0, 0, 4, 8]]))
    a.gt_boxes = Boxes(torch.tensor([[0.0, 0, 8, 8], [0, 0, 8, 8]]))
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4] = True  # top half: 32 px of the 64 px GT box, r = 0.5
    a.gt_masks = BitMasks(torch.stack([mask, mask]))
    a.gt_classes = torch.tensor([3, 1])
    empty = Instances((8, 8))  # no proposals, no GT fields
    empty.proposal_boxes = Boxes(torch.zeros(0, 4))
    t = build_mask_targets([a, empty], 4, torch.device("cpu"), area_ratios=True,
                           area_fractions=True)  # fmt: skip
    assert len(t) == 2 and t.masks.dtype == torch.bool and t.classes.tolist() == [3, 1]
    assert t.masks[0].tolist() == [[True] * 4] * 2 + [[False] * 4] * 2
    assert t.area_ratios.tolist() == [0.5, 0.5]
    # fraction inside the proposal: mean(target) * A_proposal / A_mask = 0.5 * 64 / 32 and
    # 0.5 * 32 / 32 (the left half of the box holds half of the mask)
    assert t.area_fractions.tolist() == [1.0, 0.5]
    plain = build_mask_targets([empty], 4, torch.device("cpu"))
    assert plain.masks.shape == (0, 4, 4) and plain.area_ratios is None
    assert plain.area_fractions is None and plain.classes.dtype == torch.int64
