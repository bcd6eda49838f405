"""Defaults of lvis_longtail's ``DATASETS``, ``DATALOADER`` and ``INPUT`` keys."""

from detectron2.config import CfgNode as CN


def add_data_config(cfg: CN) -> None:
    """Add the ``DATASETS``, ``DATALOADER`` and ``INPUT`` keys to ``cfg`` in place."""
    _add_datasets(cfg)
    # A training image that cannot be read (missing, truncated, undecodable) is skipped: a
    # warning names its file and image id, another sample is drawn, and the number skipped
    # is logged at the end of training and written as data/skipped_images to metrics.json.
    # False: training stops with that error instead. Evaluation always stops with it.
    cfg.DATALOADER.SKIP_UNREADABLE_IMAGES = True
    _add_augmentation_list(cfg)
    _add_single_image_steps(cfg)
    _add_multi_image_steps(cfg)


def _add_datasets(cfg: CN) -> None:
    # Extra LVIS-format datasets registered before training or evaluation, so that no Python
    # edit is needed: [[name, json_file, image_root], ...]. Image paths come from each
    # image's `file_name` (relative to image_root) or else from the last two components of
    # its `coco_url` (LVIS v1 style); class names, frequency groups and counts come from the
    # json itself. E.g. DATASETS.LVIS_FORMAT "[['my_train', 'ann/train.json', 'images/']]".
    cfg.DATASETS.LVIS_FORMAT = []
    # Ignore boxes of training datasets: [[dataset_name, json_file], ...]. Every annotation box
    # of the LVIS-format json_file (e.g. tools/pseudo_label.py's output) becomes an ignore box
    # of the image with its image_id (data/ignore_boxes.py; MODEL.RPN.IGNORE and
    # MODEL.ROI_HEADS.IGNORE say what is ignored). Crowd annotations (iscrowd 1) of an
    # LVIS-format dataset are ignore boxes without any entry here.
    cfg.DATASETS.IGNORE_BOXES = []
    # Pseudo-labelled extra images (data/extra_images.py): registered datasets (e.g.
    # unannotated images with tools/pseudo_label.py's labels, added through
    # DATASETS.LVIS_FORMAT) trained together with DATASETS.TRAIN, in batches of one source.
    # Needs MODEL.META_ARCHITECTURE "LongTailRCNN" and DATALOADER.ASPECT_RATIO_GROUPING True.
    cfg.DATASETS.EXTRA_TRAIN = ()
    # Extra images drawn without replacement per epoch of the main set (with its repeat
    # factors under RepeatFactorTrainingSampler); -1: all of them. The 1st place LVIS 2020
    # entry drew 10k of its Open Images per epoch.
    cfg.DATASETS.EXTRA_TRAIN_PER_EPOCH = -1
    # Factor on the losses of a batch of extra images, > 0. The 1st place LVIS 2020 entry
    # gives no weight; 0.5 is this project's choice.
    cfg.DATASETS.EXTRA_TRAIN_LOSS_WEIGHT = 0.5
    # How the image files of LVIS-format datasets are checked when their dicts are built, on
    # the first process of each machine only (an error there stops the job): "all" reads the
    # header of every image and compares its size with the json's height and width (~10 s for
    # LVIS v1 train from the page cache, minutes from network storage); "sample" checks that
    # every file exists and reads 1000 headers spread over the dataset; "none" checks nothing.
    cfg.DATASETS.IMAGE_CHECK = "all"


def _add_augmentation_list(cfg: CN) -> None:
    # Training augmentation steps, in order: names in LONGTAIL_AUGMENTATION_REGISTRY
    # (data/augmentations, docs/augmentation.md). The default is detectron2's own pipeline:
    # "ResizeShortestEdge" (INPUT.MIN_SIZE_TRAIN, MAX_SIZE_TRAIN, MIN_SIZE_TRAIN_SAMPLING) and
    # "RandomFlip" (INPUT.RANDOM_FLIP), with detectron2's "RandomCrop" (INPUT.CROP) first when
    # INPUT.CROP.ENABLED. Single-image steps: "RandomCrop", "ScaleJitter", "Rotation",
    # "InstaBoost"; multi-image steps: "Mosaic", "CopyPaste". Single-image steps before a
    # multi-image step apply to every image it combines, the steps after it to the result.
    cfg.INPUT.AUGMENTATIONS = ["ResizeShortestEdge", "RandomFlip"]

    # Scale jitter ("ScaleJitter": ResizeScale + FixedSizeCrop): resize the image to fit
    # TARGET_SIZE times s ~ U(MIN_SCALE, MAX_SCALE), keeping its aspect ratio, then take a
    # random CROP_SIZE crop, padded where the image is smaller. Boxes are recomputed from the
    # cropped masks.
    cfg.INPUT.SCALE_JITTER = CN()
    # Preset overriding MIN_SCALE, MAX_SCALE, TARGET_SIZE and CROP_SIZE: "custom" (the keys
    # below), "lsj_1024" (large-scale jitter, Ghiasi et al. 2021: 0.1-2.0 of 1024, crop 1024)
    # or "mmdet_1280" (the LVIS 2020 MMDet entry: 0.6-1.4 of 1280, crop 1280).
    cfg.INPUT.SCALE_JITTER.PRESET = "custom"
    # Lower bound of the scale factor s.
    cfg.INPUT.SCALE_JITTER.MIN_SCALE = 0.1
    # Upper bound of the scale factor s.
    cfg.INPUT.SCALE_JITTER.MAX_SCALE = 2.0
    # (h, w) the image is fitted into before scaling by s.
    cfg.INPUT.SCALE_JITTER.TARGET_SIZE = (1024, 1024)
    # (h, w) of the random crop.
    cfg.INPUT.SCALE_JITTER.CROP_SIZE = (1024, 1024)
    # Pixel value of the padding.
    cfg.INPUT.SCALE_JITTER.PAD_VALUE = 128.0


