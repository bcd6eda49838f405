"""Config keys added by lvis_longtail. Every key is documented here, where it is defined.

Selectors live on the node that owns the component (``MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME``),
each method's parameters in a sub-node (``MODEL.ROI_BOX_HEAD.SEESAW.P``).
"""

from typing import Dict, Tuple

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg


class ConfigError(ValueError):
    """A config file or option names an unknown key or has a malformed value."""


# Keys whose value must be one of a fixed set: full key -> valid values. Filled by _enum() as
# the keys are defined below, so the valid values of an enum live next to its definition.
ENUM_KEYS: Dict[str, Tuple] = {}


def _enum(cfg: CN, key: str, default, choices) -> None:
    """Define the key ``key`` (full dotted path) of ``cfg`` with ``default`` and record its
    valid values in :data:`ENUM_KEYS`."""
    choices = tuple(choices)
    if default not in choices:
        raise ValueError(f"default {default!r} of {key} is not one of {choices}")
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[leaf] = default
    ENUM_KEYS[key] = choices


def setup_cfg(config_file: str, opts=()) -> CN:
    """Load a config: detectron2 defaults + lvis_longtail keys + ``config_file`` + ``opts``.

    Also registers the datasets listed in ``DATASETS.LVIS_FORMAT``. Returns a frozen config.
    """
    from lvis_longtail.data import register_from_config

    cfg = get_cfg()
    add_longtail_config(cfg)
    # yacs reports an unknown key as a KeyError (file) or a bare AssertionError (opts).
    try:
        cfg.merge_from_file(config_file)
    except KeyError as e:
        raise ConfigError(f"{config_file}: {e.args[0]}") from None
    try:
        cfg.merge_from_list(list(opts))
    except (AssertionError, KeyError) as e:
        raise ConfigError(f"command-line options: {e.args[0]}") from None
    register_from_config(cfg)
    cfg.freeze()
    return cfg


def add_longtail_config(cfg: CN) -> CN:
    """Add lvis_longtail's keys, with their defaults, to a detectron2 config in place."""
    _add_dataset_config(cfg)
    _add_model_config(cfg)
    _add_roi_heads_config(cfg)
    _add_box_head_config(cfg)
    _add_mask_head_config(cfg)
    _add_test_config(cfg)
    _add_nms_config(cfg)
    _add_tta_config(cfg)
    return cfg


def _add_dataset_config(cfg: CN) -> None:
    # Extra LVIS-format datasets to register before training/evaluation, so no Python edit is
    # needed: a list of [name, json_file, image_root] triplets. Image paths are taken from each
    # image's `file_name` (relative to image_root) or, failing that, from the last two
    # components of its `coco_url` (LVIS v1 style). Metadata (class names, frequency groups,
    # image/instance counts) is derived from the json itself. Example on the command line:
    #   DATASETS.LVIS_FORMAT "[['my_train', 'ann/train.json', 'images/']]"
    cfg.DATASETS.LVIS_FORMAT = []


def _add_model_config(cfg: CN) -> None:
    # Parameter-name prefixes whose parameters are not trained, e.g. ["backbone",
    # "proposal_generator"] for the decoupled classifier fine-tune stage of Balanced Group
    # Softmax (start it from a trained model with MODEL.WEIGHTS). A prefix that matches no
    # parameter is an error.
    cfg.MODEL.FROZEN_MODULES = []


def _add_roi_heads_config(cfg: CN) -> None:
    # Box size (sqrt of area, input pixels) pooled from FPN level 4 by the box and mask RoI
    # poolers: level = floor(4 + log2(sqrt(w h) / CANONICAL_BOX_SIZE)), clamped to the
    # pooled levels. 224 is detectron2's constant, made for ~800 px images; scale it with the
    # input size (the tiny 128 px configs use 36), or every RoI is pooled from P2.
    cfg.MODEL.ROI_HEADS.CANONICAL_BOX_SIZE = 224


