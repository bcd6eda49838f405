"""Defaults of lvis_longtail's ``SOLVER`` and ``TEST`` keys and of its top-level keys
(settings of each process, as detectron2's ``SEED`` and ``CUDNN_BENCHMARK``)."""

from detectron2.config import CfgNode as CN


def add_runtime_config(cfg: CN) -> None:
    """Add the ``SOLVER``, ``TEST`` and top-level keys to ``cfg`` in place."""
    # Periodic checkpoints (model_XXXXXXX.pth, also those saved on a preemption signal) kept
    # in OUTPUT_DIR: after each save, those older than the newest CHECKPOINT_KEEP are deleted.
    # model_final.pth and the checkpoint last_checkpoint names are never deleted. 0 keeps all
    # (detectron2's behaviour); keep at least 2 so that --resume can fall back to an older
    # checkpoint if the newest cannot be read (docs/fault_tolerance.md).
    cfg.SOLVER.CHECKPOINT_KEEP = 0
    _add_evaluation(cfg)
    _add_calibration(cfg)
    _add_tta(cfg)
    # Torch intra-op threads of each training / evaluation process on CPU (MODEL.DEVICE cpu),
    # set by lvis_longtail.engine.launch.configure_cpu_threads; DataLoader workers run torch
    # with one thread. 0 = auto: $LVIS_LONGTAIL_CPU_THREADS, else $OMP_NUM_THREADS, else the
    # cores per process minus DATALOADER.NUM_WORKERS (at least 1): torch's default, one
    # thread per core in every process, oversubscribes a small machine and slows it
    # several-fold once anything else runs. Not used on GPU.
    cfg.CPU_THREADS = 0
    # OpenCV threads of each process and of each of its DataLoader workers, on every device
    # (GPU runs too: GPUs x NUM_WORKERS workers with all-cores pools oversubscribe a node).
    cfg.OPENCV_THREADS = 1


def _add_evaluation(cfg: CN) -> None:
    # LVIS evaluation protocol, for the metrics and the exported results file alike:
    # "standard": at most 300 detections per image across classes (the LVIS challenge rule);
    # "fixed": Fixed AP (Dave et al. 2021): the TEST.FIXED_AP.DETS_PER_CLASS best detections
    # of each class over the whole split, no per-image cap. For "fixed", raise the model's own
    # cap so inference keeps enough candidates: TEST.DETECTIONS_PER_IMAGE -1 (none) or e.g.
    # 1000 (LVIS v1 val needs ~600 per image on average: 10,000 x 1203 / 19,809), and keep
    # MODEL.ROI_HEADS.SCORE_THRESH_TEST low (1e-4). The evaluator's per-class score thresholds
    # (the running 10,000th score of each class) drop the rest before masks are encoded.
    # "challenge2021": the LVIS Challenge 2021 (lvis-api's lvis_challenge_2021 branch): "fixed"
    # with Boundary AP evaluated too, whatever TEST.LVIS_TASKS says.
    cfg.TEST.EVAL_PROTOCOL = "standard"
    # Parameters of the "fixed" protocol.
    cfg.TEST.FIXED_AP = CN()
    # Detections kept per class over the split (10,000 for LVIS).
    cfg.TEST.FIXED_AP.DETS_PER_CLASS = 10000
    # Which code computes LVIS AP: "fast" (lvis_longtail.evaluation.fast_eval: lvis-api's
    # numbers, several times faster, less memory) or "lvis_api" (lvis-api 0.5.3 itself).
    cfg.TEST.LVIS_EVALUATOR = "fast"
    # LVIS tasks the evaluator computes, any of "bbox", "segm" and "boundary" (Boundary AP,
    # Cheng et al. 2021: detections matched by min(mask IoU, boundary IoU); fast evaluator
    # only, docs/methods.md "Boundary AP"). Under every TEST.EVAL_PROTOCOL; "challenge2021"
    # adds it. Mask tasks are skipped for a model without masks. E.g. TEST.LVIS_TASKS
    # "('bbox', 'segm', 'boundary')" for Boundary AP under the standard protocol.
    cfg.TEST.LVIS_TASKS = ("bbox", "segm")
    # Boundary AP's erosion radius over the image diagonal: d = round(ratio * diagonal)
    # pixels, at least 1 (the challenge's 0.02).
    cfg.TEST.BOUNDARY_DILATION_RATIO = 0.02
    # Minutes the other processes wait for the main one to export and score an evaluation,
    # on a gloo group of their own (lvis_longtail/utils/dist.py): the process group's timeout
    # (30 min) catches hangs in training, while scoring ~6M detections (Fixed AP, LVIS v1 val)
    # may take longer.
    cfg.TEST.EVAL_WAIT_MINUTES = 240


