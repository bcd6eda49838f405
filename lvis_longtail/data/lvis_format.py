"""Training dicts, metadata and registration of any LVIS-format dataset (LVIS v1 included).

detectron2's ``load_lvis_json`` only knows metadata for its built-in LVIS names, derives image
paths from ``coco_url`` only, and asserts on malformed records. This module builds on the one
validated read of a json (:func:`~.lvis_json.load_validated`, which names file, record and
field of anything malformed) and:

- makes detectron2's standard dataset dicts; image paths come from ``file_name`` (relative to
  ``image_root``) or, failing that, from the last two components of ``coco_url``
  (``<image_root>/<split folder>/<file>``, LVIS v1 style);
- checks the image files (``DATASETS.IMAGE_CHECK``, :func:`set_image_check`), on the first
  process of each machine only: every process of a machine builds the same dicts from the same
  files, and an error in the first one stops the whole job, so the others skip the check
  instead of reading every file again. ``"all"`` (default): every file exists and its
  header's size is the json's ``height`` x ``width`` (EXIF rotations allowed, as detectron2
  applies them; ~10 s for LVIS v1 train from the page cache, far more from network storage);
  ``"sample"``: every file exists (one ``stat`` each) and the headers of
  :data:`SAMPLED_HEADERS` records spread evenly over the dataset match, which still catches a
  wrong image folder or a resized copy of the images; ``"none"``: no check;
- skips, with a count in the log, annotations whose box has zero width or height; carries
  ``iscrowd`` 1 (detectron2's mapper drops crowd annotations);
- ground-truth masks given as RLE (compressed or uncompressed; uncompressed ones are
  compressed by the validation): with ``INPUT.MASK_FORMAT bitmask`` they stay compressed RLEs
  (exact); with the default ``polygon`` they are converted to polygons (the outer contours
  of each connected part; holes are filled), with a count and the advice to set
  ``INPUT.MASK_FORMAT bitmask`` in the log. :func:`register_from_config` takes the format
  from the config (``set_mask_format``);
- derives the metadata from the validated json, lazily (on first access, so registering the
  LVIS train split costs nothing until it is used; a registered dataset whose dicts are built
  first gets its metadata from the same read): ``thing_classes``,
  ``thing_dataset_id_to_contiguous_id`` and the class statistics of
  :mod:`lvis_longtail.data.class_stats` — from the categories' ``frequency``,
  ``image_count`` and ``instance_count`` fields when every category has them, otherwise
  recounted from the annotations (frequency from LVIS's thresholds on image_count).
"""

import logging
import os
from collections import Counter
from typing import Dict, List

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.structures import BoxMode
from detectron2.utils import comm
from pycocotools import mask as mask_utils

from lvis_longtail.data.class_stats import frequency_group
from lvis_longtail.data.lvis_json import (
    LVISFormatError,
    ValidatedLVIS,
    load_validated,
    read_lvis_json,
)
from lvis_longtail.utils.io import gc_paused

logger = logging.getLogger(__name__)

__all__ = [
    "LVISFormatError",
    "derive_metadata",
    "load_lvis_format_json",
    "read_lvis_json",
    "register_lvis_format",
    "set_image_check",
    "set_mask_format",
]

MASK_FORMATS = ("polygon", "bitmask")
_MASK_FORMAT = ["polygon"]
IMAGE_CHECKS = ("all", "sample", "none")
_IMAGE_CHECK = ["all"]
SAMPLED_HEADERS = 1000  # headers read by the "sample" image check
DERIVED_METADATA = (
    "thing_classes",
    "thing_dataset_id_to_contiguous_id",
    "class_frequency",
    "class_image_count",
    "class_instance_count",
    "num_annotated_images",
    "frequency_from_json",
    "has_annotations",
)


def set_mask_format(mask_format: str) -> None:
    """The ``INPUT.MASK_FORMAT`` training dicts are made for (RLE masks become polygons for
    "polygon", stay RLEs for "bitmask"); :func:`register_from_config` sets it."""
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"INPUT.MASK_FORMAT must be one of {MASK_FORMATS}, got {mask_format!r}")
    _MASK_FORMAT[0] = mask_format


def set_image_check(mode: str) -> None:
    """How the image files of LVIS-format datasets are checked when their dicts are built
    (``DATASETS.IMAGE_CHECK``, see the module docstring); :func:`register_from_config` sets
    it."""
    if mode not in IMAGE_CHECKS:
        raise ValueError(f"DATASETS.IMAGE_CHECK must be one of {IMAGE_CHECKS}, got {mode!r}")
    _IMAGE_CHECK[0] = mode


