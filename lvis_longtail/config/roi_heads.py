"""Defaults of lvis_longtail's keys of the ROI heads' components: ``MODEL.ROI_BOX_HEAD``,
``MODEL.ROI_MASK_HEAD``, ``MODEL.ROI_MASKIOU_HEAD`` and ``MODEL.ROI_CONTEXT_HEAD``."""

from detectron2.config import CfgNode as CN


def add_roi_heads_config(cfg: CN) -> None:
    """Add the keys of the box, mask, MaskIoU and context heads to ``cfg`` in place."""
    _add_box_head(cfg)
    _add_softmax_losses(cfg)
    _add_sigmoid_losses(cfg)
    _add_dual_head(cfg)
    _add_tsd(cfg)
    _add_mask_head(cfg)
    _add_mask_pooler_and_upsampling(cfg)
    # Mask Scoring R-CNN's MaskIoU head (Huang et al. 2019; modeling/mask_scoring.py): it
    # predicts each mask's IoU with its GT ("loss_maskiou"); segm score = box score x
    # predicted IoU, as the instances' `mask_scores` (their `scores` are unchanged).
    cfg.MODEL.ROI_MASKIOU_HEAD = CN()
    # Build the MaskIoU head (with any mask head of lvis_longtail's ROI heads).
    cfg.MODEL.ROI_MASKIOU_HEAD.ENABLED = False
    # Weight of loss_maskiou (MSE of the predicted IoU at the GT class, positive RoIs).
    cfg.MODEL.ROI_MASKIOU_HEAD.LOSS_WEIGHT = 0.5
    _add_context_head(cfg)


def _add_box_head(cfg: CN) -> None:
    # Classification loss of the box predictor, a name in CLS_LOSS_REGISTRY: "SoftmaxCE"
    # (detectron2's), "SigmoidCE", "SeesawLoss", "EQL", "EQLv2", "GroupSoftmax" (Balanced
    # Group Softmax), "FederatedLoss", "BalancedSoftmax", "LogitAdjustedCE", "ECMLoss". The
    # loss decides how many logits the classifier produces and how they become [K class
    # scores, background] probabilities; its parameters are the sub-node of its name below.
    cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME = "SoftmaxCE"
    # Weight of the classification loss term(s).
    cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS_WEIGHT = 1.0
    # Class-score layer of the box predictor (box regression is unchanged): "Linear", or
    # "NormedLinear" (cosine classifier: scaled dot product of L2-normalised features and
    # weights, plus a bias). Works with every CLS_LOSS_NAME.
    cfg.MODEL.ROI_BOX_HEAD.PREDICTOR_TYPE = "Linear"
    # Scale tau of the NormedLinear classifier.
    cfg.MODEL.ROI_BOX_HEAD.NORMED_SCALE = 20.0
    # detectron2's key, with one more value: "ROIAlignV2" (default), "ROIAlign", "ROIPool",
    # "ROIAlignRotated" (needs detectron2's C++ ops) or "DeformROIAlignV2": deformable RoI
    # pooling (Dai et al. 2017; layers/deform_roi_pool.py): ROIAlignV2, an FC branch
    # predicting per-bin offsets (zero-initialised: it starts as ROIAlignV2), then RoIAlign of
    # the shifted bins.
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
    # Parameters of the "DeformROIAlignV2" box pooler.
    cfg.MODEL.ROI_BOX_HEAD.DEFORM_POOL = CN()
    # Hidden width of the offset branch (C k k -> FC_DIM -> ReLU -> 2 k k, shared by the FPN
    # levels).
    cfg.MODEL.ROI_BOX_HEAD.DEFORM_POOL.FC_DIM = 1024
    # Bin offset = GAMMA x predicted offset x RoI (width, height); 0.1 in the paper.
    cfg.MODEL.ROI_BOX_HEAD.DEFORM_POOL.GAMMA = 0.1


