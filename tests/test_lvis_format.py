"""LVIS-format loading, metadata derivation, registration from the config, and bad input."""

import copy
import json
import logging

import cv2
import numpy as np
import pytest
from conftest import TINY_BASE
from detectron2.data import DatasetCatalog, MetadataCatalog

from lvis_longtail.config import ConfigError
from lvis_longtail.data import (
    LVISFormatError,
    load_lvis_format_json,
    lvis_format,
    lvis_json,
    register_lvis_format,
    set_image_check,
)
from lvis_longtail.data.class_stats import frequency_group, get_class_stats
from lvis_longtail.engine import setup_cfg


def square(x, y, s):
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def tiny_json():
    """3 images (two with file_name, one with coco_url only), 3 categories, 4 annotations."""
    images = [
        {"id": 1, "height": 32, "width": 32, "file_name": "a/1.png", "neg_category_ids": [3]},
        {"id": 2, "height": 32, "width": 32, "file_name": "a/2.png"},
        {"id": 5, "height": 32, "width": 32, "coco_url": "http://x.invalid/b/5.png"},
    ]
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "gnu"}]
    anns = [
        {
            "id": 10,
            "image_id": 1,
            "category_id": 1,
            "bbox": [2, 2, 8, 8],
            "segmentation": [square(2, 2, 8)],
        },
        {
            "id": 11,
            "image_id": 2,
            "category_id": 1,
            "bbox": [4, 4, 6, 6],
            "segmentation": [square(4, 4, 6)],
        },
        {
            "id": 12,
            "image_id": 2,
            "category_id": 2,
            "bbox": [0, 0, 5, 5],
            "segmentation": [square(0, 0, 5)],
        },
        {
            "id": 13,
            "image_id": 5,
            "category_id": 1,
            "bbox": [1, 1, 9, 9],
            "segmentation": [square(1, 1, 9)],
        },
    ]
    return {"images": images, "categories": cats, "annotations": anns}


def write(tmp_path, data, name="ann.json", images=True):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    if images:
        for rel in ("a/1.png", "a/2.png", "b/5.png"):
            (tmp_path / rel).parent.mkdir(exist_ok=True)
            cv2.imwrite(str(tmp_path / rel), np.zeros((32, 32, 3), np.uint8))
    return str(path)


def test_loads_records_with_file_name_and_coco_url(tmp_path):
    dicts = load_lvis_format_json(write(tmp_path, tiny_json()), str(tmp_path))
    by_id = {d["image_id"]: d for d in dicts}
    assert by_id[1]["file_name"] == str(tmp_path / "a/1.png")
    assert by_id[5]["file_name"] == str(tmp_path / "b/5.png")  # <root>/<split folder>/<file>
    assert [a["category_id"] for a in by_id[2]["annotations"]] == [0, 1]
    assert by_id[1]["neg_category_ids"] == [3]
    assert by_id[1]["annotations"][0]["bbox"] == [2, 2, 8, 8]


def test_metadata_derived_from_json(tmp_path):
    register_lvis_format("lt_t_meta", write(tmp_path, tiny_json()), str(tmp_path))
    meta = MetadataCatalog.get("lt_t_meta")
    assert meta.thing_classes == ["cat", "dog", "gnu"]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
    assert meta.class_image_count == [3, 1, 0]
    assert meta.class_instance_count == [3, 1, 0]
    assert meta.class_frequency == ["r", "r", "r"]
    assert meta.num_annotated_images == 3
    stats = get_class_stats("lt_t_meta")
    assert stats.image_frequency.tolist() == [1.0, 1 / 3, 0.0]


def test_metadata_uses_category_fields_when_present(tmp_path):
    data = tiny_json()
    for c, n in zip(data["categories"], (500, 50, 5)):
        c.update(image_count=n, instance_count=2 * n, frequency=frequency_group(n))
    register_lvis_format("lt_t_fields", write(tmp_path, data), str(tmp_path))
    meta = MetadataCatalog.get("lt_t_fields")
    assert meta.class_image_count == [500, 50, 5]
    assert meta.class_frequency == ["f", "c", "r"]


@pytest.mark.parametrize("count,group", [(1, "r"), (10, "r"), (11, "c"), (100, "c"), (101, "f")])
def test_frequency_thresholds(count, group):
    assert frequency_group(count) == group


