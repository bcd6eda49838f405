"""LVISLongTailEvaluator and results export on a hand-made 3-image LVIS-format split.

Every AP expected here is derived by hand in the test and also checked against lvis-api run
directly on the written results file.
"""

import json
import os
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from lvis import LVIS, LVISEval, LVISResults

import lvis_longtail  # noqa: F401  (applies the compat layer: lvis-api's np.float)
from lvis_longtail.evaluation import (
    DetectionShard,
    EvalProtocol,
    LVISLongTailEvaluator,
    LVISResultsError,
    evaluate_lvis_results,
    instances_to_rows,
    metric_names,
    read_shards,
    records_for_task,
    validate_lvis_results,
    write_json_atomic,
    write_results_file,
)
from lvis_longtail.evaluation.lvis_evaluation import resolve_frequencies
from lvis_longtail.evaluation.results import SplitIndex, table_to_records
from lvis_longtail.evaluation.rows import preselect

H, W = 128, 160
CAT_IDS = [3, 7, 9, 12]  # contiguous 0..3; not identity + 1
FREQ = ["r", "c", "f", "f"]
# image id -> [(category id, [x, y, w, h])]: small (< 32²), medium and large squares
GT = {
    101: [(3, [10, 10, 20, 20]), (9, [50, 20, 60, 60])],
    102: [(7, [5, 5, 40, 40]), (7, [60, 60, 24, 24]), (9, [90, 10, 50, 50])],
    103: [(12, [20, 20, 110, 100]), (3, [140, 100, 16, 16])],
}
NEG = {101: [7], 102: [3, 12], 103: [9]}
NOT_EXHAUSTIVE = {101: [], 102: [9], 103: []}
PERFECT_SCORES = {101: [0.9, 0.8], 102: [0.85, 0.75, 0.7], 103: [0.95, 0.65]}


def square_polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def split_json(with_annotations=True):
    images = [
        {
            "id": i,
            "height": H,
            "width": W,
            "file_name": f"{i}.jpg",
            "neg_category_ids": NEG[i],
            "not_exhaustive_category_ids": NOT_EXHAUSTIVE[i],
        }
        for i in GT
    ]
    categories = [
        {"id": c, "name": f"cat{c}", "frequency": f, "synset": f"cat{c}.n.01"}
        for c, f in zip(CAT_IDS, FREQ)
    ]
    dataset = {"info": {}, "licenses": [], "images": images, "categories": categories}
    if with_annotations:
        anns = [(i, c, b) for i, objs in GT.items() for c, b in objs]
        dataset["annotations"] = [
            {
                "id": k + 1,
                "image_id": i,
                "category_id": c,
                "bbox": b,
                "area": b[2] * b[3],
                "segmentation": square_polygon(*b),
            }
            for k, (i, c, b) in enumerate(anns)
        ]
    return dataset


def register(tmp_path, with_annotations=True, mapping=True, class_frequency=True, dataset=None):
    """Write the split json and register it under a unique name."""
    json_file = tmp_path / f"split_{uuid.uuid4().hex[:8]}.json"
    json_file.write_text(json.dumps(dataset or split_json(with_annotations)))
    name = f"lt_eval_{uuid.uuid4().hex}"
    DatasetCatalog.register(name, lambda: [])
    meta = {"json_file": str(json_file), "thing_classes": [f"cat{c}" for c in CAT_IDS]}
    if mapping:
        meta["thing_dataset_id_to_contiguous_id"] = {c: k for k, c in enumerate(CAT_IDS)}
    if class_frequency:
        meta["class_frequency"] = list(FREQ)
    MetadataCatalog.get(name).set(**meta)
    return name, str(json_file)


