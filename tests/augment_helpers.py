"""Hand-built images and LVIS-style records for the augmentation tests."""

import numpy as np
from conftest import tiny_cfg
from detectron2.data import detection_utils as utils
from detectron2.structures import BoxMode
from PIL import Image


def rect(x0, y0, x1, y1):
    """A rectangle as a flat polygon (XYXY corners)."""
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def write_record(tmp_path, name, hw, objects, ignore=(), neg=(), nex=(), seed=0):
    """Write a smooth random PNG of size ``hw`` and return its record.

    Args:
        objects: list of (contiguous class, flat polygon) pairs.
        ignore: XYXY ignore boxes.
        neg, nex: dataset category ids (contiguous + 1) of the LVIS label fields.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(2, hw[0] // 8), max(2, hw[1] // 8), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((hw[1], hw[0]), Image.BICUBIC))
    path = tmp_path / f"{name}.png"
    Image.fromarray(image).save(path)
    annos = []
    for cls, poly in objects:
        pts = np.asarray(poly).reshape(-1, 2)
        x0, y0 = pts.min(0)
        x1, y1 = pts.max(0)
        annos.append(
            {
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": cls,
                "segmentation": [list(poly)],
            }
        )
    return {
        "file_name": str(path),
        "height": hw[0],
        "width": hw[1],
        "image_id": abs(hash(name)) % 10**6,
        "annotations": annos,
        "ignore_boxes": [list(map(float, b)) for b in ignore],
        "neg_category_ids": list(neg),
        "not_exhaustive_category_ids": list(nex),
    }


def aug_cfg(steps, opts=()):
    """The tiny config (8 classes, ids k + 1 -> k) with ``INPUT.AUGMENTATIONS = steps``."""
    cfg = tiny_cfg(8, opts=list(opts))
    cfg.INPUT.AUGMENTATIONS = list(steps)
    return cfg


def masks_of(instances):
    """``(N, H, W)`` bool masks of mapped instances (polygons rasterised as detectron2)."""
    h, w = instances.image_size
    gm = instances.gt_masks
    if hasattr(gm, "polygons"):
        return (
            np.stack([utils.polygons_to_bitmask(p, h, w) for p in gm.polygons])
            if len(gm)
            else np.zeros((0, h, w), bool)
        )
    return gm.tensor.numpy().astype(bool)


def raster(poly, hw):
    return utils.polygons_to_bitmask([np.asarray(poly, np.float64)], *hw)


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)
