"""Load, validate and register any LVIS-format dataset (LVIS v1 itself included).

detectron2's ``load_lvis_json`` only knows metadata for its built-in LVIS names, derives image
paths from ``coco_url`` only, and asserts on malformed records. This loader:

- takes image paths from ``file_name`` (relative to ``image_root``) or, failing that, from the
  last two components of ``coco_url`` (``<image_root>/<split folder>/<file>``, LVIS v1 style);
- validates every record and raises :class:`LVISFormatError` naming the file, the record and
  the field (missing key, unknown category or image, duplicate id, missing image file);
- skips, with a count in the log, what LVIS tolerates: polygons with fewer than 3 points or an
  odd number of coordinates (the polygon is dropped; an annotation left with none is
  skipped) and boxes of zero width or height (the annotation is skipped);
- derives the metadata from the json itself, lazily (on first access, so registering the LVIS
  train split costs nothing until it is used): ``thing_classes``,
  ``thing_dataset_id_to_contiguous_id`` and the class statistics of
  :mod:`lvis_longtail.data.class_stats` — from the categories' ``frequency``,
  ``image_count`` and ``instance_count`` fields when every category has them, otherwise
  recounted from the annotations (frequency from LVIS's thresholds on image_count).
"""

import json
import logging
import os
from collections import Counter
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.structures import BoxMode

from lvis_longtail.data.class_stats import frequency_group

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("id", "height", "width")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "segmentation")
CATEGORY_KEYS = ("id", "name")
DERIVED_METADATA = (
    "thing_classes",
    "thing_dataset_id_to_contiguous_id",
    "class_frequency",
    "class_image_count",
    "class_instance_count",
    "num_annotated_images",
)


class LVISFormatError(ValueError):
    """A record of an LVIS-format json is malformed; the message names file, record, field."""


def _fail(json_file: str, kind: str, record: dict, field: str, problem: str) -> None:
    rid = record.get("id", "?") if isinstance(record, dict) else "?"
    raise LVISFormatError(f"{json_file}: {kind} id={rid}: field '{field}' {problem}")


