"""Fuzz-style checks of the LVIS-format validation: dozens of malformed variants of one small
valid json, each rejected with file, record and field named (or skipped with a count), never a
bare Python error or a crash in a C extension; encodings; RLE ground truth for training."""

import codecs
import copy
import json
import logging
import math

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from pycocotools import mask as mask_utils

from lvis_longtail.data import LVISFormatError, load_lvis_format_json, set_mask_format
from lvis_longtail.data.lvis_json import load_validated, shared_reads
from lvis_longtail.utils.rle import decode_rle_string, first_bad_count_string

NAN, INF = float("nan"), float("inf")


def square(x, y, s):
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def valid_json():
    images = [
        {"id": 1, "height": 40, "width": 48, "file_name": "1.png", "neg_category_ids": [2]},
        {"id": 2, "height": 40, "width": 48, "file_name": "2.png"},
    ]
    cats = [
        {"id": 1, "name": "a", "frequency": "f", "image_count": 2, "instance_count": 2},
        {"id": 2, "name": "b", "frequency": "r", "image_count": 1, "instance_count": 1},
    ]
    anns = [
        {"id": 7, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "area": 64,
         "iscrowd": 0, "segmentation": [square(2, 2, 8)]},
        {"id": 8, "image_id": 2, "category_id": 1, "bbox": [4, 4, 6, 6], "area": 36,
         "segmentation": [square(4, 4, 6)]},
        {"id": 9, "image_id": 2, "category_id": 2, "bbox": [10, 10, 5, 5], "area": 25,
         "segmentation": [square(10, 10, 5)]},
    ]  # fmt: skip
    return {"images": images, "categories": cats, "annotations": anns}


