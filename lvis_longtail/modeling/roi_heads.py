"""ROI heads of lvis_longtail."""

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.mask_head import (
    BaseMaskRCNNHead,
    mask_rcnn_inference,
    mask_rcnn_loss,
)
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures import Instances

from lvis_longtail.modeling.architecture import adjust_roi_heads, plain_pooler_cfg
from lvis_longtail.modeling.fast_rcnn import LongTailFastRCNNOutputLayers
from lvis_longtail.modeling.mask_head import (
    DiceBCEMaskHead,
    mask_rcnn_targets,
    select_class_masks,
)
from lvis_longtail.modeling.mask_levels import (
    AreaRatioROIPooler,
    gt_area_ratios,
    gt_mask_areas,
    two_pass_mask_logits,
)
from lvis_longtail.modeling.mask_scoring import MaskIoUHead, gt_area_fraction


@ROI_HEADS_REGISTRY.register()
class LongTailROIHeads(StandardROIHeads):
    """Identical to detectron2's ``StandardROIHeads``, except that the box predictor is a
    :class:`LongTailFastRCNNOutputLayers`, whose classification loss and classifier are chosen
    by ``MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME`` and ``MODEL.ROI_BOX_HEAD.CLS_PREDICTOR``.

    The mask branch is detectron2's, except for three options of ``MODEL.ROI_MASK_HEAD``:

    * ``LEVEL_ASSIGNMENT: "area_ratio"``: the mask pooler is an
      :class:`~lvis_longtail.modeling.mask_levels.AreaRatioROIPooler`; training RoIs are
      pooled at the level of sqrt(w h r), r = mask/box area ratio of the matched GT. At test
      time ``TEST_AREA_RATIO`` is "one" (the box rule) or "two_pass" (estimate r from a first
      mask prediction, re-pool and re-predict the RoIs whose level changes).
    * ``MASK_SCORING: True``: a :class:`~lvis_longtail.modeling.mask_scoring.MaskIoUHead`
      adds ``loss_maskiou`` in training and sets ``mask_scores`` (box score x predicted mask
      IoU) on the predicted instances; ``scores`` stays the box score. Evaluators should
      score segmentations with ``mask_scores`` when the field is present.
    * the mask head may be :class:`~lvis_longtail.modeling.mask_head.DiceBCEMaskHead`, whose
      ``PREDICTOR`` and ``BOUNDARY_LOSS_WEIGHT`` options are rejected for other heads.

    With all three off, the mask branch runs detectron2's ``_forward_mask`` unchanged.

    Every RoI pooler uses ``MODEL.ROI_HEADS.CANONICAL_BOX_SIZE`` (detectron2's poolers
    hard-code 224, which sends every RoI of a small-image config to P2).
    """

    @configurable
    def __init__(
        self,
        *,
        mask_level_assignment: str = "box",
        mask_test_area_ratio: str = "one",
        mask_iou_head: Optional[MaskIoUHead] = None,
        **kwargs,
    ):
        """
        Args:
            mask_level_assignment: "box" or "area_ratio" (then ``mask_pooler`` must be an
                ``AreaRatioROIPooler``).
            mask_test_area_ratio: "one" or "two_pass".
            mask_iou_head: MaskIoU head, or None for no mask scoring.
            kwargs: as ``StandardROIHeads``.
        """
        super().__init__(**kwargs)
        self.mask_level_assignment = mask_level_assignment
        self.mask_test_area_ratio = mask_test_area_ratio
        self.mask_iou_head = mask_iou_head

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(plain_pooler_cfg(cfg), input_shape)  # see adjust_roi_heads
        for key in ("box_pooler", "mask_pooler", "keypoint_pooler"):
            if ret.get(key) is not None:  # detectron2 hard-codes 224 in every pooler
                ret[key].canonical_box_size = cfg.MODEL.ROI_HEADS.CANONICAL_BOX_SIZE
        return adjust_roi_heads(cfg, input_shape, ret)  # deformable poolers, CARAFE mask head

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = LongTailFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        ret = super()._init_mask_head(cfg, input_shape)
        if not ret:
            return ret
        head = cfg.MODEL.ROI_MASK_HEAD
        _check_mask_options(head, ret["mask_head"], ret["mask_pooler"] is not None)
        if head.LEVEL_ASSIGNMENT == "area_ratio":
            pooler = ret["mask_pooler"]
            ret["mask_pooler"] = AreaRatioROIPooler(
                output_size=pooler.output_size,
                scales=tuple(1.0 / input_shape[f].stride for f in ret["mask_in_features"]),
                sampling_ratio=head.POOLER_SAMPLING_RATIO,
                pooler_type=head.POOLER_TYPE,
                canonical_box_size=pooler.canonical_box_size,
                canonical_level=pooler.canonical_level,
            )
        ret["mask_level_assignment"] = head.LEVEL_ASSIGNMENT
        ret["mask_test_area_ratio"] = head.TEST_AREA_RATIO
        if head.MASK_SCORING:
            channels = input_shape[ret["mask_in_features"][0]].channels
            res = head.POOLER_RESOLUTION
            shape = ShapeSpec(channels=channels, height=res, width=res)
            ret["mask_iou_head"] = MaskIoUHead(cfg, shape)
        return ret

    def _forward_mask(self, features: Dict[str, torch.Tensor], instances: List[Instances]):
        """detectron2's ``_forward_mask``, plus area-ratio level assignment and mask scoring
        (see the class docstring). Returns a loss dict in training; at inference the
        instances with ``pred_masks`` (and ``mask_scores`` with mask scoring)."""
        if not self.mask_on:
            return {} if self.training else instances
        if self.mask_level_assignment == "box" and self.mask_iou_head is None:
            return super()._forward_mask(features, instances)
        feature_list = [features[f] for f in self.mask_in_features]
        if self.training:
            instances, _ = select_foreground_proposals(instances, self.num_classes)
            return self._mask_losses(feature_list, instances)
        return self._mask_inference(feature_list, instances)

    def _mask_losses(self, features: List[torch.Tensor], instances: List[Instances]):
        """Mask (and MaskIoU) losses on foreground proposals ``instances``."""
        boxes = [x.proposal_boxes for x in instances]
        if self.mask_level_assignment == "area_ratio":
            x = self.mask_pooler(features, boxes, gt_area_ratios(instances))
        else:
            x = self.mask_pooler(features, boxes)
        gt_masks = gt_classes = None
        if isinstance(self.mask_head, DiceBCEMaskHead):
            gt_masks, gt_classes = mask_rcnn_targets(instances, 2 * x.shape[-1], x.device)
            losses, logits = self.mask_head.forward_train(x, gt_masks, gt_classes)
        else:
            logits = self.mask_head.layers(x)
            loss = mask_rcnn_loss(logits, instances, self.mask_head.vis_period)
            losses = {"loss_mask": loss * self.mask_head.loss_weight}
        if self.mask_iou_head is not None:
            if gt_masks is None:
                gt_masks, gt_classes = mask_rcnn_targets(instances, logits.shape[-1], x.device)
            losses.update(self._mask_iou_losses(x, logits, gt_masks, gt_classes, instances))
        return losses

    def _mask_iou_losses(self, x, logits, gt_masks, gt_classes, instances: List[Instances]):
        """``loss_maskiou`` of RoI features x (R, C, S, S) and mask logits (R, K, M, M)."""
        nonempty = [i for i in instances if len(i) > 0]  # no GT fields on empty images
        fraction = gt_area_fraction(
            gt_masks,
            cat([i.proposal_boxes.area() for i in nonempty] + [x.new_zeros(0)]),
            cat([gt_mask_areas(i) for i in nonempty] + [x.new_zeros(0)]),
        )
        selected = select_class_masks(logits, gt_classes)
        return self.mask_iou_head.losses(x, selected, gt_masks, gt_classes, fraction)

    def _mask_inference(self, features: List[torch.Tensor], instances: List[Instances]):
        """Masks (and mask scores) of the predicted boxes in ``instances``."""
        boxes = [x.pred_boxes for x in instances]
        classes = cat([i.pred_classes for i in instances])
        if self.mask_test_area_ratio == "two_pass":
            x, logits, _ = two_pass_mask_logits(
                self.mask_pooler, features, boxes, classes, self.mask_head.layers
            )
        else:
            x = self.mask_pooler(features, boxes)
            logits = self.mask_head.layers(x)
        mask_rcnn_inference(logits, instances)
        if self.mask_iou_head is not None:
            self.mask_iou_head.inference(x, select_class_masks(logits, classes), instances)
        return instances


