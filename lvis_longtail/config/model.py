"""Defaults of lvis_longtail's ``MODEL`` keys up to the ROI heads: the model as a whole,
the backbone and FPN, the RPN and ``MODEL.ROI_HEADS`` (the heads: :mod:`.roi_heads`)."""

from detectron2.config import CfgNode as CN


def add_model_config(cfg: CN) -> None:
    """Add the ``MODEL``, backbone, FPN, RPN and ``MODEL.ROI_HEADS`` keys to ``cfg`` in place."""
    # Parameter-name prefixes whose parameters are not trained, e.g. ["backbone",
    # "proposal_generator"] for the decoupled classifier fine-tune stage of Balanced Group
    # Softmax (start it from a trained model with MODEL.WEIGHTS). Their BatchNorm/SyncBN and
    # dropout layers stay in eval mode (statistics neither used from the batch nor updated).
    # A prefix that matches no parameter is an error.
    cfg.MODEL.FROZEN_MODULES = []
    _add_backbone(cfg)
    _add_fpg(cfg)
    _add_rpn(cfg)
    _add_roi_heads_node(cfg)
    _add_htc(cfg)


def _add_backbone(cfg: CN) -> None:
    # FPN top-down 2x upsampling: "nearest" (detectron2's) or "carafe" (CARAFE, Wang et al.
    # 2019; layers/carafe.py). Honoured by the backbone builders build_longtail_resnet_fpn_backbone
    # and build_timm_fpn_backbone; detectron2's build_resnet_fpn_backbone always uses nearest.
    cfg.MODEL.FPN.UPSAMPLE_TYPE = "nearest"
    # CARAFE parameters of the FPN (the paper's and mmdetection's defaults).
    cfg.MODEL.FPN.CARAFE = CN()
    # Channels of CARAFE's 1x1 channel compressor.
    cfg.MODEL.FPN.CARAFE.COMPRESSED_CHANNELS = 64
    # Kernel size of CARAFE's content encoder (odd).
    cfg.MODEL.FPN.CARAFE.ENCODER_KERNEL = 3
    # Reassembly neighbourhood of CARAFE (odd).
    cfg.MODEL.FPN.CARAFE.UP_KERNEL = 5

    # timm backbones (MODEL.BACKBONE.NAME "build_timm_fpn_backbone"; modeling/backbones.py):
    # any timm model with features_only support and feature maps at strides 4, 8, 16, 32,
    # named res2..res5 like detectron2's ResNet (select them with MODEL.FPN.IN_FEATURES).
    cfg.MODEL.TIMM = CN()
    # timm model name, e.g. "resnest50d", "convnext_tiny", "resnet50".
    cfg.MODEL.TIMM.NAME = "resnet50"
    # Local file with the timm model's ImageNet weights (timm's own state-dict format:
    # .pth/.bin/.safetensors); "" = random init. Nothing is ever downloaded. Weights in
    # detectron2's layout (backbone.bottom_up.*) can instead be given by MODEL.WEIGHTS.
    cfg.MODEL.TIMM.PRETRAINED_FILE = ""
    # Normalisation layers: "" (the model's own), "FrozenBN", "SyncBN" (synchronised across
    # processes, CPU/gloo included), "naiveSyncBN" (detectron2's NaiveSyncBatchNorm). The
    # stages frozen by MODEL.BACKBONE.FREEZE_AT (1 = stem, 2 = stem + res2, ...) get FrozenBN
    # and no gradients, as in detectron2's ResNet.
    cfg.MODEL.TIMM.NORM = ""
    # Stochastic depth of the timm model (its drop_path_rate); 0 = off.
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.0
    # Deformable convolution per stage res2..res5, as MODEL.RESNETS.DEFORM_ON_PER_STAGE for
    # detectron2's ResNet: every 3x3 nn.Conv2d of a stage becomes a deformable one, its
    # weights kept, its offsets from a zero-initialised conv.
    cfg.MODEL.TIMM.DEFORM_ON_PER_STAGE = [False, False, False, False]
    # DCNv2 (modulated) rather than DCNv1.
    cfg.MODEL.TIMM.DEFORM_MODULATED = True
    # Offset groups of DCNv1.
    cfg.MODEL.TIMM.DEFORM_NUM_GROUPS = 1


