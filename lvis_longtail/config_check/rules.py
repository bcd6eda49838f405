"""The cross-key rules of the config check: each ``fn(cfg) -> message or None``, registered
with :func:`rule`. A rule that depends on what a registered class can do reads a class
attribute the class declares (``supports_loss_weight``, ``supports_predictor_options``)
instead of importing the class, which lives in a higher layer."""

import functools
import os
import re
from typing import Callable, List, Optional

from detectron2.modeling import META_ARCH_REGISTRY, ROI_HEADS_REGISTRY, ROI_MASK_HEAD_REGISTRY
from detectron2.modeling.roi_heads import CascadeROIHeads
from detectron2.utils.registry import Registry

from lvis_longtail.config_check.tables import LVIS_TASKS, SAMPLERS

RULES: List[Callable] = []


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


def _registered_class(registry: Registry, name: str):
    """The object registered as ``name``, or None (an unknown name has its own error)."""
    return registry.get(name) if name in registry else None


def check_task_evaluator(task: str, evaluator: str) -> None:
    """Raise ValueError for Boundary AP with lvis-api 0.5.3, which has no boundary IoU."""
    if task == "boundary" and evaluator != "fast":
        raise ValueError(
            "Boundary AP is computed by the fast evaluator only: lvis-api 0.5.3 (the 'lvis' "
            "package) has no boundary IoU (the fast evaluator gives the numbers of lvis-api's "
            "lvis_challenge_2021 branch); use evaluator 'fast' (TEST.LVIS_EVALUATOR fast)"
        )


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
    samplers = SAMPLERS[:2]  # the two whose order the extra images' sampler follows
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


# Keys that only lvis_longtail's ROI heads read: detectron2's own heads would ignore them.
PROJECT_HEAD_KEYS = (
    "MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME",
    "MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED",
    "MODEL.ROI_BOX_HEAD.PREDICTOR_TYPE",
    "MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE",
    "MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT",
    "MODEL.ROI_MASK_HEAD.UPSAMPLE_TYPE",
    "MODEL.ROI_MASKIOU_HEAD.ENABLED",
    "MODEL.ROI_HEADS.NMS_TYPE",
    "TEST.CLS_CALIBRATION",
)


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    from detectron2.config import get_cfg

    from lvis_longtail.config import add_longtail_config

    cfg = get_cfg()
    add_longtail_config(cfg)
    return {k: get_key(cfg, k) for k in PROJECT_HEAD_KEYS}


@rule
def _project_keys_need_project_heads(cfg) -> Optional[str]:
    heads = _registered_class(ROI_HEADS_REGISTRY, cfg.MODEL.ROI_HEADS.NAME)
    if heads is None or getattr(heads, "reads_longtail_keys", False):
        return None
    changed = [k for k, v in _defaults().items() if get_key(cfg, k) != v]
    if not changed:
        return None
    return (
        f"{', '.join(changed)}: read by lvis_longtail's ROI heads only (LongTailROIHeads, the "
        f"cascade, HTC-Lite, HTC); {cfg.MODEL.ROI_HEADS.NAME!r} would silently ignore it; use "
        "one of those heads or leave the default"
    )


@rule
def _tsd_options(cfg) -> Optional[str]:
    tsd, box = cfg.MODEL.ROI_BOX_HEAD.TSD, cfg.MODEL.ROI_BOX_HEAD
    if not tsd.ENABLED:
        return None
    heads = _registered_class(ROI_HEADS_REGISTRY, cfg.MODEL.ROI_HEADS.NAME)
    if heads is not None and not getattr(heads, "supports_tsd", False):
        return (
            f"MODEL.ROI_BOX_HEAD.TSD needs ROI heads that run TSD heads (LongTailROIHeads, "
            f"the cascade, HTC-Lite, HTC), not {cfg.MODEL.ROI_HEADS.NAME!r}"
        )
    if box.POOLER_TYPE != "ROIAlignV2":
        return (
            "MODEL.ROI_BOX_HEAD.TSD re-samples around the ROIAlignV2 box features: set "
            f"MODEL.ROI_BOX_HEAD.POOLER_TYPE 'ROIAlignV2', not {box.POOLER_TYPE!r}"
        )
    if not tsd.GAMMA > 0 or tsd.OFFSET_FC_DIM < 1:
        return (
            f"MODEL.ROI_BOX_HEAD.TSD.GAMMA must be > 0 ({tsd.GAMMA}) and OFFSET_FC_DIM >= 1 "
            f"({tsd.OFFSET_FC_DIM})"
        )
    for key in ("PC_CLS_MARGIN", "PC_LOC_MARGIN"):
        if not 0.0 <= tsd[key] <= 1.0:
            return f"MODEL.ROI_BOX_HEAD.TSD.{key} must be in [0, 1], got {tsd[key]}"
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


