"""Boundary IoU (Cheng et al., "Boundary IoU: Improving Object-Centric Image Segmentation
Evaluation", CVPR 2021) for the fast evaluator, with the numbers of lvis-api's
``lvis_challenge_2021`` branch.

The boundary region of a binary mask M of an h x w image is M minus its erosion by a square of
side 2d + 1, d = max(1, round(ratio * sqrt(h^2 + w^2))) (:func:`dilation_pixels`; Python's
``round``, half to even; ratio 0.02 in the challenge), pixels outside the image counting as
background, so mask pixels within d of the image border are boundary. The boundary IoU of two
masks is the IoU of their boundary regions; detections are matched by min(mask IoU, boundary
IoU).

Everything works on each mask's bounding box (:mod:`.mask_crops`): the erosion of M lies inside
M, and a window that leaves the image also leaves the box, so eroding the box crop with
background padding is exactly the full-image result; a mask's boundary region has the mask's
box. IoUs follow pycocotools' ``rleIou`` bit for bit: intersection and union are integer pixel
counts, the IoU their float64 quotient, 0 when they do not intersect.

Boundaries are needed only where a pair's mask IoU reaches the lowest IoU threshold (below it
the minimum can never match; :func:`cell_ious`). Ground-truth boundaries are computed once per
mask and ratio and kept, compressed (:class:`BoundaryCache`); detections' are computed per
group of (image, category) cells, about ``PIXEL_BUDGET`` box pixels at a time, and dropped.
"""

import math
from typing import Callable, Dict, List, Sequence, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from lvis_longtail.evaluation.mask_crops import Crops

DILATION_RATIO = 0.02  # the LVIS Challenge 2021's
PIXEL_BUDGET = 1 << 24  # detection box pixels decoded at once (bytes of crops held)
_KERNELS: Dict[int, np.ndarray] = {}


def dilation_pixels(height: int, width: int, ratio: float = DILATION_RATIO) -> int:
    """The erosion radius d of an image: ``max(1, round(ratio * diagonal))``, half to even."""
    return max(1, int(round(ratio * math.sqrt(height * height + width * width))))


def _kernel(side: int) -> np.ndarray:
    if side not in _KERNELS:
        _KERNELS[side] = np.ones((side, side), dtype=np.uint8)
    return _KERNELS[side]


