"""The batched / OpenCV fast paths of the augmentation steps equal their plain references."""

import numpy as np
import pytest
from detectron2.data import transforms as T
from shapely import geometry as sg
from shapely.ops import unary_union

from lvis_longtail.data.augmentations.copy_paste import paste_pixels
from lvis_longtail.data.augmentations.geometry import clip_polygon_groups
from lvis_longtail.data.augmentations.mosaic import MosaicStep
from lvis_longtail.data.augmentations.occlusion import occlude, polygon_geometries
from lvis_longtail.data.augmentations.sample import (
    LazySample,
    Sample,
    contiguous_image,
    copy_image_into,
    scratch_array,
)
from lvis_longtail.data.augmentations.single import ImagePadTransform


def blob(rng, n, cx, cy, r):
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.3, 1.0, n)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)


def random_groups(rng, num):
    groups = []
    for _ in range(num):
        ps = []
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.2:  # self-intersecting
                ps.append(rng.uniform(-40, 140, (int(rng.integers(4, 9)), 2)))
            else:
                ps.append(
                    blob(
                        rng, int(rng.integers(3, 25)), *rng.uniform(-30, 130, 2), rng.uniform(2, 50)
                    )
                )
        groups.append(ps)
    return groups


def test_clip_polygon_groups_equals_fvcore_crop_per_polygon():
    """Per instance: polygons inside the window as they are, then fvcore's cut pieces."""
    rng = np.random.default_rng(0)
    x0, y0, w, h = 7, 11, 80, 60
    groups = random_groups(rng, 40) + [None, []]
    out = clip_polygon_groups(groups, x0, y0, w, h)
    crop = T.CropTransform(x0, y0, w, h)
    shift = np.array([x0, y0], np.float64)
    cut_any = False
    for ps, got in zip(groups, out):
        if not ps:
            assert got is ps
            continue
        inside, cut = [], []
        for p in ps:
            lo, hi = p.min(0), p.max(0)
            if (lo >= [x0, y0]).all() and (hi <= [x0 + w, y0 + h]).all():
                inside.append(p)
            elif (hi > [x0, y0]).all() and (lo < [x0 + w, y0 + h]).all():
                cut.extend(c + shift for c in crop.apply_polygons([p.copy()]))
        want = inside + cut
        cut_any |= bool(cut)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    assert cut_any


def test_polygon_geometries_equal_scalar_unions():
    rng = np.random.default_rng(1)
    groups = random_groups(rng, 30) + [[np.zeros((2, 2))]]
    got = polygon_geometries(groups)
    for ps, g in zip(groups, got):
        parts = []
        for p in ps:
            if len(p) >= 3:
                poly = sg.Polygon(p)
                parts.append(poly if poly.is_valid else poly.buffer(0))
        want = unary_union(parts) if parts else sg.Polygon()
        assert g.wkb == want.wkb


def test_occlude_keeps_far_instances_as_they_are_and_cuts_by_hand():
    far = [np.array([60.0, 60, 90, 60, 90, 90, 60, 90])]  # 30 x 30, far from the cover
    cut = [np.array([0.0, 0, 40, 0, 40, 20, 0, 20])]  # 40 x 20; its right half is covered
    cover = [[np.array([20.0, -5, 50, -5, 50, 30, 20, 30])]]
    annos = [{"segmentation": far, "category_id": 0}, {"segmentation": cut, "category_id": 1}]
    kept, _ = occlude(annos, cover, (100, 100), box_moved_thresh=100.0, min_area=0.0)
    assert [a["category_id"] for a in kept] == [0, 1]
    np.testing.assert_array_equal(kept[0]["segmentation"][0], far[0])
    np.testing.assert_array_equal(kept[0]["bbox"], [60, 60, 90, 90])
    np.testing.assert_allclose(kept[1]["bbox"], [0, 0, 20, 20])
    area = sum(sg.Polygon(p.reshape(-1, 2)).area for p in kept[1]["segmentation"])
    assert area == pytest.approx(20 * 20)
    # the moved-box rule: the cut instance's box moved 20 px and 400 px remain
    kept, _ = occlude(annos, cover, (100, 100), box_moved_thresh=10.0, min_area=400.0)
    assert [a["category_id"] for a in kept] == [0]


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_contiguous_image_of_flipped_views(channels):
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (13, 17, channels), dtype=np.uint8)
    for view in (
        base[:, ::-1],
        base[2:9, 3:15][:, ::-1],
        base[::-1],
        base[:, 1:5],
        base[:, ::-1, ::-1],
    ):
        out = contiguous_image(view)
        assert out.flags.c_contiguous and out.shape == view.shape
        np.testing.assert_array_equal(out, view)
    assert contiguous_image(base) is base
    floats = base.astype(np.float32)[:, ::-1]
    np.testing.assert_array_equal(contiguous_image(floats), floats)


