"""Streaming results store: LVIS records go to disk as images are processed, not to RAM.

Each process (rank) appends to its own shard file; :meth:`LVISResultsStore.add` buffers at
most ``flush_every`` images before writing them as one chunk, so memory does not grow with the
number of images. A chunk is::

    b"LVISREC1" | int64 [num_rows, num_entries, blob_bytes]
    | entries: (image_id, entry) int64 pairs, one per add() (images without detections too)
    | rows: RECORD_DTYPE x num_rows | blob: the masks' compressed-RLE counts, ASCII

Rows keep everything the results file and the evaluators need (ids, scores, box, mask size,
mask area) in fixed-size fields; masks stay in the blob and are read back by offset only where
an IoU or the results file needs them. :func:`read_shards` turns shards into a
:class:`~.detections.DetectionTable` (images processed twice: the first time counts), ordered
by image id, then by the model's order within the image.
"""

import logging
import os
from typing import Iterator, List, NamedTuple, Optional, Sequence

import numpy as np

from lvis_longtail.evaluation.detections import DetectionTable, MaskSource, rle_areas
from lvis_longtail.evaluation.export import SEGM_SCORE
from lvis_longtail.evaluation.validation import LVISResultsError

logger = logging.getLogger(__name__)

MAGIC = b"LVISREC1"
RECORD_DTYPE = np.dtype(
    [
        ("image_id", "<i8"),
        ("category_id", "<i8"),
        ("entry", "<i8"),
        ("score", "<f8"),
        ("segm_score", "<f8"),  # NaN: no Mask Scoring score
        ("bbox", "<f8", (4,)),
        ("height", "<i4"),
        ("width", "<i4"),
        ("mask_area", "<f8"),
        ("counts_start", "<i8"),  # offset in the chunk's blob; -1: no mask
        ("counts_len", "<i8"),
    ]
)
ENTRY_DTYPE = np.dtype([("image_id", "<i8"), ("entry", "<i8")])
_HEADER = np.dtype("<i8")


def records_to_rows(records: Sequence[dict], entry: int, blob_start: int):
    """(rows, counts blob) of one image's records (fields of :mod:`.export`)."""
    rows = np.zeros(len(records), dtype=RECORD_DTYPE)
    if not records:
        return rows, b""
    rows["image_id"] = [r["image_id"] for r in records]
    rows["category_id"] = [r["category_id"] for r in records]
    rows["entry"] = entry
    rows["score"] = [r["score"] for r in records]
    rows["segm_score"] = [r.get(SEGM_SCORE, np.nan) for r in records]
    rows["bbox"] = [r["bbox"] for r in records]
    segms = [r.get("segmentation") for r in records]
    rows["counts_start"] = -1
    if all(s is not None for s in segms):
        counts = [s["counts"] for s in segms]
        counts = [c.encode("ascii") if isinstance(c, str) else bytes(c) for c in counts]
        lengths = np.array([len(c) for c in counts], dtype=np.int64)
        rows["counts_len"] = lengths
        rows["counts_start"] = blob_start + np.cumsum(lengths) - lengths
        rows["height"] = [s["size"][0] for s in segms]
        rows["width"] = [s["size"][1] for s in segms]
        rows["mask_area"] = rle_areas(segms)
        return rows, b"".join(counts)
    return rows, b""


class LVISResultsStore:
    """Append-only shard of LVIS records of one process.

    Args:
        path: the shard file (created; an existing file is replaced).
        flush_every: images buffered before a chunk is written (the memory bound).
    """

    def __init__(self, path: str, flush_every: int = 32):
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.flush_every = flush_every
        self._file = open(path, "wb")
        self._entries: List[int] = []
        self._rows: List[np.ndarray] = []
        self._blobs: List[bytes] = []
        self._blob_size = 0
        self.num_images = 0
        self.num_rows = 0

    @property
    def num_buffered_images(self) -> int:
        return len(self._entries)

    def add(self, image_id: int, records: Sequence[dict]) -> None:
        """Store one processed image's records (possibly none)."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: the store is closed")
        rows, blob = records_to_rows(records, self.num_images, self._blob_size)
        self._entries.append(image_id)
        self._rows.append(rows)
        self._blobs.append(blob)
        self._blob_size += len(blob)
        self.num_images += 1
        self.num_rows += len(rows)
        if len(self._entries) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the buffered images as one chunk."""
        if not self._entries:
            return
        first = self.num_images - len(self._entries)
        entries = np.zeros(len(self._entries), dtype=ENTRY_DTYPE)
        entries["image_id"] = self._entries
        entries["entry"] = np.arange(first, self.num_images)
        rows = np.concatenate(self._rows)
        blob = b"".join(self._blobs)
        header = np.array([len(rows), len(entries), len(blob)], dtype=_HEADER)
        for part in (MAGIC, header.tobytes(), entries.tobytes(), rows.tobytes(), blob):
            self._file.write(part)
        self._file.flush()
        self._entries, self._rows, self._blobs, self._blob_size = [], [], [], 0

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self._file is not None:
            self.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Chunk(NamedTuple):
    entries: np.ndarray  # ENTRY_DTYPE
    rows: np.ndarray  # RECORD_DTYPE, counts_start made absolute file offsets
    blob: Optional[bytes]  # with_blob only; offsets relative to blob_offset
    blob_offset: int


