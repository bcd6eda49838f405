"""Read and validate an LVIS-format json once; every reader of ground truth uses the result.

:func:`load_validated` parses a json (UTF-8/16/32, byte-order marks allowed) and checks every
record; training dicts (:mod:`.lvis_format`), metadata and class statistics, both evaluator
back-ends and the diagnostics all take its :class:`ValidatedLVIS`, never the raw file, so
nothing malformed reaches detectron2's mapper, pycocotools or lvis-api. A malformed record
raises :class:`LVISFormatError` naming the file, the record (list and index, and its ``id``)
and the field. Checked:

- top level: an object with non-empty ``images`` and ``categories`` lists; ``annotations``
  optional (image-info jsons such as LVIS test-dev have none; an empty list is logged);
- ids (image, category, annotation): integers, unique; references to images and categories
  that exist (``image_id``, ``category_id``, ``neg_category_ids``,
  ``not_exhaustive_category_ids``);
- images: ``height`` and ``width`` positive integers;
- categories: ``name`` a string; ``frequency`` (if present) one of r/c/f; ``image_count`` and
  ``instance_count`` (if present) non-negative integers;
- ``bbox``: 4 finite numbers, ``w, h >= 0``, not far outside its image (more than
  :data:`FAR_OUTSIDE` of a side beyond the border: wrong image size or coordinates in another
  scale);
- ``area`` (filled from the mask when absent) a finite number >= 0; ``iscrowd`` (0 when
  absent) 0 or 1; ``neg_category_ids`` and ``not_exhaustive_category_ids`` (empty when
  absent) lists of category ids;
- ``segmentation``: a list of polygons of finite numbers, not far outside the image, or an
  RLE ``{"size": [h, w], "counts": ...}`` of the image's size whose counts (compressed string
  or uncompressed list) are well formed and sum to ``h * w``. Uncompressed RLEs are converted
  to compressed ones.

Skipped with a count in the log (what LVIS itself tolerates): polygons with fewer than 3
points or an odd number of coordinates (dropped; an annotation left without a polygon is
skipped).

A parsed LVIS train json holds millions of Python objects (3-6 GB at LVIS v1's size), so
nothing keeps it beyond its use: :func:`load_validated` parses the file on every call, except
inside a :func:`shared_reads` block, where each file is parsed once and its result dropped
when the block ends. The trainer builds its model (whose losses read the class statistics
derived from the json) and its data loader in one such block, so both come from one parse,
and afterwards only detectron2's serialized training dicts and the small derived metadata
remain. Evaluation reads its split when it computes the metrics and lets it go after.
"""

import ctypes
import ctypes.util
import logging
import math
import os
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

from pycocotools import mask as mask_utils

from lvis_longtail.utils.io import gc_paused, read_json
from lvis_longtail.utils.rle import decode_rle_string

logger = logging.getLogger(__name__)

FREQUENCIES = ("r", "c", "f")
FAR_OUTSIDE = 0.5  # a coordinate this fraction of the image side beyond the border is an error


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


def _is_int(x) -> bool:
    return type(x) is int


def _is_number(x) -> bool:
    return (type(x) is int or type(x) is float) and math.isfinite(x)


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
        if not _is_int(rid):
            self.fail(kind, index, record, "id", f"must be an integer, got {rid!r:.40}")


