"""Augmentation steps: geometry round-trips, occlusion removal, ignore boxes, LVIS labels."""

import copy

import numpy as np
import pytest
import torch
from augment_helpers import aug_cfg, iou, masks_of, raster, rect, write_record
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, PolygonMasks

from lvis_longtail.data.augmentations import LONGTAIL_AUGMENTATION_REGISTRY
from lvis_longtail.data.augmentations.copy_paste import CopyPasteStep
from lvis_longtail.data.augmentations.instaboost import InstaBoostStep
from lvis_longtail.data.augmentations.mosaic import MosaicStep
from lvis_longtail.data.augmentations.sample import LazySample, ignore_boxes
from lvis_longtail.data.mapper import LongTailDatasetMapper

HW = (80, 100)


def lazy(mapper, record):
    return LazySample(record, lambda: mapper.load_sample(record))


def tri(x, y, s):
    return [float(v) for v in (x, y, x + s, y, x, y + s)]


@pytest.fixture
def records(tmp_path):
    """Four images; classes 0 and 1 are rectangles whose boxes are also ignore boxes."""
    out = []
    for k in range(4):
        a, b = rect(10 + k, 12, 40 + k, 30), rect(60, 40 + k, 90, 70)
        objs = [(0, a), (1, b), (2 + k, tri(20, 45, 20 + k))]
        out.append(
            write_record(
                tmp_path,
                f"r{k}",
                HW,
                objs,
                ignore=[(10 + k, 12, 40 + k, 30), (60, 40 + k, 90, 70)],
                neg=[8 - k, 7],
                nex=[3 + k],
                seed=k,
            )
        )
    return out


@pytest.mark.parametrize("crop", [False, True])
def test_default_steps_equal_detectron2(records, crop):
    opts = ["INPUT.MIN_SIZE_TRAIN", "(64, 96, 120)", "INPUT.MAX_SIZE_TRAIN", "160"]
    if crop:
        opts += ["INPUT.CROP.ENABLED", "True", "INPUT.CROP.SIZE", "[0.6, 0.6]"]
    cfg = aug_cfg(["ResizeShortestEdge", "RandomFlip"], opts)
    ours, theirs = LongTailDatasetMapper(cfg, True), DatasetMapper(cfg, True)
    for seed, rec in enumerate(records * 2):
        np.random.seed(seed)
        a = ours(rec)
        np.random.seed(seed)
        b = theirs(rec)
        assert torch.equal(a["image"], b["image"])
        ia, ib = a["instances"], b["instances"]
        assert torch.equal(ia.gt_boxes.tensor, ib.gt_boxes.tensor)
        assert torch.equal(ia.gt_classes, ib.gt_classes)
        for pa, pb in zip(ia.gt_masks.polygons, ib.gt_masks.polygons):
            assert all(np.array_equal(x, y) for x, y in zip(pa, pb))


@pytest.mark.parametrize("target,crop", [((96, 96), (64, 72)), ((40, 40), (64, 64))])
def test_scale_jitter_equals_resize_scale_and_fixed_size_crop(records, target, crop):
    opts = [
        "INPUT.SCALE_JITTER.TARGET_SIZE",
        str(target),
        "INPUT.SCALE_JITTER.CROP_SIZE",
        str(crop),
        "INPUT.SCALE_JITTER.MIN_SCALE",
        "0.5",
        "INPUT.SCALE_JITTER.MAX_SCALE",
        "2.0",
    ]
    ours = LongTailDatasetMapper(aug_cfg(["ScaleJitter"], opts), True)
    cfg = aug_cfg([], ["MODEL.MASK_ON", "True"])
    theirs = DatasetMapper(
        cfg,
        True,
        augmentations=[
            T.ResizeScale(0.5, 2.0, *target),
            T.FixedSizeCrop(crop, pad=True, pad_value=128.0),
        ],
        image_format="BGR",
        use_instance_mask=True,
        recompute_boxes=True,
    )
    for seed in range(6):
        np.random.seed(seed)
        a = ours(records[seed % 4])
        np.random.seed(seed)
        b = theirs(records[seed % 4])
        assert a["image"].shape == b["image"].shape == (3,) + crop
        # OpenCV resampling vs detectron2's PIL: rounding (upscale), filter (downscale)
        assert (a["image"].float() - b["image"].float()).abs().mean() < 1.5
        ma, mb = masks_of(a["instances"]), masks_of(b["instances"])
        assert np.array_equal(ma, mb)
        assert torch.allclose(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)