def _add_calibration(cfg: CN) -> None:
    # Post-hoc calibration of the box classifier's softmax scores at inference (no training;
    # docs/methods.md): "none"; "norcal" (NorCal, Pan et al., NeurIPS 2021): class logits
    # z_c - GAMMA log N_c, background untouched, renormalised by the loss's softmax;
    # "logit_adjustment" (Menon et al., post-hoc form): z_c - TAU log(K pi_c). Counts from
    # DATASETS.TRAIN. Only for losses with softmax probabilities (SoftmaxCE, SeesawLoss,
    # GroupSoftmax, BalancedSoftmax, LogitAdjustedCE); a sigmoid loss is an error. Pick GAMMA
    # / TAU on a validation split with `python -m lvis_longtail.tools.norcal_sweep`.
    cfg.TEST.CLS_CALIBRATION = "none"
    # Parameters of the "norcal" calibration.
    cfg.TEST.NORCAL = CN()
    # Exponent gamma of N_c^GAMMA; 0 = no calibration. No published default (the reference
    # tunes it per model).
    cfg.TEST.NORCAL.GAMMA = 0.6
    # Training count N_c: "image" (images containing the class) or "instance" (its
    # instances).
    cfg.TEST.NORCAL.COUNT = "image"
    # Parameters of the "logit_adjustment" calibration.
    cfg.TEST.LOGIT_ADJUSTMENT = CN()
    # Strength tau.
    cfg.TEST.LOGIT_ADJUSTMENT.TAU = 1.0
    # Training count of pi_c: "image" or "instance".
    cfg.TEST.LOGIT_ADJUSTMENT.COUNT = "image"


def _add_tta(cfg: CN) -> None:
    # Scales of test-time augmentation (TEST.AUG.ENABLED; LongTailTTA, also for the exported
    # results) as explicit [short side, max size] pairs, e.g. [[1200, 2000], [1400, 2333]];
    # empty: every TEST.AUG.MIN_SIZES with TEST.AUG.MAX_SIZE (detectron2's keys); FLIP adds
    # the flipped image of each scale. The detections of every augmentation are merged, then
    # masks are predicted for the merged boxes at every augmentation; with every TEST.AUG key
    # of lvis_longtail at its default this is detectron2's GeneralizedRCNNWithTTA.
    cfg.TEST.AUG.SCALES = []
    # Valid sqrt(w h) range [lo, hi] of the detections of each scale, one pair per scale, in
    # that scale's (resized) pixels; hi < 0 = no upper bound; empty = every box at every
    # scale. Small boxes come from large scales, large boxes from small ones (LVIS 2020 1st
    # place).
    cfg.TEST.AUG.VALID_RANGES = []
    # Score factor of the detections of rare categories (frequency groups of
    # DATASETS.TRAIN[0]'s class_frequency metadata), applied to the union of the
    # augmentations' detections before the merge; 1.0 = off.
    cfg.TEST.AUG.RARE_SCORE_FACTOR = 1.0
    # Score factor of the detections of common categories, as RARE_SCORE_FACTOR.
    cfg.TEST.AUG.COMMON_SCORE_FACTOR = 1.0
    # Per-class hard NMS IoU threshold of the merge; < 0: MODEL.ROI_HEADS.NMS_THRESH_TEST
    # (detectron2). The 1st-place recipe uses 0.7 followed by Soft-NMS.
    cfg.TEST.AUG.NMS_THRESH = -1.0
    # After the hard NMS: "hard" (nothing more), "soft_linear" or "soft_gaussian" (Soft-NMS
    # with TEST.AUG.SOFT_NMS on the survivors; they keep their decayed scores).
    cfg.TEST.AUG.MERGE_NMS_TYPE = "hard"
    # Soft-NMS parameters of the merge, as MODEL.ROI_HEADS.SOFT_NMS.
    cfg.TEST.AUG.SOFT_NMS = CN()
    # Width of the Gaussian decay exp(-IoU^2 / SIGMA).
    cfg.TEST.AUG.SOFT_NMS.SIGMA = 0.5
    # N_t of the linear decay.
    cfg.TEST.AUG.SOFT_NMS.IOU_THRESH = 0.3
    # Boxes whose decayed score falls below it are dropped.
    cfg.TEST.AUG.SOFT_NMS.MIN_SCORE = 1e-3
    # Mask of each merged detection: "mean" (mean of the M x M mask probabilities over the
    # augmentations, detectron2) or "select" (mean over the augmentations of the scales whose
    # VALID_RANGES contain the instance's sqrt(w h r) in that scale's pixels, r = fraction of
    # the mean mask above 0.5; the mean of all when none does; needs VALID_RANGES).
    # mask_scores (MaskIoU head) follow the same rule.
    cfg.TEST.AUG.MASK_RULE = "mean"
    # Merged detections per mask-head call: bounds the (chunk, K, M, M) class-specific logits.
    cfg.TEST.AUG.MASK_CHUNK_SIZE = 100
    # Augmented images per backbone batch (detectron2's GeneralizedRCNNWithTTA uses 3).
    cfg.TEST.AUG.BATCH_SIZE = 3
