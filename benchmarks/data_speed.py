#!/usr/bin/env python
"""Images per second of one data-loader worker: detectron2's mapper and each augmentation step.

LVIS-sized synthetic images (640 x 480 JPEG, like COCO's) with LVIS-like instance counts
(``--instances`` per image, default 10-40, polygons of 16-48 vertices, classes from a 1203-class
long tail) are written to a temporary folder. Each configuration maps samples in this process
(one thread), as one data-loader worker does: image decoding, augmentation and the conversion
to ``Instances``. Multi-image steps get their extra images as the training loader gives them
(consecutive sampler indices). OpenCV and torch run one thread (PIL, which detectron2's
mapper uses, has one). Configurations are timed round-robin, every round on the same
image sequence; the table gives the median images/s and the median per-round ratio to
detectron2's ``DatasetMapper``, so load from other processes affects all of them alike.

    python benchmarks/data_speed.py [--images 32] [--samples 24] [--rounds 5]
    python benchmarks/data_speed.py --quick
"""

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer)

# isort: on
import argparse
import os
import statistics
import tempfile
import time

import cv2
import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

from lvis_longtail.config import add_longtail_config
from lvis_longtail.data.loader import GroupMapDataset
from lvis_longtail.data.mapper import LongTailDatasetMapper

NUM_CLASSES = 1203
META = "lt_data_speed_train"
# name -> (INPUT.AUGMENTATIONS, overrides, bar as a fraction of detectron2's images/s)
CONFIGS = {
    "lvis_longtail default (= detectron2)": (["ResizeShortestEdge", "RandomFlip"], [], None),
    "LSJ 0.1-2.0 + 1024 crop": (
        ["ScaleJitter", "RandomFlip"],
        ["INPUT.SCALE_JITTER.PRESET", "lsj_1024"],
        0.8,
    ),
    "MMDet 768-1792 + 1280 crop": (
        ["ScaleJitter", "RandomFlip"],
        ["INPUT.SCALE_JITTER.PRESET", "mmdet_1280"],
        0.8,
    ),
    "Rotation p=1 + default": (
        ["Rotation", "ResizeShortestEdge", "RandomFlip"],
        ["INPUT.ROTATION.PROB", "1.0"],
        None,
    ),
    "Mosaic p=1 (4 x 640) + default": (
        ["Mosaic", "ResizeShortestEdge", "RandomFlip"],
        ["INPUT.MOSAIC.PROB", "1.0"],
        0.5,
    ),
    "CopyPaste p=1 + LSJ (Ghiasi)": (
        ["ScaleJitter", "RandomFlip", "CopyPaste"],
        ["INPUT.SCALE_JITTER.PRESET", "lsj_1024", "INPUT.COPY_PASTE.PROB", "1.0"],
        0.5,
    ),
    "InstaBoost p=1 + default": (
        ["InstaBoost", "ResizeShortestEdge", "RandomFlip"],
        ["INPUT.INSTABOOST.PROB", "1.0"],
        None,
    ),
    "1st place stage 1 recipe": (
        ["Mosaic", "ScaleJitter", "Rotation", "RandomFlip"],
        [
            "INPUT.MOSAIC.PROB",
            "1.0",
            "INPUT.SCALE_JITTER.MIN_SCALE",
            "0.5",
            "INPUT.SCALE_JITTER.MAX_SCALE",
            "1.5",
            "INPUT.SCALE_JITTER.TARGET_SIZE",
            "(1280, 1280)",
        ],
        None,
    ),
    "MMDet entry recipe": (
        ["InstaBoost", "ScaleJitter", "RandomFlip"],
        ["INPUT.SCALE_JITTER.PRESET", "mmdet_1280"],
        None,
    ),
}


def blob(rng, cx, cy, r, n):
    """A star-shaped polygon of ``n`` vertices around (cx, cy)."""
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.6, 1.0, n)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).reshape(-1)


