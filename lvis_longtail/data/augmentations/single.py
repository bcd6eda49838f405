"""Single-image steps: detectron2's default pipeline, scale jitter / LSJ and rotation."""

from detectron2.data import transforms as T

from lvis_longtail.data.augmentations.registry import LONGTAIL_AUGMENTATION_REGISTRY
from lvis_longtail.data.augmentations.sample import FastCropTransform

# INPUT.SCALE_JITTER.PRESET -> (MIN_SCALE, MAX_SCALE, TARGET_SIZE, CROP_SIZE)
SCALE_JITTER_PRESETS = {
    # Large-scale jitter (Ghiasi et al. 2021; detectron2's new_baselines).
    "lsj_1024": (0.1, 2.0, (1024, 1024), (1024, 1024)),
    # LVIS 2020 MMDet entry: long edge ~ U(768, 1792) = 1280 x U(0.6, 1.4), 1280 x 1280 crop.
    "mmdet_1280": (0.6, 1.4, (1280, 1280), (1280, 1280)),
}


@LONGTAIL_AUGMENTATION_REGISTRY.register()
def ResizeShortestEdge(cfg):
    """detectron2's training resize: ``INPUT.MIN_SIZE_TRAIN``, ``MAX_SIZE_TRAIN``,
    ``MIN_SIZE_TRAIN_SAMPLING``."""
    return T.ResizeShortestEdge(
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    )


@LONGTAIL_AUGMENTATION_REGISTRY.register()
def RandomFlip(cfg):
    """detectron2's flip: ``INPUT.RANDOM_FLIP`` ("horizontal", "vertical" or "none")."""
    if cfg.INPUT.RANDOM_FLIP == "none":
        return []
    return T.RandomFlip(
        horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
        vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
    )


@LONGTAIL_AUGMENTATION_REGISTRY.register()
def RandomCrop(cfg):
    """detectron2's ``RandomCrop(INPUT.CROP.TYPE, INPUT.CROP.SIZE)``."""
    return T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE)


class JitterCrop(T.FixedSizeCrop):
    """detectron2's ``FixedSizeCrop`` (random crop, then pad right/bottom to the crop size)
    with the shapely-sparing polygon crop of :class:`FastCropTransform`."""

    recompute_boxes = True

    def _get_crop(self, image):
        crop = super()._get_crop(image)
        return FastCropTransform(crop.x0, crop.y0, crop.w, crop.h, crop.orig_w, crop.orig_h)


def scale_jitter_params(cfg):
    """(min_scale, max_scale, target_size, crop_size) of ``INPUT.SCALE_JITTER``."""
    node = cfg.INPUT.SCALE_JITTER
    if node.PRESET != "custom":
        return SCALE_JITTER_PRESETS[node.PRESET]
    return node.MIN_SCALE, node.MAX_SCALE, tuple(node.TARGET_SIZE), tuple(node.CROP_SIZE)


@LONGTAIL_AUGMENTATION_REGISTRY.register()
def ScaleJitter(cfg):
    """``ResizeScale`` + random fixed-size crop with padding (``INPUT.SCALE_JITTER``)."""
    lo, hi, target, crop = scale_jitter_params(cfg)
    return [
        T.ResizeScale(lo, hi, target[0], target[1]),
        JitterCrop(crop, pad=True, pad_value=cfg.INPUT.SCALE_JITTER.PAD_VALUE),
    ]


class RandomRotationProb(T.Augmentation):
    """Rotate by an angle ~ U(-angle, angle) with probability ``prob`` (detectron2's
    ``RotationTransform``: about the centre, zero fill, optional canvas expansion)."""

    recompute_boxes = True

    def __init__(self, prob: float, angle: float, expand: bool):
        super().__init__()
        self._init(locals())
        self._rotation = T.RandomRotation([-angle, angle], expand=expand, sample_style="range")

    def get_transform(self, image):
        if self._rand_range() < self.prob:
            return self._rotation.get_transform(image)
        return T.NoOpTransform()


@LONGTAIL_AUGMENTATION_REGISTRY.register()
def Rotation(cfg):
    """Rotation with probability (``INPUT.ROTATION``); boxes recomputed from polygons."""
    node = cfg.INPUT.ROTATION
    if not 0.0 <= node.PROB <= 1.0:
        raise ValueError(f"INPUT.ROTATION.PROB must be in [0, 1], got {node.PROB}")
    return RandomRotationProb(float(node.PROB), float(node.ANGLE), bool(node.EXPAND))