def broken(mutate):
    data = tiny_json()
    mutate(data)
    return data


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda d: d["annotations"][1].pop("bbox"),
            r"annotations\[1\] \(id=11\): field 'bbox' is missing",
        ),
        (
            lambda d: d["annotations"][2].update(category_id=9),
            r"annotations\[2\] \(id=12\): field 'category_id' 9 is not a category id",
        ),
        (
            lambda d: d["annotations"][0].update(image_id=77),
            r"annotations\[0\] \(id=10\): field 'image_id' 77 is not an image id",
        ),
        (
            lambda d: d["images"][1].pop("height"),
            r"images\[1\] \(id=2\): field 'height' is missing",
        ),
        (
            lambda d: d["images"][2].pop("coco_url"),
            r"images\[2\] \(id=5\): field 'file_name' is missing",
        ),
        (
            lambda d: d["categories"][1].pop("name"),
            r"categories\[1\] \(id=2\): field 'name' is missing",
        ),
        (
            lambda d: d["annotations"][3].update(id=10),
            r"annotations\[3\] \(id=10\): field 'id' is duplicated",
        ),
        (lambda d: d["images"][1].update(id=1), r"images\[1\] \(id=1\): field 'id' is duplicated"),
        (lambda d: d.pop("images"), r"top-level field 'images' missing"),
    ],
)
def test_malformed_records_name_file_record_and_field(tmp_path, mutate, message):
    path = write(tmp_path, broken(mutate))
    with pytest.raises(LVISFormatError, match=message) as err:
        load_lvis_format_json(path, str(tmp_path))
    assert path in str(err.value)


def test_invalid_polygons_and_zero_area_boxes_are_skipped_with_a_count(tmp_path, caplog):
    def mutate(d):
        d["annotations"][0]["segmentation"] = [[1, 1, 5, 5]]  # 2 points: no valid polygon
        d["annotations"][1]["segmentation"].append([1, 2, 3])  # one bad part dropped
        d["annotations"][2]["bbox"] = [0, 0, 0, 5]  # zero width

    with caplog.at_level(logging.WARNING):
        dicts = load_lvis_format_json(write(tmp_path, broken(mutate)), str(tmp_path))
    by_id = {d["image_id"]: d for d in dicts}
    assert by_id[1]["annotations"] == []
    assert (
        len(by_id[2]["annotations"]) == 1 and len(by_id[2]["annotations"][0]["segmentation"]) == 1
    )
    text = caplog.text
    assert "'annotation without a valid polygon': 1" in text and "'zero-area box': 1" in text
    assert "'polygon with < 3 points or odd length dropped': 2" in text


def test_missing_image_file_is_reported(tmp_path):
    path = write(tmp_path, tiny_json())
    (tmp_path / "b/5.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 image files are missing.*image id=5"):
        load_lvis_format_json(path, str(tmp_path))


def test_not_json_and_missing_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(LVISFormatError, match="bad.json: the LVIS-format json is not valid JSON"):
        load_lvis_format_json(str(bad), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="lvis_longtail.data.synthetic"):
        load_lvis_format_json(str(tmp_path / "absent.json"), str(tmp_path))


def test_test_split_without_annotations(tmp_path):
    data = copy.deepcopy(tiny_json())
    data.pop("annotations")
    register_lvis_format("lt_t_test", write(tmp_path, data), str(tmp_path))
    dicts = DatasetCatalog.get("lt_t_test")
    assert len(dicts) == 3 and all(d["annotations"] == [] for d in dicts)
    assert MetadataCatalog.get("lt_t_test").num_annotated_images == 0