def _add_box_head_config(cfg: CN) -> None:
    head = cfg.MODEL.ROI_BOX_HEAD
    # Classification loss of the box predictor, a name in CLS_LOSS_REGISTRY: "SoftmaxCE"
    # (detectron2's behaviour), "SigmoidCE", "SeesawLoss", "EQL", "EQLv2", "GroupSoftmax"
    # (Balanced Group Softmax), "FederatedLoss". The loss decides how many logits the
    # classifier produces and how they become [K class scores, background] probabilities.
    head.CLS_LOSS_NAME = "SoftmaxCE"
    # Weight of the classification loss term(s).
    head.CLS_LOSS_WEIGHT = 1.0
    # Classifier layer: "Linear" or "NormedLinear" (cosine classifier: scaled dot product of
    # L2-normalised features and weights, plus a bias). Works with every CLS_LOSS_NAME.
    _enum(cfg, "MODEL.ROI_BOX_HEAD.CLS_PREDICTOR", "Linear", ("Linear", "NormedLinear"))
    # Scale tau of the NormedLinear classifier.
    head.NORMED_SCALE = 20.0

    # Seesaw Loss (Wang et al., CVPR 2021). P: exponent of the mitigation factor
    # (N_j/N_i)^P; Q: exponent of the compensation factor (sigma_j/sigma_i)^Q; EPS: floor of
    # sigma_i in the compensation ratio. P = Q = 0 is plain softmax cross-entropy.
    head.SEESAW = CN()
    head.SEESAW.P = 0.8
    head.SEESAW.Q = 2.0
    head.SEESAW.EPS = 1e-2

    # Equalization Loss (Tan et al., CVPR 2020). LAMBDA: classes whose training image
    # frequency f_j = image_count_j / num_images is below it have their negative gradients
    # from foreground RoIs suppressed (1.1e-3 for LVIS v1, 1.77e-3 for v0.5).
    # PRIOR_PROB: initial sigmoid probability, bias = -log((1 - p) / p).
    head.EQL = CN()
    head.EQL.LAMBDA = 1.1e-3
    head.EQL.PRIOR_PROB = 1e-3

    # Equalization Loss v2 (Tan et al., CVPR 2021): gradient-guided reweighting. GAMMA, MU:
    # slope and centre of the mapping f(g) = 1 / (1 + exp(-GAMMA (g - MU))) of the accumulated
    # positive/negative gradient ratio g; ALPHA: extra weight on positives, 1 + ALPHA (1 - f).
    # PRIOR_PROB: initial sigmoid probability; 0.5 is a zero bias, what the reference
    # (tztztztztz/eqlv2: mmdet's BBoxHead init, no prior in the loss) uses. A focal-style
    # prior of 1e-3 starts every RoI, 3/4 of them background, far from its target: on the
    # synthetic benchmark it cost 11 bbox AP at 250 iterations (benchmarks/results/).
    # Statistics are all-reduced across processes.
    head.EQLV2 = CN()
    head.EQLV2.GAMMA = 12.0
    head.EQLV2.MU = 0.8
    head.EQLV2.ALPHA = 4.0
    head.EQLV2.PRIOR_PROB = 0.5

    # Balanced Group Softmax (Li et al., CVPR 2020). BIN_EDGES: training instance-count
    # edges of the class groups; [10, 100, 1000] gives [0,10), [10,100), [100,1000),
    # [1000, inf) plus the background group. OTHERS_SAMPLE_RATIO: "others" RoIs kept per
    # positive RoI of a group (beta).
    head.GROUP_SOFTMAX = CN()
    head.GROUP_SOFTMAX.BIN_EDGES = [10, 100, 1000]
    head.GROUP_SOFTMAX.OTHERS_SAMPLE_RATIO = 8.0

    # Federated loss (Zhou et al., CenterNet2): sigmoid CE on the classes present in the batch
    # plus classes sampled with weight image_count^FREQ_WEIGHT_POWER, NUM_CLASSES in total.
    # PRIOR_PROB: initial sigmoid probability.
    head.FED_LOSS = CN()
    head.FED_LOSS.NUM_CLASSES = 50
    head.FED_LOSS.FREQ_WEIGHT_POWER = 0.5
    head.FED_LOSS.PRIOR_PROB = 0.01

    # Sigmoid cross-entropy over K class logits (background = all zeros).
    head.SIGMOID_CE = CN()
    head.SIGMOID_CE.PRIOR_PROB = 0.01


