"""The one validation pass over a config, run by ``setup_cfg`` before any model or data is built.

It owns, each with a message that names the key and what would be valid: :data:`ENUMS`
(every key whose value is one of a fixed set, lvis_longtail's and the detectron2 keys it
depends on, each set declared once: code that dispatches on such a value imports it from
here); :data:`REGISTRY_KEYS` (every key naming registry entries, each name of
``INPUT.AUGMENTATIONS`` included); :data:`RENAMED` (an old key in a file or option is rejected
with "X was renamed to Y"); the cross-key rules of :data:`RULES`; and the datasets of
``DATASETS.TRAIN``/``TEST``/``EXTRA_TRAIN`` (registered; with ``check_files``, as
``train_net.py`` asks, their json files exist). Unknown keys get the closest known keys, and
``--flags`` placed after ``KEY VALUE`` options are named. Extending it: add a key to
:data:`ENUMS` or :data:`REGISTRY_KEYS`, or decorate a ``fn(cfg) -> Optional[str]`` with
:func:`rule`.

Layering: of lvis_longtail, this module imports only :mod:`lvis_longtail.config` and
:mod:`lvis_longtail.registries`, never ``data`` or ``modeling`` (which import it). Registries
are read when a config is checked (``import lvis_longtail`` fills them); a rule that depends on
what a registered class can do reads a class attribute the class declares
(``supports_loss_weight``, ``supports_predictor_options``) instead of importing the class.
"""

import difflib
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import (
    ANCHOR_GENERATOR_REGISTRY,
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    PROPOSAL_GENERATOR_REGISTRY,
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    RPN_HEAD_REGISTRY,
)
from detectron2.modeling.roi_heads import CascadeROIHeads
from detectron2.utils.registry import Registry

from lvis_longtail.config import ConfigError
from lvis_longtail.registries import CLS_LOSS_REGISTRY, LONGTAIL_AUGMENTATION_REGISTRY

__all__ = ["ConfigError", "ENUMS", "REGISTRY_KEYS", "RENAMED", "RULES", "check_config"]

# Value sets shared by several keys.
POOLER_TYPES = ("ROIAlignV2", "ROIAlign", "ROIPool", "ROIAlignRotated", "DeformROIAlignV2")
NMS_TYPES = ("hard", "soft_linear", "soft_gaussian")
COUNT_SOURCES = ("image", "instance")
IGNORE_METRICS = ("iou", "iof")

# Keys whose value must be one of a fixed set: full key -> valid values, in node order. The
# detectron2 keys are those lvis_longtail depends on (detectron2 0.6 checks some late, e.g.
# the sampler when the loader is built, or only with a bare error).
ENUMS: Dict[str, Tuple] = {
    "DATALOADER.SAMPLER_TRAIN": (  # detectron2's
        "TrainingSampler",
        "RepeatFactorTrainingSampler",
        "RandomSubsetTrainingSampler",
    ),
    "INPUT.MASK_FORMAT": ("polygon", "bitmask"),  # detectron2's
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": ("choice", "range"),  # detectron2's
    "INPUT.SCALE_JITTER.PRESET": ("custom", "lsj_1024", "mmdet_1280"),
    "MODEL.FPN.UPSAMPLE_TYPE": ("nearest", "carafe"),
    "MODEL.TIMM.NORM": ("", "FrozenBN", "SyncBN", "naiveSyncBN"),
    "MODEL.RPN.BBOX_REG_LOSS_TYPE": ("smooth_l1", "giou"),  # detectron2's
    "MODEL.RPN.IGNORE.METRIC": IGNORE_METRICS,
    "MODEL.ROI_HEADS.NMS_TYPE": NMS_TYPES,
    "MODEL.ROI_HEADS.IGNORE.METRIC": IGNORE_METRICS,
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": ("smooth_l1", "giou"),  # detectron2's
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": POOLER_TYPES,  # detectron2's, one value added
    "MODEL.ROI_BOX_HEAD.PREDICTOR_TYPE": ("Linear", "NormedLinear"),
    "MODEL.ROI_BOX_HEAD.LOGIT_ADJUSTMENT.COUNT": COUNT_SOURCES,
    "MODEL.ROI_BOX_HEAD.BALANCED_SOFTMAX.COUNT": COUNT_SOURCES,
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE": POOLER_TYPES,  # detectron2's, one value added
    "MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE": ("Conv", "NormedConv"),
    "MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT": ("box", "area_ratio"),
    "MODEL.ROI_MASK_HEAD.TEST_AREA_RATIO": ("one", "two_pass"),
    "MODEL.ROI_MASK_HEAD.UPSAMPLE_TYPE": ("deconv", "carafe"),
    "SOLVER.LR_SCHEDULER_NAME": ("WarmupMultiStepLR", "WarmupCosineLR"),  # detectron2's
    "SOLVER.WARMUP_METHOD": ("linear", "constant"),  # detectron2's
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": ("value", "norm"),  # detectron2's
    "TEST.EVAL_PROTOCOL": ("standard", "fixed"),
    "TEST.LVIS_EVALUATOR": ("fast", "lvis_api"),
    "TEST.CLS_CALIBRATION": ("none", "norcal", "logit_adjustment"),
    "TEST.NORCAL.COUNT": COUNT_SOURCES,
    "TEST.LOGIT_ADJUSTMENT.COUNT": COUNT_SOURCES,
    "TEST.AUG.MERGE_NMS_TYPE": NMS_TYPES,
    "TEST.AUG.MASK_RULE": ("mean", "select"),
}

