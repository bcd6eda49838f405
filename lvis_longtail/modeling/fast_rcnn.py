"""Box predictor of lvis_longtail: detectron2's FastRCNNOutputLayers with a pluggable
classification loss (``CLS_LOSS_REGISTRY``) and classifier layer (Linear / NormedLinear)."""

from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Instances
from torch import nn
from torch.nn import functional as F

from lvis_longtail.config_check import ENUMS
from lvis_longtail.modeling.cls_losses import (
    ClassificationLoss,
    ClassLogitCalibration,
    build_cls_calibration,
    build_cls_loss,
)
from lvis_longtail.modeling.postprocessing import SoftNMSParams, longtail_fast_rcnn_inference

__all__ = ["LongTailFastRCNNOutputLayers", "NormedLinear", "build_classifier"]


class NormedLinear(nn.Linear):
    """Cosine classifier: z = scale * <x / (|x| + 1e-6), W_k / (|W_k| + 1e-6)> + b_k
    (mmdetection ``NormedLinear`` as used by Seesaw Loss). W ~ N(0, 0.01), b = 0."""

    def __init__(self, in_features: int, out_features: int, scale: float = 20.0, eps: float = 1e-6):
        super().__init__(in_features, out_features, bias=True)
        self.scale, self.eps = scale, eps
        nn.init.normal_(self.weight, std=0.01)
        nn.init.constant_(self.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / (x.norm(dim=1, keepdim=True) + self.eps)
        weight = self.weight / (self.weight.norm(dim=1, keepdim=True) + self.eps)
        return F.linear(self.scale * x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"


def build_classifier(
    name: str, in_features: int, num_logits: int, scale: float = 20.0
) -> nn.Linear:
    """The classifier layer ``MODEL.ROI_BOX_HEAD.PREDICTOR_TYPE``: "Linear" (detectron2's
    init: W ~ N(0, 0.01), b = 0) or "NormedLinear" (cosine, scale ``NORMED_SCALE``)."""
    if name == "Linear":
        layer = nn.Linear(in_features, num_logits)
        nn.init.normal_(layer.weight, std=0.01)
        nn.init.constant_(layer.bias, 0.0)
        return layer
    if name == "NormedLinear":
        return NormedLinear(in_features, num_logits, scale)
    valid = ENUMS["MODEL.ROI_BOX_HEAD.PREDICTOR_TYPE"]
    raise ValueError(f"classifier type {name!r} is not one of {valid}")


class LongTailFastRCNNOutputLayers(FastRCNNOutputLayers):
    """Identical to detectron2's ``FastRCNNOutputLayers``, except that a
    :class:`~lvis_longtail.modeling.cls_losses.ClassificationLoss` (``self.cls_loss``) owns
    classification:

    - ``cls_score`` has ``cls_loss.num_logits`` outputs (not always K+1), is a ``Linear`` or
      ``NormedLinear`` layer, and its bias is initialised by the loss (sigmoid priors);
    - :meth:`losses` returns the loss's terms (``loss_cls`` and extra ones such as
      ``loss_cls_objectness``), each scaled by ``loss_weight["loss_cls"]``
      (``CLS_LOSS_WEIGHT``), and logs accuracy the loss's way; ``loss_box_reg`` is
      detectron2's;
    - :meth:`predict_probs` returns the loss's ``[K class scores, background]`` (R, K+1), so
      :meth:`inference` (detectron2's ``fast_rcnn_inference``) works for every layout; with
      ``TEST.CLS_CALIBRATION`` (NorCal, post-hoc logit adjustment) the logits are calibrated
      first (``self.calibration``).

    Box regression (class-specific or agnostic) is unchanged. :meth:`class_logits` is the
    classification alone (TSD classifies and regresses from different features). The loss
    module's buffers (Seesaw's counts, EQLv2's gradient statistics) are part of this module's
    state_dict.
    """

    # prefix of the accuracy scalars this predictor logs
    log_prefix = "fast_rcnn"

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        cls_loss: ClassificationLoss,
        cls_predictor: str = "Linear",
        normed_scale: float = 20.0,
        calibration: Optional[ClassLogitCalibration] = None,
        nms_type: str = "hard",
        soft_nms: SoftNMSParams = SoftNMSParams(),
        **kwargs,
    ):
        """
        Args:
            input_shape, kwargs: as for ``FastRCNNOutputLayers``.
            cls_loss: classification loss for ``num_classes`` classes.
            cls_predictor: "Linear" or "NormedLinear".
            normed_scale: scale of the NormedLinear classifier.
            calibration: post-hoc calibration of the logits at inference, or None.
            nms_type: "hard", "soft_linear" or "soft_gaussian" (``MODEL.ROI_HEADS.NMS_TYPE``).
            soft_nms: Soft-NMS parameters (``MODEL.ROI_HEADS.SOFT_NMS``).
        """
        super().__init__(input_shape, **kwargs)
        if cls_loss.num_classes != self.num_classes:
            raise ValueError(
                f"cls_loss is for {cls_loss.num_classes} classes, not {self.num_classes}"
            )
        self.cls_loss = cls_loss
        self.cls_score = build_classifier(
            cls_predictor, self.cls_score.in_features, cls_loss.num_logits, normed_scale
        )
        cls_loss.init_bias(self.cls_score.bias)
        self.calibration = calibration
        self.nms_type, self.soft_nms = nms_type, soft_nms

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        head = cfg.MODEL.ROI_BOX_HEAD
        ret["cls_loss"] = build_cls_loss(cfg, ret["num_classes"])
        ret["calibration"] = build_cls_calibration(cfg, ret["cls_loss"])
        ret["cls_predictor"] = head.PREDICTOR_TYPE
        ret["normed_scale"] = head.NORMED_SCALE
        ret["loss_weight"] = {**ret["loss_weight"], "loss_cls": head.CLS_LOSS_WEIGHT}
        ret["nms_type"] = cfg.MODEL.ROI_HEADS.NMS_TYPE
        ret["soft_nms"] = SoftNMSParams.from_config(cfg.MODEL.ROI_HEADS.SOFT_NMS, "gaussian")
        return ret

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(R, D) features -> (R, L) classification logits (``forward``'s first output)."""
        return self.cls_score(x.flatten(1))

    def inference(self, predictions, proposals: List[Instances]):
        """detectron2's inference, with the NMS step of ``self.nms_type`` (see
        :func:`~lvis_longtail.modeling.postprocessing.longtail_fast_rcnn_inference`)."""
        boxes = self.predict_boxes(predictions, proposals)
        scores = self.predict_probs(predictions, proposals)
        return self.postprocess(boxes, scores, [x.image_size for x in proposals])

    def postprocess(self, boxes, scores, image_shapes):
        """Per-image (Ri, K*4 or 4) boxes and (Ri, K+1) scores -> (instances, kept rows), as
        detectron2's ``fast_rcnn_inference`` with this predictor's thresholds and NMS type
        (ROI heads that merge several predictors, e.g. cascades, call this)."""
        return longtail_fast_rcnn_inference(
            boxes,
            scores,
            image_shapes,
            self.test_score_thresh,
            self.test_nms_thresh,
            self.test_topk_per_image,
            self.nms_type,
            self.soft_nms,
        )

    def losses(self, predictions, proposals: List[Instances]) -> Dict[str, torch.Tensor]:
        """Same inputs and box regression loss as the parent; classification terms come from
        ``self.cls_loss``."""
        scores, proposal_deltas = predictions
        if len(proposals):
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            assert not proposal_boxes.requires_grad, "Proposals should not require gradients!"
            # Proposals without gt_boxes are all background: their boxes are placeholders.
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals],
                dim=0,
            )
        else:
            gt_classes = torch.empty(0, dtype=torch.long, device=scores.device)
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=proposal_deltas.device)
        self.cls_loss.log_accuracy(scores, gt_classes, self.log_prefix)

        cls_weight = self.loss_weight.get("loss_cls", 1.0)
        losses = {
            name: loss * cls_weight for name, loss in self.cls_loss(scores, gt_classes).items()
        }
        loss_box_reg = self.box_reg_loss(proposal_boxes, gt_boxes, proposal_deltas, gt_classes)
        losses["loss_box_reg"] = loss_box_reg * self.loss_weight.get("loss_box_reg", 1.0)
        return losses

    def predict_probs(
        self, predictions: Tuple[torch.Tensor, torch.Tensor], proposals: List[Instances]
    ) -> Tuple[torch.Tensor, ...]:
        """Per image (Ri, K+1) scores from ``self.cls_loss.predict_probs``, of the calibrated
        logits when ``self.calibration`` is set."""
        scores, _ = predictions
        if self.calibration is not None:
            scores = self.calibration(scores)
        num_inst_per_image = [len(p) for p in proposals]
        return self.cls_loss.predict_probs(scores).split(num_inst_per_image, dim=0)
