"""Small random LVIS-format splits and results, rich in the cases that break evaluators.

For parity tests and smoke tests of evaluation code (no images are rendered). A split made by
:func:`random_split` has every federated case: positive, negative and unknown categories per
image, not-exhaustively annotated categories, categories without ground truth, images
without annotations, all three area ranges and frequency groups, and (optionally) a few
annotations with ``ignore`` or area 0. :func:`random_results` adds jittered true positives,
duplicates, false positives of every kind, tied scores and zero-area boxes.
"""

from typing import List

import numpy as np
from lvis_generator import jittered, moved, polygon, polygon_rle, random_box
from pycocotools import mask as mask_utils

FREQUENCIES = ("r", "c", "f")


def random_split(
    seed: int = 0,
    num_images: int = 8,
    num_categories: int = 10,
    size=(160, 200),
    oddities: bool = True,
) -> dict:
    """An LVIS-format split with annotations (polygon masks).

    Category ``k`` (id ``k + 1``) has frequency ``FREQUENCIES[k % 3]``; the last category
    never has ground truth. Image 0 has no annotations. With ``oddities``, one annotation
    has area 0 and one has ``ignore: 1``, which lvis-api skips and ignores respectively.
    """
    rng = np.random.default_rng(seed)
    height, width = size
    cats = [
        {"id": k + 1, "name": f"c{k + 1}", "synset": f"c{k + 1}.n.01", "frequency": f}
        for k, f in zip(range(num_categories), FREQUENCIES * num_categories)
    ]
    with_gt = num_categories - 1
    images, anns = [], []
    for i in range(num_images):
        image_id = 10 * (i + 1)
        drawn = rng.choice(with_gt, rng.integers(1, 4), False).tolist()
        positives = [] if i == 0 else sorted(drawn)
        others = [k for k in range(num_categories) if k not in positives]
        negatives = rng.choice(others, min(len(others), int(rng.integers(1, 4))), False)
        not_exhaustive = [int(positives[0]) + 1] if positives and rng.random() < 0.5 else []
        images.append(
            {
                "id": image_id,
                "height": height,
                "width": width,
                "file_name": f"{image_id}.jpg",
                "neg_category_ids": sorted(int(k) + 1 for k in negatives),
                "not_exhaustive_category_ids": not_exhaustive,
            }
        )
        for k in positives:
            for _ in range(int(rng.integers(1, 4))):
                box = random_box(rng, height, width)
                poly = polygon(rng, *box)
                rle = mask_utils.merge(mask_utils.frPyObjects([poly], height, width))
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image_id,
                        "category_id": int(k) + 1,
                        "bbox": box,
                        "area": float(mask_utils.area(rle)),
                        "segmentation": [poly],
                    }
                )
    if oddities and len(anns) > 3:
        anns[1]["area"] = 0.0
        anns[2]["ignore"] = 1
    return {"info": {}, "licenses": [], "images": images, "categories": cats, "annotations": anns}


def random_results(
    dataset: dict, seed: int = 0, false_positives: int = 12, masks: bool = True
) -> List[dict]:
    """LVIS result records for ``dataset``: for each annotation 0-2 jittered detections of its
    category (so some objects are missed and some found twice), plus ``false_positives`` per
    image of random categories (positive, negative or unknown for the image). Scores have 2
    decimals, so ties are common; a few boxes have zero width. Image 0 gets no detections."""
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in dataset["categories"]]
    by_image = {}
    for ann in dataset["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    records = []
    for image in dataset["images"][1:]:
        h, w = image["height"], image["width"]
        dets = []
        for ann in by_image.get(image["id"], []):
            for _ in range(int(rng.integers(0, 3))):
                nx, ny, nw, nh = jittered(rng, ann["bbox"], h, w, 0.08)
                new_box = [round(nx, 2), round(ny, 2), nw, nh]
                poly = moved(ann["segmentation"][0], ann["bbox"], new_box)
                dets.append((ann["category_id"], new_box, poly))
        for _ in range(false_positives):
            box = random_box(rng, h, w)
            dets.append((int(rng.choice(cat_ids)), box, polygon(rng, *box)))
        for cat, box, poly in dets:
            box = [round(float(v), 2) for v in box]
            if rng.random() < 0.03:
                box[2] = 0.0
            record = {
                "image_id": image["id"],
                "category_id": int(cat),
                "score": round(float(rng.uniform(0.05, 1.0)), 2),
                "bbox": box,
            }
            if masks:
                record["segmentation"] = polygon_rle(poly, h, w)
            records.append(record)
    order = rng.permutation(len(records))  # results need not be grouped by image
    return [records[i] for i in order]


def model_outputs(dataset: dict, records: List[dict]):
    """``(inputs, outputs)`` pairs, one per image of ``dataset``, as a detectron2 model gives
    them for ``records`` (category id k is contiguous class k - 1; masks decoded from the
    RLEs; ``segm_score`` becomes ``mask_scores``), to drive an evaluator's ``process``."""
    import torch
    from detectron2.structures import Boxes, Instances

    by_image = {}
    for r in records:
        by_image.setdefault(r["image_id"], []).append(r)
    pairs = []
    for image in dataset["images"]:
        h, w = image["height"], image["width"]
        recs = by_image.get(image["id"], [])
        inst = Instances((h, w))
        xywh = np.array([r["bbox"] for r in recs], dtype=np.float32).reshape(-1, 4)
        xywh[:, 2:] += xywh[:, :2]
        inst.pred_boxes = Boxes(torch.from_numpy(xywh))
        inst.scores = torch.tensor([r["score"] for r in recs], dtype=torch.float32)
        inst.pred_classes = torch.tensor([r["category_id"] - 1 for r in recs], dtype=torch.long)
        masks = np.zeros((len(recs), h, w), dtype=bool)
        if recs and "segmentation" in recs[0]:
            masks = mask_utils.decode([r["segmentation"] for r in recs]).transpose(2, 0, 1)
        inst.pred_masks = torch.from_numpy(masks.astype(bool))
        if recs and "segm_score" in recs[0]:
            inst.mask_scores = torch.tensor([r["segm_score"] for r in recs], dtype=torch.float32)
        pairs.append(({"image_id": image["id"], "height": h, "width": w}, {"instances": inst}))
    return pairs