def instances(dets, mask_scores=None):
    """dets: [(category id, box [x, y, w, h], score[, mask box])]; masks are filled boxes."""
    inst = Instances((H, W))
    boxes = [[x, y, x + w, y + h] for _, (x, y, w, h), *_ in dets]
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor([d[2] for d in dets], dtype=torch.float32)
    inst.pred_classes = torch.tensor([CAT_IDS.index(d[0]) for d in dets], dtype=torch.long)
    masks = torch.zeros((len(dets), H, W), dtype=torch.bool)
    for k, det in enumerate(dets):
        x, y, w, h = det[3] if len(det) > 3 else det[1]
        masks[k, y : y + h, x : x + w] = True
    inst.pred_masks = masks
    if mask_scores is not None:
        inst.mask_scores = torch.tensor(mask_scores, dtype=torch.float32)
    return inst


def streamed_table(tmp_path, instances_by_image, max_dets=300):
    """The table the evaluator reads back: each image's Instances preselected for the
    per-image cap and streamed through a shard (contiguous class k -> CAT_IDS[k])."""
    path = str(tmp_path / f"{uuid.uuid4().hex}.shard")
    with DetectionShard(path) as shard:
        for image_id, inst in instances_by_image.items():
            shard.add_instances(image_id, preselect(inst, max_dets), dict(enumerate(CAT_IDS)))
    return read_shards([path])[0]


def perfect_dets():
    return {i: [(c, b, s) for (c, b), s in zip(GT[i], PERFECT_SCORES[i])] for i in GT}


def run(name, dets_by_image, output_dir=None, mask_scores=None, **kwargs):
    kwargs.setdefault("distributed", False)
    evaluator = LVISLongTailEvaluator(name, output_dir, **kwargs)
    evaluator.reset()
    for image_id, dets in dets_by_image.items():
        ms = None if mask_scores is None else mask_scores[image_id]
        inputs = [{"image_id": image_id, "height": H, "width": W}]
        evaluator.process(inputs, [{"instances": instances(dets, ms)}])
    return evaluator.evaluate()


def lvis_api(json_file, results_file, iou_type, max_dets=300):
    """lvis-api straight on the results file; segm without bbox (mask area, as documented)."""
    gt = LVIS(json_file)
    results = str(results_file)
    if iou_type == "segm":
        with open(results_file) as f:
            results = [{k: v for k, v in r.items() if k != "bbox"} for r in json.load(f)]
    lvis_eval = LVISEval(gt, LVISResults(gt, results, max_dets=max_dets), iou_type)
    lvis_eval.params.max_dets = max_dets
    lvis_eval.run()
    return {m: v * 100 if v >= 0 else -1.0 for m, v in lvis_eval.get_results().items()}


def assert_same(ours, expected, tol=1e-9):
    """Every lvis-api metric, equal within ``tol`` (percent points); the fast evaluator's
    precision is tp / (tp + fp), lvis-api's tp / (tp + fp + eps)."""
    assert list(ours) == list(expected)
    assert all(abs(ours[m] - expected[m]) <= tol for m in expected), (ours, expected)


def read(path):
    with open(path) as f:
        return json.load(f)


def test_perfect_predictions_give_100_and_match_lvis_api(tmp_path):
    name, json_file = register(tmp_path)
    results = run(name, perfect_dets(), tmp_path / "out", distributed=True)
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        # lvis-api's precision tp / (tp + fp + eps) lands a few ulps under 1
        assert results[task] == pytest.approx({m: 100.0 for m in metric_names(300)})
        expected = lvis_api(json_file, tmp_path / "out" / "lvis_instances_results.json", task)
        assert_same(results[task], expected)
    protocol = {"name": "standard", "max_dets_per_image": 300, "dets_per_class": -1}
    source = "the json's 'frequency' fields (4 categories)"
    saved = dict(results, protocol=protocol, frequency_source=source)
    assert read(tmp_path / "out" / "lvis_metrics.json") == saved


