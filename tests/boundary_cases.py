"""Adversarial LVIS splits and results for Boundary AP parity, rebuilt from seeds.

:func:`parity_cases` makes the inputs whose numbers under lvis-api's ``lvis_challenge_2021``
branch are stored in ``fixtures/boundary_ap_reference.json`` (made by
``fixtures/make_boundary_reference.py``, which runs that branch; the tests need only the json).
Each case is a split, result records (masks only, so areas are mask areas, as this project
evaluates masks) and the runs to evaluate it under:

- ``tiny``: images from 1x1 to 16x16 (d = 1): full-image masks, single pixels, one-pixel
  lines, masks along the border, checkerboards, an annotation whose mask is empty,
  detections that copy, shift, thin or grow a ground-truth mask, empty detections, tied
  scores and duplicates, negative, unknown and not-exhaustive categories, Mask Scoring scores;
- ``polygons_75x100`` (d = 2: 2.5 rounds to even), ``polygons_105x140`` (d = 4: 3.5 rounds
  to even): :mod:`lvis_random_split`'s polygon objects (ignored and zero-area annotations,
  zero-area boxes, unknown categories, ties), plus border-touching and thin masks.

Runs: the standard protocol (300 per image, and a cap of 4), the challenge protocol (Fixed AP,
10,000 per class, no per-image cap), Fixed AP with 3 per class (the cap binds), and other
dilation ratios.
"""

import hashlib
import json
from typing import List

import numpy as np
from lvis_random_split import random_results, random_split
from pycocotools import mask as mask_utils

FREQUENCIES = ("r", "c", "f")
RUNS = (
    {"max_dets": 300, "dets_per_class": -1, "ratio": 0.02},
    {"max_dets": 4, "dets_per_class": -1, "ratio": 0.02},
    {"max_dets": -1, "dets_per_class": 10000, "ratio": 0.02, "challenge2021": True},
    {"max_dets": -1, "dets_per_class": 3, "ratio": 0.02},
    {"max_dets": 300, "dets_per_class": -1, "ratio": 0.05},
    {"max_dets": 300, "dets_per_class": -1, "ratio": 0.25},
)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def adversarial_mask(rng, h: int, w: int) -> np.ndarray:
    """One of the shapes that stress a boundary: full image, single pixel, lines, border
    strips, rectangles, checkerboards, random blobs, L shapes."""
    m = np.zeros((h, w), dtype=np.uint8)
    y, x = int(rng.integers(h)), int(rng.integers(w))
    kind = int(rng.integers(9))
    if kind == 0:
        m[:] = 1
    elif kind == 1:
        m[y, x] = 1
    elif kind == 2:
        m[y, x : x + int(rng.integers(1, w + 1))] = 1  # one pixel high
    elif kind == 3:
        m[y : y + int(rng.integers(1, h + 1)), x] = 1  # one pixel wide
    elif kind == 4:
        side = int(rng.integers(1, min(h, w) + 1))  # a strip along a border
        [m[:side], m[-side:], m[:, :side], m[:, -side:]][int(rng.integers(4))][:] = 1
    elif kind == 5:
        m[y : y + int(rng.integers(1, h + 1)), x : x + int(rng.integers(1, w + 1))] = 1
    elif kind == 6:
        m[(np.arange(h)[:, None] + np.arange(w)[None]) % 2 == 0] = 1
    elif kind == 7:
        m[:] = rng.random((h, w)) < rng.uniform(0.4, 0.95)
    else:
        m[y:, x] = 1
        m[-1, x:] = 1
    return m


def _variant(rng, mask: np.ndarray) -> np.ndarray:
    """A detection of ``mask``: a copy, shifted by one pixel, grown, thinned or a new shape."""
    kind = int(rng.integers(5))
    if kind == 0:
        return mask.copy()
    if kind == 1:
        axis, step = int(rng.integers(2)), int(rng.choice([-1, 1]))
        out = np.roll(mask, step, axis=axis)
        edge = (slice(None),) * axis + ((0 if step > 0 else -1),)
        out[edge] = 0  # shifted, not wrapped around
        return out
    if kind == 2:
        out = mask.copy()
        out[:-1] |= mask[1:]
        out[:, :-1] |= mask[:, 1:]
        return out
    if kind == 3:
        out = mask.copy()
        out[:, ::2] = 0
        return out
    return adversarial_mask(rng, *mask.shape)


