"""HTC without its semantic branch (Hybrid Task Cascade, Chen et al., CVPR 2019), as the LVIS
2020 1st place trained its large models: HTC-Lite's cascade with one mask head per stage,
interleaved box and mask execution and the mask information flow."""

from typing import Dict, List, Optional, Sequence

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, get_norm, nonzero_tuple
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.modeling.sampling import subsample_labels
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.nn import functional as F

from lvis_longtail.modeling.architecture import adjust_roi_heads, plain_pooler_cfg
from lvis_longtail.modeling.roi_heads.htc_lite import LongTailHTCLiteROIHeads

__all__ = ["LongTailHTCROIHeads", "mask_flow_conv", "refined_positives", "sample_stage"]


@ROI_HEADS_REGISTRY.register()
class LongTailHTCROIHeads(LongTailHTCLiteROIHeads):
    """What changes relative to :class:`LongTailHTCLiteROIHeads` (``MODEL.ROI_HEADS.HTC``;
    the context head, its fusion and ``MASK_MAX_POSITIVES`` stay as they are):

    * ``PER_STAGE_MASKS``: ``mask_head`` is a ``ModuleList`` of one mask head per box stage
      (each built as ``ROI_MASK_HEAD`` says, with the mask-branch contract); head t's losses
      are reported as ``<name>_stage<t>`` times ``MASK_STAGE_LOSS_WEIGHTS[t]``. At inference
      every head predicts the masks of the final boxes and their sigmoid probabilities are
      averaged; the logits handed on (to ``mask_rcnn_inference``, the two-pass level
      assignment, the MaskIoU head) are ``logit(mean probability)``. ``MASK_TRAIN_STAGE`` is
      not read;
    * ``INTERLEAVED``: head t trains on the boxes that box stage t refined, re-matched at
      stage t's IoU with the GT boxes added, at most ``BATCH_SIZE_PER_IMAGE x
      POSITIVE_FRACTION`` positives per image drawn at random (the sampler's positive share;
      only positives train a mask head). Without it, on box stage t's positives;
    * ``MASK_INFO_FLOW``: head t's input is the pooled RoI features plus ``mask_flows[t-1]``
      (1x1 conv, norm, ReLU) of head t-1's conv features, head t-1 having taken head t-2's in
      the same way. In training, heads 0..t-1 run their convs on stage t's RoIs (with
      gradient); at inference the flow runs through every head on the final boxes;
    * ``SAMPLE_BOX_STAGES``: box stages >= 1 sample their proposals as stage 0 does (the
      refined boxes plus the GT boxes, ``BATCH_SIZE_PER_IMAGE`` RoIs, ``POSITIVE_FRACTION``),
      as mmdetection's cascades do; without it they take every refined box (detectron2).

    With Mask Scoring the MaskIoU head trains on the last head's masks and RoIs
    (``loss_maskiou``, not stage-weighted) and scores the averaged mask at inference. With all
    four switches off it computes exactly what :class:`LongTailHTCLiteROIHeads` computes.
    With TSD (``ROI_BOX_HEAD.TSD``) the box stages are the cascade's TSD stages and head t,
    interleaved, trains on the boxes that TSD stage t decoded from its translated proposals.
    """

    @configurable
    def __init__(
        self,
        *,
        per_stage_masks: bool = False,
        interleaved: bool = False,
        mask_info_flow: bool = False,
        mask_stage_loss_weights: Sequence[float] = (),
        sample_box_stages: bool = False,
        mask_flows: Optional[nn.ModuleList] = None,
        **kwargs,
    ):
        """
        Args:
            per_stage_masks: one mask head per stage (``mask_head`` is then a ModuleList).
            interleaved: train head t on stage t's refined boxes, re-matched.
            mask_info_flow: pass each head's conv features to the next through ``mask_flows``.
            mask_stage_loss_weights: weight of each stage's mask losses.
            sample_box_stages: box stages >= 1 sample their proposals as stage 0.
            mask_flows: the 1x1 flow convs into heads 1..T-1 (with ``mask_info_flow``).
            kwargs: as :class:`LongTailHTCLiteROIHeads`.
        """
        super().__init__(**kwargs)
        self.per_stage_masks = per_stage_masks
        self.interleaved = interleaved
        self.mask_info_flow = mask_info_flow
        self.mask_stage_loss_weights = tuple(mask_stage_loss_weights)
        self.sample_box_stages = sample_box_stages
        self.mask_flows = mask_flows

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        node = cfg.MODEL.ROI_HEADS.HTC
        stages = len(cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS)
        _check_htc_options(node, stages)
        ret.update(
            per_stage_masks=node.PER_STAGE_MASKS,
            interleaved=node.INTERLEAVED,
            mask_info_flow=node.MASK_INFO_FLOW,
            mask_stage_loss_weights=node.MASK_STAGE_LOSS_WEIGHTS,
            sample_box_stages=node.SAMPLE_BOX_STAGES,
        )
        if not (cfg.MODEL.MASK_ON and node.PER_STAGE_MASKS):
            return ret
        heads = [ret["mask_head"]] + [
            cls._stage_mask_head(cfg, input_shape) for _ in range(1, stages)
        ]
        ret["mask_head"] = nn.ModuleList(heads)
        if node.MASK_INFO_FLOW:
            channels = input_shape[ret["mask_in_features"][0]].channels
            mask = cfg.MODEL.ROI_MASK_HEAD  # a head without 3x3 convs passes its input on
            flow_in = mask.CONV_DIM if mask.NUM_CONV > 0 else channels
            ret["mask_flows"] = nn.ModuleList(
                mask_flow_conv(flow_in, channels, mask.NORM) for _ in range(1, stages)
            )
        return ret

    @classmethod
    def _stage_mask_head(cls, cfg, input_shape) -> nn.Module:
        """One more mask head as the ROI heads' own is built (contract twin, checks, CARAFE);
        no MaskIoU head (nor box-branch module) comes with it."""
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.ROI_MASKIOU_HEAD.ENABLED = False
        cfg.MODEL.ROI_BOX_HEAD.TSD.ENABLED = False
        cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED = False
        head = cls._init_mask_head(plain_pooler_cfg(cfg), input_shape)["mask_head"]
        return adjust_roi_heads(cfg, input_shape, {"mask_head": head})["mask_head"]

    def _run_stage(self, features: List[torch.Tensor], proposals: List[Instances], stage: int):
        """HTC-Lite's stage; in training its predictions are kept for the interleaved masks."""
        predictions = super()._run_stage(features, proposals, stage)
        if self.training and self._forward_state is not None:
            self._forward_state.setdefault("stage_predictions", []).append(predictions)
        return predictions

    def _tsd_stage_boxes(self, boxes) -> None:
        """In training, a TSD stage's refined boxes are kept for the interleaved masks."""
        if self.training and self._forward_state is not None:
            boxes = [b.detach() for b in boxes]
            self._forward_state.setdefault("stage_boxes", []).append(boxes)

    @torch.no_grad()
    def _match_and_label_boxes(self, proposals, stage, targets):
        """With ``sample_box_stages`` the refined boxes are sampled (:func:`sample_stage`)
        before the parent labels them (and logs the sampled counts)."""
        if self.sample_box_stages:
            masks = None
            if self.ignore_boxes is not None:
                boxes = [
                    Boxes.cat([p.proposal_boxes, t.gt_boxes]) for p, t in zip(proposals, targets)
                ]
                masks = self._ignore_masks(boxes)
            proposals = sample_stage(
                proposals,
                targets,
                self.proposal_matchers[stage],
                self.batch_size_per_image,
                self.positive_fraction,
                self.num_classes,
                masks,
            )
        return super()._match_and_label_boxes(proposals, stage, targets)

    def _stage_carries_gt_fields(self, stage: int) -> bool:
        """Every stage's proposals carry their GT masks when each stage's head trains on them
        (per-stage heads, not interleaved)."""
        if not self.per_stage_masks:
            return super()._stage_carries_gt_fields(stage)
        return self.mask_on and not self.interleaved

    def _mask_train_losses(self, features, targets, context):
        """Every stage's mask losses (HTC-Lite's one head without ``per_stage_masks``)."""
        if not self.per_stage_masks:
            return super()._mask_train_losses(features, targets, context)
        if not self.mask_on:
            return {}
        feature_list = [features[f] for f in self.mask_in_features]
        storage = get_event_storage()
        losses = {}
        for stage in range(self.num_cascade_stages):
            instances = self._stage_mask_proposals(stage, targets)
            with storage.name_scope(f"stage{stage}"):
                losses.update(self._stage_mask_losses(feature_list, instances, stage, context))
        return losses

    def _stage_mask_proposals(self, stage: int, targets: List[Instances]) -> List[Instances]:
        """The positives mask head ``stage`` trains on, capped by ``mask_max_positives``."""
        state = self._forward_state
        proposals = state["stage_proposals"][stage]
        if self.interleaved:
            with torch.no_grad():  # detached like every cascade proposal
                if "stage_boxes" in state:  # TSD stages: decoded from their P_r
                    boxes = state["stage_boxes"][stage]
                else:
                    predictions = state["stage_predictions"][stage]
                    boxes = self.box_predictor[stage].predict_boxes(predictions, proposals)
            refined = self._create_proposals_from_boxes(boxes, [p.image_size for p in proposals])
            cap = int(self.batch_size_per_image * self.positive_fraction)
            proposals = refined_positives(refined, targets, self.proposal_matchers[stage], cap)
        else:
            proposals, _ = select_foreground_proposals(proposals, self.num_classes)
        return self._cap_positives(proposals)

    def _stage_mask_losses(self, features, instances, stage: int, context) -> Dict:
        """Mask head ``stage``'s weighted losses on the positives ``instances`` (the flow of
        heads 0..stage-1 computed on the same RoIs); the MaskIoU head's at the last stage."""
        head = self.mask_head[stage]
        side = head.output_side(self.mask_pooler.output_size[0])
        targets, x = self._mask_train_inputs(features, instances, side, context)
        flow = None
        if self.mask_info_flow:
            for prev in range(stage):
                flow = self.mask_head[prev].conv_features(self._flow_input(prev, x, flow))
        outputs = head.train_outputs(self._flow_input(stage, x, flow), targets.classes)
        weight = self.mask_stage_loss_weights[stage]
        losses = {
            f"{k}_stage{stage}": v * weight for k, v in head.mask_losses(outputs, targets).items()
        }
        if self.mask_iou_head is not None and stage == self.num_cascade_stages - 1:
            losses.update(
                self.mask_iou_head.losses(
                    x, outputs.logits, targets.masks, targets.classes, targets.area_fractions
                )
            )
        return losses

    def _flow_input(self, stage: int, x: torch.Tensor, flow: Optional[torch.Tensor]):
        """Head ``stage``'s input: the RoI features plus the flow conv of the previous head's
        conv features (``x`` itself without flow)."""
        return x if flow is None else x + self.mask_flows[stage - 1](flow)

    def _predict_mask_logits(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """``logit`` of the mean sigmoid mask of every head, (m, 1, M, M) fp32, the flow
        running through the heads (HTC-Lite's one head without ``per_stage_masks``)."""
        if not self.per_stage_masks:
            return super()._predict_mask_logits(x, classes)
        probs, flow = None, None
        last = len(self.mask_head) - 1
        for stage, head in enumerate(self.mask_head):
            inputs = self._flow_input(stage, x, flow)
            if self.mask_info_flow and stage < last:
                flow = head.conv_features(inputs)
                logits = head.predict_masks_from_convs(flow, classes)
            else:
                logits = head.predict_masks(inputs, classes)
            p = logits.float().sigmoid()
            probs = p if probs is None else probs + p
        return torch.logit(probs / len(self.mask_head))


def mask_flow_conv(in_channels: int, out_channels: int, norm: str) -> Conv2d:
    """The mask information flow's 1x1 conv (+ norm, ReLU; MSRA init as the mask head's
    convs), from a head's conv features (D channels) to the RoI features' channels (C)."""
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size=1,
        bias=not norm,
        norm=get_norm(norm, out_channels),
        activation=F.relu,
    )
    weight_init.c2_msra_fill(conv)
    return conv


