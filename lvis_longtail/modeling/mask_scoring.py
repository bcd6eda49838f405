"""Mask Scoring R-CNN's MaskIoU head (Huang et al., CVPR 2019; docs/methods.md, "Mask Scoring").

The head regresses the IoU between each predicted mask (binarised at 0.5) and its GT from
concat(mask RoI features (C, S, S), maxpool2(sigmoid(mask logits of the class)) (1, S, S)):
4 conv3x3 (the last with stride 2) -> FC -> FC -> FC with K outputs (one IoU per class).
Training: MSE on positive RoIs, on the GT class, as ``loss_maskiou``. Test: the segmentation
score is ``box score x predicted IoU of the predicted class``, stored as
``pred_instances.mask_scores`` (``scores`` stays the box score, used for bbox results).
"""

from typing import List, Optional

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, cat
from detectron2.structures import Instances
from torch import nn
from torch.nn import functional as F

__all__ = ["MaskIoUHead", "gt_area_fraction", "mask_iou_loss", "mask_iou_targets"]


def gt_area_fraction(
    gt_masks: torch.Tensor, proposal_areas: torch.Tensor, gt_mask_areas: torch.Tensor
) -> torch.Tensor:
    """(R,) estimated fraction of each GT mask's area that lies inside its proposal:
    ``mean(target) * A_proposal / A_gt_mask`` clamped to [0, 1]; 1 where the GT mask is empty.

    Args:
        gt_masks: (R, M, M) mask targets (the GT cropped to the proposal).
        proposal_areas: (R,) proposal box areas in pixels.
        gt_mask_areas: (R,) full GT mask areas in pixels.
    """
    inside = (gt_masks > 0.5).flatten(1).float().mean(1) * proposal_areas.float()
    frac = inside / gt_mask_areas.float().clamp(min=1e-6)
    return torch.where(gt_mask_areas > 0, frac.clamp(0.0, 1.0), torch.ones_like(frac))


