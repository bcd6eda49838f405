"""LVIS results records: made from ``Instances``, capped per image, validated, written to disk.

A *record* is one detection in the LVIS results format (METHODS.md §9), in original image
coordinates::

    {"image_id": int, "category_id": int (the dataset's own id), "score": float,
     "bbox": [x, y, w, h], "segmentation": {"size": [h, w], "counts": str}}

Records made from a Mask Scoring model (``Instances.mask_scores``: box score × predicted mask
IoU) carry one more key, ``"segm_score"``, until :func:`records_for_export` or
:func:`records_for_task` resolves it: bbox is ranked by ``score`` (the box score), segm by
``segm_score``, and the exported file's ``score`` is the segm score, since the LVIS server
evaluates segm. Without ``mask_scores`` both tasks and the file use the box score.
"""

import json
import logging
import math
import os
import secrets
from collections import Counter, defaultdict
from json.encoder import encode_basestring_ascii
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances

logger = logging.getLogger(__name__)

SEGM_SCORE = "segm_score"
RESULTS_FILE = "lvis_instances_results.json"
EXPORT_FIELDS = ("image_id", "category_id", "score", "bbox", "segmentation")


class LVISResultsError(ValueError):
    """A results record breaks the LVIS results format or does not fit its split."""


def box_score(record: dict) -> float:
    """The score bbox evaluation ranks a record by."""
    return record["score"]


def segm_score(record: dict) -> float:
    """The score segm evaluation (and the exported file) ranks a record by."""
    return record.get(SEGM_SCORE, record["score"])


