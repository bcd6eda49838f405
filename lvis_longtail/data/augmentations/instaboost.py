"""InstaBoost-style instance jitter (Fang et al., ICCV 2019), written for this project.

``instaboostfast`` 0.1.2, the authors' PyPI package, is not used: its sdist carries no licence
(``License: UNKNOWN``, no licence file), it needs scikit-image and scipy on top of OpenCV,
draws from the global ``random`` module (outside detectron2's per-worker numpy seeding) and
works on COCO-json dicts of BGR images. This step does what the paper's default setting does
(move, scale and slightly rotate an instance inside its own image, inpaint the hole it
leaves) on this project's samples, polygons included, with numpy's seeded generator.
"""

from typing import Sequence

import cv2
import numpy as np

from lvis_longtail.data.augmentations.geometry import clip_polygons, rasterize, segm_box
from lvis_longtail.data.augmentations.occlusion import occlude
from lvis_longtail.data.augmentations.registry import LONGTAIL_AUGMENTATION_REGISTRY
from lvis_longtail.data.augmentations.sample import LazySample, Sample, SampleStep


class InstaBoostStep(SampleStep):
    """With probability ``prob``, jitter up to ``max_instances`` random instances.

    Each chosen instance is cut out, the hole is inpainted (OpenCV Telea), and the instance is
    pasted back under the affine map: rotation by ~ U(-angle, angle) degrees and scale
    ~ U(scale) about its box centre, then a shift of ~ U(-shift, shift) times its box size.
    Instances it now covers lose those pixels (:func:`occlude`, nothing dropped by size);
    polygons stay polygons. Ignore boxes and LVIS labels are unchanged.
    """

    recompute_boxes = True

    def __init__(self, prob: float, max_instances: int, shift: float, scale, angle: float):
        self.prob = float(prob)
        self.max_instances = int(max_instances)
        self.shift = float(shift)
        self.scale = tuple(float(s) for s in scale)
        self.angle = float(angle)

    def __call__(self, sample: Sample, extras: Sequence[LazySample] = ()) -> Sample:
        if not sample.annos or np.random.uniform() >= self.prob:
            return sample
        n = len(sample.annos)
        order = np.random.permutation(n)[: self.max_instances]
        image, annos = sample.image.copy(), list(sample.annos)
        for i in order.tolist():
            if i < len(annos):  # an earlier jitter may have covered instances entirely
                image, annos = self._jitter(image, annos, i)
        out = Sample(**vars(sample))
        out.image, out.annos, out.recompute_boxes = image, annos, True
        return out

    def _affine(self, box):
        x0, y0, x1, y1 = box
        angle = np.random.uniform(-self.angle, self.angle)
        scale = np.random.uniform(*self.scale)
        dx = np.random.uniform(-self.shift, self.shift) * (x1 - x0)
        dy = np.random.uniform(-self.shift, self.shift) * (y1 - y0)
        m = cv2.getRotationMatrix2D(((x0 + x1) / 2, (y0 + y1) / 2), angle, scale)
        m[:, 2] += (dx, dy)
        return m

    def _jitter(self, image, annos, i):
        hw = image.shape[:2]
        anno = annos[i]
        segm = anno["segmentation"]
        box = segm_box(segm)
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            return image, annos
        m = self._affine(box)
        mask = rasterize(segm, hw)
        # Inpaint the hole inside its box (plus the inpainting radius), not the whole image.
        x0, y0 = np.maximum(np.floor(box[:2]).astype(int) - 6, 0)
        x1, y1 = np.minimum(np.ceil(box[2:]).astype(int) + 6, (hw[1], hw[0]))
        if x1 <= x0 or y1 <= y0 or not mask[y0:y1, x0:x1].any():
            return image, annos  # the instance lies outside the image: nothing to move
        hole = cv2.dilate(mask[y0:y1, x0:x1], np.ones((3, 3), np.uint8))
        filled = image.copy()
        filled[y0:y1, x0:x1] = cv2.inpaint(
            np.ascontiguousarray(image[y0:y1, x0:x1]), hole, 3, cv2.INPAINT_TELEA
        )
        if isinstance(segm, np.ndarray):
            new_segm = cv2.warpAffine(mask, m, (hw[1], hw[0]), flags=cv2.INTER_NEAREST)
            if not new_segm.any():
                return image, annos
        else:
            moved = [np.asarray(p, np.float64).reshape(-1, 2) @ m[:, :2].T + m[:, 2] for p in segm]
            new_segm = [p.reshape(-1) for p in clip_polygons(moved, 0, 0, hw[1], hw[0])]
            if not new_segm:
                return image, annos
        # Warp only the moved instance's box of the image.
        nb = segm_box(new_segm)
        u0, v0 = np.maximum(np.floor(nb[:2]).astype(int) - 1, 0)
        u1, v1 = np.minimum(np.ceil(nb[2:]).astype(int) + 1, (hw[1], hw[0]))
        shifted = m.copy()
        shifted[:, 2] -= (u0, v0)
        patch = np.zeros_like(image)
        patch[v0:v1, u0:u1] = cv2.warpAffine(
            image, shifted, (int(u1 - u0), int(v1 - v0)), flags=cv2.INTER_LINEAR
        )
        new_mask = rasterize(new_segm, hw).astype(bool)
        np.copyto(filled, patch, where=new_mask[:, :, None])
        others = annos[:i] + annos[i + 1 :]
        others, covers = occlude(others, [new_segm], hw, float("inf"), 0.0)
        new = dict(anno, segmentation=covers[0], bbox=segm_box(covers[0]))
        return filled, others[:i] + [new] + others[i:]


@LONGTAIL_AUGMENTATION_REGISTRY.register()
def InstaBoost(cfg):
    """InstaBoost-style jitter (``INPUT.INSTABOOST``)."""
    node = cfg.INPUT.INSTABOOST
    if not 0.0 <= node.PROB <= 1.0:
        raise ValueError(f"INPUT.INSTABOOST.PROB must be in [0, 1], got {node.PROB}")
    return InstaBoostStep(node.PROB, node.MAX_INSTANCES, node.SHIFT, node.SCALE, node.ANGLE)
