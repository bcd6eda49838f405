"""Evaluate LVIS results in one call, with lvis-api's numbers, by either evaluator.

- ``fast`` (:mod:`.fast_eval`): lvis-api's rules and numbers, several times faster, in less
  memory; takes records, a results file or a :class:`~.table.DetectionTable`;
- ``lvis_api``: lvis-api 0.5.3 itself (``LVISResults`` + ``LVISEval``), for cross-checks.

Tasks: ``bbox``, ``segm`` and ``boundary`` (Boundary AP, :mod:`.boundary`: lvis-api 0.5.3 has
none, so only the fast evaluator computes it, with the numbers of lvis-api's
``lvis_challenge_2021`` branch).

Both take the same protocol arguments: the per-image cap ``max_dets`` (LVIS standard 300) and,
for Fixed AP, ``dets_per_class`` (10,000) with ``max_dets=-1``. Reported metrics are lvis-api's
(AP, AP50, AP75, APs/m/l, APr/c/f, AR@300, ARs/m/l@300) times 100; lvis-api answers -1 where a
metric is undefined (no ground truth in that group or area range), which stays -1 here, never
NaN, so ``lvis_metrics.json`` is strict JSON. The dataset evaluator built on these is
:class:`~.evaluator.LVISLongTailEvaluator`.
"""

import logging
import os
from collections import Counter
from typing import Mapping, Optional, Sequence, Tuple, Union

import lvis.lvis
import lvis.results
import numpy as np
from lvis import LVIS, LVISEval, LVISResults

from lvis_longtail.config_check import ENUMS, LVIS_TASKS, check_task_evaluator
from lvis_longtail.data.lvis_json import ValidatedLVIS, load_validated, validate_lvis_dict
from lvis_longtail.evaluation.boundary import DILATION_RATIO
from lvis_longtail.evaluation.fast_eval import LVISEvalResult, evaluate_detections, metric_names
from lvis_longtail.evaluation.ground_truth import LVISGroundTruth, check_frequencies
from lvis_longtail.evaluation.record_checks import load_lvis_results, records_table
from lvis_longtail.evaluation.results import records_for_task
from lvis_longtail.evaluation.table import DetectionTable, top_k_per_class

logger = logging.getLogger(__name__)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
METRICS_FILE = "lvis_metrics.json"
TASKS = LVIS_TASKS
DEFAULT_TASKS = ("bbox", "segm")
EVALUATORS = ENUMS["TEST.LVIS_EVALUATOR"]


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
    """An lvis-api ``LVIS`` from an ``LVIS`` (as is), a :class:`ValidatedLVIS`, an
    :class:`LVISGroundTruth`, a json dict (validated first) or a path (validated); built
    from the validated dict, so lvis-api never re-reads the file."""
    if isinstance(gt, LVIS):
        return gt
    dataset = validated_dataset(gt)
    # LVISEval writes RLEs into the annotations it evaluates: shallow copies keep a validated
    # dataset that other readers may share (training dicts, metadata) untouched
    anns = [dict(a) for a in dataset.get("annotations", [])]
    return LoadedLVIS(dict(dataset, annotations=anns))


def as_ground_truth(gt) -> LVISGroundTruth:
    """An :class:`LVISGroundTruth` from one, an lvis-api ``LVIS``, a :class:`ValidatedLVIS`,
    a json dict (validated first) or a path (validated)."""
    if isinstance(gt, LVISGroundTruth):
        return gt
    if isinstance(gt, LVIS):
        return LVISGroundTruth(gt.dataset)
    return LVISGroundTruth(validated_dataset(gt))


def validated_dataset(gt) -> dict:
    """The validated LVIS dict of a path, a :class:`ValidatedLVIS`, an
    :class:`LVISGroundTruth` (as is) or a raw json dict (validated in place)."""
    if isinstance(gt, ValidatedLVIS):
        return gt.dataset
    if isinstance(gt, LVISGroundTruth):
        return gt.dataset
    if isinstance(gt, (str, os.PathLike)):
        return load_split_json(os.fspath(gt))
    if isinstance(gt, dict):
        return validate_lvis_dict(gt, "ground-truth dict").dataset
    raise TypeError(f"ground truth must be a path, a dict or an LVIS object, not {type(gt)}")


