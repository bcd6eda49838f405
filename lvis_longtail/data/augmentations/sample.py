"""The sample that augmentation steps pass along, and how transforms apply to it.

A :class:`Sample` is one training image between loading and the model's ``Instances``:
the image, detectron2 annotation dicts (``bbox`` in XYXY_ABS; ``segmentation`` as a list of
flat polygons, or an ``(H, W)`` uint8 mask for bitmask/RLE data), per-image ignore boxes and the
LVIS image-level class sets (contiguous ids). Polygons stay polygons through every step
(occlusion holes are opened into hole-free pieces); mask data stays masks.
"""

import abc
import copy
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Sequence, Set

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from fvcore.transforms.transform import Transform

from lvis_longtail.data.augmentations.geometry import split_rows


@dataclass
class Sample:
    """One image and its targets while it is augmented.

    Attributes:
        image: ``(H, W, C)`` uint8 image in ``INPUT.FORMAT``.
        annos: detectron2 annotation dicts; ``bbox`` XYXY_ABS, ``category_id`` contiguous,
            ``segmentation`` a list of flat polygons or an ``(H, W)`` uint8 mask.
        ignore: regions that are neither fg nor bg, each an ``(N, 2)`` polygon (an ignore box
            as its 4 corners): transformed like instance polygons, so that their output boxes
            (:func:`ignore_boxes`) are those a GT box of the same region would get.
        pos: classes present in the image (contiguous ids).
        neg: verified-negative classes (contiguous ids).
        not_exhaustive: classes whose instances are not all annotated (contiguous ids).
        recompute_boxes: a step changed geometry so that transformed boxes are not tight;
            the mapper recomputes the boxes from the masks.
    """

    image: np.ndarray
    annos: List[dict]
    ignore: List[np.ndarray] = field(default_factory=list)
    pos: Set[int] = field(default_factory=set)
    neg: Set[int] = field(default_factory=set)
    not_exhaustive: Set[int] = field(default_factory=set)
    recompute_boxes: bool = False

    @property
    def hw(self):
        return tuple(self.image.shape[:2])


@dataclass
class LazySample:
    """An extra image of a multi-image step: its dataset record (cheap to inspect) and a
    loader that reads it and runs it through the single-image steps before the step."""

    record: dict
    load: Callable[[], Sample]


class SampleStep(abc.ABC):
    """An augmentation step that works on whole samples (instances included).

    Subclasses implement :meth:`__call__`. ``num_extra`` is how many extra images the step
    draws from the training sampler (0: single-image step).
    """

    num_extra = 0

    @abc.abstractmethod
    def __call__(self, sample: Sample, extras: Sequence[LazySample]) -> Sample:
        """Return the augmented sample (``sample`` itself when the step does nothing); the
        ``num_extra`` extra images are loaded only if used (:class:`LazySample`)."""

    def __repr__(self):
        params = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()))
        return f"{type(self).__name__}({params})"


_SCRATCH = threading.local()  # per thread: name -> the last array handed out


def scratch_array(name: str, shape, dtype, pool: int = 1) -> np.ndarray:
    """An uninitialised array for a step's output image: one of the last ``pool`` arrays
    handed out under ``name`` in this thread if nothing references it any more (the steps
    after it resized or copied it), else a new one. Reusing it spares the page faults of a
    fresh multi-megabyte allocation on every sample; an array still referenced anywhere is
    never reused."""
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    slot = None  # where a new array goes: an empty slot, an unused one, else the last
    for k in range(pool):
        buf = bufs.get((name, k))
        if buf is None:
            slot = k
            break
        # references to an unused array: the dict, ``buf`` and getrefcount's argument
        if sys.getrefcount(buf) == 3:
            if buf.shape == tuple(shape) and buf.dtype == dtype:
                return buf
            slot = k if slot is None else slot
    slot = pool - 1 if slot is None else slot
    bufs[(name, slot)] = buf = np.empty(shape, dtype)
    return buf


def copy_image_into(out: np.ndarray, image: np.ndarray) -> np.ndarray:
    """``out[...] = image`` (same shape and dtype); a horizontally flipped uint8 view is
    copied by OpenCV's flip (see :func:`contiguous_image`)."""
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (1, 3, 4):
        base = image[:, ::-1]
        if image.strides[1] < 0 and base.strides[0] > 0 and base.strides[1:] == (image.shape[2], 1):
            res = cv2.flip(base, 1, dst=out.reshape(out.shape[:2]) if out.shape[2] == 1 else out)
            if res.ctypes.data == out.ctypes.data:
                return out
    np.copyto(out, image)
    return out


def contiguous_image(image: np.ndarray) -> np.ndarray:
    """``np.ascontiguousarray(image)`` (a new array only if needed). A horizontally flipped
    view (detectron2's ``HFlipTransform``) of a uint8 image is copied by OpenCV's flip: the
    same pixels, about 10x faster than numpy's copy of a negative-stride view."""
    if image.flags.c_contiguous:
        return image
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (1, 3, 4):
        base = image[:, ::-1]
        if base.strides[0] > 0 and base.strides[1] == image.shape[2] and base.strides[2] == 1:
            out = cv2.flip(base, 1)
            return out.reshape(image.shape)
    return np.ascontiguousarray(image)


def merge_class_sets(samples: Sequence[Sample], pos: Set[int]):
    """LVIS image-level labels of a combined image: ``pos`` (classes present), verified
    negatives = classes negative in every source and not present, not-exhaustive = union."""
    neg = set.intersection(*[set(s.neg) for s in samples]) - pos
    nex = set.union(*[set(s.not_exhaustive) for s in samples])
    return neg, nex


