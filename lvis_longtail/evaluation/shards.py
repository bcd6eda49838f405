"""Stream detections of many images to per-rank shard files, and read them back once.

The evaluator's ``process()`` (and any other producer of per-image ``Instances``, e.g. a
pseudo-label exporter) appends each image's detections as table rows to its process's shard
(:class:`DetectionShard`, or :class:`ShardedDetections`, which also names, gathers across ranks
and removes the shards); memory holds at most ``flush_every`` images. :func:`read_shards` reads
all shards once into one :class:`~.table.DetectionTable` ordered by image id, then by the
model's order within the image; masks stay in the files and are read back by offset only where
an IoU or the results file needs them. A chunk is::

    b"LVISREC1" | int64 [num_rows, num_entries, blob_bytes]
    | entries: (image_id, entry) int64 pairs, one per add() (images without detections too)
    | rows: RECORD_DTYPE x num_rows | blob: the masks' compressed-RLE counts, ASCII
"""

import logging
import os
import shutil
import tempfile
from typing import Iterator, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np
from detectron2.utils import comm

from lvis_longtail.evaluation.rows import RECORD_DTYPE, instances_to_rows, records_to_rows
from lvis_longtail.evaluation.table import (
    DetectionTable,
    LVISResultsError,
    MaskSource,
)

logger = logging.getLogger(__name__)

MAGIC = b"LVISREC1"
ENTRY_DTYPE = np.dtype([("image_id", "<i8"), ("entry", "<i8")])
_HEADER = np.dtype("<i8")


class DetectionShard:
    """Append-only shard of one process's detections.

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

    def add_instances(self, image_id: int, instances, dataset_ids: Mapping[int, int]) -> None:
        """Store one processed image's ``Instances`` (see :func:`instances_to_rows`)."""
        self._check_open()
        self._append(image_id, *instances_to_rows(
            instances, image_id, dataset_ids, self.num_images, self._blob_size))  # fmt: skip

    def add(self, image_id: int, records: Sequence[dict]) -> None:
        """Store one processed image's LVIS records (possibly none)."""
        self._check_open()
        self._append(image_id, *records_to_rows(records, self.num_images, self._blob_size))

    def _check_open(self):
        if self._file is None:
            raise RuntimeError(f"{self.path}: the shard is closed")

    def _append(self, image_id, rows, blob) -> None:
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
    rows: Optional[np.ndarray]  # RECORD_DTYPE, counts_start made absolute file offsets
    blob: Optional[bytes]  # with_blob only; offsets relative to blob_offset
    blob_offset: int
    num_rows: int


def iter_chunks(path: str, with_blob: bool = False, with_rows: bool = True) -> Iterator[Chunk]:
    """The chunks of a shard file (``with_rows=False``: headers and entries only, rows None).
    Raises LVISResultsError if it is truncated or corrupt."""
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
            rows = None
            if with_rows:
                rows = np.frombuffer(f.read(num_rows * RECORD_DTYPE.itemsize), RECORD_DTYPE)
                rows = rows.copy()
            else:
                f.seek(num_rows * RECORD_DTYPE.itemsize, os.SEEK_CUR)
            blob_offset = f.tell()
            blob = f.read(blob_len) if with_blob else None
            if not with_blob:
                f.seek(blob_len, os.SEEK_CUR)
            if rows is not None:
                has_mask = rows["counts_start"] >= 0
                rows["counts_start"][has_mask] += blob_offset
            yield Chunk(entries, rows, blob, blob_offset, num_rows)
            index += 1


