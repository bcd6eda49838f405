"""Golden values of the balanced mask loss and the boundary loss, derived by hand."""

import math

import pytest
import torch

from lvis_longtail.modeling.mask_losses import (
    boundary_loss,
    boundary_targets,
    dice_loss,
    foreground_pixel_weights,
    weighted_bce_loss,
)

LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75


def _two_rois():
    """RoI 0: one foreground pixel of four, p = 0.75 on it and 0.5 elsewhere.
    RoI 1: all foreground, p = 0.75 everywhere."""
    logits = torch.tensor([[[LN3, 0.0], [0.0, 0.0]], [[LN3, LN3], [LN3, LN3]]])
    targets = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [1, 1]]], dtype=torch.bool)
    return logits, targets


def test_dice_golden():
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[LN3, LN3], [LN3, LN3]]])
    targets = torch.tensor([[[1.0, 0], [0, 0]], [[1, 1], [1, 1]]])
    # RoI 0: sum(py) = 0.5, sum(p) = 2, sum(y) = 1 -> 1 - (1 + 1) / (3 + 1) = 0.5
    # RoI 1: sum(py) = 3, sum(p) = 3, sum(y) = 4 -> 1 - (6 + 1) / (7 + 1) = 0.125
    assert dice_loss(logits, targets).item() == pytest.approx((0.5 + 0.125) / 2, abs=1e-6)


def test_dice_empty_target_and_background_prediction_is_zero():
    logits = torch.full((1, 4, 4), -1e4)
    assert dice_loss(logits, torch.zeros(1, 4, 4)).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "num_fg, expected",
    [(0, None), (1, 10.0), (2, 7.0), (4, 3.0), (8, 1.0), (12, 1.0), (16, 1.0)],
)
def test_foreground_pixel_weights_4x4(num_fg, expected):
    # r = num_fg / 16: (1 - r) / r = 15 (clipped to 10), 7, 3, 1, 1/3 (clipped to 1), 0 -> 1.
    targets = torch.zeros(1, 16, dtype=torch.bool)
    targets[0, :num_fg] = True
    w = foreground_pixel_weights(targets.view(1, 4, 4), fg_weight_max=10.0).view(16)
    assert torch.all(w[num_fg:] == 1.0)  # background pixels
    if expected is not None:
        assert torch.allclose(w[:num_fg], torch.full((num_fg,), expected))
    assert torch.isfinite(w).all()


def test_foreground_pixel_weights_given_ratio():
    targets = torch.ones(2, 2, 2, dtype=torch.bool)
    w = foreground_pixel_weights(targets, 10.0, area_ratio=torch.tensor([0.2, 0.0]))
    assert torch.allclose(w[0], torch.full((2, 2), 4.0))  # (1 - 0.2) / 0.2
    assert torch.allclose(w[1], torch.full((2, 2), 10.0))  # r = 0 -> clipped, not inf


def test_weighted_bce_golden():
    logits, targets = _two_rois()
    # RoI 0: r = 1/4 -> w_fg = 3; fg BCE = -ln 0.75 = ln(4/3), bg BCE = ln 2 (three pixels):
    #        (3 ln(4/3) + 3 ln 2) / 6 = ln(8/3) / 2.   RoI 1: r = 1, all BCE ln(4/3).
    expected = (math.log(8 / 3) / 2 + math.log(4 / 3)) / 2
    assert weighted_bce_loss(logits, targets, 10.0).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_bce_unit_weights_is_mean_bce():
    logits, targets = _two_rois()
    # fg_weight_max = 1 -> all weights 1: mean over the 8 pixels.
    expected = (5 * math.log(4 / 3) + 3 * math.log(2)) / 8
    assert weighted_bce_loss(logits, targets, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_boundary_target_of_square():
    y = torch.zeros(1, 6, 6)
    y[0, 1:5, 1:5] = 1
    expected = y.clone()
    expected[0, 2:4, 2:4] = 0  # interior of the 4x4 square; its 12 perimeter pixels remain
    b = boundary_targets(y)
    assert torch.equal(b, expected)
    assert b.sum().item() == 12


def test_boundary_target_ignores_roi_frame():
    full = torch.ones(1, 4, 4)
    assert boundary_targets(full).sum().item() == 0
    corner = torch.zeros(1, 4, 4)
    corner[0, :2, :2] = 1
    expected = torch.zeros(1, 4, 4)
    expected[0, 0, 1] = expected[0, 1, 0] = expected[0, 1, 1] = 1  # (0, 0) touches only fg
    assert torch.equal(boundary_targets(corner), expected)


def test_boundary_loss_golden():
    y = torch.zeros(1, 6, 6)
    y[0, 1:5, 1:5] = 1
    # p = 0.5 everywhere: BCE = ln 2; 12 boundary pixels of 36:
    # dice = 1 - (2 * 6 + 1) / (18 + 12 + 1) = 18 / 31.
    loss = boundary_loss(torch.zeros(1, 6, 6), y)
    assert loss.item() == pytest.approx(math.log(2) + 18 / 31, rel=1e-6)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, y: dice_loss(x, y),
        lambda x, y: weighted_bce_loss(x, y, 10.0),
        lambda x, y: boundary_loss(x, y),
    ],
)
def test_empty_input_is_graph_connected_zero(fn):
    logits = torch.zeros(0, 28, 28, requires_grad=True)
    loss = fn(logits, torch.zeros(0, 28, 28, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


def test_fp16_extreme_logits_finite():
    torch.manual_seed(0)
    logits = (torch.randn(3, 8, 8) * 1e4).clamp(-6e4, 6e4).half().requires_grad_()
    targets = torch.rand(3, 8, 8) > 0.5
    targets[1] = False  # empty target: r = 0
    targets[2] = True  # full target: r = 1
    total = (
        dice_loss(logits, targets)
        + weighted_bce_loss(logits, targets, 10.0)
        + boundary_loss(logits, targets)
    )
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(logits.grad.float()).all()
