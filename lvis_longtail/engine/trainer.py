"""The trainer: detectron2's ``DefaultTrainer`` with LVIS builders."""

import functools
import logging
import os
from datetime import timedelta

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.utils import comm
from torch import nn

from lvis_longtail.data.categories import (
    category_fields,
    dataset_categories,
    dataset_class_names,
)
from lvis_longtail.data.loader import build_longtail_test_loader, build_longtail_train_loader
from lvis_longtail.data.lvis_json import shared_reads
from lvis_longtail.engine.checkpoint import LongTailCheckpointer
from lvis_longtail.engine.faults import fault_tolerance_hooks, workers_ignore_preemption
from lvis_longtail.engine.launch import OpenCVThreadsWorkerInit
from lvis_longtail.engine.resume import DataStream
from lvis_longtail.evaluation import LVISLongTailEvaluator
from lvis_longtail.modeling.dual_head import dual_head_branches

logger = logging.getLogger(__name__)

# The LVIS standard protocol keeps at most 300 detections per image across classes.
LVIS_MAX_DETS_PER_IMAGE = 300


def check_num_classes(cfg) -> None:
    """``MODEL.ROI_HEADS.NUM_CLASSES`` must equal the number of classes of every dataset in
    ``DATASETS.TRAIN`` and ``DATASETS.TEST`` (the classic mistake: LVIS v0.5 has 1230
    classes, v1 has 1203). Counted from the metadata or the json's ``categories`` alone
    (:func:`~lvis_longtail.data.categories.dataset_class_names`: no image or annotation is
    read); a dataset whose json is absent (the training split of an ``--eval-only`` run) is
    skipped."""
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        try:
            classes = dataset_class_names(name)
        except FileNotFoundError as e:
            logger.info(f"NUM_CLASSES not checked against '{name}': {e}")
            continue
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes} but dataset "
                f"'{name}' has {len(classes)} classes (LVIS v0.5: 1230, LVIS v1: 1203)"
            )


# Layers whose forward depends on the train/eval mode through their own state: normalisation
# statistics (BatchNorm, SyncBN and their subclasses) and dropout. Frozen ones stay in eval mode.
_MODE_DEPENDENT_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def _train_in_eval_mode(module: nn.Module, mode: bool = True) -> nn.Module:
    """The ``train`` of a frozen layer: eval mode whatever ``mode`` asks."""
    return nn.Module.train(module, False)


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze_modules(model, prefixes, keep=()) -> None:
    """Freeze what ``prefixes`` (parameter-name prefixes) name, except what ``keep`` names:
    their parameters get no gradient, and their BatchNorm/SyncBN and dropout layers stay in eval
    mode across ``model.train()``, so running statistics do not move and batches are normalised
    with them (a frozen module computes in training what it computed before).

    Raises:
        ValueError: a prefix matches no parameter (a typo would silently train everything).
    """
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        matched = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not matched:
            top = sorted({n.split(".")[0] for n in names})
            raise ValueError(
                f"MODEL.FROZEN_MODULES: '{prefix}' matches no parameter; "
                f"top-level modules are {top}"
            )
    frozen = pinned = 0
    for name, param in model.named_parameters():
        if _under(name, prefixes) and not _under(name, keep):
            param.requires_grad_(False)
            frozen += param.numel()
    for name, module in model.named_modules():
        if (
            isinstance(module, _MODE_DEPENDENT_LAYERS)
            and _under(name, prefixes)
            and not _under(name, keep)
        ):
            module.train = functools.partial(_train_in_eval_mode, module)
            module.eval()
            pinned += 1
    if prefixes:
        logger.info(f"Froze {frozen} parameters under {list(prefixes)} (except {list(keep)}); "
                    f"{pinned} normalisation/dropout layers kept in eval mode")  # fmt: skip


