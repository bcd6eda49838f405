"""Feature Pyramid Grids (FPG; Chen et al. 2020, arXiv 2004.03580) as a detectron2 backbone.

FPG replaces FPN's single top-down path by a grid of parallel bottom-up pathways over the
levels P2..P6 (docs/architecture.md, "FPG"):

* pathway 0: a 1x1 lateral conv (with bias, no norm) per bottom-up feature C2..C5, and P6 as
  the stride-2 subsampling (1x1 max pool) of the P5 lateral;
* pathways 1..K: node (k, l) sums pre-activation transitions (ReLU -> conv -> norm):
  ``same`` (3x3 stride 2 from the finer level of the same pathway), ``across_lateral`` (1x1
  from the same level of the previous pathway), ``across_down`` (nearest 2x upsampling of the
  previous pathway's coarser level, then 3x3) and ``across_skip`` (1x1 from pathway 0);
* triangular start: level l (0 = finest of L levels) is carried unchanged through the first
  L - 1 - l pathways, so pathway 1 computes only P6 and pathway L - 1 the first full column;
* outputs: ReLU -> 3x3 conv (with bias) of each level of the last pathway.

Options of the MMDet LVIS 2020 entry's "enhanced" FPG (never released; our reading):
``deform_upsample`` makes the 3x3 conv after each upsampling a DCNv2, and ``downsample``
"carafe" replaces each same-pathway stride-2 conv by content-aware 2x downsampling
(:class:`~lvis_longtail.layers.carafe.CARAFEDown`) followed by a stride-1 3x3 conv.

With the transitions of mmdetection 3.3.0's ``configs/fpg/`` this computes what its ``FPG``
neck computes, parameter for parameter; ``lvis_longtail.tools.convert_mmdet_fpg`` converts its
weights.
"""

import math
from typing import List, Optional

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.layers import Conv2d, ModulatedDeformConv, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import _assert_strides_are_log2_contiguous
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from torch import nn
from torch.nn import functional as F

from lvis_longtail.layers.carafe import CARAFEDown
from lvis_longtail.modeling.backbones import build_timm_bottom_up

__all__ = ["FPG", "build_resnet_fpg_backbone", "build_timm_fpg_backbone", "fpg_from_cfg"]


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int, norm: str) -> Conv2d:
    """A conv followed by ``norm`` (bias only without one), Caffe2 Xavier initialised."""
    conv = Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2,
                  bias=norm == "", norm=get_norm(norm, out_channels))  # fmt: skip
    weight_init.c2_xavier_fill(conv)
    return conv