# Keys that name registry entries: full key -> (registry, names the builder accepts without
# an entry). A list-valued key (INPUT.AUGMENTATIONS) has each of its names checked.
REGISTRY_KEYS: Dict[str, Tuple[Registry, Tuple[str, ...]]] = {
    "INPUT.AUGMENTATIONS": (LONGTAIL_AUGMENTATION_REGISTRY, ()),
    "MODEL.META_ARCHITECTURE": (META_ARCH_REGISTRY, ()),
    "MODEL.BACKBONE.NAME": (BACKBONE_REGISTRY, ()),
    "MODEL.PROPOSAL_GENERATOR.NAME": (PROPOSAL_GENERATOR_REGISTRY, ("PrecomputedProposals",)),
    "MODEL.RPN.HEAD_NAME": (RPN_HEAD_REGISTRY, ()),
    "MODEL.ANCHOR_GENERATOR.NAME": (ANCHOR_GENERATOR_REGISTRY, ()),
    "MODEL.ROI_HEADS.NAME": (ROI_HEADS_REGISTRY, ()),
    "MODEL.ROI_BOX_HEAD.NAME": (ROI_BOX_HEAD_REGISTRY, ()),
    "MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME": (CLS_LOSS_REGISTRY, ()),
    "MODEL.ROI_MASK_HEAD.NAME": (ROI_MASK_HEAD_REGISTRY, ()),
}

# Keys that were renamed: old full key -> new full key.
RENAMED: Dict[str, str] = {
    "MODEL.ROI_BOX_HEAD.CLS_PREDICTOR": "MODEL.ROI_BOX_HEAD.PREDICTOR_TYPE",
    "MODEL.ROI_MASK_HEAD.PREDICTOR": "MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE",
    "MODEL.ROI_MASK_HEAD.MASK_SCORING": "MODEL.ROI_MASKIOU_HEAD.ENABLED",
    "MODEL.ROI_MASK_HEAD.MASK_SCORING_LOSS_WEIGHT": "MODEL.ROI_MASKIOU_HEAD.LOSS_WEIGHT",
    "MODEL.CPU_THREADS": "CPU_THREADS",
    "MODEL.OPENCV_THREADS": "OPENCV_THREADS",
}

RULES: List[Callable] = []
SYNTHETIC_HINT = (
    "generate it with `python -m lvis_longtail.data.synthetic --out DIR` (or `make data`); "
    "datasets are found under $DETECTRON2_DATASETS (default ./datasets)"
)


def rule(fn: Callable) -> Callable:
    """Register ``fn(cfg) -> error message or None`` as a cross-key rule."""
    RULES.append(fn)
    return fn


