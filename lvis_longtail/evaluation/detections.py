"""Detections as columns: what the fast LVIS evaluator and the results store work on.

A :class:`DetectionTable` holds N detections as numpy arrays instead of N dicts (a 5,000-image
LVIS evaluation has 1.5 million), plus a :class:`MaskSource` that hands out compressed RLEs on
demand, so masks are only touched where an IoU needs them. The two selection rules of the
protocols are vectorized here, with lvis-api's tie-breaking:

- :func:`cap_per_image` (standard protocol): the ``k`` highest scores of each image; equal
  scores keep the earlier detection (lvis-api's ``LVISResults.limit_dets_per_image``);
- :func:`top_k_per_class` (Fixed AP): the ``k`` highest scores of each class over the whole
  split; equal scores keep the earlier detection in the table's order. Tables built by the
  results store are ordered by image id, then by the model's order within the image, so ties
  go to the lower image id (the exported file is written in that order too).
"""

import itertools
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from lvis_longtail.utils.io import gc_paused  # noqa: F401  (re-exported)

# pycocotools 2.0.11's ``area`` overflows on lists longer than 255 RLEs.
_AREA_CHUNK = 255


class MaskSource:
    """Compressed RLEs of a table's detections, by row index."""

    def rles(self, rows: np.ndarray) -> List[dict]:
        """``{"size": [h, w], "counts": str | bytes}`` of each row in ``rows`` (in order)."""
        raise NotImplementedError

    def take(self, rows: np.ndarray) -> "MaskSource":
        """The source of the sub-table ``rows``."""
        return _SubsetMasks(self, np.asarray(rows, dtype=np.int64))


class ListMasks(MaskSource):
    """RLE dicts held in a list (e.g. the ``segmentation`` fields of loaded records)."""

    def __init__(self, segmentations: Sequence[dict]):
        self._segm = segmentations

    def __len__(self):
        return len(self._segm)

    def rles(self, rows):
        segm = self._segm
        return [segm[i] for i in np.asarray(rows).tolist()]


class _SubsetMasks(MaskSource):
    def __init__(self, parent: MaskSource, rows: np.ndarray):
        self._parent, self._rows = parent, rows

    def rles(self, rows):
        return self._parent.rles(self._rows[np.asarray(rows, dtype=np.int64)])

    def take(self, rows):
        return _SubsetMasks(self._parent, self._rows[np.asarray(rows, dtype=np.int64)])


def rle_areas(rles: Sequence[dict]) -> np.ndarray:
    """Pixel counts of compressed RLEs, (N,) float64."""
    out = np.empty(len(rles), dtype=np.float64)
    for start in range(0, len(rles), _AREA_CHUNK):
        chunk = rles[start : start + _AREA_CHUNK]
        out[start : start + len(chunk)] = mask_utils.area(list(chunk))
    return out


@dataclass
class DetectionTable:
    """N detections as columns, in the results' order.

    Attributes:
        image_id: (N,) int64 dataset image ids.
        category_id: (N,) int64 dataset category ids.
        score: (N,) float64, the box score (bbox ranks by it; segm too without ``segm_score``).
        segm_score: (N,) float64 score segm ranks by (Mask Scoring), or None.
        bbox: (N, 4) float64 ``[x, y, w, h]``, or None (segm-only results).
        mask_area: (N,) float64 mask pixel counts, or None (computed from ``masks`` if needed).
        masks: the RLEs, or None (bbox-only results).
    """

    image_id: np.ndarray
    category_id: np.ndarray
    score: np.ndarray
    segm_score: Optional[np.ndarray] = None
    bbox: Optional[np.ndarray] = None
    mask_area: Optional[np.ndarray] = None
    masks: Optional[MaskSource] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.image_id)

    def task_score(self, task: str) -> np.ndarray:
        """The score ``task`` ranks by: ``segm_score`` for segm where there is one."""
        if task == "segm" and self.segm_score is not None:
            return self.segm_score
        return self.score

    def take(self, rows) -> "DetectionTable":
        """The sub-table of ``rows`` (indices or a boolean mask), in that order."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)

        def sub(a):
            return None if a is None else a[rows]

        return replace(
            self,
            image_id=self.image_id[rows],
            category_id=self.category_id[rows],
            score=self.score[rows],
            segm_score=sub(self.segm_score),
            bbox=sub(self.bbox),
            mask_area=sub(self.mask_area),
            masks=None if self.masks is None else self.masks.take(rows),
        )

    def areas(self, task: str) -> np.ndarray:
        """What lvis-api calls a detection's area: ``w * h`` for bbox, the mask's pixel
        count for segm (results without ``bbox``, as this project evaluates segm)."""
        if task == "bbox":
            return self.bbox[:, 2] * self.bbox[:, 3]
        if self.mask_area is None and len(self) == 0:
            return np.zeros(0)
        if self.mask_area is None:
            self.mask_area = rle_areas(self.masks.rles(np.arange(len(self))))
        return self.mask_area

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> "DetectionTable":
        """Columns of LVIS result records (fields as in :mod:`.export`), not copied: masks
        stay the records' own ``segmentation`` dicts. Records must already be valid
        (:func:`~lvis_longtail.evaluation.validation.validate_lvis_results`)."""
        n = len(records)

        def column(key, dtype):
            return np.fromiter((r[key] for r in records), dtype=dtype, count=n)

        segm_score = None
        if n and any("segm_score" in r for r in records):
            segm_score = np.fromiter(
                (r.get("segm_score", r["score"]) for r in records), dtype=np.float64, count=n
            )
        bbox = None
        if n == 0 or all("bbox" in r for r in records):
            bbox = np.fromiter(
                itertools.chain.from_iterable(r["bbox"] for r in records),
                dtype=np.float64,
                count=4 * n,
            ).reshape(n, 4)
        masks = None
        if n and all("segmentation" in r for r in records):
            masks = ListMasks([r["segmentation"] for r in records])
        return cls(
            image_id=column("image_id", np.int64),
            category_id=column("category_id", np.int64),
            score=column("score", np.float64),
            segm_score=segm_score,
            bbox=bbox,
            masks=masks,
        )


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """For each position of a sorted key array, the position where its group starts."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    is_start = np.empty(n, dtype=bool)
    is_start[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    return starts[np.cumsum(is_start) - 1]


def _rank_within(groups: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Rank (0 = best) of each row within its group: score descending, then row order."""
    n = len(groups)
    order = np.lexsort((np.arange(n), -score, groups))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - _group_starts(groups[order])
    return rank


def cap_per_image(image_id: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Boolean (N,) mask of the ``k`` best-scoring rows of each image (all if ``k`` < 0).

    Equal scores keep the earlier row, like lvis-api's ``LVISResults`` (a stable sort)."""
    if k < 0:
        return np.ones(len(image_id), dtype=bool)
    return _rank_within(image_id, score) < k


def top_k_per_class(category_id: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Boolean (N,) mask of the ``k`` best-scoring rows of each category over all images
    (Fixed AP). Equal scores keep the earlier row."""
    if k < 0:
        return np.ones(len(category_id), dtype=bool)
    return _rank_within(category_id, score) < k
