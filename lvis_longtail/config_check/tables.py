"""The tables of the config check: the valid values of every enum key, the registry of every
registry-named key, and the renamed keys."""

from typing import Dict, Tuple

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
from detectron2.utils.registry import Registry

from lvis_longtail.registries import CLS_LOSS_REGISTRY, LONGTAIL_AUGMENTATION_REGISTRY

# Value sets shared by several keys or read by the code that dispatches on them.
POOLER_TYPES = ("ROIAlignV2", "ROIAlign", "ROIPool", "ROIAlignRotated", "DeformROIAlignV2")
NMS_TYPES = ("hard", "soft_linear", "soft_gaussian")
COUNT_SOURCES = ("image", "instance")
IGNORE_METRICS = ("iou", "iof")
SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler")
# The tasks TEST.LVIS_TASKS may list (a non-empty subset; a rule checks it).
LVIS_TASKS = ("bbox", "segm", "boundary")

# Keys whose value must be one of a fixed set: full key -> valid values, in node order. The
# detectron2 keys are those lvis_longtail depends on (detectron2 0.6 checks some late, e.g.
# the sampler when the loader is built, or only with a bare error).
ENUMS: Dict[str, Tuple] = {
    "DATASETS.IMAGE_CHECK": ("all", "sample", "none"),
    "DATALOADER.SAMPLER_TRAIN": SAMPLERS,  # detectron2's
    "INPUT.MASK_FORMAT": ("polygon", "bitmask"),  # detectron2's
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": ("choice", "range"),  # detectron2's
    "INPUT.SCALE_JITTER.PRESET": ("custom", "lsj_1024", "mmdet_1280"),
    "MODEL.FPN.UPSAMPLE_TYPE": ("nearest", "carafe"),
    "MODEL.TIMM.NORM": ("", "FrozenBN", "SyncBN", "naiveSyncBN"),
    "MODEL.FPG.NORM": ("", "BN", "SyncBN", "naiveSyncBN", "GN"),
    "MODEL.FPG.DOWNSAMPLE_TYPE": ("conv", "carafe"),
    "MODEL.RPN.BBOX_REG_LOSS_TYPE": ("smooth_l1", "giou"),  # detectron2's
    "MODEL.RPN.IGNORE.METRIC": IGNORE_METRICS,
    "MODEL.ROI_HEADS.NMS_TYPE": NMS_TYPES,
    "MODEL.ROI_HEADS.IGNORE.METRIC": IGNORE_METRICS,
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": ("smooth_l1", "giou"),  # detectron2's
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": POOLER_TYPES,  # detectron2's, one value added
    "MODEL.ROI_BOX_HEAD.PREDICTOR_TYPE": ("Linear", "NormedLinear"),
    "MODEL.ROI_BOX_HEAD.LOGIT_ADJUSTMENT.COUNT": COUNT_SOURCES,
    "MODEL.ROI_BOX_HEAD.BALANCED_SOFTMAX.COUNT": COUNT_SOURCES,
    "MODEL.ROI_BOX_HEAD.DUAL_HEAD.BRANCH": ("box_head", "classifier"),
    "MODEL.ROI_BOX_HEAD.DUAL_HEAD.INIT": ("copy", "random"),
    "MODEL.ROI_BOX_HEAD.DUAL_HEAD.FUSION": ("mean", "geometric", "group"),
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE": POOLER_TYPES,  # detectron2's, one value added
    "MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE": ("Conv", "NormedConv"),
    "MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT": ("box", "area_ratio"),
    "MODEL.ROI_MASK_HEAD.TEST_AREA_RATIO": ("one", "two_pass"),
    "MODEL.ROI_MASK_HEAD.UPSAMPLE_TYPE": ("deconv", "carafe"),
    "SOLVER.LR_SCHEDULER_NAME": ("WarmupMultiStepLR", "WarmupCosineLR"),  # detectron2's
    "SOLVER.WARMUP_METHOD": ("linear", "constant"),  # detectron2's
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": ("value", "norm"),  # detectron2's
    "TEST.EVAL_PROTOCOL": ("standard", "fixed", "challenge2021"),
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
    "MODEL.ROI_BOX_HEAD.DUAL_HEAD.CLS_LOSS_NAME": (CLS_LOSS_REGISTRY, ()),
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
