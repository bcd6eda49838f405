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

Ground-truth boundaries are computed once per mask and ratio and kept, compressed
(:class:`BoundaryCache`); detections' are computed per group of (image, category) cells
(:func:`cell_ious`), about ``PIXEL_BUDGET`` box pixels at a time, and dropped.
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
        for i, (crop, d) in enumerate(zip(out, radius)):
            side = 2 * d + 1
            # a window wider or taller than the box always reaches background: all boundary
            if side <= min(crop.shape):
                kernel = _kernel(side)
                eroded = cv2.erode(crop, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
                np.subtract(crop, eroded, out=crop)
            out[i] = crop
        area = np.fromiter(map(np.count_nonzero, out), np.int64, len(out))
        return cls(np.stack([b.x0, b.y0, b.x1, b.y1], 1).reshape(-1, 4), area, out)

    def take(self, index: Sequence[int]) -> "MaskBoundaries":
        index = np.asarray(index, dtype=np.int64)
        return MaskBoundaries(
            self.box[index], self.area[index], [self.crops[i] for i in index.tolist()]
        )


def boundary_ious(dt: MaskBoundaries, gt: MaskBoundaries) -> np.ndarray:
    """(D, G) float64 boundary IoUs (pycocotools' rule: intersection / union of pixel
    counts, 0 without intersection)."""
    lo = np.maximum(dt.box[:, None, :2], gt.box[None, :, :2])  # (D, G, 2) x, y
    hi = np.minimum(dt.box[:, None, 2:], gt.box[None, :, 2:])
    inter = np.zeros((len(dt), len(gt)), dtype=np.int64)
    for i, j in zip(*np.nonzero((hi >= lo).all(-1))):
        (x0, y0), (x1, y1) = lo[i, j].tolist(), hi[i, j].tolist()
        dx, dy, gx, gy = *dt.box[i, :2].tolist(), *gt.box[j, :2].tolist()
        a = dt.crops[i][x0 - dx : x1 - dx + 1, y0 - dy : y1 - dy + 1]
        b = gt.crops[j][x0 - gx : x1 - gx + 1, y0 - gy : y1 - gy + 1]
        inter[i, j] = np.count_nonzero(a & b)
    union = dt.area[:, None] + gt.area[None, :] - inter
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
    out, needed, g0 = [], [], 0
    gt_all = gt_rles(np.concatenate([g for _, g in cells])) if cells else []
    for d_pos, g_keys in cells:
        d = [dt_rles[i] for i in d_pos.tolist()]
        g1 = g0 + len(g_keys)
        iou = np.asarray(mask_utils.iou(d, gt_all[g0:g1], [0] * len(g_keys)), dtype=np.float64)
        iou = iou.reshape(len(d_pos), len(g_keys))
        candidate = iou >= min_iou
        needed.append((np.flatnonzero(candidate.any(1)), np.flatnonzero(candidate.any(0))))
        out.append(iou)
        g0 = g1
    cells = [(c, cells[c][0][rows], cells[c][1][cols]) for c, (rows, cols) in enumerate(needed)]
    cells = [cell for cell in cells if len(cell[1])]
    for group in _groups([d for _, d, _ in cells], dt_rles):
        rows = [cells[i][1] for i in group]
        dt_b = MaskBoundaries.from_rles([dt_rles[i] for i in np.concatenate(rows)], cache.ratio)
        gt_b = cache.get(np.concatenate([cells[i][2] for i in group]))
        d0 = g0 = 0
        for i in group:
            c, d_pos, g_keys = cells[i]
            d1, g1 = d0 + len(d_pos), g0 + len(g_keys)
            block = np.ix_(*needed[c])
            bounds = boundary_ious(dt_b.take(range(d0, d1)), gt_b.take(range(g0, g1)))
            out[c][block] = np.minimum(out[c][block], bounds)
            d0, g0 = d1, g1
    return out


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
