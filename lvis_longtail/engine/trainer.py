"""The trainer: detectron2's ``DefaultTrainer`` with LVIS builders."""

import logging
import os

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer

from lvis_longtail.config import setup_cfg  # noqa: F401  (re-exported)
from lvis_longtail.data.loader import build_longtail_train_loader
from lvis_longtail.data.lvis_json import shared_reads
from lvis_longtail.engine.resume import DataStream
from lvis_longtail.evaluation import LVISLongTailEvaluator

logger = logging.getLogger(__name__)

# The LVIS standard protocol keeps at most 300 detections per image across classes.
LVIS_MAX_DETS_PER_IMAGE = 300


def check_num_classes(cfg) -> None:
    """``MODEL.ROI_HEADS.NUM_CLASSES`` must equal the training set's number of classes
    (the classic mistake: LVIS v0.5 has 1230 classes, v1 has 1203)."""
    for name in cfg.DATASETS.TRAIN:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but dataset "
                f"'{name}' has {len(classes)} classes (LVIS v0.5: 1230, LVIS v1: 1203)"
            )


def freeze_modules(model, prefixes) -> None:
    """Stop the gradient of every parameter whose name starts with one of ``prefixes``.

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
    frozen = 0
    for name, param in model.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            param.requires_grad_(False)
            frozen += param.numel()
    if prefixes:
        logger.info(f"Froze {frozen} parameters under {list(prefixes)}")


class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer``; only the builders differ:

    - ``build_model`` checks the class count against the training set and freezes
      ``MODEL.FROZEN_MODULES`` (the decoupled classifier fine-tune stage);
    - ``build_evaluator`` returns :class:`LVISLongTailEvaluator` (LVIS metrics with
      APr/APc/APf under ``TEST.EVAL_PROTOCOL``, per-class diagnostics, and the results file,
      which is all a test-dev split gets).

    - ``build_train_loader`` maps training images with ``LongTailDatasetMapper``
      (``INPUT.AUGMENTATIONS``; multi-image steps draw through the same sampler, so the
      repeat-factor sampler still decides which images appear).

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

    @classmethod
    def build_train_loader(cls, cfg):
        return build_longtail_train_loader(cfg)

    @classmethod
    def build_model(cls, cfg):
        check_num_classes(cfg)
        model = super().build_model(cfg)
        freeze_modules(model, cfg.MODEL.FROZEN_MODULES)
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
        """:class:`LVISLongTailEvaluator` with ``TEST.EVAL_PROTOCOL``, ``TEST.FIXED_AP`` and
        ``TEST.LVIS_EVALUATOR``; per-class diagnostics get the training set's image counts."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        protocol = cfg.TEST.EVAL_PROTOCOL
        cap = cfg.TEST.DETECTIONS_PER_IMAGE
        if protocol == "fixed" and 0 <= cap <= LVIS_MAX_DETS_PER_IMAGE:
            logger.warning(
                f"TEST.EVAL_PROTOCOL 'fixed' with TEST.DETECTIONS_PER_IMAGE {cap}: the model "
                f"keeps at most {cap} detections per image, so Fixed AP is underestimated; set "
                "TEST.DETECTIONS_PER_IMAGE to -1 or e.g. 1000 (see lvis_longtail/config.py)."
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
        )


def train_image_counts(cfg):
    """``{dataset category id: training images}`` of ``DATASETS.TRAIN[0]``, or None if its
    metadata has no ``class_image_count``."""
    if not cfg.DATASETS.TRAIN:
        return None
    meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    try:  # lazily derived from the training json, which an eval-only run may not have
        counts = meta.get("class_image_count")
    except (OSError, ValueError) as e:
        logger.warning(f"No training image counts for the per-class diagnostics: {e}")
        return None
    if counts is None:
        return None
    mapping = meta.get("thing_dataset_id_to_contiguous_id") or {
        k + 1: k for k in range(len(counts))
    }
    return {cat: int(counts[k]) for cat, k in mapping.items() if k < len(counts)}