def _top_k(scores: torch.Tensor, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores; ties keep the earlier index (as lvis-api does)."""
    return np.argsort(-scores.detach().cpu().numpy(), kind="stable")[:k]


def instances_to_lvis_records(
    instances: Instances, image_id: int, dataset_ids: Mapping[int, int], max_dets: int = 300
) -> list[dict]:
    """LVIS records of one image's predictions, via detectron2's ``instances_to_coco_json``.

    Only detections that can survive the per-image cap are converted (masks are RLE-encoded
    after the cut): the top ``max_dets`` by box score, together with the top ``max_dets`` by
    ``mask_scores`` where present, so each task can later take its own top ``max_dets``.

    Args:
        instances: on CPU, with ``pred_boxes`` (XYXY), ``scores``, ``pred_classes``
            (contiguous ids), optionally ``pred_masks`` (N, H, W) and ``mask_scores`` (N,).
        image_id: the dataset's image id.
        dataset_ids: contiguous class id -> dataset category id.
        max_dets: per-image cap; -1 keeps everything.
    """
    if 0 <= max_dets < len(instances):
        keep = _top_k(instances.scores, max_dets)
        if instances.has("mask_scores"):
            keep = np.union1d(keep, _top_k(instances.mask_scores, max_dets))
        instances = instances[torch.as_tensor(np.sort(keep), dtype=torch.long)]
    records = instances_to_coco_json(instances, image_id)
    for record in records:
        cls = record["category_id"]
        if cls not in dataset_ids:
            raise KeyError(
                f"predicted class {cls} of image {image_id} has no dataset category id (the "
                f"dataset maps {len(dataset_ids)} classes; does MODEL.ROI_HEADS.NUM_CLASSES match?)"
            )
        record["category_id"] = dataset_ids[cls]
    if instances.has("mask_scores"):
        for record, score in zip(records, instances.mask_scores.tolist()):
            record[SEGM_SCORE] = score
    return records


def cap_per_image(
    records: Sequence[dict], max_dets: int, score: Callable[[dict], float] = box_score
) -> list[dict]:
    """The ``max_dets`` highest-scoring records of each image (all if ``max_dets`` < 0), in
    their original order. Ties keep the earlier record, like lvis-api's ``LVISResults``."""
    if max_dets < 0:
        return list(records)
    by_image = defaultdict(list)
    for i, record in enumerate(records):
        by_image[record["image_id"]].append(i)
    keep = []
    for indices in by_image.values():
        if len(indices) > max_dets:
            indices = sorted(indices, key=lambda i: score(records[i]), reverse=True)[:max_dets]
        keep.extend(indices)
    return [records[i] for i in sorted(keep)]


def records_for_export(records: Sequence[dict], max_dets: int) -> list[dict]:
    """Records as the results file holds them: the documented fields only, ``score`` = the
    segm score where there is one, at most ``max_dets`` per image by that score."""
    out = []
    for record in cap_per_image(records, max_dets, segm_score):
        exported = {k: record[k] for k in EXPORT_FIELDS if k in record}
        exported["score"] = segm_score(record)
        out.append(exported)
    return out


def records_for_task(records: Sequence[dict], task: str, max_dets: int) -> list[dict]:
    """New records for evaluating ``task`` with lvis-api, ranked and capped by its score.

    bbox records keep a ``segmentation`` where there is one (shared, not copied; lvis-api
    would otherwise make a polygon of each box). segm records have no ``bbox``, so lvis-api
    takes the mask area for the small/medium/large ranges (detectron2's convention; with a
    bbox it takes the box area).
    """
    if task not in ("bbox", "segm"):
        raise ValueError(f"unknown LVIS task {task!r}; expected 'bbox' or 'segm'")
    fields, score = (("bbox", "segmentation"), box_score)
    if task == "segm":
        fields, score = ("segmentation",), segm_score
    out = []
    for r in cap_per_image(records, max_dets, score):
        record = {"image_id": r["image_id"], "category_id": r["category_id"], "score": score(r)}
        record.update((k, r[k]) for k in fields if k in r)
        out.append(record)
    return out


def write_json_atomic(obj, path: str) -> None:
    """Write ``obj`` as strict JSON (no NaN) to ``path`` atomically: a temporary file in the
    same folder, then ``os.replace``. A failed write leaves any previous file untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    )
    try:
        with open(tmp, "x") as f:
            json.dump(obj, f, separators=(",", ":"), allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _record_problem(record, images: dict, category_ids: set, required: Sequence[str]):
    """``(field, problem)`` for the first thing wrong with ``record``, or None."""
    if not isinstance(record, dict):
        return None, f"is a {type(record).__name__}, not a JSON object"
    for field in ("image_id", "category_id", "score", *required):
        if field not in record:
            return field, "is missing"
    for field in ("image_id", "category_id"):
        if not isinstance(record[field], int) or isinstance(record[field], bool):
            return field, f"{record[field]!r} is not an integer id"
    image = images.get(record["image_id"])
    if image is None:
        return "image_id", f"{record['image_id']!r} is not an image of the split"
    if record["category_id"] not in category_ids:
        return "category_id", f"{record['category_id']!r} is not a category id of the split"
    if not _is_number(record["score"]):
        return "score", f"{record['score']!r} is not a finite number"
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
        if segm.get("size") != size:
            return "segmentation", f"size {segm.get('size')!r} is not the image's [h, w] {size}"
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
        with open(source) as f:
            results = json.load(f)
    name = os.path.basename(source)
    if not isinstance(results, list):
        raise LVISResultsError(f"{source}: is a {type(results).__name__}, not a list of records")
    split = gt_dataset if isinstance(gt_dataset, SplitIndex) else SplitIndex(gt_dataset)
    images, category_ids = split.images, set(split.category_ids.tolist())
    per_image = Counter()
    for i, record in enumerate(results):
        problem = _record_problem(record, images, category_ids, required)
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
        dataset = getattr(gt_dataset, "dataset", gt_dataset)
        self.images = {img["id"]: img for img in dataset["images"]}
        ids = sorted(self.images)
        self.image_ids = np.array(ids, dtype=np.int64)
        self.heights = np.array([self.images[i].get("height", -1) for i in ids], dtype=np.int64)
        self.widths = np.array([self.images[i].get("width", -1) for i in ids], dtype=np.int64)
        self.category_ids = np.array(sorted(c["id"] for c in dataset["categories"]), np.int64)

    def image_index(self, image_ids: np.ndarray) -> np.ndarray:
        return _index_in(self.image_ids, image_ids)


def _index_in(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if len(sorted_ids) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1)


def first_bad_row(split: SplitIndex, image_id, category_id, score, bbox, mask_size=None):
    """Index of the first row that breaks the results format (vectorized), or None.

    Args: (N,) image and category ids, (N,) scores, (N, 4) boxes or None, (N, 2) mask
    ``[h, w]`` or None."""
    img = split.image_index(image_id)
    bad = (img < 0) | (_index_in(split.category_ids, category_id) < 0) | ~np.isfinite(score)
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


def _fast_check(records, split: SplitIndex, required) -> bool:
    """True if every record is certainly valid (vectorized); False means: check one by one."""
    if not isinstance(records, list) or not _types_are(records, {dict}):
        return False
    try:
        columns = {k: [r[k] for r in records] for k in ("image_id", "category_id", "score")}
        for field in required:
            columns[field] = [r[field] for r in records]
    except KeyError:
        return False
    if not (_types_are(columns["image_id"], {int}) and _types_are(columns["category_id"], {int})):
        return False
    if not _types_are(columns["score"], {int, float}):
        return False
    boxes = [r.get("bbox") for r in records]
    has_box = [b is not None for b in boxes]
    segms = [r.get("segmentation") for r in records]
    has_segm = [s is not None for s in segms]
    if not (all(has_box) or not any(has_box)) or not (all(has_segm) or not any(has_segm)):
        return False
    bbox = mask_size = None
    if any(has_box):
        if not _types_are(boxes, {list}) or set(map(len, boxes)) != {4}:
            return False
        flat = [v for b in boxes for v in b]
        if not _types_are(flat, {int, float}):
            return False
        bbox = np.array(flat, dtype=np.float64).reshape(-1, 4)
    if any(has_segm):
        if not _types_are(segms, {dict}):
            return False
        try:
            if not _types_are([s["counts"] for s in segms], {str}):
                return False
            sizes = [s["size"] for s in segms]
        except KeyError:
            return False
        if not _types_are(sizes, {list}) or set(map(len, sizes)) != {2}:
            return False
        if not _types_are([v for sz in sizes for v in sz], {int}):
            return False
        mask_size = np.array(sizes, dtype=np.int64).reshape(-1, 2)
    bad = first_bad_row(
        split,
        np.array(columns["image_id"], dtype=np.int64),
        np.array(columns["category_id"], dtype=np.int64),
        np.array(columns["score"], dtype=np.float64),
        bbox,
        mask_size,
    )
    return bad is None


def load_lvis_results(
    path: str,
    gt_dataset,
    *,
    max_dets: int = -1,
    required: Sequence[str] = ("bbox",),
) -> list:
    """Read and check an LVIS results json (e.g. ``lvis_instances_results.json``).

    Args:
        path: the results file.
        gt_dataset: its split (json dict, lvis-api ``LVIS`` or
            :class:`~lvis_longtail.evaluation.fast_eval.LVISGroundTruth`).
        max_dets: reject images with more detections (-1: unchecked; the evaluators apply
            the protocol's cap themselves).
        required: fields every record must have besides ids and score.

    Returns:
        The records (a list of dicts).

    Raises:
        LVISResultsError: the file is not complete JSON (truncated or corrupted), is not a
            list of records, or a record breaks the format (see :func:`validate_lvis_results`);
            the message names the file and, for a record, its index and field.
        FileNotFoundError: no such file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        results = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = (
            f" at line {e.lineno} column {e.colno} (byte {e.pos} of {size})"
            if hasattr(e, "lineno")
            else ""
        )
        hint = "truncated" if getattr(e, "pos", 0) >= size - 1 else "corrupted"
        raise LVISResultsError(
            f"{path}: not a complete JSON document ({hint}?): {getattr(e, 'msg', e)}{where}"
        ) from None
    del data
    split = SplitIndex(getattr(gt_dataset, "dataset", gt_dataset))
    if _fast_check(results, split, required):
        check_per_image_cap(results, max_dets, path)
        return results
    validate_lvis_results(results, split, max_dets, required=required, source=path)
    return results


def check_per_image_cap(records: Sequence[dict], max_dets: int, source: str) -> None:
    """Raise LVISResultsError at the first record beyond ``max_dets`` in its image."""
    if max_dets < 0:
        return
    per_image = Counter()
    for i, record in enumerate(records):
        per_image[record["image_id"]] += 1
        if per_image[record["image_id"]] > max_dets:
            raise LVISResultsError(too_many_error(source, i, record["image_id"], max_dets))


def record_json(image_id, category_id, score, bbox, size=None, counts=None) -> str:
    """One record as compact JSON, byte-identical to ``json.dumps(record, separators=(",",
    ":"))`` with the keys in :data:`EXPORT_FIELDS` order (finite numbers only)."""
    box = ",".join(map(repr, bbox))
    text = f'{{"image_id":{image_id},"category_id":{category_id},"score":{score!r},"bbox":[{box}]'
    if counts is None:
        return text + "}"
    return (
        f'{text},"segmentation":{{"size":[{size[0]},{size[1]}],'
        f'"counts":{encode_basestring_ascii(counts)}}}}}'
    )


class JsonListWriter:
    """Writes a JSON list item by item to a temporary file, moved to ``path`` on success
    (:func:`write_json_atomic`'s guarantee for streamed output)."""

    def __init__(self, path: str):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.path = path
        self.tmp = os.path.join(
            directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        )
        self._file: Optional[object] = None
        self._first = True

    def __enter__(self):
        self._file = open(self.tmp, "x", buffering=1 << 20)
        self._file.write("[")
        return self

    def write(self, items_json: Sequence[str]) -> None:
        if not items_json:
            return
        self._file.write(("" if self._first else ",") + ",".join(items_json))
        self._first = False

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._file.write("]")
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
        return False