def read_lvis_json(json_file: str) -> dict:
    """Parse an LVIS-format json (no record checks; :func:`load_validated` does them)."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"LVIS-format json not found: {json_file}. The bundled synthetic dataset is made by "
            "`python -m lvis_longtail.data.synthetic --out $DETECTRON2_DATASETS/lt_synthetic`; "
            "LVIS v1 goes under $DETECTRON2_DATASETS/lvis (see the README's Data section)."
        )
    return read_json(json_file, LVISFormatError, "LVIS-format json")


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
            if key in cat and not (_is_int(cat[key]) and cat[key] >= 0):
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
            if not (_is_int(img[key]) and img[key] > 0):
                check.fail(
                    "images", i, img, key, f"must be a positive integer, got {img[key]!r:.20}"
                )
        for key in ("file_name", "coco_url"):
            if key in img and not isinstance(img[key], str):
                check.fail("images", i, img, key, f"must be a string, got {img[key]!r:.40}")
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            ids = img.setdefault(key, [])  # absent: none (lvis-api needs the key)
            if not isinstance(ids, list) or not all(map(_is_int, ids)):
                check.fail("images", i, img, key, f"must be a list of integer ids, got {ids!r:.40}")
            unknown = [c for c in ids if c not in cat_ids]
            if unknown:
                check.fail("images", i, img, key, f"has ids that are not categories: {unknown[:5]}")
    return by_id


def _far_outside(lo: float, hi: float, side: int) -> bool:
    return lo < -FAR_OUTSIDE * side or hi > (1 + FAR_OUTSIDE) * side


def _polygons(check: _Checker, i: int, ann: dict, segm: list, h: int, w: int, skipped):
    """The valid polygons of a list segmentation (error on a malformed one)."""
    valid, side = [], min(h, w)
    for j, poly in enumerate(segm):
        if type(poly) is not list:
            check.fail(
                "annotations",
                i,
                ann,
                "segmentation",
                f"polygon {j} is a {type(poly).__name__}, not a list of numbers "
                "(expected [[x1, y1, x2, y2, ...], ...])",
            )
        try:
            total = sum(poly)
        except TypeError:
            bad = next(v for v in poly if type(v) not in (int, float))
            check.fail(
                "annotations",
                i,
                ann,
                "segmentation",
                f"polygon {j} has a non-number coordinate {bad!r:.30}",
            )
        if not math.isfinite(total):
            check.fail(
                "annotations",
                i,
                ann,
                "segmentation",
                f"polygon {j} has a non-finite coordinate (NaN or infinity)",
            )
        if len(poly) < 6 or len(poly) % 2:
            skipped["polygon with < 3 points or odd length dropped"] += 1
            continue
        if min(poly) < -FAR_OUTSIDE * side or max(poly) > (1 + FAR_OUTSIDE) * side:
            xs, ys = poly[0::2], poly[1::2]
            if _far_outside(min(xs), max(xs), w) or _far_outside(min(ys), max(ys), h):
                check.fail(
                    "annotations",
                    i,
                    ann,
                    "segmentation",
                    f"polygon {j} lies far outside its {w}x{h} image (x in [{min(xs):g}, "
                    f"{max(xs):g}], y in [{min(ys):g}, {max(ys):g}]); wrong image size?",
                )
        valid.append(poly)
    return valid


def _rle(check: _Checker, i: int, ann: dict, segm: dict, h: int, w: int) -> dict:
    """A valid compressed RLE (uncompressed ones converted), or an error."""
    size, counts = segm.get("size"), segm.get("counts")
    if size != [h, w] or not all(map(_is_int, size)):
        check.fail(
            "annotations",
            i,
            ann,
            "segmentation",
            f"RLE 'size' {size!r:.30} is not the image's [height, width] [{h}, {w}]",
        )
    if isinstance(counts, str):
        runs = decode_rle_string(counts)
        if runs is None or sum(runs) != h * w:
            check.fail(
                "annotations",
                i,
                ann,
                "segmentation",
                "compressed RLE 'counts' is malformed or does not cover the image's "
                f"{h}x{w} pixels",
            )
        return segm
    if not isinstance(counts, list) or not all(_is_int(c) and c >= 0 for c in counts):
        check.fail(
            "annotations",
            i,
            ann,
            "segmentation",
            "RLE 'counts' must be a compressed string or a list of integers >= 0",
        )
    if sum(counts) != h * w:
        check.fail(
            "annotations",
            i,
            ann,
            "segmentation",
            f"uncompressed RLE 'counts' sum to {sum(counts)}, not {h}x{w} = {h * w}",
        )
    rle = mask_utils.frPyObjects(segm, h, w)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def _bbox(check: _Checker, i: int, ann: dict, h: int, w: int) -> None:
    """Raise the error of a bbox that failed :func:`_annotations`' fast checks."""
    bbox = ann["bbox"]
    if not (type(bbox) is list and len(bbox) == 4 and all(map(_is_number, bbox))):
        check.fail(
            "annotations",
            i,
            ann,
            "bbox",
            f"must be [x, y, w, h] of finite numbers, got {bbox!r:.60}",
        )
    x, y, bw, bh = bbox
    if bw < 0 or bh < 0:
        check.fail("annotations", i, ann, "bbox", f"has a negative width or height: {bbox}")
    if _far_outside(x, x + bw, w) or _far_outside(y, y + bh, h):
        check.fail(
            "annotations",
            i,
            ann,
            "bbox",
            f"{bbox} lies far outside its {w}x{h} image; wrong image size?",
        )