@pytest.mark.parametrize(
    "shape,dtype,pad",
    [
        ((9, 7, 3), np.uint8, 128.0),
        ((9, 7, 1), np.uint8, 0.0),
        ((9, 7, 3), np.float32, 0.5),
        ((9, 7, 3), np.uint8, 127.5),
    ],
)
def test_image_pad_transform_equals_np_pad(shape, dtype, pad):
    img = np.random.default_rng(3).integers(0, 256, shape).astype(dtype)
    ours = ImagePadTransform(0, 0, 5, 3, 7, 9, pad).apply_image(img)
    theirs = T.PadTransform(0, 0, 5, 3, 7, 9, pad).apply_image(img)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("src_hw", [(40, 50), (25, 30), (60, 70)])
@pytest.mark.parametrize("view", ["plain", "flipped", "rgb of bgr"])
def test_paste_pixels_equals_masked_copy_of_placed_source(src_hw, view):
    rng = np.random.default_rng(4)
    dst = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    src = rng.integers(0, 256, src_hw + (3,), dtype=np.uint8)
    if view == "flipped":
        dst, src = dst[:, ::-1], src[:, ::-1]
    elif view == "rgb of bgr":  # what read_image returns for INPUT.FORMAT RGB
        dst, src = dst[:, :, ::-1], src[:, :, ::-1]
    alpha = np.zeros((40, 50), bool)
    alpha[5:35, 8:45] = rng.random((30, 37)) > 0.4
    placed = np.zeros_like(dst)  # the source aligned top-left, zeros beyond it
    h, w = min(40, src_hw[0]), min(50, src_hw[1])
    placed[:h, :w] = src[:h, :w]
    want = dst.copy()
    np.copyto(want, placed, where=alpha[:, :, None])
    before = dst.copy()
    out = paste_pixels(dst, src, alpha)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(dst, before)  # the destination is not modified


def test_mosaic_canvas_reuse_never_touches_a_held_sample():
    def sample(seed):
        img = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
        poly = np.array([5.0, 5, 30, 5, 30, 25, 5, 25])
        anno = {"segmentation": [poly], "bbox": [5.0, 5, 30, 25], "category_id": 0}
        return Sample(image=img, annos=[anno], pos={0})

    step = MosaicStep(1.0, (30, 40), (0.5, 1.5), 114.0)
    extras = [LazySample({}, lambda s=s: sample(s)) for s in (1, 2, 3)]
    np.random.seed(0)
    first = step(sample(0), extras)
    kept = first.image.copy()
    for seed in range(3):
        np.random.seed(seed + 1)
        other = step(sample(seed + 10), extras)
        assert not np.shares_memory(other.image, first.image)
        np.testing.assert_array_equal(first.image, kept)
    address = other.image.ctypes.data
    del first, other
    np.random.seed(0)
    again = step(sample(0), extras)  # reuses the now unreferenced canvas: fully rewritten
    assert again.image.ctypes.data == address
    np.testing.assert_array_equal(again.image, kept)


def test_scratch_array_is_reused_only_when_unreferenced():
    a = scratch_array("test", (4, 5, 3), np.uint8)
    b = scratch_array("test", (4, 5, 3), np.uint8)  # ``a`` is held: a new array
    assert not np.shares_memory(a, b)
    view = b[:, ::-1]
    del a, b
    c = scratch_array("test", (4, 5, 3), np.uint8)  # ``view`` still holds the last one
    assert not np.shares_memory(c, view)
    address = c.ctypes.data
    del c
    assert scratch_array("test", (4, 5, 3), np.uint8).ctypes.data == address
    assert scratch_array("test", (4, 6, 3), np.uint8).shape == (4, 6, 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_copy_image_into_flipped_and_plain_views(channels):
    base = np.random.default_rng(6).integers(0, 256, (9, 11, channels), dtype=np.uint8)
    views = (
        base,
        base[:, ::-1],
        base[::-1, ::-1],
        base[:, ::-1, ::-1],
        base.astype(np.float32)[:, ::-1],
    )
    for view in views:
        out = np.zeros(view.shape, view.dtype)
        assert copy_image_into(out, view) is out
        np.testing.assert_array_equal(out, view)


def test_scratch_array_pool_of_two():
    a = scratch_array("pool_test", (3, 4), np.uint8, pool=2)
    b = scratch_array("pool_test", (3, 4), np.uint8, pool=2)  # ``a`` held: the second slot
    c = scratch_array("pool_test", (3, 4), np.uint8, pool=2)  # both held: a new array
    assert len({x.ctypes.data for x in (a, b, c)}) == 3
    address = c.ctypes.data  # ``c`` took the last slot
    del c
    d = scratch_array("pool_test", (3, 4), np.uint8, pool=2)
    assert d.ctypes.data == address and not np.shares_memory(d, a) and not np.shares_memory(d, b)
