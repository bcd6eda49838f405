"""LVIS evaluation and results export as a detectron2 ``DatasetEvaluator``.

Differs from detectron2's ``LVISEvaluator`` in:

- ``process()`` appends each image's detections as table rows to a per-process shard on disk
  (:mod:`.shards`), not gathered in RAM; ``evaluate()`` reads the shards once into one
  :class:`~.table.DetectionTable`, applies the protocol once, writes the results file from
  that selection (checked against the split, atomically; :mod:`.results`) and computes AP
  from the same selection;
- three protocols (:mod:`.table`, ``TEST.EVAL_PROTOCOL``): ``standard`` (300 per image),
  ``fixed`` (Fixed AP: 10,000 per class, no per-image cap) and ``challenge2021`` (Fixed AP
  with Boundary AP), for the metrics and the file; Boundary AP (:mod:`.boundary`) also on
  request (``tasks``, ``TEST.LVIS_TASKS``) under any protocol;
- two evaluators with the same numbers (``TEST.LVIS_EVALUATOR``): ``fast`` (:mod:`.fast_eval`)
  and ``lvis_api`` (the official code);
- ``Instances.mask_scores`` (Mask Scoring) ranks segm; test-dev (no annotations) is only
  exported; empty predictions give AP 0 instead of crashing;
- per-class diagnostics (:mod:`.diagnostics`): ``lvis_per_class.csv`` and a plot.
"""

import dataclasses
import logging
import os
import time
from datetime import timedelta
from typing import Mapping, Optional, Sequence, Union

import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.logger import create_small_table

from lvis_longtail.data.class_stats import training_frequency
from lvis_longtail.data.lvis_json import load_validated
from lvis_longtail.evaluation import diagnostics
from lvis_longtail.evaluation.boundary import DILATION_RATIO
from lvis_longtail.evaluation.class_thresholds import ClassScoreThresholds
from lvis_longtail.evaluation.fast_eval import evaluate_detections
from lvis_longtail.evaluation.ground_truth import LVISGroundTruth
from lvis_longtail.evaluation.lvis_evaluation import (
    DEFAULT_TASKS,
    EVALUATORS,
    METRICS_FILE,
    TASKS,
    _percent,
    check_task_evaluator,
    resolve_frequencies,
    run_lvis_eval,
)
from lvis_longtail.evaluation.results import (
    RESULTS_FILE,
    SplitIndex,
    table_to_records,
    write_results_file,
)
from lvis_longtail.evaluation.rows import preselect
from lvis_longtail.evaluation.shards import DetectionShard, ShardedDetections, read_shards
from lvis_longtail.evaluation.table import EvalProtocol
from lvis_longtail.utils.dist import wait_for_main_process
from lvis_longtail.utils.io import write_json_atomic

logger = logging.getLogger(__name__)

SHARD_DIR = ".lvis_results_shards"
MASK_TASKS = ("segm", "boundary")


