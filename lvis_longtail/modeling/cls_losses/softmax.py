"""Softmax cross-entropy over K+1 logits: detectron2's default box classifier (the baseline)."""

from typing import Dict

import torch
from detectron2.config import configurable
from torch.nn import functional as F

from .base import ClassificationLoss, empty_loss
from .registry import CLS_LOSS_REGISTRY


def softmax_ce_loss(logits: torch.Tensor, gt_classes: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy, 0 (in the graph) for no RoIs.

    Args:
        logits: (R, K+1) logits, background last.
        gt_classes: (R,) labels in [0, K].
    """
    if gt_classes.numel() == 0:
        return empty_loss(logits)
    return F.cross_entropy(logits.float(), gt_classes, reduction="mean")


@CLS_LOSS_REGISTRY.register()
class SoftmaxCE(ClassificationLoss):
    """detectron2's behaviour: K+1 logits, mean cross-entropy, softmax probabilities, zero
    bias, and accuracy as in ``_log_classification_stats``."""

    @configurable
    def __init__(self, num_classes: int):
        super().__init__(num_classes)

    @classmethod
    def from_config(cls, cfg, num_classes):
        return {"num_classes": num_classes}

    def forward(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"loss_cls": softmax_ce_loss(logits, gt_classes)}

    def predict_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return F.softmax(logits.float(), dim=-1)

    def class_logit_columns(self) -> torch.Tensor:
        return torch.arange(self.num_classes)