def mask_iou_targets(
    mask_logits: torch.Tensor,
    gt_masks: torch.Tensor,
    area_fraction: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """IoU between binarised predicted masks and their GT, on the M x M RoI grid.

    With ``area_fraction`` (see :func:`gt_area_fraction`), the GT area is the *full* GT mask
    area expressed in grid pixels (``sum(target) / fraction``), as in the MS R-CNN
    implementation, so a proposal that cuts its object off gets a lower target. An empty
    union (empty prediction and empty GT) has IoU 0.

    Args:
        mask_logits: (R, M, M) logits of each RoI's GT class.
        gt_masks: (R, M, M) mask targets.
        area_fraction: optional (R,) fraction of the GT mask inside the RoI, in [0, 1].

    Returns:
        (R,) fp32 IoU in [0, 1], without gradient.
    """
    pred = (mask_logits.detach() > 0).flatten(1)
    gt = (gt_masks > 0.5).flatten(1)
    inter = (pred & gt).sum(1).float()
    gt_area = gt.sum(1).float()
    if area_fraction is not None:
        frac = area_fraction.to(gt_area)
        gt_area = torch.where(frac > 0, gt_area / frac.clamp(min=1e-6), gt_area)
    union = pred.sum(1).float() + gt_area - inter
    return inter / union.clamp(min=1.0)


def mask_iou_loss(pred_iou: torch.Tensor, classes: torch.Tensor, targets: torch.Tensor):
    """Mean squared error of the predicted IoU of each RoI's class.

    Args:
        pred_iou: (R, K) predicted IoUs.
        classes: (R,) GT classes.
        targets: (R,) IoU targets.

    Returns:
        Scalar fp32 tensor; ``pred_iou.sum() * 0`` when R = 0.
    """
    if pred_iou.numel() == 0:
        return pred_iou.sum() * 0
    selected = pred_iou[torch.arange(pred_iou.size(0), device=pred_iou.device), classes]
    return F.mse_loss(selected.float(), targets.float())


class MaskIoUHead(nn.Module):
    """MaskIoU head. Conv width = ``ROI_MASK_HEAD.CONV_DIM`` (256 in MS R-CNN and in the
    R50 configs, so both agree); FC width 1024 as in MS R-CNN, also in the tiny configs."""

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        resolution: int,
        num_classes: int,
        conv_dim: int = 256,
        fc_dim: int = 1024,
        num_conv: int = 4,
        loss_weight: float = 0.5,
    ):
        """
        Args:
            in_channels: C, channels of the mask RoI features.
            resolution: S, side of the mask RoI features (the mask logits are 2S x 2S).
            num_classes: K, one predicted IoU per class.
            conv_dim: width of the 3x3 convs.
            fc_dim: width of the two hidden FC layers.
            num_conv: number of 3x3 convs; the last has stride 2.
            loss_weight: weight of ``loss_maskiou``.
        """
        super().__init__()
        self.loss_weight = loss_weight
        convs, channels = [], in_channels + 1
        for k in range(num_conv):
            stride = 2 if k == num_conv - 1 else 1
            convs.append(
                Conv2d(channels, conv_dim, 3, stride=stride, padding=1, activation=nn.ReLU())
            )
            channels = conv_dim
        self.convs = nn.Sequential(*convs)
        side = (resolution + 1) // 2
        self.fcs = nn.Sequential(
            nn.Linear(conv_dim * side * side, fc_dim),
            nn.ReLU(),
            nn.Linear(fc_dim, fc_dim),
            nn.ReLU(),
        )
        self.predictor = nn.Linear(fc_dim, num_classes)
        for conv in self.convs:
            weight_init.c2_msra_fill(conv)
        for fc in self.fcs:
            if isinstance(fc, nn.Linear):
                weight_init.c2_xavier_fill(fc)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        head = cfg.MODEL.ROI_MASK_HEAD
        return {
            "in_channels": input_shape.channels,
            "resolution": input_shape.height,
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "conv_dim": head.CONV_DIM,
            "loss_weight": cfg.MODEL.ROI_MASKIOU_HEAD.LOSS_WEIGHT,
        }

    def forward(self, features: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features: (R, C, S, S) mask RoI features.
            mask_logits: (R, 2S, 2S) mask logits of each RoI's (GT or predicted) class. They
                are detached: the IoU regression does not train the mask predictor.

        Returns:
            (R, K) predicted IoUs.
        """
        mask = F.max_pool2d(mask_logits.detach().sigmoid()[:, None], kernel_size=2, stride=2)
        x = self.convs(torch.cat([features, mask.to(features.dtype)], dim=1))
        return self.predictor(self.fcs(x.flatten(1)))

    def losses(
        self,
        features: torch.Tensor,
        mask_logits: torch.Tensor,
        gt_masks: torch.Tensor,
        gt_classes: torch.Tensor,
        area_fraction: Optional[torch.Tensor] = None,
    ):
        """``{"loss_maskiou": loss_weight * MSE}`` on the positive RoIs (shapes as in
        :meth:`forward` and :func:`mask_iou_targets`)."""
        pred_iou = self(features, mask_logits)
        targets = mask_iou_targets(mask_logits, gt_masks, area_fraction)
        return {"loss_maskiou": self.loss_weight * mask_iou_loss(pred_iou, gt_classes, targets)}

    def predict_iou(
        self, features: torch.Tensor, mask_logits: torch.Tensor, classes: torch.Tensor
    ) -> torch.Tensor:
        """(R,) fp32 predicted IoU of each RoI's (predicted) class, clamped to [0, 1]
        (features and mask_logits as in :meth:`forward`, classes (R,))."""
        if classes.numel() == 0:
            return features.new_zeros((0,), dtype=torch.float32)
        pred_iou = self(features, mask_logits)
        rows = torch.arange(pred_iou.size(0), device=pred_iou.device)
        return pred_iou[rows, classes].float().clamp(0.0, 1.0)

    @staticmethod
    def set_mask_scores(iou: torch.Tensor, instances: List[Instances]) -> None:
        """Set ``mask_scores = scores * iou`` on each of ``instances`` ((R,) ``iou``
        concatenated over images in their order)."""
        for inst, iou_i in zip(instances, iou.split([len(i) for i in instances])):
            inst.mask_scores = inst.scores * iou_i.to(inst.scores.dtype)

    def inference(
        self, features: torch.Tensor, mask_logits: torch.Tensor, instances: List[Instances]
    ) -> None:
        """Set ``mask_scores = scores * clamp(predicted IoU of pred_classes, 0, 1)`` on each
        of ``instances`` (which hold ``scores`` and ``pred_classes``)."""
        classes = cat([i.pred_classes for i in instances])
        self.set_mask_scores(self.predict_iou(features, mask_logits, classes), instances)
