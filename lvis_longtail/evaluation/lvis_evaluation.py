"""Evaluate LVIS results in one call, with lvis-api's numbers, by either evaluator.

- ``fast`` (:mod:`.fast_eval`): lvis-api's rules and numbers, several times faster, in less
  memory; takes records, a results file or a :class:`~.detections.DetectionTable`;
- ``lvis_api``: lvis-api 0.5.3 itself (``LVISResults`` + ``LVISEval``), for cross-checks.

Both take the same protocol arguments: the per-image cap ``max_dets`` (LVIS standard 300) and,
for Fixed AP, ``dets_per_class`` (10,000) with ``max_dets=-1``. Reported metrics are lvis-api's
(AP, AP50, AP75, APs/m/l, APr/c/f, AR@300, ARs/m/l@300) times 100; lvis-api answers -1 where a
metric is undefined (no ground truth in that group or area range), which stays -1 here, never
NaN, so ``lvis_metrics.json`` is strict JSON. The dataset evaluator built on these is
:class:`~.evaluator.LVISLongTailEvaluator`.
"""

import json
import logging
import os
import time
from typing import Optional, Sequence, Union

import lvis.lvis
import lvis.results
import numpy as np
from detectron2.utils.file_io import PathManager
from lvis import LVIS, LVISEval, LVISResults

from lvis_longtail.evaluation.detections import DetectionTable, gc_paused, top_k_per_class
from lvis_longtail.evaluation.export import records_for_task
from lvis_longtail.evaluation.fast_eval import (
    LVISEvalResult,
    LVISGroundTruth,
    evaluate_detections,
    metric_names,
)

logger = logging.getLogger(__name__)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
METRICS_FILE = "lvis_metrics.json"
TASKS = ("bbox", "segm")
EVALUATORS = ("fast", "lvis_api")


class LoadedLVIS(LVIS):
    """lvis-api's ``LVIS``, also built from an already loaded json dict (``LVIS`` takes a path).

    The dict is used as is, not copied, and must have an ``"annotations"`` list.
    """

    def _load_json(self, path_or_dataset):
        if isinstance(path_or_dataset, dict):
            return path_or_dataset
        return super()._load_json(path_or_dataset)


class _EmptyLVISResults(LVISResults):
    """``LVISResults`` without detections: lvis-api's constructor reads ``results[0]``."""

    def __init__(self, lvis_gt: LVIS):
        self.logger = logging.getLogger(lvis.results.__name__)
        self.dataset = {**_images_and_categories(lvis_gt.dataset), "annotations": []}
        self._create_index()


def _images_and_categories(dataset: dict) -> dict:
    return {"images": dataset["images"], "categories": dataset["categories"]}


def as_lvis_gt(gt) -> LVIS:
    """An lvis-api ``LVIS`` from an ``LVIS`` (as is), a json dict, a path or an
    :class:`LVISGroundTruth`."""
    if isinstance(gt, LVIS):
        return gt
    return LoadedLVIS(gt.dataset if isinstance(gt, LVISGroundTruth) else gt)


def as_ground_truth(gt) -> LVISGroundTruth:
    """An :class:`LVISGroundTruth` from one, an lvis-api ``LVIS``, a json dict or a path."""
    if isinstance(gt, LVISGroundTruth):
        return gt
    if isinstance(gt, (str, os.PathLike)):
        gt = load_split_json(os.fspath(gt))
    return LVISGroundTruth(getattr(gt, "dataset", gt))


def _percent(value) -> float:
    return float(value) * 100 if value >= 0 else -1.0


def _as_records(results) -> list:
    if isinstance(results, (str, os.PathLike)):
        with open(results) as f:
            return json.load(f)
    return results


def run_lvis_eval(
    gt,
    results: Union[Sequence[dict], str, os.PathLike, DetectionTable],
    iou_type: str,
    max_dets: int = 300,
    *,
    dets_per_class: int = -1,
    evaluator: str = "fast",
) -> LVISEvalResult:
    """Evaluate LVIS results for one task; see :func:`evaluate_lvis_results`.

    Returns:
        An :class:`~.fast_eval.LVISEvalResult` (metrics as fractions, precision/recall
        arrays), whichever the evaluator.
    """
    if evaluator not in EVALUATORS:
        raise ValueError(f"unknown LVIS evaluator {evaluator!r}; expected one of {EVALUATORS}")
    if iou_type not in TASKS:
        raise ValueError(f"unknown LVIS task {iou_type!r}; expected 'bbox' or 'segm'")
    if isinstance(results, DetectionTable):
        if evaluator != "fast":
            raise ValueError("a DetectionTable can only be evaluated with evaluator='fast'")
        table, records = results, None
    else:
        records = _as_records(results)
        table = DetectionTable.from_records(records)
    if dets_per_class > 0:  # Fixed AP: the best dets_per_class of each class, results order
        keep = top_k_per_class(table.category_id, table.task_score(iou_type), dets_per_class)
        table = table.take(keep)
        if records is not None:
            records = [records[i] for i in np.flatnonzero(keep).tolist()]
    if evaluator == "fast":
        return evaluate_detections(as_ground_truth(gt), table, iou_type, max_dets)
    return _run_lvis_api(as_lvis_gt(gt), records, iou_type, max_dets)


