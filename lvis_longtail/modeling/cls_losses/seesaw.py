"""Seesaw Loss (Wang et al., "Seesaw Loss for Long-Tailed Instance Segmentation", CVPR 2021).

Reference: open-mmlab/mmdetection ``mmdet/models/losses/seesaw_loss.py``. Differences: the
per-iteration class counts are all-reduced across processes (the reference keeps them per
GPU), and the factors are computed in log space: log S_ij = log M_ij + log C_ij.
"""

import math
from typing import Dict, Tuple

import torch
from detectron2.config import configurable
from torch.nn import functional as F

from .base import ClassificationLoss, all_reduce_sum, empty_loss
from .registry import CLS_LOSS_REGISTRY


def seesaw_log_factors(
    class_logits: torch.Tensor,
    labels: torch.Tensor,
    cum_samples: torch.Tensor,
    p: float,
    q: float,
    eps: float,
) -> torch.Tensor:
    """log S_ij = log M_ij + log C_ij of positive RoIs (0 in column i = the RoI's label).

    M_ij = (N_j / N_i)^p if N_i > N_j else 1 (counts clamped to >= 1);
    C_ij = (sigma_j / max(sigma_i, eps))^q if sigma_j > sigma_i else 1,
    sigma = softmax(class_logits) without gradient.

    Args:
        class_logits: (P, K) fp32 class logits of P positive RoIs.
        labels: (P,) labels in [0, K).
        cum_samples: (K,) accumulated sample counts N.

    Returns:
        (P, K) fp32 log S.
    """
    with torch.no_grad():
        log_factors = class_logits.new_zeros(class_logits.shape)
        if p > 0:
            log_count = cum_samples.clamp(min=1).log().to(class_logits.dtype)
            log_ratio = log_count[None, :] - log_count[labels, None]  # log N_j - log N_i
            log_factors.add_(log_ratio.clamp_(max=0).mul_(p))
        if q > 0:
            log_sigma = F.log_softmax(class_logits, dim=1)
            log_self = log_sigma.gather(1, labels[:, None]).clamp_(min=math.log(eps))
            log_factors.add_(log_sigma.sub_(log_self).clamp_(min=0).mul_(q))
    return log_factors


def seesaw_loss(
    logits: torch.Tensor,
    gt_classes: torch.Tensor,
    cum_samples: torch.Tensor,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seesaw class term and objectness term, both normalised by the number of RoIs R.

    Class term: sum over positive RoIs of CE(z + log S, i), the logit of every class j != i
    shifted by log S_ij (log S_ii = 0 by construction). P = Q = 0 gives softmax CE over the K
    class logits. Objectness term: 2-way CE of z[K:K+2] (index 0 object, 1 background).

    Args:
        logits: (R, K+2) logits: K class logits, then [object, background].
        gt_classes: (R,) labels in [0, K], K = background.
        cum_samples: (K,) or (K+1,) accumulated sample counts per label.

    Returns:
        (loss_cls, loss_cls_objectness), fp32 scalars; zeros in the graph when R = 0.
    """
    if gt_classes.numel() == 0:
        return empty_loss(logits), empty_loss(logits)
    num_classes = logits.shape[1] - 2
    class_logits, obj_logits = logits.float().split([num_classes, 2], dim=1)
    positive = (gt_classes < num_classes).nonzero().squeeze(1)
    pos_logits, labels = class_logits.index_select(0, positive), gt_classes[positive]
    log_factors = seesaw_log_factors(pos_logits, labels, cum_samples[:num_classes], p, q, eps)
    loss_cls = F.cross_entropy(pos_logits + log_factors, labels, reduction="sum")
    is_background = (gt_classes == num_classes).long()
    loss_obj = F.cross_entropy(obj_logits, is_background, reduction="mean")
    return loss_cls / gt_classes.numel(), loss_obj


@CLS_LOSS_REGISTRY.register()
class SeesawLoss(ClassificationLoss):
    """Seesaw Loss with its objectness branch: K+2 logits ``[K classes, object, background]``.

    ``cum_samples`` (K+1,) float64 buffer, saved in checkpoints: the number of sampled RoIs
    seen per label (GT boxes added as proposals included). In training it is updated *before*
    the loss, with this iteration's counts summed over all processes, so every replica uses
    the same statistic (mmdetection keeps it per GPU). float64 keeps counts exact past 2^24.

    Inference: p_obj = softmax(z[K:]); score_c = softmax(z[:K])_c * p_obj[0]; bg = p_obj[1].
    """

    @configurable
    def __init__(self, num_classes: int, *, p: float = 0.8, q: float = 2.0, eps: float = 1e-2):
        super().__init__(num_classes)
        self.p, self.q, self.eps = p, q, eps
        self.register_buffer("cum_samples", torch.zeros(num_classes + 1, dtype=torch.float64))

    @classmethod
    def from_config(cls, cfg, num_classes):
        seesaw = cfg.MODEL.ROI_BOX_HEAD.SEESAW
        return {"num_classes": num_classes, "p": seesaw.P, "q": seesaw.Q, "eps": seesaw.EPS}

    @property
    def num_logits(self) -> int:
        return self.num_classes + 2

    @torch.no_grad()
    def update_counts(self, gt_classes: torch.Tensor) -> None:
        """Add this iteration's per-label RoI counts, summed over processes."""
        counts = torch.bincount(gt_classes, minlength=self.num_classes + 1)
        self.cum_samples += all_reduce_sum(counts.to(self.cum_samples.dtype))

    def forward(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.training:
            self.update_counts(gt_classes)
        loss_cls, loss_obj = seesaw_loss(
            logits, gt_classes, self.cum_samples, self.p, self.q, self.eps
        )
        return {"loss_cls": loss_cls, "loss_cls_objectness": loss_obj}

    def predict_probs(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        class_probs = F.softmax(logits[:, : self.num_classes], dim=1)
        obj_probs = F.softmax(logits[:, self.num_classes :], dim=1)
        return torch.cat([class_probs * obj_probs[:, :1], obj_probs[:, 1:]], dim=1)

    def class_logit_columns(self) -> torch.Tensor:
        """The K class logits; calibration leaves the objectness pair untouched."""
        return torch.arange(self.num_classes)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, q={self.q}, eps={self.eps}"
