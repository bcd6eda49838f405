"""A deterministic, long-tailed synthetic instance-segmentation dataset in LVIS v1 format.

Every class is a (shape, color) pair, so appearance alone identifies it. Half of the shapes are
thin or hollow (ring, frame, diagonal bar, L, thin plus, thin X), with mask area well below half
of their box area. Train classes follow a log-linear long tail (LVIS-like frequent, common and
rare groups); val and test-dev use the square root of those weights, renormalized
(:mod:`.synthetic_classes`; the images are drawn by :mod:`.synthetic_draw`).

Objects never overlap (masks keep a 2 px margin), and every image is painted from the very
masks pycocotools rasterizes from the written polygons, so pixels and annotations agree exactly.
Hollow shapes are unions of overlapping simple polygons (two half-annuli for a ring, four strips
for a frame), since LVIS polygons cannot express holes.

Layout written under ``out_dir``::

    annotations/lt_synthetic_{train,val,test_dev}.json   (test_dev: image info only)
    images/{train,val,test_dev}/000000000001.png

Self-training options (off by default; then the files are byte-identical to before):
``withhold_fraction`` leaves that fraction of each train image's annotations unannotated
(their classes join the image's ``not_exhaustive_category_ids``, as LVIS marks them), and
``num_unlabeled`` adds the image-info-only split ``lt_synthetic_unlabeled.json`` /
``images/unlabeled/`` drawn like train.

Usage::

    python -m lvis_longtail.data.synthetic --out datasets/lt_synthetic --seed 0
"""

import argparse
import collections
import json
import os
import time

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from lvis_longtail.data.class_stats import frequency_group
from lvis_longtail.data.synthetic_classes import (
    SHAPES,
    TRAIN_HEAD_TAIL_RATIO,
    assign_classes,
    class_specs,
    class_weights,
)
from lvis_longtail.data.synthetic_draw import make_image, polygons_to_rle
from lvis_longtail.utils.io import atomic_write

SPLITS = ("train", "val", "test_dev")
UNLABELED = "unlabeled"  # optional split of train-distributed images without annotations
NOT_EXHAUSTIVE_FRACTION = 0.05
NUM_NEGATIVES = (3, 6)


def _annotation(ann_id, image_id, label, flat, height, width):
    pts = np.concatenate([np.reshape(p, (-1, 2)) for p in flat])
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    area = float(mask_utils.area(polygons_to_rle(flat, height, width)))
    bbox = [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": label + 1,
        "segmentation": flat,
        "bbox": bbox,
        "area": area,
    }


def _image_record(image_id, split, h, w):
    rel = f"{split}/{image_id:012d}.png"
    return {
        "id": image_id,
        "width": w,
        "height": h,
        "file_name": rel,
        "coco_url": f"http://synthetic.invalid/{rel}",
        "flickr_url": f"http://synthetic.invalid/flickr/{rel}",
        "date_captured": "2024-01-01 00:00:00",
        "license": 1,
        "neg_category_ids": [],
        "not_exhaustive_category_ids": [],
    }


def _label_image(rng, record, objects, quotas, num_classes):
    """Choose negatives and, for ~5% of images, one instance to leave unannotated.

    Returns:
        the (label, polygons) pairs to annotate.
    """
    present = sorted({o[0] for o in objects})
    absent = np.setdiff1d(np.arange(num_classes), present)
    n_neg = min(int(rng.integers(NUM_NEGATIVES[0], NUM_NEGATIVES[1] + 1)), len(absent))
    record["neg_category_ids"] = sorted(int(c) + 1 for c in rng.choice(absent, n_neg, False))
    kept = [(o[0], o[1]) for o in objects]
    if rng.random() < NOT_EXHAUSTIVE_FRACTION:
        labels = [o[0] for o in objects]
        # Never thin out a class that is rare in this split, unless the image has two of it.
        cands = [c for c in present if quotas[c] > 10 or labels.count(c) > 1]
        if cands:
            c = int(rng.choice(cands))
            kept.pop(int(rng.choice([i for i, x in enumerate(labels) if x == c])))
            record["not_exhaustive_category_ids"] = [c + 1]
    return kept


def _withhold(rng, record, kept, fraction, quotas):
    """Drop ``floor(fraction * n + u)`` (u ~ U(0, 1): ``fraction`` of them on average) of an
    image's n annotations at random, never the only instance of a class that is rare in the
    split (as :func:`_label_image`); their classes become not exhaustive."""
    labels = [o[0] for o in kept]
    cands = [i for i, c in enumerate(labels) if quotas[c] > 10 or labels.count(c) > 1]
    m = min(int(np.floor(fraction * len(kept) + rng.random())), len(cands))
    if m == 0:
        return kept
    drop = set(rng.choice(cands, m, replace=False).tolist())
    withheld = {int(labels[i]) + 1 for i in drop}
    record["not_exhaustive_category_ids"] = sorted(
        set(record["not_exhaustive_category_ids"]) | withheld
    )
    return [o for i, o in enumerate(kept) if i not in drop]