def _image_path(json_file: str, image_root: str, index: int, img: dict) -> str:
    if img.get("file_name"):
        return os.path.join(image_root, img["file_name"])
    url = img.get("coco_url")
    if url and "/" in url:
        split_folder, file_name = url.split("/")[-2:]
        return os.path.join(image_root, split_folder, file_name)
    raise LVISFormatError(
        f"{json_file}: images[{index}] (id={img['id']}): field 'file_name' is missing (and "
        "'coco_url' gives no path)"
    )


def rle_to_polygons(rle: dict) -> List[List[float]]:
    """Polygons (flat ``[x1, y1, ...]`` lists through the centres of the boundary pixels) of
    the outer contours of a compressed RLE mask; parts of 1-2 pixels become their box."""
    mask = np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        pts = contour.reshape(-1, 2).astype(np.float64)
        if len(pts) < 3:
            x0, y0 = pts.min(0)
            x1, y1 = pts.max(0) + 1
            polygons.append([x0, y0, x1, y0, x1, y1, x0, y1])
        else:
            polygons.append((pts + 0.5).ravel().tolist())
    return [[float(v) for v in p] for p in polygons]


def _train_annotation(ann: dict, cat_map: dict, skipped: Counter):
    bbox = ann["bbox"]
    if bbox[2] <= 0 or bbox[3] <= 0:
        skipped["zero-area box"] += 1
        return None
    segm = ann["segmentation"]
    if isinstance(segm, dict) and _MASK_FORMAT[0] == "polygon":
        segm = rle_to_polygons(segm)
        if not segm:
            skipped["empty RLE mask"] += 1
            return None
        skipped["RLE mask converted to polygons"] += 1
    obj = {
        "bbox": bbox,
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": cat_map[ann["category_id"]],
        "segmentation": segm,
    }
    if ann.get("iscrowd", 0):
        obj["iscrowd"] = 1
    return obj


def load_lvis_format_json(json_file: str, image_root: str, check_files: bool = True) -> List[Dict]:
    """Load an LVIS-format json as detectron2 dataset dicts (validated once, see
    :mod:`.lvis_json`).

    Args:
        json_file: path of the json (LVIS v1 schema; ``annotations`` may be absent, as in
            LVIS's test-dev image info).
        image_root: folder the image paths are relative to.
        check_files: check the image files as ``DATASETS.IMAGE_CHECK`` says (on the first
            process of each machine): raise if one is missing or its size is not the json's.

    Returns:
        One dict per image with ``file_name, height, width, image_id, annotations,
        neg_category_ids, not_exhaustive_category_ids`` (dataset category ids); annotation
        ``category_id`` is the contiguous 0-based id. Annotations with ``iscrowd: 1`` are
        not GT: their boxes become the record's ``ignore_boxes`` (XYXY_ABS lists; see
        :mod:`lvis_longtail.modeling.ignore_regions`).
    """
    validated = load_validated(json_file)
    with gc_paused():  # millions of new dicts: no full collections over the parsed json
        return dataset_dicts(validated, image_root, check_files)


def dataset_dicts(validated: ValidatedLVIS, image_root: str, check_files: bool = True):
    """detectron2 dataset dicts of a validated json (see :func:`load_lvis_format_json`)."""
    json_file = validated.path
    cat_map = {c["id"]: i for i, c in enumerate(validated.categories)}
    records = {}
    for index, img in enumerate(validated.images):
        records[img["id"]] = {
            "file_name": _image_path(json_file, image_root, index, img),
            "height": img["height"],
            "width": img["width"],
            "image_id": img["id"],
            # dataset category ids, as detectron2's load_lvis_json keeps them
            "neg_category_ids": img.get("neg_category_ids", []),
            "not_exhaustive_category_ids": img.get("not_exhaustive_category_ids", []),
            "annotations": [],
        }
    skipped = Counter()
    for ann in validated.annotations:
        obj = _train_annotation(ann, cat_map, skipped)
        if obj is not None and obj.get("iscrowd"):  # crowd: an ignore region, not a GT
            x, y, w, h = obj["bbox"]
            records[ann["image_id"]].setdefault("ignore_boxes", []).append([x, y, x + w, y + h])
        elif obj is not None:
            records[ann["image_id"]]["annotations"].append(obj)
    if skipped:
        msg = f"{json_file}: training dicts: {dict(skipped)}"
        if skipped["RLE mask converted to polygons"]:
            msg += " (INPUT.MASK_FORMAT polygon; set INPUT.MASK_FORMAT bitmask for exact masks)"
        logger.warning(msg)
    records = list(records.values())
    if check_files:
        _check_image_files(json_file, records)
    return records


