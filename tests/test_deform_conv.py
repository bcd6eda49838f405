"""Deformable convolution (DCNv1/v2) through torchvision, against a reference written from
the DCN papers' definition: y(p0) = sum_k w_k * m_k * x(p0 + p_k + dp_k), x(p) bilinear,
x(p) = sum_q max(0, 1 - |q_y - p_y|) max(0, 1 - |q_x - p_x|) x(q) over the image pixels q."""

import pytest
import torch
from conftest import make_batch, tiny_cfg
from detectron2.layers import DeformConv, ModulatedDeformConv
from detectron2.layers import deform_conv as d2_deform_conv
from detectron2.modeling import build_model

from lvis_longtail.layers import deform_conv as tv_deform_conv


def bilinear(x, py, px):
    """x: (C, H, W); py, px: 0-dim tensors -> (C,), sum over every pixel of the image."""
    ys = torch.arange(x.shape[1], dtype=x.dtype)
    xs = torch.arange(x.shape[2], dtype=x.dtype)
    wy = torch.clamp(1 - (ys - py).abs(), min=0)
    wx = torch.clamp(1 - (xs - px).abs(), min=0)
    return (x * wy[:, None] * wx[None, :]).sum(dim=(1, 2))


def reference(x, offset, weight, mask, bias, stride, padding, dilation, groups, dgroups):
    """Plain loops over images, output pixels, kernel taps and deformable groups."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = offset.shape[-2:]
    cpg = c_in // dgroups  # channels per deformable group
    out = []
    for b in range(n):
        cols = []  # per output pixel: (C_in, kh * kw) sampled values
        for i in range(h_out):
            for j in range(w_out):
                taps = []
                for k in range(kh * kw):
                    ki, kj = divmod(k, kw)
                    per_group = []
                    for g in range(dgroups):
                        dy = offset[b, 2 * (g * kh * kw + k), i, j]
                        dx = offset[b, 2 * (g * kh * kw + k) + 1, i, j]
                        py = i * stride - padding + ki * dilation + dy
                        px = j * stride - padding + kj * dilation + dx
                        v = bilinear(x[b, g * cpg : (g + 1) * cpg], py, px)
                        if mask is not None:
                            v = v * mask[b, g * kh * kw + k, i, j]
                        per_group.append(v)
                    taps.append(torch.cat(per_group))
                cols.append(torch.stack(taps, dim=1))
        cols = torch.stack(cols).view(h_out, w_out, groups, c_in // groups, kh * kw)
        wg = weight.view(groups, c_out // groups, c_in // groups, kh * kw)
        y = torch.einsum("ijgck,gock->goij", cols, wg).reshape(c_out, h_out, w_out)
        out.append(y if bias is None else y + bias[:, None, None])
    return torch.stack(out)


CASES = [  # stride, padding, dilation, groups, deformable groups
    (1, 1, 1, 1, 1),
    (1, 1, 1, 2, 2),
    (2, 1, 1, 2, 1),
    (1, 2, 2, 1, 2),
]


@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
@pytest.mark.parametrize("stride,padding,dilation,groups,dgroups", CASES)
def test_matches_paper_definition(modulated, stride, padding, dilation, groups, dgroups):
    g = torch.Generator().manual_seed(stride + 3 * padding + 5 * groups + 7 * dgroups)
    n, c_in, c_out, h, w, k = 2, 4, 4, 4, 5, 3
    h_out = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    w_out = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    # offsets up to +-2.5 px: taps land between pixels and partly outside the image
    offset = 5 * torch.rand(n, 2 * dgroups * k * k, h_out, w_out, generator=g) - 2.5
    offset = offset.double()
    mask = torch.rand(n, dgroups * k * k, h_out, w_out, generator=g).double()
    if modulated:
        module = ModulatedDeformConv(
            c_in, c_out, k, stride, padding, dilation, groups, dgroups, bias=True
        ).double()
        torch.nn.init.normal_(module.bias, generator=g)
    else:
        module = DeformConv(c_in, c_out, k, stride, padding, dilation, groups, dgroups).double()
    inputs = [x, offset] + ([mask] if modulated else [])
    for t in inputs:
        t.requires_grad_(True)
    y = module(*inputs)
    params = [module.weight] + ([module.bias] if modulated else [])
    grads = torch.autograd.grad((y * y.detach().sin()).sum(), inputs + params)

    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs + params]
    rx, roff, *rest = ref_inputs
    rmask, rweight, rbias = (rest[0], rest[1], rest[2]) if modulated else (None, rest[0], None)
    ref = reference(rx, roff, rweight, rmask, rbias, stride, padding, dilation, groups, dgroups)
    ref_grads = torch.autograd.grad((ref * ref.detach().sin()).sum(), ref_inputs)

    assert y.shape == ref.shape == (n, c_out, h_out, w_out)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    for name, a, b in zip(
        ["input", "offset", "mask/weight", "weight/bias", "bias"], grads, ref_grads
    ):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7, msg=f"gradient of {name}")


def test_shim_is_installed_and_checks_groups():
    assert d2_deform_conv.deform_conv is tv_deform_conv.deform_conv
    assert d2_deform_conv.modulated_deform_conv is tv_deform_conv.modulated_deform_conv
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="offset has 18 channels, expected .* = 36"):
        tv_deform_conv.deform_conv(x, torch.zeros(1, 18, 5, 5), w, 1, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="groups=1 expects 2"):
        tv_deform_conv.deform_conv(x, torch.zeros(1, 18, 5, 5), w, 1, 1, 1, 1, 1)


def test_zero_offsets_and_unit_mask_are_a_plain_conv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 7, generator=g)
    module = ModulatedDeformConv(4, 6, 3, stride=2, padding=1, groups=2, deformable_groups=2)
    y = module(x, torch.zeros(2, 36, 4, 4), torch.ones(2, 18, 4, 4))
    ref = torch.nn.functional.conv2d(x, module.weight, module.bias, 2, 1, 1, 2)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_under_autocast_compute_in_the_widest():
    """Under autocast the offset and mask come from fp16 convolutions while the weight stays
    fp32: computed in fp32 (as torchvision's CUDA autocast rule does), result in the input's
    dtype, equal to the fp32 computation on the same fp16-rounded offset and mask."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 6, 6, generator=g)
    offset = (torch.randn(1, 18, 6, 6, generator=g) * 0.5).half()
    mask = torch.rand(1, 9, 6, 6, generator=g).half()
    module = ModulatedDeformConv(4, 5, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.float16):
        y = module(x, offset, mask)
        y_half = module(x.half(), offset, mask)
    ref = module(x, offset.float(), mask.float())
    assert y.dtype == torch.float32 and y_half.dtype == torch.float16
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(y_half.float(), ref, rtol=2e-3, atol=2e-3)


def test_resnet_with_dcn_trains_on_cpu(storage):
    """DEFORM_ON_PER_STAGE / DEFORM_MODULATED / DEFORM_NUM_GROUPS: a bottleneck ResNet with
    DCNv2 (2 deformable groups) builds and its offset convs receive gradients."""
    cfg = tiny_cfg(
        opts=[
            "MODEL.RESNETS.DEPTH",
            "50",
            "MODEL.RESNETS.WIDTH_PER_GROUP",
            "16",
            "MODEL.RESNETS.NUM_GROUPS",
            "2",
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
            "[False, True, False, True]",
            "MODEL.RESNETS.DEFORM_MODULATED",
            "True",
            "MODEL.RESNETS.DEFORM_NUM_GROUPS",
            "2",
        ]
    )
    model = build_model(cfg)
    block = model.backbone.bottom_up.res3[0]
    assert isinstance(block.conv2, ModulatedDeformConv) and block.conv2.deformable_groups == 2
    losses = model(make_batch(num_images=2, size=(64, 64)))
    sum(losses.values()).backward()
    offset_grads = [p.grad for n, p in model.named_parameters() if "conv2_offset" in n]
    assert len(offset_grads) == 2 * (4 + 3)  # weight + bias of every block of res3 and res5
    assert all(gr is not None and gr.abs().sum() > 0 for gr in offset_grads)
