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


# detectron2 keys this project depends on whose valid values are a fixed set (detectron2 0.6
# checks some late, e.g. the sampler when the loader is built, or only with a bare error).
DETECTRON2_ENUM_KEYS: Dict[str, Tuple] = {
    "DATALOADER.SAMPLER_TRAIN": (
        "TrainingSampler",
        "RepeatFactorTrainingSampler",
        "RandomSubsetTrainingSampler",
    ),
    "SOLVER.LR_SCHEDULER_NAME": ("WarmupMultiStepLR", "WarmupCosineLR"),
    "SOLVER.WARMUP_METHOD": ("linear", "constant"),
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": ("value", "norm"),
    "INPUT.MASK_FORMAT": ("polygon", "bitmask"),
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": ("choice", "range"),
    "MODEL.RPN.BBOX_REG_LOSS_TYPE": ("smooth_l1", "giou"),
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": ("smooth_l1", "giou"),
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": ("ROIAlign", "ROIAlignV2", "ROIPool", "ROIAlignRotated"),
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE": ("ROIAlign", "ROIAlignV2", "ROIPool"),
}

# Keys that name an entry of a detectron2-style registry: full key -> "module:REGISTRY"
# (imported only when a config is checked, so this module stays light), plus names the
# builder accepts without a registry entry. A new *_NAME key is checked once listed here.
REGISTRY_KEYS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "MODEL.META_ARCHITECTURE": ("detectron2.modeling.meta_arch.build:META_ARCH_REGISTRY", ()),
    "MODEL.BACKBONE.NAME": ("detectron2.modeling.backbone.build:BACKBONE_REGISTRY", ()),
    "MODEL.PROPOSAL_GENERATOR.NAME": (
        "detectron2.modeling.proposal_generator.build:PROPOSAL_GENERATOR_REGISTRY",
        ("PrecomputedProposals",),
    ),
    "MODEL.RPN.HEAD_NAME": ("detectron2.modeling.proposal_generator.rpn:RPN_HEAD_REGISTRY", ()),
    "MODEL.ANCHOR_GENERATOR.NAME": (
        "detectron2.modeling.anchor_generator:ANCHOR_GENERATOR_REGISTRY",
        (),
    ),
    "MODEL.ROI_HEADS.NAME": ("detectron2.modeling.roi_heads.roi_heads:ROI_HEADS_REGISTRY", ()),
    "MODEL.ROI_BOX_HEAD.NAME": ("detectron2.modeling.roi_heads.box_head:ROI_BOX_HEAD_REGISTRY", ()),
    "MODEL.ROI_MASK_HEAD.NAME": (
        "detectron2.modeling.roi_heads.mask_head:ROI_MASK_HEAD_REGISTRY",
        (),
    ),
    "MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME": (
        "lvis_longtail.modeling.cls_losses.registry:CLS_LOSS_REGISTRY",
        (),
    ),
}


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