def transform_sample(sample: Sample, transforms: T.TransformList, image=None) -> Sample:
    """Apply detectron2 transforms to a sample's annotations and ignore regions (and to its
    image, unless the transformed ``image`` is given).

    The arithmetic of detectron2's ``transform_instance_annotations``, batched over the
    instances: one ``apply_box`` call for all boxes, and one ``apply_coords`` call for all
    polygons of every transform that maps polygons point-wise (crops clip per instance).
    """
    if image is None:
        image = transforms.apply_image(sample.image)
    if not isinstance(transforms, T.TransformList):
        transforms = T.TransformList([transforms])
    hw = tuple(image.shape[:2])
    out = copy.copy(sample)
    out.image = image
    out.ignore = [p for p in transforms.apply_polygons(sample.ignore) if len(p)]
    if any("keypoints" in a for a in sample.annos):
        out.annos = [_transform_one(a, transforms, hw) for a in sample.annos]
        out.annos = [a for a in out.annos if a is not None]
        return out
    if not sample.annos:
        out.annos = []
        return out
    boxes = np.array([a["bbox"] for a in sample.annos], np.float64).reshape(-1, 4)
    boxes = transforms.apply_box(boxes).clip(min=0)
    boxes = np.minimum(boxes, list(hw + hw)[::-1])
    polys = [
        [np.asarray(p).reshape(-1, 2) for p in a["segmentation"]]
        if isinstance(a.get("segmentation"), list)
        else None
        for a in sample.annos
    ]
    polys = _transform_polygons(polys, transforms)
    annos = []
    for anno, box, poly in zip(sample.annos, boxes, polys):
        anno = dict(anno, bbox=box, bbox_mode=BoxMode.XYXY_ABS)
        segm = anno.get("segmentation")
        if isinstance(segm, np.ndarray):
            anno["segmentation"] = transforms.apply_segmentation(segm)
        elif isinstance(segm, list):
            if not poly:
                continue  # every polygon was cropped away
            anno["segmentation"] = [p.reshape(-1) for p in poly]
        annos.append(anno)
    out.annos = annos
    return out


def _transform_polygons(polys, transforms: T.TransformList):
    """Transform ``polys`` (per instance: a list of ``(N, 2)`` arrays, or None)."""
    for t in transforms.transforms:
        if type(t).apply_polygons is Transform.apply_polygons:  # point-wise
            flat = [p for ps in polys if ps for p in ps]
            if not flat:
                continue
            coords = t.apply_coords(np.concatenate(flat))
            parts = iter(split_rows(coords, [len(p) for p in flat]))
            polys = [[next(parts) for _ in ps] if ps else ps for ps in polys]
        elif hasattr(t, "apply_polygon_groups"):  # clipping, batched over the instances
            polys = t.apply_polygon_groups(polys)
        else:
            polys = [t.apply_polygons(ps) if ps else ps for ps in polys]
    return polys


def _transform_one(anno, transforms, hw):
    """detectron2's per-instance path (keypoints)."""
    segm = anno.get("segmentation")
    if isinstance(segm, np.ndarray):
        anno = {k: v for k, v in anno.items() if k != "segmentation"}
        anno = utils.transform_instance_annotations(anno, transforms, hw)
        anno["segmentation"] = transforms.apply_segmentation(segm)
    else:
        anno = utils.transform_instance_annotations(dict(anno), transforms, hw)
    if isinstance(anno.get("segmentation"), list) and not anno["segmentation"]:
        return None
    return anno


def boxes_to_polygons(boxes) -> List[np.ndarray]:
    """``(M, 4)`` XYXY boxes as ``(4, 2)`` corner polygons."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return [np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) for x0, y0, x1, y1 in b]


def ignore_boxes(sample: Sample) -> np.ndarray:
    """``(M, 4)`` float32 XYXY boxes of a sample's ignore regions, clipped to the image,
    empty ones dropped."""
    if not sample.ignore:
        return np.zeros((0, 4), np.float32)
    boxes = np.stack([np.concatenate([p.min(0), p.max(0)]) for p in sample.ignore])
    return clip_boxes(boxes, sample.hw)


def clip_boxes(boxes: np.ndarray, hw) -> np.ndarray:
    """Clip ``(M, 4)`` XYXY boxes to an image and drop the empty ones."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    h, w = hw
    boxes = np.stack(
        [
            boxes[:, 0].clip(0, w),
            boxes[:, 1].clip(0, h),
            boxes[:, 2].clip(0, w),
            boxes[:, 3].clip(0, h),
        ],
        axis=1,
    )
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep]


def normalize_annotation(anno: dict, hw) -> dict:
    """A dataset annotation in :class:`Sample` form: XYXY_ABS box, RLE decoded to a mask."""
    anno = dict(anno)
    if anno["bbox_mode"] == BoxMode.XYWH_ABS:  # BoxMode.convert's float32 arithmetic
        box = np.asarray(anno["bbox"], np.float32)
        box[2:] += box[:2]
        anno["bbox"] = box.tolist()
    else:
        anno["bbox"] = BoxMode.convert(anno["bbox"], anno["bbox_mode"], BoxMode.XYXY_ABS)
    anno["bbox_mode"] = BoxMode.XYXY_ABS
    segm = anno.get("segmentation")
    if isinstance(segm, dict):
        if isinstance(segm.get("counts"), list):
            segm = mask_util.frPyObjects(segm, *hw)
        anno["segmentation"] = mask_util.decode(segm)
    return anno
