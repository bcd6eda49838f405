"""Streaming store, both protocols end to end, and results files that must be rejected."""

import copy
import gc
import json
import logging
import os
import uuid
import weakref

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from lvis import LVISEval, LVISResults
from lvis_random_split import model_outputs, random_results, random_split
from pycocotools import mask as mask_utils

import lvis_longtail  # noqa: F401  (applies the compat layer: lvis-api's np.float)
from lvis_longtail.evaluation import (
    ClassScoreThresholds,
    DetectionShard,
    LVISLongTailEvaluator,
    LVISResultsError,
    load_lvis_results,
    read_shards,
    validate_lvis_results,
)
from lvis_longtail.evaluation.lvis_evaluation import LoadedLVIS
from lvis_longtail.evaluation.shards import iter_chunks
from lvis_longtail.utils.rle import decode_rle_string

RESULTS = "lvis_instances_results.json"


def register(tmp_path, dataset):
    json_file = tmp_path / f"split_{uuid.uuid4().hex[:8]}.json"
    json_file.write_text(json.dumps(dataset))
    name = f"lt_store_{uuid.uuid4().hex}"
    DatasetCatalog.register(name, lambda: [])
    num = len(dataset["categories"])
    MetadataCatalog.get(name).set(
        json_file=str(json_file), thing_classes=[f"c{k + 1}" for k in range(num)]
    )
    return name


def lvis_api_on_file(dataset, path, task, max_dets=300):
    with open(path) as f:
        records = json.load(f)
    if task == "segm":
        for r in records:
            r.pop("bbox")
    gt = LoadedLVIS(copy.deepcopy(dataset))
    lvis_eval = LVISEval(gt, LVISResults(gt, records, max_dets=max_dets), task)
    lvis_eval.params.max_dets = max_dets
    lvis_eval.run()
    return {m: v * 100 if v >= 0 else -1.0 for m, v in lvis_eval.get_results().items()}


def assert_close(ours, expected, tol=1e-9):
    assert list(ours) == list(expected)
    assert all(abs(ours[m] - expected[m]) <= tol for m in expected), (ours, expected)


def run(evaluator, pairs):
    evaluator.reset()
    for inputs, outputs in pairs:
        evaluator.process([inputs], [outputs])
    return evaluator.evaluate()


def test_process_streams_to_disk_and_matches_lvis_api(tmp_path):
    dataset = random_split(7, num_images=9)
    name = register(tmp_path, dataset)
    pairs = model_outputs(dataset, random_results(dataset, 7))
    evaluator = LVISLongTailEvaluator(name, str(tmp_path), distributed=False, flush_every=2)
    evaluator.reset()
    shard, sizes = evaluator.store.path, []
    for inputs, outputs in pairs:
        evaluator.process([inputs], [outputs])
        assert evaluator.store.num_buffered_images <= 2  # the in-memory bound
        sizes.append(os.path.getsize(shard))
    assert sizes[1] > 0 and sizes == sorted(sizes) and sizes[-1] > sizes[2]  # written as we go
    assert evaluator.store.num_images == len(pairs)
    results = evaluator.evaluate()
    assert not os.path.exists(shard)  # shards removed, the results file stays
    for task in ("bbox", "segm"):
        assert_close(results[task], lvis_api_on_file(dataset, tmp_path / RESULTS, task))
    # the official evaluator through the same evaluator class: the same numbers
    slow = LVISLongTailEvaluator(name, None, distributed=False, evaluator="lvis_api")
    for task, metrics in run(slow, pairs).items():
        assert_close(metrics, results[task])


def test_standard_protocol_caps_each_image_by_score(tmp_path):
    dataset = random_split(8, num_images=6)
    name = register(tmp_path, dataset)
    records = random_results(dataset, 8, false_positives=20)
    evaluator = LVISLongTailEvaluator(name, str(tmp_path), distributed=False, max_dets_per_image=3)
    results = run(evaluator, model_outputs(dataset, records))
    exported = load_lvis_results(
        str(tmp_path / RESULTS), dataset, max_dets=3, required=("bbox", "segmentation")
    )
    for image in dataset["images"]:
        scores = sorted((r["score"] for r in records if r["image_id"] == image["id"]), reverse=True)
        kept = sorted((r["score"] for r in exported if r["image_id"] == image["id"]), reverse=True)
        assert kept == pytest.approx(scores[:3])
    for task in ("bbox", "segm"):
        assert_close(results[task], lvis_api_on_file(dataset, tmp_path / RESULTS, task, 3))
    saved = json.loads((tmp_path / "lvis_metrics.json").read_text())
    assert saved["protocol"] == {"name": "standard", "max_dets_per_image": 3, "dets_per_class": -1}