def test_parity_with_lvis_api_on_imperfect_predictions(tmp_path):
    """Jittered boxes, false positives, a wrong class: numbers equal lvis-api's on the file."""
    name, json_file = register(tmp_path)
    rng = np.random.default_rng(0)
    dets = {}
    for image_id, objs in GT.items():
        dets[image_id] = []
        for c, (x, y, w, h) in objs:
            dx, dy = rng.integers(-4, 5, size=2)
            box = [max(0, x + int(dx)), max(0, y + int(dy)), w, h]
            dets[image_id].append((c, box, float(rng.uniform(0.3, 1.0))))
        for _ in range(4):  # false positives of random positive/negative/unknown classes
            x, y = rng.integers(0, 100, size=2)
            c = CAT_IDS[int(rng.integers(0, 4))]
            dets[image_id].append((c, [int(x), int(y), 30, 25], float(rng.uniform(0, 1))))
    results = run(name, dets, tmp_path)
    raw_file = tmp_path / "lvis_instances_results.json"
    for task in ("bbox", "segm"):
        expected = lvis_api(json_file, raw_file, task)
        assert_same(results[task], expected)
        assert 0 < results[task]["AP"] < 100
        # the standalone function on the file and the split's path gives the same numbers
        assert evaluate_lvis_results(json_file, raw_file, task) == results[task]
        official = evaluate_lvis_results(json_file, raw_file, task, evaluator="lvis_api")
        assert official == expected
    # lvis-api on the file as is (segm areas from the boxes): same except the area ranges
    raw_segm = LVISEval(LVIS(json_file), LVISResults(LVIS(json_file), str(raw_file)), "segm")
    raw_segm.run()
    for m in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
        assert results["segm"][m] == raw_segm.get_results()[m] * 100


@pytest.mark.parametrize(
    "extra, ap, group",
    [
        # cat 12 is neither positive nor negative in image 101: ignored, AP stays 100
        ({101: (12, [100, 80, 30, 30])}, 100.0, {}),
        # cat 9 is not exhaustively annotated in image 102: unmatched detection is ignored
        ({102: (9, [0, 90, 30, 30])}, 100.0, {}),
        # cat 7 is negative in image 101: a false positive above both cat-7 true positives,
        # precision 0, 1/2, 2/3 -> interpolated 2/3 at every recall; AP = (1 + 2/3 + 1 + 1) / 4
        ({101: (7, [100, 80, 30, 30])}, 100 * 11 / 12, {"APc": 200 / 3, "APr": 100.0}),
        # cat 9 is positive (exhaustive) in image 101: the same 2/3 for cat 9, APf = (2/3 + 1) / 2
        ({101: (9, [0, 90, 30, 30])}, 100 * 11 / 12, {"APf": 250 / 3, "APc": 100.0}),
    ],
)
def test_federated_rules(tmp_path, extra, ap, group):
    name, json_file = register(tmp_path)
    dets = perfect_dets()
    for image_id, (c, box) in extra.items():
        dets[image_id] = dets[image_id] + [(c, box, 0.99)]
    results = run(name, dets, tmp_path)
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == pytest.approx(ap)
        for metric, value in group.items():
            assert results[task][metric] == pytest.approx(value)
        expected = lvis_api(json_file, tmp_path / "lvis_instances_results.json", task)
        assert_same(results[task], expected)


def test_per_image_cap_keeps_top_scores_and_maps_category_ids(tmp_path):
    name, json_file = register(tmp_path)
    dets = perfect_dets()
    scores = [0.1, 0.5, 0.3, 0.9, 0.2, 0.6]  # image 102 gets 3 + 6 detections
    dets[102] = dets[102] + [(3, [k * 20, 100, 15, 15], s) for k, s in enumerate(scores)]
    results = run(name, dets, tmp_path, max_dets_per_image=4)
    exported = read(tmp_path / "lvis_instances_results.json")
    per_image = {i: [r for r in exported if r["image_id"] == i] for i in GT}
    assert [len(per_image[i]) for i in GT] == [2, 4, 2]
    kept = sorted((r["score"] for r in per_image[102]), reverse=True)
    assert kept == pytest.approx([0.9, 0.85, 0.75, 0.7])  # the three GT hits and the 0.9
    # contiguous classes came back as the dataset's ids
    assert {(r["image_id"], r["category_id"]) for r in exported} == {
        (i, c) for i, objs in GT.items() for c, _ in objs
    } | {(102, 3)}
    expected = lvis_api(json_file, tmp_path / "lvis_instances_results.json", "bbox", max_dets=4)
    assert_same(results["bbox"], expected)