def test_register_from_config_and_unknown_names(tmp_path):
    path = write(tmp_path, tiny_json())
    opts = ["DATASETS.LVIS_FORMAT", f"[['lt_t_cfg', '{path}', '{tmp_path}']]"]
    setup_cfg(str(TINY_BASE), opts)
    assert len(DatasetCatalog.get("lt_t_cfg")) == 3
    assert MetadataCatalog.get("lt_t_cfg").evaluator_type == "lvis"
    with pytest.raises(ValueError, match=r"must be \[name, json_file, image_root\]"):
        setup_cfg(str(TINY_BASE), ["DATASETS.LVIS_FORMAT", "[['only_a_name']]"])
    with pytest.raises(ConfigError, match="options: Non-existent key: MODEL.ROI_BOX_HEAD.NO_SUCH"):
        setup_cfg(str(TINY_BASE), ["MODEL.ROI_BOX_HEAD.NO_SUCH", "1"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f'_BASE_: "{TINY_BASE}"\nMODEL:\n  NO_SUCH: 1\n')
    with pytest.raises(ConfigError, match="bad.yaml: Non-existent config key: MODEL.NO_SUCH"):
        setup_cfg(str(bad_yaml))
    with pytest.raises(KeyError, match="Dataset 'no_such_dataset' is not registered"):
        DatasetCatalog.get("no_such_dataset")


@pytest.fixture
def image_check():
    """Set ``DATASETS.IMAGE_CHECK``'s mode for one test (restored to the default after)."""
    yield set_image_check
    set_image_check("all")


def broken_images(tmp_path):
    """The tiny json with image 5's file missing and image 2's header 40x48, not 32x32."""
    path = write(tmp_path, tiny_json())
    (tmp_path / "b/5.png").unlink()
    cv2.imwrite(str(tmp_path / "a/2.png"), np.zeros((40, 48, 3), np.uint8))
    return path


def test_only_the_first_process_of_a_machine_checks_image_files(tmp_path, monkeypatch):
    """The other processes of a machine neither look for nor read any image file."""
    path = broken_images(tmp_path)
    monkeypatch.setattr(lvis_format.comm, "get_local_rank", lambda: 1)
    monkeypatch.setattr(lvis_format.os.path, "isfile", lambda p: p == path)
    monkeypatch.setattr(lvis_format, "_header_size", None)  # a call would raise a TypeError
    assert len(load_lvis_format_json(path, str(tmp_path))) == 3
    monkeypatch.undo()
    monkeypatch.setattr(lvis_format.comm, "get_local_rank", lambda: 0)
    with pytest.raises(FileNotFoundError, match=r"1 of 3 image files are missing.*image id=5"):
        load_lvis_format_json(path, str(tmp_path))


def test_image_check_modes(tmp_path, monkeypatch, image_check):
    path = broken_images(tmp_path)
    read = []
    header_size = lvis_format._header_size
    monkeypatch.setattr(lvis_format, "_header_size", lambda p: read.append(p) or header_size(p))
    image_check("none")
    assert len(load_lvis_format_json(path, str(tmp_path))) == 3 and read == []
    image_check("sample")  # every file must exist; SAMPLED_HEADERS headers are read
    with pytest.raises(FileNotFoundError, match="1 of 3 image files are missing"):
        load_lvis_format_json(path, str(tmp_path))
    cv2.imwrite(str(tmp_path / "b/5.png"), np.zeros((32, 32, 3), np.uint8))
    monkeypatch.setattr(lvis_format, "SAMPLED_HEADERS", 2)  # the first and the last record
    assert len(load_lvis_format_json(path, str(tmp_path))) == 3
    assert read == [str(tmp_path / "a/1.png"), str(tmp_path / "b/5.png")]
    monkeypatch.setattr(lvis_format, "SAMPLED_HEADERS", 3)
    with pytest.raises(LVISFormatError, match=r"image id=2: fields 'height'/'width' 32x32"):
        load_lvis_format_json(path, str(tmp_path))
    with pytest.raises(ValueError, match=r"DATASETS.IMAGE_CHECK must be one of"):
        image_check("headers")


def test_image_check_from_the_config(image_check):
    setup_cfg(str(TINY_BASE), ["DATASETS.IMAGE_CHECK", "sample"])
    assert lvis_format._IMAGE_CHECK == ["sample"]
    with pytest.raises(ValueError, match="DATASETS.IMAGE_CHECK must be one of"):
        setup_cfg(str(TINY_BASE), ["DATASETS.IMAGE_CHECK", "some"])


def test_metadata_comes_from_the_read_that_built_the_dicts(tmp_path, monkeypatch):
    """Dicts first, metadata later (e.g. the evaluator's training counts): one parse."""
    parsed, validate = [], lvis_json.validate_lvis_dict
    monkeypatch.setattr(
        lvis_json, "validate_lvis_dict", lambda d, s: parsed.append(s) or validate(d, s)
    )
    register_lvis_format("lt_t_once", write(tmp_path, tiny_json()), str(tmp_path))
    assert len(DatasetCatalog.get("lt_t_once")) == 3 and len(parsed) == 1
    assert MetadataCatalog.get("lt_t_once").class_image_count == [3, 1, 0]
    assert len(parsed) == 1 and not lvis_json._CACHE
