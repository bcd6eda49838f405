"""LVIS results for lvis-api and for the results file.

:func:`write_results_file` writes the evaluator's selected table to
``lvis_instances_results.json``, checked on the way with the rules and messages of
:mod:`.record_checks` (re-exported here: :func:`validate_lvis_results`,
:func:`load_lvis_results`, :class:`SplitIndex`, ...), and atomically.
:func:`table_to_records` and :func:`records_for_task` make the records lvis-api evaluates.
"""

import contextlib
import os
from json.encoder import encode_basestring_ascii
from typing import List, Optional, Sequence

import numpy as np

from lvis_longtail.evaluation.record_checks import (  # noqa: F401  (re-exported)
    RESULTS_FILE,
    SplitIndex,
    first_bad_row,
    load_lvis_results,
    record_error,
    record_problem,
    results_summary,
    validate_lvis_results,
)
from lvis_longtail.evaluation.table import (
    SEGM_SCORE,
    DetectionTable,
    LVISResultsError,
    cap_per_image,
    record_score,
)
from lvis_longtail.utils.io import atomic_write

EXPORT_FIELDS = ("image_id", "category_id", "score", "bbox", "segmentation")


def _capped(records: Sequence[dict], task: str, max_dets: int) -> List[dict]:
    """The ``max_dets`` best records of each image by ``task``'s score, in their order (the
    table's :func:`~.table.cap_per_image`: ties keep the earlier record, as lvis-api)."""
    if max_dets < 0 or not records:
        return list(records)
    image = np.fromiter((r["image_id"] for r in records), np.int64, len(records))
    score = np.fromiter((record_score(r, task) for r in records), np.float64, len(records))
    return [records[i] for i in np.flatnonzero(cap_per_image(image, score, max_dets)).tolist()]


def records_for_task(records: Sequence[dict], task: str, max_dets: int) -> List[dict]:
    """New records for evaluating ``task`` with lvis-api, ranked and capped by its score.

    bbox records keep a ``segmentation`` where there is one (shared, not copied; lvis-api
    would otherwise make a polygon of each box). segm records have no ``bbox``, so lvis-api
    takes the mask area for the small/medium/large ranges (detectron2's convention).
    """
    if task not in ("bbox", "segm"):
        raise ValueError(f"unknown LVIS task {task!r}; expected 'bbox' or 'segm'")
    fields = ("bbox", "segmentation") if task == "bbox" else ("segmentation",)
    out = []
    for r in _capped(records, task, max_dets):
        record = {"image_id": r["image_id"], "category_id": r["category_id"]}
        record["score"] = record_score(r, task)
        record.update((k, r[k]) for k in fields if k in r)
        out.append(record)
    return out


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


WRITE_CHUNK = 8192  # rows per write: bounds the masks and json text held at once


def write_results_file(
    table: DetectionTable,
    path: Optional[str],
    split: SplitIndex,
    *,
    with_masks: bool = True,
    source: Optional[str] = None,
) -> dict:
    """Write a (selected) table as the results file, checked first, atomically.

    The file holds :data:`EXPORT_FIELDS` per row, in the table's order, ``score`` = the
    file's ranking score (:func:`~.table.ranking_score`); masks are read from their source
    chunk by chunk. Nothing is written if a row breaks the format (the message of
    :func:`validate_lvis_results`, naming ``source``, the record index and the field).

    Args:
        table: the rows to write (the protocol's selection).
        path: the results file; None only checks.
        split: the split's images and categories.
        with_masks: every record must have a mask.
        source: the name used in messages (default: ``path``).

    Returns:
        :func:`validate_lvis_results`' summary.
    """
    source = source or path or RESULTS_FILE
    n = len(table)
    score = table.task_score("file")
    if with_masks and table.masks is None and n:
        _raise_bad_row(table, 0, score, split, source, with_masks)
    with atomic_write(path, buffering=1 << 20) if path else contextlib.nullcontext() as f:
        if f:
            f.write("[")
        for start in range(0, n, WRITE_CHUNK):  # checked, then written, chunk by chunk
            rows = np.arange(start, min(start + WRITE_CHUNK, n))
            sizes = table.masks.sizes(rows) if table.masks is not None else None
            bad = first_bad_row(
                split, table.image_id[rows], table.category_id[rows], score[rows],
                table.bbox[rows], sizes,
            )  # fmt: skip
            if bad is not None:  # raising inside atomic_write leaves no file
                _raise_bad_row(table, start + bad, score, split, source, with_masks)
            if f:
                f.write(("," if start else "") + _rows_json(table, rows, score, sizes))
        if f:
            f.write("]")
    images, per_image = np.unique(table.image_id, return_counts=True)
    cats = set(np.unique(table.category_id).tolist())
    counts = dict(zip(images.tolist(), per_image.tolist()))
    return results_summary(os.path.basename(source), n, counts, len(split.images), cats=cats)


def _raise_bad_row(table, row, score, split, source, with_masks):
    """The :func:`validate_lvis_results` message for the table's ``row``."""
    segm = table.masks.rles([row])[0] if table.masks is not None else None
    record = {"image_id": int(table.image_id[row]), "category_id": int(table.category_id[row]),
              "score": float(score[row]), "bbox": table.bbox[row].tolist()}  # fmt: skip
    if segm is not None:
        record["segmentation"] = segm
    required = ("bbox", "segmentation") if with_masks else ("bbox",)
    cats = set(split.category_ids.tolist())
    problem = record_problem(record, split.images, cats, required)
    raise LVISResultsError(record_error(source, row, *(problem or (None, "is invalid"))))


def _rows_json(table: DetectionTable, rows: np.ndarray, score: np.ndarray, sizes) -> str:
    """The json text of ``rows`` (comma-separated records, no brackets)."""
    if sizes is None:
        masks = [None] * len(rows)
        size = [(0, 0)] * len(rows)
    else:
        masks = [m["counts"] for m in table.masks.rles(rows)]
        masks = [m.decode("ascii") if isinstance(m, bytes) else m for m in masks]
        size = sizes.tolist()
    return ",".join(
        record_json(i, k, s, b, hw, m)
        for i, k, s, b, hw, m in zip(
            table.image_id[rows].tolist(),
            table.category_id[rows].tolist(),
            score[rows].tolist(),
            table.bbox[rows].tolist(),
            size,
            masks,
        )
    )


def table_to_records(table: DetectionTable, with_masks: bool = True) -> List[dict]:
    """LVIS records of a table's rows (``segm_score`` kept where there is one), for lvis-api."""
    masks = table.masks.rles(np.arange(len(table))) if with_masks and len(table) else None
    records = []
    for i, (image_id, cat, score, box) in enumerate(
        zip(
            table.image_id.tolist(),
            table.category_id.tolist(),
            table.score.tolist(),
            table.bbox.tolist(),
        )
    ):
        record = {"image_id": image_id, "category_id": cat, "score": score, "bbox": box}
        if masks is not None:
            record["segmentation"] = masks[i]
        records.append(record)
    if table.segm_score is not None:
        for record, s in zip(records, table.task_score("segm").tolist()):
            record[SEGM_SCORE] = s
    return records
