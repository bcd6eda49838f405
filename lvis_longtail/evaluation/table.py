"""The one detection table of the evaluation, the rule that ranks it, and the protocols.

A :class:`DetectionTable` holds N detections as numpy arrays instead of N dicts (a 5,000-image
LVIS evaluation has 1.5 million), plus a :class:`MaskSource` that hands out compressed RLEs on
demand, so masks are only touched where an IoU or the results file needs them. The shards
(:mod:`.shards`) are read into one table, the protocol selects its rows once, and the results
file (:mod:`.results`) and both evaluators work on that selection.

Which score ranks a detection is decided in one place, :func:`ranking_score`: bbox by the box
score; segm and boundary (and the results file, whose ``score`` is what the LVIS server ranks
masks by) by the Mask Scoring score ``segm_score`` where there is one, else the box score.

The protocols (``TEST.EVAL_PROTOCOL``, :class:`EvalProtocol`):

- ``standard``: at most ``max_dets_per_image`` (300) detections per image across classes, the
  LVIS challenge rule (lvis-api's ``LVISResults(..., max_dets=300)``);
- ``fixed``: Fixed AP (Dave et al., "Evaluating Large-Vocabulary Object Detectors: The Devil
  is in the Details", 2021): the ``dets_per_class`` (10,000) best detections of each class over
  the whole split, no per-image cap. Inference must produce enough candidates: raise the
  model's own per-image cap ``TEST.DETECTIONS_PER_IMAGE`` (docs/config_keys.md);
  :class:`~.class_thresholds.ClassScoreThresholds` then drops, in ``process()``, every
  detection that can no longer reach its class's top ``dets_per_class`` before its mask is
  encoded;
- ``challenge2021``: the LVIS Challenge 2021's (lvis-api's ``lvis_challenge_2021`` branch):
  Fixed AP's selection, and Boundary AP (:mod:`.boundary`) evaluated with the other tasks.

Their selection rules are vectorized here, with lvis-api's tie-breaking:

- :func:`cap_per_image` (standard protocol): the ``k`` highest scores of each image; equal
  scores keep the earlier detection (lvis-api's ``LVISResults.limit_dets_per_image``);
- :func:`top_k_per_class` (Fixed AP): the ``k`` highest scores of each class over the whole
  split; equal scores keep the earlier detection in the table's order. Tables built by the
  results store are ordered by image id, then by the model's order within the image, so ties
  go to the lower image id (the exported file is written in that order too).
"""

import itertools
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_utils

from lvis_longtail.config_check import ENUMS

PROTOCOLS = ENUMS["TEST.EVAL_PROTOCOL"]


class LVISResultsError(ValueError):
    """A results record (or shard) breaks the LVIS results format or does not fit its split."""


SEGM_SCORE = "segm_score"  # the Mask Scoring score of a record, ranks segm

# pycocotools 2.0.11's ``area`` overflows on lists longer than 255 RLEs.
_AREA_CHUNK = 255


class MaskSource:
    """Compressed RLEs of a table's detections, by row index."""

    def rles(self, rows: np.ndarray) -> List[dict]:
        """``{"size": [h, w], "counts": str | bytes}`` of each row in ``rows`` (in order)."""
        raise NotImplementedError

    def sizes(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), 2) int64 ``[h, w]`` of each row's mask."""
        rles = self.rles(rows)
        return np.array([r["size"] for r in rles], dtype=np.int64).reshape(-1, 2)

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

    def sizes(self, rows):
        return self._parent.sizes(self._rows[np.asarray(rows, dtype=np.int64)])

    def take(self, rows):
        return _SubsetMasks(self._parent, self._rows[np.asarray(rows, dtype=np.int64)])


def rle_areas(rles: Sequence[dict]) -> np.ndarray:
    """Pixel counts of compressed RLEs, (N,) float64."""
    out = np.empty(len(rles), dtype=np.float64)
    for start in range(0, len(rles), _AREA_CHUNK):
        chunk = rles[start : start + _AREA_CHUNK]
        out[start : start + len(chunk)] = mask_utils.area(list(chunk))
    return out


def ranking_score(task: str, score: np.ndarray, segm_score: Optional[np.ndarray]) -> np.ndarray:
    """THE rule for which score ranks a detection (columns; NaN in ``segm_score`` = none).

    Args:
        task: "bbox", "segm", "boundary" (= segm's) or "file" (the results file's
            ``score``, = segm's).
        score: (N,) box scores.
        segm_score: (N,) Mask Scoring scores, or None.
    """
    if task == "bbox" or segm_score is None:
        return score
    return np.where(np.isnan(segm_score), score, segm_score)


