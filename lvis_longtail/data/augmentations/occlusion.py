"""Occlusion of instances by segmentations pasted on top (copy-paste, InstaBoost).

The polygon path works ring by ring with shapely, batched: shapely's array functions run the
same GEOS operations as its scalar methods (same geometries, same coordinates), and rings whose
box meets no pasted ring's box are known to be untouched without any GEOS call.
"""

from typing import List

import numpy as np
import shapely
from shapely import geometry as sg
from shapely.ops import unary_union

from lvis_longtail.data.augmentations.geometry import (
    geometry_to_polygons,
    rasterize,
    segm_area,
    segm_box,
    union_mask,
)


def _rings_of(segms):
    """The rings of >= 3 points of every polygon list, as (K, 2) arrays, and the (K,) int64
    index of the list each belongs to (ascending)."""
    rings = [np.asarray(p, np.float64).reshape(-1, 2) for segm in segms for p in segm]
    owner = np.repeat(np.arange(len(segms)), [len(segm) for segm in segms])
    keep = [k for k, pts in enumerate(rings) if len(pts) >= 3]
    return [rings[k] for k in keep], owner[keep]


def polygon_geometries(segms) -> np.ndarray:
    """``polygons_to_geometry`` of every polygon list in ``segms`` (object array): per list,
    the union of its rings of >= 3 points, each made valid by ``buffer(0)`` if it is not."""
    rings, owner = _rings_of(segms)
    out = np.array([sg.Polygon() for _ in segms], dtype=object)
    if not rings:
        return out
    pos = np.arange(len(owner)) - np.searchsorted(owner, owner)  # ring index within its list
    ids = np.repeat(np.arange(len(rings)), [len(p) for p in rings])
    polys = shapely.polygons(shapely.linearrings(np.concatenate(rings), indices=ids))
    invalid = ~shapely.is_valid(polys)
    if invalid.any():
        polys[invalid] = shapely.buffer(polys[invalid], 0.0)
    grid = np.full((len(segms), int(pos.max()) + 1), None, dtype=object)
    grid[owner, pos] = polys
    has = np.unique(owner)
    out[has] = shapely.union_all(grid[has], axis=1)
    return out


def _ring_boxes(rings):
    """``(N, 4)`` XYXY boxes of flat polygons (each with >= 1 point), one reduceat pass."""
    pts = [np.asarray(p, np.float64).reshape(-1, 2) for p in rings]
    starts = np.cumsum([0] + [len(p) for p in pts[:-1]])
    pts = np.concatenate(pts)
    return np.concatenate(
        [np.minimum.reduceat(pts, starts, axis=0), np.maximum.reduceat(pts, starts, axis=0)], 1
    )


def _rings_near(boxes, cover_boxes):
    """Whether each ``(N, 4)`` box meets (closed) at least one of the ``(M, 4)`` boxes: a ring
    whose box meets none of the cover rings' boxes cannot meet the cover's geometry."""
    b, c = boxes[:, None, :], cover_boxes[None, :, :]
    meet = (b[..., 0] <= c[..., 2]) & (b[..., 2] >= c[..., 0])
    meet &= (b[..., 1] <= c[..., 3]) & (b[..., 3] >= c[..., 1])
    return meet.any(1)


def _surely_positive_areas(segms) -> np.ndarray:
    """Per polygon list: True if the union of its rings (as :func:`polygon_geometries`
    builds it) has an area > 0 for sure: one ring is a valid polygon whose shoelace area is
    not degenerate (the union contains it). False means "not known". One batch for all."""
    rings, owner = _rings_of(segms)
    out = np.zeros(len(segms), bool)
    if not rings:
        return out
    sizes = np.array([len(p) for p in rings])
    pts = np.concatenate(rings)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    nxt = np.arange(1, len(pts) + 1)
    nxt[starts + sizes - 1] = starts  # each ring's last point is followed by its first
    cross = pts[:, 0] * pts[nxt, 1] - pts[nxt, 0] * pts[:, 1]
    area = np.abs(np.add.reduceat(cross, starts)) / 2
    ids = np.repeat(np.arange(len(rings)), sizes)
    valid = shapely.is_valid(shapely.polygons(shapely.linearrings(pts, indices=ids)))
    out[np.asarray(owner)[valid & (area > 1e-6)]] = True
    return out


def _subtract_all(segms, cover_segms, union):
    """Every polygon list of ``segms`` minus the geometry ``union`` (of ``cover_segms``),
    ring by ring, so that untouched rings stay exactly as they are.

    Returns:
        (new polygon lists, per list whether no ring can meet the cover), or (None, None) if
        a result is not expressible as hole-free polygons.
    """
    rings = [p for segm in segms for p in segm]
    flat = [np.asarray(p, np.float64).reshape(-1) for p in rings]
    near = np.ones(len(rings), bool)
    cover_rings = [p for c in cover_segms for p in c if len(p)]
    if rings and all(len(p) for p in flat):
        boxes = _ring_boxes(flat)
        if cover_rings:
            near = _rings_near(boxes, _ring_boxes(cover_rings))
        x0, y0, x1, y1 = union.bounds if not union.is_empty else (0, 0, -1, -1)
        near &= ~((boxes[:, 2] <= x0) | (boxes[:, 3] <= y0) | (boxes[:, 0] >= x1))
        near &= ~(boxes[:, 1] >= y1)
    rest = {}
    idx = np.flatnonzero(near)
    if len(idx):
        geoms = polygon_geometries([[rings[i]] for i in idx])
        hit = shapely.intersects(geoms, union)
        for i, diff in zip(idx[hit], shapely.difference(geoms[hit], union)):
            rest[i] = geometry_to_polygons(diff)
            if rest[i] is None:
                return None, None
    out, far, k = [], [], 0
    for segm in segms:
        new = []
        for i in range(k, k + len(segm)):
            if i in rest:
                new.extend(rest[i])
            else:
                new.append(flat[i])
        far.append(not near[k : k + len(segm)].any())
        k += len(segm)
        out.append(new)
    return out, far


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
    new_segms, far = None, None
    if not rasterised:
        union = unary_union(list(polygon_geometries(cover)))
        new_segms, far = _subtract_all([a["segmentation"] for a in annos], cover, union)
    polygons = new_segms is not None
    if not polygons:  # raster path
        far = [False] * len(annos)
        cover = [rasterize(c, hw) for c in cover]
        alpha = union_mask(cover, hw)
        new_segms = [rasterize(a["segmentation"], hw) & ~alpha for a in annos]
        annos = [dict(a, segmentation=rasterize(a["segmentation"], hw)) for a in annos]
    # an untouched instance keeps its box; with an area > 0 for sure it is kept as it is
    intact = np.zeros(len(annos), bool)
    if box_moved_thresh >= 0 and any(far):
        idx = np.flatnonzero(far)
        intact[idx] = _surely_positive_areas([new_segms[j] for j in idx])
    rest = np.flatnonzero(~intact)
    areas = np.zeros(len(annos))
    if len(rest) and polygons:
        areas[rest] = shapely.area(polygon_geometries([new_segms[j] for j in rest]))
    elif len(rest):
        areas[rest] = [segm_area(new_segms[j]) for j in rest]
    kept = []
    for a, segm, keep, area in zip(annos, new_segms, intact, areas):
        if not keep:
            moved = np.abs(segm_box(segm) - segm_box(a["segmentation"])).max()
            if area <= 0 or (moved > box_moved_thresh and area <= min_area):
                continue
        kept.append(dict(a, segmentation=segm, bbox=segm_box(segm)))
    return kept, cover
