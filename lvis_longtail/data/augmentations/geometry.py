"""Geometry shared by the augmentation steps: rasterising, polygon clipping and occlusion
(shapely), and the canvas placement transform of mosaic and copy-paste."""

from typing import List

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from fvcore.transforms.transform import Transform
from shapely import geometry as sg
from shapely.ops import unary_union


def rasterize(segm, hw) -> np.ndarray:
    """``(H, W)`` uint8 mask of a polygon list (pycocotools, as detectron2) or a mask."""
    if isinstance(segm, np.ndarray):
        return segm.astype(np.uint8)
    if not segm:
        return np.zeros(hw, np.uint8)
    return utils.polygons_to_bitmask([np.asarray(p, np.float64) for p in segm], *hw).astype(
        np.uint8
    )


def union_mask(segms, hw) -> np.ndarray:
    """``(H, W)`` bool union of segmentations (polygon lists and/or masks), rasterised as
    :func:`rasterize` does, with one pycocotools call for all polygons."""
    out = np.zeros(hw, bool)
    polys = [np.asarray(p, np.float64).reshape(-1) for s in segms if isinstance(s, list)
             for p in s if len(p) >= 6]
    if polys:
        rle = mask_util.merge(mask_util.frPyObjects([p.tolist() for p in polys], *hw))
        out |= mask_util.decode(rle).astype(bool)
    for s in segms:
        if isinstance(s, np.ndarray):
            out |= s.astype(bool)
    return out


def polygons_to_geometry(segm):
    """A shapely geometry: the union of a polygon list's rings (LVIS polygons are unions)."""
    parts = []
    for p in segm:
        pts = np.asarray(p, np.float64).reshape(-1, 2)
        if len(pts) >= 3:
            poly = sg.Polygon(pts)
            parts.append(poly if poly.is_valid else poly.buffer(0))
    return unary_union(parts) if parts else sg.Polygon()


def geometry_to_polygons(geom, _depth: int = 0):
    """Flat hole-free polygons whose union is the shapely geometry ``geom``.

    LVIS polygon lists cannot express holes: a polygon with holes is cut into vertical strips
    at an inner point of each hole, which opens every hole onto a strip's border. Returns None
    only if that fails (then the caller rasterises).
    """
    polys = []
    for g in getattr(geom, "geoms", [geom]):
        if hasattr(g, "geoms"):
            sub = geometry_to_polygons(g, _depth)
            if sub is None:
                return None
            polys.extend(sub)
        elif isinstance(g, sg.Polygon) and g.area > 0:
            if not len(g.interiors):
                polys.append(np.asarray(g.exterior.coords[:-1], np.float64).reshape(-1))
                continue
            if _depth > 2:
                return None
            x0, y0, x1, y1 = g.bounds
            cuts = sorted({sg.Polygon(r).representative_point().x for r in g.interiors})
            edges = [x0] + cuts + [x1]
            for a, b in zip(edges[:-1], edges[1:]):
                if b > a:
                    sub = geometry_to_polygons(g.intersection(sg.box(a, y0, b, y1)), _depth + 1)
                    if sub is None:
                        return None
                    polys.extend(sub)
    return polys


def _subtract_polygons(segm, cover):
    """``segm`` (a union of polygons) minus the geometry ``cover``, ring by ring, so that
    untouched rings stay exactly as they are; None if the result is not expressible."""
    out = []
    x0, y0, x1, y1 = cover.bounds if not cover.is_empty else (0, 0, -1, -1)
    for p in segm:
        pts = np.asarray(p, np.float64).reshape(-1, 2)
        lo, hi = pts.min(0), pts.max(0)
        if hi[0] <= x0 or hi[1] <= y0 or lo[0] >= x1 or lo[1] >= y1:
            out.append(np.asarray(p, np.float64).reshape(-1))
            continue
        ring = polygons_to_geometry([p])
        if not ring.intersects(cover):
            out.append(np.asarray(p, np.float64).reshape(-1))
            continue
        rest = geometry_to_polygons(ring.difference(cover))
        if rest is None:
            return None
        out.extend(rest)
    return out


def segm_box(segm):
    """Tight XYXY box of a polygon list or mask (zeros if empty)."""
    if isinstance(segm, np.ndarray):
        xs, ys = np.flatnonzero(segm.any(0)), np.flatnonzero(segm.any(1))
        if not len(xs):
            return np.zeros(4)
        return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.float64)
    pts = [np.asarray(p).reshape(-1, 2) for p in segm if len(p)]
    if not pts:
        return np.zeros(4)
    pts = np.concatenate(pts)
    return np.concatenate([pts.min(0), pts.max(0)])


def segm_area(segm) -> float:
    if isinstance(segm, np.ndarray):
        return float(segm.sum())
    return float(polygons_to_geometry(segm).area)


