"""The checks of an annotation's ``bbox`` and ``segmentation`` (polygons or RLE) against its
image, for :func:`~.lvis_checks.validate_lvis_dict`. Each takes the validation's checker
(``check.fail(kind, index, record, field, problem)`` raises the named error)."""

import math

from pycocotools import mask as mask_utils

from lvis_longtail.utils.rle import decode_rle_string

FAR_OUTSIDE = 0.5  # a coordinate this fraction of the image side beyond the border is an error


INT64_RANGE = (-(2**63), 2**63)  # what numpy (and the evaluators) can hold


def is_int(x) -> bool:
    return type(x) is int


def is_int64(x) -> bool:
    """An int (not a bool) that fits in 64 bits: ids and sizes beyond overflow numpy."""
    return type(x) is int and INT64_RANGE[0] <= x < INT64_RANGE[1]


def is_number(x) -> bool:
    return (type(x) is int or type(x) is float) and math.isfinite(x)


def far_outside(lo: float, hi: float, side: float) -> bool:
    """Whether [lo, hi] reaches :data:`FAR_OUTSIDE` of ``side`` beyond the image."""
    return lo < -FAR_OUTSIDE * side or hi > (1 + FAR_OUTSIDE) * side


def check_polygons(check, i: int, ann: dict, segm: list, h: int, w: int, skipped):
    """The valid polygons of a list segmentation (error on a malformed one)."""
    valid, side = [], min(h, w)
    for j, poly in enumerate(segm):
        if type(poly) is not list:
            check.fail(
                "annotations",
                i,
                ann,
                "segmentation",
                f"polygon {j} is a {type(poly).__name__}, not a list of numbers "
                "(expected [[x1, y1, x2, y2, ...], ...])",
            )
        try:
            total = sum(poly)
            if bool in set(map(type, poly)):  # True/False would count as 1/0
                raise TypeError
        except TypeError:
            bad = next(v for v in poly if type(v) not in (int, float))
            check.fail(
                "annotations",
                i,
                ann,
                "segmentation",
                f"polygon {j} has a non-number coordinate {bad!r:.30}",
            )
        if not math.isfinite(total):
            check.fail(
                "annotations",
                i,
                ann,
                "segmentation",
                f"polygon {j} has a non-finite coordinate (NaN or infinity)",
            )
        if len(poly) < 6 or len(poly) % 2:
            skipped["polygon with < 3 points or odd length dropped"] += 1
            continue
        if min(poly) < -FAR_OUTSIDE * side or max(poly) > (1 + FAR_OUTSIDE) * side:
            xs, ys = poly[0::2], poly[1::2]
            if far_outside(min(xs), max(xs), w) or far_outside(min(ys), max(ys), h):
                check.fail(
                    "annotations",
                    i,
                    ann,
                    "segmentation",
                    f"polygon {j} lies far outside its {w}x{h} image (x in [{min(xs):g}, "
                    f"{max(xs):g}], y in [{min(ys):g}, {max(ys):g}]); wrong image size?",
                )
        valid.append(poly)
    return valid


def check_rle(check, i: int, ann: dict, segm: dict, h: int, w: int) -> dict:
    """A valid compressed RLE (uncompressed ones converted), or an error."""
    size, counts = segm.get("size"), segm.get("counts")
    if size != [h, w] or not all(map(is_int64, size)):
        check.fail(
            "annotations",
            i,
            ann,
            "segmentation",
            f"RLE 'size' {size!r:.30} is not the image's [height, width] [{h}, {w}]",
        )
    if isinstance(counts, str):
        runs = decode_rle_string(counts)
        if runs is None or sum(runs) != h * w:
            check.fail(
                "annotations",
                i,
                ann,
                "segmentation",
                "compressed RLE 'counts' is malformed or does not cover the image's "
                f"{h}x{w} pixels",
            )
        return segm
    if not isinstance(counts, list) or not all(is_int(c) and c >= 0 for c in counts):
        check.fail(
            "annotations",
            i,
            ann,
            "segmentation",
            "RLE 'counts' must be a compressed string or a list of integers >= 0",
        )
    if sum(counts) != h * w:
        check.fail(
            "annotations",
            i,
            ann,
            "segmentation",
            f"uncompressed RLE 'counts' sum to {sum(counts)}, not {h}x{w} = {h * w}",
        )
    rle = mask_utils.frPyObjects(segm, h, w)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def check_bbox(check, i: int, ann: dict, h: int, w: int) -> None:
    """Raise the error of a bbox that failed :func:`_annotations`' fast checks."""
    bbox = ann["bbox"]
    if not (type(bbox) is list and len(bbox) == 4 and all(map(is_number, bbox))):
        check.fail(
            "annotations",
            i,
            ann,
            "bbox",
            f"must be [x, y, w, h] of finite numbers, got {bbox!r:.60}",
        )
    x, y, bw, bh = bbox
    if bw < 0 or bh < 0:
        check.fail("annotations", i, ann, "bbox", f"has a negative width or height: {bbox}")
    if far_outside(x, x + bw, w) or far_outside(y, y + bh, h):
        check.fail(
            "annotations",
            i,
            ann,
            "bbox",
            f"{bbox} lies far outside its {w}x{h} image; wrong image size?",
        )
