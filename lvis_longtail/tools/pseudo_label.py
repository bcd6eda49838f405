"""Pseudo labels for the unannotated objects of a dataset (round 2 of self-training).

    python -m lvis_longtail.tools.pseudo_label --config-file F --dataset NAME --output FILE \
        [MODEL.WEIGHTS W ...]

Runs the model on every image of ``NAME`` (detectron2's test loader, one batch at a time)
and keeps a detection when (all vectorised, per image):

* its score >= ``--score-thresh`` (default 0.5);
* its max IoU to every GT box of the image is < ``--gt-iou-thresh`` (default 0.5): an
  annotated object is not pseudo-labelled;
* its category is not in the image's ``neg_category_ids`` (verified absent in LVIS).

The kept detections are written as the ``annotations`` of an LVIS-format file (the images
and categories of ``NAME``; ``bbox``, RLE ``segmentation`` when the model predicts masks,
``score``), atomically, with ``FILE.summary.json``: kept counts per frequency group (r, c, f).
Memory is bounded by one batch of detections: each image's annotations are appended to a
temporary file
as soon as they are made. Use the file as ``DATASETS.IGNORE_BOXES [[train_set, FILE]]``
(:mod:`lvis_longtail.data.ignore_boxes`) to retrain with ignore regions. Single process.
"""

import argparse
import json
import os
import shutil
from collections import Counter
from typing import Dict, Iterable, List, Mapping

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.structures import Boxes, BoxMode, Instances, pairwise_iou

from lvis_longtail.evaluation import instances_to_lvis_records
from lvis_longtail.utils.io import atomic_write, temp_path, write_json_atomic

__all__ = ["keep_pseudo_labels", "main", "write_pseudo_labels"]


def keep_pseudo_labels(
    instances: Instances,
    gt_boxes: Boxes,
    neg_classes: torch.Tensor,
    score_thresh: float,
    gt_iou_thresh: float,
) -> torch.Tensor:
    """(N,) bool: which of an image's N predictions become pseudo labels (module docstring).

    Args:
        instances: predictions with ``pred_boxes``, ``scores``, ``pred_classes`` (contiguous).
        gt_boxes: (G, 4) GT boxes of the image, same coordinates.
        neg_classes: (n,) contiguous ids of the image's verified negative categories.
        score_thresh: minimum score.
        gt_iou_thresh: a prediction with IoU >= this to a GT box is dropped.
    """
    keep = instances.scores >= score_thresh
    if len(gt_boxes) and len(instances):
        iou = pairwise_iou(gt_boxes.to(instances.scores.device), instances.pred_boxes)
        keep &= iou.amax(dim=0) < gt_iou_thresh
    if neg_classes.numel():
        keep &= ~torch.isin(instances.pred_classes, neg_classes.to(instances.pred_classes))
    return keep


def _gt_boxes(record: dict) -> Boxes:
    boxes = [
        BoxMode.convert(a["bbox"], a.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
        for a in record.get("annotations", [])
    ]
    return Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))


def write_pseudo_labels(
    model,
    loader: Iterable[List[dict]],
    records: List[dict],
    dataset_meta,
    output: str,
    score_thresh: float = 0.5,
    gt_iou_thresh: float = 0.5,
) -> Dict:
    """Run ``model`` over ``loader`` and write the LVIS-format pseudo-label file ``output``.

    Args:
        model: callable on a list of detectron2 inputs -> list of ``{"instances": ...}``.
        loader: batches of inputs with ``image_id``.
        records: the dataset's dicts (GT ``annotations``, dataset-id ``neg_category_ids``).
        dataset_meta: metadata with ``thing_dataset_id_to_contiguous_id`` and
            ``class_frequency`` (per contiguous class); ``json_file`` when registered from
            an LVIS-format json (its ``images`` / ``categories`` are copied).
        output: path of the file; ``output + ".summary.json"`` gets the summary.

    Returns:
        The summary: ``{"images", "pseudo_labels", "per_frequency": {"r", "c", "f"}}``.
    """
    to_contiguous: Mapping[int, int] = dataset_meta.thing_dataset_id_to_contiguous_id
    to_dataset = {v: k for k, v in to_contiguous.items()}
    by_id = {r["image_id"]: r for r in records}
    frequency = list(dataset_meta.class_frequency)
    per_group, num_images, ann_id = Counter(), 0, 0
    anns_path = temp_path(output + ".annotations")  # the annotation list, streamed
    try:
        with torch.no_grad(), open(anns_path, "x", buffering=1 << 20) as anns:
            anns.write("[")
            for inputs in loader:
                for inp, out in zip(inputs, model(inputs)):
                    record = by_id[inp["image_id"]]
                    inst = out["instances"].to("cpu")
                    neg = [to_contiguous[c] for c in record.get("neg_category_ids", [])]
                    keep = keep_pseudo_labels(
                        inst, _gt_boxes(record), torch.tensor(neg, dtype=torch.long),
                        score_thresh, gt_iou_thresh,
                    )  # fmt: skip
                    for r in instances_to_lvis_records(
                        inst[keep], inp["image_id"], to_dataset, -1
                    ):
                        r.update(id=ann_id + 1, area=float(r["bbox"][2] * r["bbox"][3]))
                        r.setdefault("segmentation", [])
                        per_group[frequency[to_contiguous[r["category_id"]]]] += 1
                        anns.write(("," if ann_id else "") + json.dumps(r, separators=(",", ":")))
                        ann_id += 1
                    num_images += 1
            anns.write("]")
        source = getattr(dataset_meta, "json_file", None)
        images, categories = _images_and_categories(source, records, dataset_meta)
        with atomic_write(output) as f, open(anns_path) as anns:
            f.write(json.dumps({"images": images, "categories": categories})[:-1])
            f.write(',"annotations":')
            shutil.copyfileobj(anns, f)
            f.write("}")
    finally:
        if os.path.exists(anns_path):
            os.remove(anns_path)
    summary = {
        "images": num_images,
        "pseudo_labels": ann_id,
        "per_frequency": {g: per_group.get(g, 0) for g in ("r", "c", "f")},
        "score_thresh": score_thresh,
        "gt_iou_thresh": gt_iou_thresh,
    }
    write_json_atomic(summary, output + ".summary.json")
    return summary


def _images_and_categories(json_file, records, meta):
    """The source json's ``images`` and ``categories``, or minimal ones from the records."""
    if json_file and os.path.isfile(json_file):
        with open(json_file) as f:
            data = json.load(f)
        return data["images"], data["categories"]
    images = [
        {"id": r["image_id"], "height": r["height"], "width": r["width"],
         "file_name": os.path.basename(r["file_name"])}
        for r in records
    ]  # fmt: skip
    names = meta.thing_classes
    ids = sorted(meta.thing_dataset_id_to_contiguous_id.items(), key=lambda kv: kv[1])
    return images, [{"id": d, "name": names[c]} for d, c in ids]


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--dataset", required=True, help="registered dataset to pseudo-label")
    parser.add_argument("--output", required=True, help="LVIS-format json to write")
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("--gt-iou-thresh", type=float, default=0.5)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from lvis_longtail.config import setup_cfg

    cfg = setup_cfg(args.config_file, args.opts)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    records = DatasetCatalog.get(args.dataset)
    loader = build_detection_test_loader(cfg, args.dataset)
    summary = write_pseudo_labels(
        model, loader, records, MetadataCatalog.get(args.dataset), args.output,
        args.score_thresh, args.gt_iou_thresh,
    )  # fmt: skip
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