def setup_cfg(
    config_file: str, opts=(), *, check_files: bool = False, eval_only: bool = False
) -> CN:
    """Load a config: detectron2 defaults + lvis_longtail keys + ``config_file`` + ``opts``.

    Also registers the datasets listed in ``DATASETS.LVIS_FORMAT``, then checks the whole
    config (:func:`lvis_longtail.config_check.check_config`: enum values, registry names,
    dataset files, cross-key rules) before any model is built or data loaded. With
    ``check_files`` (``train_net.py``) the registered datasets' json files must exist too,
    except, with ``eval_only``, the training sets'. Returns a frozen config.

    Raises:
        ConfigError: an unknown key (with the closest known keys), a flag placed among the
            ``KEY VALUE`` options, or a value :func:`check_config` rejects.
    """
    from lvis_longtail.config_check import check_config, check_opts, unknown_key_error
    from lvis_longtail.data import register_from_config
    from lvis_longtail.data.ignore_boxes import register_ignore_boxes_from_config

    cfg = get_cfg()
    add_longtail_config(cfg)
    opts = list(opts)
    check_opts(opts)
    # yacs reports an unknown key as a KeyError (file) or a bare AssertionError (opts).
    try:
        cfg.merge_from_file(config_file)
    except KeyError as e:
        raise unknown_key_error(cfg, config_file, e.args[0]) from None
    try:
        cfg.merge_from_list(opts)
    except (AssertionError, KeyError) as e:
        raise unknown_key_error(cfg, "command-line options", e.args[0]) from None
    register_from_config(cfg)
    register_ignore_boxes_from_config(cfg)
    check_config(cfg, check_files=check_files, eval_only=eval_only)
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
    _add_frequency_prior_config(cfg)
    _add_cpu_threads_config(cfg)
    _add_mask_inference_config(cfg)
    _add_htc_lite_config(cfg)
    _add_htc_config(cfg)
    _add_architecture_config(cfg)
    _add_augmentation_config(cfg)
    _add_nms_config(cfg)
    _add_tta_config(cfg)
    _add_ignore_regions_config(cfg)
    _add_fault_tolerance_config(cfg)
    _add_lvis_tasks_config(cfg)
    _add_fpg_config(cfg)
    _add_dual_head_config(cfg)
    _add_image_check_config(cfg)
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
    # Softmax (start it from a trained model with MODEL.WEIGHTS). Their BatchNorm/SyncBN and
    # dropout layers stay in eval mode (statistics neither used from the batch nor updated).
    # A prefix that matches no parameter is an error.
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
    # (Balanced Group Softmax), "FederatedLoss", "BalancedSoftmax", "LogitAdjustedCE", "ECMLoss"
    # (see _add_frequency_prior_config). The loss decides how many logits the
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
    # "challenge2021": the LVIS Challenge 2021 (lvis-api's lvis_challenge_2021 branch): "fixed"
    # with Boundary AP evaluated too, whatever TEST.LVIS_TASKS says (see _add_lvis_tasks_config).
    _enum(cfg, "TEST.EVAL_PROTOCOL", "standard", ("standard", "fixed", "challenge2021"))
    cfg.TEST.FIXED_AP = CN()
    # Detections kept per class over the split by the "fixed" protocol (10,000 for LVIS).
    cfg.TEST.FIXED_AP.DETS_PER_CLASS = 10000
    # Which code computes LVIS AP: "fast" (lvis_longtail.evaluation.fast_eval: lvis-api's
    # numbers, several times faster, less memory) or "lvis_api" (lvis-api 0.5.3 itself).
    _enum(cfg, "TEST.LVIS_EVALUATOR", "fast", ("fast", "lvis_api"))
    # Minutes the other processes wait for the main one to export and score an evaluation,
    # on a gloo group of their own (lvis_longtail/utils/dist.py): the process group's timeout
    # (30 min) catches hangs in training, while scoring ~6M detections (Fixed AP, LVIS v1 val)
    # may take longer.
    cfg.TEST.EVAL_WAIT_MINUTES = 240


def _add_frequency_prior_config(cfg: CN) -> None:
    """Losses and post-hoc calibrations built on the training class counts (docs/methods.md,
    "Balanced Softmax and logit adjustment", "ECM loss", "NorCal")."""
    head = cfg.MODEL.ROI_BOX_HEAD
    count_sources = ("image", "instance")
    # Logit-adjusted softmax CE (Menon et al., ICLR 2021), CLS_LOSS_NAME "LogitAdjustedCE":
    # softmax CE of z_c + TAU log(K pi_c) for the K classes (z_bg unshifted); inference uses
    # z. pi_c = n_c / sum n, n = the training COUNT ("image": images containing the class,
    # "instance": its instances), each clamped to >= 1. TAU 0 is plain softmax CE.
    head.LOGIT_ADJUSTMENT = CN()
    head.LOGIT_ADJUSTMENT.TAU = 1.0
    _enum(cfg, "MODEL.ROI_BOX_HEAD.LOGIT_ADJUSTMENT.COUNT", "image", count_sources)
    # Balanced Softmax (Ren et al., NeurIPS 2020), CLS_LOSS_NAME "BalancedSoftmax": the same
    # loss with TAU = 1 and its own COUNT.
    head.BALANCED_SOFTMAX = CN()
    _enum(cfg, "MODEL.ROI_BOX_HEAD.BALANCED_SOFTMAX.COUNT", "image", count_sources)
    # Effective Class-Margin loss (Cho & Kraehenbuehl, ECCV 2022), CLS_LOSS_NAME "ECMLoss":
    # K+1 sigmoid logits with margins and weights from the training image counts; the
    # background count is FG_BG_RATIO x the summed class counts (the reference's empirical
    # ratio of Mask R-CNN).
    head.ECM = CN()
    head.ECM.FG_BG_RATIO = 6.3313

    # Post-hoc calibration of the box classifier's softmax scores at inference (no training):
    # "none"; "norcal" (NorCal, Pan et al., NeurIPS 2021): class logits z_c - GAMMA log N_c,
    # background untouched, renormalised by the loss's softmax; "logit_adjustment" (Menon et
    # al., post-hoc form): z_c - TAU log(K pi_c). Counts as above, from DATASETS.TRAIN. Only
    # for losses with softmax probabilities (SoftmaxCE, SeesawLoss, GroupSoftmax,
    # BalancedSoftmax, LogitAdjustedCE); a sigmoid loss is an error. Pick GAMMA / TAU on a
    # validation split with `python -m lvis_longtail.tools.norcal_sweep`.
    _enum(cfg, "TEST.CLS_CALIBRATION", "none", ("none", "norcal", "logit_adjustment"))
    cfg.TEST.NORCAL = CN()
    # N_c^GAMMA; 0 = no calibration. No published default (the reference tunes it per model).
    cfg.TEST.NORCAL.GAMMA = 0.6
    _enum(cfg, "TEST.NORCAL.COUNT", "image", count_sources)
    cfg.TEST.LOGIT_ADJUSTMENT = CN()
    cfg.TEST.LOGIT_ADJUSTMENT.TAU = 1.0
    _enum(cfg, "TEST.LOGIT_ADJUSTMENT.COUNT", "image", count_sources)