class PreActConv(nn.Module):
    """ReLU -> conv -> norm: (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride))."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1,
                 norm: str = ""):  # fmt: skip
        super().__init__()
        self.conv = _conv(in_channels, out_channels, kernel, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(x))


class ContentAwareDown(nn.Module):
    """ReLU -> content-aware 2x downsampling -> 3x3 conv -> norm (same shapes as a stride-2
    :class:`PreActConv`)."""

    def __init__(self, channels: int, norm: str, compressed: int, encoder: int, kernel: int):
        super().__init__()
        self.down = CARAFEDown(channels, compressed, encoder, kernel)
        self.conv = _conv(channels, channels, 3, 1, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.down(F.relu(x)))


class UpsampleConv(nn.Module):
    """The across-down transition: nearest upsampling to ``size`` -> ReLU -> 3x3 conv -> norm;
    with ``deform``, the conv is a DCNv2 whose offsets and masks come from a zero-initialised
    3x3 conv of the upsampled input (it starts as half the plain conv, as detectron2's and
    mmcv's DCNv2 layers do). (N, C, h, w) -> (N, C, *size)."""

    def __init__(self, channels: int, norm: str, deform: bool = False):
        super().__init__()
        if deform:
            self.conv = ModulatedDeformConv(channels, channels, 3, padding=1, bias=norm == "",
                                            norm=get_norm(norm, channels))  # fmt: skip
            weight_init.c2_xavier_fill(self.conv)
            self.conv_offset = nn.Conv2d(channels, 27, 3, padding=1)
            nn.init.zeros_(self.conv_offset.weight)
            nn.init.zeros_(self.conv_offset.bias)
        else:
            self.conv = _conv(channels, channels, 3, 1, norm)
            self.conv_offset = None

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        x = F.interpolate(F.relu(x), size=size, mode="nearest")  # ReLU commutes with nearest
        if self.conv_offset is None:
            return self.conv(x)
        dy_dx_a, dy_dx_b, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        return self.conv(x, torch.cat([dy_dx_a, dy_dx_b], dim=1), mask.sigmoid())


class FPGNode(nn.Module):
    """One computed node of the grid: the sum of its transitions. ``same`` is None on the
    finest level, ``across_down`` on the coarsest."""

    def __init__(self, channels: int, norm: str, finer: bool, coarser: bool,
                 deform_upsample: bool, carafe_down: Optional[tuple]):  # fmt: skip
        super().__init__()
        self.same = None
        if finer:
            self.same = (
                ContentAwareDown(channels, norm, *carafe_down)
                if carafe_down
                else PreActConv(channels, channels, 3, 2, norm)
            )
        self.across_lateral = PreActConv(channels, channels, 1, 1, norm)
        self.across_down = UpsampleConv(channels, norm, deform_upsample) if coarser else None
        self.across_skip = PreActConv(channels, channels, 1, 1, norm)

    def forward(self, finer, previous, coarser, first) -> torch.Tensor:
        """Args (N, C, *) each: the finer level of this pathway (or None), this level of the
        previous pathway, the previous pathway's coarser level (or None), pathway 0's level.
        Returns this level's (N, C, H, W) feature."""
        out = self.across_lateral(previous)
        if self.same is not None:
            out = self.same(finer) + out
        if self.across_down is not None:
            out = out + self.across_down(coarser, previous.shape[-2:])
        return out + self.across_skip(first)


class FPG(Backbone):
    """A bottom-up network + Feature Pyramid Grids (module docstring); outputs like detectron2's
    FPN with its max-pool top block: ``p2``..``p6`` (strides 4..64) with ``out_channels``.
    Input (N, 3, H, W), H and W multiples of :attr:`size_divisibility` (64).

    Args:
        bottom_up: a detectron2 ``Backbone`` with the ``in_features``.
        in_features: bottom-up features, finest first (strides doubling).
        out_channels: channels of the outputs.
        channels: channels of the grid (laterals and every node).
        num_pathways: bottom-up pathways after pathway 0 (9 in mmdetection's configs).
        norm: detectron2 norm of the transitions ("", "BN", "SyncBN", "GN", ...).
        deform_upsample: DCNv2 after each upsampling (across-down transitions).
        carafe_down: None, or (compressed channels, encoder kernel, down kernel) of the
            content-aware downsampling of every same-pathway transition.
    """

    def __init__(self, bottom_up: Backbone, in_features: List[str], out_channels: int = 256,
                 channels: int = 256, num_pathways: int = 9, norm: str = "BN",
                 deform_upsample: bool = False, carafe_down: Optional[tuple] = None):  # fmt: skip
        super().__init__()
        shapes = bottom_up.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if missing or num_pathways < 1:
            raise ValueError(f"FPG: in_features {missing} not among the bottom-up outputs "
                             f"{list(shapes)}, or num_pathways {num_pathways} < 1")  # fmt: skip
        strides = [shapes[f].stride for f in in_features]
        _assert_strides_are_log2_contiguous(strides)
        self.bottom_up, self.in_features = bottom_up, tuple(in_features)
        first = int(math.log2(strides[0]))
        self._out_features = [f"p{first + i}" for i in range(len(in_features) + 1)]
        self._out_feature_strides = {f: 2 ** (first + i) for i, f in enumerate(self._out_features)}
        self._out_feature_channels = {f: out_channels for f in self._out_features}
        self._size_divisibility = 2 ** (first + len(in_features))
        self.laterals = nn.ModuleList(
            nn.Conv2d(shapes[f].channels, channels, 1) for f in in_features
        )
        for conv in self.laterals:
            weight_init.c2_xavier_fill(conv)
        levels = len(self._out_features)
        self.grid = nn.ModuleList()
        for k in range(num_pathways):
            pathway = nn.ModuleDict()
            for i in range(max(0, levels - 1 - k), levels):  # the triangular start
                pathway[self._out_features[i]] = FPGNode(
                    channels, norm, i > 0, i < levels - 1, deform_upsample, carafe_down
                )
            self.grid.append(pathway)
        self.outputs = nn.ModuleList(_conv(channels, out_channels, 3, 1, "") for _ in range(levels))

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def grid_forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """The neck alone: bottom-up features (finest first) -> the output levels."""
        first = [lateral(x) for lateral, x in zip(self.laterals, features)]
        first.append(F.max_pool2d(first[-1], kernel_size=1, stride=2))
        previous = first
        for pathway in self.grid:
            current: List[torch.Tensor] = []
            for i, name in enumerate(self._out_features):
                if name not in pathway:  # not started yet: carried unchanged
                    current.append(previous[i])
                    continue
                finer = current[i - 1] if i > 0 else None
                coarser = previous[i + 1] if i + 1 < len(previous) else None
                current.append(pathway[name](finer, previous[i], coarser, first[i]))
            previous = current
        return [conv(F.relu(x)) for conv, x in zip(self.outputs, previous)]

    def forward(self, x: torch.Tensor):
        """(N, 3, H, W) -> {"p2": (N, C, H / 4, W / 4), ..., "p6": (N, C, H / 64, W / 64)}."""
        bottom_up = self.bottom_up(x)
        outs = self.grid_forward([bottom_up[f] for f in self.in_features])
        return dict(zip(self._out_features, outs))

    def output_shape(self):
        return {
            f: ShapeSpec(channels=self._out_feature_channels[f], stride=s)
            for f, s in self._out_feature_strides.items()
        }


def fpg_from_cfg(cfg, bottom_up: Backbone) -> FPG:
    """An :class:`FPG` over ``bottom_up`` with the options of ``MODEL.FPG``."""
    p = cfg.MODEL.FPG
    carafe = None
    if p.DOWNSAMPLE_TYPE == "carafe":
        carafe = (p.CARAFE.COMPRESSED_CHANNELS, p.CARAFE.ENCODER_KERNEL, p.CARAFE.DOWN_KERNEL)
    return FPG(bottom_up, p.IN_FEATURES, p.OUT_CHANNELS, p.CHANNELS, p.NUM_PATHWAYS, p.NORM,
               p.DEFORM_UPSAMPLE, carafe)  # fmt: skip


@BACKBONE_REGISTRY.register()
def build_resnet_fpg_backbone(cfg, input_shape: ShapeSpec) -> FPG:
    """detectron2's ResNet (``MODEL.RESNETS``) + FPG (``MODEL.FPG``)."""
    return fpg_from_cfg(cfg, build_resnet_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_timm_fpg_backbone(cfg, input_shape: ShapeSpec) -> FPG:
    """A timm model (``MODEL.TIMM``, as ``build_timm_fpn_backbone``) + FPG (``MODEL.FPG``)."""
    return fpg_from_cfg(cfg, build_timm_bottom_up(cfg, input_shape))