@torch.no_grad()
def refined_positives(
    proposals: List[Instances], targets: List[Instances], matcher: Matcher, max_per_image: int
) -> List[Instances]:
    """The positives among each image's refined boxes and its GT boxes (which the sampler
    adds as proposals), at most ``max_per_image`` drawn at random without replacement, each
    with every ``gt_*`` field of its matched GT.

    Args:
        proposals: per-image refined boxes (``proposal_boxes``), no gradient.
        targets: per-image GT instances (``gt_boxes``, ``gt_classes``, ``gt_masks``, ...).
        matcher: the stage's IoU matcher (label 1 = positive).
        max_per_image: cap of positives per image.

    Returns:
        Per-image Instances of the positives: ``proposal_boxes`` and the ``gt_*`` fields.
    """
    out = []
    for props, gts in zip(proposals, targets):
        boxes = Boxes.cat([props.proposal_boxes, gts.gt_boxes])
        matched, labels = matcher(pairwise_iou(gts.gt_boxes, boxes))
        positive = nonzero_tuple(labels == 1)[0]
        if positive.numel() > max_per_image:
            positive = positive[torch.randperm(positive.numel(), device=positive.device)]
            positive = positive[:max_per_image]
        inst = Instances(props.image_size, proposal_boxes=boxes[positive])
        for name, value in gts.get_fields().items():
            if name.startswith("gt_"):
                inst.set(name, value[matched[positive]])
        out.append(inst)
    return out


