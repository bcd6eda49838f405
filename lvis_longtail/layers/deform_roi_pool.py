"""Deformable RoI pooling (Dai et al., *Deformable Convolutional Networks*, 2017) from
torchvision's ``roi_align`` and ``grid_sample``: no compiled op of its own.

:class:`DeformROIPooler` is detectron2's ``ROIPooler`` ("ROIAlignV2", same level assignment)
followed by the paper's two steps: an FC branch maps each RoI's pooled features to per-bin
*normalised* offsets, and every bin is pooled again at its shifted position,

    offset of bin (i, j) = GAMMA * (dx_ij * w, dy_ij * h),  (w, h) the RoI's size,

each bin averaging the same bilinear samples as RoIAlign (a ``sampling_ratio`` grid per bin,
or detectron2's adaptive ceil(size / bins) grid for 0). The last FC layer starts at zero, so
a new pooler equals ROIAlignV2 (to float rounding) and learns to deform. One offset branch
serves all FPN levels (the RoI features of every level live in the same FPN channel space).

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


def _sample_positions(coord0, size, bins: int, grid: int):
    """Sample coordinates (R, bins, grid) of RoIAlign along one axis:
    start + p * bin + (i + 0.5) * bin / grid, the formula of torchvision's kernel."""
    bin_size = size / bins
    p = torch.arange(bins, device=size.device, dtype=size.dtype)
    i = torch.arange(grid, device=size.device, dtype=size.dtype)
    return (
        coord0[:, None, None]
        + p[None, :, None] * bin_size[:, None, None]
        + (i[None, None, :] + 0.5) * bin_size[:, None, None] / grid
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

    RoIs are grouped by their per-bin sample grid (fixed ``sampling_ratio``, or the adaptive
    ceil(size / bins) of each RoI), so each group's sample positions are one dense tensor;
    the samples of all groups and images are then read by a single ``grid_sample`` (one
    column of points per image) and each bin averages its own: no padding of the grids, no
    loop over RoIs or images.

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
    output = features.new_zeros((num_rois, c, kh, kw))
    if num_rois == 0:
        return output
    rois = rois.to(features.dtype)
    batch = rois[:, 0].long()
    x0, y0 = rois[:, 1] * spatial_scale - 0.5, rois[:, 2] * spatial_scale - 0.5
    roi_w, roi_h = rois[:, 3] * spatial_scale - 0.5 - x0, rois[:, 4] * spatial_scale - 0.5 - y0
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(batch, sampling_ratio)
    else:
        grid_h, grid_w = torch.ceil(roi_h / kh).long(), torch.ceil(roi_w / kw).long()
    span = int(grid_w.max()) + 1
    key = grid_h * span + grid_w
    order = torch.argsort(key)
    keys, counts = torch.unique_consecutive(key[order], return_counts=True)
    groups, points, point_batch = [], [], []
    for k, idx in zip(keys.tolist(), order.split(counts.tolist())):
        gh, gw = divmod(k, span)
        if gh == 0 or gw == 0:  # empty RoI: RoIAlign gives 0
            continue
        ys = _sample_positions(y0[idx], roi_h[idx], kh, gh)  # (r, kh, gh)
        xs = _sample_positions(x0[idx], roi_w[idx], kw, gw)  # (r, kw, gw)
        off = offsets[idx]
        ys = ys[:, :, :, None, None] + (off[:, 1] * roi_h[idx, None, None])[:, :, None, :, None]
        xs = xs[:, None, None] + (off[:, 0] * roi_w[idx, None, None])[:, :, None, :, None]
        ys, xs = torch.broadcast_tensors(ys, xs)  # (r, kh, gh, kw, gw)
        # RoIAlign's bilinear rule: edge values up to one pixel outside, 0 beyond (moved far
        # outside, where grid_sample's zero padding gives exactly 0 and no gradient).
        outside = (ys < -1) | (ys > h) | (xs < -1) | (xs > w)
        gx = xs.clamp(0, w - 1) * (2.0 / max(w - 1, 1)) - 1
        gy = ys.clamp(0, h - 1) * (2.0 / max(h - 1, 1)) - 1
        grid = torch.stack([gx.masked_fill(outside, -3.0), gy.masked_fill(outside, -3.0)], -1)
        groups.append((idx, gh, gw))
        points.append(grid.reshape(-1, 2))
        point_batch.append(batch[idx].repeat_interleave(kh * gh * kw * gw))
    if not groups:
        return output
    points, point_batch = torch.cat(points), torch.cat(point_batch)
    # lay the points out as one (N, P, 1) column per image, padded with far-outside points
    per_image = torch.bincount(point_batch, minlength=n)
    first = torch.cumsum(per_image, 0) - per_image
    by_image = torch.argsort(point_batch, stable=True)
    slot = torch.empty_like(point_batch)
    slot[by_image] = torch.arange(len(points), device=slot.device) - first[point_batch[by_image]]
    column = points.new_full((n, int(per_image.max()), 2), -3.0)
    column = column.index_put((point_batch, slot), points)
    if features.device.type == "cpu":  # CPU grid_sample reads channels-last ~1.5x faster
        features = features.contiguous(memory_format=torch.channels_last)
    sampled = F.grid_sample(features, column[:, :, None], mode="bilinear", align_corners=True)
    values = sampled[:, :, :, 0].transpose(1, 2)[point_batch, slot]  # (points, C)
    sizes = [len(idx) * kh * gh * kw * gw for idx, gh, gw in groups]
    pooled = []
    for (idx, gh, gw), v in zip(groups, values.split(sizes)):  # split: cheap backward
        pooled.append(v.view(len(idx), kh, gh, kw, gw, c).mean(dim=(2, 4)))
    rois_in_order = torch.cat([idx for idx, _, _ in groups])
    output = output.index_put((rois_in_order,), torch.cat(pooled).permute(0, 3, 1, 2))
    return output


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
        level offsets (0 = ``min_level``): ROIAlignV2, offsets from it, the shifted pass."""
        assert len(x) == len(self.level_poolers), "one feature map per pooler level"
        pooled = x[0].new_zeros((rois.shape[0], x[0].shape[1]) + tuple(self.output_size))
        for level, level_pooler in enumerate(self.level_poolers):
            (inds,) = nonzero_tuple(levels == level)
            if inds.numel():
                pooled = pooled.index_put((inds,), level_pooler(x[level], rois[inds]))
        if pooled.shape[0] == 0:
            return pooled
        offsets = self.gamma * self.offset_fc(pooled.flatten(1)).view(-1, 2, *self.output_size)
        size, ratio = self.output_size, self.sampling_ratio
        output = torch.zeros_like(pooled)
        for level, scale in enumerate(self.scales):
            (inds,) = nonzero_tuple(levels == level)
            if inds.numel():
                output = output.index_put(
                    (inds,),
                    deform_roi_align(x[level], rois[inds], offsets[inds], size, scale, ratio),
                )
        return output
