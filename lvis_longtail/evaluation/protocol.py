"""The two LVIS evaluation protocols (``TEST.EVAL_PROTOCOL``) and Fixed AP's score thresholds.

- ``standard``: at most ``max_dets_per_image`` (300) detections per image across classes, the
  LVIS challenge rule (lvis-api's ``LVISResults(..., max_dets=300)``).
- ``fixed``: Fixed AP (Dave et al., "Evaluating Large-Vocabulary Object Detectors: The Devil
  is in the Details", 2021): the ``dets_per_class`` (10,000) best detections of each class over
  the whole split, no per-image cap. Equal scores keep the detection of the lower image id,
  then the model's order within the image (the order the results store yields). Inference must
  produce enough candidates: raise the model's own per-image cap ``TEST.DETECTIONS_PER_IMAGE``
  (see ``config.py``); :class:`ClassScoreThresholds` then drops, before masks are encoded,
  every detection that can no longer reach its class's top ``dets_per_class``.
"""

from dataclasses import dataclass
from typing import Dict

import numpy as np

from lvis_longtail.evaluation.detections import DetectionTable, cap_per_image, top_k_per_class

PROTOCOLS = ("standard", "fixed")


@dataclass(frozen=True)
class EvalProtocol:
    """Which detections are evaluated and exported.

    Attributes:
        name: "standard" or "fixed".
        max_dets_per_image: per-image cap across classes (standard); -1 for fixed.
        dets_per_class: per-class cap over the split (fixed); -1 for standard.
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
        if name == "fixed":
            if dets_per_class <= 0:
                raise ValueError(f"dets_per_class must be > 0, got {dets_per_class}")
            return cls("fixed", -1, dets_per_class)
        raise ValueError(f"unknown LVIS evaluation protocol {name!r}; expected one of {PROTOCOLS}")

    def select(self, image_id: np.ndarray, category_id: np.ndarray, score: np.ndarray):
        """Boolean (N,) mask of the rows the protocol keeps, ranked by ``score``; rows must
        be in the tie-breaking order (lower image id first for Fixed AP)."""
        if self.name == "fixed":
            return top_k_per_class(category_id, score, self.dets_per_class)
        return cap_per_image(image_id, score, self.max_dets_per_image)

    def select_table(self, table: DetectionTable, task: str) -> DetectionTable:
        """The detections evaluated for ``task`` (ranked by its score); standard leaves the
        per-image cap to the evaluator, which applies it as lvis-api does."""
        if self.name == "standard":
            return table
        keep = self.select(table.image_id, table.category_id, table.task_score(task))
        return table.take(keep)

    @property
    def eval_max_dets(self) -> int:
        """lvis-api's ``max_dets`` for this protocol (-1 = no per-image cap)."""
        return self.max_dets_per_image


class ClassScoreThresholds:
    """Running ``k``-th best score of each class (Fixed AP's per-class score thresholds).

    A detection scoring below its class's threshold can never be among the class's ``k``
    best: at least ``k`` detections already score at or above it. Equal scores are kept (the
    tie-break decides later). Memory: at most ``2 k`` scores per class seen.
    """

    def __init__(self, k: int):
        self.k = k
        self._top: Dict[int, np.ndarray] = {}
        self._pending: Dict[int, list] = {}
        self._count: Dict[int, int] = {}
        self._threshold: Dict[int, float] = {}

    def threshold(self, category_id: int) -> float:
        """Scores below this can be dropped (-inf until ``k`` detections were seen)."""
        return self._threshold.get(category_id, -np.inf)

    def thresholds(self, category_ids: np.ndarray) -> np.ndarray:
        get = self._threshold.get
        return np.array([get(c, -np.inf) for c in category_ids.tolist()], dtype=np.float64)

    def keep(self, category_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Boolean mask of the detections that may still be in their class's top ``k``."""
        return np.asarray(scores, dtype=np.float64) >= self.thresholds(np.asarray(category_ids))

    def update(self, category_ids: np.ndarray, scores: np.ndarray) -> None:
        """Account for kept detections of one image."""
        category_ids = np.asarray(category_ids, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float64)
        order = np.argsort(category_ids, kind="stable")
        cats, starts = np.unique(category_ids[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        for cat, s, e in zip(cats.tolist(), starts.tolist(), ends.tolist()):
            self._pending.setdefault(cat, []).append(scores[order[s:e]])
            self._count[cat] = self._count.get(cat, 0) + e - s
            if self._count[cat] >= 2 * self.k:
                self._merge(cat)

    def _merge(self, cat: int) -> None:
        parts = self._pending.pop(cat, [])
        top = np.concatenate([self._top.get(cat, np.zeros(0)), *parts])
        if len(top) >= self.k:
            top = np.partition(top, len(top) - self.k)[len(top) - self.k :]
            self._threshold[cat] = max(self._threshold.get(cat, -np.inf), float(top.min()))
        self._top[cat] = top
        self._count[cat] = len(top)

    def finalize(self) -> Dict[int, float]:
        """Merge everything pending; ``{category id: threshold}`` of classes with ``k``+."""
        for cat in list(self._pending):
            self._merge(cat)
        return dict(self._threshold)
