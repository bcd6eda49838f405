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
``score``, ``area``), atomically, with ``FILE.summary.json``: kept counts per frequency group
(r, c, f). ``--num-gpus N`` runs N processes (GPUs, or gloo CPU processes with
``MODEL.DEVICE cpu``); each streams its images' pseudo labels to its own shard on disk
(:class:`~lvis_longtail.evaluation.shards.ShardedDetections`, as the evaluator does) and the
main process writes the file from the shards chunk by chunk, so memory does not grow with the
number of images. ``TEST.AUG.ENABLED`` runs the model under test-time augmentation
(:class:`~lvis_longtail.modeling.tta.LongTailTTA`). Use the file as ``DATASETS.IGNORE_BOXES
[[train_set, FILE]]`` (:mod:`lvis_longtail.data.ignore_boxes`) to retrain with ignore
regions, or, for unannotated images, register it as a dataset and train on it as
``DATASETS.EXTRA_TRAIN`` (docs/self_training.md).

A model without masks (``MODEL.MASK_ON False``) writes box-only labels (``"segmentation":
[]``): enough for ignore boxes, but a dataset loader drops every such annotation, so the run
warns, and with ``--as-training-set`` (the file is meant to be trained on) it refuses to start.
"""

import argparse
import json
import logging
import os
from collections import Counter
from typing import Dict, Iterable, List, Mapping, Optional

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances, pairwise_iou

from lvis_longtail.evaluation.shards import ShardedDetections, first_entries, iter_chunks
from lvis_longtail.utils.io import atomic_write, write_json_atomic

__all__ = ["keep_pseudo_labels", "main", "write_pseudo_labels"]

logger = logging.getLogger(__name__)


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
) -> Optional[Dict]:
    """Run ``model`` over ``loader`` (this process's share of the images) and write the
    LVIS-format pseudo-label file ``output`` on the main process.

    Args:
        model: callable on a list of detectron2 inputs -> list of ``{"instances": ...}``.
        loader: batches of inputs with ``image_id``.
        records: the dataset's dicts (GT ``annotations``, dataset-id ``neg_category_ids``).
        dataset_meta: metadata with ``thing_dataset_id_to_contiguous_id`` and
            ``class_frequency`` (per contiguous class); ``json_file`` when registered from
            an LVIS-format json (its ``images`` / ``categories`` are copied).
        output: path of the file; ``output + ".summary.json"`` gets the summary.

    Returns:
        On the main process the summary ``{"images", "pseudo_labels", "per_frequency":
        {"r", "c", "f"}, "box_only", ...}`` (``box_only``: labels written without a mask,
        with a warning); None on the others.
    """
    to_contiguous: Mapping[int, int] = dataset_meta.thing_dataset_id_to_contiguous_id
    to_dataset = {v: k for k, v in to_contiguous.items()}
    by_id = {r["image_id"]: r for r in records}
    folder = os.path.join(os.path.dirname(os.path.abspath(output)), ".pseudo_label_shards")
    stream = ShardedDetections(folder, os.path.basename(output))
    with torch.no_grad():
        for inputs in loader:
            for inp, out in zip(inputs, model(inputs)):
                record = by_id[inp["image_id"]]
                inst = out["instances"].to("cpu")
                neg = [to_contiguous[c] for c in record.get("neg_category_ids", [])]
                keep = keep_pseudo_labels(
                    inst, _gt_boxes(record), torch.tensor(neg, dtype=torch.long),
                    score_thresh, gt_iou_thresh,
                )  # fmt: skip
                stream.shard.add_instances(inp["image_id"], inst[keep], to_dataset)
    paths = stream.gather()
    if paths is None:
        return None
    try:
        source = getattr(dataset_meta, "json_file", None)
        images, categories = _images_and_categories(source, records, dataset_meta)
        lookup = np.full(max(to_contiguous, default=0) + 1, "", dtype="<U1")
        lookup[list(to_contiguous)] = [dataset_meta.class_frequency[c] for c in to_contiguous.values()]  # fmt: skip  # noqa: E501
        per_group, num_labels, box_only = Counter(), 0, 0
        with atomic_write(output, buffering=1 << 20) as f:
            f.write(json.dumps({"images": images, "categories": categories})[:-1])
            f.write(',"annotations":[')
            seen = set()
            for path in paths:
                for chunk in iter_chunks(path, with_blob=True):
                    rows = chunk.rows[np.isin(chunk.rows["entry"], first_entries(chunk, seen))]
                    text = _annotations_json(rows, chunk, num_labels)
                    if text:
                        f.write(("," if num_labels else "") + text)
                    num_labels += len(rows)
                    box_only += int((rows["counts_start"] < 0).sum())
                    per_group.update(lookup[rows["category_id"]].tolist())
            f.write("]}")
        num_images = len(seen)
    finally:
        stream.discard(paths)
    summary = {
        "images": num_images,
        "pseudo_labels": num_labels,
        "per_frequency": {g: per_group.get(g, 0) for g in ("r", "c", "f")},
        "box_only": box_only,
        "score_thresh": score_thresh,
        "gt_iou_thresh": gt_iou_thresh,
    }
    write_json_atomic(summary, output + ".summary.json")
    if box_only:
        logger.warning(
            f"{output}: {box_only} of {num_labels} pseudo labels have no mask (the model "
            "predicts none) and are written with 'segmentation': []. They serve as "
            "DATASETS.IGNORE_BOXES; trained on as a dataset (DATASETS.EXTRA_TRAIN) they are "
            "all dropped by the loader (no valid polygon): pseudo-label with a mask model."
        )
    return summary


def _check_masks(cfg, args) -> None:
    """``--as-training-set``: refuse a model that predicts no masks (module docstring)."""
    if args.as_training_set and not cfg.MODEL.MASK_ON:
        from lvis_longtail.config import ConfigError

        raise ConfigError(
            f"{args.config_file}: MODEL.MASK_ON is False, so every pseudo label would be "
            "box-only ('segmentation': []), which a dataset loader drops; --as-training-set "
            "needs a model with masks (leave the flag out for a file of ignore boxes)"
        )


def _annotations_json(rows: np.ndarray, chunk, first_id: int) -> str:
    """The LVIS annotations of shard ``rows`` (ids from ``first_id + 1``), comma-separated."""
    items = []
    for k, row in enumerate(rows):
        box = row["bbox"].tolist()
        ann = {"id": first_id + k + 1, "image_id": int(row["image_id"]),
               "category_id": int(row["category_id"]), "bbox": box, "score": float(row["score"])}  # fmt: skip  # noqa: E501
        if row["counts_start"] >= 0:
            start = int(row["counts_start"]) - chunk.blob_offset
            counts = chunk.blob[start : start + int(row["counts_len"])].decode("ascii")
            ann["segmentation"] = {"size": [int(row["height"]), int(row["width"])], "counts": counts}  # fmt: skip  # noqa: E501
            ann["area"] = float(row["mask_area"])
        else:
            ann["segmentation"] = []
            ann["area"] = float(box[2] * box[3])
        items.append(json.dumps(ann, separators=(",", ":")))
    return ",".join(items)


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


def _run(args) -> Optional[Dict]:
    from detectron2.modeling import build_model

    from lvis_longtail.data.loader import build_longtail_test_loader
    from lvis_longtail.engine import setup_cfg
    from lvis_longtail.engine.checkpoint import LongTailCheckpointer
    from lvis_longtail.engine.launch import configure_cpu_threads

    cfg = setup_cfg(args.config_file, args.opts)
    _check_masks(cfg, args)
    configure_cpu_threads(cfg, args.num_gpus)
    model = build_model(cfg)
    LongTailCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    model.eval()
    if cfg.TEST.AUG.ENABLED:
        from lvis_longtail.modeling.tta import LongTailTTA

        model = LongTailTTA(cfg, model)
    records = DatasetCatalog.get(args.dataset)
    loader = build_longtail_test_loader(cfg, args.dataset)  # InferenceSampler: a share per rank
    summary = write_pseudo_labels(
        model, loader, records, MetadataCatalog.get(args.dataset), args.output,
        args.score_thresh, args.gt_iou_thresh,
    )  # fmt: skip
    if summary is not None:
        print(json.dumps(summary), flush=True)
    return summary


def main(argv=None) -> Optional[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--dataset", required=True, help="registered dataset to pseudo-label")
    parser.add_argument("--output", required=True, help="LVIS-format json to write")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="in [0, 1]")
    parser.add_argument("--gt-iou-thresh", type=float, default=0.5, help="in [0, 1]")
    parser.add_argument("--as-training-set", action="store_true",
                        help="the file will be trained on as a dataset (DATASETS.EXTRA_TRAIN): "
                        "refuse a model without masks, whose labels would be box-only")  # fmt: skip
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="auto")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    for flag in ("--score-thresh", "--gt-iou-thresh"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if not 0.0 <= value <= 1.0:  # NaN too
            parser.error(f"{flag} must be in [0, 1], got {value}")
    if args.num_gpus * args.num_machines == 1:
        return _run(args)

    from lvis_longtail.engine import setup_cfg
    from lvis_longtail.engine.launch import launch

    cfg = setup_cfg(args.config_file, args.opts)
    _check_masks(cfg, args)  # before any process starts
    device = cfg.MODEL.DEVICE
    launch(
        _run, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
        dist_url=args.dist_url, args=(args,), backend="gloo" if device == "cpu" else "nccl",
    )  # fmt: skip
    return None


if __name__ == "__main__":
    main()
