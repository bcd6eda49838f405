"""Mosaic (Bochkovskiy et al. 2020, YOLOv4): four training images in one canvas."""

from typing import Sequence

import numpy as np
from detectron2.data import transforms as T

from lvis_longtail.data.augmentations.geometry import CanvasPlaceTransform, clip_polygon_groups
from lvis_longtail.data.augmentations.registry import LONGTAIL_AUGMENTATION_REGISTRY
from lvis_longtail.data.augmentations.sample import (
    LazySample,
    Sample,
    SampleStep,
    merge_class_sets,
    scratch_array,
    transform_sample,
)


class MosaicStep(SampleStep):
    """With probability ``prob``, combine the image with 3 images drawn from the sampler.

    Each image is resized to fit ``tile_size`` (keeping its aspect ratio) and placed so that
    one of its corners touches a centre ``(cx, cy) ~ U(center_range) * (tile_w, tile_h)`` of a
    ``2 * tile_size`` canvas: the first image top-left of the centre, then top-right,
    bottom-left, bottom-right; parts beyond the canvas are cut. Polygons are scaled, shifted
    and clipped (they stay polygons); ignore boxes follow; boxes are recomputed from masks.
    """

    num_extra = 3
    recompute_boxes = True

    def __init__(self, prob: float, tile_size, center_range, pad_value: float):
        self.prob = float(prob)
        self.tile_size = tuple(int(x) for x in tile_size)
        self.center_range = tuple(float(x) for x in center_range)
        self.pad_value = float(pad_value)

    def __call__(self, sample: Sample, extras: Sequence[LazySample]) -> Sample:
        if np.random.uniform() >= self.prob:
            return sample
        th, tw = self.tile_size
        ch, cw = 2 * th, 2 * tw
        cx = int(round(np.random.uniform(*self.center_range) * tw))
        cy = int(round(np.random.uniform(*self.center_range) * th))
        tiles = [sample] + [e.load() for e in extras[: self.num_extra]]
        # filled tile by tile: each tile's pixels, then the rest of its quadrant with padding
        canvas = scratch_array("mosaic", (ch, cw) + sample.image.shape[2:], sample.image.dtype)
        quadrants = [(0, cy, 0, cx), (0, cy, cx, cw), (cy, ch, 0, cx), (cy, ch, cx, cw)]
        annos, ignores = [], []
        for k, tile in enumerate(tiles):
            h, w = tile.hw
            scale = min(th / h, tw / w)
            nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
            dx = cx - nw if k in (0, 2) else cx
            dy = cy - nh if k in (0, 1) else cy
            place = CanvasPlaceTransform(dx, dy, nh, nw, ch, cw, self.pad_value, clip=False)
            resize = T.ResizeTransform(h, w, nh, nw) if (nh, nw) != (h, w) else T.NoOpTransform()
            tfm = T.TransformList([resize, place])
            resized = resize.apply_image(tile.image)
            dst, src = place._slices()
            canvas[dst] = resized[src]
            _pad_around(canvas, quadrants[k], dst, self.pad_value)
            placed = transform_sample(tile, tfm, image=canvas)  # polygons not yet clipped
            annos.extend(placed.annos)
            ignores.append(placed.ignore)
        annos, ignores = _clip_to_canvas(annos, ignores, ch, cw)
        pos = set().union(*[t.pos for t in tiles])
        neg, nex = merge_class_sets(tiles, pos)
        return Sample(
            image=canvas,
            annos=annos,
            ignore=ignores,
            pos=pos,
            neg=neg,
            not_exhaustive=nex,
            recompute_boxes=True,
        )


def _clip_to_canvas(annos, ignores, ch, cw):
    """Clip the placed tiles' polygons to the canvas, all in one batch (per instance and per
    tile's ignore list, as ``CanvasPlaceTransform`` clips); instances cut away are dropped."""
    polys = [
        [np.asarray(p).reshape(-1, 2) for p in a["segmentation"]]
        if isinstance(a.get("segmentation"), list)
        else None
        for a in annos
    ]
    clipped = clip_polygon_groups(polys + list(ignores), 0, 0, cw, ch)
    out = []
    for anno, poly in zip(annos, clipped):
        if poly is not None:
            if not poly:
                continue  # every polygon fell outside the canvas
            anno = dict(anno, segmentation=[p.reshape(-1) for p in poly])
        out.append(anno)
    ignore = [p for group in clipped[len(annos) :] for p in group if len(p)]
    return out, ignore


def _pad_around(canvas: np.ndarray, quadrant, dst, pad_value: float) -> None:
    """Fill the part of the canvas ``quadrant`` ``(y0, y1, x0, x1)`` outside the tile's
    ``dst`` slices (a rectangle inside it) with ``pad_value``."""
    qy0, qy1, qx0, qx1 = quadrant
    ty0, ty1 = max(dst[0].start, qy0), min(dst[0].stop, qy1)
    tx0, tx1 = max(dst[1].start, qx0), min(dst[1].stop, qx1)
    if ty1 <= ty0 or tx1 <= tx0:  # nothing of the tile in its quadrant
        canvas[qy0:qy1, qx0:qx1] = pad_value
        return
    canvas[qy0:ty0, qx0:qx1] = pad_value
    canvas[ty1:qy1, qx0:qx1] = pad_value
    canvas[ty0:ty1, qx0:tx0] = pad_value
    canvas[ty0:ty1, tx1:qx1] = pad_value


@LONGTAIL_AUGMENTATION_REGISTRY.register()
def Mosaic(cfg):
    """Mosaic of 4 images (``INPUT.MOSAIC``)."""
    node = cfg.INPUT.MOSAIC
    if not 0.0 <= node.PROB <= 1.0:
        raise ValueError(f"INPUT.MOSAIC.PROB must be in [0, 1], got {node.PROB}")
    return MosaicStep(node.PROB, node.TILE_SIZE, node.CENTER_RANGE, node.PAD_VALUE)
