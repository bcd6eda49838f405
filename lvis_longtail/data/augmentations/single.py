"""Single-image steps: detectron2's default pipeline, scale jitter / LSJ and rotation."""

import cv2
import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import Transform

from lvis_longtail.data.augmentations.geometry import clip_polygon_groups
from lvis_longtail.data.augmentations.registry import LONGTAIL_AUGMENTATION_REGISTRY
from lvis_longtail.data.augmentations.sample import scratch_array

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


class ResizeCropTransform(Transform):
    """Resize ``(h, w)`` to ``(new_h, new_w)``, then crop ``(ch, cw)`` at ``(x0, y0)``, in one
    step with OpenCV: an upscale samples only the crop (``warpAffine``, bilinear, pixel centres
    mapped as detectron2's PIL resize maps them); a downscale resizes with pixel-area
    averaging (``INTER_AREA``, anti-aliased) and slices. Masks use nearest neighbours."""

    def __init__(self, h, w, new_h, new_w, x0, y0, ch, cw):
        super().__init__()
        self._set_attributes(locals())

    def _resize(self, img, nearest: bool):
        sx, sy = self.new_w / self.w, self.new_h / self.h
        squeeze = img.ndim == 3 and img.shape[2] == 1
        src = img[:, :, 0] if squeeze else img
        scratch = not nearest and src.dtype == np.uint8 and src.ndim == 3  # images
        if sx >= 1.0 and sy >= 1.0:
            m = np.array([[sx, 0.0, 0.5 * sx - 0.5 - self.x0], [0.0, sy, 0.5 * sy - 0.5 - self.y0]])
            flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
            dst = (
                scratch_array("resize_crop", (self.ch, self.cw) + src.shape[2:], src.dtype, pool=2)
                if scratch
                else None
            )
            out = cv2.warpAffine(
                src, m, (self.cw, self.ch), dst=dst, flags=flags, borderMode=cv2.BORDER_REPLICATE
            )
        else:
            flags = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
            dst = (
                scratch_array(
                    "resize_crop", (self.new_h, self.new_w) + src.shape[2:], src.dtype, pool=2
                )
                if scratch
                else None
            )
            out = cv2.resize(src, (self.new_w, self.new_h), dst=dst, interpolation=flags)
            out = out[self.y0 : self.y0 + self.ch, self.x0 : self.x0 + self.cw]
        return out[:, :, None] if squeeze else out

    def apply_image(self, img):
        return self._resize(img, nearest=False)

    def apply_segmentation(self, segmentation):
        return self._resize(segmentation, nearest=True)

    def apply_coords(self, coords):
        coords[:, 0] = coords[:, 0] * (self.new_w * 1.0 / self.w) - self.x0
        coords[:, 1] = coords[:, 1] * (self.new_h * 1.0 / self.h) - self.y0
        return coords

    def apply_polygons(self, polygons):
        return self.apply_polygon_groups([list(polygons)])[0]

    def apply_polygon_groups(self, groups):
        """:meth:`apply_polygons` of every instance's polygons (None entries kept), batched."""
        scale = np.array([self.new_w * 1.0 / self.w, self.new_h * 1.0 / self.h])
        scaled = [[np.asarray(p, np.float64) * scale for p in ps] if ps else ps for ps in groups]
        clipped = clip_polygon_groups(scaled, self.x0, self.y0, self.cw, self.ch)
        shift = np.array([self.x0, self.y0], np.float64)
        return [[p - shift for p in ps] if ps else ps for ps in clipped]


class ImagePadTransform(T.PadTransform):
    """detectron2's ``PadTransform`` whose images of 1-4 uint8 channels are padded by OpenCV
    (``copyMakeBorder``, one pass) when ``pad_value`` is a uint8 value: the same pixels as
    ``np.pad``; anything else is padded by ``np.pad``."""

    def apply_image(self, img):
        v = float(self.pad_value)
        if not (
            img.dtype == np.uint8
            and img.ndim == 3
            and img.shape[2] in (1, 3, 4)
            and v.is_integer()
            and 0 <= v <= 255
        ):
            return super().apply_image(img)
        shape = (img.shape[0] + self.y0 + self.y1, img.shape[1] + self.x0 + self.x1)
        dst = scratch_array("pad", shape + img.shape[2:], img.dtype, pool=2)
        out = cv2.copyMakeBorder(
            np.ascontiguousarray(img),
            self.y0,
            self.y1,
            self.x0,
            self.x1,
            cv2.BORDER_CONSTANT,
            dst=dst,
            value=(v,) * 4,
        )
        return out.reshape(out.shape[:2] + img.shape[2:])


class ScaleJitterCrop(T.Augmentation):
    """detectron2's ``ResizeScale(min_scale, max_scale, *target)`` followed by
    ``FixedSizeCrop(crop, pad=True, pad_value)``: the same random draws, sizes and offsets, but
    resizing only what the crop keeps (:class:`ResizeCropTransform`)."""

    recompute_boxes = True

    def __init__(self, min_scale, max_scale, target, crop, pad_value):
        super().__init__()
        self._init(locals())
        self._resize = T.ResizeScale(min_scale, max_scale, target[0], target[1])

    def get_transform(self, image):
        h, w = image.shape[:2]
        resize = self._resize.get_transform(image)
        new_h, new_w = resize.new_h, resize.new_w
        max_offset = np.maximum(np.subtract((new_h, new_w), self.crop), 0)
        oy, ox = np.round(np.multiply(max_offset, np.random.uniform(0.0, 1.0))).astype(int)
        ch, cw = min(self.crop[0], new_h - oy), min(self.crop[1], new_w - ox)
        pad_h, pad_w = self.crop[0] - ch, self.crop[1] - cw
        return T.TransformList(
            [
                ResizeCropTransform(h, w, new_h, new_w, int(ox), int(oy), int(ch), int(cw)),
                ImagePadTransform(0, 0, int(pad_w), int(pad_h), int(cw), int(ch), self.pad_value),
            ]
        )


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
    return ScaleJitterCrop(lo, hi, target, crop, cfg.INPUT.SCALE_JITTER.PAD_VALUE)


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
