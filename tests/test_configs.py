"""Every YAML under configs/ loads, and builds a model with its own settings."""

import pytest
from conftest import REPO, register_unit_stats
from detectron2.modeling import build_model

from lvis_longtail.engine import setup_cfg

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_configs_exist():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS}
    assert {"LVISv1/Base-MaskRCNN-R50-FPN.yaml", "tiny/Base-MaskRCNN-Tiny.yaml"} <= names
    assert len(names) >= 20


def _config_param(path):
    """Building a full-size LVIS model (R50 and up, 1203 classes) takes seconds: slow tier."""
    marks = [pytest.mark.slow] if "LVISv1" in path.parts else []
    return pytest.param(path, id=path.relative_to(REPO / "configs").as_posix(), marks=marks)


@pytest.mark.parametrize("path", [_config_param(p) for p in CONFIGS])
def test_config_loads_and_builds(path):
    cfg = setup_cfg(str(path))
    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    assert k == (1203 if "LVISv1" in path.parts else 24)
    # Class statistics come from the training set's json; stand in statistics of the same K.
    stats = register_unit_stats(k, name=f"lt_unit_stats_{k}")
    cfg = setup_cfg(
        str(path), ["DATASETS.TRAIN", f"('{stats}',)", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]
    )
    model = build_model(cfg)
    assert model.roi_heads.num_classes == k
