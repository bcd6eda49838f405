"""Deformable RoI pooling (Dai et al., *Deformable Convolutional Networks*, 2017) from
torchvision's ``roi_align`` and torch's ``embedding_bag``: no compiled op of its own.

:class:`DeformROIPooler` is detectron2's ``ROIPooler`` ("ROIAlignV2", same level assignment)
followed by the paper's two steps: an FC branch maps each RoI's pooled features to per-bin
*normalised* offsets, and every bin is pooled again at its shifted position,

    offset of bin (i, j) = GAMMA * (dx_ij * w, dy_ij * h),  (w, h) the RoI's size,

each bin averaging the same bilinear samples as RoIAlign (a ``sampling_ratio`` grid per bin,
or detectron2's adaptive ceil(size / bins) grid for 0). The last FC layer starts at zero, so
a new pooler equals ROIAlignV2 (to float rounding) and learns to deform. One offset branch
serves all FPN levels (the RoI features of every level live in the same FPN channel space).

The shifted pass is linear in the features: RoIAlign's bilinear rule is separable, so along
each axis a bin's samples become weights on a few consecutive pixels, and the bin's value is
a weighted sum of the (rows x columns) window's pixels. One ``embedding_bag`` (weighted row
sums, ragged bags) computes every bin of every RoI and FPN level from one channels-last copy
of the maps; its backward gives the features' gradient and, through the weights, the
offsets'. The same samples as RoIAlign, read once per window pixel instead of four times per
sample, and no ``grid_sample`` backward.

Selected by ``POOLER_TYPE: "DeformROIAlignV2"`` on ``MODEL.ROI_BOX_HEAD`` / ``ROI_MASK_HEAD``
(:mod:`lvis_longtail.modeling.architecture` builds it for the ROI heads).
"""

from typing import List, Tuple

import torch
from detectron2.layers import nonzero_tuple
from detectron2.modeling.poolers import (
    ROIPooler,
    assign_boxes_to_levels,
    convert_boxes_to_pooler_format,
)
from detectron2.structures import Boxes
from fvcore.nn import weight_init
from torch import nn
from torch.nn import functional as F

__all__ = ["DeformROIPooler", "deform_roi_align"]


def _axis_weights(start, bin_size, shift, grid, size):
    """RoIAlign's bilinear weights along one axis, each bin's samples merged onto a window
    of consecutive pixels (neighbouring samples share pixels: the adaptive grid's window has
    at most grid + 1 pixels where its samples have 2 grid taps).

    Args:
        start: (B,) start of each bin (RoI start + bin index * bin size), feature pixels.
        bin_size: (B,) size of the bins, feature pixels.
        shift: (B,) shift of each bin, feature pixels (the differentiable input).
        grid: (B,) samples per bin along this axis (long; <= 0: none).
        size: (B,) size of the bin's feature map along this axis.

    Returns:
        first (B,) long, the window's first pixel; extent (B,) long, its pixels inside the
        map (0 for a bin without samples); weights (B, K), the weight of pixel
        ``first + k`` (the mean over the bin's samples of their bilinear weights).
    """
    num_samples = max(int(grid.max()), 1)
    s = torch.arange(num_samples, device=start.device, dtype=start.dtype)
    g = grid.clamp(min=1).to(start.dtype)[:, None]
    # torchvision's kernel: start + (s + 0.5) * bin / grid; then the bin's shift
    pos = start[:, None] + (s + 0.5) * bin_size[:, None] / g + shift[:, None]
    size = size.to(start.dtype)[:, None]
    valid = (s < grid[:, None]) & (pos >= -1) & (pos <= size)  # 0 beyond one pixel outside
    p = pos.clamp(min=0)  # edge values up to one pixel outside
    low = p.detach().floor()
    edge = low >= size - 1  # at or past the last pixel: its value, no slope
    low = torch.where(edge, size - 1, low)
    frac = torch.where(edge, torch.zeros_like(p), p - low)
    share = valid.to(start.dtype) / g
    has = valid.any(1)
    first = torch.where(valid, low, size).amin(1)
    last = torch.where(valid, low, -1.0).amax(1)
    first, last = torch.where(has, first, 0.0), torch.where(has, last, 0.0)
    extent = torch.where(has, torch.minimum(last + 2, size[:, 0]) - first, 0.0).long()
    rel = torch.where(valid, low - first[:, None], 0.0).long()
    weights = start.new_zeros((start.shape[0], int((last - first).max()) + 2))
    weights = weights.scatter_add(1, rel, (1 - frac) * share).scatter_add(1, rel + 1, frac * share)
    return first.long(), extent, weights


