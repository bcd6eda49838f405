"""Binary masks as crops over their bounding boxes, decoded straight from compressed RLEs.

pycocotools decodes a mask to the whole image (h x w bytes, and slowly), which is most of the
cost of anything that needs a mask's pixels. :class:`Crops` decodes many compressed RLEs at
once with numpy, writing only each mask's bounding box: the RLE strings are parsed in one pass
(:func:`~lvis_longtail.utils.rle.decode_counts`, pycocotools' ``rleFrString`` vectorized),
each foreground run becomes one interval of its crop, and all crops are filled by one
``np.repeat``.

A crop is stored transposed, ``(box width, box height)`` C-ordered, which is the RLE's
column-major order: a run that crosses a column makes its box span every row, so each run is one
contiguous interval of the crop.
"""

from typing import NamedTuple, Sequence

import numpy as np

from lvis_longtail.utils.rle import decode_counts, segment_cumsum


class Boxes(NamedTuple):
    """Masks' bounding boxes in pixels, inclusive: (N,) int64 each; ``x1 < x0`` when empty."""

    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray

    @property
    def width(self) -> np.ndarray:
        return np.maximum(self.x1 - self.x0 + 1, 0)

    @property
    def height(self) -> np.ndarray:
        return np.maximum(self.y1 - self.y0 + 1, 0)


class _Runs(NamedTuple):
    mask: np.ndarray  # (R,) mask index of each foreground run
    start: np.ndarray  # (R,) first pixel, column-major index
    end: np.ndarray  # (R,) last pixel (inclusive)
    height: np.ndarray  # (R,) image height of the run's mask


def _foreground_runs(counts, bounds, heights) -> _Runs:
    per_mask = np.diff(bounds)
    mask = np.repeat(np.arange(len(per_mask)), per_mask)
    if len(counts):
        position = segment_cumsum(counts, bounds[:-1][per_mask > 0])
    else:
        position = counts
    index = np.arange(len(counts)) - np.repeat(bounds[:-1], per_mask)
    fg = np.flatnonzero((index % 2 == 1) & (counts > 0))
    mask = mask[fg]
    return _Runs(mask, position[fg] - counts[fg], position[fg] - 1, heights[mask])


def _boxes(runs: _Runs, num_masks: int) -> Boxes:
    """Bounding boxes from the runs (grouped by mask, in pixel order)."""
    h = runs.height
    c0, c1 = runs.start // h, runs.end // h
    # a run across columns covers the last row of one column and the first of the next
    across = c1 > c0
    r0 = np.where(across, 0, runs.start % h)
    r1 = np.where(across, h - 1, runs.end % h)
    x0, y0 = np.zeros(num_masks, np.int64), np.zeros(num_masks, np.int64)
    x1, y1 = np.full(num_masks, -1), np.full(num_masks, -1)
    if len(runs.mask):
        first = np.flatnonzero(np.r_[True, runs.mask[1:] != runs.mask[:-1]])
        last = np.r_[first[1:], len(runs.mask)] - 1
        has = runs.mask[first]
        x0[has], x1[has] = c0[first], c1[last]
        y0[has] = np.minimum.reduceat(r0, first)
        y1[has] = np.maximum.reduceat(r1, first)
    return Boxes(x0, y0, x1, y1)


class Crops:
    """Binary crops of N masks over their bounding boxes, in one flat uint8 buffer.

    Attributes:
        boxes: the masks' :class:`Boxes` (image pixels).
        offsets: (N + 1,) int64: crop i is ``flat[offsets[i]:offsets[i + 1]]``, shaped
            ``(box width, box height)`` (transposed, see the module docstring).
        flat: uint8 0/1 pixels of all crops.
    """

    def __init__(self, boxes: Boxes, flat: np.ndarray, offsets: np.ndarray):
        self.boxes, self.flat, self.offsets = boxes, flat, offsets
        self._shapes = list(zip(boxes.width.tolist(), boxes.height.tolist()))
        self._starts = offsets.tolist()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def crop(self, i: int) -> np.ndarray:
        """(box width, box height) uint8 view of mask ``i``'s crop."""
        return self.flat[self._starts[i] : self._starts[i + 1]].reshape(self._shapes[i])

    def areas(self) -> np.ndarray:
        """(N,) int64 pixel counts."""
        count = np.count_nonzero
        return np.array([count(self.crop(i)) for i in range(len(self))], dtype=np.int64)

    @classmethod
    def from_rles(cls, rles: Sequence[dict]) -> "Crops":
        """Decode compressed RLEs (``{"size": [h, w], "counts": str | bytes}``) to crops."""
        heights = np.array([r["size"][0] for r in rles], dtype=np.int64).reshape(-1)
        counts, bounds = decode_counts(rles)
        runs = _foreground_runs(counts, bounds, heights)
        boxes = _boxes(runs, len(rles))
        crop_h, crop_w = boxes.height, boxes.width
        offsets = np.zeros(len(rles) + 1, dtype=np.int64)
        np.cumsum(crop_h * crop_w, out=offsets[1:])
        # each run is one interval of its crop's flat layout: a run that crosses columns
        # makes its box span every row, where the crop layout is the image's
        m = runs.mask
        h, x0, y0 = crop_h[m], boxes.x0[m], boxes.y0[m]
        img_h = runs.height
        first = offsets[m] + (runs.start // img_h - x0) * h + runs.start % img_h - y0
        last = offsets[m] + (runs.end // img_h - x0) * h + runs.end % img_h - y0
        # alternating background and foreground intervals over all crops (empty ones where a
        # run ends right before the next one starts)
        edges = np.empty(2 * len(first) + 2, dtype=np.int64)
        edges[0], edges[1:-1:2], edges[2:-1:2], edges[-1] = 0, first, last + 1, offsets[-1]
        values = np.zeros(len(edges) - 1, dtype=np.uint8)
        values[1::2] = 1
        flat = np.repeat(values, np.diff(edges))
        return cls(boxes, flat, offsets)