def _add_softmax_losses(cfg: CN) -> None:
    # Seesaw Loss (Wang et al., CVPR 2021), CLS_LOSS_NAME "SeesawLoss". P = Q = 0 is plain
    # softmax cross-entropy.
    cfg.MODEL.ROI_BOX_HEAD.SEESAW = CN()
    # Exponent P of the mitigation factor (N_j / N_i)^P.
    cfg.MODEL.ROI_BOX_HEAD.SEESAW.P = 0.8
    # Exponent Q of the compensation factor (sigma_j / sigma_i)^Q.
    cfg.MODEL.ROI_BOX_HEAD.SEESAW.Q = 2.0
    # Floor of sigma_i in the compensation ratio.
    cfg.MODEL.ROI_BOX_HEAD.SEESAW.EPS = 1e-2

    # Balanced Group Softmax (Li et al., CVPR 2020), CLS_LOSS_NAME "GroupSoftmax".
    cfg.MODEL.ROI_BOX_HEAD.GROUP_SOFTMAX = CN()
    # Training instance-count edges of the class groups: [10, 100, 1000] gives [0, 10),
    # [10, 100), [100, 1000), [1000, inf) plus the background group.
    cfg.MODEL.ROI_BOX_HEAD.GROUP_SOFTMAX.BIN_EDGES = [10, 100, 1000]
    # "Others" RoIs kept per positive RoI of a group (beta).
    cfg.MODEL.ROI_BOX_HEAD.GROUP_SOFTMAX.OTHERS_SAMPLE_RATIO = 8.0

    # Logit-adjusted softmax CE (Menon et al., ICLR 2021), CLS_LOSS_NAME "LogitAdjustedCE":
    # softmax CE of z_c + TAU log(K pi_c) for the K classes (background unshifted); inference
    # uses z. pi_c = n_c / sum n, n the training COUNT, each clamped to >= 1.
    cfg.MODEL.ROI_BOX_HEAD.LOGIT_ADJUSTMENT = CN()
    # Strength tau; 0 is plain softmax CE.
    cfg.MODEL.ROI_BOX_HEAD.LOGIT_ADJUSTMENT.TAU = 1.0
    # Training count n_c: "image" (images containing the class) or "instance" (its
    # instances), from DATASETS.TRAIN's metadata.
    cfg.MODEL.ROI_BOX_HEAD.LOGIT_ADJUSTMENT.COUNT = "image"

    # Balanced Softmax (Ren et al., NeurIPS 2020), CLS_LOSS_NAME "BalancedSoftmax": the
    # logit-adjusted loss with TAU = 1.
    cfg.MODEL.ROI_BOX_HEAD.BALANCED_SOFTMAX = CN()
    # Training count n_c: "image" or "instance", as LOGIT_ADJUSTMENT.COUNT.
    cfg.MODEL.ROI_BOX_HEAD.BALANCED_SOFTMAX.COUNT = "image"