@rule
def _lvis_tasks(cfg) -> Optional[str]:
    tasks = tuple(cfg.TEST.LVIS_TASKS)
    if not tasks or not set(tasks) <= set(LVIS_TASKS):
        return f"TEST.LVIS_TASKS is {tasks}; it must be a non-empty subset of {LVIS_TASKS}"
    if not cfg.TEST.BOUNDARY_DILATION_RATIO > 0:
        return f"TEST.BOUNDARY_DILATION_RATIO must be > 0, got {cfg.TEST.BOUNDARY_DILATION_RATIO}"
    boundary = "boundary" in tasks or cfg.TEST.EVAL_PROTOCOL == "challenge2021"
    try:
        check_task_evaluator("boundary" if boundary else "bbox", cfg.TEST.LVIS_EVALUATOR)
    except ValueError as e:
        return f"TEST.LVIS_TASKS / TEST.EVAL_PROTOCOL: {e}"
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _at_least(key: str, value, low, what: str = "an integer") -> Optional[str]:
    if isinstance(value, int) and not isinstance(value, bool) and value >= low:
        return None
    return f"{key} must be {what} >= {low}, got {value!r}"


@rule
def _schedule_and_batch_ranges(cfg) -> Optional[str]:
    solver = cfg.SOLVER
    problems = [
        _at_least("SOLVER.MAX_ITER", solver.MAX_ITER, 1),
        _at_least("SOLVER.IMS_PER_BATCH", solver.IMS_PER_BATCH, 1),
        _at_least("DATALOADER.NUM_WORKERS", cfg.DATALOADER.NUM_WORKERS, 0),
    ]
    if not (_is_number(solver.BASE_LR) and 0 < solver.BASE_LR < float("inf")):
        problems.append(f"SOLVER.BASE_LR must be a number > 0, got {solver.BASE_LR!r}")
    return "; ".join(p for p in problems if p) or None


@rule
def _inference_ranges(cfg) -> Optional[str]:
    problems = []
    thresh = cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST
    if not (_is_number(thresh) and 0.0 <= thresh <= 1.0):
        problems.append(f"MODEL.ROI_HEADS.SCORE_THRESH_TEST must be in [0, 1], got {thresh!r}")
    cap = cfg.TEST.DETECTIONS_PER_IMAGE
    if not (isinstance(cap, int) and not isinstance(cap, bool) and (cap >= 1 or cap == -1)):
        problems.append(f"TEST.DETECTIONS_PER_IMAGE must be >= 1, or -1 for no cap, got {cap!r}")
    return "; ".join(problems) or None


# train_net.py runs on the CPU (gloo) or on CUDA GPUs (nccl); torch's other device types are
# not supported by its launcher
DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@rule
def _device_and_output_dir(cfg) -> Optional[str]:
    device = cfg.MODEL.DEVICE
    if not isinstance(device, str) or not DEVICE.match(device):
        return f"MODEL.DEVICE must be 'cpu', 'cuda' or 'cuda:N', got {device!r}"
    out = cfg.OUTPUT_DIR
    if out and os.path.exists(out) and not os.path.isdir(out):
        return f"OUTPUT_DIR {out!r} exists and is not a folder"
    return None