def _add_mask_head_config(cfg: CN) -> None:
    head = cfg.MODEL.ROI_MASK_HEAD
    # Balanced mask loss of DiceBCEMaskHead (LVIS 2020 1st place): DICE_LOSS_WEIGHT * dice +
    # BCE_LOSS_WEIGHT * area-ratio-weighted BCE, reported as loss_mask_dice and loss_mask.
    head.DICE_LOSS_WEIGHT = 1.0
    head.BCE_LOSS_WEIGHT = 1.0
    # Upper bound of the foreground pixel weight clip((1 - r) / r, 1, FG_WEIGHT_MAX), r the
    # foreground fraction of the RoI's mask target.
    head.FG_WEIGHT_MAX = 10.0
    # Weight of the auxiliary boundary loss (target derived from the mask target); 0 = off.
    head.BOUNDARY_LOSS_WEIGHT = 0.0
    # Mask predictor: "Conv" (detectron2's 1x1 conv) or "NormedConv" (cosine, scale
    # NORMED_SCALE; the Seesaw recipe's normalized mask predictor).
    _enum(cfg, "MODEL.ROI_MASK_HEAD.PREDICTOR", "Conv", ("Conv", "NormedConv"))
    head.NORMED_SCALE = 20.0
    # Mask RoI feature-level assignment: "box" (detectron2's rule on sqrt(w h)) or
    # "area_ratio" (on sqrt(w h r), r = mask area / box area of the matched GT).
    _enum(cfg, "MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT", "box", ("box", "area_ratio"))
    # With LEVEL_ASSIGNMENT "area_ratio", how r is obtained at test time: "one" (r = 1, the
    # box rule) or "two_pass" (predict, estimate r from the predicted mask, re-pool, predict).
    _enum(cfg, "MODEL.ROI_MASK_HEAD.TEST_AREA_RATIO", "one", ("one", "two_pass"))
    # Mask Scoring R-CNN's MaskIoU head: segm score = box score x predicted mask IoU.
    head.MASK_SCORING = False
    head.MASK_SCORING_LOSS_WEIGHT = 0.5


def _add_test_config(cfg: CN) -> None:
    # LVIS evaluation protocol, for the metrics and the exported results file alike:
    # "standard": at most 300 detections per image across classes (the LVIS challenge rule);
    # "fixed": Fixed AP (Dave et al. 2021): the TEST.FIXED_AP.DETS_PER_CLASS best detections
    # of each class over the whole split, no per-image cap. For "fixed", raise the model's own
    # cap so inference keeps enough candidates: TEST.DETECTIONS_PER_IMAGE -1 (none) or e.g.
    # 1000 (LVIS v1 val needs ~600 per image on average: 10,000 x 1203 / 19,809), and keep
    # MODEL.ROI_HEADS.SCORE_THRESH_TEST low (1e-4). The evaluator's per-class score thresholds
    # (the running 10,000th score of each class) drop the rest before masks are encoded.
    _enum(cfg, "TEST.EVAL_PROTOCOL", "standard", ("standard", "fixed"))
    cfg.TEST.FIXED_AP = CN()
    # Detections kept per class over the split by the "fixed" protocol (10,000 for LVIS).
    cfg.TEST.FIXED_AP.DETS_PER_CLASS = 10000
    # Which code computes LVIS AP: "fast" (lvis_longtail.evaluation.fast_eval: lvis-api's
    # numbers, several times faster, less memory) or "lvis_api" (lvis-api 0.5.3 itself).
    _enum(cfg, "TEST.LVIS_EVALUATOR", "fast", ("fast", "lvis_api"))


