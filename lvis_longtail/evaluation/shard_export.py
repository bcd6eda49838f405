"""The results file (``lvis_instances_results.json``) written from the store's shards.

Streamed chunk by chunk, checked on the way with :mod:`.validation`'s rules and messages, and
written atomically: a record that breaks the format leaves no file behind.
"""

import os
from collections import Counter
from typing import Optional, Sequence

import numpy as np

from lvis_longtail.evaluation.export import JsonListWriter, record_json
from lvis_longtail.evaluation.store import file_scores, first_entries, iter_chunks
from lvis_longtail.evaluation.validation import (
    RESULTS_FILE,
    LVISResultsError,
    SplitIndex,
    _record_problem,
    first_bad_row,
    record_error,
    results_summary,
)


def _fixed_selection(paths, protocol, seen: set) -> dict:
    """{(file, chunk): row mask} of Fixed AP's top ``dets_per_class`` by file score.

    Reads only the rows' fixed fields; the ranking is :func:`read_shards`' order."""
    keys, image, cat, score = [], [], [], []
    for f, path in enumerate(paths):
        for c, chunk in enumerate(iter_chunks(path)):
            first = first_entries(chunk, seen)
            rows = chunk.rows
            keys.append(((f, c), len(rows)))
            image.append(rows["image_id"])
            cat.append(rows["category_id"])
            score.append(np.where(np.isin(rows["entry"], first), file_scores(rows), np.nan))
    n = sum(k[1] for k in keys)
    seq = np.arange(n)
    image, cat, score = (np.concatenate(a) if a else np.zeros(0) for a in (image, cat, score))
    order = np.lexsort((seq, image))
    valid = ~np.isnan(score[order])
    keep = np.zeros(n, dtype=bool)
    rows = order[valid]
    keep[rows] = protocol.select(image[rows], cat[rows], score[rows])
    out, start = {}, 0
    for key, count in keys:
        out[key] = keep[start : start + count]
        start += count
    return out


class _NoFile:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, items):
        pass


def _row_record(row, counts: Optional[str]) -> dict:
    record = {
        "image_id": int(row["image_id"]),
        "category_id": int(row["category_id"]),
        "score": float(file_scores(row[None])[0]),
        "bbox": row["bbox"].tolist(),
    }
    if counts is not None:
        record["segmentation"] = {"size": [int(row["height"]), int(row["width"])], "counts": counts}
    return record


def _chunk_counts(chunk, rows) -> list:
    """The RLE counts (str) of ``rows`` of ``chunk``; None for rows without a mask."""
    if not len(rows) or (rows["counts_start"] < 0).any():
        return [None] * len(rows)
    rel = (rows["counts_start"] - chunk.blob_offset).tolist()
    return [chunk.blob[s : s + n].decode("ascii") for s, n in zip(rel, rows["counts_len"].tolist())]


def _check_rows(rows, counts, split: SplitIndex, with_masks: bool, source: str, first: int):
    """Raise LVISResultsError, with the per-record message, at the first bad row."""
    if not len(rows):
        return
    has_masks = counts[0] is not None
    sizes = np.stack([rows["height"], rows["width"]], 1) if has_masks else None
    bad = first_bad_row(
        split, rows["image_id"], rows["category_id"], file_scores(rows), rows["bbox"], sizes
    )
    if bad is None and with_masks and not has_masks:
        bad = 0
    if bad is None:
        return
    required = ("bbox", "segmentation") if with_masks else ("bbox",)
    cats = set(split.category_ids.tolist())
    problem = _record_problem(_row_record(rows[bad], counts[bad]), split.images, cats, required)
    raise LVISResultsError(record_error(source, first + bad, *(problem or (None, "is invalid"))))


def _rows_json(rows, counts) -> list:
    return [
        record_json(i, k, s, b, (h, w), m)
        for i, k, s, b, h, w, m in zip(
            rows["image_id"].tolist(),
            rows["category_id"].tolist(),
            file_scores(rows).tolist(),
            rows["bbox"].tolist(),
            rows["height"].tolist(),
            rows["width"].tolist(),
            counts,
        )
    ]


def export_shards(
    paths: Sequence[str],
    path: Optional[str],
    split: SplitIndex,
    protocol,
    *,
    with_masks: bool = True,
    source: Optional[str] = None,
) -> dict:
    """Write the results file of the shards, streamed chunk by chunk, checked on the way.

    The file holds :data:`~.export.EXPORT_FIELDS` per record (``score``: the segm score where
    there is one), the records the protocol keeps (standard: per image the
    ``max_dets_per_image`` best by that score; fixed: per class the ``dets_per_class`` best),
    in the order they were processed; an image processed twice counts once. Written
    atomically; nothing is written if a record breaks the format
    (:func:`~.validation.validate_lvis_results`' checks and messages).

    Args:
        paths: shard files, in rank order.
        path: the results file; None only checks.
        split: the split's images and categories.
        protocol: an :class:`~.protocol.EvalProtocol`.
        with_masks: every record must have a mask (``segmentation``).
        source: the name used in messages (default: ``path``).

    Returns:
        :func:`~.validation.validate_lvis_results`' summary, plus ``num_processed_images``.
    """
    source = source or path or RESULTS_FILE
    seen = set()
    selection = _fixed_selection(paths, protocol, seen) if protocol.name == "fixed" else None
    per_image, detected, index = Counter(), set(), 0
    with JsonListWriter(path) if path else _NoFile() as writer:
        for f, shard in enumerate(paths):
            for c, chunk in enumerate(iter_chunks(shard, with_blob=True)):
                rows = chunk.rows
                if selection is None:  # standard: per image, so chunk by chunk
                    keep = np.isin(rows["entry"], first_entries(chunk, seen))
                    keep[keep] = protocol.select(
                        rows["image_id"][keep], rows["category_id"][keep], file_scores(rows[keep])
                    )
                else:
                    keep = selection[(f, c)]
                rows = rows[keep]
                counts = _chunk_counts(chunk, rows)
                _check_rows(rows, counts, split, with_masks, source, index)
                writer.write(_rows_json(rows, counts))
                per_image.update(rows["image_id"].tolist())
                detected.update(np.unique(rows["category_id"]).tolist())
                index += len(rows)
    name = os.path.basename(source)
    summary = results_summary(name, index, per_image, len(split.images), cats=detected)
    summary["num_processed_images"] = len(seen)
    return summary
