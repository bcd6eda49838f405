"""Shared helpers for the tests: a tiny config and synthetic training batches (``make_batch``,
from ``benchmarks/synthetic_batch.py``, which the benchmark scripts share)."""

# isort: off
import lvis_longtail  # noqa: F401  (first: the compat layer must precede detectron2.data)

# isort: on
import socket
from pathlib import Path

import pytest
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from synthetic_batch import make_batch  # noqa: F401  (benchmarks/, on pytest's pythonpath)

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
