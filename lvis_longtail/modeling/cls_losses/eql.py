"""Equalization Loss (Tan et al., "Equalization Loss for Long-Tailed Object Recognition",
CVPR 2020). Reference: tztztztztz/eql.detectron2 ``projects/EQL/eql/fast_rcnn.py``; unlike
it, class frequencies come from the training set's metadata, not a pasted table.
"""

from typing import Dict

import torch
from detectron2.config import configurable

from lvis_longtail.data.class_stats import get_class_stats

from .base import empty_loss
from .registry import CLS_LOSS_REGISTRY
from .sigmoid import SigmoidCE, one_hot_bce


def eql_loss(logits: torch.Tensor, gt_classes: torch.Tensor, rare: torch.Tensor) -> torch.Tensor:
    """Equalization loss: sigmoid BCE whose negative terms for rare classes are dropped on
    foreground RoIs.

    w_rj = 1 - E(r) T(f_j) (1 - y_rj), E(r) = 1[r is foreground], T(f_j) = ``rare[j]``;
    L = sum_rj w_rj BCE(z_rj, y_rj) / R. With no rare class it is plain sigmoid BCE.

    Args:
        logits: (R, K) class logits.
        gt_classes: (R,) labels in [0, K], K = background (y = 0 everywhere).
        rare: (K,) bool, f_j < lambda.
    """
    if gt_classes.numel() == 0:
        return empty_loss(logits)
    logits = logits.float()
    ones = logits.new_ones(logits.shape[1])
    foreground_neg_weight = (~rare).to(logits.dtype)  # 1 - T(f_j) on foreground RoIs
    loss, _ = one_hot_bce(logits, gt_classes, ones, ones, foreground_neg_weight)
    return loss / gt_classes.numel()


@CLS_LOSS_REGISTRY.register()
class EQL(SigmoidCE):
    """Equalization Loss over K sigmoid logits (no background logit).

    Identical to :class:`SigmoidCE` (logit layout, bias init, inference, accuracy), except for
    the loss weights: ``rare`` marks classes with training image frequency
    f_j = image_count_j / num_images below lambda (``EQL.LAMBDA``), a non-persistent buffer
    derived from the dataset; their negative terms from foreground RoIs are dropped. Bias
    init: prior ``EQL.PRIOR_PROB``.
    """

    @configurable
    def __init__(
        self,
        num_classes: int,
        *,
        image_frequency: torch.Tensor,
        lambda_: float = 1.1e-3,
        prior_prob: float = 1e-3,
    ):
        """
        Args:
            num_classes: K.
            image_frequency: (K,) fraction of training images containing each class.
            lambda_: frequency threshold of the suppressed (rare) classes.
            prior_prob: initial sigmoid probability of every class.
        """
        super().__init__(num_classes, prior_prob=prior_prob)
        if image_frequency.numel() != num_classes:
            raise ValueError(
                f"image_frequency has {image_frequency.numel()} classes, not {num_classes}"
            )
        self.lambda_ = lambda_
        self.register_buffer("rare", torch.as_tensor(image_frequency) < lambda_, persistent=False)

    @classmethod
    def from_config(cls, cfg, num_classes):
        eql = cfg.MODEL.ROI_BOX_HEAD.EQL
        return {
            "num_classes": num_classes,
            "image_frequency": get_class_stats(cfg.DATASETS.TRAIN).image_frequency,
            "lambda_": eql.LAMBDA,
            "prior_prob": eql.PRIOR_PROB,
        }

    def forward(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"loss_cls": eql_loss(logits, gt_classes, self.rare)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lambda={self.lambda_}, suppressed={int(self.rare.sum())}"
