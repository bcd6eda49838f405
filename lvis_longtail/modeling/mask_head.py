"""Mask head with the balanced (dice + area-ratio-weighted BCE) mask loss, optional boundary
supervision and an optional normalized (cosine) mask predictor.

The loss functions themselves are pure and live in :mod:`lvis_longtail.modeling.mask_losses`.

Class-specific masks at LVIS scale: the heads apply the 1x1 predictor only for each RoI's
class (its GT class in training, its predicted class at inference; :func:`class_mask_logits`
gathers that class's weights first), so neither the (R, K, M, M) logits nor their gradient
are formed (about 1 GB each at K = 1203, 256 RoIs, M = 28). The result is the same slice of
the full computation, to float rounding, in values and gradients.
"""

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, cat
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    MaskRCNNConvUpsampleHead,
    mask_rcnn_inference,
)
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.nn import functional as F

from lvis_longtail.config_check import ENUMS
from lvis_longtail.modeling.mask_losses import boundary_loss, dice_loss, weighted_bce_loss
from lvis_longtail.modeling.mask_targets import MaskHeadOutputs, MaskTargets, build_mask_targets

__all__ = [
    "DiceBCEMaskHead",
    "LongTailMaskRCNNConvUpsampleHead",
    "NormedConv2d",
    "class_mask_logits",
    "select_class_masks",
]


class NormedConv2d(nn.Conv2d):
    """1x1 cosine predictor: ``scale * conv(x / |x|, W / |W|) + b``, features L2-normalised
    per pixel over channels, each output's weights L2-normalised over input channels
    (the Seesaw recipe's normalized mask predictor, scale 20)."""

    def __init__(self, in_channels: int, out_channels: int, scale: float = 20.0, eps=1e-6):
        super().__init__(in_channels, out_channels, kernel_size=1)
        self.scale = scale
        self.eps = eps
        nn.init.normal_(self.weight, std=0.01)
        nn.init.constant_(self.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=1, eps=self.eps) * self.scale
        weight = F.normalize(self.weight, dim=1, eps=self.eps)
        return F.conv2d(x, weight, self.bias)

    def forward_classes(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(R, C, H, W) features -> (R, H, W) output channel ``classes[r]`` of each row: the
        same values as ``forward(x)[arange(R), classes]`` without the other channels."""
        x = F.normalize(x, dim=1, eps=self.eps) * self.scale
        weight = F.normalize(self.weight[classes].flatten(1), dim=1, eps=self.eps)
        return _per_row_1x1(x, weight, self.bias[classes])


def _per_row_1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution with one output channel per row: (R, C, H, W) features, (R, C)
    weights and (R,) biases -> (R, H, W)."""
    out = torch.einsum("rchw,rc->rhw", x, weight)
    return out + bias.to(out.dtype)[:, None, None]


def _is_plain_1x1(conv: nn.Module) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped convolution with a bias and nothing after it."""
    return (
        type(conv) in (nn.Conv2d, Conv2d)
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.groups == 1
        and conv.bias is not None
        and getattr(conv, "norm", None) is None
        and getattr(conv, "activation", None) is None
    )


def class_mask_logits(
    predictor: nn.Module, features: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """Mask logits of each RoI's class only: ``select_class_masks(predictor(features),
    classes)`` without the (R, K, M, M) logits. A plain 1x1 ``Conv2d`` or a
    :class:`NormedConv2d` gathers the classes' weights first (exact); a class-agnostic
    predictor (one output) is applied as is; any other predictor runs in full.

    Args:
        predictor: the head's last layer, (R, D, M, M) -> (R, K or 1, M, M).
        features: (R, D, M, M) mask features.
        classes: (R,) int64 class of each RoI (ignored by a class-agnostic predictor).

    Returns:
        (R, M, M) logits.
    """
    if getattr(predictor, "out_channels", None) == 1:
        return predictor(features)[:, 0]
    if isinstance(predictor, NormedConv2d):
        return predictor.forward_classes(features, classes)
    if _is_plain_1x1(predictor):
        weight = predictor.weight[classes].flatten(1)
        return _per_row_1x1(features, weight, predictor.bias[classes])
    return select_class_masks(predictor(features), classes)


def select_class_masks(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(R, K, M, M) or class-agnostic (R, 1, M, M) logits -> (R, M, M) of each RoI's class."""
    if logits.size(1) == 1:
        return logits[:, 0]
    return logits[torch.arange(logits.size(0), device=logits.device), classes]