def test_fixed_protocol_keeps_top_k_per_class_without_per_image_cap(tmp_path):
    dataset = random_split(9, num_images=8)
    name = register(tmp_path, dataset)
    records = random_results(dataset, 9, false_positives=25)
    k = 3
    evaluator = LVISLongTailEvaluator(
        name,
        str(tmp_path),
        distributed=False,
        protocol="fixed",
        dets_per_class=k,
        max_dets_per_image=2,  # ignored by the fixed protocol
    )
    results = run(evaluator, model_outputs(dataset, records))
    exported = load_lvis_results(str(tmp_path / RESULTS), dataset, required=("segmentation",))
    per_image = np.bincount([r["image_id"] for r in exported])
    assert per_image.max() > 2  # no per-image cap
    for cat in {r["category_id"] for r in records}:
        mine = [r for r in records if r["category_id"] == cat]
        # ties: lower image id first, then the model's order (records are in that order
        # within an image after model_outputs groups them)
        ranked = sorted(mine, key=lambda r: (-np.float32(r["score"]), r["image_id"]))[:k]
        got = sorted((r["image_id"], r["score"]) for r in exported if r["category_id"] == cat)
        want = sorted((r["image_id"], float(np.float32(r["score"]))) for r in ranked)
        assert got == want
    for task in ("bbox", "segm"):
        assert_close(results[task], lvis_api_on_file(dataset, tmp_path / RESULTS, task, -1))
        assert "AR@-1" in results[task]


def test_fixed_thresholds_drop_detections_before_they_are_stored(tmp_path):
    dataset = random_split(1, num_images=3, num_categories=4)
    name = register(tmp_path, dataset)
    image_a, image_b = dataset["images"][1]["id"], dataset["images"][2]["id"]
    box = {"bbox": [10.0, 10.0, 20.0, 20.0], "category_id": 1}
    first = [dict(box, image_id=image_a, score=s) for s in (0.9, 0.8, 0.7, 0.6)]
    second = [dict(box, image_id=image_b, score=s) for s in (0.85, 0.8, 0.75)]
    evaluator = LVISLongTailEvaluator(
        name, None, distributed=False, protocol="fixed", dets_per_class=2, tasks=("bbox",)
    )
    evaluator.reset()
    for inputs, outputs in model_outputs(dataset, first + second)[1:]:
        evaluator.process([inputs], [outputs])
    # k = 2: after image a the threshold is 0.8; 0.85 and the tied 0.8 of image b are stored
    assert evaluator.store.num_rows == 4 + 2
    results = evaluator.evaluate()
    assert set(results) == {"bbox"}


@pytest.mark.parametrize("protocol", ["fixed", "standard"])
def test_detections_are_selected_before_masks_leave_the_device(tmp_path, monkeypatch, protocol):
    """The thresholds (fixed) and the per-image cap (standard) select on the model's device:
    the instances are never moved whole, and only the kept masks are encoded."""
    from detectron2.structures import Instances

    from lvis_longtail.evaluation import rows

    dataset = random_split(1, num_images=3, num_categories=4)
    name = register(tmp_path, dataset)
    image_a, image_b = dataset["images"][1]["id"], dataset["images"][2]["id"]
    box = {"bbox": [10.0, 10.0, 20.0, 20.0], "category_id": 1}
    rle = mask_utils.frPyObjects(np.array([[10.0, 10, 20, 20]]), 160, 200)[0]  # the box's mask
    box["segmentation"] = {"size": [160, 200], "counts": rle["counts"].decode()}
    first = [dict(box, image_id=image_a, score=s) for s in (0.9, 0.8, 0.7, 0.6)]
    second = [dict(box, image_id=image_b, score=s) for s in (0.85, 0.8, 0.75)]
    pairs = model_outputs(dataset, first + second)[1:]
    encoded, encode = [], rows.encode_masks
    monkeypatch.setattr(rows, "encode_masks", lambda m: encoded.append(len(m)) or encode(m))

    def moved_whole(self, *args, **kwargs):
        raise AssertionError("Instances.to: every mask moved before the selection")

    monkeypatch.setattr(Instances, "to", moved_whole)
    evaluator = LVISLongTailEvaluator(
        name, None, distributed=False, protocol=protocol, dets_per_class=2, max_dets_per_image=2
    )
    evaluator.reset()
    for inputs, outputs in pairs:
        evaluator.process([inputs], [outputs])
    # fixed, k = 2: all of image a, then 0.85 and the tied 0.8 of image b; standard: 2 each
    assert encoded == ([4, 2] if protocol == "fixed" else [2, 2])
    assert evaluator.store.num_rows == sum(encoded)