class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer``; only the builders differ:

    - ``build_model`` checks the class count against the training set and freezes
      ``MODEL.FROZEN_MODULES`` (the decoupled classifier fine-tune stage) or, with
      ``MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED``, everything but the new branches;
    - ``build_evaluator`` returns :class:`LVISLongTailEvaluator` (LVIS metrics with
      APr/APc/APf under ``TEST.EVAL_PROTOCOL``, per-class diagnostics, and the results file,
      which is all a test-dev split gets).

    - ``build_train_loader`` maps training images with ``LongTailDatasetMapper``
      (``INPUT.AUGMENTATIONS``; multi-image steps draw through the same sampler, so the
      repeat-factor sampler still decides which images appear); ``build_test_loader`` reads
      test images with the same reader.

    - ``build_hooks``: checkpoints are written by
      :class:`~lvis_longtail.engine.checkpoint.LongTailCheckpointer` (atomic, verified on
      load, ``SOLVER.CHECKPOINT_KEEP``), and SIGTERM/SIGUSR1 save a checkpoint and stop
      (:mod:`lvis_longtail.engine.faults`).

    Checkpoints also hold what detectron2 0.6 leaves out, so ``--resume`` continues exactly
    (see :mod:`lvis_longtail.engine.resume`): the optimizer and AMP grad scaler
    (``SimpleTrainer``/``AMPTrainer.state_dict`` under ``"_trainer"``, as later detectron2
    versions do), the training sampler's position and aspect-ratio buckets, and the RNGs.
    """

    def __init__(self, cfg):
        with shared_reads():  # the model's class statistics and the loader's dicts: one parse
            super().__init__(cfg)
        self._data_stream = DataStream.attach(self._trainer)

    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        if self._data_stream is not None:
            ret["data_stream"] = self._data_stream.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:  # checkpoints of detectron2 0.6's trainer have none
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("Checkpoint has no optimizer state: SGD momentum restarts from 0.")
        if self._data_stream is not None and "data_stream" in state_dict:
            self._data_stream.load_state_dict(state_dict["data_stream"])

    def build_hooks(self):
        self.checkpointer = LongTailCheckpointer.replacing(
            self.checkpointer, keep=self.cfg.SOLVER.CHECKPOINT_KEEP
        )
        return fault_tolerance_hooks(
            super().build_hooks(), self.checkpointer, self._trainer.data_loader
        )

    @classmethod
    def build_train_loader(cls, cfg):
        return workers_ignore_preemption(build_longtail_train_loader(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """:func:`build_longtail_test_loader` (the project's one image reader), whose workers
        limit OpenCV to ``OPENCV_THREADS`` threads (the training loaders' workers do so
        through :func:`configure_cpu_threads`)."""
        loader = build_longtail_test_loader(cfg, dataset_name)
        loader.worker_init_fn = OpenCVThreadsWorkerInit(cfg.OPENCV_THREADS, loader.worker_init_fn)
        return loader

    @classmethod
    def build_model(cls, cfg):
        check_num_classes(cfg)
        model = super().build_model(cfg)
        freeze_modules(model, cfg.MODEL.FROZEN_MODULES)
        if cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED:  # the trained model, all but the new branches
            trained = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
            freeze_modules(model, trained, keep=dual_head_branches(model))
        return model

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's ``test``; with ``TEST.AUG.ENABLED`` the model runs wrapped in
        :class:`~lvis_longtail.modeling.tta.LongTailTTA` (--eval-only and periodic eval)."""
        if cfg.TEST.AUG.ENABLED:
            from lvis_longtail.modeling.tta import LongTailTTA

            logger.info("Evaluating with test-time augmentation (TEST.AUG)")
            model = LongTailTTA(cfg, model)
        return super().test(cfg, model, evaluators)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """:class:`LVISLongTailEvaluator` with ``TEST.EVAL_PROTOCOL``, ``TEST.FIXED_AP``,
        ``TEST.LVIS_EVALUATOR``, ``TEST.LVIS_TASKS`` and ``TEST.BOUNDARY_DILATION_RATIO``;
        per-class diagnostics get the training set's image counts."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        protocol = cfg.TEST.EVAL_PROTOCOL
        cap = cfg.TEST.DETECTIONS_PER_IMAGE
        if protocol != "standard" and 0 <= cap <= LVIS_MAX_DETS_PER_IMAGE:
            logger.warning(
                f"TEST.EVAL_PROTOCOL {protocol!r} with TEST.DETECTIONS_PER_IMAGE {cap}: the model "
                f"keeps at most {cap} detections per image, so Fixed AP is underestimated; set "
                "TEST.DETECTIONS_PER_IMAGE to -1 or e.g. 1000 (see docs/config_keys.md)."
            )
        return LVISLongTailEvaluator(
            dataset_name,
            output_folder,
            max_dets_per_image=LVIS_MAX_DETS_PER_IMAGE,
            protocol=protocol,
            dets_per_class=cfg.TEST.FIXED_AP.DETS_PER_CLASS,
            evaluator=cfg.TEST.LVIS_EVALUATOR,
            class_image_count=train_image_counts(cfg),
            train_datasets=cfg.DATASETS.TRAIN,
            wait_timeout=timedelta(minutes=cfg.TEST.EVAL_WAIT_MINUTES),
            tasks=cfg.TEST.LVIS_TASKS,
            dilation_ratio=cfg.TEST.BOUNDARY_DILATION_RATIO,
        )


def train_image_counts(cfg):
    """``{dataset category id: training images}`` of ``DATASETS.TRAIN[0]`` for the per-class
    diagnostics, or None. From its metadata when already derived, else its json's categories
    (their ``image_count`` fields: no annotation is read). Only when the json lacks the fields
    does the main process (the only one that evaluates) recount them from the annotations."""
    if not cfg.DATASETS.TRAIN:
        return None
    name = cfg.DATASETS.TRAIN[0]
    known = MetadataCatalog.get(name).as_dict()  # no lazy derivation
    counts = known.get("class_image_count")
    mapping = known.get("thing_dataset_id_to_contiguous_id")
    try:
        if counts is None:
            cats = dataset_categories(name)
            if cats is not None:
                counts = category_fields(cats, "image_count")
                mapping = {c["id"]: k for k, c in enumerate(cats)}
        if counts is None and "json_file" in known and comm.is_main_process():
            meta = MetadataCatalog.get(name)
            counts, mapping = meta.class_image_count, meta.thing_dataset_id_to_contiguous_id
    except (OSError, ValueError) as e:  # an eval-only run may not have the training json
        logger.warning(f"No training image counts for the per-class diagnostics: {e}")
        return None
    if counts is None:
        return None
    mapping = mapping or {k + 1: k for k in range(len(counts))}
    return {cat: int(counts[k]) for cat, k in mapping.items() if k < len(counts)}