def _tiny(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    sizes = [(1, 1), (1, 9), (8, 1), (2, 3), (3, 3), (5, 5), (6, 11), (13, 7), (16, 16)]
    cats = [
        {"id": k + 1, "name": f"c{k + 1}", "synset": f"c{k + 1}.n.01", "frequency": f}
        for k, f in enumerate(FREQUENCIES * 2)
    ]
    images, anns, records = [], [], []
    for i, (h, w) in enumerate(sizes):
        image_id = 100 + i
        positives = sorted(rng.choice(5, int(rng.integers(1, 3)), replace=False).tolist())
        negatives = [k for k in range(6) if k not in positives and rng.random() < 0.5]
        images.append(
            {
                "id": image_id,
                "height": h,
                "width": w,
                "file_name": f"{image_id}.jpg",
                "neg_category_ids": [k + 1 for k in negatives],
                "not_exhaustive_category_ids": [positives[-1] + 1] if i % 3 == 0 else [],
            }
        )
        for k in positives:
            for _ in range(int(rng.integers(1, 4))):
                mask = adversarial_mask(rng, h, w)
                if rng.random() < 0.08:
                    mask[:] = 0  # an annotation whose mask is empty (its area field says 1)
                rle = _rle(mask)
                x, y, bw, bh = mask_utils.toBbox(rle).tolist()
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image_id,
                        "category_id": k + 1,
                        "bbox": [x, y, bw, bh],
                        "area": float(max(mask.sum(), 1)),
                        "segmentation": rle,
                    }
                )
                for _ in range(int(rng.integers(0, 4))):
                    cat = k + 1 if rng.random() < 0.85 else int(rng.integers(1, 7))
                    records.append(_record(rng, image_id, cat, _variant(rng, mask)))
        for _ in range(int(rng.integers(1, 5))):  # false positives, also empty masks
            mask = adversarial_mask(rng, h, w) * (rng.random() > 0.1)
            records.append(_record(rng, image_id, int(rng.integers(1, 7)), mask))
    for r in records[::5]:
        records.append(dict(r))  # exact duplicates: same mask, same score
    for r in records[::7]:
        r["segm_score"] = float(rng.choice([0.2, 0.5, 0.5]))
    order = rng.permutation(len(records))
    dataset = {"info": {}, "licenses": [], "images": images, "categories": cats}
    dataset["annotations"] = anns
    return {"name": f"tiny_{seed}", "dataset": dataset, "records": [records[i] for i in order]}


def _record(rng, image_id: int, cat: int, mask: np.ndarray) -> dict:
    score = float(rng.choice([0.3, 0.5, 0.5, 0.7, 0.9]))  # few values: many ties
    return {"image_id": image_id, "category_id": cat, "score": score, "segmentation": _rle(mask)}


def _polygons(seed: int, size) -> dict:
    """lvis_random_split's polygon objects, and border and thin masks added to the results."""
    rng = np.random.default_rng(1000 + seed)
    dataset = random_split(seed, num_images=7, size=size)
    records = [{k: v for k, v in r.items() if k != "bbox"} for r in random_results(dataset, seed)]
    h, w = size
    for image in dataset["images"][1:]:
        for _ in range(3):
            mask = adversarial_mask(rng, h, w)
            records.append(_record(rng, image["id"], int(rng.integers(1, 11)), mask))
    return {"name": f"polygons_{h}x{w}", "dataset": dataset, "records": records}


def parity_cases() -> List[dict]:
    """The cases, each ``{"name", "dataset", "records"}`` (evaluated under every run)."""
    return [_tiny(0), _tiny(1), _polygons(2, (75, 100)), _polygons(3, (105, 140))]


def digest(case: dict) -> str:
    """sha256 of a case's inputs: the fixture's numbers belong to exactly these inputs."""
    text = json.dumps([case["dataset"], case["records"]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def reference_records(records: List[dict]) -> List[dict]:
    """The records as the reference evaluates them: ranked by the Mask Scoring score where
    there is one (the ``score`` of this project's results file)."""
    return [
        {
            "image_id": r["image_id"],
            "category_id": r["category_id"],
            "score": r.get("segm_score", r["score"]),
            "segmentation": dict(r["segmentation"]),
        }
        for r in records
    ]
