"""LongTailCascadeROIHeads: detectron2's Cascade R-CNN with the long-tail box predictor at
every stage and :class:`LongTailROIHeads`'s mask branch."""

from typing import Callable

import torch
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import CascadeROIHeads
from detectron2.modeling.roi_heads.cascade_rcnn import _ScaleGradient
from detectron2.utils.events import get_event_storage

from lvis_longtail.modeling.fast_rcnn import LongTailFastRCNNOutputLayers
from lvis_longtail.modeling.roi_heads.standard import LongTailROIHeads
from lvis_longtail.modeling.tsd import with_proposal_boxes


@ROI_HEADS_REGISTRY.register()
class LongTailCascadeROIHeads(CascadeROIHeads, LongTailROIHeads):
    """What changes relative to detectron2's ``CascadeROIHeads``: each stage's box predictor
    is a :class:`LongTailFastRCNNOutputLayers` (with that stage's box2box weights, and its own
    classification loss and loss state), so ``CLS_LOSS_NAME`` and ``PREDICTOR_TYPE`` apply to
    every stage; the mask branch, the poolers and ``forward_with_given_boxes`` are
    :class:`LongTailROIHeads`'s (the method resolution order ``CascadeROIHeads`` ->
    ``LongTailROIHeads`` -> ``StandardROIHeads`` takes the box branch from the cascade and
    the rest from ``LongTailROIHeads``). As in detectron2, one mask head is trained on the
    first stage's sampled proposals and run once on the final boxes.

    With ignore boxes (:mod:`~lvis_longtail.modeling.ignore_regions`), stage 0 uses the
    standard sampler's rule and stages >= 1 (no sampler) drop their background proposals
    covered by an ignore box, so those get no loss.

    At inference detectron2 averages the stages' *probabilities* (each stage's loss turns its
    logits into [K scores, background] first); mmdetection averages logits and applies the
    activation once. Like the parent, class-agnostic box regression is required. The final
    detections go through the last predictor's ``postprocess``, so ``MODEL.ROI_HEADS.NMS_TYPE``
    (Soft-NMS) applies to cascades too; with "hard" it is detectron2's ``fast_rcnn_inference``.

    With TSD (``tsd_head``, one per stage) each stage runs its TSD head: the next stage's
    proposals are its boxes, decoded against its translated proposals P_r; the sibling heads
    train alongside; inference averages the TSD classifiers' probabilities.
    """

    def _forward_box(self, features, proposals, targets=None):
        """Training: detectron2's. Inference: detectron2's stage loop and probability average,
        then the last predictor's ``postprocess`` instead of ``fast_rcnn_inference``."""
        if self.tsd_head is not None:
            return self._forward_box_tsd(features, proposals, targets)
        if self.training:
            return super()._forward_box(features, proposals, targets)
        features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in proposals]
        scores_per_stage, prev_pred_boxes = [], None
        for k, predictor in enumerate(self.box_predictor):
            if k > 0:
                proposals = self._create_proposals_from_boxes(prev_pred_boxes, image_sizes)
            predictions = self._run_stage(features, proposals, k)
            prev_pred_boxes = predictor.predict_boxes(predictions, proposals)
            scores_per_stage.append(predictor.predict_probs(predictions, proposals))
        scores = self._mean_over_stages(scores_per_stage)
        pred_instances, _ = predictor.postprocess(prev_pred_boxes, scores, image_sizes)
        return pred_instances

    def _forward_box_tsd(self, features, proposals, targets=None):
        """The cascade's box branch with a TSD head per stage (losses named as detectron2's,
        ``_stage{k}``)."""
        features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in proposals]
        stages, boxes = [], None
        for k, tsd in enumerate(self.tsd_head):
            if k > 0:
                proposals = self._create_proposals_from_boxes(boxes, image_sizes)
                if self.training:
                    proposals = self._match_and_label_boxes(proposals, k, targets)
            sibling = (self.box_head[k], self.box_predictor[k])
            train_sibling = self.training and tsd.trains_sibling
            out = tsd(features, proposals, self.box_pooler, sibling if train_sibling else None,
                      self._stage_prepare(proposals))  # fmt: skip
            refined = with_proposal_boxes(proposals, out.boxes.detach())
            boxes = tsd.predictor.predict_boxes(out.predictions, refined)
            self._tsd_stage_boxes(boxes)
            stages.append((out, proposals, refined))
        if self.training:
            losses, storage = {}, get_event_storage()
            for k, (out, props, _) in enumerate(stages):
                with storage.name_scope(f"stage{k}"):
                    stage_losses = self.tsd_head[k].losses(out, props, self.box_predictor[k])
                losses.update({f"{name}_stage{k}": v for name, v in stage_losses.items()})
            return losses
        per_stage = [
            t.predictor.predict_probs(s[0].predictions, s[2]) for t, s in zip(self.tsd_head, stages)
        ]
        scores = self._mean_over_stages(per_stage)
        return self.tsd_head[-1].predictor.postprocess(boxes, scores, image_sizes)[0]

    def _tsd_stage_boxes(self, boxes) -> None:
        """Called with each TSD stage's refined boxes (per image), in stage order; nothing
        here (the HTC heads keep them for their interleaved mask heads)."""

    def _mean_over_stages(self, per_stage):
        """Per image, the stages' probabilities averaged (detectron2's cascade inference)."""
        return [sum(list(x)) * (1.0 / self.num_cascade_stages) for x in zip(*per_stage)]

    def _stage_prepare(self, proposals) -> Callable[[torch.Tensor], torch.Tensor]:
        """What a TSD stage applies to its pooled features: detectron2's gradient scale of
        1 / stages in training."""
        del proposals
        if not self.training:
            return lambda x: x
        return lambda x: _ScaleGradient.apply(x, 1.0 / self.num_cascade_stages)

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictors"] = [
            LongTailFastRCNNOutputLayers(
                cfg, head.output_shape, box2box_transform=predictor.box2box_transform
            )
            for head, predictor in zip(ret["box_heads"], ret["box_predictors"])
        ]
        return ret

    @torch.no_grad()
    def _match_and_label_boxes(self, proposals, stage, targets):
        proposals = super()._match_and_label_boxes(proposals, stage, targets)
        if self.ignore_boxes is None:
            return proposals
        masks = self._ignore_masks([p.proposal_boxes for p in proposals])
        return [p[~((p.gt_classes == self.num_classes) & m)] for p, m in zip(proposals, masks)]