def _header_size(path: str):
    """(width, height) as detectron2 reads the image (EXIF rotation applied)."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        if w != h:
            orientation = im.getexif().get(0x0112, 1)
            if orientation in (5, 6, 7, 8):
                w, h = h, w
    return w, h


def _is_first_local_process() -> bool:
    """Whether this is the first process of its machine (detectron2's local rank 0; a process
    group without detectron2's per-machine group: every process counts as first)."""
    try:
        return comm.get_local_rank() == 0
    except AssertionError:
        return True


def _check_image_files(json_file: str, records: List[dict]) -> None:
    """Check the image files of ``records`` as ``DATASETS.IMAGE_CHECK`` says (module
    docstring); only on the first process of each machine."""
    mode = _IMAGE_CHECK[0]
    if mode == "none" or not records or not _is_first_local_process():
        return
    missing = [r for r in records if not os.path.isfile(r["file_name"])]
    if missing:
        first = missing[0]
        raise FileNotFoundError(
            f"{json_file}: {len(missing)} of {len(records)} image files are missing, e.g. "
            f"image id={first['image_id']}: field 'file_name' -> {first['file_name']}"
        )
    if mode == "sample" and len(records) > SAMPLED_HEADERS:
        spread = np.linspace(0, len(records) - 1, SAMPLED_HEADERS).round().astype(int)
        records = [records[i] for i in spread.tolist()]
    for r in records:
        try:
            w, h = _header_size(r["file_name"])
        except OSError as e:
            raise LVISFormatError(
                f"{json_file}: image id={r['image_id']}: field 'file_name' {r['file_name']} "
                f"is not a readable image ({e})"
            ) from None
        if (w, h) != (r["width"], r["height"]):
            raise LVISFormatError(
                f"{json_file}: image id={r['image_id']}: fields 'height'/'width' "
                f"{r['height']}x{r['width']} disagree with the file {r['file_name']} "
                f"({h}x{w}, height x width)"
            )


def derive_metadata(json_file: str, validated: ValidatedLVIS = None) -> dict:
    """Metadata of an LVIS-format json: class names, id map and class statistics (from the
    categories' fields when every category has them, else recounted from the annotations)."""
    validated = validated if validated is not None else load_validated(json_file)
    cats, anns = validated.categories, validated.annotations
    if all("image_count" in c and "instance_count" in c for c in cats):
        image_count = [int(c["image_count"]) for c in cats]
        instance_count = [int(c["instance_count"]) for c in cats]
    else:
        index = {c["id"]: i for i, c in enumerate(cats)}
        image_sets = [set() for _ in cats]
        instance_count = [0] * len(cats)
        for ann in anns:
            k = index[ann["category_id"]]
            image_sets[k].add(ann["image_id"])
            instance_count[k] += 1
        image_count = [len(s) for s in image_sets]
    frequency = [c.get("frequency") or frequency_group(n) for c, n in zip(cats, image_count)]
    return {
        "thing_classes": [c["name"] for c in cats],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
        "class_frequency": frequency,
        "class_image_count": image_count,
        "class_instance_count": instance_count,
        "num_annotated_images": len({a["image_id"] for a in anns}),
        "frequency_from_json": all("frequency" in c for c in cats),
        "has_annotations": validated.has_annotations,
    }


class LazyLVISMetadata(Metadata):
    """detectron2 ``Metadata`` whose :data:`DERIVED_METADATA` fields are read from
    ``json_file`` on first access, so registering a large split is free until it is used."""

    def __getattr__(self, key):
        if key in DERIVED_METADATA and "thing_classes" not in self.__dict__:
            self.derive_from(load_validated(self.__dict__["json_file"]))
            return self.__dict__[key]
        return super().__getattr__(key)

    def derive_from(self, validated: ValidatedLVIS) -> None:
        """Fill the derived fields from ``validated`` (its json), unless already derived."""
        if "thing_classes" not in self.__dict__:
            self.__dict__.update(derive_metadata(validated.path, validated))


def _registered_dicts(name: str, json_file: str, image_root: str) -> List[Dict]:
    """The dicts of a dataset registered by :func:`register_lvis_format`; its metadata comes
    from the same read if it was not derived yet (no second parse when it is asked for
    later, e.g. by the evaluator, after the parsed json is gone)."""
    validated = load_validated(json_file)
    meta = MetadataCatalog.get(name)
    if isinstance(meta, LazyLVISMetadata):
        meta.derive_from(validated)
    with gc_paused():  # millions of new dicts: no full collections over the parsed json
        return dataset_dicts(validated, image_root)


def register_lvis_format(name: str, json_file: str, image_root: str, **extra_metadata) -> None:
    """Register an LVIS-format dataset under ``name`` with metadata derived from its json.

    Args:
        name: dataset name for ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        json_file: LVIS-format annotation (or image-info) json.
        image_root: folder the image paths are relative to.
        extra_metadata: more metadata fields to set.
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: _registered_dicts(name, json_file, image_root))
    MetadataCatalog[name] = LazyLVISMetadata(
        name=name,
        json_file=json_file,
        image_root=image_root,
        evaluator_type="lvis",
        **extra_metadata,
    )