def _add_soft_nms_node(node: CN) -> None:
    # Soft-NMS (Bodla et al. 2017) parameters. SIGMA: width of the Gaussian decay
    # exp(-IoU^2 / SIGMA); IOU_THRESH: N_t of the linear decay (scores of boxes with
    # IoU >= N_t are multiplied by 1 - IoU); MIN_SCORE: boxes whose decayed score falls below
    # it are dropped.
    node.SOFT_NMS = CN()
    node.SOFT_NMS.SIGMA = 0.5
    node.SOFT_NMS.IOU_THRESH = 0.3
    node.SOFT_NMS.MIN_SCORE = 1e-3


def _add_nms_config(cfg: CN) -> None:
    # Per-class suppression of the box predictor's detections at inference
    # (LongTailFastRCNNOutputLayers.inference / .postprocess, used by LongTailROIHeads):
    # "hard" (detectron2's NMS at NMS_THRESH_TEST), "soft_linear" or "soft_gaussian" (Soft-NMS
    # in place of hard NMS, with MODEL.ROI_HEADS.SOFT_NMS; detections keep their decayed
    # scores). Cascade heads apply it where their inference calls the last predictor's
    # postprocess(boxes, scores, image_sizes) instead of detectron2's fast_rcnn_inference.
    _enum(cfg, "MODEL.ROI_HEADS.NMS_TYPE", "hard", ("hard", "soft_linear", "soft_gaussian"))
    _add_soft_nms_node(cfg.MODEL.ROI_HEADS)


def _add_tta_config(cfg: CN) -> None:
    # Test-time augmentation (LongTailTTA, used by Trainer.test when TEST.AUG.ENABLED): the
    # detections of every augmentation are merged, then masks are predicted for the merged
    # boxes at every augmentation. With the keys below at their defaults it is detectron2's
    # GeneralizedRCNNWithTTA (TEST.AUG.MIN_SIZES x MAX_SIZE, FLIP, hard NMS, mean masks).
    aug = cfg.TEST.AUG
    # Explicit [short side, max size] pairs, e.g. [[1200, 2000], [1400, 2333]]; empty: every
    # MIN_SIZES with MAX_SIZE (detectron2's keys). FLIP adds the flipped image of each scale.
    aug.SCALES = []
    # Valid sqrt(w h) range [lo, hi] of the detections of each scale, one pair per scale, in
    # that scale's (resized) pixels; hi < 0 = no upper bound; empty = every box at every scale.
    # Small boxes come from large scales, large boxes from small ones (LVIS 2020 1st place).
    aug.VALID_RANGES = []
    # Score factors of the detections of rare / common categories (frequency groups of the
    # training set, DATASETS.TRAIN[0]'s class_frequency metadata), applied to the union of
    # the augmentations' detections before the merge; 1.0 = off.
    aug.RARE_SCORE_FACTOR = 1.0
    aug.COMMON_SCORE_FACTOR = 1.0
    # Per-class hard NMS IoU threshold of the merge; < 0: MODEL.ROI_HEADS.NMS_THRESH_TEST
    # (detectron2). The 1st-place recipe uses 0.7 followed by Soft-NMS.
    aug.NMS_THRESH = -1.0
    # After the hard NMS: "hard" (nothing more), "soft_linear" or "soft_gaussian" (Soft-NMS
    # with TEST.AUG.SOFT_NMS on the survivors; they keep their decayed scores).
    _enum(cfg, "TEST.AUG.MERGE_NMS_TYPE", "hard", ("hard", "soft_linear", "soft_gaussian"))
    _add_soft_nms_node(aug)
    # Mask of each merged detection: "mean" (mean of the M x M mask probabilities over the
    # augmentations, detectron2) or "select" (mean over the augmentations of the scales whose
    # VALID_RANGES contain the instance's sqrt(w h r) in that scale's pixels, r = fraction of
    # the mean mask above 0.5; the mean of all when none does). mask_scores (Mask Scoring)
    # follow the same rule.
    _enum(cfg, "TEST.AUG.MASK_RULE", "mean", ("mean", "select"))
    # Merged detections per mask-head call: bounds the (chunk, K, M, M) class-specific logits.
    aug.MASK_CHUNK_SIZE = 100
    # Augmented images per backbone batch (detectron2's GeneralizedRCNNWithTTA uses 3).
    aug.BATCH_SIZE = 3
