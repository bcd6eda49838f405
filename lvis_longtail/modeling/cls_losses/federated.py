"""Federated loss (Zhou et al., "Probabilistic two-stage detection", CenterNet2).
Reference: xingyizhou/CenterNet2 ``centernet/modeling/roi_heads/fed_loss.py`` and
``custom_fast_rcnn.py``.
"""

from typing import Dict, Optional

import torch
from detectron2.config import configurable
from torch.nn import functional as F

from lvis_longtail.data.class_stats import get_class_stats

from .base import ClassificationLoss, empty_loss, prior_logit, sigmoid_predicted_classes
from .registry import CLS_LOSS_REGISTRY
from .sigmoid import one_hot_bce


def sample_federated_classes(
    gt_classes: torch.Tensor,
    class_weights: torch.Tensor,
    num_sampled: int = 50,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The classes that enter this iteration's loss: every foreground class present in
    ``gt_classes``, plus classes drawn without replacement with probability proportional to
    ``class_weights`` until ``num_sampled`` are chosen (or no class with weight > 0 is left).

    Args:
        gt_classes: (R,) labels in [0, K], K = background (ignored).
        class_weights: (K,) non-negative sampling weights, e.g. image_count^0.5.

    Returns:
        (K,) bool mask of the chosen classes.
    """
    num_classes = class_weights.numel()
    chosen = torch.zeros(num_classes, dtype=torch.bool, device=class_weights.device)
    chosen[gt_classes[gt_classes < num_classes]] = True
    weights = class_weights.float().masked_fill(chosen, 0.0)
    num_more = min(num_sampled - int(chosen.sum()), int((weights > 0).sum()))
    if num_more > 0:
        more = torch.multinomial(weights, num_more, replacement=False, generator=generator)
        chosen[more] = True
    return chosen


def federated_loss(
    logits: torch.Tensor, gt_classes: torch.Tensor, class_mask: torch.Tensor
) -> torch.Tensor:
    """Sigmoid BCE restricted to the chosen classes: sum_r sum_c m_c BCE(z_rc, y_rc) / R.

    Only the chosen columns are computed; the others get exactly zero gradient.

    Args:
        logits: (R, K+1) logits; the background logit K is not trained.
        gt_classes: (R,) labels in [0, K].
        class_mask: (K,) bool, chosen classes m.
    """
    if gt_classes.numel() == 0:
        return empty_loss(logits)
    columns = class_mask.nonzero().squeeze(1)
    # label -> its position among the chosen columns; len(columns) = not chosen (all negative)
    position = torch.full((logits.shape[1],), columns.numel(), device=logits.device)
    position[columns] = torch.arange(columns.numel(), device=logits.device)
    chosen_logits = logits.index_select(1, columns).float()
    ones = chosen_logits.new_ones(columns.numel())
    loss, _ = one_hot_bce(chosen_logits, position[gt_classes], ones, ones)
    return loss / gt_classes.numel()


@CLS_LOSS_REGISTRY.register()
class FederatedLoss(ClassificationLoss):
    """Federated loss: sigmoid over K+1 logits, only the first K in the loss, and only for the
    classes of :func:`sample_federated_classes` (weights image_count^``FREQ_WEIGHT_POWER``,
    ``NUM_CLASSES`` foreground classes in total; CenterNet2 counts the background label among
    them, so it uses one class fewer when background RoIs are present).

    The draw uses torch's RNG on each process independently, with that process's GT classes,
    as in CenterNet2 (no cross-process synchronisation). Bias init: prior
    ``FED_LOSS.PRIOR_PROB``. Inference: ``[sigmoid(z[:K]), 0]``; accuracy: background when no
    class reaches probability 0.5.
    """

    @configurable
    def __init__(
        self,
        num_classes: int,
        *,
        image_count: torch.Tensor,
        num_sampled: int = 50,
        freq_weight_power: float = 0.5,
        prior_prob: float = 0.01,
    ):
        """
        Args:
            num_classes: K.
            image_count: (K,) training images containing each class.
            num_sampled: number of foreground classes in each iteration's loss.
            freq_weight_power: sampling weight exponent on image_count.
            prior_prob: initial sigmoid probability of every logit.
        """
        super().__init__(num_classes)
        if image_count.numel() != num_classes:
            raise ValueError(f"image_count has {image_count.numel()} classes, not {num_classes}")
        self.num_sampled, self.prior_prob = num_sampled, prior_prob
        weights = torch.as_tensor(image_count, dtype=torch.float32) ** freq_weight_power
        self.register_buffer("class_weights", weights, persistent=False)

    @classmethod
    def from_config(cls, cfg, num_classes):
        fed = cfg.MODEL.ROI_BOX_HEAD.FED_LOSS
        return {
            "num_classes": num_classes,
            "image_count": get_class_stats(cfg.DATASETS.TRAIN).image_count,
            "num_sampled": fed.NUM_CLASSES,
            "freq_weight_power": fed.FREQ_WEIGHT_POWER,
            "prior_prob": fed.PRIOR_PROB,
        }

    def init_bias(self, bias: torch.Tensor) -> None:
        torch.nn.init.constant_(bias, prior_logit(self.prior_prob))

    def forward(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> Dict[str, torch.Tensor]:
        mask = sample_federated_classes(gt_classes, self.class_weights, self.num_sampled)
        return {"loss_cls": federated_loss(logits, gt_classes, mask)}

    def predict_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return F.pad(torch.sigmoid(logits[:, : self.num_classes].float()), (0, 1))

    def predict_classes(self, logits: torch.Tensor) -> torch.Tensor:
        return sigmoid_predicted_classes(torch.sigmoid(logits[:, : self.num_classes].float()))
