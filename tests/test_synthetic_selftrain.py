"""Synthetic generator's self-training options: withheld train annotations (classes marked
not exhaustive, images unchanged) and the unannotated image split."""

import filecmp
import json

from lvis_longtail.data import synthetic

TINY = dict(num_train=20, num_val=4, num_test=2, image_size=(64, 64), num_classes=8, progress=False)


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_withheld_annotations_and_unlabeled_split(tmp_path):
    base = synthetic.generate(tmp_path / "base", **TINY)
    held = synthetic.generate(tmp_path / "held", withhold_fraction=0.4, num_unlabeled=3, **TINY)
    b, h = _load(base["train"]), _load(held["train"])
    by_image = {}
    for a in b["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    kept = {(a["image_id"], tuple(a["bbox"])) for a in h["annotations"]}
    withheld = [a for a in b["annotations"] if (a["image_id"], tuple(a["bbox"])) not in kept]
    assert len(kept) + len(withheld) == len(b["annotations"])  # a subset, nothing new
    assert 0.25 < len(withheld) / len(b["annotations"]) < 0.55  # ~40% on average
    images = {i["id"]: i for i in h["images"]}
    for a in withheld:  # the class of every withheld annotation is marked not exhaustive
        assert a["category_id"] in images[a["image_id"]]["not_exhaustive_category_ids"]
        assert a["category_id"] not in images[a["image_id"]]["neg_category_ids"]
    # the rendered images and the other splits do not change
    for name in ("train/000000000001.png", "train/000000000020.png"):
        assert filecmp.cmp(tmp_path / "base/images" / name, tmp_path / "held/images" / name, False)
    bv, hv = _load(base["val"]), _load(held["val"])  # (ids and train counts shift)
    assert bv["images"] == hv["images"]
    assert [a["bbox"] for a in bv["annotations"]] == [a["bbox"] for a in hv["annotations"]]
    # unlabeled: image info only, ids after test-dev, images written
    u = _load(held["unlabeled"])
    assert "annotations" not in u and [i["id"] for i in u["images"]] == [27, 28, 29]
    assert all(not i["neg_category_ids"] for i in u["images"])
    assert (tmp_path / "held/images/unlabeled/000000000027.png").is_file()
    assert "unlabeled" not in base