def _add_sigmoid_losses(cfg: CN) -> None:
    # Equalization Loss (Tan et al., CVPR 2020), CLS_LOSS_NAME "EQL".
    cfg.MODEL.ROI_BOX_HEAD.EQL = CN()
    # Classes whose training image frequency f_j = image_count_j / num_images is below it have
    # their negative gradients from foreground RoIs suppressed (1.1e-3 for LVIS v1, 1.77e-3
    # for v0.5).
    cfg.MODEL.ROI_BOX_HEAD.EQL.LAMBDA = 1.1e-3
    # Initial sigmoid probability p: bias = -log((1 - p) / p).
    cfg.MODEL.ROI_BOX_HEAD.EQL.PRIOR_PROB = 1e-3

    # Equalization Loss v2 (Tan et al., CVPR 2021), CLS_LOSS_NAME "EQLv2": gradient-guided
    # reweighting with f(g) = 1 / (1 + exp(-GAMMA (g - MU))) of the accumulated positive /
    # negative gradient ratio g. Statistics are all-reduced across processes.
    cfg.MODEL.ROI_BOX_HEAD.EQLV2 = CN()
    # Slope of f.
    cfg.MODEL.ROI_BOX_HEAD.EQLV2.GAMMA = 12.0
    # Centre of f.
    cfg.MODEL.ROI_BOX_HEAD.EQLV2.MU = 0.8
    # Extra weight on positives: 1 + ALPHA (1 - f).
    cfg.MODEL.ROI_BOX_HEAD.EQLV2.ALPHA = 4.0
    # Initial sigmoid probability; 0.5 is a zero bias, what the reference (tztztztztz/eqlv2:
    # mmdet's BBoxHead init, no prior in the loss) uses. A focal-style prior of 1e-3 starts
    # every RoI, 3/4 of them background, far from its target: on the synthetic benchmark it
    # cost 11 bbox AP at 250 iterations (benchmarks/results/).
    cfg.MODEL.ROI_BOX_HEAD.EQLV2.PRIOR_PROB = 0.5

    # Federated loss (Zhou et al., CenterNet2), CLS_LOSS_NAME "FederatedLoss": sigmoid CE on
    # the classes present in the batch plus sampled ones.
    cfg.MODEL.ROI_BOX_HEAD.FED_LOSS = CN()
    # Classes per iteration (present ones first, then sampled).
    cfg.MODEL.ROI_BOX_HEAD.FED_LOSS.NUM_CLASSES = 50
    # Classes are sampled with weight image_count^FREQ_WEIGHT_POWER.
    cfg.MODEL.ROI_BOX_HEAD.FED_LOSS.FREQ_WEIGHT_POWER = 0.5
    # Initial sigmoid probability.
    cfg.MODEL.ROI_BOX_HEAD.FED_LOSS.PRIOR_PROB = 0.01

    # Sigmoid cross-entropy over K class logits (background = all zeros), CLS_LOSS_NAME
    # "SigmoidCE".
    cfg.MODEL.ROI_BOX_HEAD.SIGMOID_CE = CN()
    # Initial sigmoid probability.
    cfg.MODEL.ROI_BOX_HEAD.SIGMOID_CE.PRIOR_PROB = 0.01

    # Effective Class-Margin loss (Cho & Kraehenbuehl, ECCV 2022), CLS_LOSS_NAME "ECMLoss":
    # K+1 sigmoid logits with margins and weights from the training image counts.
    cfg.MODEL.ROI_BOX_HEAD.ECM = CN()
    # Background count = FG_BG_RATIO x the summed class counts (the reference's empirical
    # ratio of Mask R-CNN).
    cfg.MODEL.ROI_BOX_HEAD.ECM.FG_BG_RATIO = 6.3313


def _add_dual_head(cfg: CN) -> None:
    # Dual head classification fine-tune (modeling/dual_head.py; docs/methods.md, "Dual head
    # classification"): start from a trained model (MODEL.WEIGHTS), freeze it, train a new
    # classification branch per box stage, fuse both branches' scores at inference.
    cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD = CN()
    # Add the new branches; the trainer then freezes everything else (parameters and
    # BatchNorm statistics), so only the new branches train.
    cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED = False
    # The new branch of each stage: "box_head" (a second FC tower of the box head's
    # architecture on the pooled RoI features, plus a classifier; SimCal's) or "classifier"
    # (a classifier on the trained box head's features). Its classifier layer is
    # MODEL.ROI_BOX_HEAD.PREDICTOR_TYPE.
    cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.BRANCH = "box_head"
    # Loss of the new branch, a name in CLS_LOSS_REGISTRY (its parameters are those of the
    # ROI_BOX_HEAD sub-nodes, e.g. SEESAW); the paper leaves it open, SimCal used softmax CE.
    cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.CLS_LOSS_NAME = "SoftmaxCE"
    # Initialisation of the new branch when MODEL.WEIGHTS holds none (the trained model's
    # checkpoint): "copy" of the trained tower and, when the logit layouts agree, of the
    # trained classifier; "random" (detectron2's initialisation, the loss's bias prior).
    cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.INIT = "copy"
    # Fusion of the two branches' [K scores, background] probabilities at inference, per
    # stage (a cascade then averages the stages): "mean" ((1 - w) trained + w new, the
    # paper's average at w = 0.5), "geometric" (trained^(1 - w) new^w), "group" (the new
    # branch's scores for the classes of NEW_BRANCH_GROUPS, the trained branch's for the
    # others).
    cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.FUSION = "mean"
    # w, the new branch's weight in "mean" and "geometric" (0: the trained model alone).
    cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.NEW_WEIGHT = 0.5
    # Frequency groups ("r", "c", "f" of the training set, DATASETS.TRAIN) scored by the new
    # branch under FUSION "group".
    cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.NEW_BRANCH_GROUPS = ["r", "c"]