def write(tmp_path, data, name="gt.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))  # NaN/Infinity written as JSON's common extension
    for i in (1, 2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.zeros((40, 48, 3), np.uint8))
    return str(path)


# (list, index, field, bad value): every field, wrong types, non-finite and out-of-domain values
BAD_VALUES = [
    ("images", 0, "id", "1"),
    ("images", 0, "id", 1.5),
    ("images", 0, "id", None),
    ("images", 1, "id", 1),  # duplicate
    ("images", 0, "height", 0),
    ("images", 0, "height", -40),
    ("images", 0, "height", "40"),
    ("images", 1, "width", 48.0),
    ("images", 1, "width", NAN),
    ("images", 0, "file_name", 12),
    ("images", 0, "neg_category_ids", 2),
    ("images", 0, "neg_category_ids", [99]),
    ("images", 0, "neg_category_ids", ["2"]),
    ("images", 1, "not_exhaustive_category_ids", [1.0]),
    ("categories", 0, "id", "1"),
    ("categories", 1, "id", 1),  # duplicate
    ("categories", 0, "name", 5),
    ("categories", 0, "frequency", "x"),
    ("categories", 1, "frequency", None),
    ("categories", 0, "image_count", -1),
    ("categories", 0, "image_count", 2.5),
    ("categories", 1, "instance_count", "1"),
    ("annotations", 0, "id", [7]),
    ("annotations", 2, "id", 8),  # duplicate
    ("annotations", 0, "image_id", "1"),
    ("annotations", 0, "image_id", 3),
    ("annotations", 1, "category_id", 0),
    ("annotations", 1, "category_id", True),
    ("annotations", 0, "bbox", [1, 2, 3]),
    ("annotations", 0, "bbox", "2 2 8 8"),
    ("annotations", 0, "bbox", [2, 2, NAN, 8]),
    ("annotations", 0, "bbox", [2, 2, 8, INF]),
    ("annotations", 0, "bbox", [2, "2", 8, 8]),
    ("annotations", 0, "bbox", [2, 2, -8, 8]),
    ("annotations", 0, "bbox", [400, 2, 8, 8]),  # far outside the 48x40 image
    ("annotations", 0, "bbox", None),
    ("annotations", 1, "area", "36"),
    ("annotations", 1, "area", -1),
    ("annotations", 1, "area", NAN),
    ("annotations", 0, "iscrowd", 2),
    ("annotations", 0, "iscrowd", "0"),
    ("annotations", 0, "segmentation", [[2, 2, NAN, 2, 10, 10]]),
    ("annotations", 0, "segmentation", [[2, 2, INF, 2, 10, 10]]),
    ("annotations", 0, "segmentation", [[2, 2, "10", 2, 10, 10]]),
    ("annotations", 0, "segmentation", [[2, 2, None, 2, 10, 10]]),
    ("annotations", 0, "segmentation", [2, 2, 10, 2, 10, 10]),  # flat, not a list of lists
    ("annotations", 0, "segmentation", [[[2, 2], [10, 2], [10, 10]]]),
    ("annotations", 0, "segmentation", [square(2000, 2, 8)]),
    ("annotations", 0, "segmentation", "polygon"),
    ("annotations", 0, "segmentation", {"size": [40, 48]}),
    ("annotations", 0, "segmentation", {"size": [48, 40], "counts": [1920]}),
    ("annotations", 0, "segmentation", {"size": [40, 48], "counts": [1000, 10]}),
    ("annotations", 0, "segmentation", {"size": [40, 48], "counts": [1930, -10]}),
    ("annotations", 0, "segmentation", {"size": [40, 48], "counts": "\x7f\x7f"}),
    ("annotations", 0, "segmentation", {"size": [40, 48], "counts": "PP"}),  # wrong total
    ("annotations", 0, "segmentation", {"size": [40, 48], "counts": 5}),
    ("annotations", 0, "segmentation", [[2, 2, True, 2, 10, 10]]),  # bool, not a number
    ("images", 0, "id", 2**64),  # beyond 64 bits: the evaluators' numpy ids overflow
    ("categories", 0, "id", 2**63),
    ("annotations", 0, "id", -(2**63) - 1),
    ("images", 1, "height", 2**64),
]


def _case_id(case):
    kind, index, field, value = case
    return f"{kind}{index}.{field}={value!r:.20}"


@pytest.mark.parametrize("case", BAD_VALUES, ids=[_case_id(c) for c in BAD_VALUES])
def test_malformed_field_names_file_record_and_field(tmp_path, case):
    kind, index, field, value = case
    data = valid_json()
    data[kind][index][field] = value
    path = write(tmp_path, data)
    with pytest.raises(LVISFormatError) as err:
        load_lvis_format_json(path, str(tmp_path))
    message = str(err.value)
    assert message.startswith(path + ": "), message
    assert f"{kind}[{index}]" in message and f"field '{field}'" in message, message


MISSING = [
    ("images", 0, "id"),
    ("images", 1, "height"),
    ("images", 0, "width"),
    ("categories", 0, "name"),
    ("annotations", 0, "id"),
    ("annotations", 1, "image_id"),
    ("annotations", 2, "category_id"),
    ("annotations", 0, "bbox"),
    ("annotations", 0, "segmentation"),
]


@pytest.mark.parametrize("kind,index,field", MISSING)
def test_missing_required_field(tmp_path, kind, index, field):
    data = valid_json()
    del data[kind][index][field]
    path = write(tmp_path, data)
    with pytest.raises(LVISFormatError, match=rf"{kind}\[{index}\].*field '{field}' is missing"):
        load_lvis_format_json(path, str(tmp_path))


@pytest.mark.parametrize(
    "top,message",
    [
        ([], "top level must be an object, not list"),
        ({"categories": []}, "'images' missing or not a list"),
        ({"images": [], "categories": [{"id": 1, "name": "a"}]}, "'images' is empty"),
        (
            {"images": [{"id": 1, "height": 2, "width": 2}], "categories": []},
            "'categories' is empty",
        ),
        (dict(valid_json(), annotations={}), "'annotations' is not a list"),
        (dict(valid_json(), images=[5]), r"images\[0\] is a int, not an object"),
    ],
)
def test_malformed_top_level(tmp_path, top, message):
    path = write(tmp_path, top)
    with pytest.raises(LVISFormatError, match=message):
        load_lvis_format_json(path, str(tmp_path))


def test_missing_optional_fields_are_filled(tmp_path):
    data = valid_json()
    for ann in data["annotations"]:
        ann.pop("area")
        ann.pop("iscrowd", None)
    validated = load_validated(write(tmp_path, data))
    # the mask's pixel count, as pycocotools measures the polygon
    expect = mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([square(2, 2, 8)], 40, 48)))
    assert validated.annotations[0]["area"] == float(expect) == 64.0
    assert all("iscrowd" not in a for a in load_lvis_format_json(
        write(tmp_path, data), str(tmp_path))[0]["annotations"])  # fmt: skip


