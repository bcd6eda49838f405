"""Deformable convolution (DCNv1, DCNv2) through torchvision's ``deform_conv2d``.

Drop-in replacements for ``detectron2.layers.deform_conv.deform_conv`` and
``modulated_deform_conv``, the functions detectron2's ``DeformConv`` / ``ModulatedDeformConv``
call, which need detectron2's compiled ``_C`` ops (and, on CPU, have no backward at all).
:func:`lvis_longtail.compat.apply` installs them when ``_C`` is absent.

Tensor layouts are detectron2's, which are torchvision's (both descend from the same DCN
kernels), so no reordering is needed:

* ``offset``: (N, 2 * G_d * kh * kw, H_out, W_out): for deformable group g and kernel tap
  k = i * kw + j, channel ``2 * (g * kh * kw + k)`` is the row (y) offset and the next one the
  column (x) offset, in input pixels;
* ``mask`` (DCNv2 modulation): (N, G_d * kh * kw, H_out, W_out), channel ``g * kh * kw + k``,
  multiplied with the bilinearly sampled value (detectron2's ResNet passes ``sigmoid`` of a
  conv output; the operator itself applies no activation);
* channels are split into ``G_d`` contiguous deformable groups (and ``groups`` contiguous
  convolution groups), each with its own offsets.

Sampling is bilinear with zeros outside the input, as in the DCN papers.

Mixed dtypes (under autocast the offset and mask convolutions give fp16 while the weight stays
fp32) are computed in the widest of them and returned in the input's dtype, as torchvision's
CUDA autocast rule does; its CPU kernel otherwise rejects them.
"""

import functools
from typing import Optional

import torch
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

__all__ = ["deform_conv", "modulated_deform_conv"]


def _check_shapes(input, offset, mask, weight, groups: int, deformable_groups: int) -> None:
    """torchvision infers the groups from tensor shapes; detectron2 passes them explicitly.
    Reject any disagreement instead of silently computing something else."""
    if input.dim() != 4:
        raise ValueError(f"deformable conv: expected a 4D input, got {input.dim()}D")
    kh, kw = weight.shape[-2:]
    if input.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"deformable conv: input has {input.shape[1]} channels, but weight "
            f"{tuple(weight.shape)} with groups={groups} expects {weight.shape[1] * groups}"
        )
    if input.shape[1] % deformable_groups:
        raise ValueError(
            f"deformable conv: {input.shape[1]} channels not divisible by "
            f"deformable_groups={deformable_groups}"
        )
    if offset.shape[1] != 2 * deformable_groups * kh * kw:
        raise ValueError(
            f"deformable conv: offset has {offset.shape[1]} channels, expected "
            f"2 * deformable_groups * kh * kw = {2 * deformable_groups * kh * kw}"
        )
    if mask is not None and mask.shape[1] != deformable_groups * kh * kw:
        raise ValueError(
            f"modulated deformable conv: mask has {mask.shape[1]} channels, expected "
            f"deformable_groups * kh * kw = {deformable_groups * kh * kw}"
        )


def _deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask=None):
    """torchvision's ``deform_conv2d`` on tensors cast to their widest dtype; the result in
    ``input``'s dtype."""
    tensors = [t for t in (input, offset, weight, bias, mask) if t is not None]
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])

    def cast(t):
        return None if t is None else t.to(dtype)

    out = deform_conv2d(
        cast(input), cast(offset), cast(weight), cast(bias), _pair(stride), _pair(padding),
        _pair(dilation), mask=cast(mask),
    )  # fmt: skip
    return out.to(input.dtype)


def deform_conv(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    deformable_groups: int = 1,
    im2col_step: int = 64,
) -> torch.Tensor:
    """DCNv1 (Dai et al. 2017), detectron2's signature, differentiable on every device.

    Args:
        input: (N, C_in, H, W).
        offset: (N, 2 * deformable_groups * kh * kw, H_out, W_out), layout in the module doc.
        weight: (C_out, C_in / groups, kh, kw).
        stride, padding, dilation: int or pair.
        groups, deformable_groups: convolution and offset groups.
        im2col_step: ignored (a CUDA-kernel batching detail of detectron2's op).

    Returns:
        (N, C_out, H_out, W_out).
    """
    del im2col_step
    _check_shapes(input, offset, None, weight, groups, deformable_groups)
    return _deform_conv2d(input, offset, weight, None, stride, padding, dilation)


def modulated_deform_conv(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    deformable_groups: int = 1,
) -> torch.Tensor:
    """DCNv2 (Zhu et al. 2019): :func:`deform_conv` with each sample multiplied by ``mask``.

    Args:
        mask: (N, deformable_groups * kh * kw, H_out, W_out) modulation scalars.
        bias: (C_out,) or None.
        others: as :func:`deform_conv`.
    """
    _check_shapes(input, offset, mask, weight, groups, deformable_groups)
    return _deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
