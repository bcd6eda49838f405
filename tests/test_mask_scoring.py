"""MaskIoU head: targets and loss by hand, shapes, and test-time mask scores."""

import pytest
import torch
from detectron2.structures import Instances

from lvis_longtail.modeling.mask_scoring import (
    MaskIoUHead,
    gt_area_fraction,
    mask_iou_loss,
    mask_iou_targets,
)


def test_mask_iou_targets_golden():
    logits = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]]] * 3)  # prediction: the top row
    gt = torch.tensor([[[1, 0], [1, 0]], [[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    # RoI 0: I = 1, U = 2 + 2 - 1 = 3; RoI 1: identical -> 1; RoI 2: empty GT, I = 0.
    assert mask_iou_targets(logits, gt).tolist() == pytest.approx([1 / 3, 1.0, 0.0])
    # Half of GT 0 lies outside the RoI: its full area is 2 / 0.5 = 4, U = 2 + 4 - 1 = 5.
    frac = torch.tensor([0.5, 1.0, 0.0])
    assert mask_iou_targets(logits, gt, frac).tolist() == pytest.approx([0.2, 1.0, 0.0])
    empty = torch.full((1, 2, 2), -1.0)
    assert mask_iou_targets(empty, torch.zeros(1, 2, 2)).tolist() == [0.0]  # U = 0


def test_gt_area_fraction():
    gt = torch.tensor([[[1, 1], [0, 0]]] * 3, dtype=torch.bool)  # half of each RoI
    # RoI area 100 -> 50 px of GT inside; GT mask areas 200, 40 (-> 1.25, clamped), 0.
    frac = gt_area_fraction(gt, torch.tensor([100.0] * 3), torch.tensor([200.0, 40.0, 0.0]))
    assert frac.tolist() == pytest.approx([0.25, 1.0, 1.0])


def test_mask_iou_loss_golden_and_empty():
    pred = torch.tensor([[0.1, 0.9], [0.4, 0.2]], requires_grad=True)
    loss = mask_iou_loss(pred, torch.tensor([1, 0]), torch.tensor([0.5, 0.0]))
    assert loss.item() == pytest.approx((0.4**2 + 0.4**2) / 2)
    empty = torch.zeros(0, 2, requires_grad=True)
    zero = mask_iou_loss(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    zero.backward()
    assert zero.item() == 0.0 and empty.grad is not None


def _head(num_classes=5):
    return MaskIoUHead(in_channels=8, resolution=14, num_classes=num_classes, conv_dim=16,
                       fc_dim=32)  # fmt: skip


def test_head_shapes_loss_and_detached_mask():
    head = _head()
    feats = torch.randn(3, 8, 14, 14, requires_grad=True)
    logits = torch.randn(3, 28, 28, requires_grad=True)
    assert head(feats, logits).shape == (3, 5)
    gt = torch.rand(3, 28, 28) > 0.5
    losses = head.losses(feats, logits, gt, torch.tensor([0, 4, 2]))
    assert set(losses) == {"loss_maskiou"} and torch.isfinite(losses["loss_maskiou"])
    losses["loss_maskiou"].backward()
    assert feats.grad is not None and logits.grad is None
    empty = head.losses(feats[:0], logits[:0], gt[:0], torch.zeros(0, dtype=torch.long))
    assert empty["loss_maskiou"].item() == 0.0


def test_inference_sets_mask_scores():
    head = _head()
    torch.nn.init.zeros_(head.predictor.weight)
    head.predictor.bias.data = torch.tensor([0.5, 2.0, -1.0, 0.25, 0.0])
    a, b = Instances((10, 10)), Instances((10, 10))
    a.scores, a.pred_classes = torch.tensor([0.8, 0.6]), torch.tensor([0, 1])
    b.scores, b.pred_classes = torch.tensor([0.4]), torch.tensor([2])
    head.inference(torch.randn(3, 8, 14, 14), torch.randn(3, 28, 28), [a, b])
    # IoU clamped to [0, 1]: 0.5, 2 -> 1, -1 -> 0.
    assert a.mask_scores.tolist() == pytest.approx([0.4, 0.6])
    assert b.mask_scores.tolist() == [0.0]
    assert a.scores.tolist() == pytest.approx([0.8, 0.6])  # box scores untouched