def _shifted_bins(flat, rois, offsets, output_size, scale, height, width, base, sampling_ratio):
    """RoIAlign (``aligned=True``) of the shifted bins of R RoIs, each from its own map.

    Along each axis a bin's samples become weights on a window of pixels
    (:func:`_axis_weights`); the bin's value is the weighted sum over the window's
    (rows x columns) pixels, one bag of a single ``embedding_bag`` over all RoIs and maps
    (ragged bags: each bin lists only its own window's pixels). No loop over RoIs, maps,
    sample grids or images.

    Args:
        flat: (P, C) the pixels of all feature maps, channels last.
        rois: (R, 5) [batch index, x0, y0, x1, y1], input-image coordinates.
        offsets: (R, 2, kh, kw) bin shifts as fractions of the RoI's width and height.
        output_size: (kh, kw).
        scale, height, width: (R,) scale, H and W of each RoI's map.
            The geometry is computed in float32 (float64 for float64 features).
        base: (R,) row of ``flat`` holding pixel (0, 0) of each RoI's map and image.
        sampling_ratio: as ``roi_align``.

    Returns:
        (R, C, kh, kw).
    """
    (kh, kw), num_rois = output_size, rois.shape[0]
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32  # geometry
    rois, scale, offsets = rois.detach().to(dtype), scale.to(dtype), offsets.to(dtype)
    x0, y0 = rois[:, 1] * scale - 0.5, rois[:, 2] * scale - 0.5
    roi_w, roi_h = rois[:, 3] * scale - 0.5 - x0, rois[:, 4] * scale - 0.5 - y0
    bin_w, bin_h = roi_w / kw, roi_h / kh
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(base, sampling_ratio)
    else:
        grid_h, grid_w = torch.ceil(roi_h / kh).long(), torch.ceil(roi_w / kw).long()
    i = torch.arange(kh, device=flat.device, dtype=dtype)
    j = torch.arange(kw, device=flat.device, dtype=dtype)
    shape = (num_rois, kh, kw)

    def per_bin(t):  # (R,) -> (R kh kw,)
        return t[:, None, None].expand(shape).reshape(-1)

    first_y, extent_y, weights_y = _axis_weights(
        (y0[:, None] + i * bin_h[:, None])[:, :, None].expand(shape).reshape(-1),
        per_bin(bin_h),
        (offsets[:, 1] * roi_h[:, None, None]).reshape(-1),
        per_bin(grid_h),
        per_bin(height),
    )
    first_x, extent_x, weights_x = _axis_weights(
        (x0[:, None] + j * bin_w[:, None])[:, None, :].expand(shape).reshape(-1),
        per_bin(bin_w),
        (offsets[:, 0] * roi_w[:, None, None]).reshape(-1),
        per_bin(grid_w),
        per_bin(width),
    )
    sizes = extent_y * extent_x  # (B,) pixels of each bin's window
    bag = torch.repeat_interleave(torch.arange(len(sizes), device=flat.device), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    local = torch.arange(len(bag), device=flat.device) - starts[bag]
    columns = extent_x[bag]
    row, col = torch.div(local, columns, rounding_mode="floor"), local % columns
    pixel = per_bin(base)[bag] + (first_y[bag] + row) * per_bin(width)[bag] + first_x[bag] + col
    weight = (weights_y[bag, row] * weights_x[bag, col]).to(flat.dtype)
    out = F.embedding_bag(pixel, flat, starts, mode="sum", per_sample_weights=weight)
    return out.view(num_rois, kh, kw, -1).permute(0, 3, 1, 2).contiguous()


def deform_roi_align(
    features: torch.Tensor,
    rois: torch.Tensor,
    offsets: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
) -> torch.Tensor:
    """RoIAlign (``aligned=True``) with every bin shifted by its own offset.

    Args:
        features: (N, C, H, W) one feature map.
        rois: (R, 5) [batch index, x0, y0, x1, y1] in input-image coordinates.
        offsets: (R, 2, kh, kw) bin shifts as fractions of the RoI's width ([:, 0], x) and
            height ([:, 1], y); zeros give ``roi_align(..., aligned=True)``.
        output_size: (kh, kw) bins.
        spatial_scale: feature-map scale (1 / stride).
        sampling_ratio: samples per bin along each axis; 0 = ceil(RoI size / bins) per RoI.

    Returns:
        (R, C, kh, kw), differentiable w.r.t. ``features`` and ``offsets`` (not ``rois``,
        as ``roi_align``).
    """
    return _deform_roi_align_levels(
        [features], rois, torch.zeros_like(rois[:, 0], dtype=torch.long), offsets,
        output_size, [spatial_scale], sampling_ratio,
    )  # fmt: skip


def _deform_roi_align_levels(x, rois, levels, offsets, output_size, scales, sampling_ratio):
    """:func:`deform_roi_align` of RoIs on several maps: ``x`` a list of (N, C, H_l, W_l),
    ``levels`` (R,) the map of each RoI, ``scales`` the maps' scales. All maps' pixels are
    read from one copy, channels last: (N, sum of H_l W_l, C), flattened."""
    c = x[0].shape[1]
    if rois.shape[0] == 0:  # zeros that keep the offsets' branch in the graph (DDP)
        return x[0].new_zeros((0, c) + tuple(output_size)) + offsets.sum() * 0
    flat = torch.cat([f.permute(0, 2, 3, 1).flatten(1, 2) for f in x], dim=1)
    firsts = [0]
    for f in x[:-1]:
        firsts.append(firsts[-1] + f.shape[2] * f.shape[3])

    def table(values, dtype):
        return torch.tensor(values, device=rois.device, dtype=dtype)[levels]

    height = table([f.shape[2] for f in x], torch.long)
    width = table([f.shape[3] for f in x], torch.long)
    base = table(firsts, torch.long) + rois[:, 0].long() * flat.shape[1]
    scale = table(scales, torch.float64)
    flat = flat.reshape(-1, c)
    return _shifted_bins(
        flat, rois, offsets, output_size, scale, height, width, base, sampling_ratio
    )


class DeformROIPooler(ROIPooler):
    """detectron2's ``ROIPooler`` with deformable RoI pooling (see the module docstring).

    Args:
        output_size, scales, sampling_ratio, canonical_box_size, canonical_level: as
            ``ROIPooler`` (the first pass is its "ROIAlignV2").
        in_channels: C of the pooled feature maps.
        fc_dim: hidden width of the offset branch (C kh kw -> fc_dim -> ReLU -> 2 kh kw).
        gamma: scale of the normalised offsets (0.1 in the paper).
    """

    def __init__(
        self,
        output_size,
        scales,
        sampling_ratio: int,
        in_channels: int,
        canonical_box_size: float = 224,
        canonical_level: int = 4,
        fc_dim: int = 1024,
        gamma: float = 0.1,
    ):
        super().__init__(
            output_size, scales, sampling_ratio, "ROIAlignV2", canonical_box_size, canonical_level
        )
        kh, kw = self.output_size
        self.scales = tuple(float(s) for s in scales)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)
        self.offset_fc = nn.Sequential(
            nn.Linear(in_channels * kh * kw, fc_dim),
            nn.ReLU(inplace=True),
            nn.Linear(fc_dim, 2 * kh * kw),
        )
        weight_init.c2_xavier_fill(self.offset_fc[0])
        nn.init.zeros_(self.offset_fc[2].weight)  # starts as ROIAlignV2
        nn.init.zeros_(self.offset_fc[2].bias)

    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        """As ``ROIPooler.forward``: (M, C, kh, kw) features of the M boxes of all images."""
        levels = assign_boxes_to_levels(
            box_lists, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        return self.pool_at_levels(x, convert_boxes_to_pooler_format(box_lists), levels)

    def pool_at_levels(
        self, x: List[torch.Tensor], rois: torch.Tensor, levels: torch.Tensor
    ) -> torch.Tensor:
        """(M, C, kh, kw) features of (M, 5) pooler-format boxes ``rois`` at the given (M,)
        level offsets (0 = ``min_level``): ROIAlignV2, offsets from it, the shifted pass.
        M = 0 gives (0, C, kh, kw) zeros whose backward reaches the offset branch."""
        assert len(x) == len(self.level_poolers), "one feature map per pooler level"
        pooled = x[0].new_zeros((rois.shape[0], x[0].shape[1]) + tuple(self.output_size))
        for level, level_pooler in enumerate(self.level_poolers):
            (inds,) = nonzero_tuple(levels == level)
            if inds.numel():
                pooled.index_put_((inds,), level_pooler(x[level], rois[inds]))
        # also for no RoI: the offset branch stays in the graph (zero gradients), so DDP
        # without find_unused_parameters finds a gradient for every parameter
        offsets = self.gamma * self.offset_fc(pooled.flatten(1)).view(-1, 2, *self.output_size)
        return _deform_roi_align_levels(
            x, rois, levels, offsets, self.output_size, self.scales, self.sampling_ratio
        )
