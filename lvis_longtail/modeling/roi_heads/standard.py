"""LongTailROIHeads: detectron2's StandardROIHeads with the long-tail box predictor and the
contract-based mask branch (area-ratio levels, Mask Scoring, chunked mask inference)."""

from typing import Dict, List, Optional, Union

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.poolers import convert_boxes_to_pooler_format
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_inference
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.modeling.sampling import subsample_labels
from detectron2.structures import Boxes, Instances
from torch import nn

from lvis_longtail.modeling.architecture import adjust_roi_heads, plain_pooler_cfg
from lvis_longtail.modeling.fast_rcnn import LongTailFastRCNNOutputLayers
from lvis_longtail.modeling.ignore_regions import IgnoreRegionsMixin
from lvis_longtail.modeling.mask_head import LongTailMaskRCNNConvUpsampleHead  # noqa: F401
from lvis_longtail.modeling.mask_levels import (
    AreaRatioROIPooler,
    pool_at_levels,
    pooler_levels,
    two_pass_pooled,
)
from lvis_longtail.modeling.mask_scoring import MaskIoUHead
from lvis_longtail.modeling.mask_targets import build_mask_targets, has_mask_contract
from lvis_longtail.modeling.roi_heads.context_head import fuse_context
from lvis_longtail.modeling.tsd import TSDHead, with_proposal_boxes

# detectron2 mask heads -> the same head with the mask-branch contract (same parameters;
# importing mask_head registers them).
CONTRACT_MASK_HEADS = {"MaskRCNNConvUpsampleHead": "LongTailMaskRCNNConvUpsampleHead"}