def _add_fpg(cfg: CN) -> None:
    # Feature Pyramid Grids (modeling/fpg.py; docs/architecture.md, "FPG"): MODEL.BACKBONE.NAME
    # "build_resnet_fpg_backbone" (detectron2's ResNet) or "build_timm_fpg_backbone"
    # (MODEL.TIMM). Defaults: mmdetection's configs/fpg (9@256, BN).
    cfg.MODEL.FPG = CN()
    # Bottom-up features, finest first (strides doubling); FPG adds one coarser level, the
    # stride-2 subsampling of the coarsest lateral: res2..res5 give p2..p6.
    cfg.MODEL.FPG.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # Bottom-up pathways after the lateral pathway 0 (9 in the paper and mmdetection).
    cfg.MODEL.FPG.NUM_PATHWAYS = 9
    # Channels of the grid (laterals and nodes; mmdetection's inter_channels): 256, or 128
    # for the lighter variant.
    cfg.MODEL.FPG.CHANNELS = 256
    # Channels of the outputs p2..p6 that the heads read.
    cfg.MODEL.FPG.OUT_CHANNELS = 256
    # detectron2 norm after each transition's conv (the output convs have none): "BN" as in
    # mmdetection's configs (8 images per GPU there), "SyncBN" for small per-GPU batches,
    # "GN", or "" (no norm, convs with bias).
    cfg.MODEL.FPG.NORM = "BN"
    # The LVIS 2020 MMDet entry's "enhanced" FPG (unreleased; our reading, see docs): a DCNv2
    # after every upsampling (the across-down transitions' 3x3 conv; zero-initialised offsets).
    cfg.MODEL.FPG.DEFORM_UPSAMPLE = False
    # Same-pathway 2x downsampling: "conv" (3x3 stride-2 conv, the paper's) or "carafe"
    # (content-aware reassembly, CARAFE++ style, then a 3x3 stride-1 conv; the entry's
    # "content-aware downsampling", whose details were not published).
    cfg.MODEL.FPG.DOWNSAMPLE_TYPE = "conv"
    # Parameters of the "carafe" downsampling (our defaults).
    cfg.MODEL.FPG.CARAFE = CN()
    # Channels of the 1x1 compressor.
    cfg.MODEL.FPG.CARAFE.COMPRESSED_CHANNELS = 64
    # Kernel of the stride-2 content encoder.
    cfg.MODEL.FPG.CARAFE.ENCODER_KERNEL = 3
    # Reassembled neighbourhood (3 keeps the unfolded input at 9x a level).
    cfg.MODEL.FPG.CARAFE.DOWN_KERNEL = 3


def _add_rpn(cfg: CN) -> None:
    # Ignore regions of the RPN (modeling/ignore_regions.py, docs/self_training.md): in
    # training, an anchor that would be background and overlaps one of its image's ignore
    # boxes (DATASETS.IGNORE_BOXES, crowd boxes) is ignored (label -1: not sampled, no loss).
    # Needs MODEL.PROPOSAL_GENERATOR.NAME "LongTailRPN" and MODEL.META_ARCHITECTURE
    # "LongTailRCNN"; batches without ignore boxes are unaffected.
    cfg.MODEL.RPN.IGNORE = CN()
    # Overlap measure: "iou", or "iof" (intersection over the anchor's own area).
    cfg.MODEL.RPN.IGNORE.METRIC = "iou"
    # Overlap at or above which a background anchor is ignored. The 1st place LVIS 2020 entry
    # gives no value; 0.5 (the ROI heads' foreground IoU) is this project's choice.
    cfg.MODEL.RPN.IGNORE.THRESH = 0.5


