"""Cascade R-CNN ROI heads with lvis_longtail's box predictor at every stage."""

from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import CascadeROIHeads

from lvis_longtail.modeling.fast_rcnn import LongTailFastRCNNOutputLayers
from lvis_longtail.modeling.roi_heads import LongTailROIHeads


@ROI_HEADS_REGISTRY.register()
class LongTailCascadeROIHeads(CascadeROIHeads, LongTailROIHeads):
    """Identical to detectron2's ``CascadeROIHeads``, except that each stage's box predictor
    is a :class:`LongTailFastRCNNOutputLayers` (with that stage's box2box weights, and its own
    classification loss and loss state), so ``CLS_LOSS_NAME`` and ``CLS_PREDICTOR`` apply to
    every stage, and that the mask branch is :class:`LongTailROIHeads`'s (area-ratio level
    assignment, Mask Scoring, ``DiceBCEMaskHead`` options): the method resolution order
    ``CascadeROIHeads`` → ``LongTailROIHeads`` → ``StandardROIHeads`` takes the box branch from
    the cascade and the mask branch from ``LongTailROIHeads``.

    At inference detectron2 averages the stages' *probabilities* (each stage's loss turns its
    logits into [K scores, background] first); mmdetection averages logits and applies the
    activation once. Like the parent, class-agnostic box regression is required.
    """

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