def test_lvis_fields_are_contiguous_tensors(records):
    mapper = LongTailDatasetMapper(aug_cfg(["RandomFlip"]), True)
    out = mapper(records[0])  # dataset ids neg [8, 7], not-exhaustive [3]
    assert out["neg_category_ids"].tolist() == [6, 7]
    assert out["not_exhaustive_category_ids"].tolist() == [2]
    assert out["pos_category_ids"].tolist() == [0, 1, 2]
    assert out["neg_category_ids"].dtype == torch.int64
    bad = dict(records[0], neg_category_ids=[99])
    with pytest.raises(ValueError, match=r"field 'neg_category_ids' has category id 99"):
        mapper(bad)
    with pytest.raises(ValueError, match=r"field 'ignore_boxes' must be a list of"):
        mapper(dict(records[0], ignore_boxes=[[1, 2, 3]]))


@pytest.mark.parametrize("fmt", ["BGR", "RGB"])
def test_opencv_decoding_equals_detectron2_read_image(tmp_path, fmt):
    from detectron2.data.detection_utils import read_image as d2_read_image
    from PIL import Image

    from lvis_longtail.data.mapper import read_image

    rng = np.random.default_rng(0)
    rgb = np.asarray(
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
            (64, 48), Image.BICUBIC
        )
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: both readers must apply the orientation
    paths = []
    for name, img, kw in [
        ("a.jpg", rgb, {"quality": 90}),
        ("b.png", rgb, {}),
        ("c.jpg", rgb[:, :, 0], {}),
        ("d.jpg", rgb, {"exif": exif}),
    ]:
        paths.append(str(tmp_path / name))
        Image.fromarray(img).save(paths[-1], **kw)
    for path in paths:
        ours, theirs = read_image(path, fmt), d2_read_image(path, format=fmt)
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), path


def test_registry_doc_and_unknown_step():
    assert "builder(cfg)" in LONGTAIL_AUGMENTATION_REGISTRY.__doc__
    # built from Python, an unknown name still fails (setup_cfg reports it with the names)
    with pytest.raises(KeyError, match="No object named 'Mozaic'"):
        LongTailDatasetMapper(aug_cfg(["Mozaic"]), True)


STEP_NAMES = sorted(name for name, _ in LONGTAIL_AUGMENTATION_REGISTRY)  # every registered step
# options that make a step act on every sample (a step not named here runs with its defaults)
STEP_OPTS = {
    "ScaleJitter": ["INPUT.SCALE_JITTER.TARGET_SIZE", "(96, 96)",
                    "INPUT.SCALE_JITTER.CROP_SIZE", "(64, 72)"],
    "Rotation": ["INPUT.ROTATION.PROB", "1.0", "INPUT.ROTATION.ANGLE", "30.0"],
    "Mosaic": ["INPUT.MOSAIC.PROB", "1.0", "INPUT.MOSAIC.TILE_SIZE", "(60, 50)"],
    "CopyPaste": ["INPUT.COPY_PASTE.PROB", "1.0"],
    "InstaBoost": ["INPUT.INSTABOOST.PROB", "1.0"],
}  # fmt: skip
# steps that move, paste or remove single objects: an ignore box (an image region) stays put
PER_OBJECT = {"CopyPaste", "InstaBoost"}
STEP_LISTS = {n: ([n], STEP_OPTS.get(n, [])) for n in STEP_NAMES if n not in PER_OBJECT}
STEP_LISTS["all"] = (
    ["Mosaic", "ScaleJitter", "Rotation", "RandomFlip"],
    [
        "INPUT.MOSAIC.PROB",
        "1.0",
        "INPUT.MOSAIC.TILE_SIZE",
        "(60, 50)",
        "INPUT.SCALE_JITTER.TARGET_SIZE",
        "(120, 100)",
        "INPUT.SCALE_JITTER.CROP_SIZE",
        "(80, 80)",
        "INPUT.ROTATION.PROB",
        "1.0",
    ],
)


def test_step_options_name_registered_steps():
    assert set(STEP_OPTS) | PER_OBJECT <= set(STEP_NAMES)