def _add_cpu_threads_config(cfg: CN) -> None:
    # Threads of each training/evaluation process on CPU (MODEL.DEVICE cpu), applied by
    # lvis_longtail.engine.launch.configure_cpu_threads: torch intra-op threads (DataLoader
    # workers run torch with one thread). 0 = auto: $LVIS_LONGTAIL_CPU_THREADS, else
    # $OMP_NUM_THREADS, else the cores per process minus DATALOADER.NUM_WORKERS (at least 1):
    # torch's default, one thread per core in every process, oversubscribes a small machine
    # and slows it several-fold once anything else runs. Not used on GPU.
    cfg.MODEL.CPU_THREADS = 0
    # OpenCV threads of each process and of each of its DataLoader workers, on every device
    # (GPU runs too: GPUs x NUM_WORKERS workers with all-cores pools oversubscribe a node).
    cfg.MODEL.OPENCV_THREADS = 1


def _add_mask_inference_config(cfg: CN) -> None:
    # Mask inference runs this many RoIs at a time; each chunk keeps only its predicted
    # class's mask logits, so peak memory is chunk x K x M x M instead of detections x K x M x M
    # (LVIS, 300 detections: 1.1 GB of fp32 logits at once). The masks do not depend on it.
    # 0 = all RoIs at once. Every lvis_longtail ROI heads and every mask option honour it.
    cfg.MODEL.ROI_MASK_HEAD.TEST_CHUNK_SIZE = 32


def _add_htc_lite_config(cfg: CN) -> None:
    # HTC-Lite (MODEL.ROI_HEADS.NAME "LongTailHTCLiteROIHeads"): the cascade's stage whose
    # positives train its one mask head, 0-based, negative from the last (-1: the last stage,
    # HTC-Lite's choice; 0 with the context head off is exactly LongTailCascadeROIHeads).
    cfg.MODEL.ROI_HEADS.HTC_LITE = CN()
    cfg.MODEL.ROI_HEADS.HTC_LITE.MASK_TRAIN_STAGE = -1
    # At most this many positives per image (random) train the mask head; 0 = all, -1 = as
    # many as the first stage has for that image (the mask cost of the cascade, which trains
    # its mask head on the first stage's positives). The cascade does not re-sample later
    # stages, so a trained model's last stage has ~2x the first stage's positives.
    cfg.MODEL.ROI_HEADS.HTC_LITE.MASK_MAX_POSITIVES = 0
    # Global context head of HTC-Lite (read by LongTailHTCLiteROIHeads only): convs + global
    # average pooling on one FPN level give an image vector, trained to predict the image's
    # categories (multi-label BCE, "loss_context") and added to the RoI features.
    head = cfg.MODEL.ROI_CONTEXT_HEAD = CN()
    head.ENABLED = True
    # Backbone feature it reads (SCNet's global context head reads P6).
    head.IN_FEATURE = "p6"
    # Number of 3x3 convs (residual in pairs) and their width D, the context vector's size.
    # Fusing needs D = the RoI feature channels (MODEL.FPN.OUT_CHANNELS).
    head.NUM_CONV = 4
    head.CONV_DIM = 256
    # detectron2 norm of the convs: "" (none), "GN", "SyncBN", ...
    head.NORM = ""
    # Weight of loss_context. HTC-Lite's is unpublished; 3.0 is SCNet's global context loss
    # weight (the closest published head).
    head.LOSS_WEIGHT = 3.0
    # Federated (LVIS) loss: count only the image's positive classes and its verified
    # negatives (neg_category_ids); other categories are unverified on LVIS. Training then
    # puts each image's neg_category_ids on its GT instances (LongTailDatasetMapper).
    head.FEDERATED = False
    # Add the context vector to the pooled RoI features of every box stage / of the mask head.
    head.FUSE_BOX = True
    head.FUSE_MASK = True


