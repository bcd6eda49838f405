"""CARAFE against a loop reference written from the paper, and as the FPN's and the mask
head's upsampling."""

import torch
from conftest import make_batch, tiny_cfg
from detectron2.modeling import build_model

from lvis_longtail.layers.carafe import CARAFE, pixel_shuffle
from lvis_longtail.modeling.backbones import LongTailFPN


def loop_carafe(module, x):
    """Per output pixel l' = (i, j): softmax over k^2 of the encoder channels that pixel
    shuffle sends to l', then the weighted sum of the k x k neighbourhood of (i//s, j//s)."""
    s, k = module.scale, module.up_kernel
    enc = module.encoder(module.compressor(x))  # (N, s^2 k^2, H, W)
    n, c, h, w = x.shape
    out = torch.zeros(n, c, h * s, w * s, dtype=x.dtype)
    for b in range(n):
        for i in range(h * s):
            for j in range(w * s):
                si, sj = i // s, j // s
                # pixel shuffle: channel q * s^2 + (i % s) * s + (j % s) -> kernel entry q
                logits = enc[b, [q * s * s + (i % s) * s + (j % s) for q in range(k * k)], si, sj]
                weights = logits.softmax(0)
                for q in range(k * k):
                    y, xx = si + q // k - k // 2, sj + q % k - k // 2
                    if 0 <= y < h and 0 <= xx < w:
                        out[b, :, i, j] += weights[q] * x[b, :, y, xx]
    return out


def test_matches_loop_reference():
    torch.manual_seed(0)
    module = CARAFE(3, scale=2, compressed_channels=4, encoder_kernel=3, up_kernel=3).double()
    torch.nn.init.normal_(module.encoder.weight, std=0.5)  # far from uniform kernels
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    y = module(x)
    assert y.shape == (2, 3, 8, 10)
    torch.testing.assert_close(y, loop_carafe(module, x), rtol=1e-10, atol=1e-10)
    k = module.kernels(x)
    torch.testing.assert_close(k.sum(1), torch.ones(2, 8, 10, dtype=torch.float64))


def test_uniform_kernels_are_a_box_filter_and_gradients_flow():
    module = CARAFE(2, scale=2, compressed_channels=4, up_kernel=3)
    torch.nn.init.zeros_(module.encoder.weight)  # softmax of zeros: 1/9 everywhere
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    y = module(x)
    box = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=True)
    torch.testing.assert_close(y, box.repeat_interleave(2, 2).repeat_interleave(2, 3))
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0 and module.encoder.weight.grad.abs().sum() > 0


def test_pixel_shuffle_is_torchs():
    x = torch.randn(2, 3 * 9, 4, 5)
    torch.testing.assert_close(pixel_shuffle(x, 3), torch.nn.functional.pixel_shuffle(x, 3))


def test_empty_batch_gives_empty_output_and_zero_gradients_to_every_parameter():
    """No foreground RoI: (0, C, H, W) -> (0, C, 2H, 2W); the backward (torch's own
    pixel_shuffle returns a wrongly shaped gradient here) reaches every parameter."""
    module = CARAFE(4, scale=2, compressed_channels=8, up_kernel=5)
    x = torch.zeros((0, 4, 14, 14), requires_grad=True)
    y = module(x)
    assert y.shape == (0, 4, 28, 28)
    (y.sum() * 0).backward()
    assert x.grad.shape == x.shape
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.count_nonzero(p.grad) == 0, name


def test_fpn_and_mask_head_upsample_with_carafe(storage):
    cfg = tiny_cfg(opts=[
        "MODEL.BACKBONE.NAME", "build_longtail_resnet_fpn_backbone",
        "MODEL.FPN.UPSAMPLE_TYPE", "carafe", "MODEL.FPN.CARAFE.COMPRESSED_CHANNELS", "16",
        "MODEL.ROI_MASK_HEAD.UPSAMPLE_TYPE", "carafe",
    ])  # fmt: skip
    model = build_model(cfg)
    assert isinstance(model.backbone, LongTailFPN) and len(model.backbone.upsamplers) == 3
    assert model.backbone.upsamplers[0].compressor.out_channels == 16
    assert isinstance(model.roi_heads.mask_head.deconv, CARAFE)
    losses = model(make_batch(num_images=2, size=(64, 64)))
    sum(losses.values()).backward()
    assert model.backbone.upsamplers[2].encoder.weight.grad.abs().sum() > 0
    assert model.roi_heads.mask_head.deconv.encoder.weight.grad.abs().sum() > 0


def test_nearest_fpn_is_detectron2s():
    """UPSAMPLE_TYPE nearest: the same FPN (same state dict, same outputs) as detectron2's."""
    torch.manual_seed(0)
    a = build_model(tiny_cfg(opts=["MODEL.BACKBONE.NAME", "build_longtail_resnet_fpn_backbone"]))
    b = build_model(tiny_cfg())
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    fa, fb = a.backbone(x), b.backbone(x)
    assert type(a.backbone) is type(b.backbone) and fa.keys() == fb.keys()
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