def get_key(cfg, key: str):
    """The value of the dotted ``key`` of ``cfg`` (KeyError if absent)."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def all_keys(cfg, prefix: str = "") -> List[str]:
    """Every leaf key of ``cfg`` (a config or a nested dict), dotted."""
    out = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        out.extend(all_keys(v, full + ".") if isinstance(v, dict) else [full])
    return out


def closest(word: str, candidates: Iterable[str], n: int = 3) -> List[str]:
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)


def renamed_error(source: str, keys: Iterable[str]) -> Optional[ConfigError]:
    """A :class:`ConfigError` naming every renamed key among ``keys``, or None."""
    old = [k for k in keys if k in RENAMED]
    if not old:
        return None
    lines = [f"{k} was renamed to {RENAMED[k]}" for k in old]
    return ConfigError(f"{source}: " + "; ".join(lines))


def unknown_key_error(cfg, source: str, message: str, keys: Sequence[str] = ()) -> ConfigError:
    """yacs' "Non-existent (config) key: X" message, with the closest known keys, or, when
    X or another of ``keys`` (those ``source`` sets) was renamed, the new names."""
    key = message.rsplit(": ", 1)[-1].strip()
    renamed = renamed_error(source, list(dict.fromkeys([key, *keys])))
    if renamed is not None:
        return renamed
    known = all_keys(cfg)
    near = closest(key, known) or closest(key.rsplit(".", 1)[-1], known)
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    return ConfigError(f"{source}: {message}{hint}")


def check_opts(opts: List[str]) -> None:
    """``train_net.py --config-file F KEY VALUE --eval-only``: argparse hands every token
    after the first ``KEY`` to the config, flags included. Renamed keys are named too."""
    flags = [o for o in opts if isinstance(o, str) and o.startswith("--") and o[2:3].isalpha()]
    if flags:
        raise ConfigError(
            f"command-line options: {', '.join(flags)} came after the KEY VALUE options, "
            "where every token is read as config; put flags first, e.g. "
            "`train_net.py --eval-only --config-file F KEY VALUE ...`"
        )
    if len(opts) % 2:
        raise ConfigError(
            f"command-line options must be KEY VALUE pairs, got {len(opts)} tokens: {opts}"
        )
    renamed = renamed_error("command-line options", opts[::2])
    if renamed is not None:
        raise renamed


def _check_enums(cfg, errors: List[str]) -> None:
    known = set(all_keys(cfg))
    for key, choices in ENUMS.items():
        if key not in known:
            continue
        value = get_key(cfg, key)
        if value not in choices:
            near = closest(str(value), [str(c) for c in choices], n=1)
            hint = f" (closest: {near[0]!r})" if near else ""
            errors.append(f"{key} is {value!r}; valid values: {list(choices)}{hint}")


def registered_names(key: str) -> List[str]:
    """The names ``key`` of :data:`REGISTRY_KEYS` accepts, sorted."""
    registry, extra = REGISTRY_KEYS[key]
    return sorted([name for name, _ in registry] + list(extra))


def _check_registries(cfg, errors: List[str]) -> None:
    known = set(all_keys(cfg))
    for key in REGISTRY_KEYS:
        if key not in known:
            continue
        value = get_key(cfg, key)
        names = registered_names(key)
        for i, name in enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]:
            if name in names:
                continue
            near = closest(str(name), names, n=1)
            hint = f"; closest: {near[0]!r}" if near else ""
            where = key if i is None else f"{key}[{i}]"
            errors.append(
                f"{where} is {name!r}, which is not registered{hint}; registered: {names}"
            )


def _registered_class(registry: Registry, name: str):
    """The object registered as ``name``, or None (an unknown name has its own error)."""
    return registry.get(name) if name in registry else None


def _missing_json(name: str, json_file: str) -> str:
    hint = f"; {SYNTHETIC_HINT}" if "synthetic" in f"{name} {json_file}" else ""
    return f"json file {json_file!r} not found (resolved: {os.path.abspath(json_file)}){hint}"


def _check_datasets(cfg, errors: List[str], check_files: bool, eval_only: bool) -> None:
    for i, entry in enumerate(cfg.DATASETS.LVIS_FORMAT):
        name, json_file = entry[0], entry[1]
        needed = name in cfg.DATASETS.TEST or not eval_only
        if check_files and needed and not os.path.isfile(json_file):
            errors.append(f"DATASETS.LVIS_FORMAT[{i}] ('{name}'): {_missing_json(name, json_file)}")
    listed = {e[0] for e in cfg.DATASETS.LVIS_FORMAT}
    # metadata-only registrations (class statistics for a model, no data) count too
    registered = sorted(set(DatasetCatalog.list()) | set(MetadataCatalog.list()))
    for key in ("DATASETS.TRAIN", "DATASETS.TEST", "DATASETS.EXTRA_TRAIN"):
        for name in get_key(cfg, key):
            if name not in registered:
                near = closest(name, registered, n=1)
                hint = f"; closest: '{near[0]}'" if near else ""
                errors.append(
                    f"{key}: dataset '{name}' is not registered{hint} (register your own "
                    "with DATASETS.LVIS_FORMAT [[name, json, image_root]])"
                )
                continue
            if not check_files or name in listed or (eval_only and key != "DATASETS.TEST"):
                continue
            json_file = MetadataCatalog.get(name).get("json_file")
            if json_file and not os.path.isfile(json_file):
                errors.append(f"{key}: dataset '{name}' {_missing_json(name, json_file)}")


@rule
def _cascade_needs_class_agnostic_boxes(cfg) -> Optional[str]:
    heads = _registered_class(ROI_HEADS_REGISTRY, cfg.MODEL.ROI_HEADS.NAME)
    is_cascade = heads is not None and issubclass(heads, CascadeROIHeads)
    if is_cascade and not cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG:
        return (
            f"MODEL.ROI_HEADS.NAME {cfg.MODEL.ROI_HEADS.NAME!r} regresses class-agnostic boxes "
            "at every stage: set MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True"
        )
    return None


@rule
def _extra_images_need_grouped_weighted_batches(cfg) -> Optional[str]:
    if not cfg.DATASETS.EXTRA_TRAIN:
        return None
    weight = cfg.DATASETS.EXTRA_TRAIN_LOSS_WEIGHT
    if not (weight > 0):
        return f"DATASETS.EXTRA_TRAIN_LOSS_WEIGHT must be > 0, got {weight}"
    arch = _registered_class(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE)
    if arch is None or not getattr(arch, "supports_loss_weight", False):
        return (
            "DATASETS.EXTRA_TRAIN needs MODEL.META_ARCHITECTURE 'LongTailRCNN' (it applies "
            f"DATASETS.EXTRA_TRAIN_LOSS_WEIGHT), got {cfg.MODEL.META_ARCHITECTURE!r}"
        )
    if not cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        return (
            "DATASETS.EXTRA_TRAIN needs DATALOADER.ASPECT_RATIO_GROUPING True (batches of one "
            "source, so each gets its loss weight)"
        )
    samplers = ("TrainingSampler", "RepeatFactorTrainingSampler")
    if cfg.DATALOADER.SAMPLER_TRAIN not in samplers:
        return (
            f"DATASETS.EXTRA_TRAIN works with DATALOADER.SAMPLER_TRAIN {' or '.join(samplers)}, "
            f"not {cfg.DATALOADER.SAMPLER_TRAIN!r}"
        )
    return None


@rule
def _two_pass_needs_area_ratio_levels(cfg) -> Optional[str]:
    head = cfg.MODEL.ROI_MASK_HEAD
    if head.TEST_AREA_RATIO == "two_pass" and head.LEVEL_ASSIGNMENT != "area_ratio":
        return (
            'MODEL.ROI_MASK_HEAD.TEST_AREA_RATIO "two_pass" needs LEVEL_ASSIGNMENT "area_ratio" '
            f"(got {head.LEVEL_ASSIGNMENT!r})"
        )
    return None


@rule
def _mask_predictor_options_need_their_head(cfg) -> Optional[str]:
    head = cfg.MODEL.ROI_MASK_HEAD
    options = [f"PREDICTOR_TYPE {head.PREDICTOR_TYPE!r}"] if head.PREDICTOR_TYPE != "Conv" else []
    if head.BOUNDARY_LOSS_WEIGHT > 0:
        options.append(f"BOUNDARY_LOSS_WEIGHT {head.BOUNDARY_LOSS_WEIGHT}")
    cls = _registered_class(ROI_MASK_HEAD_REGISTRY, head.NAME)
    if not options or cls is None or getattr(cls, "supports_predictor_options", False):
        return None
    return (
        f"MODEL.ROI_MASK_HEAD.{' and '.join(options)}: only a mask head that reads them "
        f"does (NAME 'DiceBCEMaskHead'), not NAME {head.NAME!r}"
    )


@rule
def _deform_mask_pooler_not_with_area_ratio(cfg) -> Optional[str]:
    head = cfg.MODEL.ROI_MASK_HEAD
    if head.POOLER_TYPE == "DeformROIAlignV2" and head.LEVEL_ASSIGNMENT == "area_ratio":
        return (
            'MODEL.ROI_MASK_HEAD.POOLER_TYPE "DeformROIAlignV2" and LEVEL_ASSIGNMENT '
            '"area_ratio" each replace the mask pooler; use one or the other'
        )
    return None


@rule
def _htc_lite_mask_stage_is_a_stage(cfg) -> Optional[str]:
    stages = len(cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS)
    stage = cfg.MODEL.ROI_HEADS.HTC_LITE.MASK_TRAIN_STAGE
    if -stages <= stage < stages:
        return None
    return (
        f"MODEL.ROI_HEADS.HTC_LITE.MASK_TRAIN_STAGE {stage} is not a stage of the "
        f"{stages}-stage cascade (MODEL.ROI_BOX_CASCADE_HEAD.IOUS)"
    )


@rule
def _tta_options_agree(cfg) -> Optional[str]:
    aug = cfg.TEST.AUG
    scales = len(aug.SCALES) or len(aug.MIN_SIZES)
    if len(aug.VALID_RANGES) and len(aug.VALID_RANGES) != scales:
        return (
            f"TEST.AUG.VALID_RANGES has {len(aug.VALID_RANGES)} ranges for {scales} scales "
            "(TEST.AUG.SCALES or MIN_SIZES): give one [lo, hi] per scale"
        )
    if aug.MASK_RULE == "select" and not len(aug.VALID_RANGES):
        return 'TEST.AUG.MASK_RULE "select" needs TEST.AUG.VALID_RANGES'
    if aug.ENABLED and (cfg.MODEL.KEYPOINT_ON or cfg.MODEL.LOAD_PROPOSALS):
        return "TEST.AUG.ENABLED does not support MODEL.KEYPOINT_ON or MODEL.LOAD_PROPOSALS"
    return None


@rule
def _checkpoint_keep_not_negative(cfg) -> Optional[str]:
    keep = cfg.SOLVER.CHECKPOINT_KEEP
    if keep < 0:
        return f"SOLVER.CHECKPOINT_KEEP must be >= 0 (0 keeps every checkpoint), got {keep}"
    return None


def check_config(cfg, *, check_files: bool = False, eval_only: bool = False) -> None:
    """Check ``cfg`` (see the module docstring); all problems are reported at once.

    Args:
        check_files: also require the json files of ``DATASETS.LVIS_FORMAT`` and of the
            registered ``DATASETS.TRAIN`` / ``TEST`` / ``EXTRA_TRAIN`` sets (loading a config
            needs no data).
        eval_only: with ``check_files``, only the test sets' files.

    Raises:
        ConfigError: one line per problem.
    """
    errors: List[str] = []
    _check_enums(cfg, errors)
    _check_registries(cfg, errors)
    _check_datasets(cfg, errors, check_files, eval_only)
    errors.extend(msg for msg in (r(cfg) for r in RULES) if msg)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
