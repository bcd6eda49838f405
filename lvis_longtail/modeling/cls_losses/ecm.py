"""Effective Class-Margin loss (Cho & Kraehenbuehl, "Long-tail Detection with Effective
Class-Margins", ECCV 2022). Reference: janghyuncho/ECM-Loss
``mmdet/models/losses/effective_class_margin_loss.py`` and ``ecm_utils.py``.

K+1 sigmoid channels (background last) with margins and weights fixed by the class counts:
n_c = training image count (c < K), n_K = FG_BG_RATIO * sum_{c<K} n_c for background;
n+_c = n_c, n-_c = sum_j n_j - n_c (the sum includes background);
m+ = log((n+^1/4 + n-^1/4) / n-^1/4), m- = log((n+^1/4 + n-^1/4) / n+^1/4);
p+ = e^{z + m+} / (e^{z + m+} + e^{-z + m-}) = sigmoid(2 z + m+ - m-), so the loss is the BCE
of u = 2 z + (m+ - m-) = 2 z + log(n+ / n-) / 4; weight w = a log((1 + a) / a), a = n- / n+.
Differences from the reference: counts come from the training set's metadata (it loads a
pickled LVIS v1 table) and are clamped to >= 1, and the BCE is computed from u with softplus
(the reference exponentiates z + m directly, which overflows for large logits).
"""

from typing import Dict, Tuple

import torch
from detectron2.config import configurable

from .base import ClassificationLoss, empty_loss, sigmoid_probs_with_background
from .priors import training_class_counts
from .registry import CLS_LOSS_REGISTRY
from .sigmoid import one_hot_bce


def ecm_margins(
    class_counts: torch.Tensor, fg_bg_ratio: float = 6.3313
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logit shift m+ - m- and loss weight w of each of the K+1 channels.

    Args:
        class_counts: (K,) training counts n_c of the foreground classes.
        fg_bg_ratio: background count as a multiple of the summed foreground counts.

    Returns:
        (shift, weight), each (K+1,) float64: shift = log(n+ / n-) / 4 (= m+ - m-) and
        w = a log((1 + a) / a), a = n- / n+.
    """
    n = torch.as_tensor(class_counts, dtype=torch.float64).clamp(min=1)
    n = torch.cat([n, n.sum().reshape(1) * fg_bg_ratio])
    n_neg = n.sum() - n
    shift = (n.log() - n_neg.log()) / 4
    a = n_neg / n
    weight = a * torch.log1p(1 / a)
    return shift, weight


def ecm_loss(
    logits: torch.Tensor, gt_classes: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """sum_rc w_c BCE(2 z_rc + shift_c, y_rc) / R, y one-hot over K+1 (background at K).

    Args:
        logits: (R, K+1) logits.
        gt_classes: (R,) labels in [0, K].
        shift, weight: (K+1,) from :func:`ecm_margins`.
    """
    if gt_classes.numel() == 0:
        return empty_loss(logits)
    weight = weight.float()
    loss, _ = one_hot_bce(logits.float(), gt_classes, weight, weight, scale=2.0, shift=shift)
    return loss / gt_classes.numel()


@CLS_LOSS_REGISTRY.register()
class ECMLoss(ClassificationLoss):
    """ECM loss over K+1 sigmoid logits; no state (``shift`` and ``weight`` are
    non-persistent buffers derived from the training image counts and ``ECM.FG_BG_RATIO``).

    Bias init 0 (mmdetection's classifier init, which the reference uses). Inference, as the
    reference: s = sigmoid(z) (without the margins), p_c = s_c (1 - s_bg), background column
    s_bg. Accuracy: argmax of those K+1 probabilities.
    """

    @configurable
    def __init__(
        self, num_classes: int, *, class_counts: torch.Tensor, fg_bg_ratio: float = 6.3313
    ):
        """
        Args:
            num_classes: K.
            class_counts: (K,) training image counts.
            fg_bg_ratio: background count / summed foreground counts.
        """
        super().__init__(num_classes)
        if class_counts.numel() != num_classes:
            raise ValueError(f"class_counts has {class_counts.numel()} classes, not {num_classes}")
        self.fg_bg_ratio = fg_bg_ratio
        shift, weight = ecm_margins(class_counts, fg_bg_ratio)
        self.register_buffer("shift", shift.float(), persistent=False)
        self.register_buffer("weight", weight.float(), persistent=False)

    @classmethod
    def from_config(cls, cfg, num_classes):
        return {
            "num_classes": num_classes,
            "class_counts": training_class_counts(cfg, "image"),
            "fg_bg_ratio": cfg.MODEL.ROI_BOX_HEAD.ECM.FG_BG_RATIO,
        }

    def forward(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"loss_cls": ecm_loss(logits, gt_classes, self.shift, self.weight)}

    def predict_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return sigmoid_probs_with_background(logits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fg_bg_ratio={self.fg_bg_ratio}"
