"""Equalization Loss v2 (Tan et al., "Equalization Loss v2: A New Gradient Balance Approach
for Long-tailed Object Detection", CVPR 2021). Reference: tztztztztz/eqlv2
``mmdet/models/losses/eqlv2.py``, including its all-reduce of the gradient statistics (the
mmdetection 3.x port drops it, and loses AP).
"""

from typing import Dict, Tuple

import torch
from detectron2.config import configurable

from .base import (
    ClassificationLoss,
    all_reduce_sum,
    empty_loss,
    prior_logit,
    sigmoid_probs_with_background,
)
from .registry import CLS_LOSS_REGISTRY
from .sigmoid import one_hot_bce


def eqlv2_class_weights(
    pos_neg: torch.Tensor, gamma: float = 12.0, mu: float = 0.8, alpha: float = 4.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class weights of positives and negatives from the gradient ratio g.

    r_j = f(g_j) = 1 / (1 + exp(-gamma (g_j - mu))), q_j = 1 + alpha (1 - r_j); the appended
    background channel has weight 1 for both.

    Args:
        pos_neg: (K,) accumulated positive / negative gradient ratio g.

    Returns:
        (pos_weight, neg_weight), each (K+1,) fp32.
    """
    neg_weight = torch.sigmoid(gamma * (pos_neg.float() - mu))
    neg_weight = torch.cat([neg_weight, neg_weight.new_ones(1)])
    pos_weight = 1 + alpha * (1 - neg_weight)
    return pos_weight, neg_weight


def eqlv2_loss(
    logits: torch.Tensor,
    gt_classes: torch.Tensor,
    pos_weight: torch.Tensor,
    neg_weight: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradient-reweighted sigmoid BCE over K+1 logits (background one-hot at index K).

    W_rj = pos_weight_j y_rj + neg_weight_j (1 - y_rj); L = sum_rj W_rj BCE(z_rj, y_rj) / R.

    Args:
        logits: (R, K+1) logits.
        gt_classes: (R,) labels in [0, K].
        pos_weight, neg_weight: (K+1,) per-class weights (:func:`eqlv2_class_weights`).

    Returns:
        (loss, prob_sum): the fp32 loss and (K+1,) sum_r sigmoid(z_rj) for
        :func:`eqlv2_gradient_stats`.
    """
    logits = logits.float()
    loss, prob_sum = one_hot_bce(logits, gt_classes, pos_weight, neg_weight)
    if gt_classes.numel() == 0:
        return empty_loss(logits), prob_sum
    return loss / gt_classes.numel(), prob_sum


@torch.no_grad()
def eqlv2_gradient_stats(
    logits: torch.Tensor,
    gt_classes: torch.Tensor,
    prob_sum: torch.Tensor,
    pos_weight: torch.Tensor,
    neg_weight: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted magnitudes of the positive and negative gradients of each foreground class.

    G = |sigmoid(z) - y|; pos_j = sum_r G y W = q_j sum_{r: gt_r = j} (1 - sigmoid(z_rj)),
    neg_j = sum_r G (1 - y) W = r_j (sum_r sigmoid(z_rj) - sum_{r: gt_r = j} sigmoid(z_rj)).

    Args:
        logits: (R, K+1) logits.
        gt_classes: (R,) labels in [0, K].
        prob_sum: (K+1,) sum_r sigmoid(z_rj).
        pos_weight, neg_weight: (K+1,) the weights the loss used.

    Returns:
        (pos, neg), each (K,) fp32, the background channel excluded.
    """
    rows = torch.arange(gt_classes.numel(), device=gt_classes.device)
    pos_prob = torch.sigmoid(logits[rows, gt_classes].float())
    pos_prob_sum = torch.zeros_like(prob_sum).index_add_(0, gt_classes, pos_prob)
    pos_count = torch.zeros_like(prob_sum).index_add_(0, gt_classes, torch.ones_like(pos_prob))
    pos = pos_weight * (pos_count - pos_prob_sum)
    neg = neg_weight * (prob_sum - pos_prob_sum)
    return pos[:-1], neg[:-1]


@CLS_LOSS_REGISTRY.register()
class EQLv2(ClassificationLoss):
    """EQLv2 over K+1 sigmoid logits (the last one is an objectness-like background logit).

    Buffers, saved in checkpoints: ``pos_grad``, ``neg_grad`` (K,) accumulated gradient
    magnitudes, 0 at start; ``pos_neg`` (K,) their ratio, 100 at start (so every weight is 1 in
    the first iteration). After each training loss the iteration's statistics are summed over
    all processes, then accumulated. Bias init: prior ``EQLV2.PRIOR_PROB``.
    Inference: p_c = sigmoid(z_c) (1 - sigmoid(z_bg)), background column sigmoid(z_bg).
    """

    @configurable
    def __init__(
        self,
        num_classes: int,
        *,
        gamma: float = 12.0,
        mu: float = 0.8,
        alpha: float = 4.0,
        prior_prob: float = 0.5,
    ):
        super().__init__(num_classes)
        self.gamma, self.mu, self.alpha, self.prior_prob = gamma, mu, alpha, prior_prob
        self.register_buffer("pos_grad", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("neg_grad", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("pos_neg", torch.full((num_classes,), 100.0, dtype=torch.float64))

    @classmethod
    def from_config(cls, cfg, num_classes):
        eqlv2 = cfg.MODEL.ROI_BOX_HEAD.EQLV2
        return {
            "num_classes": num_classes,
            "gamma": eqlv2.GAMMA,
            "mu": eqlv2.MU,
            "alpha": eqlv2.ALPHA,
            "prior_prob": eqlv2.PRIOR_PROB,
        }

    def init_bias(self, bias: torch.Tensor) -> None:
        torch.nn.init.constant_(bias, prior_logit(self.prior_prob))

    @torch.no_grad()
    def update_stats(self, logits, gt_classes, prob_sum, pos_weight, neg_weight) -> None:
        """Accumulate this iteration's gradient statistics, summed over processes."""
        pos, neg = eqlv2_gradient_stats(logits, gt_classes, prob_sum, pos_weight, neg_weight)
        stats = all_reduce_sum(torch.cat([pos, neg]).to(self.pos_grad.dtype))
        self.pos_grad += stats[: self.num_classes]
        self.neg_grad += stats[self.num_classes :]
        self.pos_neg.copy_(self.pos_grad / (self.neg_grad + 1e-10))

    def forward(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> Dict[str, torch.Tensor]:
        pos_weight, neg_weight = eqlv2_class_weights(self.pos_neg, self.gamma, self.mu, self.alpha)
        loss, prob_sum = eqlv2_loss(logits, gt_classes, pos_weight, neg_weight)
        if self.training:
            self.update_stats(logits.detach(), gt_classes, prob_sum, pos_weight, neg_weight)
        return {"loss_cls": loss}

    def predict_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return sigmoid_probs_with_background(logits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, mu={self.mu}, alpha={self.alpha}"