def _add_tsd(cfg: CN) -> None:
    # TSD, task-aware spatial disentanglement (Song et al., CVPR 2020; modeling/tsd.py;
    # docs/methods.md, "TSD"): per box stage, classification and regression from two
    # re-samplings of the proposal; the ordinary box head trains alongside as the sibling.
    cfg.MODEL.ROI_BOX_HEAD.TSD = CN()
    # Build a TSD head in every box stage (LongTailROIHeads, the cascade, HTC-Lite, HTC).
    cfg.MODEL.ROI_BOX_HEAD.TSD.ENABLED = False
    # gamma: bin offsets and the proposal translation are gamma x predicted offset x the
    # proposal's (width, height).
    cfg.MODEL.ROI_BOX_HEAD.TSD.GAMMA = 0.1
    # Width of the shared FC layer and of the two offset MLPs' hidden layers.
    cfg.MODEL.ROI_BOX_HEAD.TSD.OFFSET_FC_DIM = 256
    # Classification progressive constraint (loss_tsd_pc_cls, every sampled RoI).
    cfg.MODEL.ROI_BOX_HEAD.TSD.PC_CLS = True
    # Its margin: the TSD probability of the label should beat the sibling's by this much.
    cfg.MODEL.ROI_BOX_HEAD.TSD.PC_CLS_MARGIN = 0.3
    # Localisation progressive constraint (loss_tsd_pc_loc, positive RoIs).
    cfg.MODEL.ROI_BOX_HEAD.TSD.PC_LOC = True
    # Its margin: the TSD box's IoU with the GT should beat the sibling's by this much.
    cfg.MODEL.ROI_BOX_HEAD.TSD.PC_LOC_MARGIN = 0.3


def _add_mask_head(cfg: CN) -> None:
    # Weight of the dice term (loss_mask_dice) of DiceBCEMaskHead's balanced mask loss (LVIS
    # 2020 1st place): DICE_LOSS_WEIGHT x dice + BCE_LOSS_WEIGHT x area-ratio-weighted BCE.
    cfg.MODEL.ROI_MASK_HEAD.DICE_LOSS_WEIGHT = 1.0
    # Weight of the area-ratio-weighted BCE term (loss_mask) of DiceBCEMaskHead.
    cfg.MODEL.ROI_MASK_HEAD.BCE_LOSS_WEIGHT = 1.0
    # Upper bound of DiceBCEMaskHead's foreground pixel weight clip((1 - r) / r, 1,
    # FG_WEIGHT_MAX), r the foreground fraction of the RoI's mask target.
    cfg.MODEL.ROI_MASK_HEAD.FG_WEIGHT_MAX = 10.0
    # Weight of DiceBCEMaskHead's auxiliary boundary loss (target derived from the mask
    # target); 0 = off. Needs MODEL.ROI_MASK_HEAD.NAME "DiceBCEMaskHead" when > 0.
    cfg.MODEL.ROI_MASK_HEAD.BOUNDARY_LOSS_WEIGHT = 0.0
    # Mask predictor layer: "Conv" (detectron2's 1x1 conv) or "NormedConv" (cosine, scale
    # NORMED_SCALE; the Seesaw recipe's normalized mask predictor). "NormedConv" needs
    # MODEL.ROI_MASK_HEAD.NAME "DiceBCEMaskHead".
    cfg.MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE = "Conv"
    # Scale tau of the NormedConv predictor.
    cfg.MODEL.ROI_MASK_HEAD.NORMED_SCALE = 20.0
    # Mask RoI feature-level assignment: "box" (detectron2's rule on sqrt(w h)) or
    # "area_ratio" (on sqrt(w h r), r = mask area / box area of the matched GT).
    cfg.MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT = "box"
    # With LEVEL_ASSIGNMENT "area_ratio", how r is obtained at test time: "one" (r = 1, the
    # box rule) or "two_pass" (predict, estimate r from the predicted mask, re-pool, predict).
    cfg.MODEL.ROI_MASK_HEAD.TEST_AREA_RATIO = "one"
    # Mask inference runs this many RoIs at a time; each chunk keeps only its predicted
    # class's mask logits, so peak memory is chunk x K x M x M instead of detections x K x M
    # x M (LVIS, 300 detections: 1.1 GB of fp32 logits at once). The masks do not depend on
    # it. 0 = all RoIs at once. Every lvis_longtail ROI heads and mask option honours it.
    cfg.MODEL.ROI_MASK_HEAD.TEST_CHUNK_SIZE = 32


