"""HTC-Lite (the MMDet team's LVIS 2020 entry, Seesaw Loss paper appendix D.1): a Cascade
Mask R-CNN with global context encoding and one mask head trained on the last stage."""

from typing import Dict, List, Optional, Sequence, Union

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads.cascade_rcnn import _ScaleGradient
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures import Instances, pairwise_iou

from lvis_longtail.modeling.roi_heads.cascade import LongTailCascadeROIHeads
from lvis_longtail.modeling.roi_heads.context_head import GlobalContextHead, fuse_context


@ROI_HEADS_REGISTRY.register()
class LongTailHTCLiteROIHeads(LongTailCascadeROIHeads):
    """What changes relative to :class:`LongTailCascadeROIHeads` (each stage keeps its
    long-tail box predictor and its own loss state):

    * with ``MODEL.ROI_CONTEXT_HEAD.ENABLED``, a :class:`GlobalContextHead` computes an
      (N, D) image vector from ``IN_FEATURE`` (P6) and adds ``loss_context`` (multi-label
      category presence, optionally federated); the vector is added to the pooled RoI
      features of every stage's box head (``FUSE_BOX``) and of the mask head
      (``FUSE_MASK``, on every inference path, ``forward_with_given_boxes`` included, which
      computes it from the given features when not passed);
    * the one mask head is trained on the positives of stage
      ``MODEL.ROI_HEADS.HTC_LITE.MASK_TRAIN_STAGE`` (default -1, the last): the matched
      ``gt_masks`` (every ``gt_*`` field) follow the proposals to that stage, which
      detectron2's ``_match_and_label_boxes`` does not do. At inference it runs once, on the
      final boxes. No interleaving, no mask information flow between stages.

    With the context head off and ``MASK_TRAIN_STAGE 0`` it computes exactly what
    ``LongTailCascadeROIHeads`` computes.
    """

    # builds MODEL.ROI_CONTEXT_HEAD (lvis_longtail.data.image_labels reads this)
    builds_context_head = True

    @configurable
    def __init__(
        self,
        *,
        context_head: Optional[GlobalContextHead] = None,
        context_fuse_box: bool = True,
        context_fuse_mask: bool = True,
        mask_train_stage: int = -1,
        mask_max_positives: int = 0,
        **kwargs,
    ):
        """
        Args:
            context_head: the global context head, or None for no context.
            context_fuse_box: add the context vector to every stage's box RoI features.
            context_fuse_mask: add it to the mask RoI features.
            mask_train_stage: stage whose positives train the mask head (0-based; negative
                counts from the last).
            mask_max_positives: at most this many positives per image train the mask head,
                drawn at random (0: all; -1: as many as the first stage has for that image).
                The cascade does not re-sample its later stages, so a trained model's last
                stage has about twice the first stage's positives, and the mask head's cost.
            kwargs: as :class:`LongTailCascadeROIHeads`.
        """
        super().__init__(**kwargs)
        self.context_head = context_head
        self.context_fuse_box = context_fuse_box
        self.context_fuse_mask = context_fuse_mask
        self.mask_train_stage = mask_train_stage % self.num_cascade_stages
        self.mask_max_positives = mask_max_positives
        self._forward_state: Optional[dict] = None  # per-forward: box context, stage proposals

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        stage = cfg.MODEL.ROI_HEADS.HTC_LITE.MASK_TRAIN_STAGE  # a stage: config_check
        node = cfg.MODEL.ROI_CONTEXT_HEAD
        ret.update(mask_train_stage=stage, context_fuse_box=node.FUSE_BOX)
        ret["mask_max_positives"] = cfg.MODEL.ROI_HEADS.HTC_LITE.MASK_MAX_POSITIVES
        ret["context_fuse_mask"] = node.FUSE_MASK
        if node.ENABLED:
            roi_channels = input_shape[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].channels
            if (node.FUSE_BOX or node.FUSE_MASK) and node.CONV_DIM != roi_channels:
                raise ValueError(
                    f"MODEL.ROI_CONTEXT_HEAD.CONV_DIM ({node.CONV_DIM}) must equal the RoI "
                    f"feature channels ({roi_channels}, MODEL.FPN.OUT_CHANNELS) to fuse the "
                    "context (FUSE_BOX / FUSE_MASK)"
                )
            ret["context_head"] = GlobalContextHead(cfg, input_shape)
        return ret

    def forward(self, images, features: Dict[str, torch.Tensor], proposals, targets=None):
        del images
        context, losses = None, {}
        if self.context_head is not None:
            context, logits = self.context_head(features)
            if self.training:
                losses.update(self.context_head.losses(logits, targets))
        mask_context = context if self.context_fuse_mask else None
        self._forward_state = {
            "box_context": context if self.context_fuse_box else None,
            "stage_proposals": [],
        }
        try:
            if self.training:
                proposals = self.label_and_sample_proposals(proposals, targets)
                losses.update(self._forward_box(features, proposals, targets))
                losses.update(self._mask_train_losses(features, targets, mask_context))
                losses.update(self._forward_keypoint(features, proposals))
                return proposals, losses
            pred_instances = self._forward_box(features, proposals)
        finally:
            self._forward_state = None
        return self.forward_with_given_boxes(features, pred_instances, mask_context), {}

    def _mask_train_losses(
        self,
        features: Dict[str, torch.Tensor],
        targets: List[Instances],
        context: Optional[torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """The mask losses of a training step, once the box stages have run (their proposals
        are in the forward state): the mask head on the positives of ``mask_train_stage``."""
        del targets  # the stage's proposals carry their matched GT fields
        stages = self._forward_state["stage_proposals"]
        proposals = self._cap_positives(stages[self.mask_train_stage])
        return self._forward_mask(features, proposals, context)

    def _cap_positives(self, proposals: List[Instances]) -> List[Instances]:
        """:func:`cap_foreground` of ``proposals`` by ``mask_max_positives`` (-1: each
        image's positive count at the first box stage of this step)."""
        cap = self.mask_max_positives
        if cap < 0:
            first = self._forward_state["stage_proposals"][0]
            cap = [int(num_foreground(p, self.num_classes)) for p in first]
        return cap_foreground(proposals, self.num_classes, cap)

    def _stage_carries_gt_fields(self, stage: int) -> bool:
        """Whether the proposals of box stage ``stage`` >= 1 get every ``gt_*`` field of their
        matched GT (detectron2 gives them only ``gt_classes`` and ``gt_boxes``): the stage
        whose positives train the mask head."""
        return self.mask_on and stage == self.mask_train_stage

    def forward_with_given_boxes(
        self,
        features: Dict[str, torch.Tensor],
        instances: List[Instances],
        context: Optional[torch.Tensor] = None,
    ) -> List[Instances]:
        """Masks of given boxes (test-time augmentation calls this); the context vector is
        computed from ``features`` when the mask fuses it and none is given."""
        if context is None and self.context_head is not None and self.context_fuse_mask:
            context = self.context_head(features)[0]
        return super().forward_with_given_boxes(features, instances, context)

    def _run_stage(self, features: List[torch.Tensor], proposals: List[Instances], stage: int):
        """detectron2's stage (pool, scale gradient, box head, predictor) with the context
        vector added to the pooled features; records the stage's proposals."""
        state = self._forward_state
        context = None
        if state is not None:
            state["stage_proposals"].append(proposals)
            context = state["box_context"]
        if context is None:
            return super()._run_stage(features, proposals, stage)
        box_features = self.box_pooler(features, [x.proposal_boxes for x in proposals])
        batch_index = cat(
            [torch.full((len(p),), i, device=context.device) for i, p in enumerate(proposals)]
        ).long()
        box_features = fuse_context(box_features, batch_index, context)
        box_features = _ScaleGradient.apply(box_features, 1.0 / self.num_cascade_stages)
        return self.box_predictor[stage](self.box_head[stage](box_features))

    def _stage_prepare(self, proposals: List[Instances]):
        """A TSD stage's feature step: the cascade's, after adding the context vector as
        :meth:`_run_stage` does; records the stage's proposals."""
        scale = super()._stage_prepare(proposals)
        state = self._forward_state
        if state is None:
            return scale
        state["stage_proposals"].append(proposals)
        context = state["box_context"]
        if context is None:
            return scale
        batch_index = cat(
            [torch.full((len(p),), i, device=context.device) for i, p in enumerate(proposals)]
        ).long()
        return lambda x: scale(fuse_context(x, batch_index, context))

    @torch.no_grad()
    def _match_and_label_boxes(self, proposals, stage, targets):
        """detectron2's matching; at the mask-training stage every other ``gt_*`` field of the
        matched GT (``gt_masks``) is copied onto the proposals too."""
        proposals = super()._match_and_label_boxes(proposals, stage, targets)
        if not self._stage_carries_gt_fields(stage):
            return proposals
        for props, gts in zip(proposals, targets):
            if len(gts) == 0 or len(props) == 0:
                continue  # all background: no mask target needed
            matched, _ = self.proposal_matchers[stage](
                pairwise_iou(gts.gt_boxes, props.proposal_boxes)
            )
            for name, value in gts.get_fields().items():
                if name.startswith("gt_") and not props.has(name):
                    props.set(name, value[matched])
        return proposals


def num_foreground(p: Instances, num_classes: int) -> torch.Tensor:
    """The number of foreground proposals of an image (detectron2's rule: ``gt_classes`` not
    -1 and not ``num_classes``)."""
    return ((p.gt_classes != -1) & (p.gt_classes != num_classes)).sum()


def cap_foreground(
    proposals: List[Instances], num_classes: int, max_per_image: Union[int, Sequence[int]]
) -> List[Instances]:
    """Each image's foreground proposals (detectron2's ``select_foreground_proposals``), at
    most ``max_per_image`` (one int, or one per image) of them drawn at random without
    replacement (torch's global RNG, as detectron2's sampler); an int ``max_per_image`` <= 0
    returns ``proposals`` unchanged."""
    if isinstance(max_per_image, int):
        if max_per_image <= 0:
            return proposals
        max_per_image = [max_per_image] * len(proposals)
    foreground, _ = select_foreground_proposals(proposals, num_classes)
    out = []
    for p, cap in zip(foreground, max_per_image):
        if len(p) > cap:
            p = p[torch.randperm(len(p), device=p.gt_classes.device)[:cap]]
        out.append(p)
    return out