def read_lvis_json(json_file: str) -> dict:
    """Read an LVIS-format json and check its top-level structure."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"LVIS-format json not found: {json_file}. The bundled synthetic dataset is made by "
            "`python -m lvis_longtail.data.synthetic --out $DETECTRON2_DATASETS/lt_synthetic`; "
            "LVIS v1 goes under $DETECTRON2_DATASETS/lvis (see the README's Data section)."
        )
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise LVISFormatError(f"{json_file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise LVISFormatError(
            f"{json_file}: top level must be an object, not {type(data).__name__}"
        )
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise LVISFormatError(f"{json_file}: top-level field '{key}' missing or not a list")
    if "annotations" in data and not isinstance(data["annotations"], list):
        raise LVISFormatError(f"{json_file}: top-level field 'annotations' is not a list")
    return data


def _check_keys(json_file: str, kind: str, record, keys) -> None:
    if not isinstance(record, dict):
        raise LVISFormatError(f"{json_file}: a {kind} record is not an object: {record!r:.80}")
    for key in keys:
        if key not in record:
            _fail(json_file, kind, record, key, "is missing")


def _categories(json_file: str, data: dict) -> List[dict]:
    cats = data["categories"]
    seen = set()
    for cat in cats:
        _check_keys(json_file, "category", cat, CATEGORY_KEYS)
        if cat["id"] in seen:
            _fail(json_file, "category", cat, "id", "is duplicated")
        seen.add(cat["id"])
    if not cats:
        raise LVISFormatError(f"{json_file}: 'categories' is empty")
    return sorted(cats, key=lambda c: c["id"])


def _image_path(json_file: str, image_root: str, img: dict) -> str:
    if img.get("file_name"):
        return os.path.join(image_root, img["file_name"])
    if img.get("coco_url"):
        split_folder, file_name = img["coco_url"].split("/")[-2:]
        return os.path.join(image_root, split_folder, file_name)
    _fail(json_file, "image", img, "file_name", "is missing (and so is 'coco_url')")


def _clean_segmentation(segm) -> Optional[object]:
    """Keep valid polygons (>= 3 points, even length); pass RLE dicts through."""
    if isinstance(segm, dict):
        return segm if "counts" in segm and "size" in segm else None
    if not isinstance(segm, list):
        return None
    valid = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
    return valid or None


def _annotation(json_file, ann, cat_map, images, skipped: Counter) -> Optional[dict]:
    _check_keys(json_file, "annotation", ann, ANNOTATION_KEYS)
    if ann["category_id"] not in cat_map:
        _fail(
            json_file, "annotation", ann, "category_id", f"{ann['category_id']} is not a category"
        )
    if ann["image_id"] not in images:
        _fail(json_file, "annotation", ann, "image_id", f"{ann['image_id']} is not an image")
    bbox = ann["bbox"]
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
        _fail(json_file, "annotation", ann, "bbox", f"must be [x, y, w, h], got {bbox!r:.60}")
    if bbox[2] <= 0 or bbox[3] <= 0:
        skipped["zero-area box"] += 1
        return None
    segm = _clean_segmentation(ann["segmentation"])
    if segm is None:
        skipped["no valid polygon"] += 1
        return None
    if isinstance(ann["segmentation"], list) and len(segm) < len(ann["segmentation"]):
        skipped["polygon with < 3 points dropped"] += 1
    return {
        "bbox": list(bbox),
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": cat_map[ann["category_id"]],
        "segmentation": segm,
    }


def load_lvis_format_json(json_file: str, image_root: str, check_files: bool = True) -> List[Dict]:
    """Load an LVIS-format json as detectron2 dataset dicts, validating every record.

    Args:
        json_file: path of the json (LVIS v1 schema; ``annotations`` may be absent, as in
            LVIS's test-dev image info).
        image_root: folder the image paths are relative to.
        check_files: raise if an image file does not exist.

    Returns:
        One dict per image with ``file_name, height, width, image_id, annotations,
        neg_category_ids, not_exhaustive_category_ids`` (dataset category ids); annotation
        ``category_id`` is the contiguous 0-based id. Annotations with ``iscrowd: 1`` are
        not GT: their boxes become the record's ``ignore_boxes`` (XYXY_ABS lists; see
        :mod:`lvis_longtail.modeling.ignore_regions`).
    """
    data = read_lvis_json(json_file)
    cats = _categories(json_file, data)
    cat_map = {c["id"]: i for i, c in enumerate(cats)}
    records = {}
    for img in data["images"]:
        _check_keys(json_file, "image", img, IMAGE_KEYS)
        if img["id"] in records:
            _fail(json_file, "image", img, "id", "is duplicated")
        records[img["id"]] = {
            "file_name": _image_path(json_file, image_root, img),
            "height": img["height"],
            "width": img["width"],
            "image_id": img["id"],
            # dataset category ids, as detectron2's load_lvis_json keeps them
            "neg_category_ids": list(img.get("neg_category_ids", [])),
            "not_exhaustive_category_ids": list(img.get("not_exhaustive_category_ids", [])),
            "annotations": [],
        }
    skipped, ann_ids = Counter(), set()
    for ann in data.get("annotations", []):
        obj = _annotation(json_file, ann, cat_map, records, skipped)
        if ann["id"] in ann_ids:
            _fail(json_file, "annotation", ann, "id", "is duplicated")
        ann_ids.add(ann["id"])
        if obj is not None and ann.get("iscrowd", 0):  # crowd: an ignore region, not a GT
            x, y, w, h = obj["bbox"]
            records[ann["image_id"]].setdefault("ignore_boxes", []).append([x, y, x + w, y + h])
        elif obj is not None:
            records[ann["image_id"]]["annotations"].append(obj)
    if skipped:
        logger.warning(f"{json_file}: skipped {dict(skipped)}")
    if check_files:
        _check_image_files(json_file, list(records.values()))
    logger.info(
        f"Loaded {len(records)} images, {len(ann_ids)} annotations, {len(cats)} categories "
        f"from {json_file}"
    )
    return list(records.values())


def _check_image_files(json_file: str, records: List[dict]) -> None:
    missing = [r for r in records if not os.path.isfile(r["file_name"])]
    if missing:
        first = missing[0]
        raise FileNotFoundError(
            f"{json_file}: {len(missing)} of {len(records)} image files are missing, e.g. "
            f"image id={first['image_id']}: field 'file_name' -> {first['file_name']}"
        )


def derive_metadata(json_file: str, data: Optional[dict] = None) -> dict:
    """Metadata of an LVIS-format json: class names, id map and class statistics."""
    data = data if data is not None else read_lvis_json(json_file)
    cats = _categories(json_file, data)
    anns = data.get("annotations", [])
    if all("image_count" in c and "instance_count" in c for c in cats):
        image_count = [int(c["image_count"]) for c in cats]
        instance_count = [int(c["instance_count"]) for c in cats]
    else:
        index = {c["id"]: i for i, c in enumerate(cats)}
        image_sets = [set() for _ in cats]
        instance_count = [0] * len(cats)
        for ann in anns:
            k = index.get(ann.get("category_id"))
            if k is not None:
                image_sets[k].add(ann.get("image_id"))
                instance_count[k] += 1
        image_count = [len(s) for s in image_sets]
    frequency = [c.get("frequency") or frequency_group(n) for c, n in zip(cats, image_count)]
    return {
        "thing_classes": [c["name"] for c in cats],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
        "class_frequency": frequency,
        "class_image_count": image_count,
        "class_instance_count": instance_count,
        "num_annotated_images": len({a.get("image_id") for a in anns}),
    }


class LazyLVISMetadata(Metadata):
    """detectron2 ``Metadata`` whose :data:`DERIVED_METADATA` fields are read from
    ``json_file`` on first access, so registering a large split is free until it is used."""

    def __getattr__(self, key):
        if key in DERIVED_METADATA and "thing_classes" not in self.__dict__:
            self.__dict__.update(derive_metadata(self.__dict__["json_file"]))
            return self.__dict__[key]
        return super().__getattr__(key)


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
    DatasetCatalog.register(name, lambda: load_lvis_format_json(json_file, image_root))
    MetadataCatalog[name] = LazyLVISMetadata(
        name=name,
        json_file=json_file,
        image_root=image_root,
        evaluator_type="lvis",
        **extra_metadata,
    )
