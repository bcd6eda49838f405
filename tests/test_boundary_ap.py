"""Boundary AP: boundary regions by hand and by definition, crops decoded exactly, and the
numbers of lvis-api's ``lvis_challenge_2021`` branch (stored in
``fixtures/boundary_ap_reference.json``) to 1e-9 AP points on adversarial inputs."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from boundary_cases import RUNS, adversarial_mask, digest, parity_cases
from lvis_random_split import random_results, random_split
from numpy.lib.stride_tricks import sliding_window_view
from pycocotools import mask as mask_utils

import lvis_longtail  # noqa: F401  (applies the compat layer: lvis-api's np.float)
from lvis_longtail.evaluation import LVISGroundTruth, evaluate_lvis_results, run_lvis_eval
from lvis_longtail.evaluation import boundary as boundary_module
from lvis_longtail.evaluation.boundary import (
    BoundaryCache,
    MaskBoundaries,
    cell_ious,
    dilation_pixels,
    pair_ious,
)
from lvis_longtail.evaluation.mask_crops import Crops
from lvis_longtail.utils.rle import decode_counts, decode_rle_string

FIXTURE = Path(__file__).parent / "fixtures" / "boundary_ap_reference.json"
TOL = 1e-9  # AP points


def rle(mask) -> dict:
    r = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def full_boundary(b: MaskBoundaries, i: int, h: int, w: int) -> np.ndarray:
    """Mask ``i``'s boundary as an (h, w) image."""
    out = np.zeros((w, h), dtype=np.uint8)  # crops are (width, height)
    x0, y0, x1, y1 = b.box[i].tolist()
    if x1 >= x0:
        out[x0 : x1 + 1, y0 : y1 + 1] = b.crops[i]
    return out.T


def by_definition(mask: np.ndarray, d: int) -> np.ndarray:
    """Mask pixels whose (2d+1)-square window leaves the mask or the image."""
    padded = np.pad(mask, d)
    interior = sliding_window_view(padded, (2 * d + 1, 2 * d + 1)).min(axis=(2, 3))
    return mask & (1 - interior)


def test_dilation_is_round_half_to_even_of_the_diagonal_and_at_least_one():
    assert dilation_pixels(75, 100) == 2  # 0.02 * 125 = 2.5 -> 2
    assert dilation_pixels(105, 140) == 4  # 0.02 * 175 = 3.5 -> 4
    assert dilation_pixels(480, 640) == 16  # 0.02 * 800
    assert dilation_pixels(427, 640) == 15  # 0.02 * 769.4 = 15.4
    assert dilation_pixels(1, 1) == 1  # 0.03 -> 0 -> at least 1
    assert dilation_pixels(75, 100, 0.05) == 6  # 6.25


def test_golden_boundaries_of_tiny_masks():
    # 7x7 image (d = 1): a 5x5 square inside keeps its 3x3 centre, the ring is boundary
    inside = np.zeros((7, 7), np.uint8)
    inside[1:6, 1:6] = 1
    # a full 4x6 image: every pixel on the image border is boundary (4 * 6 - 2 * 4)
    full = np.ones((4, 6), np.uint8)
    # a one-pixel line and a single pixel are all boundary
    line = np.zeros((5, 9), np.uint8)
    line[2, 1:8] = 1
    dot = np.zeros((3, 3), np.uint8)
    dot[1, 1] = 1
    # 75x100 (d = 2): a 20x30 rectangle keeps 16x26 = 416 pixels, 600 - 416 are boundary
    rect = np.zeros((75, 100), np.uint8)
    rect[10:30, 20:50] = 1
    empty = np.zeros((6, 4), np.uint8)
    masks = [inside, full, line, dot, rect, empty]
    b = MaskBoundaries.from_rles([rle(m) for m in masks])
    assert b.area.tolist() == [16, 16, 7, 1, 184, 0]
    ring = inside.copy()
    ring[2:5, 2:5] = 0
    np.testing.assert_array_equal(full_boundary(b, 0, 7, 7), ring)
    expected = np.ones((4, 6), np.uint8)
    expected[1:3, 1:5] = 0
    np.testing.assert_array_equal(full_boundary(b, 1, 4, 6), expected)
    np.testing.assert_array_equal(full_boundary(b, 2, 5, 9), line)
    np.testing.assert_array_equal(full_boundary(b, 3, 3, 3), dot)
    expected = rect.copy()
    expected[12:28, 22:48] = 0
    np.testing.assert_array_equal(full_boundary(b, 4, 75, 100), expected)
    assert b.box[4].tolist() == [20, 10, 49, 29]  # x0, y0, x1, y1 of the mask
    assert b.box[5].tolist() == [0, 0, -1, -1] and b.crops[5].size == 0


