"""ResNeSt + DCNv2 through the timm path: the split-attention conv (groups = radix x
cardinality) made deformable stays that grouped conv, learns offsets, runs under autocast, loads
local weights; the ResNeSt-200 LVIS leaf puts DCNv2 on every block of res3-res5."""

import copy

import pytest
import timm
import torch
from conftest import REPO
from detectron2.modeling import build_backbone
from timm.layers import SplitAttn

from lvis_longtail.engine import setup_cfg
from lvis_longtail.modeling.backbones import (
    TimmBackbone,
    TimmDeformConv2d,
    convert_to_deform_conv,
)


def split_attention(radix=2, cardinality=2):
    torch.manual_seed(0)
    block = SplitAttn(16, 16, kernel_size=3, padding=1, groups=cardinality, radix=radix,
                      norm_layer=torch.nn.BatchNorm2d).eval()  # fmt: skip
    assert block.conv.groups == radix * cardinality
    return block


@pytest.mark.parametrize("radix,cardinality", [(2, 1), (2, 2), (4, 1)])
def test_deformable_split_attention_conv_equals_the_grouped_conv(radix, cardinality):
    plain = split_attention(radix, cardinality)
    block = copy.deepcopy(plain)
    assert convert_to_deform_conv(block, modulated=True, deformable_groups=1) == 1
    dcn = block.conv
    assert isinstance(dcn, TimmDeformConv2d) and dcn.groups == radix * cardinality
    x = torch.randn(2, 16, 9, 7)
    # the initial state: zero offsets and masks sigmoid(0) = 1/2 -> half the grouped conv
    torch.testing.assert_close(dcn(x), 0.5 * plain.conv(x), rtol=0, atol=1e-5)
    with torch.no_grad():
        dcn.conv_offset.bias[18:] = 40.0  # masks -> 1 (exactly, in fp32)
    torch.testing.assert_close(dcn(x), plain.conv(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(block(x), plain(x), rtol=0, atol=1e-5)  # the whole block too


def test_offsets_get_gradients_and_move_the_sampling():
    block = split_attention()
    convert_to_deform_conv(block, modulated=True, deformable_groups=1)
    x = torch.randn(2, 16, 9, 7)
    block.train()(x).square().sum().backward()
    grad = block.conv.conv_offset.weight.grad
    assert grad[:18].abs().sum() > 0 and grad[18:].abs().sum() > 0  # offsets and masks
    before = block.conv(x).detach()
    with torch.no_grad():
        block.conv.conv_offset.bias[:18] = 0.5  # every tap moved by half a pixel
    assert not torch.allclose(block.conv(x), before, atol=1e-3)


@pytest.mark.parametrize("modulated", [True, False])
def test_grouped_deformable_conv_under_cpu_autocast(modulated):
    """bf16 offsets from the autocast offset conv with an fp32 weight: computed in fp32,
    returned in the input's dtype (torchvision's CPU kernel alone rejects the mix)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=True)
    dcn = TimmDeformConv2d(conv, modulated)
    x = torch.randn(2, 8, 9, 7)
    expected = dcn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dcn(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_groups_are_checked_against_the_weight():
    dcn = TimmDeformConv2d(torch.nn.Conv2d(8, 16, 3, padding=1, groups=4))
    dcn.groups = 2  # a layer whose weight does not match its groups
    with pytest.raises(ValueError, match="with groups=2 expects 4"):
        dcn(torch.randn(1, 8, 5, 5))


def test_local_weights_become_the_deformable_weights(tmp_path):
    reference = timm.create_model("resnest14d", pretrained=False)
    path = tmp_path / "resnest14d.pth"
    torch.save(reference.state_dict(), path)
    backbone = TimmBackbone("resnest14d", pretrained_file=str(path),
                            deform_on_per_stage=(False, True, True, True))  # fmt: skip
    dcn = backbone.body.layer3[0].conv2.conv
    assert isinstance(dcn, TimmDeformConv2d) and dcn.groups == 2
    assert torch.equal(dcn.weight, reference.layer3[0].conv2.conv.weight)


def test_lvis_resnest200_leaf_has_dcnv2_on_every_block_of_res3_to_res5():
    cfg = setup_cfg(
        str(REPO / "configs" / "LVISv1" / "mask_rcnn_ResNeSt200_DCNv2_FPN_SyncBN_2x_seesaw.yaml")
    )
    assert cfg.MODEL.TIMM.NAME == "resnest200e" and cfg.MODEL.TIMM.NORM == "SyncBN"
    body = build_backbone(cfg).bottom_up.body
    per_stage = [
        [type(b.conv2.conv) is TimmDeformConv2d for b in getattr(body, f"layer{i}")]
        for i in range(1, 5)
    ]
    assert [len(s) for s in per_stage] == [3, 24, 36, 3]  # ResNeSt-200
    assert not any(per_stage[0]) and all(all(s) for s in per_stage[1:])
    assert all(b.conv2.conv.groups == 2 for i in (2, 3, 4) for b in getattr(body, f"layer{i}"))
