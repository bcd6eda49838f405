"""The builder of ``INPUT.AUGMENTATIONS`` (the step registry lives in
:mod:`lvis_longtail.registries`, where the config check can read it)."""

from typing import List

from detectron2.data import transforms as T

from lvis_longtail.registries import LONGTAIL_AUGMENTATION_REGISTRY

__all__ = ["LONGTAIL_AUGMENTATION_REGISTRY", "build_augmentation_steps", "needs_box_recompute"]


def build_augmentation_steps(cfg) -> List:
    """The training steps of ``INPUT.AUGMENTATIONS``, detectron2's ``RandomCrop`` first when
    ``INPUT.CROP.ENABLED`` (as detectron2's ``DatasetMapper`` does) unless listed.

    Raises:
        KeyError: an unknown step name (``setup_cfg`` reports it earlier, with the registered
            names).
    """
    names = list(cfg.INPUT.AUGMENTATIONS)
    if cfg.INPUT.CROP.ENABLED and "RandomCrop" not in names:
        names.insert(0, "RandomCrop")
    steps = []
    for name in names:
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
