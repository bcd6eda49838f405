"""LVIS results records: made from ``Instances``, capped per image, written to disk.

A *record* is one detection in the LVIS results format (docs/methods.md, "LVIS
evaluation"), in original image coordinates::

    {"image_id": int, "category_id": int (the dataset's own id), "score": float,
     "bbox": [x, y, w, h], "segmentation": {"size": [h, w], "counts": str}}

Records made from a Mask Scoring model (``Instances.mask_scores``: box score × predicted mask
IoU) carry one more key, ``"segm_score"``, until :func:`records_for_export` or
:func:`records_for_task` resolves it: bbox is ranked by ``score`` (the box score), segm by
``segm_score``, and the exported file's ``score`` is the segm score, since the LVIS server
evaluates segm. Without ``mask_scores`` both tasks and the file use the box score.
"""

import logging
import os
from collections import defaultdict
from json.encoder import encode_basestring_ascii
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances

from lvis_longtail.evaluation.validation import RESULTS_FILE, LVISResultsError
from lvis_longtail.utils.io import temp_path, write_json_atomic

__all__ = [
    "EXPORT_FIELDS",
    "RESULTS_FILE",
    "SEGM_SCORE",
    "JsonListWriter",
    "LVISResultsError",
    "cap_per_image",
    "instances_to_lvis_records",
    "record_json",
    "records_for_export",
    "records_for_task",
    "write_json_atomic",
]

logger = logging.getLogger(__name__)

SEGM_SCORE = "segm_score"
EXPORT_FIELDS = ("image_id", "category_id", "score", "bbox", "segmentation")


def box_score(record: dict) -> float:
    """The score bbox evaluation ranks a record by."""
    return record["score"]


def segm_score(record: dict) -> float:
    """The score segm evaluation (and the exported file) ranks a record by."""
    return record.get(SEGM_SCORE, record["score"])


def _top_k(scores: torch.Tensor, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores; ties keep the earlier index (as lvis-api does)."""
    return np.argsort(-scores.detach().cpu().numpy(), kind="stable")[:k]


def instances_to_lvis_records(
    instances: Instances, image_id: int, dataset_ids: Mapping[int, int], max_dets: int = 300
) -> list[dict]:
    """LVIS records of one image's predictions, via detectron2's ``instances_to_coco_json``.

    Only detections that can survive the per-image cap are converted (masks are RLE-encoded
    after the cut): the top ``max_dets`` by box score, together with the top ``max_dets`` by
    ``mask_scores`` where present, so each task can later take its own top ``max_dets``.

    Args:
        instances: on CPU, with ``pred_boxes`` (XYXY), ``scores``, ``pred_classes``
            (contiguous ids), optionally ``pred_masks`` (N, H, W) and ``mask_scores`` (N,).
        image_id: the dataset's image id.
        dataset_ids: contiguous class id -> dataset category id.
        max_dets: per-image cap; -1 keeps everything.
    """
    if 0 <= max_dets < len(instances):
        keep = _top_k(instances.scores, max_dets)
        if instances.has("mask_scores"):
            keep = np.union1d(keep, _top_k(instances.mask_scores, max_dets))
        instances = instances[torch.as_tensor(np.sort(keep), dtype=torch.long)]
    records = instances_to_coco_json(instances, image_id)
    for record in records:
        cls = record["category_id"]
        if cls not in dataset_ids:
            raise KeyError(
                f"predicted class {cls} of image {image_id} has no dataset category id (the "
                f"dataset maps {len(dataset_ids)} classes; does MODEL.ROI_HEADS.NUM_CLASSES match?)"
            )
        record["category_id"] = dataset_ids[cls]
    if instances.has("mask_scores"):
        for record, score in zip(records, instances.mask_scores.tolist()):
            record[SEGM_SCORE] = score
    return records


def cap_per_image(
    records: Sequence[dict], max_dets: int, score: Callable[[dict], float] = box_score
) -> list[dict]:
    """The ``max_dets`` highest-scoring records of each image (all if ``max_dets`` < 0), in
    their original order. Ties keep the earlier record, like lvis-api's ``LVISResults``."""
    if max_dets < 0:
        return list(records)
    by_image = defaultdict(list)
    for i, record in enumerate(records):
        by_image[record["image_id"]].append(i)
    keep = []
    for indices in by_image.values():
        if len(indices) > max_dets:
            indices = sorted(indices, key=lambda i: score(records[i]), reverse=True)[:max_dets]
        keep.extend(indices)
    return [records[i] for i in sorted(keep)]


def records_for_export(records: Sequence[dict], max_dets: int) -> list[dict]:
    """Records as the results file holds them: the documented fields only, ``score`` = the
    segm score where there is one, at most ``max_dets`` per image by that score."""
    out = []
    for record in cap_per_image(records, max_dets, segm_score):
        exported = {k: record[k] for k in EXPORT_FIELDS if k in record}
        exported["score"] = segm_score(record)
        out.append(exported)
    return out


def records_for_task(records: Sequence[dict], task: str, max_dets: int) -> list[dict]:
    """New records for evaluating ``task`` with lvis-api, ranked and capped by its score.

    bbox records keep a ``segmentation`` where there is one (shared, not copied; lvis-api
    would otherwise make a polygon of each box). segm records have no ``bbox``, so lvis-api
    takes the mask area for the small/medium/large ranges (detectron2's convention; with a
    bbox it takes the box area).
    """
    if task not in ("bbox", "segm"):
        raise ValueError(f"unknown LVIS task {task!r}; expected 'bbox' or 'segm'")
    fields, score = (("bbox", "segmentation"), box_score)
    if task == "segm":
        fields, score = ("segmentation",), segm_score
    out = []
    for r in cap_per_image(records, max_dets, score):
        record = {"image_id": r["image_id"], "category_id": r["category_id"], "score": score(r)}
        record.update((k, r[k]) for k in fields if k in r)
        out.append(record)
    return out


def record_json(image_id, category_id, score, bbox, size=None, counts=None) -> str:
    """One record as compact JSON, byte-identical to ``json.dumps(record, separators=(",",
    ":"))`` with the keys in :data:`EXPORT_FIELDS` order (finite numbers only)."""
    box = ",".join(map(repr, bbox))
    text = f'{{"image_id":{image_id},"category_id":{category_id},"score":{score!r},"bbox":[{box}]'
    if counts is None:
        return text + "}"
    return (
        f'{text},"segmentation":{{"size":[{size[0]},{size[1]}],'
        f'"counts":{encode_basestring_ascii(counts)}}}}}'
    )


class JsonListWriter:
    """Writes a JSON list item by item to a temporary file, moved to ``path`` on success
    (:func:`write_json_atomic`'s guarantee for streamed output)."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = temp_path(path)
        self._file: Optional[object] = None
        self._first = True

    def __enter__(self):
        self._file = open(self.tmp, "x", buffering=1 << 20)
        self._file.write("[")
        return self

    def write(self, items_json: Sequence[str]) -> None:
        if not items_json:
            return
        self._file.write(("" if self._first else ",") + ",".join(items_json))
        self._first = False

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._file.write("]")
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
        return False