def _add_htc_config(cfg: CN) -> None:
    """HTC without the semantic branch (MODEL.ROI_HEADS.NAME "LongTailHTCROIHeads"), which
    extends HTC-Lite's heads (HTC_LITE.MASK_MAX_POSITIVES and ROI_CONTEXT_HEAD still apply).
    The defaults are mmdetection's HTC; with the four switches False it is exactly HTC-Lite."""
    node = cfg.MODEL.ROI_HEADS.HTC = CN()
    # One mask head per cascade stage, losses "<name>_stage<t>"; at inference every head
    # predicts the final boxes' masks and their sigmoid probabilities are averaged. False:
    # HTC-Lite's one mask head, trained on HTC_LITE.MASK_TRAIN_STAGE.
    node.PER_STAGE_MASKS = True
    # Interleaved execution (needs PER_STAGE_MASKS): mask head t trains on the boxes refined
    # by box stage t, re-matched at stage t's IoU with the GT boxes added, at most
    # BATCH_SIZE_PER_IMAGE x POSITIVE_FRACTION positives per image. False: on the positives
    # of box stage t's own proposals.
    node.INTERLEAVED = True
    # Mask information flow (needs PER_STAGE_MASKS): mask head t adds a 1x1 conv (norm
    # ROI_MASK_HEAD.NORM, ReLU) of head t-1's conv features to its pooled RoI features.
    node.MASK_INFO_FLOW = True
    # Weight of each stage's mask losses, one per stage (mmdetection's HTC stage_loss_weights;
    # the box stages keep detectron2's cascade scaling).
    node.MASK_STAGE_LOSS_WEIGHTS = [1.0, 0.5, 0.25]
    # Box stages >= 1 sample their proposals as stage 0 does (refined boxes plus the GT boxes,
    # BATCH_SIZE_PER_IMAGE RoIs, POSITIVE_FRACTION positives), as mmdetection's cascades.
    # False: detectron2's cascade, every refined box of the previous stage.
    node.SAMPLE_BOX_STAGES = True


def _add_architecture_config(cfg: CN) -> None:
    """Network options of the LVIS 2020 entries (deformable conv/pooling, CARAFE, timm)."""
    # RoI pooler of the box and mask heads: detectron2's "ROIAlignV2" (default), "ROIAlign",
    # "ROIPool", "ROIAlignRotated" (needs detectron2's C++ ops), or "DeformROIAlignV2":
    # deformable RoI pooling (Dai et al. 2017; lvis_longtail.layers.deform_roi_pool):
    # ROIAlignV2, an FC branch predicting per-bin offsets (zero-initialised: it starts as
    # ROIAlignV2), then RoIAlign of the shifted bins. Not with LEVEL_ASSIGNMENT "area_ratio".
    pooler_types = ("ROIAlignV2", "ROIAlign", "ROIPool", "ROIAlignRotated", "DeformROIAlignV2")
    for name in ("ROI_BOX_HEAD", "ROI_MASK_HEAD"):
        _enum(cfg, f"MODEL.{name}.POOLER_TYPE", "ROIAlignV2", pooler_types)
        node = cfg.MODEL[name]
        # "DeformROIAlignV2" parameters. FC_DIM: hidden width of the offset branch
        # (C k k -> FC_DIM -> ReLU -> 2 k k, one branch shared by the FPN levels); GAMMA:
        # bin offset = GAMMA * predicted offset * RoI (width, height), 0.1 in the paper.
        node.DEFORM_POOL = CN()
        node.DEFORM_POOL.FC_DIM = 1024
        node.DEFORM_POOL.GAMMA = 0.1

    # CARAFE content-aware upsampling (Wang et al. 2019; lvis_longtail.layers.carafe).
    # FPN top-down path: "nearest" (detectron2's 2x nearest) or "carafe"; honoured by the
    # backbone builders build_longtail_resnet_fpn_backbone and build_timm_fpn_backbone
    # (detectron2's build_resnet_fpn_backbone always upsamples with "nearest").
    _enum(cfg, "MODEL.FPN.UPSAMPLE_TYPE", "nearest", ("nearest", "carafe"))
    # Mask head 2x upsampling: "deconv" (detectron2's ConvTranspose2d) or "carafe" (replaces
    # the deconv of MaskRCNNConvUpsampleHead and heads derived from it).
    _enum(cfg, "MODEL.ROI_MASK_HEAD.UPSAMPLE_TYPE", "deconv", ("deconv", "carafe"))
    for node in (cfg.MODEL.FPN, cfg.MODEL.ROI_MASK_HEAD):
        # CARAFE parameters (the paper's and mmdetection's defaults): channels of the 1x1
        # channel compressor, kernel of the content encoder, reassembly neighbourhood.
        node.CARAFE = CN()
        node.CARAFE.COMPRESSED_CHANNELS = 64
        node.CARAFE.ENCODER_KERNEL = 3
        node.CARAFE.UP_KERNEL = 5

    # timm backbones (BACKBONE.NAME "build_timm_fpn_backbone"; lvis_longtail.modeling.
    # backbones): any timm model with features_only support and feature maps at strides 4, 8,
    # 16, 32, named res2..res5 like detectron2's ResNet (select them with FPN.IN_FEATURES).
    cfg.MODEL.TIMM = CN()
    # timm model name, e.g. "resnest50d", "convnext_tiny", "resnet50".
    cfg.MODEL.TIMM.NAME = "resnet50"
    # Local file with the timm model's ImageNet weights (timm's own state-dict format:
    # .pth/.bin/.safetensors); "" = random init. Nothing is ever downloaded. Weights in
    # detectron2's layout (backbone.bottom_up.*) can instead be given by MODEL.WEIGHTS.
    cfg.MODEL.TIMM.PRETRAINED_FILE = ""
    # Normalisation layers: "" (the model's own), "FrozenBN", "SyncBN" (synchronised across
    # processes, CPU/gloo included), "naiveSyncBN" (detectron2's NaiveSyncBatchNorm). The
    # stages frozen by MODEL.BACKBONE.FREEZE_AT (1 = stem, 2 = stem + res2, ...) get
    # FrozenBN and no gradients, as in detectron2's ResNet.
    _enum(cfg, "MODEL.TIMM.NORM", "", ("", "FrozenBN", "SyncBN", "naiveSyncBN"))
    # Stochastic depth of the timm model (drop_path_rate), 0 = off.
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.0
    # Deformable convolution in the timm model, as MODEL.RESNETS.DEFORM_* for detectron2's
    # ResNet: per stage res2..res5, every 3x3 nn.Conv2d becomes DCNv2 (DEFORM_MODULATED) or
    # DCNv1 with DEFORM_NUM_GROUPS offset groups, weights kept, offsets from a zero-init conv.
    cfg.MODEL.TIMM.DEFORM_ON_PER_STAGE = [False, False, False, False]
    cfg.MODEL.TIMM.DEFORM_MODULATED = True
    cfg.MODEL.TIMM.DEFORM_NUM_GROUPS = 1


