"""Deformable RoI pooling (Dai et al., *Deformable Convolutional Networks*, 2017) from
torchvision's ``roi_align`` and ``grid_sample``: no compiled op of its own.

:class:`DeformROIPooler` is detectron2's ``ROIPooler`` ("ROIAlignV2", same level assignment)
followed by the paper's two steps: an FC branch maps each RoI's pooled features to per-bin
*normalised* offsets, and every bin is pooled again at its shifted position,

    offset of bin (i, j) = GAMMA * (dx_ij * w, dy_ij * h),  (w, h) the RoI's size,

each bin averaging the same bilinear samples as RoIAlign (a ``sampling_ratio`` grid per bin,
or detectron2's adaptive ceil(size / bins) grid for 0). The last FC layer starts at zero, so
a new pooler is exactly ROIAlignV2 and learns to deform. One offset branch serves all FPN
levels (the RoI features of every level live in the same FPN channel space).

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


def _sample_positions(coord0, size, bins: int, grid, max_grid: int):
    """Sample coordinates (R, bins, max_grid) of RoIAlign along one axis:
    start + p * bin + (i + 0.5) * bin / grid, the formula of torchvision's kernel."""
    bin_size = size / bins
    p = torch.arange(bins, device=size.device, dtype=size.dtype)
    i = torch.arange(max_grid, device=size.device, dtype=size.dtype)
    return (
        coord0[:, None, None]
        + p[None, :, None] * bin_size[:, None, None]
        + (i[None, None, :] + 0.5) * bin_size[:, None, None] / grid[:, None, None]
    )


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
        (R, C, kh, kw), differentiable w.r.t. ``features`` and ``offsets``.
    """
    (kh, kw), (n, c, h, w) = output_size, features.shape
    num_rois = rois.shape[0]
    if num_rois == 0:
        return features.new_zeros((0, c, kh, kw))
    rois = rois.to(features.dtype)
    x0, y0 = rois[:, 1] * spatial_scale - 0.5, rois[:, 2] * spatial_scale - 0.5
    roi_w, roi_h = rois[:, 3] * spatial_scale - 0.5 - x0, rois[:, 4] * spatial_scale - 0.5 - y0
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(roi_h, sampling_ratio)
    else:
        grid_h, grid_w = torch.ceil(roi_h / kh), torch.ceil(roi_w / kw)
    max_h, max_w = max(int(grid_h.max()), 1), max(int(grid_w.max()), 1)
    # (R, kh, Gh) and (R, kw, Gw) sample rows/columns, then each bin's shift
    ys = _sample_positions(y0, roi_h, kh, grid_h.clamp(min=1), max_h)
    xs = _sample_positions(x0, roi_w, kw, grid_w.clamp(min=1), max_w)
    ys = ys[:, :, :, None, None] + (offsets[:, 1] * roi_h[:, None, None])[:, :, None, :, None]
    xs = xs[:, None, None, :, :] + (offsets[:, 0] * roi_w[:, None, None])[:, :, None, :, None]
    ys, xs = torch.broadcast_tensors(ys, xs)  # (R, kh, Gh, kw, Gw)
    # RoIAlign's bilinear rule: 0 beyond one pixel outside, edge values within it.
    inside = (ys >= -1) & (ys <= h) & (xs >= -1) & (xs <= w)
    used_h = torch.arange(max_h, device=ys.device)[None, :] < grid_h[:, None]
    used_w = torch.arange(max_w, device=ys.device)[None, :] < grid_w[:, None]
    count = (grid_h * grid_w).clamp(min=1)
    weight = inside * (used_h[:, None, :, None, None] & used_w[:, None, None, None, :])
    weight = weight.to(features.dtype) / count[:, None, None, None, None]
    grid = torch.stack(
        [
            xs.clamp(0, w - 1) * (2.0 / max(w - 1, 1)) - 1,
            ys.clamp(0, h - 1) * (2.0 / max(h - 1, 1)) - 1,
        ],
        dim=-1,
    ).reshape(num_rois, kh * max_h, kw * max_w, 2)

    batch = rois[:, 0].long()
    order = torch.argsort(batch, stable=True)
    counts = torch.bincount(batch, minlength=n).tolist()
    pooled = []
    for b, idx in enumerate(order.split(counts)):  # one grid_sample per image
        if idx.numel() == 0:
            continue
        g = grid[idx].reshape(1, -1, kw * max_w, 2)
        s = F.grid_sample(features[b : b + 1], g, mode="bilinear", align_corners=True)
        s = s.view(c, idx.numel(), kh, max_h, kw, max_w).transpose(0, 1)
        pooled.append((s * weight[idx][:, None]).sum(dim=(3, 5)))
    return torch.cat(pooled)[torch.argsort(order)]


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
        pooled = super().forward(x, box_lists)
        if pooled.shape[0] == 0:
            return pooled
        offsets = self.gamma * self.offset_fc(pooled.flatten(1)).view(-1, 2, *self.output_size)
        rois = convert_boxes_to_pooler_format(box_lists)
        args = (self.output_size, self.sampling_ratio)
        if len(x) == 1:
            return deform_roi_align(x[0], rois, offsets, args[0], self.scales[0], args[1])
        levels = assign_boxes_to_levels(
            box_lists, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        output = torch.zeros_like(pooled)
        for level, scale in enumerate(self.scales):
            (inds,) = nonzero_tuple(levels == level)
            if inds.numel():
                output[inds] = deform_roi_align(
                    x[level], rois[inds], offsets[inds], args[0], scale, args[1]
                )
        return output