class LVISLongTailEvaluator(DatasetEvaluator):
    """LVIS bbox/segm/boundary evaluation and results export for the LVIS server.

    :meth:`process` turns each image's ``instances`` into table rows (dataset category ids,
    compressed-RLE masks) and appends them to this process's shard on disk; memory holds at
    most ``flush_every`` images. :meth:`evaluate` (main process) writes
    ``lvis_instances_results.json`` from all shards, validated against the split and
    atomically, to ``output_dir``. If the split has annotations it returns ``{"bbox": {...},
    "segm": {...}}`` (and ``"boundary"`` when evaluated; lvis-api's metrics in percent) and
    saves them to ``lvis_metrics.json`` with the protocol (and ``boundary_dilation_ratio``),
    plus ``lvis_per_class.csv`` and ``lvis_per_class.png``; a test-dev json
    (no ``annotations``) only gets the export and returns ``{}``.

    With ``Instances.mask_scores`` (Mask Scoring), bbox is ranked by ``scores`` and segm by
    ``mask_scores`` (boundary too), and the file's ``score`` is the segm score (the LVIS server
    evaluates masks). segm and boundary use the mask area for APs/APm/APl, as detectron2 does.

    APr/APc/APf use the training set's frequency groups: the json's ``frequency`` fields,
    else those of ``train_datasets`` (their json's fields or a recount of their annotations);
    only when no training split is known (an eval-only run on a foreign json) a recount of
    the evaluated split, which the log and ``lvis_metrics.json`` (``frequency_source``) say.

    Dataset metadata used: ``json_file``; ``thing_dataset_id_to_contiguous_id`` (absent: the
    dataset id is contiguous id + 1); ``class_frequency`` (the evaluated split's own groups,
    used only without a training split).
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        max_dets_per_image: int = 300,
        tasks: Sequence[str] = DEFAULT_TASKS,
        distributed: bool = True,
        protocol: str = "standard",
        dets_per_class: int = 10000,
        evaluator: str = "fast",
        class_image_count: Optional[Union[Mapping[int, int], Sequence[int]]] = None,
        flush_every: int = 32,
        train_datasets: Sequence[str] = (),
        wait_timeout: timedelta = timedelta(hours=4),
        dilation_ratio: float = DILATION_RATIO,
    ):
        """
        Args:
            dataset_name: a registered dataset whose metadata has ``json_file``.
            output_dir: where the results, metrics and diagnostics go (and the shards while
                running); None writes nothing (shards go to a temporary folder).
            max_dets_per_image: standard protocol's per-image cap across classes (300); -1
                keeps all.
            tasks: a subset of ("bbox", "segm", "boundary"), plus the protocol's required
                ones (challenge2021: boundary); segm and boundary are skipped if predictions
                have no masks.
            distributed: evaluate the shards of all ranks on the main one.
            protocol: "standard", "fixed" (Fixed AP) or "challenge2021" (see :mod:`.table`).
            dets_per_class: Fixed AP's detections per class over the split.
            evaluator: "fast" or "lvis_api" (same numbers; lvis_api is the official code, with
                no Boundary AP).
            class_image_count: training images per class, for the per-class diagnostics:
                ``{dataset category id: count}`` or a sequence per contiguous class id.
            flush_every: images buffered in memory before they are written to the shard.
            train_datasets: the training datasets (``DATASETS.TRAIN``) whose frequency groups
                APr/APc/APf use for categories without a json ``frequency``; empty: none known.
            wait_timeout: how long the other processes wait for the main one to export and
                score (``TEST.EVAL_WAIT_MINUTES``).
            dilation_ratio: Boundary AP's erosion radius over the image diagonal (0.02).
        """
        if not set(tasks) <= set(TASKS) or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tuple(tasks)}")
        if not isinstance(max_dets_per_image, int):
            raise ValueError(f"max_dets_per_image must be > 0 or -1, got {max_dets_per_image!r}")
        if evaluator not in EVALUATORS:
            raise ValueError(f"unknown LVIS evaluator {evaluator!r}; expected one of {EVALUATORS}")
        self._protocol = EvalProtocol.create(protocol, max_dets_per_image, dets_per_class)
        meta = MetadataCatalog.get(dataset_name)
        if not hasattr(meta, "json_file"):
            raise KeyError(f"dataset '{dataset_name}' has no json_file in its metadata")
        self._dataset_name = dataset_name
        self._json_file = meta.json_file
        mapping = getattr(meta, "thing_dataset_id_to_contiguous_id", None)
        if mapping is not None:
            self._dataset_ids = {v: k for k, v in mapping.items()}
        else:
            self._dataset_ids = {k: k + 1 for k in range(len(meta.get("thing_classes", [])))}
        self._train_datasets = tuple(train_datasets)
        self._class_image_count = class_image_count
        self._output_dir = output_dir
        tasks = set(tasks) | set(self._protocol.required_tasks)
        self._tasks = tuple(t for t in TASKS if t in tasks)
        for task in self._tasks:
            check_task_evaluator(task, evaluator)
        self._dilation_ratio = dilation_ratio
        self._distributed = distributed
        self._evaluator = evaluator
        self._flush_every = flush_every
        self._wait_timeout = wait_timeout
        self._cpu = torch.device("cpu")
        folder = os.path.join(output_dir, SHARD_DIR) if output_dir else None
        self._shards = ShardedDetections(folder, dataset_name, flush_every)
        self.reset()

    @property
    def protocol(self) -> EvalProtocol:
        return self._protocol

    @property
    def store(self) -> DetectionShard:
        """This process's shard, created on first use after :meth:`reset` (its
        ``num_buffered_images`` stays <= ``flush_every``)."""
        return self._shards.shard

    def reset(self):
        self._shards.discard()
        self._thresholds = {}
        if self._protocol.per_class:
            k = self._protocol.dets_per_class
            self._thresholds = {"score": ClassScoreThresholds(k), "mask_scores": None}

    def process(self, inputs, outputs):
        """Append each image's detections as rows to this process's shard. Standard: only
        those that can survive the per-image cap (:func:`~.rows.preselect`); fixed: the
        per-class score thresholds first drop what can no longer reach its class's top
        ``dets_per_class``. Both select on the model's device, so only the kept masks are
        encoded, from their transitions on that device (:mod:`.mask_rle`), and only their
        RLEs and the (N,) fields reach the host."""
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                self.store.add(inp["image_id"], [])
                continue
            instances = out["instances"]
            if self._thresholds:
                instances = self._above_thresholds(instances)
            else:
                instances = preselect(instances, self._protocol.max_dets_per_image)
            self.store.add_instances(inp["image_id"], instances, self._dataset_ids)

    def _above_thresholds(self, instances):
        """Instances that may still be in their class's top ``dets_per_class`` (by box score
        or, with Mask Scoring, by mask score); the thresholds are updated with them. The
        thresholds live on the host: only the (N,) classes and scores are copied there, and
        the detections are selected where they are."""
        classes = instances.pred_classes.to(self._cpu)
        scores = instances.scores.to(self._cpu)
        mask_scores = instances.mask_scores.to(self._cpu) if instances.has("mask_scores") else None
        keep = self._thresholds["score"].keep(classes, scores)
        if mask_scores is not None:
            if self._thresholds["mask_scores"] is None:
                self._thresholds["mask_scores"] = ClassScoreThresholds(
                    self._protocol.dets_per_class
                )
            keep |= self._thresholds["mask_scores"].keep(classes, mask_scores)
        kept = torch.nonzero(keep)[:, 0]
        self._thresholds["score"].update(classes[kept], scores[kept])
        if self._thresholds["mask_scores"] is not None:
            segm = mask_scores if mask_scores is not None else scores
            self._thresholds["mask_scores"].update(classes[kept], segm[kept])
        if len(kept) == len(instances):
            return instances
        return instances[kept.to(instances.pred_classes.device)]

    def evaluate(self):
        """Export (and, with annotations, evaluate) the predictions; see the class docstring.
        The other processes wait until the main one has finished (``wait_timeout``, see
        :func:`~lvis_longtail.utils.dist.wait_for_main_process`)."""
        paths = self._shards.gather(self._distributed)
        ok = False
        try:
            results = {} if paths is None else self._evaluate(paths)
            ok = True
            return results
        finally:
            if paths is not None:
                self._shards.discard(paths)
            if self._distributed:
                wait_for_main_process(ok, self._wait_timeout)

    def _evaluate(self, paths):
        validated = load_validated(self._json_file)
        split = SplitIndex(validated.dataset)
        table, num_images = read_shards(paths)  # the shards, read once
        if num_images == 0:
            logger.warning(f"LVISLongTailEvaluator received no images of {self._dataset_name}.")
        tasks = self._tasks
        if table.masks is None and len(table) and set(tasks) & set(MASK_TASKS):
            logger.warning("Predictions have no pred_masks: segm and boundary are not evaluated.")
            tasks = tuple(t for t in tasks if t not in MASK_TASKS)
        path = os.path.join(self._output_dir, RESULTS_FILE) if self._output_dir else None
        exported = self._protocol.apply(table, "file")  # the protocol, once
        summary = write_results_file(
            exported,
            path,
            split,
            with_masks=bool(set(tasks) & set(MASK_TASKS)),
            source=path or f"{RESULTS_FILE} (not written: no output_dir)",
        )
        summary["num_processed_images"] = num_images
        logger.info(summary["line"])
        if path:
            logger.info(f"Saved LVIS results ({self._protocol.name} protocol) to {path}.")
        if not validated.has_annotations:
            logger.info(
                f"{self._dataset_name} has no annotations: results exported for submission to "
                f"the LVIS evaluation server ({path or 'nothing written: no output_dir'})."
            )
            return {}
        dataset, source = self._with_frequencies(validated.dataset)
        logger.info(f"Frequency groups (APr/APc/APf) of {self._dataset_name}: {source}.")
        return self._evaluate_tasks(dataset, table, tasks, source)

    def _with_frequencies(self, dataset):
        """The split with the training set's frequency groups (see the class docstring)."""
        train, train_source = training_frequency(self._train_datasets)
        split_frequency = None
        if train is None:
            try:
                split_frequency = MetadataCatalog.get(self._dataset_name).get("class_frequency")
            except (OSError, ValueError):
                split_frequency = None
        dataset, source = resolve_frequencies(
            dataset,
            self._dataset_ids,
            train,
            train_source,
            split_frequency,
            f"the evaluated split {self._dataset_name}",
        )
        if train is None and self._train_datasets:  # say why the training split's were not
            source = f"{source}; {train_source}"
        return dataset, source

    def _evaluate_tasks(self, dataset, table, tasks, frequency_source):
        """AP of each task on the protocol's selection of the one table (the standard cap
        is applied by the evaluator, per task, as lvis-api does)."""
        gt = LVISGroundTruth(dataset)
        protocol, results, per_task = self._protocol, {}, {}
        for task in tasks:
            start = time.perf_counter()
            selected = protocol.select_table(table, task)
            if self._evaluator == "fast":
                ratio = self._dilation_ratio
                res = evaluate_detections(gt, selected, task, protocol.eval_max_dets, ratio)
            else:
                records = table_to_records(selected, with_masks=task == "segm")
                res = run_lvis_eval(gt, records, task, protocol.eval_max_dets, evaluator="lvis_api")
            per_task[task] = res
            results[task] = {m: _percent(v) for m, v in res.metrics.items()}
            logger.info(
                f"LVIS {task} results ({self._evaluator} evaluator, {protocol.name} protocol, "
                f"{time.perf_counter() - start:.1f} s):\n" + create_small_table(results[task])
            )
        if self._output_dir:
            saved = dict(results, protocol=dataclasses.asdict(protocol))
            saved["frequency_source"] = frequency_source
            if "boundary" in results:
                saved["boundary_dilation_ratio"] = self._dilation_ratio
            write_json_atomic(saved, os.path.join(self._output_dir, METRICS_FILE))
            diagnostics.save(self._output_dir, dataset, per_task, self._train_counts(dataset))
        return results

    def _train_counts(self, dataset) -> Optional[dict]:
        counts = self._class_image_count
        if counts is None or isinstance(counts, Mapping):
            return counts
        return {
            self._dataset_ids[k]: int(c) for k, c in enumerate(counts) if k in self._dataset_ids
        }