def _add_augmentation_config(cfg: CN) -> None:
    # Training augmentation steps, in order: names in LONGTAIL_AUGMENTATION_REGISTRY
    # (lvis_longtail/data/augmentations). The default is detectron2's own pipeline
    # (INPUT.CROP, if enabled, goes first as in detectron2): "ResizeShortestEdge"
    # (INPUT.MIN_SIZE_TRAIN, MAX_SIZE_TRAIN, MIN_SIZE_TRAIN_SAMPLING), "RandomFlip"
    # (INPUT.RANDOM_FLIP). Single-image steps: "RandomCrop" (INPUT.CROP), "ScaleJitter",
    # "Rotation", "InstaBoost"; multi-image steps: "Mosaic", "CopyPaste". Each step's
    # parameters are in its own sub-node below. Single-image steps before a multi-image step
    # are applied to every image it combines; the steps after it to the combined image.
    cfg.INPUT.AUGMENTATIONS = ["ResizeShortestEdge", "RandomFlip"]

    # Scale jitter (ResizeScale + FixedSizeCrop): resize so that the image fits TARGET_SIZE
    # (h, w) times s ~ U(MIN_SCALE, MAX_SCALE), keeping its aspect ratio, then take a random
    # CROP_SIZE (h, w) crop, padding with PAD_VALUE where the image is smaller. Boxes are
    # recomputed from the cropped masks. PRESET overrides the four values: "lsj_1024"
    # (large-scale jitter, Ghiasi et al. 2021: 0.1-2.0 of 1024, crop 1024) or "mmdet_1280"
    # (the LVIS 2020 MMDet entry: long edge U(768, 1792) = 0.6-1.4 of 1280, crop 1280).
    cfg.INPUT.SCALE_JITTER = CN()
    _enum(cfg, "INPUT.SCALE_JITTER.PRESET", "custom", ("custom", "lsj_1024", "mmdet_1280"))
    cfg.INPUT.SCALE_JITTER.MIN_SCALE = 0.1
    cfg.INPUT.SCALE_JITTER.MAX_SCALE = 2.0
    cfg.INPUT.SCALE_JITTER.TARGET_SIZE = (1024, 1024)
    cfg.INPUT.SCALE_JITTER.CROP_SIZE = (1024, 1024)
    cfg.INPUT.SCALE_JITTER.PAD_VALUE = 128.0

    # Rotation by an angle ~ U(-ANGLE, ANGLE) degrees about the image centre, applied with
    # probability PROB. EXPAND: grow the canvas so that no pixel is cut off. Polygons are
    # rotated and boxes recomputed from them.
    cfg.INPUT.ROTATION = CN()
    cfg.INPUT.ROTATION.PROB = 0.5
    cfg.INPUT.ROTATION.ANGLE = 10.0
    cfg.INPUT.ROTATION.EXPAND = False

    # Mosaic (YOLOv4): with probability PROB, the image and 3 more drawn from the training
    # sampler are each resized to fit TILE_SIZE (h, w) and placed around a centre
    # ~ U(CENTER_RANGE) x TILE_SIZE of a 2 TILE_SIZE canvas filled with PAD_VALUE.
    cfg.INPUT.MOSAIC = CN()
    cfg.INPUT.MOSAIC.PROB = 0.5
    cfg.INPUT.MOSAIC.TILE_SIZE = (640, 640)
    cfg.INPUT.MOSAIC.CENTER_RANGE = (0.5, 1.5)
    cfg.INPUT.MOSAIC.PAD_VALUE = 114.0

    # Copy-paste (Ghiasi et al. 2021): with probability PROB, a random non-empty subset (at
    # most MAX_NUM_PASTED) of another training image's instances is pasted onto the image
    # (top-left aligned). The covered parts of the image's masks are removed; an instance
    # whose box moved by more than BOX_MOVED_THRESH px and whose remaining mask has at most
    # MIN_VISIBLE_AREA px is dropped (mmdetection's rule). RARE_SOURCE_CANDIDATES: draw this
    # many candidate source images from the sampler and paste from the one holding the rarest
    # class (fewest training images); 1 = no bias.
    cfg.INPUT.COPY_PASTE = CN()
    cfg.INPUT.COPY_PASTE.PROB = 0.5
    cfg.INPUT.COPY_PASTE.MAX_NUM_PASTED = 100
    cfg.INPUT.COPY_PASTE.BOX_MOVED_THRESH = 10.0
    cfg.INPUT.COPY_PASTE.MIN_VISIBLE_AREA = 300.0
    cfg.INPUT.COPY_PASTE.RARE_SOURCE_CANDIDATES = 1

    # InstaBoost-style instance jitter (Fang et al. 2019), written here: with probability
    # PROB, up to MAX_INSTANCES instances are each cut out, their hole inpainted, and pasted
    # back moved by up to SHIFT x their box size, scaled by ~ U(SCALE) and rotated by
    # ~ U(-ANGLE, ANGLE) degrees; instances they cover lose those pixels.
    cfg.INPUT.INSTABOOST = CN()
    cfg.INPUT.INSTABOOST.PROB = 0.5
    cfg.INPUT.INSTABOOST.MAX_INSTANCES = 3
    cfg.INPUT.INSTABOOST.SHIFT = 0.2
    cfg.INPUT.INSTABOOST.SCALE = (0.8, 1.2)
    cfg.INPUT.INSTABOOST.ANGLE = 5.0


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