class ShardMasks(MaskSource):
    """Masks of rows read back from shard files by offset (contiguous spans in one read)."""

    GAP = 1 << 16

    def __init__(self, paths, file_index, start, length, height, width):
        self._paths = list(paths)
        self._file, self._start, self._len = file_index, start, length
        self._h, self._w = height, width

    def sizes(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        return np.stack([self._h[rows], self._w[rows]], 1).astype(np.int64)

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


# the RECORD_DTYPE fields a table keeps, each read into its own contiguous column
_TABLE_COLUMNS = (
    "image_id", "category_id", "score", "segm_score", "bbox", "height", "width", "mask_area",
    "counts_start", "counts_len",
)  # fmt: skip


def read_shards(paths: Sequence[str]):
    """All rows of the shards, read once, as one table ordered by image id, then by the
    model's order within the image (the protocols' tie-break).

    An image stored more than once (processed twice) keeps its first occurrence, in the order
    of ``paths``; a warning counts the others. ``table.masks`` is None unless every row has a
    mask (a model without a mask head). Memory: the table's columns (~100 bytes a detection,
    allocated once from the chunk headers), plus one column's worth if the shards are not in
    image order; the masks stay in the files.

    Returns:
        (:class:`~.table.DetectionTable`, number of distinct images processed).
    """
    # the chunk headers first (a seek per chunk): the columns are allocated once, then filled
    capacity = sum(c.num_rows for path in paths for c in iter_chunks(path, with_rows=False))
    cols = {name: np.empty((capacity,) + RECORD_DTYPE[name].shape, RECORD_DTYPE[name].base)
            for name in _TABLE_COLUMNS}  # fmt: skip
    cols["file"] = np.empty(capacity, np.int32)
    seen, total, filled = set(), 0, 0
    for index, path in enumerate(paths):
        for chunk in iter_chunks(path):
            total += len(chunk.entries)
            kept = chunk.rows[np.isin(chunk.rows["entry"], first_entries(chunk, seen))]
            end = filled + len(kept)
            for name in _TABLE_COLUMNS:
                cols[name][filled:end] = kept[name]
            cols["file"][filled:end] = index
            filled = end
    if total > len(seen):
        logger.warning(f"{total - len(seen)} images were processed more than once; kept the first.")
    cols = {name: col[:filled] for name, col in cols.items()}
    image_id = cols["image_id"]
    if len(image_id) > 1 and (image_id[1:] < image_id[:-1]).any():  # not already in order
        order = np.argsort(image_id, kind="stable")
        for name in cols:
            cols[name] = cols[name][order]
        del order
    masks = None
    if len(image_id) and (cols["counts_start"] >= 0).all():
        masks = ShardMasks(
            paths, cols["file"], cols["counts_start"], cols["counts_len"], cols["height"],
            cols["width"],
        )  # fmt: skip
    segm_score = cols["segm_score"]
    table = DetectionTable(
        image_id=cols["image_id"],
        category_id=cols["category_id"],
        score=cols["score"],
        segm_score=None if np.isnan(segm_score).all() else segm_score,
        bbox=cols["bbox"],
        mask_area=cols["mask_area"] if masks is not None else None,
        masks=masks,
    )
    return table, len(seen)


def first_entries(chunk: Chunk, seen: set) -> List[int]:
    """Entries of the chunk whose image was not seen before (and mark them seen)."""
    first = []
    for image_id, entry in chunk.entries.tolist():
        if image_id not in seen:
            seen.add(image_id)
            first.append(entry)
    return first


class ShardedDetections:
    """Per-rank shards of one stream of detections: write, gather on the main process, read
    once, remove. What ``LVISLongTailEvaluator`` uses, reusable by any per-image producer.

    Args:
        folder: where the shards go (None: a temporary folder, removed by :meth:`discard`).
        name: the stream's name (the shard of rank r is ``<name>.rank<r>.shard``).
        flush_every: images buffered in memory per rank.
    """

    def __init__(self, folder: Optional[str], name: str, flush_every: int = 32):
        self.folder, self.name, self.flush_every = folder, name, flush_every
        self._shard: Optional[DetectionShard] = None
        self._tmp_dir: Optional[str] = None
        self._received: List[str] = []

    @property
    def shard(self) -> DetectionShard:
        """This process's shard, created on first use."""
        if self._shard is None:
            folder = self.folder
            if folder is None:
                self._tmp_dir = folder = tempfile.mkdtemp(prefix="lvis_shards_")
            path = os.path.join(folder, f"{self.name}.rank{comm.get_rank()}.shard")
            self._shard = DetectionShard(path, self.flush_every)
        return self._shard

    def gather(self, distributed: bool = True) -> Optional[List[str]]:
        """Close this rank's shard; on the main process, the paths of every rank's shard
        (shards it cannot see, without a shared disk, travel by ``comm.gather``); None on
        the others."""
        shard = self.shard
        shard.close()
        if not distributed or comm.get_world_size() == 1:
            return [shard.path]
        comm.synchronize()
        paths = comm.all_gather(shard.path)
        visible = comm.all_gather(
            [os.path.exists(p) for p in paths] if comm.is_main_process() else None
        )[0]
        own = None
        if not visible[comm.get_rank()]:
            with open(shard.path, "rb") as f:
                own = f.read()
        payloads = comm.gather(own, dst=0)
        if not comm.is_main_process():
            if own is not None:  # sent: the main process has its copy
                self.discard()
            return None
        for rank, data in enumerate(payloads):
            if data is not None:
                paths[rank] = os.path.join(
                    os.path.dirname(shard.path), f"{self.name}.received.rank{rank}.shard"
                )
                with open(paths[rank], "wb") as f:
                    f.write(data)
                self._received.append(paths[rank])
        return paths

    def discard(self, paths: Sequence[str] = ()) -> None:
        """Delete this rank's shard, received copies and ``paths``; remove an empty folder."""
        if self._shard is not None:
            self._shard.close()
        for path in [*paths, *self._received] + ([self._shard.path] if self._shard else []):
            if os.path.exists(path):
                os.remove(path)
        if self._shard is not None:
            folder = os.path.dirname(self._shard.path)
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        if self._tmp_dir:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
        self._shard = self._tmp_dir = None
        self._received = []
