"""Tests of the synthetic long-tailed dataset generator (LVIS v1 schema, determinism, pixels)."""

import collections
import filecmp
import json
import os

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from lvis_longtail.data import synthetic, synthetic_classes

TINY = {"num_train": 20, "num_val": 8, "num_test": 4}
IMAGE_KEYS = {
    "id",
    "width",
    "height",
    "file_name",
    "coco_url",
    "flickr_url",
    "date_captured",
    "license",
    "neg_category_ids",
    "not_exhaustive_category_ids",
}
ANN_KEYS = {"id", "image_id", "category_id", "segmentation", "bbox", "area"}
CAT_KEYS = {
    "id",
    "name",
    "synset",
    "synonyms",
    "def",
    "frequency",
    "image_count",
    "instance_count",
    "thin",
}


def _load(paths):
    out = {}
    for split, path in paths.items():
        with open(path) as f:
            out[split] = json.load(f)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny dataset written through the API; returns (root, split -> json dict)."""
    root = str(tmp_path_factory.mktemp("lt_tiny"))
    return root, _load(synthetic.generate(root, seed=0, progress=False, **TINY))


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    """The default-sized dataset, jsons only (no PNGs); returns split -> json dict."""
    root = str(tmp_path_factory.mktemp("lt_default"))
    return _load(synthetic.generate(root, write_images=False, progress=False))


def _mask(ann, record):
    rles = mask_utils.frPyObjects(ann["segmentation"], record["height"], record["width"])
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def test_layout_and_schema(tiny):
    root, data = tiny
    assert set(data) == {"train", "val", "test_dev"}
    for split, d in data.items():
        expected = {"info", "licenses", "images", "categories"}
        assert set(d) == (expected if split == "test_dev" else expected | {"annotations"})
        for img in d["images"]:
            assert set(img) == IMAGE_KEYS
            assert img["file_name"] == f"{split}/{img['id']:012d}.png"
            assert img["coco_url"].split("/")[-2:] == img["file_name"].split("/")
            assert os.path.isfile(os.path.join(root, "images", img["file_name"]))
        for ann in d.get("annotations", []):
            assert set(ann) == ANN_KEYS
        for cat in d["categories"]:
            assert set(cat) == CAT_KEYS and cat["frequency"] in "rcf"
            assert cat["synset"] == cat["name"] + ".n.01" and cat["synonyms"] == [cat["name"]]
    assert (
        data["train"]["categories"] == data["val"]["categories"] == data["test_dev"]["categories"]
    )
    assert [c["id"] for c in data["train"]["categories"]] == list(range(1, 25))
    assert len(data["train"]["images"]) == TINY["num_train"]
    assert not [f for f in os.listdir(os.path.join(root, "annotations")) if f.startswith(".tmp")]


def test_ids_unique(tiny):
    _, data = tiny
    image_ids = [img["id"] for d in data.values() for img in d["images"]]
    assert len(set(image_ids)) == len(image_ids)
    ann_ids = [a["id"] for s in ("train", "val") for a in data[s]["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids) and min(ann_ids) == 1
    for split in ("train", "val"):
        ids = {img["id"] for img in data[split]["images"]}
        assert all(a["image_id"] in ids for a in data[split]["annotations"])


def test_polygons_bbox_area(tiny):
    _, data = tiny
    for split in ("train", "val"):
        images = {img["id"]: img for img in data[split]["images"]}
        for ann in data[split]["annotations"]:
            img = images[ann["image_id"]]
            assert ann["segmentation"]
            for poly in ann["segmentation"]:
                assert len(poly) >= 6 and len(poly) % 2 == 0
                assert all(round(v, 2) == v for v in poly)
            pts = np.concatenate([np.reshape(p, (-1, 2)) for p in ann["segmentation"]])
            assert pts.min() >= 0 and (pts.max(0) <= [img["width"], img["height"]]).all()
            x0, y0 = pts.min(0)
            x1, y1 = pts.max(0)
            np.testing.assert_allclose(ann["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=1e-2)
            assert ann["area"] == _mask(ann, img).sum() > 0


def test_category_counts_and_frequency(tiny):
    _, data = tiny
    images_of, instances = collections.defaultdict(set), collections.Counter()
    for ann in data["train"]["annotations"]:
        images_of[ann["category_id"]].add(ann["image_id"])
        instances[ann["category_id"]] += 1
    for cat in data["train"]["categories"]:
        assert cat["image_count"] == len(images_of[cat["id"]]) >= 1
        assert cat["instance_count"] == instances[cat["id"]]
        assert cat["frequency"] == synthetic.frequency_group(cat["image_count"])
    assert [synthetic.frequency_group(n) for n in (1, 10, 11, 100, 101)] == list("rrccf")


def test_deterministic(tiny, tmp_path):
    root, _ = tiny
    args = ["--out", str(tmp_path), "--seed", "0", "--num-train", "20", "--num-val", "8"]
    synthetic.main([*args, "--num-test", "4"])
    for split in synthetic.SPLITS:
        name = f"annotations/lt_synthetic_{split}.json"
        assert filecmp.cmp(os.path.join(root, name), tmp_path / name, shallow=False)
    for name in ("train/000000000001.png", "train/000000000020.png", "val/000000000021.png"):
        assert filecmp.cmp(os.path.join(root, "images", name), tmp_path / "images" / name, False)
    other = synthetic.generate(tmp_path / "seed1", seed=1, progress=False, **TINY)
    assert not filecmp.cmp(other["train"], tmp_path / "annotations/lt_synthetic_train.json", False)


def test_pixels_match_masks(tiny):
    root, data = tiny
    colors = {
        i + 1: synthetic_classes.COLORS[c]
        for i, (_, c) in enumerate(synthetic_classes.class_specs(24))
    }
    images = {img["id"]: img for img in data["train"]["images"]}
    for ann in data["train"]["annotations"]:
        img = images[ann["image_id"]]
        pixels = cv2.imread(os.path.join(root, "images", img["file_name"]))[..., ::-1]
        mask = _mask(ann, img)
        diff = np.abs(pixels.astype(np.int32) - colors[ann["category_id"]]).max(-1)
        assert diff[mask].max() <= 45, "every mask pixel is painted with the class color"
        rim = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~mask
        assert (diff[rim] > 30).mean() > 0.9, "pixels just outside the mask are background"


def test_negatives_and_not_exhaustive(default_data):
    for split in ("train", "val"):
        present = collections.defaultdict(set)
        for ann in default_data[split]["annotations"]:
            present[ann["image_id"]].add(ann["category_id"])
        for img in default_data[split]["images"]:
            negs, nel = set(img["neg_category_ids"]), set(img["not_exhaustive_category_ids"])
            assert 3 <= len(negs) <= 6
            assert not negs & (present[img["id"]] | nel)
    images = default_data["train"]["images"]
    frac = np.mean([bool(img["not_exhaustive_category_ids"]) for img in images])
    assert 0.02 < frac < 0.1
    assert all(not img["neg_category_ids"] for img in default_data["test_dev"]["images"])


def test_default_long_tail(default_data):
    cats = default_data["train"]["categories"]
    groups = collections.Counter(c["frequency"] for c in cats)
    assert groups["f"] >= 1 and groups["c"] >= 1 and groups["r"] >= 5
    assert min(c["image_count"] for c in cats) >= 1
    assert sum(c["thin"] for c in cats) >= 6
    val_counts = collections.Counter(a["category_id"] for a in default_data["val"]["annotations"])
    assert min(val_counts[c["id"]] for c in cats) >= 3


def test_thin_classes_have_low_fill(default_data):
    ratios = collections.defaultdict(list)
    for ann in default_data["train"]["annotations"]:
        ratios[ann["category_id"]].append(ann["area"] / (ann["bbox"][2] * ann["bbox"][3]))
    for cat in default_data["train"]["categories"]:
        mean = np.mean(ratios[cat["id"]])
        assert (mean < 0.5) if cat["thin"] else (mean > 0.3), cat["name"]


def test_lvis_api_loads(tiny):
    from lvis import LVIS

    root, data = tiny
    lvis = LVIS(os.path.join(root, "annotations", "lt_synthetic_train.json"))
    assert len(lvis.get_img_ids()) == TINY["num_train"]
    assert len(lvis.get_cat_ids()) == len(data["train"]["categories"])


def test_class_assignment_helpers():
    q = synthetic_classes.class_quotas(100, synthetic_classes.class_weights(24, "train"), 1)
    assert q.sum() == 100 and q.min() >= 1
    rng = np.random.default_rng(0)
    labels, quotas = synthetic_classes.assign_classes(
        rng, 10, synthetic_classes.class_weights(24, "val"), 3
    )
    assert sum(map(len, labels)) == quotas.sum() and all(2 <= len(x) <= 6 for x in labels)
    specs = synthetic_classes.class_specs(84)
    assert len(set(specs)) == 84
    with pytest.raises(ValueError):
        synthetic_classes.class_specs(85)


def test_too_few_train_images(tmp_path):
    with pytest.raises(ValueError, match="too few"):
        synthetic.generate(tmp_path, num_train=2, num_val=2, num_test=2, progress=False)


def _fill(data, thin):
    ratios = [
        ann["area"] / (ann["bbox"][2] * ann["bbox"][3])
        for ann in data["train"]["annotations"]
        if data["train"]["categories"][ann["category_id"] - 1]["thin"] == thin
    ]
    return float(np.mean(ratios))


def test_benchmark_options(tmp_path):
    """Thicker walls, a class-balanced split and a per-class val minimum (benchmark options)."""
    small = {"num_train": 40, "num_val": 40, "num_test": 1, "write_images": False}
    base = _load(synthetic.generate(str(tmp_path / "a"), progress=False, **small))
    thick = _load(
        synthetic.generate(
            str(tmp_path / "b"), thickness_scale=1.5, eval_min_per_class=5, progress=False, **small
        )
    )
    # walls 1.5x: thin shapes fill more of their box, still well below half of it
    assert _fill(base, True) + 0.05 < _fill(thick, True) < 0.5

    def rarest(data, n=7):  # val instances of the n rarest classes
        counts = collections.Counter(a["category_id"] for a in data["val"]["annotations"])
        return sorted(counts[c] for c in range(1, 25))[:n]

    assert min(rarest(thick)) >= 4  # 5 asked; an object that does not fit is dropped
    assert sum(rarest(thick)) > sum(rarest(base))
    np.testing.assert_allclose(
        synthetic_classes.class_weights(24, "train", 1.0), np.full(24, 1 / 24)
    )
    w = synthetic_classes.class_weights(24, "train", 50.0)
    assert w.max() / w.min() == pytest.approx(50.0)
    with pytest.raises(ValueError, match="head_tail_ratio"):
        synthetic_classes.class_weights(24, "train", 0.5)
    with pytest.raises(ValueError, match="thickness_scale"):
        synthetic.generate(str(tmp_path / "c"), thickness_scale=0, progress=False, **small)
