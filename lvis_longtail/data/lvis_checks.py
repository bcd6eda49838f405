"""The checks of an LVIS-format json: :func:`validate_lvis_dict` validates a parsed json
record by record (and cleans it) into a :class:`ValidatedLVIS`; a malformed record raises
:class:`LVISFormatError` naming the file, the record (list and index, and its ``id``) and the
field. Checked:

- top level: an object with non-empty ``images`` and ``categories`` lists; ``annotations``
  optional (image-info jsons such as LVIS test-dev have none; an empty list is logged);
- ids (image, category, annotation): integers that fit in 64 bits, unique; references to
  images and categories that exist (``image_id``, ``category_id``, ``neg_category_ids``,
  ``not_exhaustive_category_ids``);
- images: ``height`` and ``width`` positive integers (64 bits);
- categories: ``name`` a string; ``frequency`` (if present) one of r/c/f; ``image_count`` and
  ``instance_count`` (if present) non-negative integers;
- ``bbox``: 4 finite numbers, ``w, h >= 0``, not far outside its image (more than
  :data:`~.lvis_geometry_checks.FAR_OUTSIDE` of a side beyond the border: wrong image size
  or coordinates in another scale);
- ``area`` (filled from the mask when absent) a finite number >= 0; ``iscrowd`` (0 when
  absent) 0 or 1; ``neg_category_ids`` and ``not_exhaustive_category_ids`` (empty when
  absent) lists of category ids;
- ``segmentation``: a list of polygons of finite numbers (not bools), not far outside the
  image, or an RLE ``{"size": [h, w], "counts": ...}`` of the image's size whose counts
  (compressed string or uncompressed list) are well formed and sum to ``h * w``.
  Uncompressed RLEs are converted to compressed ones.

Skipped with a count in the log (what LVIS itself tolerates): polygons with fewer than 3
points or an odd number of coordinates (dropped; an annotation left without a polygon is
skipped). If that leaves none of a non-empty ``annotations`` list (box-only data with
``"segmentation": []``), it is an error: the boxes would be dropped too, whatever
``MODEL.MASK_ON``. Warned (with the pairs, not an error): a category both annotated on an image
and in its ``neg_category_ids``.
"""

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional

from pycocotools import mask as mask_utils

from lvis_longtail.data.lvis_geometry_checks import (
    FAR_OUTSIDE,
    check_bbox,
    check_polygons,
    check_rle,
    is_int,
    is_int64,
)

logger = logging.getLogger(__name__)

FREQUENCIES = ("r", "c", "f")


class LVISFormatError(ValueError):
    """A record of an LVIS-format json is malformed; the message names file, record, field."""


@dataclass
class ValidatedLVIS:
    """An LVIS-format json after :func:`load_validated`.

    Attributes:
        path: the json file (or the name given to :func:`validate_lvis_dict`).
        dataset: the LVIS-format dict every evaluator takes: ``images``, ``categories``
            (sorted by id), ``annotations`` (the valid ones, polygons cleaned, ``area``
            filled; uncompressed RLEs compressed) and the json's other top-level keys.
        has_annotations: the json has a non-empty ``annotations`` list (else: image info
            only, e.g. a test-dev split; evaluation only exports).
        skipped: ``{reason: count}`` of what was dropped.
    """

    path: str
    dataset: dict
    has_annotations: bool
    skipped: Counter = field(default_factory=Counter)

    @property
    def images(self) -> List[dict]:
        return self.dataset["images"]

    @property
    def categories(self) -> List[dict]:
        return self.dataset["categories"]

    @property
    def annotations(self) -> List[dict]:
        return self.dataset["annotations"]