def _add_roi_heads_node(cfg: CN) -> None:
    # Box size (sqrt of area, input pixels) pooled from FPN level 4 by the box and mask RoI
    # poolers: level = floor(4 + log2(sqrt(w h) / CANONICAL_BOX_SIZE)), clamped to the pooled
    # levels. 224 is detectron2's constant, made for ~800 px images; scale it with the input
    # size (the tiny 128 px configs use 36), or every RoI is pooled from P2.
    cfg.MODEL.ROI_HEADS.CANONICAL_BOX_SIZE = 224
    # Per-class suppression of the box predictor's detections at inference, in every
    # lvis_longtail ROI heads: "hard" (detectron2's NMS at MODEL.ROI_HEADS.NMS_THRESH_TEST),
    # "soft_linear" or "soft_gaussian" (Soft-NMS with MODEL.ROI_HEADS.SOFT_NMS instead of hard
    # NMS; detections keep their decayed scores).
    cfg.MODEL.ROI_HEADS.NMS_TYPE = "hard"
    # Soft-NMS parameters (Bodla et al. 2017; modeling/postprocessing.py).
    cfg.MODEL.ROI_HEADS.SOFT_NMS = CN()
    # Width of the Gaussian decay exp(-IoU^2 / SIGMA).
    cfg.MODEL.ROI_HEADS.SOFT_NMS.SIGMA = 0.5
    # N_t of the linear decay: scores of boxes with IoU >= N_t are multiplied by 1 - IoU.
    cfg.MODEL.ROI_HEADS.SOFT_NMS.IOU_THRESH = 0.3
    # Boxes whose decayed score falls below it are dropped.
    cfg.MODEL.ROI_HEADS.SOFT_NMS.MIN_SCORE = 1e-3

    # Ignore regions of the ROI heads (as MODEL.RPN.IGNORE, for proposals; every
    # lvis_longtail ROI heads supports them, cascade stages >= 1 drop the ignored proposals).
    cfg.MODEL.ROI_HEADS.IGNORE = CN()
    # Overlap measure: "iou", or "iof" (intersection over the proposal's own area).
    cfg.MODEL.ROI_HEADS.IGNORE.METRIC = "iou"
    # Overlap at or above which a background proposal is ignored (this project's choice).
    cfg.MODEL.ROI_HEADS.IGNORE.THRESH = 0.5

    # HTC-Lite (MODEL.ROI_HEADS.NAME "LongTailHTCLiteROIHeads", docs/htc_lite.md); its global
    # context head is MODEL.ROI_CONTEXT_HEAD.
    cfg.MODEL.ROI_HEADS.HTC_LITE = CN()
    # The cascade stage whose positives train the one mask head, 0-based, negative from the
    # last (-1: the last stage, HTC-Lite's choice; 0 with the context head off is exactly
    # LongTailCascadeROIHeads). Must be a stage of MODEL.ROI_BOX_CASCADE_HEAD.IOUS.
    cfg.MODEL.ROI_HEADS.HTC_LITE.MASK_TRAIN_STAGE = -1
    # At most this many positives per image (random) train the mask head; 0 = all, -1 = as
    # many as the first stage has for that image (the mask cost of the cascade, which trains
    # its mask head on the first stage's positives). The cascade does not re-sample later
    # stages, so a trained model's last stage has ~2x the first stage's positives.
    cfg.MODEL.ROI_HEADS.HTC_LITE.MASK_MAX_POSITIVES = 0


def _add_htc(cfg: CN) -> None:
    # HTC without the semantic branch (MODEL.ROI_HEADS.NAME "LongTailHTCROIHeads",
    # docs/htc.md), which extends HTC-Lite's heads (HTC_LITE.MASK_MAX_POSITIVES and
    # MODEL.ROI_CONTEXT_HEAD still apply). The defaults are mmdetection's HTC; with the four
    # switches False it is exactly HTC-Lite.
    cfg.MODEL.ROI_HEADS.HTC = CN()
    # One mask head per cascade stage, losses "<name>_stage<t>"; at inference every head
    # predicts the final boxes' masks and their sigmoid probabilities are averaged. False:
    # HTC-Lite's one mask head, trained on HTC_LITE.MASK_TRAIN_STAGE.
    cfg.MODEL.ROI_HEADS.HTC.PER_STAGE_MASKS = True
    # Interleaved execution (needs PER_STAGE_MASKS): mask head t trains on the boxes refined
    # by box stage t, re-matched at stage t's IoU with the GT boxes added, at most
    # BATCH_SIZE_PER_IMAGE x POSITIVE_FRACTION positives per image. False: on the positives
    # of box stage t's own proposals.
    cfg.MODEL.ROI_HEADS.HTC.INTERLEAVED = True
    # Mask information flow (needs PER_STAGE_MASKS): mask head t adds a 1x1 conv (norm
    # ROI_MASK_HEAD.NORM, ReLU) of head t-1's conv features to its pooled RoI features.
    cfg.MODEL.ROI_HEADS.HTC.MASK_INFO_FLOW = True
    # Weight of each stage's mask losses, one per stage (mmdetection's HTC stage_loss_weights;
    # the box stages keep detectron2's cascade scaling).
    cfg.MODEL.ROI_HEADS.HTC.MASK_STAGE_LOSS_WEIGHTS = [1.0, 0.5, 0.25]
    # Box stages >= 1 sample their proposals as stage 0 does (refined boxes plus the GT boxes,
    # BATCH_SIZE_PER_IMAGE RoIs, POSITIVE_FRACTION positives), as mmdetection's cascades.
    # False: detectron2's cascade, every refined box of the previous stage.
    cfg.MODEL.ROI_HEADS.HTC.SAMPLE_BOX_STAGES = True
