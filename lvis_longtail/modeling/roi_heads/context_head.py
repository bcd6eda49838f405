"""Global context head of HTC-Lite: an image-level vector from one FPN level, trained to
predict which categories the image contains, and added to the RoI features.

Layout (the same block as mmdetection SCNet's global context head; our code): ``NUM_CONV``
3x3 convs of width ``CONV_DIM`` on ``IN_FEATURE`` (P6), grouped in residual pairs
(``x + conv(conv(x))``; a first conv maps the FPN width to ``CONV_DIM`` when they differ),
global average pooling -> the (N, D) context vector, ``Linear(D, K)`` -> category logits.

Loss (``loss_context``): ``LOSS_WEIGHT`` x the mean sigmoid BCE over the counted (image,
class) entries; targets are multi-hot over the image's GT classes. Without federation every
entry counts; with ``FEDERATED`` only the image's positive classes and its verified negative
classes (LVIS ``neg_category_ids``, carried by the :data:`NEG_CLASSES_FIELD` field of the
GT instances; see :mod:`lvis_longtail.data.image_labels`) count, since LVIS leaves every
other category unverified.
"""

from typing import List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, get_norm
from detectron2.structures import Instances
from torch import nn
from torch.nn import functional as F

from lvis_longtail.data.image_labels import NEG_CLASSES_FIELD

__all__ = ["GlobalContextHead", "context_targets", "fuse_context"]


def fuse_context(
    x: torch.Tensor, batch_index: torch.Tensor, context: Optional[torch.Tensor]
) -> torch.Tensor:
    """Add each RoI's image context vector to its features.

    Args:
        x: (R, C, S, S) RoI features.
        batch_index: (R,) image index of each RoI.
        context: (N, C) per-image vectors, or None (then ``x`` is returned).

    Returns:
        (R, C, S, S) ``x + context[batch_index]`` broadcast over the S x S positions.
    """
    if context is None:
        return x
    if context.shape[1] != x.shape[1]:
        raise ValueError(
            f"context vector has {context.shape[1]} channels but the RoI features have "
            f"{x.shape[1]}: MODEL.ROI_CONTEXT_HEAD.CONV_DIM must equal the FPN width to fuse"
        )
    return x + context[batch_index].to(x.dtype)[:, :, None, None]


def context_targets(
    targets: List[Instances], num_classes: int, federated: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multi-label targets of the context classifier.

    Args:
        targets: per-image GT instances with ``gt_classes`` and, when ``federated``, the
            (n, L) int64 field :data:`NEG_CLASSES_FIELD` (verified negative classes, -1
            padded; every row of an image is the same).
        num_classes: K.
        federated: count only positive and verified negative classes.

    Returns:
        (N, K) fp32 multi-hot targets and (N, K) bool mask of the counted entries.
    """
    device = targets[0].gt_classes.device
    n = len(targets)
    image_index = torch.cat(
        [torch.full((len(t),), i, dtype=torch.int64, device=device) for i, t in enumerate(targets)]
    )
    classes = torch.cat([t.gt_classes.to(torch.int64) for t in targets])
    positive = torch.zeros((n, num_classes), dtype=torch.bool, device=device)
    positive[image_index, classes] = True
    if not federated:
        return positive.float(), torch.ones_like(positive)
    counted = positive.clone()
    for i, t in enumerate(targets):
        if len(t) == 0:
            continue
        if not t.has(NEG_CLASSES_FIELD):
            raise ValueError(
                f"MODEL.ROI_CONTEXT_HEAD.FEDERATED needs the '{NEG_CLASSES_FIELD}' field on "
                "the GT instances (the image's neg_category_ids); train with lvis_longtail's "
                "LongTailDatasetMapper (the Trainer's) or set FEDERATED False"
            )
        neg = t.get(NEG_CLASSES_FIELD)[0]
        counted[i, neg[neg >= 0].to(device)] = True
    return positive.float(), counted


class GlobalContextHead(nn.Module):
    """Image-level context vector and multi-label category classifier (module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        in_feature: str,
        in_channels: int,
        num_classes: int,
        conv_dim: int = 256,
        num_conv: int = 4,
        norm: str = "",
        loss_weight: float = 3.0,
        federated: bool = False,
    ):
        """
        Args:
            in_feature: backbone feature the head reads (e.g. "p6").
            in_channels: its channels.
            num_classes: K.
            conv_dim: D, width of the convs and of the context vector.
            num_conv: number of 3x3 convs (residual in pairs).
            norm: detectron2 norm name of the convs ("" for none, "GN", ...).
            loss_weight: weight of ``loss_context``.
            federated: count only positive and verified negative classes in the loss.
        """
        super().__init__()
        self.in_feature = in_feature
        self.num_classes = num_classes
        self.loss_weight = loss_weight
        self.federated = federated
        self.input_proj = None
        if in_channels != conv_dim:
            self.input_proj = self._conv(in_channels, conv_dim, norm)
        self.convs = nn.ModuleList(self._conv(conv_dim, conv_dim, norm) for _ in range(num_conv))
        self.predictor = nn.Linear(conv_dim, num_classes)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.constant_(self.predictor.bias, 0.0)

    @staticmethod
    def _conv(cin: int, cout: int, norm: str) -> Conv2d:
        conv = Conv2d(cin, cout, 3, padding=1, bias=not norm, norm=get_norm(norm, cout))
        weight_init.c2_msra_fill(conv)
        return conv

    @classmethod
    def from_config(cls, cfg, input_shape):
        head = cfg.MODEL.ROI_CONTEXT_HEAD
        if head.IN_FEATURE not in input_shape:
            raise ValueError(
                f"MODEL.ROI_CONTEXT_HEAD.IN_FEATURE {head.IN_FEATURE!r} is not a backbone "
                f"output; available: {sorted(input_shape)}"
            )
        return {
            "in_feature": head.IN_FEATURE,
            "in_channels": input_shape[head.IN_FEATURE].channels,
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "conv_dim": head.CONV_DIM,
            "num_conv": head.NUM_CONV,
            "norm": head.NORM,
            "loss_weight": head.LOSS_WEIGHT,
            "federated": head.FEDERATED,
        }

    def forward(self, features) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            features: dict of backbone features, holding ``in_feature`` (N, C, H, W).

        Returns:
            The (N, D) context vector and the (N, K) category logits.
        """
        x = features[self.in_feature]
        if self.input_proj is not None:
            x = F.relu(self.input_proj(x))
        for k in range(0, len(self.convs) - 1, 2):
            x = F.relu(x + self.convs[k + 1](F.relu(self.convs[k](x))))
        if len(self.convs) % 2:
            x = F.relu(self.convs[-1](x))
        vector = x.mean(dim=(2, 3))
        return vector, self.predictor(vector)

    def losses(self, logits: torch.Tensor, targets: List[Instances]) -> dict:
        """``{"loss_context": LOSS_WEIGHT x mean BCE over the counted entries}`` for (N, K)
        logits and the per-image GT instances (0 with no counted entry)."""
        target, counted = context_targets(targets, self.num_classes, self.federated)
        bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        loss = (bce * counted).sum() / counted.sum().clamp(min=1)
        return {"loss_context": self.loss_weight * loss}
