"""The registry of training augmentation steps and the builder of ``INPUT.AUGMENTATIONS``."""

from typing import List

from detectron2.data import transforms as T
from detectron2.utils.registry import Registry

from lvis_longtail.config import ConfigError

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


def build_augmentation_steps(cfg) -> List:
    """The training steps of ``INPUT.AUGMENTATIONS``, detectron2's ``RandomCrop`` first when
    ``INPUT.CROP.ENABLED`` (as detectron2's ``DatasetMapper`` does) unless listed.

    Raises:
        ConfigError: an unknown step name (the message lists the registered ones).
    """
    names = list(cfg.INPUT.AUGMENTATIONS)
    if cfg.INPUT.CROP.ENABLED and "RandomCrop" not in names:
        names.insert(0, "RandomCrop")
    known = sorted(k for k, _ in LONGTAIL_AUGMENTATION_REGISTRY)
    steps = []
    for name in names:
        if name not in known:
            raise ConfigError(f"INPUT.AUGMENTATIONS: unknown step '{name}'; valid: {known}")
        built = LONGTAIL_AUGMENTATION_REGISTRY.get(name)(cfg)
        steps.extend(built if isinstance(built, (list, tuple)) else [built])
    return steps


def needs_box_recompute(step) -> bool:
    """Whether ``step`` makes transformed boxes loose (crop, rotation, multi-image)."""
    if getattr(step, "recompute_boxes", False):
        return True
    if isinstance(step, T.RandomApply):
        return needs_box_recompute(step.aug)
    return isinstance(step, (T.RandomCrop, T.FixedSizeCrop, T.RandomRotation))
