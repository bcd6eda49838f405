"""Draw augmented training samples, masks and class names included, into one grid PNG.

    python -m lvis_longtail.tools.show_augmentations --config-file F --num 16 --output DIR \\
        [--seed 0] [--cell 384] [KEY VALUE ...]

Samples come from the training pipeline itself: ``DATASETS.TRAIN`` through the configured
sampler (repeat-factor sampling included), the grouping of multi-image steps and
``LongTailDatasetMapper`` with ``INPUT.AUGMENTATIONS``. Instances are drawn with detectron2's
``Visualizer`` (masks, boxes, class names); ignore boxes in dashed white. Writes
``DIR/augmentations.png``.
"""

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer, registries, datasets)

# isort: on
import argparse
import itertools
import math
import os
import sys
from typing import List, Optional

import cv2
import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.data.build import _train_loader_from_config
from detectron2.data.common import DatasetFromList
from detectron2.utils.visualizer import Visualizer

from lvis_longtail.data.loader import GroupedSampler, GroupMapDataset
from lvis_longtail.data.mapper import LongTailDatasetMapper
from lvis_longtail.engine import setup_cfg
from lvis_longtail.utils.io import atomic_write


def augmented_samples(cfg, num: int, seed: int = 0) -> List[dict]:
    """``num`` mapped training dicts, drawn as the training loader draws them."""
    np.random.seed(seed)
    mapper = LongTailDatasetMapper(cfg, True)
    kwargs = _train_loader_from_config(cfg, mapper=mapper)
    dataset = GroupMapDataset(DatasetFromList(kwargs["dataset"], copy=False), mapper, seed)
    groups = GroupedSampler(kwargs["sampler"], 1 + mapper.num_extra_images)
    return [dataset[g] for g in itertools.islice(groups, num)]


def draw_sample(sample: dict, class_names, image_format: str, cell: int) -> np.ndarray:
    """RGB drawing of one mapped sample, fitted into a ``cell`` x ``cell`` square."""
    image = sample["image"].permute(1, 2, 0).numpy()
    if image_format == "BGR":
        image = image[:, :, ::-1]
    inst = sample["instances"]
    vis = Visualizer(image, scale=cell / max(image.shape[:2]))
    labels = [class_names[int(c)] for c in inst.gt_classes]
    masks = inst.gt_masks if inst.has("gt_masks") else None
    if masks is not None and hasattr(masks, "polygons"):
        masks = [[np.asarray(p) for p in poly] for poly in masks.polygons]
    elif masks is not None:
        masks = masks.tensor.numpy()
    vis.overlay_instances(boxes=inst.gt_boxes.tensor.numpy(), masks=masks, labels=labels)
    for box in sample["ignore_boxes"].tensor.numpy():
        vis.draw_box(box, edge_color="white", line_style="--")
    drawn = vis.output.get_image()[:cell, :cell]
    out = np.full((cell, cell, 3), 255, np.uint8)
    out[: drawn.shape[0], : drawn.shape[1]] = drawn
    return out


def make_grid(cells: List[np.ndarray], pad: int = 4) -> np.ndarray:
    cols = math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / cols)
    c = cells[0].shape[0]
    grid = np.full((rows * (c + pad) + pad, cols * (c + pad) + pad, 3), 255, np.uint8)
    for k, cell in enumerate(cells):
        r, q = divmod(k, cols)
        y, x = pad + r * (c + pad), pad + q * (c + pad)
        grid[y : y + c, x : x + c] = cell
    return grid


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--num", type=int, default=16)
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cell", type=int, default=384, help="grid cell size in pixels")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error("--num must be >= 1")
    cfg = setup_cfg(args.config_file, args.opts)
    meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    names = meta.get("thing_classes") or [
        f"class {k}" for k in range(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    ]
    samples = augmented_samples(cfg, args.num, args.seed)
    cells = [draw_sample(s, names, cfg.INPUT.FORMAT, args.cell) for s in samples]
    grid = make_grid(cells)
    path = os.path.join(args.output, "augmentations.png")
    ok, data = cv2.imencode(".png", grid[:, :, ::-1])
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    with atomic_write(path, "wb") as f:
        f.write(data.tobytes())
    print(f"wrote {path} ({len(samples)} samples)")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
