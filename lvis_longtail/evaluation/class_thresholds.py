"""Fixed AP's per-class score thresholds, kept while detections stream in.

Under the ``fixed`` and ``challenge2021`` protocols (:class:`~.table.EvalProtocol`) only the
``dets_per_class`` best detections of each class over the split are evaluated. The evaluator's
``process()`` asks :class:`ClassScoreThresholds` which detections can still reach their class's
top ``k`` and drops the others before their masks are encoded.
"""

from typing import Dict, List, Sequence, Union

import numpy as np
import torch

__all__ = ["ClassScoreThresholds"]


Tensorish = Union[torch.Tensor, np.ndarray, Sequence]


class ClassScoreThresholds:
    """Running ``k``-th best score of each class (Fixed AP's per-class score thresholds),
    in tensor code (no loop over classes).

    A detection scoring below its class's threshold can never be among the class's ``k``
    best: at least ``k`` detections already score at or above it. Equal scores are kept (the
    tie-break decides later). The candidates seen are compacted to each class's ``k`` best
    whenever the pending ones outnumber the retained ones (amortized O(n log n)); memory: at
    most ``k`` retained scores per class plus as many pending.
    """

    def __init__(self, k: int):
        self.k = k
        self._threshold = torch.zeros(0, dtype=torch.float64)
        self._classes = torch.zeros(0, dtype=torch.int64)
        self._scores = torch.zeros(0, dtype=torch.float64)
        self._pending: List[tuple] = []
        self._num_pending = 0

    def thresholds(self, classes: Tensorish) -> torch.Tensor:
        """(N,) float64: scores below these can be dropped (-inf: fewer than ``k`` seen)."""
        classes = torch.as_tensor(classes, dtype=torch.int64)
        out = torch.full(classes.shape, -torch.inf, dtype=torch.float64)
        inside = (classes >= 0) & (classes < len(self._threshold))
        out[inside] = self._threshold[classes[inside]]
        return out

    def threshold(self, category: int) -> float:
        return float(self.thresholds([category])[0])

    def keep(self, classes: Tensorish, scores: Tensorish) -> torch.Tensor:
        """(N,) bool: the detections that may still be in their class's top ``k``."""
        scores = torch.as_tensor(scores).to(torch.float64)
        return scores >= self.thresholds(classes)

    def update(self, classes: Tensorish, scores: Tensorish) -> None:
        """Account for kept detections (of one image or more)."""
        classes = torch.as_tensor(classes, dtype=torch.int64).reshape(-1)
        scores = torch.as_tensor(scores).to(torch.float64).reshape(-1)
        if not len(classes):
            return
        self._pending.append((classes, scores))
        self._num_pending += len(classes)
        if self._num_pending >= max(len(self._classes), self.k):
            self._compact()

    def _compact(self) -> None:
        classes = torch.cat([self._classes] + [c for c, _ in self._pending])
        scores = torch.cat([self._scores] + [s for _, s in self._pending])
        self._pending, self._num_pending = [], 0
        order = torch.argsort(-scores, stable=True)
        order = order[torch.argsort(classes[order], stable=True)]  # class, then score desc
        classes, scores = classes[order], scores[order]
        n = len(classes)
        is_start = torch.ones(n, dtype=torch.bool)
        is_start[1:] = classes[1:] != classes[:-1]
        positions = torch.arange(n)
        start = torch.cummax(torch.where(is_start, positions, 0), 0).values
        rank = positions - start
        kth = rank == self.k - 1
        if kth.any():
            size = int(classes.max()) + 1
            if size > len(self._threshold):
                grown = torch.full((size,), -torch.inf, dtype=torch.float64)
                grown[: len(self._threshold)] = self._threshold
                self._threshold = grown
            cls = classes[kth]
            self._threshold[cls] = torch.maximum(self._threshold[cls], scores[kth])
        keep = rank < self.k
        self._classes, self._scores = classes[keep], scores[keep]

    def finalize(self) -> Dict[int, float]:
        """Compact what is pending; ``{class: threshold}`` of the classes with ``k``+."""
        if self._pending:
            self._compact()
        known = torch.isfinite(self._threshold).nonzero().flatten().tolist()
        return {c: float(self._threshold[c]) for c in known}