def test_golden_boundary_iou_and_the_matching_iou():
    # 7x7 image, d = 1: A = rows/cols 0-4 (touching the border), B = rows/cols 1-5. Their
    # rings (16 pixels each) share (4, 1) and (1, 4): boundary IoU 2 / 30; mask IoU 16 / 34
    a = np.zeros((7, 7), np.uint8)
    a[0:5, 0:5] = 1
    b = np.zeros((7, 7), np.uint8)
    b[1:6, 1:6] = 1
    dt, gt = MaskBoundaries.from_rles([rle(a)]), MaskBoundaries.from_rles([rle(b)])
    assert pair_ious(dt, [0], gt, [0]).tolist() == [2 / 30]
    # matching IoUs against B: min(mask IoU, boundary IoU) where the mask IoU reaches 0.5
    shifted = np.zeros((7, 7), np.uint8)  # B one pixel left: mask IoU 20 / 30, rings share 8
    shifted[1:6, 0:5] = 1
    ring = b.copy()  # B's ring: its boundary is B's (IoU 1), its mask IoU 16 / 25
    ring[2:5, 2:5] = 0
    cache = BoundaryCache(0.02, lambda keys: [rle(b) for _ in keys])
    cells = [(np.array([0, 1, 2]), np.array([7]))]
    (iou,) = cell_ious(cells, [rle(shifted), rle(ring), rle(a)], cache._rles, cache, 0.5)
    assert iou.tolist() == [[8 / 24], [16 / 25], [16 / 34]]  # A: below 0.5 whatever its
    # boundary IoU (2 / 30), so never matched: its mask IoU stands in


def test_boundaries_equal_the_definition_on_adversarial_masks():
    rng = np.random.default_rng(0)
    masks = []
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        masks.append(adversarial_mask(rng, h, w))
    for ratio in (0.02, 0.1, 0.3):
        b = MaskBoundaries.from_rles([rle(m) for m in masks], ratio)
        for i, m in enumerate(masks):
            expected = by_definition(m, dilation_pixels(*m.shape, ratio))
            np.testing.assert_array_equal(full_boundary(b, i, *m.shape), expected)
            assert b.area[i] == expected.sum()


def test_crops_decode_compressed_rles_exactly():
    rng = np.random.default_rng(1)
    masks = [adversarial_mask(rng, *(int(v) for v in rng.integers(1, 50, 2))) for _ in range(200)]
    masks += [np.zeros((3, 4), np.uint8), np.ones((1, 1), np.uint8)]
    rles = [rle(m) for m in masks]
    for r in rles[::2]:
        r["counts"] = r["counts"].encode("ascii")  # bytes, as pycocotools makes them
    counts, bounds = decode_counts(rles)
    for i, r in enumerate(rles):
        text = r["counts"].decode() if isinstance(r["counts"], bytes) else r["counts"]
        assert counts[bounds[i] : bounds[i + 1]].tolist() == decode_rle_string(text)
    crops = Crops.from_rles(rles)
    for i, m in enumerate(masks):
        x0, y0, x1, y1 = (int(crops.boxes[k][i]) for k in range(4))
        out = np.zeros(m.shape[::-1], np.uint8)
        out[x0 : x1 + 1, y0 : y1 + 1] = crops.crop(i)
        np.testing.assert_array_equal(out.T, mask_utils.decode(rles[i]))
    assert crops.areas().tolist() == [int(m.sum()) for m in masks]


