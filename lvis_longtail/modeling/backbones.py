"""Backbones: timm models behind detectron2's registry, and an FPN with CARAFE upsampling.

* ``build_timm_fpn_backbone``: any timm model that supports ``features_only`` and has
  feature maps at strides 4, 8, 16 and 32 (ResNeSt, ConvNeXt, ResNet, ...), as detectron2
  features ``res2``..``res5`` under an FPN (``MODEL.TIMM``; ``MODEL.BACKBONE.FREEZE_AT``).
  timm's pretrained models expect RGB inputs in [0, 1] normalised by ImageNet's mean/std:
  with their weights set ``INPUT.FORMAT: "RGB"``, ``PIXEL_MEAN: [123.675, 116.28, 103.53]``,
  ``PIXEL_STD: [58.395, 57.12, 57.375]``.
* ``build_longtail_resnet_fpn_backbone``: detectron2's ``build_resnet_fpn_backbone``.
* Both honour ``MODEL.FPN.UPSAMPLE_TYPE``: "nearest" (detectron2's FPN) or "carafe"
  (:class:`LongTailFPN`: one CARAFE per top-down step).
"""

import math
from typing import Dict

import torch
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from torch import nn

from lvis_longtail.layers.deform_conv import deform_conv, modulated_deform_conv
from lvis_longtail.layers.sync_bn import LongTailSyncBatchNorm
from lvis_longtail.modeling.architecture import carafe_from_cfg

__all__ = ["LongTailFPN", "TimmBackbone", "build_longtail_resnet_fpn_backbone",
           "build_timm_bottom_up", "build_timm_fpn_backbone", "convert_batchnorm"]  # fmt: skip


class TimmDeformConv2d(nn.Module):
    """A 3x3 ``nn.Conv2d`` turned into a deformable conv (DCNv2 if ``modulated``, else DCNv1)
    with the same weight, bias, stride, padding, dilation and groups (a grouped conv, e.g.
    ResNeSt's split-attention conv with radix x cardinality groups, stays grouped). Offsets
    (and masks, through a sigmoid) come from a zero-initialised 3x3 conv over the same input,
    as in detectron2's ``DeformBottleneckBlock``: DCNv1 starts as the conv, DCNv2 as half of
    it. Computed by :mod:`lvis_longtail.layers.deform_conv` (groups checked against the
    weight; mixed dtypes under autocast computed in the widest)."""

    def __init__(self, conv: nn.Conv2d, modulated: bool = True, deformable_groups: int = 1):
        super().__init__()
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.modulated, self.groups = conv.dilation, modulated, conv.groups
        self.weight, self.bias = conv.weight, conv.bias
        taps = conv.kernel_size[0] * conv.kernel_size[1] * deformable_groups
        self.conv_offset = nn.Conv2d(conv.in_channels, (3 if modulated else 2) * taps,
                                     conv.kernel_size, conv.stride, conv.padding,
                                     conv.dilation)  # fmt: skip
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)
        self.deformable_groups = deformable_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H_out, W_out), as the conv it replaces."""
        out = self.conv_offset(x)
        args = (self.stride, self.padding, self.dilation, self.groups, self.deformable_groups)
        if self.modulated:
            o1, o2, mask = torch.chunk(out, 3, dim=1)
            offset = torch.cat([o1, o2], 1)
            return modulated_deform_conv(x, offset, mask.sigmoid(), self.weight, self.bias, *args)
        out = deform_conv(x, out, self.weight, *args)
        return out if self.bias is None else out + self.bias.to(out.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        shape = tuple(self.weight.shape)
        return f"weight={shape}, stride={self.stride}, groups={self.groups}, dcnv2={self.modulated}"


def convert_to_deform_conv(module: nn.Module, modulated: bool, deformable_groups: int) -> int:
    """Replace every 3x3 ``nn.Conv2d`` inside ``module`` by a :class:`TimmDeformConv2d`;
    returns how many were replaced."""
    count = 0
    for name, child in module.named_children():
        if type(child) is nn.Conv2d and child.kernel_size == (3, 3):
            setattr(module, name, TimmDeformConv2d(child, modulated, deformable_groups))
            count += 1
        else:
            count += convert_to_deform_conv(child, modulated, deformable_groups)
    return count


_NORMS = {"FrozenBN": FrozenBatchNorm2d, "SyncBN": LongTailSyncBatchNorm,
          "naiveSyncBN": NaiveSyncBatchNorm}  # fmt: skip


def convert_batchnorm(module: nn.Module, norm: str, where: str = "") -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` of ``module`` by the ``norm`` layer (a key of
    ``_NORMS``), statistics and affine parameters copied. Other BatchNorm subclasses (e.g.
    timm's BatchNormAct2d, which fuses an activation) are rejected rather than altered."""
    if norm == "":
        return module
    if type(module) is nn.BatchNorm2d:
        new = _NORMS[norm](module.num_features, eps=module.eps)
        if norm != "FrozenBN":
            new.momentum = module.momentum
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).data.copy_(getattr(module, name).data)
        return new
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise ValueError(
            f"MODEL.TIMM.NORM {norm!r}: {where or 'module'} is a {type(module).__name__}; only "
            "nn.BatchNorm2d layers can be converted (use NORM '' for this model)"
        )
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child, norm, f"{where}.{name}".lstrip(".")))
    return module