def _add_single_image_steps(cfg: CN) -> None:
    # Rotation ("Rotation") about the image centre. Polygons are rotated and boxes
    # recomputed from them.
    cfg.INPUT.ROTATION = CN()
    # Probability of rotating an image.
    cfg.INPUT.ROTATION.PROB = 0.5
    # Angle ~ U(-ANGLE, ANGLE) degrees.
    cfg.INPUT.ROTATION.ANGLE = 10.0
    # Grow the canvas so that no pixel is cut off.
    cfg.INPUT.ROTATION.EXPAND = False

    # InstaBoost-style instance jitter ("InstaBoost", Fang et al. 2019): instances are cut out,
    # their hole inpainted, and pasted back moved, scaled and rotated; instances they cover
    # lose those pixels.
    cfg.INPUT.INSTABOOST = CN()
    # Probability of jittering an image.
    cfg.INPUT.INSTABOOST.PROB = 0.5
    # At most this many instances are moved.
    cfg.INPUT.INSTABOOST.MAX_INSTANCES = 3
    # Largest shift, as a fraction of the instance's box size.
    cfg.INPUT.INSTABOOST.SHIFT = 0.2
    # Scale factor ~ U(SCALE).
    cfg.INPUT.INSTABOOST.SCALE = (0.8, 1.2)
    # Rotation ~ U(-ANGLE, ANGLE) degrees.
    cfg.INPUT.INSTABOOST.ANGLE = 5.0


def _add_multi_image_steps(cfg: CN) -> None:
    # Mosaic ("Mosaic", YOLOv4): the image and 3 more drawn from the training sampler, each
    # resized to fit TILE_SIZE and placed around a centre of a 2 TILE_SIZE canvas.
    cfg.INPUT.MOSAIC = CN()
    # Probability of building a mosaic.
    cfg.INPUT.MOSAIC.PROB = 0.5
    # (h, w) each image is resized to fit.
    cfg.INPUT.MOSAIC.TILE_SIZE = (640, 640)
    # The centre is drawn ~ U(CENTER_RANGE) x TILE_SIZE.
    cfg.INPUT.MOSAIC.CENTER_RANGE = (0.5, 1.5)
    # Pixel value of the canvas.
    cfg.INPUT.MOSAIC.PAD_VALUE = 114.0

    # Copy-paste ("CopyPaste", Ghiasi et al. 2021): a random non-empty subset of another
    # training image's instances is pasted onto the image (top-left aligned); the covered
    # parts of the image's masks are removed.
    cfg.INPUT.COPY_PASTE = CN()
    # Probability of pasting.
    cfg.INPUT.COPY_PASTE.PROB = 0.5
    # At most this many instances are pasted.
    cfg.INPUT.COPY_PASTE.MAX_NUM_PASTED = 100
    # An instance whose box moved by more than this many pixels and whose remaining mask has
    # at most MIN_VISIBLE_AREA pixels is dropped (mmdetection's rule).
    cfg.INPUT.COPY_PASTE.BOX_MOVED_THRESH = 10.0
    # Visible mask area (pixels) at or below which a covered instance may be dropped.
    cfg.INPUT.COPY_PASTE.MIN_VISIBLE_AREA = 300.0
    # Candidate source images drawn from the sampler; the one holding the rarest class (fewest
    # training images) is pasted from. 1 = no bias.
    cfg.INPUT.COPY_PASTE.RARE_SOURCE_CANDIDATES = 1
