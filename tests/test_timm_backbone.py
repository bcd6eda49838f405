"""timm backbones behind detectron2's registry: res2..res5 at strides 4..32, local weight
files (nothing downloads), frozen stages, norm conversion, and a training step."""

import pytest
import timm
import torch
from conftest import make_batch, tiny_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

from lvis_longtail.layers.sync_bn import LongTailSyncBatchNorm
from lvis_longtail.modeling.backbones import TimmBackbone, TimmDeformConv2d

TIMM = ["MODEL.BACKBONE.NAME", "build_timm_fpn_backbone", "MODEL.TIMM.NAME", "convnext_atto"]


def test_detector_with_timm_fpn_trains(storage):
    model = build_model(tiny_cfg(opts=TIMM))
    bottom_up = model.backbone.bottom_up
    assert list(bottom_up.output_shape()) == ["res2", "res3", "res4", "res5"]
    assert [s.stride for s in bottom_up.output_shape().values()] == [4, 8, 16, 32]
    assert [s.channels for s in bottom_up.output_shape().values()] == [40, 80, 160, 320]
    feats = bottom_up(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    losses = model(make_batch(num_images=2, size=(64, 64)))
    sum(losses.values()).backward()
    assert bottom_up.body.stem_0.weight.grad.abs().sum() > 0


def test_pretrained_file_frozen_stages_and_norm(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = TimmBackbone("resnet18", pretrained_file=str(path), freeze_at=2, norm="SyncBN")
    body = backbone.body
    assert torch.equal(body.conv1.weight, reference.conv1.weight)
    assert torch.equal(body.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    # stem + res2 frozen (FrozenBN, no gradients); res3.. trainable with SyncBN
    assert not any(p.requires_grad for m in (body.conv1, body.layer1) for p in m.parameters())
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert isinstance(body.layer1[0].bn1, FrozenBatchNorm2d)
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert isinstance(body.layer2[0].bn1, LongTailSyncBatchNorm)
    assert torch.equal(body.layer2[0].bn1.running_var, reference.layer2[0].bn1.running_var)
    assert not any(type(m) is torch.nn.BatchNorm2d for m in body.modules())


def test_clear_errors():
    with pytest.raises(ValueError, match="only nn.BatchNorm2d layers can be converted"):
        TimmBackbone("efficientnet_lite0", norm="FrozenBN")
    with pytest.raises(RuntimeError, match="Unknown model"):
        build_model(tiny_cfg(opts=TIMM[:2] + ["MODEL.TIMM.NAME", "no_such_model"]))


def test_deformable_stages_start_as_the_plain_model():
    torch.manual_seed(0)
    plain = TimmBackbone("resnet18").eval()
    torch.manual_seed(0)
    deform = TimmBackbone(
        "resnet18", deform_on_per_stage=(False, True, False, True), deform_modulated=False
    ).eval()
    kinds = [type(m) for m in deform.body.layer2.modules()]
    assert kinds.count(TimmDeformConv2d) == 4 and TimmDeformConv2d not in map(
        type, deform.body.layer3.modules()
    )
    x = torch.randn(1, 3, 64, 64)
    a, b = plain(x), deform(x)
    for k in a:  # zero offsets: DCNv1 is the conv
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="has no 3x3 nn.Conv2d"):
        TimmBackbone("convnext_atto", deform_on_per_stage=(True, False, False, False))