@pytest.mark.parametrize("name", STEP_NAMES)
def test_every_registered_step_maps_to_valid_instances(records, name):
    """Any step: boxes inside the image and around their polygons' part in the image, masks
    and classes kept in step, the LVIS label fields and the ignore boxes passed on."""
    mapper = LongTailDatasetMapper(aug_cfg([name], STEP_OPTS.get(name, [])), True)
    for seed in range(4):
        np.random.seed(seed)
        out = mapper.map_group(records[seed:] + records[:seed])
        inst = out["instances"]
        h, w = out["image"].shape[1:]
        assert inst.image_size == (h, w) and len(inst) > 0, (name, seed)
        boxes = inst.gt_boxes.tensor
        assert (boxes[:, :2] >= -1e-3).all() and (boxes[:, 2] <= w + 1e-3).all()
        assert (boxes[:, 3] <= h + 1e-3).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert ((inst.gt_classes >= 0) & (inst.gt_classes < 8)).all()
        assert isinstance(inst.gt_masks, PolygonMasks) and len(inst.gt_masks) == len(inst)
        for box, polys in zip(boxes.tolist(), inst.gt_masks.polygons):
            pts = np.concatenate([np.reshape(p, (-1, 2)) for p in polys])
            pts = np.clip(pts, 0, [w, h])  # polygons may leave the image, boxes are clipped
            assert (pts.min(0) >= np.array(box[:2]) - 0.5).all(), (name, seed)
            assert (pts.max(0) <= np.array(box[2:]) + 0.5).all(), (name, seed)
        assert out["ignore_boxes"].tensor.shape[1] == 4
        assert {"neg_category_ids", "not_exhaustive_category_ids"} <= set(out)


@pytest.mark.parametrize("name", sorted(STEP_LISTS))
def test_ignore_boxes_stay_aligned_with_gt(records, name):
    steps, opts = STEP_LISTS[name]
    mapper = LongTailDatasetMapper(aug_cfg(steps, opts), True)
    checked = 0
    for seed in range(6):
        np.random.seed(seed)
        out = mapper.map_group(records[seed % 4 :] + records[: seed % 4])
        inst = out["instances"]
        gt = inst.gt_boxes.tensor[inst.gt_classes <= 1]
        ign = out["ignore_boxes"].tensor
        assert isinstance(inst.gt_masks, PolygonMasks)  # polygons stay polygons
        key = lambda t: sorted(map(tuple, t.round(decimals=3).tolist()))  # noqa: E731
        assert key(gt) == key(ign), (name, seed)
        checked += len(gt)
    assert checked > 0


def test_mosaic_geometry_round_trip(records):
    mapper = LongTailDatasetMapper(aug_cfg(["Mosaic"]), True)
    step = MosaicStep(1.0, HW, (1.0, 1.0), 0.0)  # centre (100, 80): tiles at unit scale
    out = step(mapper.load_sample(records[0]), [lazy(mapper, r) for r in records[1:]])
    assert out.hw == (160, 200)
    offsets = [(0, 0), (100, 0), (0, 80), (100, 80)]
    for k, (dx, dy) in enumerate(offsets):
        image = mapper.load_sample(records[k]).image
        assert np.array_equal(out.image[dy : dy + 80, dx : dx + 100], image)
        for j, anno in enumerate(records[k]["annotations"]):
            placed = out.annos[3 * k + j]["segmentation"]
            expected = np.zeros((160, 200), bool)
            expected[dy : dy + 80, dx : dx + 100] = raster(anno["segmentation"][0], HW)
            assert np.array_equal(raster(placed[0], (160, 200)), expected)
    # LVIS labels: neg ids {8-k, 7} -> contiguous {7-k, 6}, negative in all four: {6};
    # not-exhaustive ids {3+k} -> the union {2, 3, 4, 5}.
    assert out.pos == {0, 1, 2, 3, 4, 5}
    assert out.neg == {6}
    assert out.not_exhaustive == {2, 3, 4, 5}


def test_mosaic_clips_and_merges_negatives_present_elsewhere(tmp_path):
    recs = [
        write_record(tmp_path, f"m{k}", (40, 40), [(k, rect(5, 5, 35, 35))], neg=[6, 1])
        for k in range(4)
    ]
    mapper = LongTailDatasetMapper(aug_cfg(["Mosaic"]), True)
    step = MosaicStep(1.0, (40, 40), (0.5, 0.5), 0.0)  # centre (20, 20): tiles cut in half
    out = step(mapper.load_sample(recs[0]), [lazy(mapper, r) for r in recs[1:]])
    assert out.neg == {5}  # class 0 is listed negative everywhere but present (tile 0)
    # Tile 0 lies at (-20, -20): its square (5..35) is cut to 0..15.
    box = np.asarray(out.annos[0]["segmentation"][0]).reshape(-1, 2)
    assert np.allclose(box.min(0), 0) and np.allclose(box.max(0), 15)