def _percent(value) -> float:
    return float(value) * 100 if value >= 0 else -1.0


def run_lvis_eval(
    gt,
    results: Union[Sequence[dict], str, os.PathLike, DetectionTable],
    iou_type: str,
    max_dets: int = 300,
    *,
    dets_per_class: int = -1,
    evaluator: str = "fast",
    dilation_ratio: float = DILATION_RATIO,
) -> LVISEvalResult:
    """Evaluate LVIS results for one task; see :func:`evaluate_lvis_results`.

    Returns:
        An :class:`~.fast_eval.LVISEvalResult` (metrics as fractions, precision/recall
        arrays), whichever the evaluator.
    """
    if evaluator not in EVALUATORS:
        raise ValueError(f"unknown LVIS evaluator {evaluator!r}; expected one of {EVALUATORS}")
    if iou_type not in TASKS:
        raise ValueError(f"unknown LVIS task {iou_type!r}; expected one of {TASKS}")
    check_task_evaluator(iou_type, evaluator)
    gt = as_ground_truth(gt) if evaluator == "fast" else as_lvis_gt(gt)
    check_frequencies(gt.dataset["categories"])
    required = ("bbox",) if iou_type == "bbox" else ("segmentation",)
    records = None
    if isinstance(results, DetectionTable):
        if evaluator != "fast":
            raise ValueError("a DetectionTable can only be evaluated with evaluator='fast'")
        table = results
    elif isinstance(results, (str, os.PathLike)):  # checked, the file named in messages
        fast = evaluator == "fast"
        loaded = load_lvis_results(os.fspath(results), gt, required=required, as_table=fast)
        records = None if fast else loaded
        table = loaded if fast else DetectionTable.from_records(loaded)
    else:
        records = list(results)
        table = records_table(records, gt, required=required)
    if dets_per_class > 0:  # Fixed AP: the best dets_per_class of each class, results order
        keep = top_k_per_class(table.category_id, table.task_score(iou_type), dets_per_class)
        table = table.take(keep)
        if records is not None:
            records = [records[i] for i in np.flatnonzero(keep).tolist()]
    if evaluator == "fast":
        return evaluate_detections(gt, table, iou_type, max_dets, dilation_ratio)
    return _run_lvis_api(gt, records, iou_type, max_dets)


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
    dilation_ratio: float = DILATION_RATIO,
) -> dict:
    """Evaluate LVIS results for one task, with lvis-api's numbers.

    The LVIS Challenge 2021's Boundary AP of a results file (e.g. the evaluator's
    ``lvis_instances_results.json``): ``evaluate_lvis_results(gt, path, "boundary",
    max_dets=-1, dets_per_class=10000)``.

    Args:
        gt: the split with annotations: its path (validated), a
            :class:`~lvis_longtail.data.lvis_json.ValidatedLVIS`, a json dict (validated), an
            lvis-api ``LVIS`` or an :class:`~.ground_truth.LVISGroundTruth` (reuse one across
            tasks and calls).
        results: LVIS records or a results json path (both checked against the split first,
            :func:`~.validation.load_lvis_results`' messages) or a
            :class:`~.table.DetectionTable` (trusted: made by this package).
            Ranked by ``score``, for segm by ``segm_score`` where a record has one; segm uses
            the mask area for APs/APm/APl. Empty results give AP 0, no error.
        iou_type: "bbox", "segm" or "boundary" (fast evaluator only).
        max_dets: per-image cap (LVIS standard 300; -1 = none, as Fixed AP).
        dets_per_class: > 0 keeps only that many best detections per class over the split
            first (Fixed AP: 10,000 with ``max_dets=-1``); equal scores keep the earlier one.
        evaluator: "fast" (:mod:`.fast_eval`) or "lvis_api" (lvis-api 0.5.3 itself).
        dilation_ratio: Boundary AP's erosion radius over the image diagonal (0.02).

    Returns:
        lvis-api's metrics (:func:`~.fast_eval.metric_names`) in percent; -1 where undefined.
    """
    result = run_lvis_eval(
        gt,
        results,
        iou_type,
        max_dets,
        dets_per_class=dets_per_class,
        evaluator=evaluator,
        dilation_ratio=dilation_ratio,
    )
    return {m: _percent(v) for m, v in result.metrics.items()}