def _add_ignore_regions_config(cfg: CN) -> None:
    # Ignore regions (lvis_longtail/modeling/ignore_regions.py, docs/self_training.md): in
    # training, an anchor / proposal that would be background and overlaps one of its image's
    # ignore boxes (the mapped batch's `ignore_boxes`: crowd boxes, pseudo boxes) by at least
    # THRESH is ignored (label -1: not sampled, no loss; cascade stages >= 1 drop it). METRIC
    # "iou", or "iof" (intersection over the anchor's / proposal's own area). Needs
    # MODEL.META_ARCHITECTURE "LongTailRCNN" (forwards the boxes) and, for the RPN,
    # MODEL.PROPOSAL_GENERATOR.NAME "LongTailRPN"; lvis_longtail's ROI heads all support it.
    # Batches without ignore boxes are unaffected. The 1st place LVIS 2020 entry ignores
    # proposals "with a large IoU" to pseudo boxes without giving the value; the defaults here
    # (IoU 0.5, the ROI heads' foreground IoU) are our choice.
    cfg.MODEL.RPN.IGNORE = CN()
    _enum(cfg, "MODEL.RPN.IGNORE.METRIC", "iou", ("iou", "iof"))
    cfg.MODEL.RPN.IGNORE.THRESH = 0.5
    cfg.MODEL.ROI_HEADS.IGNORE = CN()
    _enum(cfg, "MODEL.ROI_HEADS.IGNORE.METRIC", "iou", ("iou", "iof"))
    cfg.MODEL.ROI_HEADS.IGNORE.THRESH = 0.5
    # Ignore boxes of training datasets: [[dataset_name, json_file], ...]; every annotation box
    # of the LVIS-format json_file (e.g. tools/pseudo_label.py's output) becomes an ignore box
    # of the image with its image_id (lvis_longtail/data/ignore_boxes.py). Crowd annotations
    # (iscrowd 1) of an LVIS-format dataset are ignore boxes without any entry here.
    cfg.DATASETS.IGNORE_BOXES = []
    # Pseudo-labelled extra images (lvis_longtail/data/extra_images.py): registered datasets
    # (e.g. unannotated images with tools/pseudo_label.py's labels, added through
    # DATASETS.LVIS_FORMAT) trained together with DATASETS.TRAIN. Every epoch of the main set
    # (with its repeat factors under RepeatFactorTrainingSampler) also draws EXTRA_TRAIN_PER_EPOCH
    # extra images without replacement (-1: all of them); batches hold images of one source and
    # the losses of an extra batch are multiplied by EXTRA_TRAIN_LOSS_WEIGHT (needs
    # MODEL.META_ARCHITECTURE "LongTailRCNN" and DATALOADER.ASPECT_RATIO_GROUPING True). The 1st
    # place LVIS 2020 entry drew 10k of its Open Images per epoch and gives no weight; 0.5 here
    # is our choice.
    cfg.DATASETS.EXTRA_TRAIN = ()
    cfg.DATASETS.EXTRA_TRAIN_PER_EPOCH = -1
    cfg.DATASETS.EXTRA_TRAIN_LOSS_WEIGHT = 0.5