class TimmBackbone(Backbone):
    """A timm ``features_only`` model as a detectron2 backbone with outputs ``res2``..``res5``
    (strides 4..32); ``freeze_at``, ``norm`` and ``deform_*`` as ``MODEL.BACKBONE.FREEZE_AT``,
    ``MODEL.TIMM.NORM`` and ``MODEL.TIMM.DEFORM_*``.
    Input (N, 3, H, W) -> {"res2": (N, C2, H/4, W/4), ..., "res5": (N, C5, H/32, W/32)}."""

    def __init__(self, name: str, in_chans: int = 3, pretrained_file: str = "",
                 freeze_at: int = 0, norm: str = "", drop_path_rate: float = 0.0,
                 deform_on_per_stage=(False,) * 4, deform_modulated: bool = True,
                 deform_num_groups: int = 1):  # fmt: skip
        super().__init__()
        import timm

        kwargs = {"features_only": True, "in_chans": in_chans}
        if drop_path_rate > 0:
            kwargs["drop_path_rate"] = drop_path_rate
        if pretrained_file:  # timm's file source, never its hub or URL
            overlay = {"file": pretrained_file, "source": "", "url": "", "hf_hub_id": ""}
            kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
        self.body = timm.create_model(name, **kwargs)
        info = self.body.feature_info
        by_stride = {r: i for i, r in enumerate(info.reduction())}
        missing = [s for s in (4, 8, 16, 32) if s not in by_stride]
        if missing:
            raise ValueError(
                f"MODEL.TIMM.NAME {name!r} has feature strides {info.reduction()}; "
                f"build_timm_fpn_backbone needs 4, 8, 16 and 32 (missing {missing})"
            )
        self._indices = {f"res{int(math.log2(s))}": by_stride[s] for s in (4, 8, 16, 32)}
        self._out_features = list(self._indices)
        self._out_feature_strides = {f"res{int(math.log2(s))}": s for s in (4, 8, 16, 32)}
        self._out_feature_channels = {k: info.channels()[i] for k, i in self._indices.items()}
        convert_batchnorm(self.body, norm)
        stages = [info.module_name(i).replace(".", "_") for i in self._indices.values()]
        for stage, deform in zip(stages, deform_on_per_stage):
            if deform and not convert_to_deform_conv(
                getattr(self.body, stage), deform_modulated, deform_num_groups
            ):
                raise ValueError(f"MODEL.TIMM.DEFORM_ON_PER_STAGE: stage {stage!r} of {name!r} "
                                 "has no 3x3 nn.Conv2d to make deformable")  # fmt: skip
        self._freeze(freeze_at, stages)

    def _freeze(self, freeze_at: int, stage_modules) -> None:
        """Freeze the stem (freeze_at >= 1) and res2..res{freeze_at}: no gradients, FrozenBN."""
        if freeze_at <= 0:
            return
        children = [n for n, _ in self.body.named_children()]
        missing = [m for m in stage_modules if m not in children]
        if missing:
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT: stage modules {missing} of this timm "
                             f"model are not top-level modules ({children})")  # fmt: skip
        last = children.index(stage_modules[min(freeze_at, 5) - 2]) if freeze_at >= 2 else (
            children.index(stage_modules[0]) - 1)  # fmt: skip
        for name in children[: last + 1]:
            child = getattr(self.body, name)
            for p in child.parameters():
                p.requires_grad = False
            setattr(self.body, name, FrozenBatchNorm2d.convert_frozen_batchnorm(child))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.body(x)
        return {k: feats[i] for k, i in self._indices.items()}


