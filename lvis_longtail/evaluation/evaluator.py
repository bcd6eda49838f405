"""LVIS evaluation and results export as a detectron2 ``DatasetEvaluator``.

Differs from detectron2's ``LVISEvaluator`` in:

- predictions are streamed to a per-process shard on disk as they are processed
  (:mod:`.store`), not gathered in RAM; the results file is written from the shards, chunk by
  chunk, validated against the split and atomically (:mod:`.shard_export`);
- two protocols (:mod:`.protocol`, ``TEST.EVAL_PROTOCOL``): ``standard`` (300 per image) and
  ``fixed`` (Fixed AP: 10,000 per class, no per-image cap), for the metrics and the file;
- two evaluators with the same numbers (``TEST.LVIS_EVALUATOR``): ``fast`` (:mod:`.fast_eval`)
  and ``lvis_api`` (the official code);
- ``Instances.mask_scores`` (Mask Scoring) ranks segm; test-dev (no annotations) is only
  exported; empty predictions give AP 0 instead of crashing;
- per-class diagnostics (:mod:`.diagnostics`): ``lvis_per_class.csv`` and a plot.
"""

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table

from lvis_longtail.data.class_stats import training_frequency
from lvis_longtail.data.lvis_json import load_validated
from lvis_longtail.evaluation import diagnostics
from lvis_longtail.evaluation.export import instances_to_lvis_records, write_json_atomic
from lvis_longtail.evaluation.fast_eval import LVISGroundTruth, evaluate_detections
from lvis_longtail.evaluation.lvis_evaluation import (
    EVALUATORS,
    METRICS_FILE,
    TASKS,
    _percent,
    resolve_frequencies,
    run_lvis_eval,
)
from lvis_longtail.evaluation.protocol import ClassScoreThresholds, EvalProtocol
from lvis_longtail.evaluation.shard_export import export_shards
from lvis_longtail.evaluation.store import (
    LVISResultsStore,
    read_shards,
    shards_have_masks,
    table_to_records,
)
from lvis_longtail.evaluation.validation import RESULTS_FILE, SplitIndex

logger = logging.getLogger(__name__)

SHARD_DIR = ".lvis_results_shards"


