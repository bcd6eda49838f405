"""Pure mask-loss functions of the balanced mask loss (LVIS 2020 1st place, Tan et al.,
arXiv 2009.01559) and of the auxiliary boundary supervision.

The report does not print the equations in full; the forms below are the reconstruction
of docs/methods.md, "Balanced mask loss", and every free choice is an argument:

* dice, per RoI: ``1 - (2 sum(p y) + eps) / (sum(p) + sum(y) + eps)``, eps = 1, mean over RoIs;
* area-ratio-weighted BCE: ``-sum_i w_i [y log p + (1 - y) log(1 - p)] / sum_i w_i`` per RoI,
  then the mean over RoIs, with ``w_i = clip((1 - r) / r, 1, fg_weight_max)`` on foreground
  pixels and 1 elsewhere. ``r`` defaults to the foreground fraction of the RoI's own target;
  pass ``area_ratio`` to use another definition (e.g. the GT's mask/box area ratio).

All functions take logits of any float dtype (fp16 included) and compute in fp32. Shapes:
``R`` RoIs, ``M x M`` mask pixels. With ``R = 0`` they return ``logits.sum() * 0``, a zero
that stays in the autograd graph (all DDP ranks run the same graph).
"""

import torch
from torch.nn import functional as F

__all__ = [
    "dice_loss",
    "foreground_pixel_weights",
    "weighted_bce_loss",
    "boundary_targets",
    "boundary_loss",
]


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice loss on sigmoid probabilities, per RoI, averaged over RoIs.

    Args:
        logits: (R, M, M) mask logits (any float dtype).
        targets: (R, M, M) targets in [0, 1] (bool or float).
        eps: smoothing term added to numerator and denominator (1 in the report); an RoI with
            an empty target and an all-background prediction then has loss 0.

    Returns:
        Scalar fp32 tensor.
    """
    if logits.numel() == 0:
        return logits.sum() * 0
    p = logits.float().sigmoid().flatten(1)
    y = targets.float().flatten(1)
    numerator = 2 * (p * y).sum(1) + eps
    denominator = p.sum(1) + y.sum(1) + eps
    return (1 - numerator / denominator).mean()


def foreground_pixel_weights(
    targets: torch.Tensor, fg_weight_max: float, area_ratio: torch.Tensor = None
) -> torch.Tensor:
    """Pixel weights of the weighted BCE: ``clip((1 - r) / r, 1, fg_weight_max)`` on
    foreground pixels, 1 on background pixels.

    Args:
        targets: (R, M, M) binary targets (bool or float; > 0.5 is foreground).
        fg_weight_max: upper clip of the foreground weight (>= 1).
        area_ratio: optional (R,) ratio r per RoI. Default: the foreground fraction of each
            RoI's target. r is floored at 1e-6 before dividing: an RoI with r = 0 has no
            foreground pixel, so its weights are all 1 whatever the floor.

    Returns:
        (R, M, M) fp32 weights in [1, fg_weight_max].
    """
    fg = targets > 0.5
    if area_ratio is None:
        area_ratio = fg.flatten(1).float().mean(1)
    r = area_ratio.float().clamp(min=1e-6, max=1.0)
    w_fg = ((1 - r) / r).clamp(min=1.0, max=max(float(fg_weight_max), 1.0))
    ones = torch.ones_like(fg, dtype=torch.float32)
    return torch.where(fg, w_fg[:, None, None].expand_as(ones), ones)


def weighted_bce_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    fg_weight_max: float,
    area_ratio: torch.Tensor = None,
) -> torch.Tensor:
    """Area-ratio-weighted binary cross-entropy, normalised by the weights of each RoI and
    averaged over RoIs. With ``fg_weight_max = 1`` every weight is 1 and this equals
    detectron2's ``mask_rcnn_loss`` (mean BCE over all pixels).

    Args:
        logits: (R, M, M) mask logits (any float dtype).
        targets: (R, M, M) binary targets (bool or float).
        fg_weight_max: upper clip of the foreground weight.
        area_ratio: optional (R,) ratio r; see :func:`foreground_pixel_weights`.

    Returns:
        Scalar fp32 tensor.
    """
    if logits.numel() == 0:
        return logits.sum() * 0
    weights = foreground_pixel_weights(targets, fg_weight_max, area_ratio).flatten(1)
    bce = F.binary_cross_entropy_with_logits(
        logits.float().flatten(1), targets.float().flatten(1), reduction="none"
    )
    return ((weights * bce).sum(1) / weights.sum(1)).mean()


def boundary_targets(targets: torch.Tensor) -> torch.Tensor:
    """Inner boundary of binary masks by a 3x3 morphological gradient: ``y - erode(y)``,
    i.e. the foreground pixels with a background pixel among their 8 neighbours.

    The erosion is a max-pool of the inverted mask whose padding is ignored, so the RoI
    frame itself is never a boundary: what lies beyond the RoI is unknown, and a mask that
    fills its RoI has no boundary.

    Args:
        targets: (R, M, M) binary targets (bool or float).

    Returns:
        (R, M, M) fp32 boundary map in {0, 1}.
    """
    y = (targets > 0.5).float()
    if y.numel() == 0:
        return y
    eroded = 1 - F.max_pool2d(1 - y[:, None], kernel_size=3, stride=1, padding=1)[:, 0]
    return y - eroded


def boundary_loss(
    boundary_logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0
) -> torch.Tensor:
    """Boundary supervision in the style of Boundary-preserving Mask R-CNN: mean BCE plus
    dice between a predicted boundary map and :func:`boundary_targets` of the mask target.

    Args:
        boundary_logits: (R, M, M) logits of a boundary prediction (any float dtype).
        targets: (R, M, M) binary *mask* targets; the boundary target is derived here.
        eps: dice smoothing term.

    Returns:
        Scalar fp32 tensor.
    """
    if boundary_logits.numel() == 0:
        return boundary_logits.sum() * 0
    b = boundary_targets(targets)
    bce = F.binary_cross_entropy_with_logits(boundary_logits.float(), b)
    return bce + dice_loss(boundary_logits, b, eps)
