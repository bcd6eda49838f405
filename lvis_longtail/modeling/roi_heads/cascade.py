"""LongTailCascadeROIHeads: detectron2's Cascade R-CNN with the long-tail box predictor at
every stage and :class:`LongTailROIHeads`'s mask branch."""

import torch
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import CascadeROIHeads

from lvis_longtail.modeling.fast_rcnn import LongTailFastRCNNOutputLayers
from lvis_longtail.modeling.roi_heads.standard import LongTailROIHeads


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
    """

    def _forward_box(self, features, proposals, targets=None):
        """Training: detectron2's. Inference: detectron2's stage loop and probability average,
        then the last predictor's ``postprocess`` instead of ``fast_rcnn_inference``."""
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
        scores = [
            sum(list(per_image)) * (1.0 / self.num_cascade_stages)
            for per_image in zip(*scores_per_stage)
        ]
        pred_instances, _ = predictor.postprocess(prev_pred_boxes, scores, image_sizes)
        return pred_instances

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