def test_unmapped_class_is_a_clear_error():
    inst = instances([(3, [0, 0, 10, 10], 0.5)])
    with pytest.raises(KeyError, match="predicted class 0 of image 5"):
        instances_to_rows(inst, 5, {1: 3})


def test_cap_with_mask_scores_keeps_each_tasks_top(tmp_path):
    dets = [(3, [k * 10, 0, 8, 8], s) for k, s in enumerate([0.9, 0.8, 0.7, 0.6])]
    inst = instances(dets, mask_scores=[0.1, 0.2, 0.95, 0.9])
    # top-2 by box score {0, 1} and by mask score {2, 3}; without mask scores only {0, 1}
    assert len(preselect(inst, 2)) == 4
    assert preselect(instances(dets), 2).scores.tolist() == pytest.approx([0.9, 0.8])
    table = streamed_table(tmp_path, {101: inst}, max_dets=2)
    records = table_to_records(table)
    assert len(records) == 4
    box_top = records_for_task(records, "bbox", 2)
    assert [r["score"] for r in box_top] == pytest.approx([0.9, 0.8])
    assert box_top[0]["segmentation"] is records[0]["segmentation"]
    segm_top = records_for_task(records, "segm", 2)
    assert [r["score"] for r in segm_top] == pytest.approx([0.95, 0.9])
    assert "bbox" not in segm_top[0]
    selected = EvalProtocol.create("standard", max_dets_per_image=2).apply(table, "file")
    path = tmp_path / "lvis_instances_results.json"
    write_results_file(selected, str(path), SplitIndex(split_json(False)))
    exported = read(path)
    assert [r["score"] for r in exported] == pytest.approx([0.95, 0.9])
    assert list(exported[0]) == ["image_id", "category_id", "score", "bbox", "segmentation"]


def test_mask_scores_rank_segm_but_not_bbox(tmp_path):
    """Image 101, cat 9: A has the GT box but a mask of IoU 0.26, B the GT box and mask.
    Box scores rank A first, mask scores rank B first; image 102's cat-9 hit scores 0.7."""
    name, json_file = register(tmp_path)
    dets = perfect_dets()
    gt_box = GT[101][1][1]
    dets[101] = [
        dets[101][0],
        (9, gt_box, 0.95, [85, 20, 60, 60]),  # A
        (9, gt_box, 0.6),  # B
    ]
    mask_scores = {101: [0.9, 0.2, 0.9], 102: PERFECT_SCORES[102], 103: PERFECT_SCORES[103]}
    with_ms = run(name, dets, tmp_path / "ms", mask_scores=mask_scores)
    without = run(name, dets, tmp_path / "plain")
    # bbox: A (0.95) hit, 0.7 hit, B (0.6) duplicate after all hits -> 100 either way
    assert with_ms["bbox"]["AP"] == without["bbox"]["AP"] == pytest.approx(100.0)
    # segm by mask score: B (0.9) hit, 0.7 hit, A (0.2) miss -> 100
    assert with_ms["segm"]["AP"] == pytest.approx(100.0)
    # segm by box score: A miss, 0.7 hit, B hit -> cat 9 AP 2/3, AP = (3 + 2/3) / 4
    assert without["segm"]["AP"] == pytest.approx(100 * 11 / 12)
    assert without["segm"]["APf"] == pytest.approx(100 * 5 / 6)
    exported = read(tmp_path / "ms" / "lvis_instances_results.json")
    cat9_101 = [r["score"] for r in exported if (r["image_id"], r["category_id"]) == (101, 9)]
    assert cat9_101 == pytest.approx([0.2, 0.9])  # the file carries the segm score
    expected = lvis_api(json_file, tmp_path / "ms" / "lvis_instances_results.json", "segm")
    assert_same(with_ms["segm"], expected)


