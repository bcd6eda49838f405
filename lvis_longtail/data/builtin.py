"""Dataset names registered by lvis_longtail, under ``$DETECTRON2_DATASETS`` (default
``./datasets``), the same root detectron2 uses:

- ``lt_synthetic_{train,val,test_dev[,unlabeled]}``: the bundled synthetic long-tailed dataset,
  made by
  ``python -m lvis_longtail.data.synthetic --out $DETECTRON2_DATASETS/lt_synthetic``;
- ``lvis_v1_{train,val,test_dev,test_challenge}``: LVIS v1 (``lvis/lvis_v1_*.json`` with the
  COCO 2017 images under ``coco/``), re-registered with the validating loader of
  :mod:`lvis_longtail.data.lvis_format` so their metadata carries the class statistics;
- whatever ``DATASETS.LVIS_FORMAT`` lists, via :func:`register_from_config`.
"""

import os

from lvis_longtail.data.lvis_format import register_lvis_format, set_image_check, set_mask_format

SYNTHETIC_SPLITS = ("train", "val", "test_dev")

LVIS_V1 = {
    "lvis_v1_train": ("coco/", "lvis/lvis_v1_train.json"),
    "lvis_v1_val": ("coco/", "lvis/lvis_v1_val.json"),
    "lvis_v1_test_dev": ("coco/", "lvis/lvis_v1_image_info_test_dev.json"),
    "lvis_v1_test_challenge": ("coco/", "lvis/lvis_v1_image_info_test_challenge.json"),
}


def datasets_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def register_synthetic(root: str, prefix: str = "lt_synthetic") -> None:
    """Register the synthetic splits written by :mod:`lvis_longtail.data.synthetic` at ``root``."""
    for split in SYNTHETIC_SPLITS + ("unlabeled",):  # unlabeled: --num-unlabeled only
        json_file = os.path.join(root, "annotations", f"lt_synthetic_{split}.json")
        register_lvis_format(f"{prefix}_{split}", json_file, os.path.join(root, "images"))


def register_builtin(root: str = None) -> None:
    """Register the synthetic dataset and LVIS v1 under ``root`` (``$DETECTRON2_DATASETS``)."""
    root = root or datasets_root()
    register_synthetic(os.path.join(root, "lt_synthetic"))
    for name, (image_root, json_file) in LVIS_V1.items():
        register_lvis_format(name, os.path.join(root, json_file), os.path.join(root, image_root))


def register_from_config(cfg) -> None:
    """Register each ``[name, json_file, image_root]`` of ``cfg.DATASETS.LVIS_FORMAT``; RLE
    ground-truth masks of every LVIS-format dataset follow ``cfg.INPUT.MASK_FORMAT``, its
    image files are checked as ``cfg.DATASETS.IMAGE_CHECK`` says."""
    set_mask_format(cfg.INPUT.MASK_FORMAT)
    set_image_check(cfg.DATASETS.IMAGE_CHECK)
    for entry in cfg.DATASETS.LVIS_FORMAT:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise ValueError(
                f"DATASETS.LVIS_FORMAT entries must be [name, json_file, image_root], got {entry!r}"
            )
        register_lvis_format(*entry)