@torch.no_grad()
def sample_stage(
    proposals: List[Instances],
    targets: List[Instances],
    matcher: Matcher,
    batch_size_per_image: int,
    positive_fraction: float,
    num_classes: int,
    ignore_masks: Optional[List[torch.Tensor]] = None,
) -> List[Instances]:
    """A later box stage's proposals sampled as stage 0's: the refined boxes plus the GT
    boxes, labelled by the stage's ``matcher``, then detectron2's ``subsample_labels``
    (background boxes covered by an ignore box are never drawn).

    Args:
        proposals: per-image refined boxes (``proposal_boxes``).
        targets: per-image GT instances with ``gt_boxes`` and ``gt_classes``.
        matcher: the stage's IoU matcher.
        batch_size_per_image, positive_fraction, num_classes: as the ROI heads'.
        ignore_masks: per image, (R_i + G_i,) bool masks of the boxes (refined, then GT)
            covered by an ignore box, or None.

    Returns:
        Per-image Instances with only ``proposal_boxes`` (the caller labels them).
    """
    out = []
    for i, (props, gts) in enumerate(zip(proposals, targets)):
        boxes = Boxes.cat([props.proposal_boxes, gts.gt_boxes])
        matched, labels = matcher(pairwise_iou(gts.gt_boxes, boxes))
        classes = torch.full_like(matched, num_classes)
        if len(gts) > 0:
            classes = torch.where(labels == 1, gts.gt_classes[matched], classes)
        if ignore_masks is not None:
            classes[(classes == num_classes) & ignore_masks[i]] = -1
        fg, bg = subsample_labels(classes, batch_size_per_image, positive_fraction, num_classes)
        out.append(Instances(props.image_size, proposal_boxes=boxes[torch.cat([fg, bg])]))
    return out


def _check_htc_options(node, stages: int) -> None:
    """Reject HTC option combinations that would otherwise be silently ignored."""
    if not node.PER_STAGE_MASKS and (node.INTERLEAVED or node.MASK_INFO_FLOW):
        raise ValueError(
            "MODEL.ROI_HEADS.HTC.INTERLEAVED and MASK_INFO_FLOW need PER_STAGE_MASKS True "
            "(one mask head per stage)"
        )
    if node.PER_STAGE_MASKS and len(node.MASK_STAGE_LOSS_WEIGHTS) != stages:
        raise ValueError(
            f"MODEL.ROI_HEADS.HTC.MASK_STAGE_LOSS_WEIGHTS has {len(node.MASK_STAGE_LOSS_WEIGHTS)} "
            f"weights for the {stages}-stage cascade (MODEL.ROI_BOX_CASCADE_HEAD.IOUS)"
        )