def test_the_split_read_for_the_metrics_is_freed_after_them(tmp_path, monkeypatch):
    """Evaluation reads its split when it computes the metrics and holds nothing after."""
    from lvis_longtail.data import lvis_json

    dataset = random_split(2, num_images=4)
    name = register(tmp_path, dataset)
    parsed, validate = [], lvis_json.validate_lvis_dict

    def spy(data, source):
        validated = validate(data, source)
        parsed.append(weakref.ref(validated))
        return validated

    monkeypatch.setattr(lvis_json, "validate_lvis_dict", spy)
    evaluator = LVISLongTailEvaluator(name, None, distributed=False)
    assert set(run(evaluator, model_outputs(dataset, random_results(dataset, 2)))) == {
        "bbox",
        "segm",
    }
    gc.collect()
    assert len(parsed) == 1 and parsed[0]() is None and not lvis_json._CACHE


def test_class_score_thresholds():
    t = ClassScoreThresholds(k=3)
    assert t.threshold(5) == -np.inf
    t.update(np.array([5, 5, 7, 5, 5, 5, 5]), np.array([0.1, 0.9, 0.5, 0.3, 0.3, 0.2, 0.8]))
    assert t.finalize() == {5: 0.3}  # the 3rd best of class 5; class 7 has fewer than 3
    assert t.keep(np.array([5, 5, 7]), np.array([0.29, 0.3, 0.01])).tolist() == [False, True, True]
    t.update(np.array([5, 5]), np.array([0.95, 0.99]))
    assert t.finalize()[5] == pytest.approx(0.9)  # only ever rises


def test_store_chunks_truncation_and_duplicates(tmp_path, caplog):
    path = str(tmp_path / "rank0.shard")
    record = {"image_id": 1, "category_id": 2, "score": 0.5, "bbox": [1.0, 2.0, 3.0, 4.0]}
    with DetectionShard(path, flush_every=2) as store:
        store.add(1, [record, dict(record, score=0.25)])
        store.add(2, [])
        store.add(1, [dict(record, score=0.75)])  # image 1 again: ignored
        assert store.num_buffered_images == 1
    assert [len(c.entries) for c in iter_chunks(path)] == [2, 1]
    with caplog.at_level(logging.WARNING):
        table, num_images = read_shards([path])
    assert num_images == 2 and table.score.tolist() == [0.5, 0.25]
    assert "1 images were processed more than once" in caplog.text
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-10])
    with pytest.raises(LVISResultsError, match=r"rank0.shard: chunk 1 at byte \d+ is truncated"):
        read_shards([path])
    with open(path, "wb") as f:
        f.write(b"garbage" + data)
    with pytest.raises(LVISResultsError, match="chunk 0 at byte 0 is corrupt"):
        read_shards([path])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: text[: len(text) - 50], r"not valid JSON \(truncated\?\)"),
        (lambda text: text.replace('"score"', '"score",', 1), r"not valid JSON"),
        (lambda text: '{"results": ' + text + "}", "is a dict, not a list of records"),
        (
            lambda text: text.replace('"score":', '"scor":', 1),
            "record 0, field 'score': is missing",
        ),
    ],
)
def test_corrupted_results_files_are_rejected(tmp_path, damage, message):
    dataset = random_split(4)
    text = json.dumps(random_results(dataset, 4))
    path = tmp_path / "results.json"
    path.write_text(damage(text))
    with pytest.raises(LVISResultsError, match=rf"^{path}: .*{message}"):
        load_lvis_results(str(path), dataset)


def test_load_rejects_records_that_do_not_fit_the_split(tmp_path):
    dataset = random_split(4)
    records = random_results(dataset, 4)
    records[3]["segmentation"]["size"] = [1, 1]
    records[5]["image_id"] = 12345
    path = tmp_path / "results.json"
    path.write_text(json.dumps(records))
    with pytest.raises(LVISResultsError, match="record 3, field 'segmentation': size"):
        load_lvis_results(str(path), dataset, required=())  # present fields are checked
    del records[3]["segmentation"]
    path.write_text(json.dumps(records))
    with pytest.raises(LVISResultsError, match="record 3, field 'segmentation': is missing"):
        load_lvis_results(str(path), dataset, required=("segmentation",))
    with pytest.raises(LVISResultsError, match="record 5, field 'image_id': 12345 is not an"):
        load_lvis_results(str(path), dataset)
    path.write_text(json.dumps(records[:3] * 2))
    with pytest.raises(LVISResultsError, match=r"record \d, field 'image_id'.*max_dets=1"):
        load_lvis_results(str(path), dataset, max_dets=1)


def test_shards_of_other_ranks_travel_by_gather_when_not_on_a_shared_disk(tmp_path, monkeypatch):
    """The main process of 2 ranks: rank 1's shard is not visible, so its bytes are gathered."""
    from detectron2.utils import comm

    dataset = random_split(6, num_images=6)
    name = register(tmp_path, dataset)
    pairs = model_outputs(dataset, random_results(dataset, 6))
    rank1 = LVISLongTailEvaluator(name, str(tmp_path / "elsewhere"), distributed=False)
    for inputs, outputs in pairs[3:]:
        rank1.process([inputs], [outputs])
    rank1.store.close()
    other = rank1.store.path
    payload = open(other, "rb").read()
    os.remove(other)  # not on the main process's disk

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "synchronize", lambda: None)
    # all_gather 1: every rank's shard path; all_gather 2: the main's view of which exist
    answers = iter([lambda own: [own, other], lambda own: [own, None]])
    monkeypatch.setattr(comm, "all_gather", lambda value: next(answers)(value))
    monkeypatch.setattr(comm, "gather", lambda value, dst=0: [value, payload])
    evaluator = LVISLongTailEvaluator(name, str(tmp_path / "out"), distributed=True)
    both = run(evaluator, pairs[:3])
    single = LVISLongTailEvaluator(name, str(tmp_path / "single"), distributed=False)
    assert both == run(single, pairs)
    assert sorted(os.listdir(tmp_path / "out")) == [  # received shard removed
        "lvis_instances_results.json",
        "lvis_metrics.json",
        "lvis_per_class.csv",
        "lvis_per_class.png",
    ]


def _random_instances(seed, n=7, size=(20, 24), num_classes=3, mask_scores=False):
    import torch
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    inst = Instances(size)
    xy = torch.rand(n, 2, generator=g) * 10
    wh = torch.rand(n, 2, generator=g) * 10 + 1
    inst.pred_boxes = Boxes(torch.cat([xy, xy + wh], 1))
    inst.scores = torch.rand(n, generator=g)
    inst.pred_classes = torch.randint(0, num_classes, (n,), generator=g)
    inst.pred_masks = torch.rand(n, *size, generator=g) > 0.7
    if mask_scores:
        inst.mask_scores = torch.rand(n, generator=g)
    return inst


def _coco_json(inst, image_id, ids, mask_scores=False):
    """detectron2's records of ``inst`` with dataset category ids (and ``segm_score``)."""
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json

    records = [
        dict(r, category_id=ids[r["category_id"]]) for r in instances_to_coco_json(inst, image_id)
    ]
    if mask_scores:
        for record, segm in zip(records, inst.mask_scores.tolist()):
            record["segm_score"] = segm
    return records


def test_rows_from_instances_are_detectron2s_coco_json_values(tmp_path):
    from lvis_longtail.evaluation import instances_to_rows
    from lvis_longtail.evaluation.results import table_to_records

    inst = _random_instances(0, mask_scores=True)
    ids = {0: 11, 1: 12, 2: 13}
    expected = _coco_json(inst, 5, ids, mask_scores=True)
    rows, blob = instances_to_rows(inst, 5, ids)
    assert rows["bbox"].tolist() == [r["bbox"] for r in expected]
    assert rows["mask_area"].tolist() == inst.pred_masks.flatten(1).sum(1).tolist()
    assert len(blob) == rows["counts_len"].sum()
    assert instances_to_rows(inst[:0], 5, ids)[0].shape == (0,)
    with DetectionShard(str(tmp_path / "one.shard")) as shard:
        shard.add_instances(5, inst, ids)
    table, _ = read_shards([str(tmp_path / "one.shard")])
    assert table_to_records(table) == expected


def test_sharded_detections_stream_and_read_back_once(tmp_path):
    """The reusable stream: Instances of many images -> a shard -> one table, masks by offset."""
    from lvis_longtail.evaluation import ShardedDetections

    ids = {0: 11, 1: 12, 2: 13}
    stream = ShardedDetections(str(tmp_path / "shards"), "pseudo", flush_every=2)
    images = {30: _random_instances(1), 10: _random_instances(2, n=0), 20: _random_instances(3)}
    for image_id, inst in images.items():
        stream.shard.add_instances(image_id, inst, ids)
    paths = stream.gather(distributed=False)
    assert paths == [str(tmp_path / "shards" / "pseudo.rank0.shard")]
    table, num_images = read_shards(paths)
    assert num_images == 3
    expected = [r for i in (10, 20, 30) for r in _coco_json(images[i], i, ids)]
    assert len(expected) == 14
    assert table.image_id.tolist() == [r["image_id"] for r in expected]  # image order
    assert table.score.tolist() == [r["score"] for r in expected]
    assert table.masks.rles(np.arange(len(table))) == [r["segmentation"] for r in expected]
    stream.discard(paths)
    assert not (tmp_path / "shards").exists()


def test_class_score_thresholds_equal_a_brute_force_top_k():
    import torch

    rng = np.random.default_rng(0)
    t, k, seen_c, seen_s = ClassScoreThresholds(k=5), 5, [], []
    for _ in range(40):  # images
        classes = rng.integers(0, 6, 30)
        scores = np.round(rng.random(30), 2)  # ties
        keep = t.keep(torch.as_tensor(classes), torch.as_tensor(scores))
        for c, s, kept in zip(classes, scores, keep.tolist()):
            better = sorted((x for y, x in zip(seen_c, seen_s) if y == c), reverse=True)
            reachable = len(better) < k or s >= better[k - 1]
            assert kept or not reachable  # never drops a detection that can still make top k
        t.update(classes[keep.numpy()], scores[keep.numpy()])
        seen_c += classes[keep.numpy()].tolist()
        seen_s += scores[keep.numpy()].tolist()
    final = t.finalize()
    for c in range(6):
        best = sorted((x for y, x in zip(seen_c, seen_s) if y == c), reverse=True)
        assert final[c] == best[k - 1]


def test_results_file_is_checked_chunk_by_chunk_and_never_half_written(tmp_path, monkeypatch):
    """A bad row in a later write chunk names its record index; the file already at the path
    is left as it was (atomic write), and a clean table round-trips through the file."""
    from lvis_longtail.evaluation import results as results_mod
    from lvis_longtail.evaluation.results import SplitIndex, write_results_file
    from lvis_longtail.evaluation.table import DetectionTable

    monkeypatch.setattr(results_mod, "WRITE_CHUNK", 3)
    split = SplitIndex(
        {"images": [{"id": 1, "height": 9, "width": 9}], "categories": [{"id": 4}, {"id": 7}]}
    )
    n = 8
    table = DetectionTable(
        image_id=np.ones(n, np.int64),
        category_id=np.array([4, 7] * 4, np.int64),
        score=np.linspace(0.9, 0.2, n),
        bbox=np.tile([1.0, 2.0, 3.0, 4.0], (n, 1)),
    )
    path = tmp_path / RESULTS
    summary = write_results_file(table, str(path), split, with_masks=False)
    written = json.loads(path.read_text())
    assert [r["score"] for r in written] == table.score.tolist()
    assert [r["category_id"] for r in written] == table.category_id.tolist()
    assert summary["num_detections"] == n and summary["max_per_image"] == n
    before = path.read_text()
    table.category_id[7] = 5  # not a category of the split; row 7 is in the third chunk
    with pytest.raises(LVISResultsError, match=r"results.json: record 7, field 'category_id'"):
        write_results_file(table, str(path), split, with_masks=False)
    assert path.read_text() == before
    assert sorted(os.listdir(tmp_path)) == [RESULTS]  # no temporary left behind


def _results_file(tmp_path, edit):
    """A results file of ``random_split(4)`` (160x200 images) with ``edit`` applied to its
    records; the vectorized check falls back to the record-by-record one for the message."""
    dataset = random_split(4)
    records = random_results(dataset, 4)
    edit(records)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(records))
    return str(path), dataset, records


def _one_pixel_more(counts: str, h: int = 160, w: int = 200) -> str:
    """The compressed counts with the last run one pixel longer (h * w + 1 pixels)."""
    runs = decode_rle_string(counts)
    runs[-1] += 1
    return mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w)["counts"].decode()


@pytest.mark.parametrize(
    "counts",
    [
        lambda c: c + "PPPPPP",  # last value left unterminated (pycocotools reads past the end)
        lambda c: "!!!!~~~~",  # characters outside '0'..'o'
        lambda c: "0",  # one run of 0 pixels
        lambda c: "",
        lambda c: c[:3],  # truncated: covers a few pixels only
        lambda c: "\u00e9\u00e9",  # not ASCII
        lambda c: _one_pixel_more(c, 160, 200),  # last run one pixel too long
        lambda c: "0@" + c[2:],  # a negative run
    ],
)
def test_malformed_rle_counts_in_results_are_named(tmp_path, counts):
    def edit(records):
        records[3]["segmentation"]["counts"] = counts(records[3]["segmentation"]["counts"])

    path, dataset, _ = _results_file(tmp_path, edit)
    message = (
        f"{path}: record 3, field 'segmentation': compressed RLE 'counts' is malformed or does "
        "not cover the image's 160x200 pixels"
    )
    for required in (("bbox",), ("bbox", "segmentation")):
        with pytest.raises(LVISResultsError) as err:
            load_lvis_results(path, dataset, required=required, as_table=True)
        assert str(err.value) == message


def test_valid_rle_counts_pass_the_vectorized_check_with_the_records_own_masks(tmp_path):
    from lvis_longtail.evaluation.record_checks import SplitIndex, _checked_table

    path, dataset, records = _results_file(tmp_path, lambda records: None)
    table = _checked_table(records, SplitIndex(dataset), ("bbox",))
    assert table is not None and len(table) == len(records)  # the fast path accepted all
    assert table.masks.rles([5]) == [records[5]["segmentation"]]
    records[5]["segmentation"]["counts"] = _one_pixel_more(records[5]["segmentation"]["counts"])
    assert _checked_table(records, SplitIndex(dataset), ("bbox",)) is None  # 32001 pixels


@pytest.mark.parametrize("value", ["x", float("nan"), None, True])
def test_bad_segm_score_is_named(tmp_path, value):
    path, dataset, records = _results_file(tmp_path, lambda rs: rs[4].update(segm_score=value))
    message = f"record 4, field 'segm_score': {value!r} is not a finite number"
    with pytest.raises(LVISResultsError) as err:
        load_lvis_results(path, dataset)  # the vectorized check, then its fallback
    assert str(err.value) == f"{path}: {message}"
    with pytest.raises(LVISResultsError) as err:
        validate_lvis_results(records, dataset, source="sub.json")  # record by record
    assert str(err.value) == f"sub.json: {message}"


@pytest.mark.parametrize(
    "edit, field, what",
    [
        (lambda r: r.update(image_id=2**64), "image_id", f"must fit in 64 bits, got {2**64}"),
        (lambda r: r.update(category_id=2**63), "category_id", f"must fit in 64 bits, got {2**63}"),
        (
            lambda r: r["segmentation"].update(size=[2**64, 200]),
            "segmentation",
            f"size [{2**64}, 200] is not the image's [h, w] [160, 200]",
        ),
    ],
)
def test_ids_and_sizes_beyond_64_bits_are_named_not_an_overflow(tmp_path, edit, field, what):
    path, dataset, _ = _results_file(tmp_path, lambda records: edit(records[2]))
    with pytest.raises(LVISResultsError) as err:
        load_lvis_results(path, dataset)
    assert str(err.value) == f"{path}: record 2, field '{field}': {what}"


def test_results_with_masks_on_some_records_only_are_rejected(tmp_path):
    def edit(records):
        del records[6]["segmentation"], records[9]["segmentation"]

    path, dataset, _ = _results_file(tmp_path, edit)
    for required in ((), ("bbox",)):
        with pytest.raises(LVISResultsError) as err:
            load_lvis_results(path, dataset, required=required)
        assert str(err.value) == (
            f"{path}: record 6, field 'segmentation': is missing (other records have masks)"
        )