def test_rotation_round_trip(records):
    cfg = aug_cfg(
        ["Rotation"],
        [
            "INPUT.ROTATION.PROB",
            "1.0",
            "INPUT.ROTATION.ANGLE",
            "90.0",
            "INPUT.ROTATION.EXPAND",
            "True",
        ],
    )
    mapper = LongTailDatasetMapper(cfg, True)
    step = mapper.steps[0]
    step._rotation.angle = [90.0, 90.0]  # exactly 90 degrees: the raster rotates exactly
    np.random.seed(0)
    out = mapper(records[0])
    image = out["image"].permute(1, 2, 0).numpy()[:, :, ::-1]  # BGR -> RGB
    assert np.array_equal(image, np.rot90(mapper.load_sample(records[0]).image[:, :, ::-1]))
    masks = masks_of(out["instances"])
    for m, anno in zip(masks, records[0]["annotations"]):
        expected = np.rot90(raster(anno["segmentation"][0], HW))
        assert m.shape == expected.shape
        if anno["category_id"] <= 1:  # rectangles: exact
            assert np.array_equal(m, expected)
        else:  # a triangle's slanted edge rasterises a little differently
            assert iou(m, expected) > 0.85
    boxes = out["instances"].gt_boxes.tensor
    assert torch.equal(boxes[:2], BitMasks(torch.from_numpy(masks[:2])).get_bounding_boxes().tensor)


def _paste(tmp_path, dest_objs, src_objs, **kw):
    dest = write_record(
        tmp_path, "dest", HW, dest_objs, ignore=[(60, 50, 95, 75)], neg=[7, 8], nex=[1], seed=1
    )
    src = write_record(tmp_path, "src", HW, src_objs, neg=[8], nex=[2], seed=2)
    mapper = LongTailDatasetMapper(aug_cfg(["CopyPaste"]), True)
    step = CopyPasteStep(1.0, 100, kw.get("moved", 10.0), kw.get("min_area", 30.0))
    sample = step(mapper.load_sample(dest), [lazy(mapper, src)])
    return sample, mapper.load_sample(dest), mapper.load_sample(src)


def test_copy_paste_occlusion_removal(tmp_path):
    cover = rect(0, 0, 50, 40)
    dest_objs = [
        (0, rect(30, 20, 70, 60)),  # partly covered
        (1, rect(10, 10, 20, 20)),  # fully covered: dropped
        (2, rect(45, 5, 54, 12)),  # 4 x 7 px left, box moved by 5 > 4: dropped
        (3, rect(60, 50, 95, 75)),  # untouched
    ]
    out, dest, src = _paste(tmp_path, dest_objs, [(5, cover)], moved=4.0)
    assert [a["category_id"] for a in out.annos] == [0, 3, 5]
    covered = raster(cover, HW)
    assert np.array_equal(out.image[covered], src.image[covered])
    assert np.array_equal(out.image[~covered], dest.image[~covered])
    a = raster(out.annos[0]["segmentation"][0], HW)
    assert iou(a, raster(dest_objs[0][1], HW) & ~covered) > 0.97
    assert np.allclose(out.annos[0]["bbox"], [30, 20, 70, 60])  # the L-shape keeps its box
    assert out.annos[1]["segmentation"][0].tolist() == dest_objs[3][1]  # polygon kept as is
    assert np.array_equal(ignore_boxes(out), ignore_boxes(dest))
    assert out.pos == {0, 1, 2, 3, 5}  # destination positives (as loaded) + pasted
    assert out.neg == {7} and out.not_exhaustive == {0, 1}


def test_copy_paste_hole_stays_polygons(tmp_path):
    out, dest, src = _paste(tmp_path, [(0, rect(10, 10, 70, 70))], [(5, rect(30, 30, 40, 40))])
    segms = [a["segmentation"] for a in out.annos]
    assert all(isinstance(s, list) for s in segms) and len(segms[0]) >= 2  # cut into pieces
    inner = raster(rect(30, 30, 40, 40), HW).astype(bool)
    ring = np.any([raster(p, HW) for p in segms[0]], axis=0)
    assert iou(ring, raster(rect(10, 10, 70, 70), HW) & ~inner) > 0.97
    assert not (ring & inner).any()
    assert np.array_equal(raster(segms[1][0], HW).astype(bool), inner)


