"""The fast evaluator gives lvis-api 0.5.3's numbers: every metric within 1e-9.

Splits and results come from :mod:`lvis_random_split` (tests/): negative, unknown
and not-exhaustively annotated categories, a category without ground truth, an image without
annotations or detections, an annotation with area 0 and one with ``ignore``, zero-width
boxes, tied scores, results not grouped by image.
"""

import copy
import json

import numpy as np
import pytest
from lvis import LVISEval, LVISResults
from lvis_random_split import random_results, random_split

import lvis_longtail  # noqa: F401  (applies the compat layer: lvis-api's np.float)
from lvis_longtail.evaluation import (
    DetectionTable,
    LVISGroundTruth,
    cap_per_image,
    evaluate_lvis_results,
    load_lvis_results,
    metric_names,
    run_lvis_eval,
    top_k_per_class,
)
from lvis_longtail.evaluation.lvis_evaluation import LoadedLVIS

TOL = 1e-9


def official(dataset, records, task, max_dets=300):
    """lvis-api run directly, on private copies (it mutates both)."""
    gt = LoadedLVIS(copy.deepcopy(dataset))
    records = copy.deepcopy(records)
    if task == "segm":
        for r in records:
            r.pop("bbox", None)
    lvis_eval = LVISEval(gt, LVISResults(gt, records, max_dets=max_dets), task)
    lvis_eval.params.max_dets = max_dets
    lvis_eval.run()
    return lvis_eval


def assert_metrics_equal(ours: dict, expected: dict):
    assert list(ours) == list(expected)
    diffs = {m: abs(ours[m] - expected[m]) for m in expected}
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("task", ["bbox", "segm"])
def test_random_cases_match_lvis_api(seed, task):
    dataset = random_split(seed, num_images=6 + seed)
    records = random_results(dataset, seed)
    gt = LVISGroundTruth(dataset)
    for max_dets in (300, 4, -1):
        expected = official(dataset, records, task, max_dets)
        ours = run_lvis_eval(gt, records, task, max_dets)
        assert_metrics_equal(ours.metrics, expected.get_results())
        # the per-class precision/recall arrays too, not only their means
        np.testing.assert_allclose(ours.precision, expected.eval["precision"], atol=TOL, rtol=0)
        np.testing.assert_allclose(ours.recall, expected.eval["recall"], atol=TOL, rtol=0)
    assert 0 < ours.metrics["AP"] < 1  # a non-trivial case


def test_both_evaluators_through_the_public_function(tmp_path):
    dataset = random_split(11)
    records = random_results(dataset, 11)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(records))
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(dataset))
    for task in ("bbox", "segm"):
        fast = evaluate_lvis_results(str(gt_path), str(path), task, evaluator="fast")
        slow = evaluate_lvis_results(copy.deepcopy(dataset), records, task, evaluator="lvis_api")
        assert_metrics_equal(fast, slow)
        assert set(fast) == set(metric_names(300)) and 0 < fast["AP"] < 100


def test_mask_scores_rank_segm_in_both_evaluators():
    dataset = random_split(5)
    records = random_results(dataset, 5)
    rng = np.random.default_rng(0)
    for r in records:
        r["segm_score"] = round(float(rng.uniform(0, 1)), 2)
    for task in ("bbox", "segm"):
        fast = evaluate_lvis_results(dataset, records, task)
        slow = evaluate_lvis_results(copy.deepcopy(dataset), records, task, evaluator="lvis_api")
        assert_metrics_equal(fast, slow)
    plain = [{k: v for k, v in r.items() if k != "segm_score"} for r in records]
    assert evaluate_lvis_results(dataset, plain, "bbox") == evaluate_lvis_results(
        dataset, records, "bbox"
    )
    assert evaluate_lvis_results(dataset, plain, "segm") != evaluate_lvis_results(
        dataset, records, "segm"
    )


def test_no_detections_and_detections_only_on_unknown_categories():
    dataset = random_split(3)
    for records in ([], [r for r in random_results(dataset, 3) if r["category_id"] == 10]):
        for task in ("bbox", "segm"):
            fast = evaluate_lvis_results(dataset, records, task)
            slow = evaluate_lvis_results(
                copy.deepcopy(dataset), records, task, evaluator="lvis_api"
            )
            assert_metrics_equal(fast, slow)
            assert fast["AP"] == 0.0  # every category with ground truth scores 0


def test_cap_per_image_is_lvis_apis_limit_with_ties():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 5, 200)
    score = rng.integers(0, 4, 200) / 4  # many ties
    records = [
        {"image_id": int(i), "score": float(s), "k": k}
        for k, (i, s) in enumerate(zip(image, score))
    ]
    kept = LVISResults.limit_dets_per_image(None, records, 7)
    mask = cap_per_image(image, score, 7)
    assert sorted(r["k"] for r in kept) == np.flatnonzero(mask).tolist()
    assert cap_per_image(image, score, -1).all()


def test_top_k_per_class_is_exact_and_stable():
    category = np.array([1, 2, 1, 1, 2, 1, 3, 1])
    score = np.array([0.5, 0.9, 0.7, 0.5, 0.9, 0.5, 0.1, 0.9])
    keep = top_k_per_class(category, score, 3)
    # class 1: 0.9 (row 7), 0.7 (row 2), then the first of the tied 0.5s (row 0)
    assert np.flatnonzero(keep).tolist() == [0, 1, 2, 4, 6, 7]
    assert top_k_per_class(category, score, 1).sum() == 3
    table = DetectionTable(np.zeros(8, np.int64), category, score, bbox=np.ones((8, 4)))
    assert len(table.take(keep)) == 6


def test_fixed_ap_top_k_then_no_per_image_cap_matches_lvis_api():
    """Dave et al.'s procedure: top k per class (stable by score), lvis-api with max_dets -1."""
    dataset = random_split(2, num_images=10)
    records = random_results(dataset, 2, false_positives=30)
    k = 4
    by_cat = {}
    for r in records:
        by_cat.setdefault(r["category_id"], []).append(r)
    selected = [
        r for rs in by_cat.values() for r in sorted(rs, key=lambda r: r["score"], reverse=True)[:k]
    ]
    order = {id(r): i for i, r in enumerate(records)}
    selected.sort(key=lambda r: order[id(r)])
    for task in ("bbox", "segm"):
        expected = official(dataset, selected, task, -1).get_results()
        for evaluator in ("fast", "lvis_api"):
            ours = run_lvis_eval(
                copy.deepcopy(dataset), records, task, -1, dets_per_class=k, evaluator=evaluator
            )
            assert_metrics_equal(ours.metrics, expected)
        assert "AR@-1" in expected


def test_load_lvis_results_accepts_valid_files(tmp_path):
    dataset = random_split(4)
    records = random_results(dataset, 4)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(records))
    loaded = load_lvis_results(str(path), dataset, required=("bbox", "segmentation"))
    assert loaded == records
    table = load_lvis_results(str(path), dataset, as_table=True)
    expected = DetectionTable.from_records(records)
    for column in ("image_id", "category_id", "score", "bbox"):
        np.testing.assert_array_equal(getattr(table, column), getattr(expected, column))
    assert table.masks.rles(np.arange(3)) == [r["segmentation"] for r in records[:3]]
    for task in ("bbox", "segm"):
        assert (
            run_lvis_eval(dataset, table, task).metrics
            == run_lvis_eval(dataset, records, task).metrics
        )
