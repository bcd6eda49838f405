"""The categories of an LVIS-format json without parsing its images and annotations, and
what reads them: the class count check, the frequency groups and the per-class training image
counts of an evaluation, none of which parses the training json any more."""

import json
import logging

import pytest
from conftest import TINY_BASE
from detectron2.data import MetadataCatalog

import lvis_longtail.data.categories as categories_module
import lvis_longtail.data.lvis_format as lvis_format
from lvis_longtail.data import register_lvis_format
from lvis_longtail.data.categories import read_categories
from lvis_longtail.data.class_stats import training_frequency
from lvis_longtail.data.lvis_json import LVISFormatError, load_validated
from lvis_longtail.engine import setup_cfg
from lvis_longtail.engine.trainer import check_num_classes, train_image_counts

CATS = [
    {"id": 7, "name": 'a "quoted" [name] {x}', "frequency": "f", "image_count": 300,
     "instance_count": 900},
    {"id": 2, "name": "b", "frequency": "r", "image_count": 3, "instance_count": 3},
    {"id": 5, "name": "c\u00e9", "frequency": "c", "image_count": 40, "instance_count": 41},
]  # fmt: skip


def lvis_dict(num_images=3):
    """A valid LVIS-format dict whose strings hold brackets, braces and a decoy key."""
    images = [{"id": i + 1, "height": 8, "width": 8, "file_name": f"{i}.png",
               "note": '"categories": [ {'} for i in range(num_images)]  # fmt: skip
    anns = [
        {"id": i + 1, "image_id": i + 1, "category_id": 2, "bbox": [1, 1, 2, 2],
         "segmentation": [[1, 1, 3, 1, 3, 3]], "attributes": {"categories": [1, 2]}}
        for i in range(num_images)
    ]  # fmt: skip
    return {"images": images, "annotations": anns}


def write(path, data, first=None, last=None):
    """``data``'s keys in order, with ``first`` / ``last`` (key, value) around them."""
    items = ([first] if first else []) + list(data.items()) + ([last] if last else [])
    path.write_text(json.dumps(dict(items), ensure_ascii=False, indent=1), encoding="utf-8")
    return str(path)


def tiny(train: str, num_classes: int):
    opts = ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", "()"]
    return setup_cfg(str(TINY_BASE), opts + ["MODEL.ROI_HEADS.NUM_CLASSES", str(num_classes)])


def no_full_parse(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the whole json was parsed")

    monkeypatch.setattr(categories_module, "read_lvis_json", fail)
    monkeypatch.setattr(lvis_format, "load_validated", fail)


@pytest.mark.parametrize("where", ["last", "first"])
def test_categories_at_either_end_are_read_alone(tmp_path, monkeypatch, where):
    path = tmp_path / "a.json"
    path = write(path, lvis_dict(), **{where: ("categories", CATS)})
    expected = load_validated(path).categories
    no_full_parse(monkeypatch)
    cats = read_categories(path)
    assert cats == expected and [c["id"] for c in cats] == [2, 5, 7]


def test_categories_far_from_both_ends_fall_back_to_the_full_parse(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(categories_module, "WINDOW", 200)  # the key is in neither window
    data = lvis_dict(num_images=20)
    path = write(tmp_path / "a.json", {"images": data["images"], "categories": CATS,
                                       "annotations": data["annotations"]})  # fmt: skip
    with caplog.at_level(logging.INFO, logger="lvis_longtail.data.categories"):
        cats = read_categories(path)
    assert [c["name"] for c in cats] == ["b", "c\u00e9", CATS[0]["name"]]
    assert "categories read by parsing the whole json" in caplog.text


def test_a_nested_key_is_not_taken_for_the_top_level_one(tmp_path, monkeypatch):
    """The last '"categories": [' of the file is an annotation's field; the real list is
    first. Both windows cover the file: the bracket count rejects the nested one."""
    data = lvis_dict()
    data["annotations"][-1]["categories"] = [{"id": 1, "name": "decoy"}]
    path = write(tmp_path / "a.json", data, first=("categories", CATS))
    assert [c["id"] for c in read_categories(path)] == [2, 5, 7]


def test_malformed_categories_name_file_record_and_field(tmp_path):
    bad = [dict(CATS[0]), dict(CATS[1], frequency="x")]
    path = write(tmp_path / "bad.json", lvis_dict(), last=("categories", bad))
    with pytest.raises(
        LVISFormatError, match=r"bad.json: categories\[1\] \(id=2\): field 'frequency'"
    ):
        read_categories(path)
    path = write(tmp_path / "none.json", lvis_dict(), last=("categories", []))
    with pytest.raises(LVISFormatError, match="none.json: top-level field 'categories'"):
        read_categories(path)
    with pytest.raises(FileNotFoundError, match="LVIS-format json not found"):
        read_categories(str(tmp_path / "absent.json"))


def test_a_changed_file_is_read_again(tmp_path):
    path = write(tmp_path / "a.json", lvis_dict(), last=("categories", CATS))
    assert len(read_categories(path)) == 3
    write(tmp_path / "a.json", lvis_dict(), last=("categories", CATS[:2] + [dict(CATS[2], id=9)]))
    assert [c["id"] for c in read_categories(path)] == [2, 7, 9]


def test_class_count_groups_and_counts_without_parsing_the_training_json(tmp_path, monkeypatch):
    train = write(tmp_path / "train.json", lvis_dict(), last=("categories", CATS))
    register_lvis_format("lt_cats_train", train, str(tmp_path))
    cfg = tiny("lt_cats_train", 3)
    no_full_parse(monkeypatch)
    check_num_classes(cfg)
    assert train_image_counts(cfg) == {2: 3, 5: 40, 7: 300}
    groups, source = training_frequency(["lt_cats_train"])
    assert groups == ("r", "c", "f") and "its json's 'frequency' fields" in source
    assert "class_image_count" not in MetadataCatalog.get("lt_cats_train").as_dict()
    bad = tiny("lt_cats_train", 1203)
    with pytest.raises(ValueError, match="NUM_CLASSES is 1203 but dataset 'lt_cats_train' has 3"):
        check_num_classes(bad)


def test_an_absent_training_json_is_skipped_and_said(tmp_path):
    register_lvis_format("lt_cats_absent", str(tmp_path / "absent.json"), str(tmp_path))
    cfg = tiny("lt_cats_absent", 3)
    check_num_classes(cfg)  # nothing to check against: no error
    assert train_image_counts(cfg) is None
    groups, source = training_frequency(["lt_cats_absent"])
    assert groups is None and "not available (FileNotFoundError)" in source
