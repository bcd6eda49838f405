"""The registries of lvis_longtail's own pluggable kinds, in the package's lowest layer.

They live here, not next to their builders, so that :mod:`lvis_longtail.config_check` can
read the registered names without importing ``modeling`` or ``data`` (which sit above it):
the losses and augmentation steps register themselves when ``import lvis_longtail`` imports
those packages, and the check reads the registries when it runs.
"""

from detectron2.utils.registry import Registry

__all__ = ["CLS_LOSS_REGISTRY", "LONGTAIL_AUGMENTATION_REGISTRY"]

CLS_LOSS_REGISTRY = Registry("CLS_LOSS")
CLS_LOSS_REGISTRY.__doc__ = """
Registry for the classification losses of the box predictor, selected by
``MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME``.

The registered object is called as ``obj(cfg, num_classes)`` and must return a
:class:`lvis_longtail.modeling.cls_losses.ClassificationLoss` for ``num_classes`` foreground
classes; it decides the classifier's number of logits, bias initialisation, loss terms,
inference probabilities and accuracy logging.
"""

LONGTAIL_AUGMENTATION_REGISTRY = Registry("LONGTAIL_AUGMENTATION")
LONGTAIL_AUGMENTATION_REGISTRY.__doc__ = """
Builders of the training augmentation steps named in ``INPUT.AUGMENTATIONS``.

A builder is registered under the step's name and called as ``builder(cfg) -> step | list of
steps``, reading its parameters from its own config sub-node (e.g. ``INPUT.ROTATION``). A step
is either a detectron2 ``T.Augmentation`` (image-level geometry, applied to the image, the
masks, the boxes and the ignore boxes through its transforms) or a
:class:`~lvis_longtail.data.augmentations.sample.SampleStep` (works on whole samples;
``num_extra > 0`` makes it a multi-image step that draws that many extra images from the
training sampler). A step that changes geometry so that transformed boxes are no longer tight
sets ``recompute_boxes = True`` on itself (boxes are then recomputed from the masks).
"""