def _progress(items, desc, enabled):
    """``items`` wrapped in a tqdm bar when ``enabled`` (and tqdm is installed)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="img", disable=not enabled)


def _write_atomic(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def _generate_split(cfg, split, first_image_id, first_ann_id):
    """Render one split; returns (image records, annotations)."""
    si = (*SPLITS, UNLABELED).index(split)
    h, w, k = cfg["h"], cfg["w"], len(cfg["specs"])
    n = cfg[f"num_{split}"]
    rng = np.random.default_rng([cfg["seed"], si])
    weights = class_weights(k, "train" if split == UNLABELED else split, cfg["head_tail_ratio"])
    minimum = {"train": 1, UNLABELED: 0}.get(split, cfg["eval_min_per_class"])
    labels, quotas = assign_classes(rng, n, weights, minimum)
    if split == "train" and quotas.min() < 1:
        raise ValueError(f"{n} train images hold too few objects for {k} classes")
    img_dir = os.path.join(cfg["out_dir"], "images", split)
    os.makedirs(img_dir, exist_ok=True)
    images, anns = [], []
    for i in _progress(range(n), f"{split} images", cfg["progress"]):
        img_rng = np.random.default_rng([cfg["seed"], si, i])
        img, objects = make_image(
            img_rng, h, w, labels[i], cfg["specs"], *cfg["sizes"], cfg["thickness_scale"]
        )
        record = _image_record(first_image_id + i, split, h, w)
        kept = _label_image(img_rng, record, objects, quotas, k)
        if split == "train" and cfg["withhold_fraction"] > 0:
            rng_w = np.random.default_rng([cfg["seed"], si, i, 1])
            kept = _withhold(rng_w, record, kept, cfg["withhold_fraction"], quotas)
        for label, flat in kept:
            ann_id = first_ann_id + len(anns)
            anns.append(_annotation(ann_id, record["id"], label, flat, h, w))
        if split in ("test_dev", UNLABELED):
            record["neg_category_ids"], record["not_exhaustive_category_ids"] = [], []
        images.append(record)
        if cfg["write_images"]:
            png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1]
            _write_atomic(os.path.join(cfg["out_dir"], "images", record["file_name"]), png)
    return images, anns


def build_categories(specs, train_anns):
    """LVIS v1 category records with counts and frequency from the train annotations."""
    images_of = [set() for _ in specs]
    inst = np.zeros(len(specs), dtype=np.int64)
    for a in train_anns:
        images_of[a["category_id"] - 1].add(a["image_id"])
        inst[a["category_id"] - 1] += 1
    cats = []
    for i, (shape, color) in enumerate(specs):
        name = f"{color}_{shape}"
        thin = SHAPES[shape][1]
        kind = "thin or hollow" if thin else "filled"
        cats.append(
            {
                "id": i + 1,
                "name": name,
                "synset": f"{name}.n.01",
                "synonyms": [name],
                "def": f"a {kind} {shape.replace('_', ' ')} painted {color}",
                "frequency": frequency_group(len(images_of[i])),
                "image_count": len(images_of[i]),
                "instance_count": int(inst[i]),
                "thin": thin,
            }
        )
    return cats


def generate(
    out_dir,
    seed=0,
    num_train=800,
    num_val=150,
    num_test=50,
    image_size=(128, 128),
    num_classes=24,
    *,
    thickness_scale=1.0,
    eval_min_per_class=3,
    head_tail_ratio=TRAIN_HEAD_TAIL_RATIO,
    write_images=True,
    progress=True,
    withhold_fraction=0.0,
    num_unlabeled=0,
):
    """Generate the dataset under ``out_dir``; the same arguments give byte-identical files.

    Args:
        out_dir: output root; gets ``annotations/`` and ``images/``.
        seed: random seed of the images and of the class assignment (not of class frequency
            ranks, which are fixed).
        num_train, num_val, num_test: images per split.
        image_size: (height, width); object sizes scale with ``min(height, width) / 128``.
        num_classes: K, at most 84 (12 shapes x 7 colors).
        thickness_scale: wall width of the thin and hollow shapes, as a multiple of the default
            ``max(2.5, 0.09 * size)`` px (the long-tail benchmark uses thicker walls so that a
            28 x 28 mask can resolve them).
        eval_min_per_class: instances every class gets in val and test-dev (if there are
            enough objects; the rest follow the square-root weights).
        head_tail_ratio: train weight of the most over the least frequent class (1 = a
            class-balanced split, e.g. the benchmark's pre-training set).
        write_images: False writes only the jsons (for quick statistics).
        progress: show a progress bar while rendering.
        withhold_fraction: fraction in [0, 1) of each train image's annotations left out
            (their classes marked not exhaustive); 0 = none.
        num_unlabeled: images of the extra image-info-only split ``unlabeled`` (0 = none).

    Returns:
        dict split name -> path of its json.
    """
    h, w = (int(v) for v in image_size)
    scale = min(h, w) / 128.0
    cfg = {
        "out_dir": out_dir,
        "seed": seed,
        "h": h,
        "w": w,
        "specs": class_specs(num_classes),
        "num_train": num_train,
        "num_val": num_val,
        "num_test_dev": num_test,
        "sizes": ((12 * scale, 60 * scale), 22 * scale),
        "thickness_scale": float(thickness_scale),
        "eval_min_per_class": int(eval_min_per_class),
        "head_tail_ratio": float(head_tail_ratio),
        "write_images": write_images,
        "progress": progress,
        "withhold_fraction": float(withhold_fraction),
        f"num_{UNLABELED}": int(num_unlabeled),
    }
    if not 0 <= withhold_fraction < 1 or num_unlabeled < 0:
        raise ValueError(
            "withhold_fraction must be in [0, 1) and num_unlabeled >= 0, got "
            f"{withhold_fraction} and {num_unlabeled}"
        )
    if not 0 < thickness_scale <= 3 or eval_min_per_class < 0:
        raise ValueError(
            "thickness_scale must be in (0, 3] and eval_min_per_class >= 0, got "
            f"{thickness_scale} and {eval_min_per_class}"
        )
    splits, next_image, next_ann = {}, 1, 1
    for split in SPLITS + ((UNLABELED,) if num_unlabeled > 0 else ()):
        splits[split] = _generate_split(cfg, split, next_image, next_ann)
        next_image += cfg[f"num_{split}"]
        next_ann += len(splits[split][1])
    categories = build_categories(cfg["specs"], splits["train"][1])
    missing = [c["name"] for c in categories if c["image_count"] == 0]
    if missing:
        raise RuntimeError(f"classes without a train image: {missing}; use more train images")
    return _write_jsons(cfg, splits, categories)


def _write_jsons(cfg, splits, categories):
    info = {
        "description": f"lvis_longtail synthetic long-tailed dataset (seed {cfg['seed']})",
        "url": "http://synthetic.invalid",
        "version": "1.0",
        "year": 2024,
        "contributor": "lvis_longtail",
        "date_created": "2024-01-01",
    }
    licenses = [
        {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
    ]
    ann_dir = os.path.join(cfg["out_dir"], "annotations")
    os.makedirs(ann_dir, exist_ok=True)
    paths = {}
    for split, (images, anns) in splits.items():
        data = {"info": info, "licenses": licenses, "images": images}
        if split not in ("test_dev", UNLABELED):
            data["annotations"] = anns
        data["categories"] = categories
        paths[split] = os.path.join(ann_dir, f"lt_synthetic_{split}.json")
        _write_atomic(paths[split], json.dumps(data, separators=(",", ":")).encode())
    return paths


def main(argv=None):
    """Command-line entry point; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", dest="out_dir", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=800)
    p.add_argument("--num-val", type=int, default=150)
    p.add_argument("--num-test", type=int, default=50)
    p.add_argument("--image-size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    p.add_argument("--num-classes", type=int, default=24)
    p.add_argument("--thickness-scale", type=float, default=1.0, help="thin-shape wall factor")
    p.add_argument("--eval-min-per-class", type=int, default=3, help="val/test-dev minimum")
    p.add_argument(
        "--head-tail-ratio", type=float, default=TRAIN_HEAD_TAIL_RATIO, help="1 = balanced"
    )
    p.add_argument("--withhold-fraction", type=float, default=0.0, help="of train annotations")
    p.add_argument("--num-unlabeled", type=int, default=0, help="image-info-only images")
    args = p.parse_args(argv)
    start = time.perf_counter()
    paths = generate(**vars(args))
    with open(paths["train"]) as f:
        groups = collections.Counter(c["frequency"] for c in json.load(f)["categories"])
    print(f"wrote {', '.join(paths.values())} in {time.perf_counter() - start:.1f} s")
    print(f"train classes: {groups['r']} rare, {groups['c']} common, {groups['f']} frequent")


if __name__ == "__main__":
    main()