def _run_lvis_api(lvis_gt: LVIS, records: list, iou_type: str, max_dets: int) -> LVISEvalResult:
    # fresh records: LVISResults adds "area" and "id" to each; segm ones have no bbox
    records = records_for_task(records, iou_type, max_dets)
    if records:
        # LVISResults deep-copies the dataset it is given: only images and categories
        lvis_dt = LVISResults(
            LoadedLVIS({**_images_and_categories(lvis_gt.dataset), "annotations": []}),
            records,
            max_dets=max_dets,
        )
    else:
        logger.warning(f"No {iou_type} detections: every AP with ground truth is 0.")
        lvis_dt = _EmptyLVISResults(lvis_gt)
    lvis_eval = LVISEval(lvis_gt, lvis_dt, iou_type)
    lvis_eval.params.max_dets = max_dets  # reported in AR@<max_dets>; the cap is LVISResults'
    lvis_eval.run()
    metrics = lvis_eval.get_results()
    num_dets = np.zeros(len(lvis_eval.params.cat_ids), dtype=np.int64)
    index = {c: k for k, c in enumerate(lvis_eval.params.cat_ids)}
    for (_, cat), dts in lvis_eval._dts.items():
        num_dets[index[cat]] += len(dts)
    return LVISEvalResult(
        metrics=type(metrics)((k, float(v)) for k, v in metrics.items()),
        precision=lvis_eval.eval["precision"],
        recall=lvis_eval.eval["recall"],
        cat_ids=np.asarray(lvis_eval.params.cat_ids, dtype=np.int64),
        num_detections=num_dets,
    )


def evaluate_lvis_results(
    gt,
    results: Union[Sequence[dict], str, os.PathLike, DetectionTable],
    iou_type: str,
    max_dets: int = 300,
    *,
    dets_per_class: int = -1,
    evaluator: str = "fast",
) -> dict:
    """Evaluate LVIS results for one task, with lvis-api's numbers.

    Args:
        gt: the split with annotations: its json dict, its path, an lvis-api ``LVIS`` or an
            :class:`~.fast_eval.LVISGroundTruth` (reuse one across tasks and calls).
        results: LVIS records, a results json path (not validated: see
            :func:`~.validation.load_lvis_results`) or a :class:`~.detections.DetectionTable`.
            Ranked by ``score``, for segm by ``segm_score`` where a record has one; segm uses
            the mask area for APs/APm/APl. Empty results give AP 0, no error.
        iou_type: "bbox" or "segm".
        max_dets: per-image cap (LVIS standard 300; -1 = none, as Fixed AP).
        dets_per_class: > 0 keeps only that many best detections per class over the split
            first (Fixed AP: 10,000 with ``max_dets=-1``); equal scores keep the earlier one.
        evaluator: "fast" (:mod:`.fast_eval`) or "lvis_api" (lvis-api 0.5.3 itself).

    Returns:
        lvis-api's metrics (:func:`~.fast_eval.metric_names`) in percent; -1 where undefined.
    """
    result = run_lvis_eval(
        gt, results, iou_type, max_dets, dets_per_class=dets_per_class, evaluator=evaluator
    )
    return {m: _percent(v) for m, v in result.metrics.items()}


def load_split_json(json_file: str) -> dict:
    """The split's LVIS json as a dict (``images``, ``categories``, maybe ``annotations``)."""
    start = time.perf_counter()
    with PathManager.open(json_file) as f, gc_paused():
        dataset = json.load(f)
    logger.info(f"Loaded {json_file} in {time.perf_counter() - start:.1f} s.")
    return dataset


def fill_frequencies(dataset: dict, class_frequency: Optional[Sequence[str]], dataset_ids) -> None:
    """Make every category of ``dataset`` carry ``frequency`` (APr/APc/APf need it).

    The json's own ``frequency`` wins, as in lvis-api and the LVIS server; the metadata's
    ``class_frequency`` (per contiguous id) fills categories without one, and disagreements
    are logged. Raises ValueError if a category has neither.
    """
    meta = {}
    if class_frequency is not None:
        meta = {dataset_ids[k]: f for k, f in enumerate(class_frequency) if k in dataset_ids}
    missing, disagree = [], 0
    for cat in dataset["categories"]:
        if "frequency" in cat:
            disagree += cat["id"] in meta and meta[cat["id"]] != cat["frequency"]
        elif cat["id"] in meta:
            cat["frequency"] = meta[cat["id"]]
        else:
            missing.append(cat["id"])
    if disagree:
        logger.warning(
            f"Metadata class_frequency disagrees with the json's 'frequency' for {disagree} "
            "categories; APr/APc/APf follow the json (as lvis-api does)."
        )
    if missing:
        raise ValueError(
            f"categories {missing[:10]}{'...' if len(missing) > 10 else ''} have no 'frequency' "
            "in the json and no class_frequency in the dataset metadata; APr/APc/APf need one"
        )


__all__ = [
    "EVALUATORS",
    "METRICS",
    "TASKS",
    "evaluate_lvis_results",
    "metric_names",
    "run_lvis_eval",
]