def test_test_dev_json_exports_validates_and_returns_empty(tmp_path):
    name, _ = register(tmp_path, with_annotations=False)
    out = tmp_path / "out"
    assert run(name, perfect_dets(), out) == {}
    assert os.listdir(out) == ["lvis_instances_results.json"]  # no temp file, no metrics
    exported = read(out / "lvis_instances_results.json")
    assert len(exported) == 7
    for r in exported:
        assert set(r) == {"image_id", "category_id", "score", "bbox", "segmentation"}
        assert r["image_id"] in GT and r["category_id"] in CAT_IDS
        assert isinstance(r["score"], float) and len(r["bbox"]) == 4
        assert r["segmentation"]["size"] == [H, W]
        assert isinstance(r["segmentation"]["counts"], str)
    assert validate_lvis_results(str(out / "lvis_instances_results.json"), split_json(False))[
        "line"
    ] == ("lvis_instances_results.json: 7 detections on 3/3 images, 4 categories, max 3 per image")


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "lvis_instances_results.json"
    write_json_atomic([{"a": 1}], str(path))
    with pytest.raises(ValueError):
        write_json_atomic([{"score": float("nan")}], str(path))
    assert read(path) == [{"a": 1}]
    assert os.listdir(tmp_path) == ["lvis_instances_results.json"]


def test_unknown_image_id_from_the_evaluator_names_file_record_and_field(tmp_path):
    name, _ = register(tmp_path)
    dets = perfect_dets()
    dets[999] = [(3, [0, 0, 10, 10], 0.5)]
    with pytest.raises(LVISResultsError) as err:
        run(name, dets, tmp_path)
    path = str(tmp_path / "lvis_instances_results.json")
    assert str(err.value) == (
        f"{path}: record 7, field 'image_id': 999 is not an image of the split"
    )
    assert not os.path.exists(path)  # validated before writing


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda r: r.update(category_id=5), "category_id"),
        (lambda r: r.update(image_id=[101]), "image_id"),
        (lambda r: r.pop("score"), "score"),
        (lambda r: r.update(score=float("nan")), "score"),
        (lambda r: r.update(bbox=[0, 0, -1, 3]), "bbox"),
        (lambda r: r["segmentation"].update(size=[64, 80]), "segmentation"),
    ],
)
def test_invalid_records_name_file_record_and_field(tmp_path, edit, field):
    images = {i: instances(dets) for i, dets in perfect_dets().items()}
    records = table_to_records(streamed_table(tmp_path, images))
    validate_lvis_results(records, split_json(), source="sub.json")  # valid before the edit
    edit(records[2])
    with pytest.raises(LVISResultsError, match=rf"^sub\.json: record 2, field '{field}': "):
        validate_lvis_results(records, split_json(), source="sub.json")


def test_more_than_max_dets_per_image_is_rejected():
    records = [
        {"image_id": 101, "category_id": 3, "score": 0.5, "bbox": [0, 0, 1, 1]} for _ in range(3)
    ]
    with pytest.raises(LVISResultsError, match="record 2, field 'image_id'.*max_dets=2"):
        validate_lvis_results(records, split_json(), 2, required=("bbox",), source="f.json")


def test_empty_predictions_do_not_crash(tmp_path):
    name, _ = register(tmp_path)
    results = run(name, {i: [] for i in GT}, tmp_path)
    # every frequency group and area range has ground truth, so every AP is 0
    assert results == {t: {m: 0.0 for m in metric_names(300)} for t in ("bbox", "segm")}
    assert read(tmp_path / "lvis_instances_results.json") == []
    assert run(name, {}, None) == results  # no image processed at all


def test_frequency_from_the_split_only_without_a_training_split(tmp_path):
    dataset = split_json()
    for cat in dataset["categories"]:
        del cat["frequency"]
    name, _ = register(tmp_path, dataset=dataset)
    assert run(name, perfect_dets(), tmp_path)["segm"]["APr"] == pytest.approx(100.0)
    assert "NOT a training split" in read(tmp_path / "lvis_metrics.json")["frequency_source"]
    with pytest.raises(ValueError, match="no 'frequency'.*DATASETS.TRAIN"):
        resolve_frequencies(dataset, {})
