"""Shared helpers for the tests: a tiny config and synthetic training batches."""

# isort: off
import lvis_longtail  # noqa: F401  (first: the compat layer must precede detectron2.data)

# isort: on
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.structures import BitMasks, Boxes, Instances

from lvis_longtail.config import add_longtail_config
from lvis_longtail.data.class_stats import frequency_group

REPO = Path(__file__).resolve().parents[1]
TINY_BASE = REPO / "configs" / "tiny" / "Base-MaskRCNN-Tiny.yaml"
UNIT_DATASET = "lt_unit_train"


def register_unit_stats(num_classes: int, name: str = UNIT_DATASET) -> str:
    """Register metadata with long-tailed class statistics (no images) under ``name``."""
    image_count = [max(1, int(400 / (k + 1) ** 1.5)) for k in range(num_classes)]
    meta = MetadataCatalog.get(name)
    if getattr(meta, "class_image_count", None) != image_count:
        MetadataCatalog.remove(name)
        MetadataCatalog.get(name).set(
            thing_classes=[f"class_{k}" for k in range(num_classes)],
            class_image_count=image_count,
            class_instance_count=[2 * c for c in image_count],
            class_frequency=[frequency_group(c) for c in image_count],
            num_annotated_images=500,
        )
    return name


def tiny_cfg(num_classes: int = 8, config_file=TINY_BASE, opts=()):
    """The tiny CPU config, with ``DATASETS.TRAIN`` pointing at unit-test class statistics."""
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.DATASETS.TRAIN = (register_unit_stats(num_classes),)
    cfg.merge_from_list(list(opts))
    return cfg


def make_batch(num_images=2, num_classes=8, size=(96, 128), seed=0):
    """Training inputs as detectron2's mapper produces them: random images, 1-3 boxes each
    with rectangular masks and random classes."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    batch = []
    for _ in range(num_images):
        n = int(torch.randint(1, 4, (1,), generator=g))
        x0 = torch.randint(0, w // 2, (n,), generator=g).float()
        y0 = torch.randint(0, h // 2, (n,), generator=g).float()
        bw = torch.randint(12, w // 2, (n,), generator=g).float()
        bh = torch.randint(12, h // 2, (n,), generator=g).float()
        boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)
        masks = np.zeros((n, h, w), dtype=bool)
        for i, (a, b, c, d) in enumerate(boxes.round().int().tolist()):
            masks[i, b:d, a:c] = True
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        inst.gt_masks = BitMasks(torch.from_numpy(masks))
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


def free_port() -> int:
    """A free TCP port on the loopback interface (for the gloo process-group tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def storage():
    """An EventStorage context, which detectron2's losses need to log."""
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as s:
        yield s