def iter_chunks(path: str, with_blob: bool = False) -> Iterator[Chunk]:
    """The chunks of a shard file. Raises LVISResultsError if it is truncated or corrupt."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        index = 0
        while f.tell() < size:
            start = f.tell()
            magic = f.read(len(MAGIC))
            header = f.read(3 * _HEADER.itemsize)
            if magic != MAGIC or len(header) < 3 * _HEADER.itemsize:
                raise LVISResultsError(
                    f"{path}: chunk {index} at byte {start} is corrupt (no chunk header)"
                )
            num_rows, num_entries, blob_len = np.frombuffer(header, dtype=_HEADER).tolist()
            need = num_entries * ENTRY_DTYPE.itemsize + num_rows * RECORD_DTYPE.itemsize
            if min(num_rows, num_entries, blob_len) < 0 or f.tell() + need + blob_len > size:
                raise LVISResultsError(
                    f"{path}: chunk {index} at byte {start} is truncated (the file ends at "
                    f"byte {size}; was the process killed while writing?)"
                )
            entries = np.frombuffer(f.read(num_entries * ENTRY_DTYPE.itemsize), ENTRY_DTYPE)
            rows = np.frombuffer(f.read(num_rows * RECORD_DTYPE.itemsize), RECORD_DTYPE).copy()
            blob_offset = f.tell()
            blob = f.read(blob_len) if with_blob else None
            if not with_blob:
                f.seek(blob_len, os.SEEK_CUR)
            has_mask = rows["counts_start"] >= 0
            rows["counts_start"][has_mask] += blob_offset
            yield Chunk(entries, rows, blob, blob_offset)
            index += 1


class ShardMasks(MaskSource):
    """Masks of rows read back from shard files by offset (contiguous spans in one read)."""

    GAP = 1 << 16

    def __init__(self, paths, file_index, start, length, height, width):
        self._paths = list(paths)
        self._file, self._start, self._len = file_index, start, length
        self._h, self._w = height, width

    def rles(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        out = [None] * len(rows)
        if not len(rows):
            return out
        file, start, length = self._file[rows], self._start[rows], self._len[rows]
        if (start < 0).any():
            raise ValueError("some detections have no mask")
        order = np.lexsort((start, file))
        # a new span where the file changes or the next mask starts far from the span's end
        end = start + length
        brk = np.ones(len(order), dtype=bool)
        brk[1:] = (file[order][1:] != file[order][:-1]) | (
            start[order][1:] - end[order][:-1] > self.GAP
        )
        bounds = np.append(np.flatnonzero(brk), len(order)).tolist()
        heights, widths = self._h[rows].tolist(), self._w[rows].tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            idx = order[a:b]
            lo, hi = int(start[idx].min()), int(end[idx].max())
            with open(self._paths[int(file[idx[0]])], "rb") as f:
                f.seek(lo)
                buf = f.read(hi - lo)
            for i, s, n in zip(idx.tolist(), (start[idx] - lo).tolist(), length[idx].tolist()):
                counts = buf[s : s + n].decode("ascii")
                out[i] = {"size": [heights[i], widths[i]], "counts": counts}
        return out


def read_shards(paths: Sequence[str]):
    """All rows of the shards as one table, ordered by image id, then within-image order.

    An image stored more than once (processed twice) keeps its first occurrence, in the order
    of ``paths``; a warning counts the others.

    Returns:
        (:class:`~.detections.DetectionTable`, number of distinct images processed).
    """
    rows, files, seen, total = [], [], set(), 0
    for index, path in enumerate(paths):
        for chunk in iter_chunks(path):
            total += len(chunk.entries)
            keep = np.isin(chunk.rows["entry"], first_entries(chunk, seen))
            rows.append(chunk.rows[keep])
            files.append(np.full(int(keep.sum()), index, dtype=np.int32))
    if total > len(seen):
        logger.warning(f"{total - len(seen)} images were processed more than once; kept the first.")
    rows = np.concatenate(rows) if rows else np.zeros(0, RECORD_DTYPE)
    files = np.concatenate(files) if files else np.zeros(0, np.int32)
    order = np.argsort(rows["image_id"], kind="stable")
    rows, files = rows[order], files[order]
    segm_score = rows["segm_score"]
    masks = None
    if len(rows) and (rows["counts_start"] >= 0).all():
        masks = ShardMasks(
            paths, files, rows["counts_start"], rows["counts_len"], rows["height"], rows["width"]
        )
    table = DetectionTable(
        image_id=rows["image_id"],
        category_id=rows["category_id"],
        score=rows["score"],
        segm_score=None if np.isnan(segm_score).all() else file_scores(rows),
        bbox=rows["bbox"],
        mask_area=rows["mask_area"] if masks is not None else None,
        masks=masks,
    )
    return table, len(seen)


def file_scores(rows: np.ndarray) -> np.ndarray:
    """The score the results file carries: the segm score where there is one."""
    return np.where(np.isnan(rows["segm_score"]), rows["score"], rows["segm_score"])


def first_entries(chunk: Chunk, seen: set) -> List[int]:
    """Entries of the chunk whose image was not seen before (and mark them seen)."""
    first = []
    for image_id, entry in chunk.entries.tolist():
        if image_id not in seen:
            seen.add(image_id)
            first.append(entry)
    return first


def shards_have_masks(paths: Sequence[str]) -> bool:
    """False if some stored detection has no mask (a model without a mask head)."""
    for path in paths:
        for chunk in iter_chunks(path):
            if (chunk.rows["counts_start"] < 0).any():
                return False
    return True


def table_to_records(table: DetectionTable, with_masks: bool = True) -> List[dict]:
    """LVIS records of a table's rows (``segm_score`` kept where it differs), for lvis-api."""
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
        for record, s in zip(records, table.segm_score.tolist()):
            record[SEGM_SCORE] = s
    return records