def _add_mask_pooler_and_upsampling(cfg: CN) -> None:
    # detectron2's key, with the values of MODEL.ROI_BOX_HEAD.POOLER_TYPE. "DeformROIAlignV2"
    # does not go with LEVEL_ASSIGNMENT "area_ratio".
    cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE = "ROIAlignV2"
    # Parameters of the "DeformROIAlignV2" mask pooler.
    cfg.MODEL.ROI_MASK_HEAD.DEFORM_POOL = CN()
    # Hidden width of the offset branch, as MODEL.ROI_BOX_HEAD.DEFORM_POOL.FC_DIM.
    cfg.MODEL.ROI_MASK_HEAD.DEFORM_POOL.FC_DIM = 1024
    # Bin offset scale, as MODEL.ROI_BOX_HEAD.DEFORM_POOL.GAMMA.
    cfg.MODEL.ROI_MASK_HEAD.DEFORM_POOL.GAMMA = 0.1
    # Mask head 2x upsampling: "deconv" (detectron2's ConvTranspose2d) or "carafe" (replaces
    # the deconv of MaskRCNNConvUpsampleHead and the heads derived from it).
    cfg.MODEL.ROI_MASK_HEAD.UPSAMPLE_TYPE = "deconv"
    # CARAFE parameters of the mask head, as MODEL.FPN.CARAFE.
    cfg.MODEL.ROI_MASK_HEAD.CARAFE = CN()
    # Channels of CARAFE's 1x1 channel compressor.
    cfg.MODEL.ROI_MASK_HEAD.CARAFE.COMPRESSED_CHANNELS = 64
    # Kernel size of CARAFE's content encoder (odd).
    cfg.MODEL.ROI_MASK_HEAD.CARAFE.ENCODER_KERNEL = 3
    # Reassembly neighbourhood of CARAFE (odd).
    cfg.MODEL.ROI_MASK_HEAD.CARAFE.UP_KERNEL = 5


def _add_context_head(cfg: CN) -> None:
    # Global context head of HTC-Lite (read by LongTailHTCLiteROIHeads only): convs + global
    # average pooling on one FPN level give an image vector, trained to predict the image's
    # categories (multi-label BCE, "loss_context") and added to the RoI features.
    cfg.MODEL.ROI_CONTEXT_HEAD = CN()
    # Build the context head.
    cfg.MODEL.ROI_CONTEXT_HEAD.ENABLED = True
    # Backbone feature it reads (SCNet's global context head reads P6).
    cfg.MODEL.ROI_CONTEXT_HEAD.IN_FEATURE = "p6"
    # Number of 3x3 convs (residual in pairs).
    cfg.MODEL.ROI_CONTEXT_HEAD.NUM_CONV = 4
    # Width D of the convs, the context vector's size. Fusing needs D = the RoI feature
    # channels (MODEL.FPN.OUT_CHANNELS).
    cfg.MODEL.ROI_CONTEXT_HEAD.CONV_DIM = 256
    # detectron2 norm of the convs: "" (none), "GN", "SyncBN", ...
    cfg.MODEL.ROI_CONTEXT_HEAD.NORM = ""
    # Weight of loss_context. HTC-Lite's is unpublished; 3.0 is SCNet's global context loss
    # weight (the closest published head).
    cfg.MODEL.ROI_CONTEXT_HEAD.LOSS_WEIGHT = 3.0
    # Federated (LVIS) loss: count only the image's positive classes and its verified
    # negatives (neg_category_ids); other categories are unverified on LVIS. Training then
    # puts each image's neg_category_ids on its GT instances (LongTailDatasetMapper).
    cfg.MODEL.ROI_CONTEXT_HEAD.FEDERATED = False
    # Add the context vector to the pooled RoI features of every box stage.
    cfg.MODEL.ROI_CONTEXT_HEAD.FUSE_BOX = True
    # Add the context vector to the pooled RoI features of the mask head.
    cfg.MODEL.ROI_CONTEXT_HEAD.FUSE_MASK = True
