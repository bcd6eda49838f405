"""LVIS results records checked against their split.

A *record* is one detection in the LVIS results format, in original image coordinates::

    {"image_id": int, "category_id": int (the dataset's own id), "score": float,
     "bbox": [x, y, w, h], "segmentation": {"size": [h, w], "counts": str}}

Records of a Mask Scoring model carry ``"segm_score"`` too (see :func:`~.table.ranking_score`
for which score ranks what). :func:`validate_lvis_results` checks record by record and names
the first violation (file, record index, field). :func:`load_lvis_results` reads a results
file (undecodable, truncated or corrupted JSON rejected with the file named) and checks its
records with numpy first, falling back to the record-by-record check (for its message) only
if something is wrong; :func:`first_bad_row` is the same check on table columns.
"""

import math
import os
from collections import Counter
from itertools import chain
from operator import itemgetter, methodcaller
from typing import Optional, Sequence, Union

import numpy as np

from lvis_longtail.data.lvis_geometry_checks import is_int64
from lvis_longtail.evaluation.table import (
    SEGM_SCORE,
    DetectionTable,
    ListMasks,
    LVISResultsError,
    index_in_sorted,
    record_score,
)
from lvis_longtail.utils.io import gc_paused, read_json
from lvis_longtail.utils.rle import decode_rle_string, first_bad_count_string

RESULTS_FILE = "lvis_instances_results.json"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def record_problem(record, images: dict, category_ids: set, required: Sequence[str]):
    """``(field, problem)`` for the first thing wrong with ``record``, or None."""
    if not isinstance(record, dict):
        return None, f"is a {type(record).__name__}, not a JSON object"
    for field in ("image_id", "category_id", "score", *required):
        if field not in record:
            return field, "is missing"
    for field in ("image_id", "category_id"):
        if not isinstance(record[field], int) or isinstance(record[field], bool):
            return field, f"{record[field]!r} is not an integer id"
        if not is_int64(record[field]):
            return field, f"must fit in 64 bits, got {record[field]}"
    image = images.get(record["image_id"])
    if image is None:
        return "image_id", f"{record['image_id']!r} is not an image of the split"
    if record["category_id"] not in category_ids:
        return "category_id", f"{record['category_id']!r} is not a category id of the split"
    for field in ("score", SEGM_SCORE):
        if field in record and not _is_number(record[field]):
            return field, f"{record[field]!r} is not a finite number"
    bbox = record.get("bbox")
    if bbox is not None and not (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(map(_is_number, bbox))
        and bbox[2] >= 0
        and bbox[3] >= 0
    ):
        return "bbox", f"{bbox!r} is not [x, y, w, h] with finite numbers and w, h >= 0"
    segm = record.get("segmentation")
    if segm is not None:
        size = [image.get("height"), image.get("width")]
        if not isinstance(segm, dict) or not isinstance(segm.get("counts"), str):
            return "segmentation", "is not a compressed RLE {'size': [h, w], 'counts': str}"
        if not (_types_are(segm.get("size") or [None], {int}) and segm["size"] == size):
            return "segmentation", f"size {segm.get('size')!r:.40} is not the image's [h, w] {size}"
        runs = decode_rle_string(segm["counts"])
        if runs is None or sum(runs) != size[0] * size[1]:
            return "segmentation", (
                "compressed RLE 'counts' is malformed or does not cover the image's "
                f"{size[0]}x{size[1]} pixels"
            )
    return None


def validate_lvis_results(
    results,
    gt_dataset,
    max_dets: int = 300,
    *,
    required: Sequence[str] = ("bbox", "segmentation"),
    source: str = RESULTS_FILE,
) -> dict:
    """Check LVIS results against their split; raise on the first violation.

    Checks: a list of objects; ``image_id``, ``category_id``, ``score`` and the ``required``
    fields present; image and category ids of the split; finite scores; ``bbox`` = [x, y, w, h];
    ``segmentation`` = compressed RLE of the image's size; at most ``max_dets`` per image
    (unchecked if < 0).

    Args:
        results: list of records, or the path of a results json.
        gt_dataset: the split's json dict (``images``, ``categories``; annotations not needed)
            or an lvis-api ``LVIS``.
        source: the file named in messages (the path itself when ``results`` is a path).

    Returns:
        A summary: ``num_detections``, ``num_images`` (with detections), ``num_split_images``,
        ``num_categories`` (detected), ``max_per_image``, and ``line``, a one-line summary.

    Raises:
        LVISResultsError: names the file, the record index and the field.
    """
    if isinstance(results, (str, os.PathLike)):
        source = os.fspath(results)
        results = read_json(source, LVISResultsError, "results file")
    name = os.path.basename(source)
    if not isinstance(results, list):
        raise LVISResultsError(f"{source}: is a {type(results).__name__}, not a list of records")
    split = gt_dataset if isinstance(gt_dataset, SplitIndex) else SplitIndex(gt_dataset)
    images, category_ids = split.images, set(split.category_ids.tolist())
    per_image = Counter()
    for i, record in enumerate(results):
        problem = record_problem(record, images, category_ids, required)
        if problem is not None:
            raise LVISResultsError(record_error(source, i, *problem))
        per_image[record["image_id"]] += 1
        if 0 <= max_dets < per_image[record["image_id"]]:
            raise LVISResultsError(too_many_error(source, i, record["image_id"], max_dets))
    return results_summary(name, len(results), per_image, len(images), results)