class LongTailFPN(FPN):
    """detectron2's FPN whose top-down 2x upsampling is ``upsamplers[i]`` (e.g. CARAFE)
    instead of nearest interpolation; ``upsamplers`` has one module per top-down step, from
    the coarsest level down. Other arguments as ``FPN``."""

    def __init__(self, *args, upsamplers: nn.ModuleList, **kwargs):
        super().__init__(*args, **kwargs)
        if len(upsamplers) != len(self.in_features) - 1:
            raise ValueError(f"LongTailFPN: {len(upsamplers)} upsamplers for "
                             f"{len(self.in_features)} levels")  # fmt: skip
        self.upsamplers = upsamplers

    def forward(self, x):
        bottom_up = self.bottom_up(x)
        prev = self.lateral_convs[0](bottom_up[self.in_features[-1]])
        results = [self.output_convs[0](prev)]
        steps = zip(self.lateral_convs[1:], self.output_convs[1:], self.upsamplers)
        for idx, (lateral_conv, output_conv, upsample) in enumerate(steps, start=1):
            prev = lateral_conv(bottom_up[self.in_features[-idx - 1]]) + upsample(prev)
            if self._fuse_type == "avg":
                prev = prev / 2
            results.insert(0, output_conv(prev))
        if self.top_block is not None:
            name = self.top_block.in_feature
            source = bottom_up[name] if name in bottom_up else results[
                self._out_features.index(name)]  # fmt: skip
            results.extend(self.top_block(source))
        return dict(zip(self._out_features, results))


def _fpn(cfg, bottom_up: Backbone) -> FPN:
    fpn = cfg.MODEL.FPN
    kwargs = dict(bottom_up=bottom_up, in_features=fpn.IN_FEATURES, out_channels=fpn.OUT_CHANNELS,
                  norm=fpn.NORM, top_block=LastLevelMaxPool(), fuse_type=fpn.FUSE_TYPE)  # fmt: skip
    if fpn.UPSAMPLE_TYPE == "nearest":
        return FPN(**kwargs)
    steps = len(fpn.IN_FEATURES) - 1
    ups = nn.ModuleList(carafe_from_cfg(fpn, fpn.OUT_CHANNELS) for _ in range(steps))
    return LongTailFPN(upsamplers=ups, **kwargs)


@BACKBONE_REGISTRY.register()
def build_longtail_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """detectron2's ResNet-FPN, with ``MODEL.FPN.UPSAMPLE_TYPE``."""
    return _fpn(cfg, build_resnet_backbone(cfg, input_shape))


def build_timm_bottom_up(cfg, input_shape: ShapeSpec) -> TimmBackbone:
    """The :class:`TimmBackbone` of ``MODEL.TIMM`` (and ``MODEL.BACKBONE.FREEZE_AT``)."""
    t = cfg.MODEL.TIMM
    return TimmBackbone(t.NAME, input_shape.channels, t.PRETRAINED_FILE,
                        cfg.MODEL.BACKBONE.FREEZE_AT, t.NORM, t.DROP_PATH_RATE,
                        t.DEFORM_ON_PER_STAGE, t.DEFORM_MODULATED, t.DEFORM_NUM_GROUPS)  # fmt: skip


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """A timm model (``MODEL.TIMM``) + FPN (``MODEL.FPN``, ``UPSAMPLE_TYPE`` included)."""
    return _fpn(cfg, build_timm_bottom_up(cfg, input_shape))