def test_copy_paste_masks_onto_polygons_rasterises(tmp_path):
    dest = write_record(tmp_path, "dest", HW, [(0, rect(10, 10, 70, 70))], seed=1)
    src = write_record(tmp_path, "src", HW, [(5, rect(30, 30, 40, 40))], seed=2)
    src["annotations"][0]["segmentation"] = raster(rect(30, 30, 40, 40), HW).astype(np.uint8)
    mapper = LongTailDatasetMapper(aug_cfg(["CopyPaste"]), True)
    out = CopyPasteStep(1.0, 100, 10, 30)(mapper.load_sample(dest), [lazy(mapper, src)])
    masks = [a["segmentation"] for a in out.annos]
    assert all(isinstance(m, np.ndarray) for m in masks)
    inner = raster(rect(30, 30, 40, 40), HW).astype(bool)
    assert np.array_equal(masks[0].astype(bool), raster(rect(10, 10, 70, 70), HW) & ~inner)
    assert np.array_equal(masks[1].astype(bool), inner)


def test_copy_paste_prefers_rare_sources(tmp_path):
    recs = [write_record(tmp_path, f"c{k}", HW, [(k, rect(5, 5, 20, 20))]) for k in range(3)]
    step = CopyPasteStep(1.0, 100, 10, 30, num_candidates=3, class_image_count=[50, 2, 9])
    assert step._choose([LazySample(r, None) for r in recs]).record is recs[1]
    assert (
        CopyPasteStep(1.0, 100, 10, 30)._choose([LazySample(r, None) for r in recs]).record
        is recs[0]
    )


def test_instaboost_identity_and_jitter(records):
    mapper = LongTailDatasetMapper(aug_cfg(["InstaBoost"]), True)
    sample = mapper.load_sample(records[0])
    same = InstaBoostStep(1.0, 3, 0.0, (1.0, 1.0), 0.0)(sample, [])
    for a, b in zip(same.annos, sample.annos):
        assert np.allclose(np.concatenate(a["segmentation"]), np.concatenate(b["segmentation"]))
    union = np.any([raster(a["segmentation"][0], HW) for a in sample.annos], axis=0)
    assert np.abs(same.image[union].astype(int) - sample.image[union]).max() <= 1
    np.random.seed(1)
    moved = InstaBoostStep(1.0, 3, 0.3, (0.8, 1.2), 10.0)(sample, [])
    assert [a["category_id"] for a in moved.annos] == [0, 1, 2]
    assert moved.recompute_boxes and moved.pos == sample.pos
    areas0 = [raster(a["segmentation"][0], HW).sum() for a in sample.annos]
    areas1 = [sum(raster(p, HW).sum() for p in a["segmentation"]) for a in moved.annos]
    assert not np.allclose(areas0, areas1)
    assert all(0.5 * a <= b <= 1.5 * a for a, b in zip(areas0, areas1))
    outside = copy.deepcopy(sample)  # an annotation entirely outside the image is left alone
    w = HW[1]
    outside.annos = [dict(sample.annos[0], segmentation=[[w + 10.0, 2, w + 25, 2, w + 25, 12]])]
    kept = InstaBoostStep(1.0, 3, 0.3, (0.8, 1.2), 10.0)(outside, [])
    assert kept.annos[0]["segmentation"] == outside.annos[0]["segmentation"]
    assert np.array_equal(kept.image, outside.image)


def test_rle_bitmask_dataset_through_every_step(tmp_path, records):
    import pycocotools.mask as mask_util

    for r in records:
        for a in r["annotations"]:
            rle = mask_util.encode(np.asfortranarray(raster(a["segmentation"][0], HW)))
            a["segmentation"] = {"size": list(HW), "counts": rle["counts"].decode()}
    steps, opts = STEP_LISTS["all"]
    cfg = aug_cfg(
        ["InstaBoost"] + steps + ["CopyPaste"],
        opts
        + [
            "INPUT.MASK_FORMAT",
            "bitmask",
            "INPUT.COPY_PASTE.PROB",
            "1.0",
            "INPUT.INSTABOOST.PROB",
            "1.0",
        ],
    )
    mapper = LongTailDatasetMapper(cfg, True)
    assert mapper.num_extra_images == 4
    for seed in range(3):
        np.random.seed(seed)
        out = mapper.map_group(records + records[:1])
        inst = out["instances"]
        assert isinstance(inst.gt_masks, BitMasks) and len(inst) > 0
        assert torch.equal(inst.gt_boxes.tensor, inst.gt_masks.get_bounding_boxes().tensor)