def record_error(source: str, index: int, field: Optional[str], what: str) -> str:
    where = f"record {index}" + (f", field '{field}'" if field else "")
    return f"{source}: {where}: {what}"


def too_many_error(source: str, index: int, image_id, max_dets: int) -> str:
    return (
        f"{source}: record {index}, field 'image_id': image {image_id} has more than "
        f"max_dets={max_dets} detections"
    )


def results_summary(name, num_detections, per_image, num_split_images, results=(), cats=None):
    """The summary :func:`validate_lvis_results` returns (``cats``: detected category ids)."""
    if cats is None:
        cats = {r["category_id"] for r in results}
    summary = {
        "num_detections": num_detections,
        "num_images": len(per_image),
        "num_split_images": num_split_images,
        "num_categories": len(cats),
        "max_per_image": max(per_image.values(), default=0),
    }
    summary["line"] = (
        f"{name}: {summary['num_detections']:,} detections on {summary['num_images']:,}/"
        f"{summary['num_split_images']:,} images, {summary['num_categories']:,} categories, "
        f"max {summary['max_per_image']:,} per image"
    )
    return summary


class SplitIndex:
    """The images (id -> [h, w]) and category ids of a split, for checking results fast."""

    def __init__(self, gt_dataset):
        """``gt_dataset``: a json dict, or an object with one as ``.dataset`` (lvis-api's
        ``LVIS``, :class:`~lvis_longtail.data.lvis_json.ValidatedLVIS`, ...)."""
        dataset = getattr(gt_dataset, "dataset", gt_dataset)
        self.images = {img["id"]: img for img in dataset["images"]}
        ids = sorted(self.images)
        self.image_ids = np.array(ids, dtype=np.int64)
        self.heights = np.array([self.images[i].get("height", -1) for i in ids], dtype=np.int64)
        self.widths = np.array([self.images[i].get("width", -1) for i in ids], dtype=np.int64)
        self.category_ids = np.array(sorted(c["id"] for c in dataset["categories"]), np.int64)

    def image_index(self, image_ids: np.ndarray) -> np.ndarray:
        return index_in_sorted(self.image_ids, image_ids)


def first_bad_row(split: SplitIndex, image_id, category_id, score, bbox, mask_size=None):
    """Index of the first row that breaks the results format (vectorized), or None.

    Args: (N,) image and category ids, (N,) scores, (N, 4) boxes or None, (N, 2) mask
    ``[h, w]`` or None."""
    img = split.image_index(image_id)
    bad = (img < 0) | (index_in_sorted(split.category_ids, category_id) < 0) | ~np.isfinite(score)
    if bbox is not None:
        bad |= ~np.isfinite(bbox).all(axis=1) | (bbox[:, 2] < 0) | (bbox[:, 3] < 0)
    if mask_size is not None:
        ok = img >= 0
        bad |= ok & (
            (mask_size[:, 0] != split.heights[np.maximum(img, 0)])
            | (mask_size[:, 1] != split.widths[np.maximum(img, 0)])
        )
    hits = np.flatnonzero(bad)
    return int(hits[0]) if len(hits) else None


def _types_are(values, allowed) -> bool:
    return set(map(type, values)) <= allowed


def _optional_column(records, key, required) -> Optional[list]:
    """``key`` of every record, None if no record has it; raises KeyError if only some have
    it (or none, when required)."""
    values = list(map(methodcaller("get", key), records))
    missing = values.count(None)
    if missing == len(values) and key not in required:
        return None
    if missing:
        raise KeyError(key)
    return values


