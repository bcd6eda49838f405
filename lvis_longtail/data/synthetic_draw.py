"""Drawing the synthetic dataset's images (:mod:`.synthetic`): each object placed where its
mask keeps a margin to the others, painted from the very mask pycocotools rasterizes from its
polygons, on a smooth low-saturation background with distractor specks."""

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from lvis_longtail.data.synthetic_classes import COLORS, SHAPES

MARGIN_PX = 2  # objects' masks keep this distance


def polygons_to_rle(polygons, height, width):
    """Merged RLE of flat polygons ``[[x1, y1, x2, y2, ...], ...]`` (pycocotools)."""
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))


def _place(rng, shape, size, size_min, occupied, thickness_scale=1.0):
    """Sample a pose for one object whose mask avoids ``occupied``; None if it does not fit.

    Thin shapes get walls ``thickness_scale * max(2.5, 0.09 * size)`` px wide."""
    h, w = occupied.shape
    for attempt in range(40):
        if attempt and attempt % 8 == 0:
            size = max(size_min, 0.85 * size)
        polys = SHAPES[shape][0](rng, size, max(2.5, 0.09 * size) * thickness_scale)
        pts = np.concatenate(polys)
        lo, hi = pts.min(0), pts.max(0)
        room = np.array([w, h]) - 2.0 - (hi - lo)
        if (room <= 1.0).any():
            size = max(size_min, 0.85 * size)
            continue
        shift = 1.0 - lo + rng.uniform(0, room)
        flat = [np.round(p + shift, 2).ravel().tolist() for p in polys]
        mask = mask_utils.decode(polygons_to_rle(flat, h, w)).astype(bool)
        if mask.sum() >= 8 and not (mask & occupied).any():
            return flat, mask
    return None


def _background(rng, h, w):
    """Smooth low-contrast, low-saturation background with gray distractor specks, (H, W, 3)."""
    base = rng.uniform(80, 150) + rng.uniform(-10, 10, size=3)
    blobs = cv2.resize(rng.normal(0, 14, (5, 5, 3)), (w, h), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    grad = (rng.uniform(-25, 25) * xx + rng.uniform(-25, 25) * yy)[..., None]
    img = base + blobs + grad + rng.normal(0, 3, (h, w, 3))
    for _ in range(rng.integers(0, 9)):
        center = (int(rng.integers(w)), int(rng.integers(h)))
        gray = float(np.clip(base.mean() + rng.uniform(-40, 40), 0, 255))
        cv2.circle(img, center, int(rng.integers(1, 3)), (gray, gray, gray), -1)
    return img


def make_image(rng, h, w, labels, specs, size_range, thin_min, thickness_scale=1.0):
    """Place and paint ``labels``; returns the RGB image and [(label, polygons, mask), ...]."""
    img = _background(rng, h, w)
    occupied = np.zeros((h, w), dtype=bool)
    kernel = np.ones((2 * MARGIN_PX + 1, 2 * MARGIN_PX + 1), np.uint8)
    objects = []
    for label in labels:
        shape, color = specs[label]
        lo = max(size_range[0], thin_min) if SHAPES[shape][1] else size_range[0]
        size = float(np.exp(rng.uniform(np.log(lo), np.log(max(lo, size_range[1])))))
        placed = _place(rng, shape, size, lo, occupied, thickness_scale)
        if placed is None:
            continue
        flat, mask = placed
        occupied |= cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
        paint = np.array(COLORS[color]) * rng.uniform(0.92, 1.0)
        img[mask] = paint + rng.normal(0, 4, (int(mask.sum()), 3))
        objects.append((label, flat, mask))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects
