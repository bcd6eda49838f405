"""APr/APc/APf use the TRAINING set's frequency groups: the json's fields, else the training
split's (its fields or a recount), and a recount of the evaluated split only when no training
split is known, which the log and the metrics file say."""

import json
import logging

import pytest
from detectron2.data import MetadataCatalog
from test_evaluation import CAT_IDS, perfect_dets, read, register, run, split_json

from lvis_longtail.data import register_lvis_format
from lvis_longtail.data.class_stats import training_frequency
from lvis_longtail.evaluation.lvis_evaluation import resolve_frequencies


def split_without_frequency():
    dataset = split_json()
    for cat in dataset["categories"]:
        del cat["frequency"]
    return dataset


def train_json(tmp_path, images_of_first=11):
    """A training split: category 3 on ``images_of_first`` images, the others on one."""
    n = images_of_first
    images = [{"id": i + 1, "height": 32, "width": 32, "file_name": f"{i}.png"} for i in range(n)]
    anns = [(i + 1, CAT_IDS[0]) for i in range(n)] + [(1, c) for c in CAT_IDS[1:]]
    data = {
        "images": images,
        "categories": [{"id": c, "name": f"cat{c}"} for c in CAT_IDS],
        "annotations": [
            {
                "id": k + 1,
                "image_id": i,
                "category_id": c,
                "bbox": [1, 1, 4, 4],
                "area": 16,
                "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]],
            }
            for k, (i, c) in enumerate(anns)
        ],  # fmt: skip
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_groups_come_from_a_registered_training_json(tmp_path):
    register_lvis_format("lt_freq_train", train_json(tmp_path), str(tmp_path))
    groups, source = training_frequency(["lt_freq_train"])
    assert groups == ("c", "r", "r", "r")  # 11 images: common; 1 image: rare
    assert "lt_freq_train (recounted from its annotations)" in source
    name, _ = register(tmp_path, dataset=split_without_frequency())  # split metadata: r,c,f,f
    out = tmp_path / "out"
    results = run(name, perfect_dets(), out, train_datasets=["lt_freq_train"])
    # groups c, r, r, r: no frequent class, so APf is undefined; the split's own would give 100
    assert results["bbox"]["APf"] == -1.0
    assert results["bbox"]["APc"] == pytest.approx(100.0)
    assert results["bbox"]["APr"] == pytest.approx(100.0)
    saved = read(out / "lvis_metrics.json")
    assert saved["frequency_source"] == (
        "the training split lt_freq_train (recounted from its annotations) (4 categories)"
    )
    rows = (out / "lvis_per_class.csv").read_text().splitlines()[1:]
    assert [r.split(",")[2] for r in rows] == ["c", "r", "r", "r"]


def test_training_split_metadata_beats_the_evaluated_splits_recount(tmp_path):
    MetadataCatalog.get("lt_freq_meta").set(
        thing_classes=[f"cat{c}" for c in CAT_IDS],
        class_image_count=[500] * 4,
        class_instance_count=[500] * 4,
        class_frequency=["f"] * 4,
        num_annotated_images=500,
    )
    name, _ = register(tmp_path, dataset=split_without_frequency())
    results = run(name, perfect_dets(), tmp_path, train_datasets=["lt_freq_meta"])
    assert results["segm"]["APr"] == results["segm"]["APc"] == -1.0
    assert results["segm"]["APf"] == pytest.approx(100.0)


def test_no_training_split_is_said_in_the_log_and_the_metrics_file(tmp_path, caplog):
    name, _ = register(tmp_path, dataset=split_without_frequency())
    with caplog.at_level(logging.WARNING):
        results = run(name, perfect_dets(), tmp_path, train_datasets=["lt_freq_absent"])
    assert results["bbox"]["APr"] == pytest.approx(100.0)  # the split's own recount (r,c,f,f)
    assert "No training split known" in caplog.text
    assert "NOT a training split" in read(tmp_path / "lvis_metrics.json")["frequency_source"]


def test_the_jsons_frequency_wins_and_disagreement_is_logged(caplog):
    dataset = split_json()  # r, c, f, f
    ids = dict(enumerate(CAT_IDS))
    with caplog.at_level(logging.WARNING):
        out, source = resolve_frequencies(dataset, ids, ["f"] * 4, "train X")
    assert [c["frequency"] for c in out["categories"]] == ["r", "c", "f", "f"]
    assert "disagree with the json's 'frequency' for 2 categories" in caplog.text
    assert source == "the json's 'frequency' fields (4 categories)"
    assert "frequency" in dataset["categories"][0]  # the input is not modified
    del dataset["categories"][1]["frequency"]
    out, source = resolve_frequencies(dataset, ids, ["f"] * 4, "train X")
    assert out["categories"][1]["frequency"] == "f" and "frequency" not in dataset["categories"][1]
    assert source == "the json's 'frequency' fields (3 categories); train X (1 categories)"


def test_standalone_evaluation_without_groups_is_a_clear_error():
    from lvis_longtail.evaluation import evaluate_lvis_results

    with pytest.raises(ValueError, match=r"categories \[3, 7, 9, 12\] have no LVIS 'frequency'"):
        evaluate_lvis_results(split_without_frequency(), [], "bbox")