def _checked_table(records, split: SplitIndex, required) -> Optional[DetectionTable]:
    """The records as a table if every one is certainly valid (vectorized checks); None means:
    check them one by one (:func:`validate_lvis_results`) for the message."""
    if not isinstance(records, list) or not _types_are(records, {dict}):
        return None
    n = len(records)
    try:
        image_id, category_id, score = (
            list(map(itemgetter(k), records)) for k in ("image_id", "category_id", "score")
        )
        for field in set(required) - {"bbox", "segmentation"}:
            list(map(itemgetter(field), records))
        boxes = _optional_column(records, "bbox", required)
        segms = _optional_column(records, "segmentation", required)
        if not (_types_are(image_id, {int}) and _types_are(category_id, {int})):
            return None
        if not _types_are(score, {int, float}):
            return None
        bbox = mask_size = None
        if boxes is not None:
            if not _types_are(boxes, {list}) or set(map(len, boxes)) != {4}:
                return None
            if not _types_are(chain.from_iterable(boxes), {int, float}):
                return None
            bbox = np.fromiter(chain.from_iterable(boxes), np.float64, 4 * n).reshape(n, 4)
        if segms is not None:
            if not _types_are(segms, {dict}):
                return None
            counts = list(map(itemgetter("counts"), segms))
            if not _types_are(counts, {str}):
                return None
            sizes = list(map(itemgetter("size"), segms))
            if not _types_are(sizes, {list}) or set(map(len, sizes)) != {2}:
                return None
            if not _types_are(chain.from_iterable(sizes), {int}):
                return None
            mask_size = np.fromiter(chain.from_iterable(sizes), np.int64, 2 * n).reshape(n, 2)
        table = DetectionTable(
            image_id=np.fromiter(image_id, np.int64, n),
            category_id=np.fromiter(category_id, np.int64, n),
            score=np.fromiter(score, np.float64, n),
            bbox=bbox,
            masks=None if segms is None else ListMasks(segms),
        )
    except (KeyError, OverflowError):  # (OverflowError: an id or size beyond int64)
        return None
    if n and any(SEGM_SCORE in r for r in records):
        segm = [record_score(r, "segm") for r in records]
        if not _types_are(segm, {int, float}):
            return None
        table.segm_score = np.fromiter(segm, np.float64, n)
        if not np.isfinite(table.segm_score).all():
            return None
    bad = first_bad_row(split, table.image_id, table.category_id, table.score, bbox, mask_size)
    if bad is None and mask_size is not None:
        bad = first_bad_count_string(counts, mask_size[:, 0] * mask_size[:, 1])
    return table if bad is None else None


def load_lvis_results(
    path: str,
    gt_dataset,
    *,
    max_dets: int = -1,
    required: Sequence[str] = ("bbox",),
    as_table: bool = False,
) -> Union[list, DetectionTable]:
    """Read and check an LVIS results json (e.g. ``lvis_instances_results.json``).

    Args:
        path: the results file.
        gt_dataset: its split (json dict, lvis-api ``LVIS`` or
            :class:`~lvis_longtail.evaluation.ground_truth.LVISGroundTruth`).
        max_dets: reject images with more detections (-1: unchecked; the evaluators apply
            the protocol's cap themselves).
        required: fields every record must have besides ids and score.
        as_table: return a :class:`~.table.DetectionTable` (what the fast evaluator
            takes; built during the checks, masks stay the records' dicts) instead of the list.

    Returns:
        The records (a list of dicts), or their table.

    Raises:
        LVISResultsError: the file is not valid JSON (undecodable, truncated or corrupted),
            is not a list of records, or a record breaks the format (see
            :func:`validate_lvis_results`); the message names the file and, for a record,
            its index and field.
        FileNotFoundError: no such file.
    """
    results = read_json(path, LVISResultsError, "results file")
    table = records_table(results, gt_dataset, required=required, source=path, max_dets=max_dets)
    return table if as_table else results


def records_table(
    results,
    gt_dataset,
    *,
    required: Sequence[str] = ("bbox",),
    source: str = "results records",
    max_dets: int = -1,
) -> DetectionTable:
    """Check in-memory LVIS records against their split (vectorized; record by record only
    for the message) and return them as a :class:`~.table.DetectionTable`.

    Raises:
        LVISResultsError: names ``source``, the record index and the field.
    """
    split = gt_dataset if isinstance(gt_dataset, SplitIndex) else SplitIndex(gt_dataset)
    with gc_paused():
        table = _checked_table(results, split, required)
    if table is None:
        validate_lvis_results(results, split, max_dets, required=required, source=source)
        _check_masks_everywhere_or_nowhere(results, source)
        return DetectionTable.from_records(results)
    check_per_image_cap(results, max_dets, source)
    return table


def _check_masks_everywhere_or_nowhere(records: Sequence[dict], source: str) -> None:
    """Raise LVISResultsError at the first record without ``segmentation`` when others have
    one (the mask tasks would silently be dropped for the whole file)."""
    with_masks = ["segmentation" in r for r in records]
    if any(with_masks) and not all(with_masks):
        i = with_masks.index(False)
        raise LVISResultsError(
            record_error(source, i, "segmentation", "is missing (other records have masks)")
        )


def check_per_image_cap(records: Sequence[dict], max_dets: int, source: str) -> None:
    """Raise LVISResultsError at the first record beyond ``max_dets`` in its image."""
    if max_dets < 0:
        return
    per_image = Counter()
    for i, record in enumerate(records):
        per_image[record["image_id"]] += 1
        if per_image[record["image_id"]] > max_dets:
            raise LVISResultsError(too_many_error(source, i, record["image_id"], max_dets))
