"""Geometry shared by the augmentation steps: rasterising, polygon clipping and hole opening
(shapely), and the canvas placement transform of mosaic and copy-paste (occlusion:
:mod:`~lvis_longtail.data.augmentations.occlusion`)."""

from typing import List

import numpy as np
import pycocotools.mask as mask_util
import shapely
from detectron2.data import detection_utils as utils
from fvcore.transforms.transform import Transform
from shapely import geometry as sg
from shapely.ops import unary_union


def split_rows(array: np.ndarray, sizes) -> List[np.ndarray]:
    """``np.split(array, np.cumsum(sizes)[:-1])`` (views of consecutive rows), without its
    per-piece overhead."""
    ends = np.cumsum(sizes).tolist()
    return [array[a:b] for a, b in zip([0] + ends[:-1], ends)]


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
    out = None
    polys = [
        np.asarray(p, np.float64).reshape(-1)
        for s in segms
        if isinstance(s, list)
        for p in s
        if len(p) >= 6
    ]
    if polys:
        rle = mask_util.merge(mask_util.frPyObjects([p.tolist() for p in polys], *hw))
        out = np.ascontiguousarray(mask_util.decode(rle).view(bool))  # 0/1 uint8 as bool
    for s in segms:
        if isinstance(s, np.ndarray):
            out = s.astype(bool) if out is None else out | s.astype(bool)
    return np.zeros(hw, bool) if out is None else out


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


class CanvasPlaceTransform(Transform):
    """Place an ``(src_h, src_w)`` image at offset ``(dx, dy)`` (may be negative) of an
    ``(canvas_h, canvas_w)`` canvas filled with ``pad_value``; what falls outside is cut.
    Polygons are shifted and clipped to the canvas (only shifted with ``clip=False``, for a
    caller that clips the polygons of several placements at once)."""

    def __init__(self, dx, dy, src_h, src_w, canvas_h, canvas_w, pad_value=0.0, clip=True):
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
        return self.apply_polygon_groups([list(polygons)])[0]

    def apply_polygon_groups(self, groups):
        """:meth:`apply_polygons` of every instance's polygons (None entries kept), batched."""
        flat = [np.asarray(p, np.float64) for ps in groups if ps for p in ps]
        if flat:
            shifted = self.apply_coords(np.concatenate(flat))
            parts = iter(split_rows(shifted, [len(p) for p in flat]))
            groups = [[next(parts) for _ in ps] if ps else ps for ps in groups]
        if not self.clip:
            return groups
        return clip_polygon_groups(groups, 0, 0, self.canvas_w, self.canvas_h)


def clip_polygons(polygons, x0, y0, w, h):
    """Clip ``(N, 2)`` polygons to the window ``[x0, x0 + w] x [y0, y0 + h]``; polygons inside
    it are kept as they are (no shapely call), the others are cut with shapely as detectron2's
    ``CropTransform`` does. Coordinates stay in the input frame."""
    return clip_polygon_groups([list(polygons)], x0, y0, w, h)[0]


def clip_polygon_groups(groups, x0, y0, w, h):
    """:func:`clip_polygons` of every instance's polygon list in ``groups`` (None or empty
    entries stay as they are), with one vectorised inside/outside test for all polygons and
    one batch of shapely calls for those crossing the window border.

    The cut is fvcore's ``CropTransform.apply_polygons`` (buffer(0), validity test,
    intersection with the buffered window, exterior rings of the valid polygon parts), done
    with shapely's array functions: the same GEOS operations, so the same coordinates. Per
    instance, the polygons inside the window come first (in order), then the cut pieces.
    """
    flat = [np.asarray(p, np.float64) for ps in groups if ps for p in ps]
    if not flat:
        return list(groups)
    sizes = np.array([len(p) for p in flat])
    if (sizes == 0).any():
        raise ValueError("clip_polygon_groups: a polygon has no points")
    pts = np.concatenate(flat)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    lo = np.minimum.reduceat(pts, starts, axis=0)
    hi = np.maximum.reduceat(pts, starts, axis=0)
    inside = (lo[:, 0] >= x0) & (lo[:, 1] >= y0) & (hi[:, 0] <= x0 + w) & (hi[:, 1] <= y0 + h)
    crossing = ~inside & (hi[:, 0] > x0) & (hi[:, 1] > y0) & (lo[:, 0] < x0 + w)
    crossing &= lo[:, 1] < y0 + h
    pieces = [[] for _ in flat]  # cut pieces of each crossing polygon, in the input frame
    cut = np.flatnonzero(crossing)
    if len(cut):
        shift = np.array([x0, y0], np.float64)
        for i, piece in _crop_with_shapely([flat[i] for i in cut], x0, y0, w, h):
            local = piece.copy()  # CropTransform.apply_coords, then back to the input frame
            local[:, 0] -= x0
            local[:, 1] -= y0
            pieces[cut[i]].append(local + shift)
    out, k = [], 0
    for ps in groups:
        if not ps:
            out.append(ps)
            continue
        idx = range(k, k + len(ps))
        k += len(ps)
        out.append([flat[i] for i in idx if inside[i]] + [q for i in idx for q in pieces[i]])
    return out


def _crop_with_shapely(polygons, x0, y0, w, h):
    """(input index, ``(N, 2)`` exterior ring) of every valid polygon piece of ``polygons``
    intersected with the window, in input order (fvcore's ``CropTransform`` steps)."""
    window = sg.box(x0, y0, x0 + w, y0 + h).buffer(0.0)
    sizes = [len(p) for p in polygons]
    owners = np.repeat(np.arange(len(sizes)), sizes)
    rings = shapely.linearrings(np.concatenate(polygons), indices=owners)
    geoms = shapely.buffer(shapely.polygons(rings), 0.0)
    valid = np.flatnonzero(shapely.is_valid(geoms))
    cropped = shapely.intersection(geoms[valid], window)
    parts, owner = shapely.get_parts(cropped, return_index=True)
    keep = (shapely.get_type_id(parts) == 3) & ~shapely.is_empty(parts) & shapely.is_valid(parts)
    parts, owner = parts[keep], owner[keep]
    coords, ring = shapely.get_coordinates(shapely.get_exterior_ring(parts), return_index=True)
    sizes = np.bincount(ring, minlength=len(parts))
    return [(int(valid[o]), c[:-1]) for o, c in zip(owner, split_rows(coords, sizes))]


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
