"""Feature Pyramid Grids: parity with mmdetection 3.3.0's FPG neck (committed fixture, see
tests/fixtures/make_mmdet_fpg_fixture.py), parameter counts, the grid's structure, the
enhanced options and the weight converter."""

import json
import zlib

import pytest
import torch
from conftest import REPO, make_batch, register_unit_stats, tiny_cfg
from detectron2.layers import ModulatedDeformConv, ShapeSpec
from detectron2.modeling import Backbone, build_backbone, build_model
from detectron2.utils.events import EventStorage
from torch.nn import functional as F

from lvis_longtail.engine import setup_cfg
from lvis_longtail.layers.carafe import CARAFEDown
from lvis_longtail.modeling.backbones import TimmBackbone
from lvis_longtail.modeling.fpg import FPG, UpsampleConv
from lvis_longtail.tools.convert_mmdet_fpg import convert_mmdet_fpg
from lvis_longtail.tools.convert_mmdet_fpg import main as convert_main

FIXTURE = REPO / "tests" / "fixtures" / "mmdet_fpg.pt"


class FixedFeatures(Backbone):
    """A bottom-up stand-in: returns the given C2..C5 whatever the image."""

    def __init__(self, channels, feats=None):
        super().__init__()
        self.channels, self.feats = channels, feats

    def output_shape(self):
        return {f"res{i + 2}": ShapeSpec(channels=c, stride=2 ** (i + 2))
                for i, c in enumerate(self.channels)}  # fmt: skip

    def forward(self, x):
        return {f"res{i + 2}": f for i, f in enumerate(self.feats)}


def unpack(packed):
    """The fixture's state dict (see the generator's ``pack``)."""
    out, start = {}, 0
    for name, shape, dtype in json.loads(zlib.decompress(packed["meta"])):
        n = int(torch.Size(shape).numel())
        out[name] = packed["flat"][start : start + n].reshape(shape).to(getattr(torch, dtype))
        start += n
    assert start == packed["flat"].numel()
    return out


def fpg(channels, in_channels=(256, 512, 1024, 2048), pathways=9, norm="BN", feats=None, **kw):
    return FPG(FixedFeatures(list(in_channels), feats), ["res2", "res3", "res4", "res5"],
               channels, channels, pathways, norm, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, weights_only=False)


@pytest.mark.parametrize("variant,norm,mode", [("bn", "BN", "eval"), ("bn", "BN", "train"),
                                               ("no_norm", "", "eval")])  # fmt: skip
def test_converted_mmdet_weights_give_mmdet_outputs(fixture, variant, norm, mode):
    v = fixture[variant]
    model = fpg(v["channels"], fixture["in_channels"], v["pathways"], norm, feats=v["inputs"])
    state = convert_mmdet_fpg(unpack(v["state_dict"]), prefix="", out_prefix="")
    model.load_state_dict(state, strict=True)  # every tensor has its place, none is missing
    model.train(mode == "train")
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 64, 64))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for name, expected in zip(out, v[mode]):
        torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("channels", [256, 128])
def test_parameter_count_equals_mmdetection(fixture, channels):
    neck = fpg(channels)
    count = sum(p.numel() for n, p in neck.named_parameters() if not n.startswith("bottom_up"))
    assert count == fixture["num_params"][str(channels)]  # 41,616,640 and 10,666,624


def test_triangular_start_and_outputs():
    neck = fpg(16, (8, 8, 16, 16), pathways=6, norm="")
    levels = [sorted(p.keys()) for p in neck.grid]
    assert levels[:5] == [["p6"], ["p5", "p6"], ["p4", "p5", "p6"], ["p3", "p4", "p5", "p6"],
                          ["p2", "p3", "p4", "p5", "p6"]]  # fmt: skip
    assert levels[5] == levels[4]
    assert neck.grid[4]["p2"].same is None and neck.grid[4]["p6"].across_down is None
    assert neck.size_divisibility == 64
    shapes = neck.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        f"p{i}": (16, 2**i) for i in range(2, 7)
    }
    # any size: upsampling goes to the finer level's size (ceil-halved sizes, as ResNet's)
    sizes = [(25, 19), (13, 10), (7, 5), (4, 3)]
    neck.bottom_up.feats = [torch.randn(1, c, h, w) for c, (h, w) in zip((8, 8, 16, 16), sizes)]
    out = neck(torch.zeros(1, 3, 100, 76))
    assert [tuple(o.shape[-2:]) for o in out.values()] == sizes + [(2, 2)]


def test_carried_levels_are_the_laterals_until_their_pathway():
    """Before its first node, a level is pathway 0's lateral: a grid of 1 pathway computes
    only P6, so P2..P5 are ReLU -> output conv of the laterals (P6 of the max pool)."""
    feats = [torch.randn(1, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate((4, 4, 8, 8))]
    neck = fpg(8, (4, 4, 8, 8), pathways=1, norm="", feats=feats).eval()
    out = neck(torch.zeros(1, 3, 128, 128))
    for i, name in enumerate(["p2", "p3", "p4", "p5"]):
        expected = neck.outputs[i](F.relu(neck.laterals[i](feats[i])))
        torch.testing.assert_close(out[name], expected)
    node = neck.grid[0]["p6"]
    first_p6 = neck.laterals[3](feats[3])[..., ::2, ::2]
    p6 = node.same(neck.laterals[3](feats[3])) + node.across_lateral(first_p6)
    p6 = p6 + node.across_skip(first_p6)
    torch.testing.assert_close(out["p6"], neck.outputs[4](F.relu(p6)))


def test_deform_upsample_is_the_conv_with_mask_one_and_learns_offsets():
    torch.manual_seed(0)
    layer = UpsampleConv(6, "", deform=True)
    assert isinstance(layer.conv, ModulatedDeformConv)
    x = torch.randn(2, 6, 5, 4)
    plain = F.conv2d(F.interpolate(F.relu(x), size=(10, 8)), layer.conv.weight, layer.conv.bias,
                     padding=1)  # fmt: skip
    # initial state: zero offsets, mask sigmoid(0) = 1/2 -> half the conv (plus the bias)
    b = layer.conv.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x, (10, 8)) - b, 0.5 * (plain - b), rtol=0, atol=1e-5)
    with torch.no_grad():
        layer.conv_offset.bias[18:] = 40.0  # mask -> 1
    torch.testing.assert_close(layer(x, (10, 8)), plain, rtol=0, atol=1e-5)
    layer(x, (10, 8)).square().sum().backward()
    assert layer.conv_offset.weight.grad[:18].abs().sum() > 0  # offsets get gradients