def test_crowd_annotations_become_ignore_boxes(tmp_path):
    data = valid_json()
    data["annotations"][0]["iscrowd"] = 1
    x, y, w, h = data["annotations"][0]["bbox"]
    image_id = data["annotations"][0]["image_id"]
    plain = load_lvis_format_json(write(tmp_path, valid_json()), str(tmp_path))
    dicts = load_lvis_format_json(write(tmp_path, data), str(tmp_path))
    record = next(r for r in dicts if r["image_id"] == image_id)
    before = next(r for r in plain if r["image_id"] == image_id)
    assert record["ignore_boxes"] == [[x, y, x + w, y + h]]
    assert len(record["annotations"]) == len(before["annotations"]) - 1


def test_image_size_disagreeing_with_the_file(tmp_path):
    data = valid_json()
    data["images"][1].update(height=48, width=40)
    with pytest.raises(LVISFormatError, match=r"image id=2: fields 'height'/'width' 48x40 "
                       r"disagree with the file .*2.png \(40x48"):  # fmt: skip
        load_lvis_format_json(write(tmp_path, data), str(tmp_path))


def test_unreadable_image_file(tmp_path):
    path = write(tmp_path, valid_json())
    (tmp_path / "1.png").write_bytes(b"not an image")
    with pytest.raises(LVISFormatError, match=r"image id=1: field 'file_name' .*1.png is not"):
        load_lvis_format_json(path, str(tmp_path))


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-32"])
def test_encodings_and_byte_order_marks(tmp_path, encoding):
    data = valid_json()
    data["categories"][0]["name"] = "café ☕"
    path = write(tmp_path, data)
    with open(path, "w", encoding=encoding) as f:
        json.dump(data, f, ensure_ascii=False)
    if encoding == "utf-16":
        assert open(path, "rb").read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    assert load_validated(path).categories[0]["name"] == "café ☕"


