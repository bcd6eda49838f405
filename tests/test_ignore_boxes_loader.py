"""The loader attaches ignore boxes to records: an LVIS-format file named by
DATASETS.IGNORE_BOXES (idempotent registration, clear errors) and crowd annotations."""

import json
import re

import pytest
from detectron2.config import CfgNode as CN
from detectron2.data import DatasetCatalog

from lvis_longtail.data.ignore_boxes import attach_ignore_boxes, register_ignore_boxes_from_config
from lvis_longtail.data.lvis_format import load_lvis_format_json

SQUARE = [[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0]]


def _lvis(path, anns):
    data = {
        "images": [{"id": i, "height": 64, "width": 64, "file_name": f"{i}.jpg"} for i in (1, 2)],
        "categories": [{"id": 7, "name": "thing"}],
        "annotations": anns,
    }
    path.write_text(json.dumps(data))
    return str(path)


def _ann(aid, image_id, bbox, **extra):
    seg = [[c for x, y in SQUARE for c in (x + bbox[0], y + bbox[1])]]
    return {"id": aid, "image_id": image_id, "category_id": 7, "bbox": bbox, "segmentation": seg,
            **extra}  # fmt: skip


def test_crowd_annotations_become_ignore_boxes(tmp_path):
    path = _lvis(
        tmp_path / "a.json", [_ann(1, 1, [2, 3, 10, 10]), _ann(2, 1, [20, 30, 5, 4], iscrowd=1)]
    )
    records = {
        r["image_id"]: r for r in load_lvis_format_json(path, str(tmp_path), check_files=False)
    }
    assert len(records[1]["annotations"]) == 1 and records[1]["annotations"][0]["bbox"] == [
        2,
        3,
        10,
        10,
    ]
    assert records[1]["ignore_boxes"] == [[20, 30, 25, 34]]
    assert "ignore_boxes" not in records[2]


def test_ignore_box_file_attaches_by_image_id_once(tmp_path):
    pseudo = _lvis(tmp_path / "pseudo.json", [_ann(5, 2, [1, 2, 3, 4]), _ann(6, 2, [10, 10, 5, 5])])
    name = "lt_ignore_unit"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(
        name, lambda: [{"image_id": 1}, {"image_id": 2, "ignore_boxes": [[0, 0, 1, 1]]}]
    )
    cfg = CN({"DATASETS": CN({"IGNORE_BOXES": [[name, pseudo]]})})
    register_ignore_boxes_from_config(cfg)
    register_ignore_boxes_from_config(cfg)  # again (setup_cfg runs per process): no duplicates
    first, second = DatasetCatalog.get(name)
    assert "ignore_boxes" not in first
    assert second["ignore_boxes"] == [[0, 0, 1, 1], [1, 2, 4, 6], [10, 10, 15, 15]]
    DatasetCatalog.remove(name)


def test_ignore_box_errors_name_file_and_field(tmp_path):
    bad = _lvis(tmp_path / "bad.json", [{"id": 3, "image_id": 1, "bbox": [0, 0, -1, 2]}])
    with pytest.raises(ValueError, match=r"bad.json: annotations\[0\] \(id=3\): field 'bbox'"):
        attach_ignore_boxes([{"image_id": 1}], bad)
    for box in (["0", 0, 1, 1], [0, float("nan"), 1, 1], [0, 0, True, 1], [0, 0, 1]):
        bad = _lvis(tmp_path / "bad.json", [{"id": 4, "image_id": 1, "bbox": box}])
        with pytest.raises(ValueError, match=r"bad.json: annotations\[0\] \(id=4\): field 'bbox'"):
            attach_ignore_boxes([{"image_id": 1}], bad)
    bad = _lvis(tmp_path / "bad.json", [{"id": 5, "image_id": "1", "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match=r"bad.json: annotations\[0\] \(id=5\): field 'image_id'"):
        attach_ignore_boxes([{"image_id": 1}], bad)
    other = _lvis(tmp_path / "other.json", [_ann(1, 9, [0, 0, 1, 1])])
    with pytest.raises(ValueError, match=r"image_id\(s\) not in dataset 'x'.*\[9\]"):
        attach_ignore_boxes([{"image_id": 1}], other, "x")
    with pytest.raises(FileNotFoundError, match="DATASETS.IGNORE_BOXES"):
        attach_ignore_boxes([], str(tmp_path / "missing.json"))


@pytest.mark.parametrize(
    "text, what",
    [
        ('{"annotations": [{"id": 1, "image_id": 1, "bb', r"not valid JSON \(truncated\?\)"),
        ("", r"not valid JSON \(truncated\?\): Expecting value at line 1 column 1"),
        (b'{"annotations": [\xff]}', r"is not utf-8 text \(bytes 17-18"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),  # a UTF-16 byte-order mark, then junk
    ],
)
def test_unreadable_ignore_box_file_names_the_file_and_the_key(tmp_path, text, what):
    path = tmp_path / "pseudo.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError) as err:
        attach_ignore_boxes([{"image_id": 1}], str(path))
    assert str(err.value).startswith(f"{path}: the ignore-box file (DATASETS.IGNORE_BOXES) "), (
        err.value
    )
    assert re.search(what, str(err.value)), err.value


def test_ignore_box_far_outside_its_image_is_named(tmp_path):
    records = [{"image_id": 1, "height": 64, "width": 80}, {"image_id": 2}]
    ok = _lvis(tmp_path / "ok.json", [_ann(1, 1, [-30, 90, 110, 5]), _ann(2, 2, [1e6, 1e6, 3, 4])])
    attach_ignore_boxes(records, ok)  # up to half a side beyond the border; 2 has no size
    assert records[0]["ignore_boxes"] == [[-30, 90, 80, 95]]
    far = _lvis(tmp_path / "far.json", [_ann(1, 1, [2, 2, 3, 3]), _ann(8, 1, [1e6, 1e6, 3, 4])])
    with pytest.raises(ValueError) as err:
        attach_ignore_boxes(records, far)
    assert str(err.value) == (
        f"{far}: annotations[1] (id=8): field 'bbox' [1000000.0, 1000000.0, 3, 4] lies far "
        "outside its 80x64 image (image_id 1); wrong image size or coordinate scale?"
    )