def _add_fault_tolerance_config(cfg: CN) -> None:
    # Periodic checkpoints (model_XXXXXXX.pth, also those saved on a preemption signal) kept
    # in OUTPUT_DIR: after each save, those older than the newest CHECKPOINT_KEEP are deleted.
    # model_final.pth and the checkpoint last_checkpoint names are never deleted. 0 keeps all
    # (detectron2's behaviour); keep at least 2 so that --resume can fall back to an older
    # checkpoint if the newest cannot be read (docs/fault_tolerance.md).
    cfg.SOLVER.CHECKPOINT_KEEP = 0
    # A training image that cannot be read (missing, truncated, undecodable) is skipped: a
    # warning names its file and image id, another sample is drawn, and the number skipped
    # is logged at the end of training and written as data/skipped_images to metrics.json.
    # False: training stops with that error instead. Evaluation always stops with it.
    cfg.DATALOADER.SKIP_UNREADABLE_IMAGES = True


def _add_lvis_tasks_config(cfg: CN) -> None:
    # LVIS tasks the evaluator computes, any of "bbox", "segm" and "boundary" (Boundary AP,
    # Cheng et al. 2021: detections matched by min(mask IoU, boundary IoU); fast evaluator only,
    # docs/methods.md "Boundary AP"). Under every TEST.EVAL_PROTOCOL; "challenge2021" adds it.
    # Mask tasks are skipped for a model without masks. E.g. TEST.LVIS_TASKS
    # "('bbox', 'segm', 'boundary')" for Boundary AP under the standard protocol.
    cfg.TEST.LVIS_TASKS = ("bbox", "segm")
    # Boundary AP's erosion radius over the image diagonal: d = round(ratio * diagonal) pixels,
    # at least 1 (the challenge's 0.02).
    cfg.TEST.BOUNDARY_DILATION_RATIO = 0.02