_NUMBER = (int, float)
_ANNOTATION_KEYS = frozenset(("id", "image_id", "category_id", "bbox", "segmentation"))


def _annotations(check: _Checker, anns: list, images: dict, cat_ids: set, skipped) -> list:
    """Validate the annotations (fast checks inline; a failing one is re-checked by the
    helpers, which name the field)."""
    kept, ids, no_area = [], set(), []
    keys, isfinite, lo_f, hi_f = _ANNOTATION_KEYS, math.isfinite, -FAR_OUTSIDE, 1 + FAR_OUTSIDE
    for i, ann in enumerate(anns):
        if type(ann) is not dict or not ann.keys() >= keys or type(ann["id"]) is not int:
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
            _bbox(check, i, ann, h, w)
        segm = ann["segmentation"]
        if type(segm) is list:
            valid = _polygons(check, i, ann, segm, h, w, skipped)
            if not valid:
                skipped["annotation without a valid polygon"] += 1
                continue
            if len(valid) < len(segm):
                ann["segmentation"] = valid
        elif isinstance(segm, dict):
            ann["segmentation"] = _rle(check, i, ann, segm, h, w)
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
    return kept


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


_CACHE: Dict[tuple, ValidatedLVIS] = {}  # filled only while a shared_reads() block is open
_OPEN_BLOCKS = [0]
_LOCK = threading.Lock()


def _cache_key(json_file: str) -> tuple:
    st = os.stat(json_file)
    return os.path.realpath(json_file), st.st_size, st.st_mtime_ns


@contextmanager
def shared_reads() -> Iterator[None]:
    """A block in which :func:`load_validated` parses each json once and returns the same
    result to every reader; when the outermost block ends the results are dropped (and freed
    once their readers let go). Blocks may nest."""
    with _LOCK:
        _OPEN_BLOCKS[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _OPEN_BLOCKS[0] -= 1
            last = _OPEN_BLOCKS[0] == 0
            if last:
                _CACHE.clear()
        if last:
            release_freed_memory()


def release_freed_memory() -> None:
    """Hand the heap pages of freed objects back to the OS (glibc's ``malloc_trim``; a no-op
    elsewhere). Freeing a parsed json's millions of objects leaves many of its pages with the
    allocator, counted in the process's RSS and shared by every data worker forked later
    (which copies the pages it writes to). At LVIS v1 train's size this takes the RSS left
    above the imports after the loader is built from ~1.5 GB to ~0.66 GB
    (``benchmarks/lvis_scale.py``)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def load_validated(json_file: str) -> ValidatedLVIS:
    """Parse and validate an LVIS-format json; inside a :func:`shared_reads` block, the result
    of the block's first call for this file (same path, size and modification time).

    Raises:
        FileNotFoundError: no such file (the message says how to make the synthetic data).
        LVISFormatError: malformed file or record (file, record and field named).
    """
    if not os.path.isfile(json_file):
        read_lvis_json(json_file)  # raises the explanatory FileNotFoundError
    key = _cache_key(json_file)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    start = time.perf_counter()
    data = read_lvis_json(json_file)
    with gc_paused():
        validated = validate_lvis_dict(data, json_file)
    logger.info(
        f"Read and validated {json_file} in {time.perf_counter() - start:.1f} s: "
        f"{len(validated.images)} images, {len(validated.annotations)} annotations, "
        f"{len(validated.categories)} categories."
    )
    with _LOCK:
        if _OPEN_BLOCKS[0]:
            _CACHE[key] = validated
    return validated


def clear_cache() -> None:
    """Drop what the open :func:`shared_reads` blocks hold (their later reads parse again)."""
    with _LOCK:
        _CACHE.clear()
