"""Sigmoid cross-entropy over one-hot targets, shared by the sigmoid losses, and ``SigmoidCE``
(K class logits, no background logit).

:func:`one_hot_bce` computes sum_rj W_rj BCE(z_rj, y_rj) for one-hot y with per-class weights
without materialising y or W: BCE(z, 0) = softplus(z) is summed per class and weighted, the
R positive entries are then corrected, and the backward pass is sigmoid(z) W - y W. This keeps
EQL / EQLv2 within about twice the cost of softmax cross-entropy at LVIS scale.
"""

from typing import Dict, Optional, Tuple

import torch
from detectron2.config import configurable
from torch.nn import functional as F

from .base import ClassificationLoss, empty_loss, prior_logit, sigmoid_predicted_classes
from .registry import CLS_LOSS_REGISTRY


class _OneHotBCE(torch.autograd.Function):
    """Autograd function of :func:`one_hot_bce` (weights are constants)."""

    @staticmethod
    def forward(
        ctx, logits, gt_classes, pos_weight, neg_weight, positive_row_neg_weight, scale, shift
    ):
        # the weighted sums below are products, which autocast would run in fp16 / bf16
        with torch.autocast(device_type=logits.device.type, enabled=False):
            if shift is not None:  # u = scale z + shift, in one pass and outside autograd
                logits = torch.add(shift, logits, alpha=scale)
            elif scale != 1.0:
                logits = logits * scale
            ctx.scale = scale
            return _OneHotBCE._forward(
                ctx, logits, gt_classes, pos_weight, neg_weight, positive_row_neg_weight
            )

    @staticmethod
    def _forward(ctx, logits, gt_classes, pos_weight, neg_weight, positive_row_neg_weight):
        rows = (gt_classes < logits.shape[1]).nonzero().squeeze(1)
        cols = gt_classes[rows]
        probs = torch.sigmoid(logits)
        neg_bce = F.softplus(logits)  # BCE(z, 0)
        row_neg_weight = neg_weight
        if positive_row_neg_weight is None:
            loss = neg_bce.sum(dim=0) @ neg_weight
        else:
            row_neg_weight = positive_row_neg_weight
            has_positive = logits.new_zeros(logits.shape[0]).index_fill_(0, rows, 1.0)
            positive_rows_sum = has_positive @ neg_bce
            loss = (neg_bce.sum(dim=0) - positive_rows_sum) @ neg_weight
            loss = loss + positive_rows_sum @ positive_row_neg_weight
        # the positive entries: W_pos BCE(z, 1) instead of W_neg BCE(z, 0)
        z_pos = logits[rows, cols]
        loss = (
            loss
            + (
                pos_weight[cols] * F.softplus(-z_pos) - row_neg_weight[cols] * F.softplus(z_pos)
            ).sum()
        )
        prob_sum = probs.sum(dim=0)
        ctx.mark_non_differentiable(prob_sum)
        ctx.save_for_backward(probs, rows, cols, pos_weight, neg_weight, positive_row_neg_weight)
        return loss, prob_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_prob_sum):
        probs, rows, cols, pos_weight, neg_weight, positive_row_neg_weight = ctx.saved_tensors
        grad_loss = grad_loss * ctx.scale  # du/dz
        grad = probs * (neg_weight * grad_loss)  # dBCE(z, 0)/dz = sigmoid(z)
        if positive_row_neg_weight is not None:
            grad[rows] = probs[rows] * (positive_row_neg_weight * grad_loss)
        grad[rows, cols] = (probs[rows, cols] - 1) * pos_weight[cols] * grad_loss
        return grad, None, None, None, None, None, None


def one_hot_bce(
    logits: torch.Tensor,
    gt_classes: torch.Tensor,
    pos_weight: torch.Tensor,
    neg_weight: torch.Tensor,
    positive_row_neg_weight: Optional[torch.Tensor] = None,
    scale: float = 1.0,
    shift: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted sigmoid BCE against one-hot targets, summed (not averaged), of the logits
    u = scale z + shift (z itself by default; ECM's margins use scale 2).

    y_rj = 1[j = gt_r]; a label >= C (the background when there is no background logit) gives
    an all-zero row. W_rj = pos_weight_j where y_rj = 1; otherwise neg_weight_j, or
    positive_row_neg_weight_j on rows that have a positive (EQL's suppression).

    Args:
        logits: (R, C) logits; the computation runs in their dtype.
        gt_classes: (R,) int64 labels.
        pos_weight, neg_weight, positive_row_neg_weight: (C,) per-class weights.
        scale: factor of the logits.
        shift: optional (C,) offset added to the scaled logits.

    Returns:
        (loss, prob_sum): sum_rj W_rj BCE(u_rj, y_rj), differentiable w.r.t. ``logits``; and
        (C,) sum_r sigmoid(u_rj) without gradient.
    """
    weights = [pos_weight, neg_weight, positive_row_neg_weight]
    weights = [None if w is None else w.to(logits.dtype) for w in weights]
    shift = None if shift is None else shift.to(logits.dtype)
    return _OneHotBCE.apply(logits, gt_classes, *weights, float(scale), shift)


def sigmoid_ce_loss(logits: torch.Tensor, gt_classes: torch.Tensor) -> torch.Tensor:
    """Sum over RoIs and classes of BCE(z_rj, y_rj), divided by the number of RoIs R.

    Args:
        logits: (R, K) class logits.
        gt_classes: (R,) labels in [0, K]; background (K) has y = 0 for every class.
    """
    if gt_classes.numel() == 0:
        return empty_loss(logits)
    logits = logits.float()
    ones = logits.new_ones(logits.shape[1])
    loss, _ = one_hot_bce(logits, gt_classes, ones, ones)
    return loss / gt_classes.numel()


@CLS_LOSS_REGISTRY.register()
class SigmoidCE(ClassificationLoss):
    """Independent sigmoid per class over K logits; a background RoI is negative for all.

    Bias init: prior probability ``PRIOR_PROB``. Inference: ``[sigmoid(z), 0]``: a zero
    background column, which ``fast_rcnn_inference`` drops anyway (detectron2's later sigmoid
    path keeps K+1 logits and drops a sigmoid column instead). Accuracy: background is
    predicted when no class reaches probability 0.5.
    """

    @configurable
    def __init__(self, num_classes: int, *, prior_prob: float = 0.01):
        super().__init__(num_classes)
        self.prior_prob = prior_prob

    @classmethod
    def from_config(cls, cfg, num_classes):
        prior_prob = cfg.MODEL.ROI_BOX_HEAD.SIGMOID_CE.PRIOR_PROB
        return {"num_classes": num_classes, "prior_prob": prior_prob}

    @property
    def num_logits(self) -> int:
        return self.num_classes

    def init_bias(self, bias: torch.Tensor) -> None:
        torch.nn.init.constant_(bias, prior_logit(self.prior_prob))

    def forward(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"loss_cls": sigmoid_ce_loss(logits, gt_classes)}

    def predict_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return F.pad(torch.sigmoid(logits.float()), (0, 1))

    def predict_classes(self, logits: torch.Tensor) -> torch.Tensor:
        return sigmoid_predicted_classes(torch.sigmoid(logits.float()))
