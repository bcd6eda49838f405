"""Datasets of lvis_longtail. Importing this module registers the built-in dataset names and
the training augmentation steps."""

from lvis_longtail.data import augmentations  # noqa: F401  (registers the steps)
from lvis_longtail.data.builtin import register_builtin, register_from_config
from lvis_longtail.data.class_stats import ClassStats, get_class_stats
from lvis_longtail.data.lvis_format import (
    LVISFormatError,
    load_lvis_format_json,
    register_lvis_format,
    set_image_check,
    set_mask_format,
)
from lvis_longtail.data.lvis_json import ValidatedLVIS, load_validated, shared_reads

register_builtin()

__all__ = [
    "ClassStats",
    "LVISFormatError",
    "ValidatedLVIS",
    "get_class_stats",
    "load_lvis_format_json",
    "load_validated",
    "register_builtin",
    "register_from_config",
    "register_lvis_format",
    "set_image_check",
    "set_mask_format",
    "shared_reads",
]
