"""Logit-adjusted softmax cross-entropy (Menon et al., "Long-tail learning via logit
adjustment", ICLR 2021) and Balanced Softmax (Ren et al., "Balanced Meta-Softmax for
Long-Tailed Visual Recognition", NeurIPS 2020), the training-time forms: the loss sees the
logits shifted by tau times the log class prior, inference uses the plain logits.

References: google-research/google-research ``logit_adjustment``, jiawei-ren/BalancedMetaSoftmax-
Classification ``loss/BalancedSoftmaxLoss.py``; both are classifiers without a background
class. Here the prior covers the K foreground classes and is centred on the uniform prior,
log(K pi_c), with offset 0 for the background logit (see :func:`centered_log_prior`): equal
counts give plain softmax CE, and Balanced Softmax's p_j = n_j e^{z_j} / sum_k n_k e^{z_k}
holds with the background given the mean foreground count.
"""

from typing import Dict

import torch
from detectron2.config import configurable
from torch.nn import functional as F

from .base import empty_loss
from .priors import centered_log_prior, training_class_counts
from .registry import CLS_LOSS_REGISTRY
from .softmax import SoftmaxCE


def logit_adjusted_ce(
    logits: torch.Tensor, gt_classes: torch.Tensor, logit_offset: torch.Tensor
) -> torch.Tensor:
    """Mean softmax CE of the shifted logits, CE(z + o, y); 0 (in the graph) for no RoIs.

    Args:
        logits: (R, K+1) logits, background last.
        gt_classes: (R,) labels in [0, K].
        logit_offset: (K+1,) offsets o: tau log(K pi_c) for the classes, 0 for background.
    """
    if gt_classes.numel() == 0:
        return empty_loss(logits)
    return F.cross_entropy(logits.float() + logit_offset.float(), gt_classes, reduction="mean")


@CLS_LOSS_REGISTRY.register()
class LogitAdjustedCE(SoftmaxCE):
    """Softmax CE over K+1 logits trained on z + tau log(K pi) (``LOGIT_ADJUSTMENT.TAU``,
    prior from the ``LOGIT_ADJUSTMENT.COUNT`` counts). Layout, zero bias, inference
    (softmax of the unshifted logits) and accuracy are :class:`SoftmaxCE`'s; ``tau = 0`` is
    softmax CE. ``logit_offset`` is a non-persistent buffer derived from the dataset.
    """

    @configurable
    def __init__(self, num_classes: int, *, class_counts: torch.Tensor, tau: float = 1.0):
        """
        Args:
            num_classes: K.
            class_counts: (K,) training count of each class.
            tau: scale of the log prior.
        """
        super().__init__(num_classes)
        if class_counts.numel() != num_classes:
            raise ValueError(f"class_counts has {class_counts.numel()} classes, not {num_classes}")
        self.tau = tau
        offset = F.pad(tau * centered_log_prior(class_counts), (0, 1)).to(torch.float32)
        self.register_buffer("logit_offset", offset, persistent=False)

    @classmethod
    def from_config(cls, cfg, num_classes):
        node = cfg.MODEL.ROI_BOX_HEAD.LOGIT_ADJUSTMENT
        return {
            "num_classes": num_classes,
            "class_counts": training_class_counts(cfg, node.COUNT),
            "tau": node.TAU,
        }

    def forward(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"loss_cls": logit_adjusted_ce(logits, gt_classes, self.logit_offset)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau}"


@CLS_LOSS_REGISTRY.register()
class BalancedSoftmax(LogitAdjustedCE):
    """Balanced Softmax: :class:`LogitAdjustedCE` with tau = 1 and the counts of
    ``BALANCED_SOFTMAX.COUNT``."""

    @classmethod
    def from_config(cls, cfg, num_classes):
        node = cfg.MODEL.ROI_BOX_HEAD.BALANCED_SOFTMAX
        return {
            "num_classes": num_classes,
            "class_counts": training_class_counts(cfg, node.COUNT),
            "tau": 1.0,
        }
