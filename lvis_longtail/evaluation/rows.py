"""One image's detections as rows of :data:`RECORD_DTYPE` plus a blob of the masks' compressed
RLE counts: what the shards (:mod:`.shards`) store, made from ``Instances``
(:func:`instances_to_rows`, after :func:`preselect` drops what a per-image cap would) or from
LVIS records (:func:`records_to_rows`)."""

from typing import Mapping, Sequence

import numpy as np
import torch
from detectron2.structures import BoxMode

from lvis_longtail.evaluation.mask_rle import encode_masks
from lvis_longtail.evaluation.table import SEGM_SCORE, rle_areas

__all__ = ["RECORD_DTYPE", "instances_to_rows", "preselect", "records_to_rows"]

RECORD_DTYPE = np.dtype(
    [
        ("image_id", "<i8"),
        ("category_id", "<i8"),
        ("entry", "<i8"),
        ("score", "<f8"),
        ("segm_score", "<f8"),  # NaN: no Mask Scoring score
        ("bbox", "<f8", (4,)),
        ("height", "<i4"),
        ("width", "<i4"),
        ("mask_area", "<f8"),
        ("counts_start", "<i8"),  # offset in the chunk's blob; -1: no mask
        ("counts_len", "<i8"),
    ]
)


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores; ties keep the earlier index (as lvis-api does)."""
    return torch.argsort(-scores, stable=True)[:k]


def preselect(instances, max_dets: int = -1):
    """The detections that can survive a per-image cap of ``max_dets`` (-1: all): the top
    ``max_dets`` by box score, together with the top ``max_dets`` by ``mask_scores`` where
    present, so each task can later take its own top ``max_dets``; in the model's order."""
    if 0 <= max_dets < len(instances):
        keep = _top_k(instances.scores, max_dets)
        if instances.has("mask_scores"):
            keep = torch.cat([keep, _top_k(instances.mask_scores, max_dets)]).unique()
        instances = instances[torch.sort(keep).values]
    return instances


def _dataset_category_ids(classes: torch.Tensor, dataset_ids: Mapping[int, int], image_id):
    lookup = np.full(max(dataset_ids, default=-1) + 2, -1, dtype=np.int64)
    lookup[list(dataset_ids)] = list(dataset_ids.values())
    classes = classes.numpy()
    inside = (classes >= 0) & (classes < len(lookup))
    cats = np.where(inside, lookup[np.where(inside, classes, 0)], -1)
    if (cats < 0).any():
        cls = int(classes[np.flatnonzero(cats < 0)[0]])
        raise KeyError(
            f"predicted class {cls} of image {image_id} has no dataset category id (the "
            f"dataset maps {len(dataset_ids)} classes; does MODEL.ROI_HEADS.NUM_CLASSES match?)"
        )
    return cats


def instances_to_rows(instances, image_id: int, dataset_ids: Mapping[int, int], entry: int = 0,
                      blob_start: int = 0):  # fmt: skip
    """(rows, counts blob) of one image's ``Instances`` (``pred_boxes`` XYXY, ``scores``,
    ``pred_classes`` contiguous, optionally ``pred_masks`` (N, H, W) and ``mask_scores``), on
    any device: the values detectron2's ``instances_to_coco_json`` gives (XYWH boxes,
    compressed RLEs), with dataset category ids, without making a dict per detection. The
    masks are encoded from their transitions on their device (:func:`~.mask_rle.encode_masks`);
    only those and the (N,) fields reach the host."""
    n = len(instances)
    rows = np.zeros(n, dtype=RECORD_DTYPE)
    rows["counts_start"] = -1
    if n == 0:
        return rows, b""
    cpu = torch.device("cpu")
    rows["image_id"] = image_id
    classes = instances.pred_classes.to(cpu)
    rows["category_id"] = _dataset_category_ids(classes, dataset_ids, image_id)
    rows["entry"] = entry
    rows["score"] = instances.scores.to(cpu).tolist()  # float32 -> float, as detectron2's
    if instances.has("mask_scores"):
        rows["segm_score"] = instances.mask_scores.to(cpu).tolist()
    else:
        rows["segm_score"] = np.nan
    boxes = instances.pred_boxes.tensor.to(cpu)
    rows["bbox"] = BoxMode.convert(boxes, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS).tolist()
    if not instances.has("pred_masks"):
        return rows, b""
    masks = instances.pred_masks
    rles = encode_masks(masks)
    counts = [r["counts"] for r in rles]
    lengths = np.array([len(c) for c in counts], dtype=np.int64)
    rows["counts_len"] = lengths
    rows["counts_start"] = blob_start + np.cumsum(lengths) - lengths
    rows["height"], rows["width"] = masks.shape[1], masks.shape[2]
    rows["mask_area"] = rle_areas(rles)
    return rows, b"".join(counts)


def records_to_rows(records: Sequence[dict], entry: int = 0, blob_start: int = 0):
    """(rows, counts blob) of one image's LVIS records (dicts, ``segm_score`` optional)."""
    rows = np.zeros(len(records), dtype=RECORD_DTYPE)
    rows["counts_start"] = -1
    if not records:
        return rows, b""
    rows["image_id"] = [r["image_id"] for r in records]
    rows["category_id"] = [r["category_id"] for r in records]
    rows["entry"] = entry
    rows["score"] = [r["score"] for r in records]
    rows["segm_score"] = [r.get(SEGM_SCORE, np.nan) for r in records]
    rows["bbox"] = [r["bbox"] for r in records]
    segms = [r.get("segmentation") for r in records]
    if all(s is not None for s in segms):
        counts = [s["counts"] for s in segms]
        counts = [c.encode("ascii") if isinstance(c, str) else bytes(c) for c in counts]
        lengths = np.array([len(c) for c in counts], dtype=np.int64)
        rows["counts_len"] = lengths
        rows["counts_start"] = blob_start + np.cumsum(lengths) - lengths
        rows["height"] = [s["size"][0] for s in segms]
        rows["width"] = [s["size"][1] for s in segms]
        rows["mask_area"] = rle_areas(segms)
        return rows, b"".join(counts)
    return rows, b""