class LVISLongTailEvaluator(DatasetEvaluator):
    """LVIS bbox/segm evaluation and results export for the LVIS server.

    :meth:`process` turns each image's ``instances`` into LVIS records (dataset category ids,
    compressed-RLE masks) and appends them to this process's shard on disk; memory holds at
    most ``flush_every`` images. :meth:`evaluate` (main process) writes
    ``lvis_instances_results.json`` from all shards, validated against the split and
    atomically, to ``output_dir``. If the split has annotations it returns ``{"bbox": {...},
    "segm": {...}}`` (lvis-api's metrics in percent) and saves them to ``lvis_metrics.json``
    with the protocol, plus ``lvis_per_class.csv`` and ``lvis_per_class.png``; a test-dev json
    (no ``annotations``) only gets the export and returns ``{}``.

    With ``Instances.mask_scores`` (Mask Scoring), bbox is ranked by ``scores`` and segm by
    ``mask_scores``, and the file's ``score`` is the segm score (the LVIS server evaluates
    segm). segm uses the mask area for APs/APm/APl, as detectron2 does.

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
        tasks: Sequence[str] = TASKS,
        distributed: bool = True,
        protocol: str = "standard",
        dets_per_class: int = 10000,
        evaluator: str = "fast",
        class_image_count: Optional[Union[Mapping[int, int], Sequence[int]]] = None,
        flush_every: int = 32,
        train_datasets: Sequence[str] = (),
    ):
        """
        Args:
            dataset_name: a registered dataset whose metadata has ``json_file``.
            output_dir: where the results, metrics and diagnostics go (and the shards while
                running); None writes nothing (shards go to a temporary folder).
            max_dets_per_image: standard protocol's per-image cap across classes (300); -1
                keeps all.
            tasks: a subset of ("bbox", "segm"); segm is skipped if predictions have no masks.
            distributed: evaluate the shards of all ranks on the main one.
            protocol: "standard" or "fixed" (Fixed AP, see :mod:`.protocol`).
            dets_per_class: Fixed AP's detections per class over the split.
            evaluator: "fast" or "lvis_api" (same numbers; lvis_api is the official code).
            class_image_count: training images per class, for the per-class diagnostics:
                ``{dataset category id: count}`` or a sequence per contiguous class id.
            flush_every: images buffered in memory before they are written to the shard.
            train_datasets: the training datasets (``DATASETS.TRAIN``) whose frequency groups
                APr/APc/APf use for categories without a json ``frequency``; empty: none known.
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
        self._tasks = tuple(t for t in TASKS if t in tasks)
        self._distributed = distributed
        self._evaluator = evaluator
        self._flush_every = flush_every
        self._cpu = torch.device("cpu")
        self._store = self._tmp_dir = None
        self.reset()

    @property
    def protocol(self) -> EvalProtocol:
        return self._protocol

    @property
    def store(self) -> LVISResultsStore:
        """This process's shard, created on first use after :meth:`reset` (its
        ``num_buffered_images`` stays <= ``flush_every``)."""
        if self._store is None:
            rank = comm.get_rank()
            if self._output_dir:
                folder = os.path.join(self._output_dir, SHARD_DIR)
            else:
                self._tmp_dir = folder = tempfile.mkdtemp(prefix="lvis_results_")
            name = f"{self._dataset_name}.rank{rank}.shard"
            self._store = LVISResultsStore(os.path.join(folder, name), self._flush_every)
        return self._store

    def reset(self):
        self._discard()
        self._thresholds = {}
        if self._protocol.name == "fixed":
            k = self._protocol.dets_per_class
            self._thresholds = {"score": ClassScoreThresholds(k), "mask_scores": None}
        self._id_lookup = np.full(max(self._dataset_ids, default=-1) + 2, -1, dtype=np.int64)
        for k, v in self._dataset_ids.items():
            self._id_lookup[k] = v

    def process(self, inputs, outputs):
        """Append each image's records to the shard (the Fixed AP thresholds drop, before
        masks are encoded, what can no longer reach its class's top ``dets_per_class``)."""
        for inp, out in zip(inputs, outputs):
            records = []
            if "instances" in out:
                instances = out["instances"].to(self._cpu)
                if self._thresholds:
                    instances = self._above_thresholds(instances)
                records = instances_to_lvis_records(
                    instances, inp["image_id"], self._dataset_ids, self._protocol.max_dets_per_image
                )
                if self._thresholds:
                    self._update_thresholds(records)
            self.store.add(inp["image_id"], records)

    def _classes(self, instances) -> np.ndarray:
        """Dataset category ids of the predicted classes (-1: unmapped)."""
        classes = instances.pred_classes.numpy()
        cats = np.full(len(classes), -1, dtype=np.int64)
        inside = (classes >= 0) & (classes < len(self._id_lookup))
        cats[inside] = self._id_lookup[classes[inside]]
        return cats

    def _above_thresholds(self, instances):
        cats = self._classes(instances)
        keep = self._thresholds["score"].keep(cats, instances.scores.numpy())
        if instances.has("mask_scores"):
            if self._thresholds["mask_scores"] is None:
                self._thresholds["mask_scores"] = ClassScoreThresholds(
                    self._protocol.dets_per_class
                )
            keep |= self._thresholds["mask_scores"].keep(cats, instances.mask_scores.numpy())
        keep |= cats < 0  # unmapped classes: let instances_to_lvis_records explain
        return instances[torch.from_numpy(keep)]

    def _update_thresholds(self, records):
        cats = np.array([r["category_id"] for r in records], dtype=np.int64)
        self._thresholds["score"].update(cats, [r["score"] for r in records])
        if self._thresholds["mask_scores"] is not None:
            segm = [r.get("segm_score", r["score"]) for r in records]
            self._thresholds["mask_scores"].update(cats, segm)

    def _discard(self):
        """Close and delete this process's shard (a new one starts on the next image)."""
        if self._store is not None:
            self._store.close()
            if os.path.exists(self._store.path):
                os.remove(self._store.path)
            self._remove_empty_folder(os.path.dirname(self._store.path))
        if self._tmp_dir:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
        self._store = self._tmp_dir = None

    @staticmethod
    def _remove_empty_folder(folder):
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)

    def _shard_paths(self) -> Optional[list]:
        """Paths of every rank's shard, readable on the main process (None elsewhere)."""
        store = self.store  # created here if no image was processed
        store.close()
        if not self._distributed or comm.get_world_size() == 1:
            return [store.path]
        comm.synchronize()
        paths = comm.all_gather(store.path)
        # the main process's view; shards it cannot see (no shared disk) travel by gather
        visible = comm.all_gather(
            [os.path.exists(p) for p in paths] if comm.is_main_process() else None
        )[0]
        own = None
        if not visible[comm.get_rank()]:
            with open(store.path, "rb") as f:
                own = f.read()
        payloads = comm.gather(own, dst=0)
        if not comm.is_main_process():
            if own is not None:  # sent: the main process has its copy
                self._discard()
            return None
        for rank, data in enumerate(payloads):
            if data is not None:
                paths[rank] = os.path.join(self._work_dir(), f"received.rank{rank}.shard")
                with open(paths[rank], "wb") as f:
                    f.write(data)
        return paths

    def _work_dir(self) -> str:
        return os.path.dirname(self.store.path)

    def evaluate(self):
        """Export (and, with annotations, evaluate) the predictions; see the class docstring."""
        paths = self._shard_paths()
        if paths is None:
            return {}
        try:
            return self._evaluate(paths)
        finally:
            self._cleanup(paths)

    def _cleanup(self, paths):
        """Remove the shards (the results file is what stays) and their folder if empty."""
        for path in paths:
            if os.path.exists(path):
                os.remove(path)
        self._discard()

    def _evaluate(self, paths):
        validated = load_validated(self._json_file)
        dataset = validated.dataset
        split = SplitIndex(dataset)
        has_masks = shards_have_masks(paths)
        tasks = self._tasks
        if "segm" in tasks and not has_masks:
            logger.warning("Predictions have no pred_masks: segm is not evaluated.")
            tasks = tuple(t for t in tasks if t != "segm")
        path = os.path.join(self._output_dir, RESULTS_FILE) if self._output_dir else None
        summary = export_shards(
            paths,
            path,
            split,
            self._protocol,
            with_masks="segm" in tasks,
            source=path or f"{RESULTS_FILE} (not written: no output_dir)",
        )
        logger.info(summary["line"])
        if path:
            logger.info(f"Saved LVIS results ({self._protocol.name} protocol) to {path}.")
        if summary["num_processed_images"] == 0:
            logger.warning(f"LVISLongTailEvaluator received no images of {self._dataset_name}.")
        if not validated.has_annotations:
            logger.info(
                f"{self._dataset_name} has no annotations: results exported for submission to "
                f"the LVIS evaluation server ({path or 'nothing written: no output_dir'})."
            )
            return {}
        dataset, source = self._with_frequencies(dataset)
        logger.info(f"Frequency groups (APr/APc/APf) of {self._dataset_name}: {source}.")
        return self._evaluate_tasks(dataset, paths, tasks, source)

    def _with_frequencies(self, dataset):
        """The split with the training set's frequency groups (see the class docstring)."""
        train, train_source = training_frequency(self._train_datasets)
        split_frequency = None
        if train is None:
            try:
                split_frequency = MetadataCatalog.get(self._dataset_name).get("class_frequency")
            except (OSError, ValueError):
                split_frequency = None
        return resolve_frequencies(
            dataset,
            self._dataset_ids,
            train,
            train_source,
            split_frequency,
            f"the evaluated split {self._dataset_name}",
        )

    def _evaluate_tasks(self, dataset, paths, tasks, frequency_source):
        table, _ = read_shards(paths)
        gt = LVISGroundTruth(dataset)
        protocol, results, per_task = self._protocol, {}, {}
        for task in tasks:
            start = time.perf_counter()
            selected = protocol.select_table(table, task)
            if self._evaluator == "fast":
                res = evaluate_detections(gt, selected, task, protocol.eval_max_dets)
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