def _log_mask_accuracy(logits: torch.Tensor, targets: torch.Tensor, vis_period: int) -> None:
    """detectron2's ``mask_rcnn/{accuracy,false_positive,false_negative}`` scalars (and the
    prediction/GT images every ``vis_period`` iterations)."""
    gt = targets > 0.5 if targets.dtype != torch.bool else targets
    incorrect = (logits > 0) != gt
    num_pos = gt.sum().item()
    storage = get_event_storage()
    storage.put_scalar("mask_rcnn/accuracy", 1 - incorrect.sum().item() / max(gt.numel(), 1))
    storage.put_scalar(
        "mask_rcnn/false_positive",
        (incorrect & ~gt).sum().item() / max(gt.numel() - num_pos, 1.0),
    )
    storage.put_scalar(
        "mask_rcnn/false_negative", (incorrect & gt).sum().item() / max(num_pos, 1.0)
    )
    if vis_period > 0 and storage.iter % vis_period == 0:
        vis = torch.cat([logits.detach().float().sigmoid(), gt.float()], dim=2)
        for idx, m in enumerate(vis):
            storage.put_image(
                f"Left: mask prediction;   Right: mask GT ({idx})", m[None].repeat(3, 1, 1)
            )


@ROI_MASK_HEAD_REGISTRY.register()
class LongTailMaskRCNNConvUpsampleHead(MaskRCNNConvUpsampleHead):
    """detectron2's ``MaskRCNNConvUpsampleHead`` (same layers, initialisation, parameter
    names, loss and logged accuracy) with the mask-branch contract of
    :mod:`~lvis_longtail.modeling.mask_targets`: :meth:`output_side`, :meth:`train_outputs`
    and :meth:`mask_losses` on prebuilt :class:`MaskTargets`, and :meth:`predict_masks` at
    inference. Both apply the predictor only for each RoI's class
    (:func:`class_mask_logits`); :meth:`layers` still gives detectron2's (R, K, M, M).
    lvis_longtail's ROI heads build it for ``ROI_MASK_HEAD.NAME: MaskRCNNConvUpsampleHead``."""

    def output_side(self, pooled_side: int) -> int:
        """M = 2S (one 2x deconv)."""
        return 2 * pooled_side

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, S, S) RoI features -> (R, D, S, S) after the 3x3 convs (what HTC's mask
        information flow passes to the next stage's head)."""
        for conv in self.conv_norm_relus:
            x = conv(x)
        return x

    def mask_features(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, S, S) RoI features -> (R, D, 2S, 2S) features after convs and deconv."""
        return self.deconv_relu(self.deconv(self.conv_features(x)))

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, S, S) RoI features -> (R, K or 1, 2S, 2S) mask logits of every class."""
        return self.predictor(self.mask_features(x))

    def predict_masks(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(R, C, S, S) RoI features and (R,) classes -> (R, 1, 2S, 2S) logits of each RoI's
        class (what ``mask_rcnn_inference`` takes; no (R, K, 2S, 2S) tensor)."""
        return self.predict_masks_from_convs(self.conv_features(x), classes)

    def predict_masks_from_convs(self, f: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """:meth:`predict_masks` from (R, D, S, S) :meth:`conv_features` (HTC's inference
        needs both a head's conv features and its masks, without running its convs twice)."""
        features = self.deconv_relu(self.deconv(f))
        return class_mask_logits(self.predictor, features, classes)[:, None]

    def train_outputs(self, x: torch.Tensor, classes: torch.Tensor) -> MaskHeadOutputs:
        """(R, C, S, S) RoI features and (R,) GT classes -> logits (R, 2S, 2S) of each RoI's
        class."""
        return MaskHeadOutputs(class_mask_logits(self.predictor, self.mask_features(x), classes))

    def mask_losses(
        self, outputs: MaskHeadOutputs, targets: MaskTargets
    ) -> Dict[str, torch.Tensor]:
        """detectron2's ``mask_rcnn_loss``: mean BCE of each RoI's GT-class mask, times
        ``loss_weight``, as ``loss_mask`` (``logits.sum() * 0`` without positives)."""
        logits = outputs.logits
        if len(targets) == 0:
            return {"loss_mask": logits.sum() * 0}
        _log_mask_accuracy(logits, targets.masks, self.vis_period)
        loss = F.binary_cross_entropy_with_logits(
            logits.float(), targets.masks.float(), reduction="mean"
        )
        return {"loss_mask": loss * self.loss_weight}

    def forward(self, x: torch.Tensor, instances: List[Instances]):
        """detectron2's call: the loss dict in training (on the foreground proposals
        ``instances``), else ``pred_masks`` set on ``instances`` (with ``pred_classes``)."""
        if not self.training:
            classes = cat([i.pred_classes for i in instances])
            mask_rcnn_inference(self.predict_masks(x, classes), instances)
            return instances
        targets = build_mask_targets(instances, self.output_side(x.shape[-1]), x.device)
        return self.mask_losses(self.train_outputs(x, targets.classes), targets)


@ROI_MASK_HEAD_REGISTRY.register()
class DiceBCEMaskHead(LongTailMaskRCNNConvUpsampleHead):
    """Identical to detectron2's ``MaskRCNNConvUpsampleHead`` (``NUM_CONV`` 3x3 convs, a 2x
    deconv, a 1x1 predictor), except:

    * the loss is the balanced mask loss of the LVIS 2020 1st-place report:
      ``BCE_LOSS_WEIGHT * weighted BCE`` as ``loss_mask`` plus ``DICE_LOSS_WEIGHT * dice`` as
      ``loss_mask_dice`` (:mod:`~lvis_longtail.modeling.mask_losses`; reconstructed forms).
      ``DICE_LOSS_WEIGHT 0, FG_WEIGHT_MAX 1`` gives exactly detectron2's loss;
    * with ``BOUNDARY_LOSS_WEIGHT > 0``, boundary supervision ("intermediate boundary
      supervision" in the report, after Boundary-preserving Mask R-CNN): a class-agnostic
      1x1 conv ``boundary_predictor`` on the upsampled features predicts the mask boundary,
      supervised by BCE + dice against the 3x3 morphological gradient of the mask target
      (``loss_mask_boundary``). It shapes the shared features only: it is not used at test
      time, and with weight 0 it is not built (no parameters, no compute);
    * ``PREDICTOR_TYPE: "NormedConv"`` replaces the 1x1 predictor by :class:`NormedConv2d`
      (scale ``NORMED_SCALE``).

    Heavier head (the report's "three more convolutions"): ``NUM_CONV: 7`` = detectron2's 4
    plus 3. The report's deformable RoI pooling is the mask pooler option
    ``POOLER_TYPE: "DeformROIAlignV2"``.

    Call protocol: ``forward(x, instances)`` as every detectron2 mask head (losses in
    training, ``pred_masks`` at inference), plus the mask-branch contract of its parent
    (:meth:`train_outputs`, :meth:`mask_losses`).
    """

    # Read by lvis_longtail.config_check (which cannot import this class): this head honours
    # ROI_MASK_HEAD.PREDICTOR_TYPE and BOUNDARY_LOSS_WEIGHT, so a config may set them.
    supports_predictor_options = True

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        fg_weight_max: float = 10.0,
        boundary_weight: float = 0.0,
        predictor: str = "Conv",
        normed_scale: float = 20.0,
        **kwargs,
    ):
        """
        Args:
            input_shape, num_classes, conv_dims, conv_norm, loss_weight, vis_period: as
                detectron2's ``MaskRCNNConvUpsampleHead`` (``loss_weight`` multiplies all
                terms).
            dice_weight: weight of the dice term (``loss_mask_dice``).
            bce_weight: weight of the area-ratio-weighted BCE (``loss_mask``).
            fg_weight_max: upper clip of the foreground pixel weight.
            boundary_weight: weight of ``loss_mask_boundary``; 0 = no boundary branch.
            predictor: "Conv" or "NormedConv".
            normed_scale: scale of the NormedConv predictor.
        """
        super().__init__(input_shape, **kwargs)
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.fg_weight_max = fg_weight_max
        self.boundary_weight = boundary_weight
        if predictor == "NormedConv":
            old = self.predictor
            # Re-assigning keeps the module's position in the nn.Sequential order.
            self.predictor = NormedConv2d(old.in_channels, old.out_channels, normed_scale)
        elif predictor != "Conv":
            valid = ENUMS["MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE"]
            raise ValueError(f"mask predictor type {predictor!r} is not one of {valid}")
        self.boundary_predictor = None
        if boundary_weight > 0:
            self.boundary_predictor = Conv2d(self.predictor.in_channels, 1, kernel_size=1)
            nn.init.normal_(self.boundary_predictor.weight, std=0.001)
            nn.init.constant_(self.boundary_predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        head = cfg.MODEL.ROI_MASK_HEAD
        ret.update(
            dice_weight=head.DICE_LOSS_WEIGHT,
            bce_weight=head.BCE_LOSS_WEIGHT,
            fg_weight_max=head.FG_WEIGHT_MAX,
            boundary_weight=head.BOUNDARY_LOSS_WEIGHT,
            predictor=head.PREDICTOR_TYPE,
            normed_scale=head.NORMED_SCALE,
        )
        return ret

    def train_outputs(self, x: torch.Tensor, classes: torch.Tensor) -> MaskHeadOutputs:
        """(R, C, S, S) RoI features and (R,) GT classes -> logits (R, 2S, 2S) of each RoI's
        class and, with the boundary branch, boundary logits (R, 2S, 2S)."""
        features = self.mask_features(x)
        boundary_logits = None
        if self.boundary_predictor is not None:
            boundary_logits = self.boundary_predictor(features)[:, 0]
        logits = class_mask_logits(self.predictor, features, classes)
        return MaskHeadOutputs(logits, boundary_logits)

    def mask_losses(
        self, outputs: MaskHeadOutputs, targets: MaskTargets
    ) -> Dict[str, torch.Tensor]:
        """:meth:`losses` of the outputs on the targets."""
        return self.losses(outputs.logits, targets.masks, outputs.boundary_logits)

    def losses(
        self,
        logits: torch.Tensor,
        gt_masks: torch.Tensor,
        boundary_logits: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            logits: (R, M, M) mask logits of each RoI's GT class (or the class-agnostic one).
            gt_masks: (R, M, M) mask targets.
            boundary_logits: (R, M, M) boundary logits, or None when the branch is off.

        Returns:
            ``loss_mask``, ``loss_mask_dice`` and, with the boundary branch,
            ``loss_mask_boundary``.
        """
        assert logits.shape[1:] == gt_masks.shape[1:], "mask size mismatch"
        if logits.numel() > 0:
            _log_mask_accuracy(logits, gt_masks, self.vis_period)
        w = self.loss_weight
        losses = {
            "loss_mask": w
            * self.bce_weight
            * weighted_bce_loss(logits, gt_masks, self.fg_weight_max),
            "loss_mask_dice": w * self.dice_weight * dice_loss(logits, gt_masks),
        }
        if boundary_logits is not None:
            losses["loss_mask_boundary"] = (
                w * self.boundary_weight * boundary_loss(boundary_logits, gt_masks)
            )
        return losses