def test_undecodable_bytes_and_truncated_json(tmp_path):
    path = write(tmp_path, valid_json())
    raw = open(path, "rb").read().replace(b'"a"', b'"caf\xe9"')  # latin-1, not UTF-8
    open(path, "wb").write(raw)
    with pytest.raises(LVISFormatError, match=r"gt.json: the LVIS-format json is not utf-8 text"):
        load_lvis_format_json(path, str(tmp_path))
    open(path, "wb").write(raw[: len(raw) // 2].replace(b"\xe9", b"e"))
    with pytest.raises(LVISFormatError, match=r"not valid JSON \(truncated\?\).*line 1"):
        load_lvis_format_json(path, str(tmp_path))


def test_skips_are_counted_in_the_log(tmp_path, caplog):
    data = valid_json()
    data["annotations"][0]["segmentation"] = [[1, 1, 5, 5]]  # too short: annotation skipped
    data["annotations"][1]["segmentation"].append([1, 2, 3, 4, 5])  # odd: polygon dropped
    data["annotations"][2]["bbox"] = [10, 10, 0, 5]  # zero width: not trained on
    with caplog.at_level(logging.WARNING):
        dicts = load_lvis_format_json(write(tmp_path, data), str(tmp_path))
    assert "'polygon with < 3 points or odd length dropped': 2" in caplog.text
    assert "'annotation without a valid polygon': 1" in caplog.text
    assert "'zero-area box': 1" in caplog.text
    assert [len(d["annotations"]) for d in dicts] == [0, 1]


@pytest.mark.parametrize(
    "kind, field, value, problem",
    [
        ("images", "id", 2**64, f"field 'id' must fit in 64 bits, got {2**64}"),
        ("annotations", "id", 2**63, f"field 'id' must fit in 64 bits, got {2**63}"),
        ("annotations", "segmentation", [square(2, 2, 8)[:-1] + [False]],
         "field 'segmentation' polygon 0 has a non-number coordinate False"),
    ],
)  # fmt: skip
def test_huge_ids_and_bool_coordinates_are_named(tmp_path, kind, field, value, problem):
    data = valid_json()
    rid = data[kind][0]["id"]
    data[kind][0][field] = value
    path = write(tmp_path, data)
    with pytest.raises(LVISFormatError) as err:
        load_validated(path)
    rid = value if field == "id" else rid
    assert str(err.value) == f"{path}: {kind}[0] (id={rid}): {problem}"


def test_all_annotations_without_a_polygon_is_an_error_naming_the_file(tmp_path):
    data = valid_json()
    for ann in data["annotations"]:
        ann["segmentation"] = []  # box-only, as pseudo labels of a model without masks
    path = write(tmp_path, data)
    with pytest.raises(LVISFormatError) as err:
        load_lvis_format_json(path, str(tmp_path))
    assert str(err.value).startswith(
        f"{path}: all 3 annotations lack a valid polygon (e.g. 'segmentation': []"
    )
    assert "polygon or an RLE mask" in str(err.value) and "DATASETS.IGNORE_BOXES" in str(err.value)
    data["annotations"][1]["segmentation"] = [square(4, 4, 6)]  # one left: skips are counted
    assert len(load_validated(write(tmp_path, data)).annotations) == 1


def test_category_both_negative_and_annotated_is_warned_once(tmp_path, caplog):
    data = valid_json()
    data["images"][0]["neg_category_ids"] = [1, 2]  # image 1 has an annotation of category 1
    data["images"][1]["neg_category_ids"] = [2]  # image 2 has one of category 2
    with caplog.at_level(logging.WARNING, logger="lvis_longtail.data.lvis_checks"):
        load_validated(write(tmp_path, data))
    warnings = [r.getMessage() for r in caplog.records if "neg_category_ids" in r.getMessage()]
    assert warnings == [
        f"{tmp_path / 'gt.json'}: 2 (image, category) pairs are both annotated and listed in the "
        "image's 'neg_category_ids' (verified absent): image 1 category 1, image 2 category 2"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lvis_longtail.data.lvis_checks"):
        load_validated(write(tmp_path, valid_json()))  # image 1's negative 2 is not annotated
    assert "neg_category_ids" not in caplog.text


def test_empty_annotations_list_is_image_info(tmp_path, caplog):
    data = dict(valid_json(), annotations=[])
    with caplog.at_level(logging.WARNING):
        validated = load_validated(write(tmp_path, data))
    assert not validated.has_annotations and "'annotations' is empty" in caplog.text


def test_nan_polygon_never_reaches_pycocotools(tmp_path):
    """A NaN coordinate made pycocotools segfault or allocate until killed; the validation
    rejects it first, so the evaluation of the same file fails cleanly too."""
    from lvis_longtail.evaluation.lvis_evaluation import as_ground_truth

    data = valid_json()
    data["annotations"][2]["segmentation"] = [[10, 10, NAN, 10, 15, 15]]
    path = write(tmp_path, data)
    with pytest.raises(LVISFormatError, match=r"annotations\[2\] \(id=9\).*non-finite"):
        as_ground_truth(path)


# ----------------------------------------------------------------------------- RLE masks


def _rle_json(compressed: bool):
    data = valid_json()
    mask = np.zeros((40, 48), np.uint8, order="F")
    mask[5:20, 8:30] = 1
    mask[10:14, 12:16] = 0  # a hole
    rle = mask_utils.encode(np.asfortranarray(mask))
    if compressed:
        segm = {"size": [40, 48], "counts": rle["counts"].decode("ascii")}
    else:  # uncompressed: column-major run lengths
        flat = mask.flatten(order="F")
        change = np.flatnonzero(np.diff(flat)) + 1
        bounds = np.concatenate([[0], change, [flat.size]])
        runs = np.diff(bounds).tolist()
        segm = {"size": [40, 48], "counts": runs if flat[0] == 0 else [0] + runs}
    data["annotations"][0].update(segmentation=segm, bbox=[8, 5, 22, 15], area=float(mask.sum()))
    return data, mask


def test_rle_string_decoder_matches_pycocotools():
    rng = np.random.default_rng(0)
    mask = np.asfortranarray(rng.random((23, 31)) > 0.6)
    rle = mask_utils.encode(mask)
    runs = decode_rle_string(rle["counts"].decode("ascii"))
    assert sum(runs) == 23 * 31 and sum(runs[1::2]) == int(mask.sum())
    flat = mask.flatten(order="F").astype(np.int64)
    changes = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
    assert runs == np.diff(np.r_[0, changes]).tolist()  # column-major runs, background first
    assert decode_rle_string("") == []
    assert decode_rle_string("0`") is None  # continuation bit without a next character
    assert decode_rle_string("0/") is None  # a character below '0'
    assert decode_rle_string("0p") is None  # a character above 'o'
    assert decode_rle_string("0\u00e9") is None  # not ASCII
    assert decode_rle_string("0@") is None  # -16: a negative run
    assert decode_rle_string("o" * 12 + "0") is None  # a value of 65 bits


def test_many_rle_strings_checked_at_once_agree_with_the_one_string_decoder():
    # runs [2, 4] and [1, 2, 1, 2] (the fourth number is a difference to the second: 0)
    assert first_bad_count_string(["24", "1210"], [6, 6]) is None
    assert first_bad_count_string(["24", "1210", "23"], [6, 6, 6]) == 2  # 5 of 6 pixels
    assert first_bad_count_string(["24", "1210"], [6, 7]) == 1
    for bad in ("", "2`", "2/", "2p", "2\u00e9", "\ud800", "2@", "o" * 12 + "0"):
        assert first_bad_count_string(["24", bad, "24"], [6, 6, 6]) == 1, bad
    rng = np.random.default_rng(1)
    strings, pixels = [], []
    for _ in range(150):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = np.asfortranarray(rng.random((h, w)) < rng.random())
        text = mask_utils.encode(mask)["counts"].decode("ascii")
        strings.append(text)
        pixels.append(h * w)
        for _ in range(3):  # damaged copies: a character changed, cut, appended or removed
            cut = int(rng.integers(0, len(text) + 1))
            char = chr(int(rng.integers(40, 120)))
            strings.append(
                [text[:cut] + char + text[cut + 1 :], text[:cut], text + char,
                 text[:cut] + text[cut + 1 :]][int(rng.integers(4))]
            )  # fmt: skip
            pixels.append(h * w + int(rng.integers(-1, 2)) * int(rng.random() < 0.2))
    expected = [decode_rle_string(t) is None or sum(decode_rle_string(t)) != p
                for t, p in zip(strings, pixels)]  # fmt: skip
    assert 100 < sum(expected) < len(strings) - 100  # both kinds are well represented
    for k in range(len(strings)):
        assert (first_bad_count_string([strings[k]], [pixels[k]]) is not None) == expected[k]
    for start in range(0, len(strings), 37):  # the first bad one of a batch, in chunks or not
        batch = slice(start, start + 60)
        first = next((k for k, e in enumerate(expected[batch]) if e), None)
        for chunk in (1, 50, 1 << 22):
            assert first_bad_count_string(strings[batch], pixels[batch], chunk) == first


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_rle_ground_truth_trains_with_either_mask_format(tmp_path, compressed, mask_format):
    data, mask = _rle_json(compressed)
    path = write(tmp_path, data)
    set_mask_format(mask_format)
    try:
        dicts = load_lvis_format_json(path, str(tmp_path))
    finally:
        set_mask_format("polygon")
    segm = dicts[0]["annotations"][0]["segmentation"]
    # what detectron2's DatasetMapper does with one annotation, at a flip
    augs = T.AugmentationList([T.RandomFlip(prob=1.0)])
    aug_input = T.AugInput(np.zeros((40, 48, 3), np.uint8))
    transforms = augs(aug_input)
    ann = detection_utils.transform_instance_annotations(
        copy.deepcopy(dicts[0]["annotations"][0]), transforms, (40, 48)
    )
    inst = detection_utils.annotations_to_instances([ann], (40, 48), mask_format=mask_format)
    if mask_format == "bitmask":
        assert isinstance(segm, dict) and isinstance(segm["counts"], str)
        got = inst.gt_masks.tensor[0].numpy()
        assert np.array_equal(got, mask[:, ::-1].astype(bool))  # exact, hole included
    else:
        assert isinstance(segm, list) and all(isinstance(p, list) for p in segm)
        got = inst.gt_masks.polygons[0]
        raster = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(
            [p.tolist() for p in got], 40, 48)))  # fmt: skip
        filled = mask.copy()
        filled[10:14, 12:16] = 1  # polygons fill the hole
        inter = (raster & filled[:, ::-1]).sum()
        assert inter / (raster | filled[:, ::-1]).sum() > 0.85
    assert torch.equal(inst.gt_classes, torch.tensor([0]))


def test_uncompressed_rle_is_compressed_for_evaluation(tmp_path):
    data, mask = _rle_json(compressed=False)
    validated = load_validated(write(tmp_path, data))
    segm = validated.annotations[0]["segmentation"]
    assert isinstance(segm["counts"], str)
    assert np.array_equal(mask_utils.decode(segm), mask)
    assert math.isclose(validated.annotations[0]["area"], float(mask.sum()))


def test_evaluation_leaves_the_shared_validated_dataset_untouched(tmp_path):
    """Both evaluators read the shared validated dict that training dicts are made from."""
    from lvis_longtail.evaluation import evaluate_lvis_results

    path = write(tmp_path, valid_json())
    rle = mask_utils.encode(np.asfortranarray(np.ones((40, 48), np.uint8)))
    segm = {"size": [40, 48], "counts": rle["counts"].decode("ascii")}
    record = {"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [2, 2, 8, 8]}
    record["segmentation"] = segm
    with shared_reads():  # every reader below gets the same validated dict
        shared = load_validated(path)
        before = copy.deepcopy(shared.dataset)
        for evaluator in ("fast", "lvis_api"):
            for task in ("bbox", "segm"):
                evaluate_lvis_results(path, [dict(record)], task, evaluator=evaluator)
        assert load_validated(path) is shared and shared.dataset == before


def test_shared_reads_hand_freed_memory_back_when_the_outermost_block_ends(tmp_path, monkeypatch):
    from lvis_longtail.data import lvis_json

    trims = []

    class FakeLibc:
        def malloc_trim(self, pad):
            trims.append((pad, dict(lvis_json._CACHE)))

    monkeypatch.setattr(lvis_json, "_LIBC", FakeLibc())
    path = write(tmp_path, valid_json())
    with shared_reads():
        with shared_reads():
            first = load_validated(path)
        assert trims == [] and load_validated(path) is first  # still shared
    assert trims == [(0, {})]  # once, after the cache let go of the parse
    assert load_validated(path) is not first  # outside a block: parsed again, not kept