class MaskBoundaries:
    """Boundary regions of N masks.

    Attributes:
        box: (N, 4) int64 ``x0, y0, x1, y1`` (inclusive) of each mask's box, image pixels;
            x1 < x0 for an empty mask.
        area: (N,) int64 boundary pixel counts.
        crops: N uint8 0/1 arrays ``(box width, box height)``, the boundary over the box.
    """

    def __init__(self, box: np.ndarray, area: np.ndarray, crops: List[np.ndarray]):
        self.box, self.area, self.crops = box, area, crops

    def __len__(self) -> int:
        return len(self.crops)

    @classmethod
    def from_rles(cls, rles: Sequence[dict], ratio: float = DILATION_RATIO) -> "MaskBoundaries":
        """Boundary regions of compressed RLEs (each of its own image size)."""
        crops = Crops.from_rles(rles)
        b = crops.boxes
        radius = [dilation_pixels(*r["size"], ratio) for r in rles]
        out = [crops.crop(i) for i in range(len(crops))]
        for crop, d in zip(out, radius):  # each crop becomes its boundary, in place
            side = 2 * d + 1
            # a window wider or taller than the box always reaches background: all boundary
            if side <= min(crop.shape):
                kernel = _kernel(side)
                eroded = cv2.erode(crop, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
                np.subtract(crop, eroded, out=crop)
        area = np.fromiter(map(np.count_nonzero, out), np.int64, len(out))
        return cls(np.stack([b.x0, b.y0, b.x1, b.y1], 1).reshape(-1, 4), area, out)

    def take(self, index: Sequence[int]) -> "MaskBoundaries":
        index = np.asarray(index, dtype=np.int64)
        return MaskBoundaries(
            self.box[index], self.area[index], [self.crops[i] for i in index.tolist()]
        )


def pair_ious(dt: MaskBoundaries, dt_index, gt: MaskBoundaries, gt_index) -> np.ndarray:
    """(P,) float64 boundary IoUs of the pairs (``dt_index[p]``, ``gt_index[p]``), by
    pycocotools' rule: intersection over union of pixel counts, 0 without intersection."""
    dt_index, gt_index = np.asarray(dt_index, np.int64), np.asarray(gt_index, np.int64)
    d_box, g_box = dt.box[dt_index], gt.box[gt_index]
    lo, hi = np.maximum(d_box[:, :2], g_box[:, :2]), np.minimum(d_box[:, 2:], g_box[:, 2:])
    inter = np.zeros(len(dt_index), dtype=np.int64)
    overlap = np.flatnonzero((hi >= lo).all(1))
    # the overlap of the two boxes, in each crop's coordinates
    d_lo, d_hi = (lo - d_box[:, :2])[overlap].tolist(), (hi - d_box[:, :2] + 1)[overlap].tolist()
    g_lo, g_hi = (lo - g_box[:, :2])[overlap].tolist(), (hi - g_box[:, :2] + 1)[overlap].tolist()
    d_crops = [dt.crops[i] for i in dt_index[overlap].tolist()]
    g_crops = [gt.crops[i] for i in gt_index[overlap].tolist()]
    count = np.count_nonzero
    inter[overlap] = [
        count(a[a0:a1, b0:b1] & g[c0:c1, e0:e1])
        for a, g, (a0, b0), (a1, b1), (c0, e0), (c1, e1) in zip(
            d_crops, g_crops, d_lo, d_hi, g_lo, g_hi
        )
    ]
    union = dt.area[dt_index] + gt.area[gt_index] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(inter > 0, inter / union, 0.0)


class BoundaryCache:
    """Boundary regions of ground-truth masks, computed once per mask and kept as the
    compressed RLE of the boundary's crop (about the size of the mask's own RLE).

    Args:
        ratio: the dilation ratio.
        rles: ``rles(keys)``: the masks (compressed RLEs) of a list of keys.
    """

    def __init__(self, ratio: float, rles: Callable[[List[int]], List[dict]]):
        self.ratio, self._rles = ratio, rles
        self._store: Dict[int, Tuple[int, int, int, dict]] = {}

    def __len__(self) -> int:
        return len(self._store)

    def get(self, keys: Sequence[int]) -> MaskBoundaries:
        """The boundary regions of ``keys`` (any order, repeats allowed)."""
        keys = [int(k) for k in keys]
        unique = list(dict.fromkeys(keys))
        missing = [k for k in unique if k not in self._store]
        known = [k for k in unique if k in self._store]
        parts = []
        if missing:
            parts.append(self._compute(missing))
        if known:
            parts.append(self._decode(known))
        merged = parts[0] if len(parts) == 1 else _concatenate(*parts)
        position = {k: i for i, k in enumerate(missing + known)}
        return merged.take([position[k] for k in keys])

    def _compute(self, keys: List[int]) -> MaskBoundaries:
        computed = MaskBoundaries.from_rles(self._rles(keys), self.ratio)
        for i, key in enumerate(keys):
            crop = computed.crops[i]  # (width, height) C-ordered = (height, width) Fortran
            rle = mask_utils.encode(np.asfortranarray(crop.T[:, :, None]))[0] if crop.size else None
            x0, y0 = computed.box[i, :2].tolist()
            self._store[key] = (x0, y0, int(computed.area[i]), rle)
        return computed

    def _decode(self, keys: List[int]) -> MaskBoundaries:
        entries = [self._store[k] for k in keys]
        box = np.tile(np.array([[0, 0, -1, -1]], dtype=np.int64), (len(keys), 1))
        crops = [np.zeros((0, 0), np.uint8)] * len(keys)
        full = [i for i, e in enumerate(entries) if e[3] is not None]
        if not full:
            return MaskBoundaries(box, np.zeros(len(keys), np.int64), crops)
        decoded = Crops.from_rles([entries[i][3] for i in full])
        b = decoded.boxes  # a boundary spans its mask's box: the decoded box is the crop
        for j, i in enumerate(full):
            x0, y0 = entries[i][:2]
            box[i] = [x0, y0, x0 + b.x1[j], y0 + b.y1[j]]
            crops[i] = decoded.crop(j)
        area = np.array([e[2] for e in entries], dtype=np.int64)
        return MaskBoundaries(box, area, crops)


def _concatenate(a: MaskBoundaries, b: MaskBoundaries) -> MaskBoundaries:
    return MaskBoundaries(
        np.concatenate([a.box, b.box]), np.concatenate([a.area, b.area]), a.crops + b.crops
    )


def cell_ious(
    cells: Sequence[Tuple[np.ndarray, np.ndarray]],
    dt_rles: Sequence[dict],
    gt_rles: Callable[[np.ndarray], List[dict]],
    cache: BoundaryCache,
    min_iou: float = 0.5,
) -> List[np.ndarray]:
    """min(mask IoU, boundary IoU) of each (image, category) cell, the IoU lvis-api's challenge
    branch matches by.

    Boundaries are computed only where a match is possible: for the pairs whose mask IoU
    reaches ``min_iou`` (the lowest IoU threshold). Elsewhere min(mask IoU, boundary IoU) is
    below every threshold whatever the boundary IoU, so the pair's mask IoU stands in for it
    and the matching, hence AP and AR, are the same.

    Args:
        cells: per cell, (positions in ``dt_rles`` of its detections in matching order, its
            ground-truth keys); each has at least one of both.
        dt_rles: the detections' compressed RLEs.
        gt_rles: ``gt_rles(keys)``: the ground truth's RLEs (for the mask IoU).
        cache: the ground truth's boundaries, keyed as ``cells``.
        min_iou: the lowest IoU threshold.

    Returns:
        Per cell, the (D, G) float64 IoUs.
    """
    out, todo, g0 = [], [], 0
    gt_all = gt_rles(np.concatenate([g for _, g in cells])) if cells else []
    for c, (d_pos, g_keys) in enumerate(cells):
        d = [dt_rles[i] for i in d_pos.tolist()]
        g1 = g0 + len(g_keys)
        iou = np.asarray(mask_utils.iou(d, gt_all[g0:g1], [0] * len(g_keys)), dtype=np.float64)
        out.append(iou.reshape(len(d_pos), len(g_keys)))
        g0 = g1
        pairs = np.nonzero(out[c] >= min_iou)
        if len(pairs[0]):  # the candidates' detections and ground truth, and where each is
            rows, row_at = np.unique(pairs[0], return_inverse=True)
            cols, col_at = np.unique(pairs[1], return_inverse=True)
            todo.append((c, pairs, d_pos[rows], g_keys[cols], row_at, col_at))
    for group in _groups([t[2] for t in todo], dt_rles):
        parts = [todo[i] for i in group]
        dt_pos = np.concatenate([p[2] for p in parts]).tolist()
        dt_b = MaskBoundaries.from_rles([dt_rles[i] for i in dt_pos], cache.ratio)
        gt_b = cache.get(np.concatenate([p[3] for p in parts]))
        d_at, g_at = _offsets([p[4] for p in parts]), _offsets([p[5] for p in parts])
        bounds = pair_ious(dt_b, d_at, gt_b, g_at)
        ends = np.cumsum([len(p[1][0]) for p in parts])
        for (c, pairs, *_), values in zip(parts, np.split(bounds, ends[:-1])):
            out[c][pairs] = np.minimum(out[c][pairs], values)
    return out


def _offsets(local: List[np.ndarray]) -> np.ndarray:
    """Indices into the parts' concatenation: each part's ``local`` indices, shifted by the
    number of items (``max + 1``) of the parts before it."""
    sizes = [int(i.max()) + 1 for i in local]
    shift = np.cumsum([0] + sizes[:-1])
    return np.concatenate([i + s for i, s in zip(local, shift.tolist())])


def _groups(cell_positions: Sequence[np.ndarray], dt_rles) -> List[List[int]]:
    """Consecutive cells whose detections' boxes total about ``PIXEL_BUDGET`` pixels."""
    if not len(cell_positions):
        return []
    positions = np.concatenate(cell_positions)
    rles = [dt_rles[i] for i in positions.tolist()]
    boxes = np.concatenate(
        [mask_utils.toBbox(rles[i : i + 255]) for i in range(0, len(rles), 255)]
    ).reshape(-1, 4)
    ends = np.cumsum([len(p) for p in cell_positions])
    total = np.cumsum(boxes[:, 2] * boxes[:, 3])[ends - 1]
    groups, start = [], 0
    while start < len(cell_positions):
        base = total[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(total, base + PIXEL_BUDGET, side="right")))
        groups.append(list(range(start, stop)))
        start = stop
    return groups
