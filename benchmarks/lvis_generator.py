"""LVIS-v1-shaped data for the benchmark scripts (run as ``python benchmarks/<script>.py``, so
this folder is on ``sys.path``) and the tests (``tests/lvis_random_split.py``): category
frequencies, random boxes, polygons and their RLEs, a training json of any fraction of LVIS v1's
size written as text, and a small pool of image files its records share.

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


def random_box(rng, height, width, sides=(6, 150), spread=0.3, min_side=3, side=None) -> list:
    """``[x, y, w, h]`` (2 decimals) inside an image: a side drawn log-uniformly from ``sides``
    (or ``side``), each of w and h that side times 1 ± ``spread``, at least ``min_side``."""
    side = side if side is not None else float(np.exp(rng.uniform(*np.log(sides))))
    w = float(np.clip(side * rng.uniform(1 - spread, 1 + spread), min_side, width - 2))
    h = float(np.clip(side * rng.uniform(1 - spread, 1 + spread), min_side, height - 2))
    x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
    return [round(x, 2), round(y, 2), round(w, 2), round(h, 2)]


def polygon(rng, x, y, w, h, n: int = 8, r_min: float = 0.7) -> list:
    """A random star-shaped polygon of ``n`` vertices inside the box, flat, 2 decimals."""
    a = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = rng.uniform(r_min, 1.0, n)
    px = np.clip(x + w / 2 + r * np.cos(a) * w / 2, x, x + w)
    py = np.clip(y + h / 2 + r * np.sin(a) * h / 2, y, y + h)
    return np.round(np.stack([px, py], 1).ravel(), 2).tolist()


def polygon_rle(polygon, height: int, width: int) -> dict:
    """The compressed RLE (counts as text) of one polygon."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def jittered(rng, box, height: int, width: int, sigma: float) -> tuple:
    """``(x, y, w, h)`` of ``box`` moved and resized by normal noise of ``sigma`` x its size,
    kept in the image, sides at least 2 (not rounded)."""
    x, y, bw, bh = box
    j = rng.normal(0, sigma, 4) * [bw, bh, bw, bh]
    nw, nh = max(bw + j[2], 2.0), max(bh + j[3], 2.0)
    return float(np.clip(x + j[0], 0, width - nw)), float(np.clip(y + j[1], 0, height - nh)), nw, nh


def moved(polygon, box, new_box) -> list:
    """``polygon`` (inside ``box``) mapped into ``new_box``, 2 decimals."""
    p = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    (x, y, w, h), (nx, ny, nw, nh) = box, new_box
    return np.round(((p - [x, y]) * [nw / w, nh / h] + [nx, ny]).ravel(), 2).tolist()


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