def _add_fpg_config(cfg: CN) -> None:
    """Feature Pyramid Grids (lvis_longtail/modeling/fpg.py; docs/architecture.md, "FPG"):
    MODEL.BACKBONE.NAME "build_resnet_fpg_backbone" (detectron2's ResNet) or
    "build_timm_fpg_backbone" (MODEL.TIMM). Defaults: mmdetection's configs/fpg (9@256, BN)."""
    fpg = cfg.MODEL.FPG = CN()
    # Bottom-up features, finest first (strides doubling); FPG adds one coarser level, the
    # stride-2 subsampling of the coarsest lateral: res2..res5 give p2..p6.
    fpg.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # Bottom-up pathways after the lateral pathway 0 (9 in the paper and mmdetection).
    fpg.NUM_PATHWAYS = 9
    # Channels of the grid (laterals and nodes; mmdetection's inter_channels) and of the
    # outputs p2..p6 that the heads read: 256/256, or 128/128 for the lighter variant.
    fpg.CHANNELS = 256
    fpg.OUT_CHANNELS = 256
    # detectron2 norm after each transition's conv (the output convs have none): "BN" as in
    # mmdetection's configs (8 images per GPU there), "SyncBN" for small per-GPU batches,
    # "GN", or "" (no norm, convs with bias).
    _enum(cfg, "MODEL.FPG.NORM", "BN", ("", "BN", "SyncBN", "naiveSyncBN", "GN"))
    # The LVIS 2020 MMDet entry's "enhanced" FPG (unreleased; our reading, see docs): a DCNv2
    # after every upsampling (the across-down transitions' 3x3 conv; zero-initialised offsets).
    fpg.DEFORM_UPSAMPLE = False
    # Same-pathway 2x downsampling: "conv" (3x3 stride-2 conv, the paper's) or "carafe"
    # (content-aware reassembly, CARAFE++ style, then a 3x3 stride-1 conv; the entry's
    # "content-aware downsampling", whose details were not published).
    _enum(cfg, "MODEL.FPG.DOWNSAMPLE_TYPE", "conv", ("conv", "carafe"))
    # Its parameters: channels of the 1x1 compressor, kernel of the stride-2 content encoder,
    # reassembled neighbourhood (our defaults; k 3 keeps the unfolded input at 9x a level).
    fpg.CARAFE = CN()
    fpg.CARAFE.COMPRESSED_CHANNELS = 64
    fpg.CARAFE.ENCODER_KERNEL = 3
    fpg.CARAFE.DOWN_KERNEL = 3


def _add_dual_head_config(cfg: CN) -> None:
    """Dual head classification fine-tune (lvis_longtail/modeling/dual_head.py; docs/methods.md,
    "Dual head classification"): start from a trained model (MODEL.WEIGHTS), freeze it, train a
    new classification branch per box stage, fuse both branches' scores at inference."""
    dual = cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD = CN()
    # Add the new branches; the trainer then freezes everything else (parameters and
    # BatchNorm statistics), so only the new branches train.
    dual.ENABLED = False
    # The new branch of each stage: "box_head" (a second FC tower of the box head's architecture
    # on the pooled RoI features, plus a classifier; SimCal's) or "classifier" (a classifier on
    # the trained box head's features). Its classifier layer is ROI_BOX_HEAD.CLS_PREDICTOR.
    _enum(cfg, "MODEL.ROI_BOX_HEAD.DUAL_HEAD.BRANCH", "box_head", ("box_head", "classifier"))
    # Loss of the new branch, a name in CLS_LOSS_REGISTRY (its parameters are those of the
    # ROI_BOX_HEAD sub-nodes, e.g. SEESAW); the paper leaves it open, SimCal used softmax CE.
    dual.CLS_LOSS_NAME = "SoftmaxCE"
    REGISTRY_KEYS["MODEL.ROI_BOX_HEAD.DUAL_HEAD.CLS_LOSS_NAME"] = REGISTRY_KEYS[
        "MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME"
    ]
    # Initialisation of the new branch when MODEL.WEIGHTS holds none (the trained model's
    # checkpoint): "copy" of the trained tower and, when the logit layouts agree, of the trained
    # classifier; "random" (detectron2's initialisation, the loss's bias prior).
    _enum(cfg, "MODEL.ROI_BOX_HEAD.DUAL_HEAD.INIT", "copy", ("copy", "random"))
    # Fusion of the two branches' [K scores, background] probabilities at inference, per stage
    # (a cascade then averages the stages): "mean" ((1 - w) trained + w new, the paper's
    # average at w = 0.5), "geometric" (trained^(1 - w) new^w), "group" (the new branch's
    # scores for the classes of NEW_BRANCH_GROUPS, the trained branch's for the others).
    _enum(cfg, "MODEL.ROI_BOX_HEAD.DUAL_HEAD.FUSION", "mean", ("mean", "geometric", "group"))
    # w, the new branch's weight in "mean" and "geometric" (0: the trained model alone).
    dual.NEW_WEIGHT = 0.5
    # Frequency groups ("r", "c", "f" of the training set, DATASETS.TRAIN) scored by the new
    # branch under FUSION "group".
    dual.NEW_BRANCH_GROUPS = ["r", "c"]


def _add_image_check_config(cfg: CN) -> None:
    # How the image files of LVIS-format datasets are checked when their dicts are built, on
    # the first process of each machine only (an error there stops the job): "all" reads the
    # header of every image and compares its size with the json's height and width (~10 s for
    # LVIS v1 train from the page cache, minutes from network storage); "sample" checks that
    # every file exists and reads 1000 headers spread over the dataset; "none" checks nothing.
    _enum(cfg, "DATASETS.IMAGE_CHECK", "all", ("all", "sample", "none"))