def _check_mask_options(head_cfg, mask_head, has_pooler: bool) -> None:
    """Reject mask options that would otherwise be silently ignored."""
    if head_cfg.LEVEL_ASSIGNMENT not in ("box", "area_ratio"):
        raise ValueError(f"Unknown ROI_MASK_HEAD.LEVEL_ASSIGNMENT {head_cfg.LEVEL_ASSIGNMENT!r}")
    if head_cfg.TEST_AREA_RATIO not in ("one", "two_pass"):
        raise ValueError(f"Unknown ROI_MASK_HEAD.TEST_AREA_RATIO {head_cfg.TEST_AREA_RATIO!r}")
    if head_cfg.TEST_AREA_RATIO == "two_pass" and head_cfg.LEVEL_ASSIGNMENT != "area_ratio":
        raise ValueError(
            'ROI_MASK_HEAD.TEST_AREA_RATIO "two_pass" needs LEVEL_ASSIGNMENT "area_ratio"'
        )
    if not isinstance(mask_head, DiceBCEMaskHead) and (
        head_cfg.PREDICTOR != "Conv" or head_cfg.BOUNDARY_LOSS_WEIGHT > 0
    ):
        raise ValueError(
            "ROI_MASK_HEAD.PREDICTOR and BOUNDARY_LOSS_WEIGHT need NAME: DiceBCEMaskHead"
        )
    needs_pooled_head = head_cfg.LEVEL_ASSIGNMENT == "area_ratio" or head_cfg.MASK_SCORING
    if needs_pooled_head and not (has_pooler and isinstance(mask_head, BaseMaskRCNNHead)):
        raise ValueError(
            "LEVEL_ASSIGNMENT area_ratio and MASK_SCORING need a POOLER_TYPE and a mask head "
            "derived from detectron2's BaseMaskRCNNHead"
        )
