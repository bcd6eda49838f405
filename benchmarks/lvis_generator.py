"""LVIS-v1-shaped data for the benchmark scripts (run as ``python benchmarks/<script>.py``, so
this folder is on ``sys.path``): category frequencies, a training json of any fraction of
LVIS v1's size written as text, and a small pool of image files its records share.

:func:`write_lvis_json` writes 1,203 categories with LVIS's r/c/f split (337 / 461 / 405) and
``frequency``, ``image_count``, ``instance_count`` fields; images of LVIS's usual sizes with
``coco_url``, ``neg_category_ids`` and ``not_exhaustive_category_ids``; annotations of
long-tailed categories, each one polygon of 8-40 vertices with 2-decimal coordinates, its box,
area and ``iscrowd``. Written directly as text (no ``json.dumps`` of a 1 GB object).
"""

import json
import os
from typing import Optional

import numpy as np

NUM_IMAGES, NUM_ANNOTATIONS = 100_170, 1_270_141  # LVIS v1 train
NUM_CATEGORIES = 1203
GROUP_SIZES = (("r", 337), ("c", 461), ("f", 405))
IMAGE_SIZES = ((480, 640), (640, 480), (427, 640), (640, 427), (512, 512))


def frequencies() -> list:
    """The frequency group of each of LVIS v1's 1,203 categories, r, then c, then f."""
    return [f for f, n in GROUP_SIZES for _ in range(n)]


def category_weights(rng, freq) -> np.ndarray:
    """Drawing probability of each category: frequent ones most, long-tailed within a group."""
    weight = np.array([{"r": 0.02, "c": 0.3, "f": 4.0}[f] for f in freq])
    weight = weight * rng.uniform(0.2, 1.0, len(freq)) ** 2
    return weight / weight.sum()


def _polygon_text(rng, x, y, w, h):
    n = int(rng.integers(8, 41))
    a = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = rng.uniform(0.6, 1.0, n)
    px = x + w / 2 + r * np.cos(a) * w / 2
    py = y + h / 2 + r * np.sin(a) * h / 2
    return "[[" + ",".join(f"{v:.2f}" for v in np.stack([px, py], 1).ravel()) + "]]"


def pool_file(h: int, w: int, k: int) -> str:
    """Name of pool image ``k`` of size ``h`` x ``w`` (under ``<image_root>/pool/``)."""
    return f"{h}x{w}_{k}.jpg"


def write_image_pool(image_root: str, per_size: int) -> None:
    """``per_size`` random JPEG files of each of :data:`IMAGE_SIZES` under
    ``<image_root>/pool/``, the files of :func:`write_lvis_json`'s ``pool_per_size``."""
    import cv2

    folder = os.path.join(image_root, "pool")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for h, w in IMAGE_SIZES:
        for k in range(per_size):
            path = os.path.join(folder, pool_file(h, w, k))
            if not os.path.exists(path):
                cv2.imwrite(path, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _image_url(rng, i: int, h: int, w: int, pool_per_size: Optional[int]) -> str:
    if pool_per_size:  # <image_root>/pool/<file>, as detectron2 and lvis_longtail resolve it
        name = pool_file(h, w, int(rng.integers(pool_per_size)))
        return f"http://images.cocodataset.org/pool/{name}"
    return f"http://images.cocodataset.org/train2017/{i + 1:012d}.jpg"


def write_lvis_json(path: str, scale: float, seed: int = 0, pool_per_size=None) -> tuple:
    """Write an LVIS-format training json of ``scale`` times LVIS v1's size (module docstring).

    Args:
        path: the json to write.
        scale: fraction of LVIS v1 train's 100,170 images and 1,270,141 annotations.
        seed: of the random draws.
        pool_per_size: None: each image its own ``train2017/<id>.jpg`` (no files exist);
            an int: each image's ``coco_url`` names one of :func:`write_image_pool`'s files
            of its size.

    Returns:
        (#images, #annotations).
    """
    rng = np.random.default_rng(seed)
    num_images = max(1, round(NUM_IMAGES * scale))
    num_anns = max(1, round(NUM_ANNOTATIONS * scale))
    freq = frequencies()
    weight = category_weights(rng, freq)
    per_image = rng.multinomial(num_anns, np.full(num_images, 1 / num_images))
    cats = rng.choice(len(freq), num_anns, p=weight) + 1
    sizes = rng.integers(len(IMAGE_SIZES), size=num_images)
    with open(path, "w") as f:
        f.write('{"info":{"year":2020},"licenses":[],"categories":[')
        fields = {"image_count": 1, "instance_count": 1}
        f.write(
            ",".join(
                json.dumps(
                    {
                        "id": k + 1,
                        "name": f"cat_{k + 1}",
                        "synset": f"cat_{k + 1}.n.01",
                        "frequency": g,
                        **fields,
                    }  # fmt: skip
                )
                for k, g in enumerate(freq)
            )
        )
        f.write('],"images":[')
        for i in range(num_images):
            h, w = IMAGE_SIZES[sizes[i]]
            neg = (rng.integers(1, len(freq) + 1, int(rng.integers(0, 8)))).tolist()
            f.write(
                ("," if i else "") + f'{{"id":{i + 1},"height":{h},"width":{w},"license":1,'
                f'"coco_url":"{_image_url(rng, i, h, w, pool_per_size)}",'
                f'"neg_category_ids":{neg},"not_exhaustive_category_ids":[]}}'
            )
        f.write('],"annotations":[')
        k = 0
        for i in range(num_images):
            h, w = IMAGE_SIZES[sizes[i]]
            for _ in range(int(per_image[i])):
                bw, bh = float(rng.uniform(4, w / 2)), float(rng.uniform(4, h / 2))
                x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
                f.write(
                    ("," if k else "")
                    + f'{{"id":{k + 1},"image_id":{i + 1},"category_id":{int(cats[k])},'
                    f'"bbox":[{x:.2f},{y:.2f},{bw:.2f},{bh:.2f}],"area":{0.7 * bw * bh:.2f},'
                    f'"iscrowd":0,"segmentation":{_polygon_text(rng, x, y, bw, bh)}}}'
                )
                k += 1
        f.write("]}")
    return num_images, num_anns