@ROI_HEADS_REGISTRY.register()
class LongTailROIHeads(IgnoreRegionsMixin, StandardROIHeads):
    """What changes relative to detectron2's ``StandardROIHeads``:

    * the box predictor is a :class:`LongTailFastRCNNOutputLayers` (``CLS_LOSS_NAME``,
      ``PREDICTOR_TYPE``);
    * every RoI pooler uses ``MODEL.ROI_HEADS.CANONICAL_BOX_SIZE`` (detectron2 hard-codes 224),
      set in one place, :meth:`_adjust_poolers`;
    * the mask branch follows the contract of :mod:`~lvis_longtail.modeling.mask_targets`:
      training is pool -> ``mask_head.train_outputs`` -> ``mask_head.mask_losses`` (+
      ``loss_maskiou``) on one :class:`MaskTargets` per batch; detectron2's
      ``MaskRCNNConvUpsampleHead`` is built as its contract twin (same parameters and loss);
    * ``ROI_MASK_HEAD.LEVEL_ASSIGNMENT: area_ratio``: the mask pooler is an
      :class:`AreaRatioROIPooler`; training RoIs are pooled at the level of sqrt(w h r), r
      the matched GT's mask/box area ratio; at test time ``TEST_AREA_RATIO`` "one" (box rule)
      or "two_pass" (estimate r from a first prediction, re-pool the RoIs whose level moves);
    * ``ROI_MASKIOU_HEAD.ENABLED``: a :class:`MaskIoUHead` adds ``loss_maskiou`` and sets
      ``mask_scores`` (box score x predicted mask IoU) at inference (``scores`` unchanged);
    * the mask head computes only each RoI's class's mask logits (GT class in training,
      predicted class at inference), never (R, K, M, M); mask inference runs in chunks of
      ``ROI_MASK_HEAD.TEST_CHUNK_SIZE`` RoIs, so its peak memory does not grow with the
      number of detections; the masks equal one-shot inference.

    * ignore regions (:mod:`~lvis_longtail.modeling.ignore_regions`, ``ROI_HEADS.IGNORE``):
      with ignore boxes, background proposals covered by one are not sampled.
    * ``ROI_BOX_HEAD.TSD.ENABLED``: a :class:`~lvis_longtail.modeling.tsd.TSDHead`
      (``tsd_head``) classifies and regresses; the ordinary box head and predictor are its
      sibling, trained alongside and not run at inference.

    Subclasses may pass an image-level context vector (N, C) to :meth:`_forward_mask` and
    :meth:`forward_with_given_boxes`; it is added to every RoI's mask features.
    """

    # the box branch can run TSD heads (lvis_longtail.config_check reads this)
    supports_tsd = True
    # reads the keys of config_check.rules.PROJECT_HEAD_KEYS (rejected with other ROI heads)
    reads_longtail_keys = True

    @configurable
    def __init__(
        self,
        *,
        tsd_head: Optional[Union[TSDHead, List[TSDHead]]] = None,
        mask_level_assignment: str = "box",
        mask_test_area_ratio: str = "one",
        mask_iou_head: Optional[MaskIoUHead] = None,
        mask_test_chunk_size: int = 32,
        ignore_metric: str = "iou",
        ignore_thresh: float = 0.5,
        **kwargs,
    ):
        """
        Args:
            tsd_head: the TSD head (a list: one per cascade stage), or None.
            mask_level_assignment: "box" or "area_ratio".
            mask_test_area_ratio: "one" or "two_pass".
            mask_iou_head: MaskIoU head, or None for no mask scoring.
            mask_test_chunk_size: RoIs per chunk at mask inference; 0 = all at once.
            ignore_metric: "iou" or "iof", overlap of a proposal with an ignore box.
            ignore_thresh: overlap from which a background proposal is ignored.
            kwargs: as ``StandardROIHeads``.
        """
        super().__init__(**kwargs)
        if isinstance(tsd_head, (list, tuple)):
            tsd_head = nn.ModuleList(tsd_head)
        self.tsd_head = tsd_head
        self.mask_level_assignment = mask_level_assignment
        self.mask_test_area_ratio = mask_test_area_ratio
        self.mask_iou_head = mask_iou_head
        self.mask_test_chunk_size = mask_test_chunk_size
        self.ignore_metric = ignore_metric
        self.ignore_thresh = ignore_thresh

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(plain_pooler_cfg(cfg), input_shape)  # see adjust_roi_heads
        cls._adjust_poolers(cfg, input_shape, ret)
        ret["ignore_metric"] = cfg.MODEL.ROI_HEADS.IGNORE.METRIC
        ret["ignore_thresh"] = cfg.MODEL.ROI_HEADS.IGNORE.THRESH
        return adjust_roi_heads(cfg, input_shape, ret)  # deformable poolers, CARAFE mask head

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals: List[Instances], targets: List[Instances]):
        if self.ignore_boxes is None:
            return super().label_and_sample_proposals(proposals, targets)
        # masks of the given proposals; the GT boxes detectron2 appends after them are
        # foreground, so _sample_proposals pads each mask with False for them
        self._queue_masks(self._ignore_masks([p.proposal_boxes for p in proposals]))
        try:
            return super().label_and_sample_proposals(proposals, targets)
        finally:
            self._queue_masks(None)

    def _sample_proposals(self, matched_idxs, matched_labels, gt_classes):
        """detectron2's sampler; with an ignore mask queued, the background proposals it
        covers get label -1 first (not sampled)."""
        mask = self._next_mask()
        if mask is None:
            return super()._sample_proposals(matched_idxs, matched_labels, gt_classes)
        mask = torch.cat([mask, mask.new_zeros(len(matched_idxs) - len(mask))])
        if gt_classes.numel() > 0:
            labels = gt_classes[matched_idxs]
            labels[matched_labels == 0] = self.num_classes
            labels[matched_labels == -1] = -1
        else:
            labels = torch.full_like(matched_idxs, self.num_classes)
        labels[(labels == self.num_classes) & mask] = -1
        fg, bg = subsample_labels(
            labels, self.batch_size_per_image, self.positive_fraction, self.num_classes
        )
        sampled = torch.cat([fg, bg], dim=0)
        return sampled, labels[sampled]

    @classmethod
    def _adjust_poolers(cls, cfg, input_shape, ret: dict) -> None:
        """The one place where lvis_longtail changes the RoI poolers built by detectron2
        (in ``ret``, in place): the canonical box size of every pooler, and the mask pooler's
        type (:class:`AreaRatioROIPooler` for area-ratio level assignment)."""
        if ret.get("mask_pooler") is not None and cfg.MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT == (
            "area_ratio"
        ):
            old = ret["mask_pooler"]
            ret["mask_pooler"] = AreaRatioROIPooler(
                output_size=old.output_size,
                scales=tuple(1.0 / input_shape[f].stride for f in ret["mask_in_features"]),
                sampling_ratio=cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO,
                pooler_type=plain_pooler_cfg(cfg).MODEL.ROI_MASK_HEAD.POOLER_TYPE,
                canonical_level=old.canonical_level,
            )
        for key in ("box_pooler", "mask_pooler", "keypoint_pooler"):
            if ret.get(key) is not None:  # detectron2 hard-codes 224 in every pooler
                ret[key].canonical_box_size = cfg.MODEL.ROI_HEADS.CANONICAL_BOX_SIZE

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = LongTailFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        """detectron2's box branch; with a TSD head, the TSD losses (and the sibling's) in
        training, the TSD head's detections at inference."""
        if self.tsd_head is None:
            return super()._forward_box(features, proposals)
        features = [features[f] for f in self.box_in_features]
        tsd = self.tsd_head
        sibling = (self.box_head, self.box_predictor)
        out = tsd(
            features,
            proposals,
            self.box_pooler,
            sibling if self.training and tsd.trains_sibling else None,
        )
        if self.training:
            return tsd.losses(out, proposals, self.box_predictor)
        refined = with_proposal_boxes(proposals, out.boxes.detach())
        return tsd.predictor.inference(out.predictions, refined)[0]

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        head = cfg.MODEL.ROI_MASK_HEAD
        if cfg.MODEL.MASK_ON and head.NAME in CONTRACT_MASK_HEADS:
            cfg = cfg.clone()
            cfg.defrost()
            cfg.MODEL.ROI_MASK_HEAD.NAME = CONTRACT_MASK_HEADS[head.NAME]
        ret = super()._init_mask_head(cfg, input_shape)
        if not ret:
            return ret
        _check_mask_options(head, ret["mask_head"], ret["mask_pooler"] is not None)
        ret["mask_level_assignment"] = head.LEVEL_ASSIGNMENT
        ret["mask_test_area_ratio"] = head.TEST_AREA_RATIO
        ret["mask_test_chunk_size"] = head.TEST_CHUNK_SIZE
        if cfg.MODEL.ROI_MASKIOU_HEAD.ENABLED:
            channels = input_shape[ret["mask_in_features"][0]].channels
            res = head.POOLER_RESOLUTION
            shape = ShapeSpec(channels=channels, height=res, width=res)
            ret["mask_iou_head"] = MaskIoUHead(cfg, shape)
        return ret

    def forward_with_given_boxes(
        self,
        features: Dict[str, torch.Tensor],
        instances: List[Instances],
        context: Optional[torch.Tensor] = None,
    ) -> List[Instances]:
        """detectron2's: masks (and keypoints) of given boxes, at inference.

        Args:
            features: backbone features.
            instances: per-image ``Instances`` with ``pred_boxes`` and ``pred_classes``.
            context: optional (N, C) per-image vector added to the mask RoI features.
        """
        assert not self.training
        assert instances[0].has("pred_boxes") and instances[0].has("pred_classes")
        instances = self._forward_mask(features, instances, context)
        return self._forward_keypoint(features, instances)

    def _forward_mask(
        self,
        features: Dict[str, torch.Tensor],
        instances: List[Instances],
        context: Optional[torch.Tensor] = None,
    ):
        """Loss dict in training (on the foreground of ``instances``); at inference the
        instances with ``pred_masks`` (and ``mask_scores`` with mask scoring)."""
        if not self.mask_on:
            return {} if self.training else instances
        feature_list = [features[f] for f in self.mask_in_features]
        if self.training:
            instances, _ = select_foreground_proposals(instances, self.num_classes)
            return self._mask_losses(feature_list, instances, context)
        return self._mask_inference(feature_list, instances, context)

    def _pool_mask(self, features, pooler_boxes, levels, context) -> torch.Tensor:
        """(M, C, S, S) mask RoI features of (M, 5) pooler-format boxes at the given level
        offsets, plus the context vector of each RoI's image when given."""
        x = pool_at_levels(self.mask_pooler, features, pooler_boxes, levels)
        return fuse_context(x, pooler_boxes[:, 0].long(), context)

    def _mask_losses(self, features, instances: List[Instances], context=None):
        """Pool -> layers -> losses on the foreground proposals ``instances``."""
        side = self.mask_head.output_side(self.mask_pooler.output_size[0])
        targets, x = self._mask_train_inputs(features, instances, side, context)
        outputs = self.mask_head.train_outputs(x, targets.classes)
        losses = self.mask_head.mask_losses(outputs, targets)
        if self.mask_iou_head is not None:
            losses.update(
                self.mask_iou_head.losses(
                    x, outputs.logits, targets.masks, targets.classes, targets.area_fractions
                )
            )
        return losses

    def _mask_train_inputs(self, features, instances: List[Instances], side: int, context):
        """The :class:`MaskTargets` (side ``side``) of the foreground proposals ``instances``
        and their (R, C, S, S) pooled RoI features (at the area-ratio levels when configured,
        plus the context vector when given)."""
        targets = build_mask_targets(
            instances,
            side,
            features[0].device,
            area_ratios=self.mask_level_assignment == "area_ratio",
            area_fractions=self.mask_iou_head is not None,
        )
        boxes = [x.proposal_boxes for x in instances]
        pooler_boxes = _pooler_boxes(boxes, features[0])
        levels = pooler_levels(self.mask_pooler, boxes, targets.area_ratios)
        return targets, self._pool_mask(features, pooler_boxes, levels, context)

    def _mask_inference(self, features, instances: List[Instances], context=None):
        """Masks (and mask scores) of the predicted boxes, ``mask_test_chunk_size`` RoIs at a
        time; the head computes only the predicted class's (R, 1, M, M) logits."""
        boxes = [x.pred_boxes for x in instances]
        classes = cat([i.pred_classes for i in instances])
        pooler_boxes = _pooler_boxes(boxes, features[0])
        total = pooler_boxes.size(0)
        step = self.mask_test_chunk_size if self.mask_test_chunk_size > 0 else max(total, 1)
        logits, ious = [], []
        for start in range(0, max(total, 1), step):
            rows = slice(start, min(start + step, total))
            chunk_logits, chunk_ious = self._predict_chunk(
                features, pooler_boxes[rows], classes[rows], context
            )
            logits.append(chunk_logits)
            ious.append(chunk_ious)
        mask_rcnn_inference(cat(logits, dim=0), instances)
        if self.mask_iou_head is not None:
            self.mask_iou_head.set_mask_scores(cat(ious, dim=0), instances)
        return instances

    def _predict_chunk(self, features, pooler_boxes, classes, context):
        """(m, 1, M, M) logits of the predicted classes and, with mask scoring, (m,)
        predicted IoUs (else None) for m boxes in pooler format."""

        def pool(boxes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
            return self._pool_mask(features, boxes, levels, context)

        if self.mask_test_area_ratio == "two_pass":
            x, logits, _ = two_pass_pooled(
                self.mask_pooler, pool, pooler_boxes, classes, self._predict_mask_logits
            )
        else:
            levels = pooler_levels(self.mask_pooler, [Boxes(pooler_boxes[:, 1:])])
            x = pool(pooler_boxes, levels)
            logits = self._predict_mask_logits(x, classes)
        iou = None
        if self.mask_iou_head is not None:
            iou = self.mask_iou_head.predict_iou(x, logits[:, 0], classes)
        return logits, iou

    def _predict_mask_logits(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(m, C, S, S) pooled RoI features and (m,) predicted classes -> (m, 1, M, M) mask
        logits: the mask head's ``predict_masks`` (HTC averages several heads here)."""
        return self.mask_head.predict_masks(x, classes)


def _pooler_boxes(boxes: List[Boxes], like: torch.Tensor) -> torch.Tensor:
    """(M, 5) pooler-format boxes; (0, 5) on the features' device when there are none."""
    if sum(len(b) for b in boxes) == 0:
        return like.new_zeros((0, 5))
    return convert_boxes_to_pooler_format(boxes)


def _check_mask_options(head_cfg, mask_head, has_pooler: bool) -> None:
    """Reject what only the built mask branch shows (the values and the rules between keys
    are checked by lvis_longtail.config_check when the config is loaded)."""
    if head_cfg.TEST_CHUNK_SIZE < 0:
        raise ValueError(f"ROI_MASK_HEAD.TEST_CHUNK_SIZE must be >= 0: {head_cfg.TEST_CHUNK_SIZE}")
    if not (has_pooler and has_mask_contract(mask_head)):
        raise ValueError(
            f"ROI_MASK_HEAD.NAME {head_cfg.NAME!r} with POOLER_TYPE {head_cfg.POOLER_TYPE!r}: "
            "lvis_longtail's ROI heads need a POOLER_TYPE and a mask head with the mask-branch "
            "contract (MaskRCNNConvUpsampleHead, DiceBCEMaskHead or a head with the methods of "
            "lvis_longtail.modeling.mask_targets.MaskHeadContract)"
        )