def load_split_json(json_file: str) -> dict:
    """The split's validated LVIS-format dict (``images``, ``categories``, maybe
    ``annotations``): :func:`~lvis_longtail.data.lvis_json.load_validated`'s, which a
    ``shared_reads`` block shares with the training dicts and the metadata; callers must not
    modify it."""
    return load_validated(json_file).dataset


def resolve_frequencies(
    dataset: dict,
    dataset_ids: Mapping[int, int],
    train_frequency: Optional[Sequence[str]] = None,
    train_source: str = "the training split",
    split_frequency: Optional[Sequence[str]] = None,
    split_name: str = "the evaluated split",
) -> Tuple[dict, str]:
    """The split with every category's LVIS frequency group (what APr/APc/APf use).

    Groups come from the training set: the json's own ``frequency`` (LVIS's fields, counted
    on LVIS train) wins; categories without one take ``train_frequency`` (the training
    dataset's metadata: its json's fields or a recount of its annotations); only when no
    training split is known, ``split_frequency`` (a recount of the evaluated split), which
    is logged as a warning. ``dataset`` is not modified (its categories are copied).

    Args:
        dataset: the split's validated LVIS dict.
        dataset_ids: contiguous class id -> dataset category id.
        train_frequency, split_frequency: groups per contiguous class id, or None.
        train_source, split_name: what they are, for the log and the returned source.

    Returns:
        (the dataset with filled categories, a one-line description of where the groups
        came from, saved in ``lvis_metrics.json`` as ``frequency_source``).

    Raises:
        ValueError: a category has no group from any source.
    """

    def by_id(freq):
        if freq is None:
            return {}
        return {dataset_ids[k]: f for k, f in enumerate(freq) if k in dataset_ids}

    train, split = by_id(train_frequency), by_id(split_frequency)
    cats, used, missing, disagree = [], Counter(), [], 0
    for cat in dataset["categories"]:
        cat = dict(cat)
        if "frequency" in cat:
            used["json"] += 1
            disagree += cat["id"] in train and train[cat["id"]] != cat["frequency"]
        elif cat["id"] in train:
            cat["frequency"] = train[cat["id"]]
            used["train"] += 1
        elif cat["id"] in split:
            cat["frequency"] = split[cat["id"]]
            used["split"] += 1
        else:
            missing.append(cat["id"])
        cats.append(cat)
    if missing:
        raise ValueError(
            f"categories {missing[:10]}{'...' if len(missing) > 10 else ''} have no 'frequency' "
            "in the json and no training split gives one; APr/APc/APf need one (set "
            "DATASETS.TRAIN to the training split, or add LVIS 'frequency' fields)"
        )
    if disagree:
        logger.warning(
            f"{train_source}'s frequency groups disagree with the json's 'frequency' for "
            f"{disagree} categories; APr/APc/APf follow the json (as lvis-api does)."
        )
    parts = []
    if used["json"]:
        parts.append(f"the json's 'frequency' fields ({used['json']} categories)")
    if used["train"]:
        parts.append(f"{train_source} ({used['train']} categories)")
    if used["split"]:
        parts.append(
            f"NOT a training split: recounted from {split_name} ({used['split']} categories; no "
            "training split known, so APr/APc/APf are not LVIS's groups)"
        )
        logger.warning(
            f"No training split known for {used['split']} categories without 'frequency': "
            f"their frequency groups are recounted from {split_name} itself, so APr/APc/APf "
            "are not comparable to LVIS's (set DATASETS.TRAIN to the training split)."
        )
    return dict(dataset, categories=cats), "; ".join(parts)


__all__ = [
    "DEFAULT_TASKS",
    "EVALUATORS",
    "METRICS",
    "TASKS",
    "evaluate_lvis_results",
    "metric_names",
    "run_lvis_eval",
]