def occlude(annos: List[dict], cover: List, hw, box_moved_thresh: float, min_area: float):
    """Remove the pixels covered by ``cover`` (segmentations pasted on top) from ``annos``.

    An instance is dropped if nothing is left, or if its box moved by more than
    ``box_moved_thresh`` px and at most ``min_area`` px remain. Polygons stay polygons (a cut
    hole is opened by :func:`geometry_to_polygons`); if ``annos`` or ``cover`` hold masks,
    every segmentation of both is rasterised.

    Returns:
        (kept annotations, cover segmentations) -- both rasterised or both as given.
    """
    if not cover or not annos:
        return annos, cover
    rasterised = any(isinstance(a["segmentation"], np.ndarray) for a in annos) or any(
        isinstance(c, np.ndarray) for c in cover
    )
    new_segms = None
    if not rasterised:
        union = unary_union([polygons_to_geometry(c) for c in cover])
        new_segms = []
        for a in annos:
            new = _subtract_polygons(a["segmentation"], union)
            if new is None:
                new_segms = None
                break
            new_segms.append(new)
    if new_segms is None:  # raster path
        cover = [rasterize(c, hw) for c in cover]
        alpha = union_mask(cover, hw)
        new_segms = [rasterize(a["segmentation"], hw) & ~alpha for a in annos]
        annos = [dict(a, segmentation=rasterize(a["segmentation"], hw)) for a in annos]
    kept = []
    for a, segm in zip(annos, new_segms):
        area = segm_area(segm)
        moved = np.abs(segm_box(segm) - segm_box(a["segmentation"])).max() > box_moved_thresh
        if area <= 0 or (moved and area <= min_area):
            continue
        kept.append(dict(a, segmentation=segm, bbox=segm_box(segm)))
    return kept, cover


class CanvasPlaceTransform(Transform):
    """Place an ``(src_h, src_w)`` image at offset ``(dx, dy)`` (may be negative) of an
    ``(canvas_h, canvas_w)`` canvas filled with ``pad_value``; what falls outside is cut.
    Polygons are shifted and clipped to the canvas."""

    def __init__(self, dx, dy, src_h, src_w, canvas_h, canvas_w, pad_value=0.0):
        super().__init__()
        self._set_attributes(locals())

    def _slices(self):
        x0, y0 = max(self.dx, 0), max(self.dy, 0)
        x1 = min(self.dx + self.src_w, self.canvas_w)
        y1 = min(self.dy + self.src_h, self.canvas_h)
        dst = (slice(y0, max(y1, y0)), slice(x0, max(x1, x0)))
        src = (
            slice(y0 - self.dy, max(y1, y0) - self.dy),
            slice(x0 - self.dx, max(x1, x0) - self.dx),
        )
        return dst, src

    def _place(self, img, pad_value):
        out = np.full((self.canvas_h, self.canvas_w) + img.shape[2:], pad_value, img.dtype)
        dst, src = self._slices()
        out[dst] = img[src]
        return out

    def apply_image(self, img):
        return self._place(img, self.pad_value)

    def apply_segmentation(self, segmentation):
        return self._place(segmentation, 0)

    def apply_coords(self, coords):
        return coords + np.array([self.dx, self.dy], dtype=coords.dtype)

    def apply_polygons(self, polygons):
        shifted = [self.apply_coords(np.asarray(p, np.float64)) for p in polygons]
        return clip_polygons(shifted, 0, 0, self.canvas_w, self.canvas_h)


def clip_polygons(polygons, x0, y0, w, h):
    """Clip ``(N, 2)`` polygons to the window ``[x0, x0 + w] x [y0, y0 + h]``; polygons inside
    it are kept as they are (no shapely call), the others are cut with shapely as detectron2's
    ``CropTransform`` does. Coordinates stay in the input frame."""
    out, cut = [], []
    for p in polygons:
        p = np.asarray(p, np.float64)
        lo, hi = p.min(0), p.max(0)
        if lo[0] >= x0 and lo[1] >= y0 and hi[0] <= x0 + w and hi[1] <= y0 + h:
            out.append(p)
        elif hi[0] > x0 and hi[1] > y0 and lo[0] < x0 + w and lo[1] < y0 + h:
            cut.append(p)
    if cut:
        clipped = T.CropTransform(x0, y0, w, h).apply_polygons(cut)
        out.extend(c + np.array([x0, y0], np.float64) for c in clipped)
    return out


def polygon_mask_boxes(polygons_per_instance) -> np.ndarray:
    """``(N, 4)`` tight XYXY boxes of ``PolygonMasks.polygons`` (what its
    ``get_bounding_boxes`` returns), in one vectorised pass."""
    flat = [p.reshape(-1, 2) for ps in polygons_per_instance for p in ps]
    if not flat:
        return np.zeros((len(polygons_per_instance), 4), np.float32)
    counts = [sum(len(p) // 2 for p in ps) for ps in polygons_per_instance]
    pts = np.concatenate(flat)
    starts = np.cumsum([0] + counts[:-1])
    lo = np.minimum.reduceat(pts, starts, axis=0)
    hi = np.maximum.reduceat(pts, starts, axis=0)
    return np.concatenate([lo, hi], axis=1).astype(np.float32)