class _Checker:
    """Raises :class:`LVISFormatError` with the file, the record and the field named."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, kind: str, index: int, record, field_name: Optional[str], problem: str):
        rid = record.get("id", "?") if isinstance(record, dict) else "?"
        where = f"{kind}[{index}] (id={rid!r:.40})"
        if field_name:
            where += f": field '{field_name}'"
        raise LVISFormatError(f"{self.source}: {where} {problem}")

    def record(self, kind: str, index: int, record, keys) -> None:
        if not isinstance(record, dict):
            raise LVISFormatError(
                f"{self.source}: {kind}[{index}] is a {type(record).__name__}, not an object: "
                f"{record!r:.60}"
            )
        for key in keys:
            if key not in record:
                self.fail(kind, index, record, key, "is missing")
        rid = record["id"]
        if not is_int(rid):
            self.fail(kind, index, record, "id", f"must be an integer, got {rid!r:.40}")
        if not is_int64(rid):
            self.fail(kind, index, record, "id", f"must fit in 64 bits, got {rid}")


def _top_level(check: _Checker, data) -> None:
    if not isinstance(data, dict):
        raise LVISFormatError(
            f"{check.source}: top level must be an object, not {type(data).__name__}"
        )
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise LVISFormatError(f"{check.source}: top-level field '{key}' missing or not a list")
        if not data[key]:
            raise LVISFormatError(f"{check.source}: top-level field '{key}' is empty")
    if "annotations" in data and not isinstance(data["annotations"], list):
        raise LVISFormatError(f"{check.source}: top-level field 'annotations' is not a list")


def _categories(check: _Checker, cats: list) -> list:
    seen = set()
    for i, cat in enumerate(cats):
        check.record("categories", i, cat, ("id", "name"))
        if cat["id"] in seen:
            check.fail("categories", i, cat, "id", "is duplicated")
        seen.add(cat["id"])
        if not isinstance(cat["name"], str):
            check.fail("categories", i, cat, "name", f"must be a string, got {cat['name']!r:.40}")
        if "frequency" in cat and cat["frequency"] not in FREQUENCIES:
            check.fail(
                "categories",
                i,
                cat,
                "frequency",
                f"must be 'r', 'c' or 'f', got {cat['frequency']!r:.20}",
            )
        for key in ("image_count", "instance_count"):
            if key in cat and not (is_int(cat[key]) and cat[key] >= 0):
                check.fail(
                    "categories", i, cat, key, f"must be an integer >= 0, got {cat[key]!r:.20}"
                )
    _warn_duplicate_names(check.source, cats)
    return sorted(cats, key=lambda c: c["id"])


def _warn_duplicate_names(source: str, cats: list) -> None:
    """Warn about category names (case and surrounding spaces ignored) shared by several ids:
    legal, but class names in logs, tables and visualisations cannot tell them apart."""
    ids = {}
    for cat in cats:
        ids.setdefault(cat["name"].strip().casefold(), []).append(cat["id"])
    shared = {name: sorted(i) for name, i in sorted(ids.items()) if len(i) > 1}
    if shared:
        listed = "; ".join(f"{name!r}: ids {i}" for name, i in list(shared.items())[:20])
        logger.warning(
            f"{source}: {len(shared)} category names are used by several categories "
            f"(their classes are told apart by id only): {listed}"
        )


def _images(check: _Checker, images: list, cat_ids: set) -> dict:
    by_id = {}
    for i, img in enumerate(images):
        check.record("images", i, img, ("id", "height", "width"))
        if img["id"] in by_id:
            check.fail("images", i, img, "id", "is duplicated")
        by_id[img["id"]] = img
        for key in ("height", "width"):
            if not (is_int64(img[key]) and img[key] > 0):
                check.fail(
                    "images", i, img, key, f"must be a positive integer, got {img[key]!r:.20}"
                )
        for key in ("file_name", "coco_url"):
            if key in img and not isinstance(img[key], str):
                check.fail("images", i, img, key, f"must be a string, got {img[key]!r:.40}")
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            ids = img.setdefault(key, [])  # absent: none (lvis-api needs the key)
            if not isinstance(ids, list) or not all(map(is_int, ids)):
                check.fail("images", i, img, key, f"must be a list of integer ids, got {ids!r:.40}")
            unknown = [c for c in ids if c not in cat_ids]
            if unknown:
                check.fail("images", i, img, key, f"has ids that are not categories: {unknown[:5]}")
    return by_id


_NUMBER = (int, float)
_ANNOTATION_KEYS = frozenset(("id", "image_id", "category_id", "bbox", "segmentation"))


def _annotations(check: _Checker, anns: list, images: dict, cat_ids: set, skipped) -> list:
    """Validate the annotations (fast checks inline; a failing one is re-checked by the
    helpers, which name the field)."""
    kept, ids, no_area = [], set(), []
    keys, isfinite, lo_f, hi_f = _ANNOTATION_KEYS, math.isfinite, -FAR_OUTSIDE, 1 + FAR_OUTSIDE
    for i, ann in enumerate(anns):
        if type(ann) is not dict or not ann.keys() >= keys or not is_int64(ann["id"]):
            check.record("annotations", i, ann, keys)
        if ann["id"] in ids:
            check.fail("annotations", i, ann, "id", "is duplicated")
        ids.add(ann["id"])
        image_id, cat = ann["image_id"], ann["category_id"]
        img = images.get(image_id) if type(image_id) is int else None
        if img is None:
            check.fail("annotations", i, ann, "image_id", f"{image_id!r:.30} is not an image id")
        if type(cat) is not int or cat not in cat_ids:
            check.fail("annotations", i, ann, "category_id", f"{cat!r:.30} is not a category id")
        h, w = img["height"], img["width"]
        bbox = ann["bbox"]
        try:
            x, y, bw, bh = bbox
            ok = (
                type(bbox) is list
                and type(x) in _NUMBER
                and type(y) in _NUMBER
                and type(bw) in _NUMBER
                and type(bh) in _NUMBER
                and isfinite(x + y + bw + bh)
                and bw >= 0
                and bh >= 0
                and lo_f * w <= x
                and x + bw <= hi_f * w
                and lo_f * h <= y
                and y + bh <= hi_f * h
            )
        except (TypeError, ValueError):
            ok = False
        if not ok:
            check_bbox(check, i, ann, h, w)
        segm = ann["segmentation"]
        if type(segm) is list:
            valid = check_polygons(check, i, ann, segm, h, w, skipped)
            if not valid:
                skipped["annotation without a valid polygon"] += 1
                continue
            if len(valid) < len(segm):
                ann["segmentation"] = valid
        elif isinstance(segm, dict):
            ann["segmentation"] = check_rle(check, i, ann, segm, h, w)
        else:
            check.fail(
                "annotations", i, ann, "segmentation",
                f"must be a list of polygons or an RLE object, got {type(segm).__name__}",
            )  # fmt: skip
        area = ann.get("area")
        if area is None and "area" not in ann:
            no_area.append(ann)
        elif not (type(area) in _NUMBER and isfinite(area) and area >= 0):
            check.fail(
                "annotations", i, ann, "area", f"must be a finite number >= 0, got {area!r:.20}"
            )
        crowd = ann.get("iscrowd", 0)
        if type(crowd) not in (int, bool) or crowd not in (0, 1):
            check.fail("annotations", i, ann, "iscrowd", f"must be 0 or 1, got {crowd!r:.20}")
        kept.append(ann)
    _fill_areas(no_area, images)
    if anns and not kept:
        raise LVISFormatError(
            f"{check.source}: all {len(anns)} annotations lack a valid polygon (e.g. "
            "'segmentation': [], as box-only detections or pseudo labels of a model without "
            "masks are written), so none is left to train or evaluate on. Give each "
            "annotation a polygon or an RLE mask, or use the file for its boxes only as "
            "DATASETS.IGNORE_BOXES"
        )
    _warn_negative_and_annotated(check.source, kept, images)
    return kept


def _warn_negative_and_annotated(source: str, anns: list, images: dict) -> None:
    """Warn about categories in an image's ``neg_category_ids`` (verified absent) that are
    also annotated on it: a contradiction that misleads the federated losses and evaluation."""
    annotated = {(a["image_id"], a["category_id"]) for a in anns}
    both = sorted(
        {
            (i, c)
            for i, img in images.items()
            for c in img["neg_category_ids"]
            if (i, c) in annotated
        }
    )
    if both:
        listed = ", ".join(f"image {i} category {c}" for i, c in both[:10])
        logger.warning(
            f"{source}: {len(both)} (image, category) pairs are both annotated and listed in "
            f"the image's 'neg_category_ids' (verified absent): {listed}"
            + (", ..." if len(both) > 10 else "")
        )


def _fill_areas(anns: list, images: dict) -> None:
    """``area`` of annotations without one: the mask's pixel count (as LVIS defines it)."""
    for ann in anns:
        img = images[ann["image_id"]]
        segm = ann["segmentation"]
        if isinstance(segm, list):
            segm = mask_utils.merge(mask_utils.frPyObjects(segm, img["height"], img["width"]))
        ann["area"] = float(mask_utils.area(segm))


def validate_lvis_dict(data, source: str) -> ValidatedLVIS:
    """Validate a parsed LVIS-format json (modified in place: cleaned, areas filled).

    Raises:
        LVISFormatError: names ``source``, the record and the field.
    """
    check = _Checker(source)
    _top_level(check, data)
    cats = _categories(check, data["categories"])
    cat_ids = {c["id"] for c in cats}
    images = _images(check, data["images"], cat_ids)
    skipped = Counter()
    has_annotations = bool(data.get("annotations"))
    if "annotations" in data and not data["annotations"]:
        logger.warning(f"{source}: 'annotations' is empty; treated as image info only")
    anns = _annotations(check, data.get("annotations") or [], images, cat_ids, skipped)
    if skipped:
        logger.warning(f"{source}: skipped {dict(skipped)}")
    dataset = dict(data, categories=cats, annotations=anns)
    return ValidatedLVIS(source, dataset, has_annotations, skipped)
