"""Simple copy-paste (Ghiasi et al., CVPR 2021): paste another image's instances on top."""

from typing import Optional, Sequence

import cv2
import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T

from lvis_longtail.data.augmentations.geometry import CanvasPlaceTransform, union_mask
from lvis_longtail.data.augmentations.occlusion import occlude
from lvis_longtail.data.augmentations.registry import LONGTAIL_AUGMENTATION_REGISTRY
from lvis_longtail.data.augmentations.sample import (
    LazySample,
    Sample,
    SampleStep,
    contiguous_image,
    copy_image_into,
    merge_class_sets,
    scratch_array,
    transform_sample,
)


class CopyPasteStep(SampleStep):
    """With probability ``prob``, paste a random subset of a source image's instances.

    The source is one of ``num_candidates`` images drawn from the training sampler: the one
    holding the class with the fewest training images when ``class_image_count`` is given
    (rare-class bias), else the first. It is aligned top-left with the destination and cut to
    its size; a random non-empty subset of at most ``max_num_pasted`` of its instances is
    pasted (pixels inside their masks). Destination masks lose the covered pixels
    (:func:`occlude`); pasted instances go on top. Only the destination's ignore boxes are
    kept (the source's unannotated regions are not pasted).

    LVIS labels: positives = destination positives + pasted classes; verified negatives =
    negative in both images and not present; not-exhaustive = union.
    """

    recompute_boxes = True

    def __init__(
        self,
        prob: float,
        max_num_pasted: int,
        box_moved_thresh: float,
        min_visible_area: float,
        num_candidates: int = 1,
        class_image_count: Optional[Sequence[int]] = None,
    ):
        self.prob = float(prob)
        self.max_num_pasted = int(max_num_pasted)
        self.box_moved_thresh = float(box_moved_thresh)
        self.min_visible_area = float(min_visible_area)
        self.num_extra = int(num_candidates)
        self.class_image_count = (
            None if class_image_count is None else np.asarray(class_image_count)
        )

    def _choose(self, extras: Sequence[LazySample]) -> LazySample:
        if self.class_image_count is None or len(extras) == 1:
            return extras[0]

        def rarity(e):
            cats = [a["category_id"] for a in e.record.get("annotations", [])]
            return self.class_image_count[cats].min() if cats else np.inf

        return min(extras, key=rarity)

    def __call__(self, sample: Sample, extras: Sequence[LazySample]) -> Sample:
        if np.random.uniform() >= self.prob:
            return sample
        src = self._choose(extras).load()
        if not src.annos:
            return sample
        n = len(src.annos)
        k = np.random.randint(1, min(n, self.max_num_pasted) + 1)
        chosen = sorted(np.random.choice(n, size=k, replace=False).tolist())
        src.annos = [src.annos[i] for i in chosen]
        h, w = sample.hw
        sh, sw = src.hw
        place = CanvasPlaceTransform(0, 0, sh, sw, h, w, 0.0)
        # the annotations only: the source's pixels are copied where the alpha mask is
        hw_only = np.empty((h, w, 0), np.uint8)
        pasted = transform_sample(src, T.TransformList([place]), image=hw_only).annos
        if not pasted:
            return sample
        kept, covers = occlude(
            sample.annos,
            [a["segmentation"] for a in pasted],
            (h, w),
            self.box_moved_thresh,
            self.min_visible_area,
        )
        alpha = union_mask(covers, (h, w))
        if covers and isinstance(covers[0], np.ndarray):  # the sample was rasterised
            pasted = [dict(a, segmentation=c) for a, c in zip(pasted, covers)]
        image = paste_pixels(sample.image, src.image, alpha)
        pos = set(sample.pos) | {int(a["category_id"]) for a in pasted}
        neg, nex = merge_class_sets([sample, src], pos)
        return Sample(
            image=image,
            annos=kept + pasted,
            ignore=sample.ignore,
            pos=pos,
            neg=neg,
            not_exhaustive=nex,
            recompute_boxes=True,
        )


def paste_pixels(image: np.ndarray, src: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """A copy of ``image`` ``(H, W, C)`` with the pixels of ``src`` (aligned top-left, zero
    beyond its extent) where the ``(H, W)`` bool ``alpha`` is set; only the box of ``alpha``
    is visited (OpenCV's masked copy for 8-bit images of 1-4 channels)."""
    out = copy_image_into(scratch_array("copy_paste", image.shape, image.dtype), image)
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    if not len(rows):
        return out
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    sy1, sx1 = min(y1, src.shape[0]), min(x1, src.shape[1])
    if sy1 > y0 and sx1 > x0:
        win = (slice(y0, sy1), slice(x0, sx1))
        mask = alpha[win]
        if out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] in (1, 3, 4):
            dst = out[win]
            part = src[win]
            part = contiguous_image(part) if part.strides[1] < 0 else part  # a flipped view
            res = cv2.copyTo(part, mask.view(np.uint8), dst)  # in place when it can
            if res is not dst:
                dst[...] = res.reshape(dst.shape)
        else:
            np.copyto(out[win], src[win], where=mask.reshape(mask.shape + (1,) * (out.ndim - 2)))
    if y1 > src.shape[0] or x1 > src.shape[1]:  # covered pixels beyond the source: zeros
        beyond = alpha.copy()
        beyond[: src.shape[0], : src.shape[1]] = False
        out[beyond] = 0
    return out


@LONGTAIL_AUGMENTATION_REGISTRY.register()
def CopyPaste(cfg):
    """Copy-paste (``INPUT.COPY_PASTE``); the rare-class bias reads ``class_image_count`` of
    ``DATASETS.TRAIN[0]``'s metadata."""
    node = cfg.INPUT.COPY_PASTE
    if not 0.0 <= node.PROB <= 1.0:
        raise ValueError(f"INPUT.COPY_PASTE.PROB must be in [0, 1], got {node.PROB}")
    if node.RARE_SOURCE_CANDIDATES < 1:
        raise ValueError(
            f"INPUT.COPY_PASTE.RARE_SOURCE_CANDIDATES must be >= 1, got "
            f"{node.RARE_SOURCE_CANDIDATES}"
        )
    counts = None
    if node.RARE_SOURCE_CANDIDATES > 1:
        name = cfg.DATASETS.TRAIN[0]
        counts = MetadataCatalog.get(name).get("class_image_count")
        if counts is None:
            raise ValueError(
                f"INPUT.COPY_PASTE.RARE_SOURCE_CANDIDATES > 1 needs the 'class_image_count' "
                f"metadata of DATASETS.TRAIN[0] ('{name}'), which it lacks"
            )
    return CopyPasteStep(
        node.PROB,
        node.MAX_NUM_PASTED,
        node.BOX_MOVED_THRESH,
        node.MIN_VISIBLE_AREA,
        node.RARE_SOURCE_CANDIDATES,
        counts,
    )
