"""Each tiny config of the architecture options builds what it names and trains 2 iterations;
the LVIS v1 leaf with the stronger network builds (test_configs.py) with those pieces."""

import math

import pytest
import torch
from conftest import REPO, make_batch, register_unit_stats
from detectron2.layers import ModulatedDeformConv
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from lvis_longtail.engine import setup_cfg
from lvis_longtail.layers.carafe import CARAFE
from lvis_longtail.layers.deform_roi_pool import DeformROIPooler
from lvis_longtail.layers.sync_bn import LongTailSyncBatchNorm
from lvis_longtail.modeling.backbones import TimmBackbone, TimmDeformConv2d


def has(model, kind):
    return any(isinstance(m, kind) for m in model.modules())


CONFIGS = {
    "mask_rcnn_R50_FPN_tiny_dcnv2.yaml": lambda m: has(m, ModulatedDeformConv),
    "mask_rcnn_R18_FPN_tiny_deformpool.yaml": lambda m: (
        isinstance(m.roi_heads.mask_pooler, DeformROIPooler)
        and isinstance(m.roi_heads.box_pooler, DeformROIPooler)
    ),
    "mask_rcnn_R18_FPN_tiny_carafe.yaml": lambda m: (
        isinstance(m.roi_heads.mask_head.deconv, CARAFE) and len(m.backbone.upsamplers) == 3
    ),
    "mask_rcnn_R18_FPN_tiny_syncbn.yaml": lambda m: has(m.backbone, LongTailSyncBatchNorm),
    "mask_rcnn_ConvNeXt_FPN_tiny_timm.yaml": lambda m: isinstance(
        m.backbone.bottom_up, TimmBackbone
    ),
    "mask_rcnn_ResNeSt14_FPN_tiny_strong.yaml": lambda m: all(
        [
            has(m.backbone, TimmDeformConv2d),
            has(m.backbone, LongTailSyncBatchNorm),
            len(m.backbone.upsamplers) == 3,
            isinstance(m.roi_heads.box_pooler, DeformROIPooler),
            isinstance(m.roi_heads.mask_head.deconv, CARAFE),
        ]
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_config_builds_its_pieces_and_trains(name):
    stats = register_unit_stats(24, name="lt_unit_stats_24")
    cfg = setup_cfg(str(REPO / "configs" / "tiny" / name), ["DATASETS.TRAIN", f"('{stats}',)"])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert CONFIGS[name](model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with EventStorage(0) as storage:
        for it in range(2):
            storage.iter = it
            losses = model(make_batch(num_images=2, num_classes=24, size=(64, 64), seed=it))
            total = sum(losses.values())
            assert math.isfinite(total.item()), losses
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("backbone" in n for n in moved) and any("roi_heads" in n for n in moved)


def test_lvis_leaf_has_the_stronger_network():
    path = (
        REPO / "configs" / "LVISv1" / "mask_rcnn_ResNeSt50_DCNv2_FPN_CARAFE_SyncBN_2x_seesaw.yaml"
    )
    cfg = setup_cfg(str(path))
    assert cfg.MODEL.TIMM.NAME == "resnest50d" and cfg.MODEL.TIMM.NORM == "SyncBN"
    assert cfg.MODEL.TIMM.DEFORM_ON_PER_STAGE == [False, True, True, True]
    assert cfg.MODEL.FPN.UPSAMPLE_TYPE == cfg.MODEL.ROI_MASK_HEAD.UPSAMPLE_TYPE == "carafe"
    assert cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME == "SeesawLoss"