def test_content_aware_down_with_uniform_kernels_is_average_pooling():
    torch.manual_seed(0)
    down = CARAFEDown(6, compressed_channels=4, encoder_kernel=3, down_kernel=3)
    torch.nn.init.zeros_(down.encoder.weight)  # kernels 1/9 everywhere
    x = torch.randn(2, 6, 9, 6)
    out = down(x)
    expected = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=True)
    assert out.shape == (2, 6, 5, 3)
    torch.testing.assert_close(out, expected)
    empty = down(torch.randn(0, 6, 8, 8, requires_grad=True))
    assert empty.shape == (0, 6, 4, 4)
    empty.sum().backward()


def test_enhanced_options_build_and_train():
    feats = [torch.randn(2, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate((4, 4, 8, 8))]
    neck = fpg(8, (4, 4, 8, 8), pathways=5, norm="BN", feats=feats, deform_upsample=True,
               carafe_down=(4, 3, 3))  # fmt: skip
    assert isinstance(neck.grid[4]["p3"].same.down, CARAFEDown)
    assert isinstance(neck.grid[4]["p3"].across_down.conv, ModulatedDeformConv)
    out = neck(torch.zeros(2, 3, 64, 64))
    sum(o.square().sum() for o in out.values()).backward()
    assert all(p.grad is not None for n, p in neck.named_parameters() if "conv_offset" in n)


def test_converter_rejects_unknown_keys_and_writes_a_detectron2_checkpoint(tmp_path, fixture):
    state = {"neck." + k: v for k, v in unpack(fixture["no_norm"]["state_dict"]).items()}
    state["backbone.conv1.weight"] = torch.zeros(1)  # not the neck's: left out
    src, dst = tmp_path / "mmdet.pth", tmp_path / "d2.pth"
    torch.save({"state_dict": state, "meta": {}}, src)
    convert_main([str(src), str(dst)])
    model = torch.load(dst, weights_only=False)["model"]
    assert len(model) == len(state) - 1 and all(k.startswith("backbone.") for k in model)
    assert "backbone.grid.4.p2.across_down.conv.weight" in model
    assert "backbone.outputs.4.bias" in model and "backbone.laterals.0.weight" in model
    with pytest.raises(ValueError, match="fpn_transitions.3.1.across_up.conv.weight"):
        convert_mmdet_fpg({"neck.fpn_transitions.3.1.across_up.conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no key starts with 'neck.'"):
        convert_mmdet_fpg({"fpn.weight": torch.zeros(1)})


@pytest.mark.parametrize("name", ["mask_rcnn_R18_FPG128_tiny_seesaw.yaml"])
def test_tiny_fpg_config_trains(name):
    stats = register_unit_stats(24, name="lt_unit_stats_24")
    cfg = setup_cfg(str(REPO / "configs" / "tiny" / name), ["DATASETS.TRAIN", f"('{stats}',)"])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model.backbone, FPG) and model.backbone.size_divisibility == 64
    assert model.backbone.laterals[0].out_channels == 128
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    with EventStorage(0) as storage:
        for it in range(2):
            storage.iter = it
            losses = model(make_batch(num_images=2, num_classes=24, size=(64, 64), seed=it))
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    moved = [n for n, p in model.backbone.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("grid.") for n in moved) and any("outputs" in n for n in moved)


def test_lvis_leaves_are_mmdetections_two_sizes():
    for leaf, channels in [("mask_rcnn_R50_FPG_2x_seesaw.yaml", 256),
                           ("mask_rcnn_R50_FPG128_2x_seesaw.yaml", 128)]:  # fmt: skip
        cfg = setup_cfg(str(REPO / "configs" / "LVISv1" / leaf))
        assert cfg.MODEL.BACKBONE.NAME == "build_resnet_fpg_backbone"
        assert (cfg.MODEL.FPG.CHANNELS, cfg.MODEL.FPG.OUT_CHANNELS) == (channels, channels)
        assert (cfg.MODEL.FPG.NUM_PATHWAYS, cfg.MODEL.FPG.NORM) == (9, "SyncBN")
        assert cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME == "SeesawLoss"


def test_timm_builder_puts_the_grid_on_a_timm_model():
    opts = ["MODEL.BACKBONE.NAME", "build_timm_fpg_backbone", "MODEL.TIMM.NAME", "resnet18",
            "MODEL.FPG.CHANNELS", "16", "MODEL.FPG.OUT_CHANNELS", "8", "MODEL.FPG.NUM_PATHWAYS",
            "4", "MODEL.FPG.NORM", "BN"]  # fmt: skip
    backbone = build_backbone(tiny_cfg(8, opts=opts))
    assert isinstance(backbone, FPG) and isinstance(backbone.bottom_up, TimmBackbone)
    out = backbone(torch.randn(2, 3, 64, 128))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        f"p{i}": (2, 8, 64 // 2**i, 128 // 2**i) for i in range(2, 7)
    }