def make_dataset(folder, num_images, instances, seed=0):
    """LVIS-like records with JPEG images in ``folder``."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, NUM_CLASSES + 1)
    weights /= weights.sum()
    records = []
    for i in range(num_images):
        h, w = 480, 640
        image = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        path = os.path.join(folder, f"{i:06d}.jpg")
        Image.fromarray(image).save(path, quality=90)
        annos = []
        for _ in range(int(rng.integers(instances[0], instances[1] + 1))):
            r = rng.uniform(8, 90)
            poly = blob(
                rng, rng.uniform(r, w - r), rng.uniform(r, h - r), r, int(rng.integers(16, 49))
            )
            pts = poly.reshape(-1, 2)
            x0, y0 = pts.min(0)
            x1, y1 = pts.max(0)
            annos.append(
                {
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": int(rng.choice(NUM_CLASSES, p=weights)),
                    "segmentation": [poly.tolist()],
                }
            )
        records.append(
            {
                "file_name": path,
                "height": h,
                "width": w,
                "image_id": i + 1,
                "annotations": annos,
                "neg_category_ids": [1, 2, 3],
                "not_exhaustive_category_ids": [4],
            }
        )
    return records


def make_cfg(steps, opts):
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_list(
        [
            "INPUT.MIN_SIZE_TRAIN",
            "(640, 672, 704, 736, 768, 800)",
            "MODEL.MASK_ON",
            "True",
            "DATASETS.TRAIN",
            f"('{META}',)",
        ]
    )
    cfg.INPUT.AUGMENTATIONS = steps
    cfg.merge_from_list(opts)
    return cfg


def time_config(map_one, groups):
    np.random.seed(0)
    start = time.perf_counter()
    for g in groups:
        map_one(g)
    return len(groups) / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--samples", type=int, default=24, help="samples per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--instances", type=int, nargs=2, default=(10, 40))
    parser.add_argument("--quick", action="store_true", help="8 images, 6 samples, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.samples, args.rounds = 8, 6, 2
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # one worker = one thread (training sets OPENCV_THREADS = 1)
    MetadataCatalog.get(META).set(
        thing_classes=[f"c{k}" for k in range(NUM_CLASSES)],
        thing_dataset_id_to_contiguous_id={k + 1: k for k in range(NUM_CLASSES)},
    )
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        records = make_dataset(folder, args.images, args.instances)
        rng = np.random.default_rng(1)
        order = rng.integers(0, len(records), size=(args.samples, 5)).tolist()
        d2 = DatasetMapper(make_cfg(["ResizeShortestEdge", "RandomFlip"], []), True)
        runners = {"detectron2 DatasetMapper": (lambda g: d2(records[g[0]]))}
        for name, (steps, opts, _) in CONFIGS.items():
            mapper = LongTailDatasetMapper(make_cfg(steps, opts), True)
            ds = GroupMapDataset(records, mapper)
            n = 1 + mapper.num_extra_images
            runners[name] = lambda g, ds=ds, n=n: ds[tuple(g[:n])]
        speeds = {k: [] for k in runners}
        for _ in range(args.rounds):
            for name, run in runners.items():
                speeds[name].append(time_config(run, order))
    load1 = os.getloadavg()
    base = speeds["detectron2 DatasetMapper"]
    print(
        f"{args.images} images 640x480, {args.instances[0]}-{args.instances[1]} instances "
        f"each; {args.samples} samples x {args.rounds} rounds; 1 thread"
    )
    print(f"load average before {load0[0]:.2f}, after {load1[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"| {'configuration':38s} | images/s | x detectron2 | rounds' range | bar |")
    print(f"|{'-' * 40}|----------|--------------|---------------|-----|")
    bars = {k: v[2] for k, v in CONFIGS.items()}
    for name, s in speeds.items():
        ratios = [a / b for a, b in zip(s, base)]
        ratio = statistics.median(ratios)
        bar = bars.get(name)
        verdict = "" if bar is None else (f">= {bar} ok" if ratio >= bar else f">= {bar} MISSED")
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(
            f"| {name:38s} | {statistics.median(s):8.1f} | {ratio:12.2f} | {spread:>13s} "
            f"| {verdict} |"
        )


if __name__ == "__main__":
    main()