def record_score(record: dict, task: str) -> float:
    """:func:`ranking_score` of one LVIS record (``segm_score`` key where present)."""
    if task == "bbox":
        return record["score"]
    return record.get(SEGM_SCORE, record["score"])


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
        """The score ``task`` ranks by (:func:`ranking_score`); "file" = the results file's."""
        return ranking_score(task, self.score, self.segm_score)

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
        count for segm and boundary (results without ``bbox``, as this project evaluates
        masks)."""
        if task == "bbox":
            return self.bbox[:, 2] * self.bbox[:, 3]
        if self.mask_area is None and len(self) == 0:
            return np.zeros(0)
        if self.mask_area is None:
            self.mask_area = rle_areas(self.masks.rles(np.arange(len(self))))
        return self.mask_area

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> "DetectionTable":
        """Columns of LVIS result records (fields as in :mod:`.results`), not copied: masks
        stay the records' own ``segmentation`` dicts. Records must already be valid
        (:func:`~lvis_longtail.evaluation.record_checks.validate_lvis_results`)."""
        n = len(records)

        def column(key, dtype):
            return np.fromiter((r[key] for r in records), dtype=dtype, count=n)

        segm_score = None
        if n and any(SEGM_SCORE in r for r in records):
            segm_score = np.fromiter(
                (record_score(r, "segm") for r in records), dtype=np.float64, count=n
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


def index_in_sorted(sorted_ids: np.ndarray, ids) -> np.ndarray:
    """(N,) int64 position of each of ``ids`` in the ascending ``sorted_ids``; -1 where absent."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(sorted_ids) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1)


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
    if k < 0 or not len(image_id) or np.unique(image_id, return_counts=True)[1].max() <= k:
        return np.ones(len(image_id), dtype=bool)  # nothing to cap (e.g. after preselect)
    return _rank_within(image_id, score) < k


def top_k_per_class(category_id: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Boolean (N,) mask of the ``k`` best-scoring rows of each category over all images
    (Fixed AP). Equal scores keep the earlier row."""
    if k < 0:
        return np.ones(len(category_id), dtype=bool)
    return _rank_within(category_id, score) < k


@dataclass(frozen=True)
class EvalProtocol:
    """Which detections are evaluated and exported.

    Attributes:
        name: "standard", "fixed" or "challenge2021".
        max_dets_per_image: per-image cap across classes (standard); -1 for the others.
        dets_per_class: per-class cap over the split (fixed, challenge2021); -1 for standard.
    """

    name: str = "standard"
    max_dets_per_image: int = 300
    dets_per_class: int = -1

    @classmethod
    def create(cls, name: str, max_dets_per_image: int = 300, dets_per_class: int = 10000):
        if name == "standard":
            if not (max_dets_per_image > 0 or max_dets_per_image == -1):
                raise ValueError(f"max_dets_per_image must be > 0 or -1, got {max_dets_per_image}")
            return cls("standard", max_dets_per_image, -1)
        if name in ("fixed", "challenge2021"):
            if dets_per_class <= 0:
                raise ValueError(f"dets_per_class must be > 0, got {dets_per_class}")
            return cls(name, -1, dets_per_class)
        raise ValueError(f"unknown LVIS evaluation protocol {name!r}; expected one of {PROTOCOLS}")

    def select(self, table: DetectionTable, task: str) -> np.ndarray:
        """Boolean (N,) mask of the rows the protocol keeps for ``task`` ("bbox", "segm" or
        "file"), ranked by its :func:`ranking_score`; the table must be in the tie-breaking
        order (image id, then the model's order: what :func:`~.shards.read_shards` gives)."""
        score = table.task_score(task)
        if self.per_class:
            return top_k_per_class(table.category_id, score, self.dets_per_class)
        return cap_per_image(table.image_id, score, self.max_dets_per_image)

    def select_table(self, table: DetectionTable, task: str) -> DetectionTable:
        """The detections evaluated for ``task``; standard leaves the per-image cap to the
        evaluator, which applies it as lvis-api does (after its own checks)."""
        if self.name == "standard":
            return table
        return self.apply(table, task)

    def apply(self, table: DetectionTable, task: str) -> DetectionTable:
        """The sub-table :meth:`select` keeps (the table itself, not a copy, if all rows)."""
        keep = self.select(table, task)
        return table if keep.all() else table.take(keep)

    @property
    def per_class(self) -> bool:
        """Whether detections are selected per class over the split (Fixed AP's rule)."""
        return self.dets_per_class > 0

    @property
    def required_tasks(self) -> Tuple[str, ...]:
        """Tasks the protocol evaluates whatever else is asked: the challenge's boundary."""
        return ("boundary",) if self.name == "challenge2021" else ()

    @property
    def eval_max_dets(self) -> int:
        """lvis-api's ``max_dets`` for this protocol (-1 = no per-image cap)."""
        return self.max_dets_per_image
