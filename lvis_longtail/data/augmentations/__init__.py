"""Training augmentation steps, built by name from ``INPUT.AUGMENTATIONS``.

Single-image steps: ``ResizeShortestEdge``, ``RandomFlip``, ``RandomCrop`` (detectron2's
pipeline), ``ScaleJitter`` (ResizeScale + fixed-size crop; LSJ and MMDet presets),
``Rotation``, ``InstaBoost``. Multi-image steps: ``Mosaic``, ``CopyPaste``.
"""

from lvis_longtail.data.augmentations import copy_paste, instaboost, mosaic, single  # noqa: F401
from lvis_longtail.data.augmentations.registry import (
    LONGTAIL_AUGMENTATION_REGISTRY,
    build_augmentation_steps,
    needs_box_recompute,
)
from lvis_longtail.data.augmentations.sample import LazySample, Sample, SampleStep

__all__ = [
    "LONGTAIL_AUGMENTATION_REGISTRY",
    "LazySample",
    "Sample",
    "SampleStep",
    "build_augmentation_steps",
    "needs_box_recompute",
]