@pytest.mark.parametrize("case", parity_cases(), ids=lambda c: c["name"])
def test_equal_to_the_lvis_challenge_2021_branch(case):
    fixture = {c["name"]: c for c in json.loads(FIXTURE.read_text())["cases"]}[case["name"]]
    assert fixture["digest"] == digest(case), (
        "tests/boundary_cases.py no longer makes the inputs of the stored reference numbers; "
        "regenerate them with tests/fixtures/make_boundary_reference.py"
    )
    gt = LVISGroundTruth(copy.deepcopy(case["dataset"]))
    for run, expected in zip(RUNS, fixture["runs"]):
        ours = run_lvis_eval(
            gt,
            case["records"],
            "boundary",
            run["max_dets"],
            dets_per_class=run["dets_per_class"],
            dilation_ratio=run["ratio"],
        )
        values = np.array(list(ours.metrics.values())) * 100
        reference = np.array([v for _, v in expected["metrics"]]) * 100
        np.testing.assert_allclose(values, reference, rtol=0, atol=TOL, err_msg=str(run))
        per_class = [np.nan if v is None else v * 100 for v in expected["per_class_ap"]]
        np.testing.assert_allclose(ours.per_class_ap() * 100, per_class, rtol=0, atol=TOL)
    assert 0 < ours.metrics["AP"] < 1  # not a trivial case


def test_a_huge_dilation_ratio_gives_exactly_segm_ap():
    dataset = random_split(4, num_images=7)
    records = random_results(dataset, 4)
    gt = LVISGroundTruth(copy.deepcopy(dataset))
    segm = run_lvis_eval(gt, records, "segm")
    boundary = run_lvis_eval(gt, records, "boundary", dilation_ratio=1e6)
    assert boundary.metrics == segm.metrics  # every mask is all boundary: min(iou, iou)
    np.testing.assert_array_equal(boundary.precision, segm.precision)
    assert run_lvis_eval(gt, records, "boundary").metrics["AP"] < segm.metrics["AP"]


def test_ground_truth_boundaries_are_computed_once_and_reused():
    rng = np.random.default_rng(2)
    masks = [adversarial_mask(rng, 20, 30) for _ in range(12)]
    masks[3][:] = 0
    asked = []

    def rles(keys):
        asked.extend(keys)
        return [rle(masks[k]) for k in keys]

    cache = BoundaryCache(0.1, rles)
    first = cache.get([5, 3, 1, 5])
    again = cache.get([1, 3, 5, 7])
    assert sorted(asked) == [1, 3, 5, 7]  # each mask decoded and eroded once
    fresh = MaskBoundaries.from_rles([rle(masks[k]) for k in (1, 3, 5, 7)], 0.1)
    for i in range(4):
        np.testing.assert_array_equal(
            full_boundary(again, i, 20, 30), full_boundary(fresh, i, 20, 30)
        )
    np.testing.assert_array_equal(again.box, fresh.box)
    np.testing.assert_array_equal(again.area, fresh.area)
    np.testing.assert_array_equal(first.area, fresh.area[[2, 1, 0, 2]])


def test_evaluating_twice_and_in_small_pixel_groups_gives_the_same_numbers(monkeypatch):
    dataset = random_split(6, num_images=8)
    records = random_results(dataset, 6)
    gt = LVISGroundTruth(copy.deepcopy(dataset))
    first = evaluate_lvis_results(gt, records, "boundary")
    assert len(gt.boundary_cache(0.02)) > 0
    monkeypatch.setattr(boundary_module, "PIXEL_BUDGET", 500)  # a group per cell or two
    assert evaluate_lvis_results(gt, records, "boundary") == first  # cached ground truth
    fresh = LVISGroundTruth(copy.deepcopy(dataset))
    assert evaluate_lvis_results(fresh, records, "boundary") == first


def test_boundary_needs_masks_and_the_fast_evaluator():
    dataset = random_split(1, num_images=3)
    records = random_results(dataset, 1, masks=False)
    with pytest.raises(Exception, match="segmentation"):
        evaluate_lvis_results(copy.deepcopy(dataset), records, "boundary")
    with pytest.raises(ValueError, match="fast evaluator only"):
        evaluate_lvis_results(copy.deepcopy(dataset), [], "boundary", evaluator="lvis_api")
