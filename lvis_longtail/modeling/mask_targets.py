"""The mask branch's contract: one target structure per batch, and what a mask head provides.

An ROI heads' ``_forward_mask`` is pool -> ``mask_head.train_outputs`` ->
``mask_head.mask_losses`` (+ the MaskIoU head's losses), with every target built once by
:func:`build_mask_targets`; at inference, ``mask_head.predict_masks``. Heads are given each
RoI's class (GT in training, predicted at inference) and return only that class's mask
logits, never the (R, K, M, M) of every class. A mask head takes part by providing the
methods of :class:`MaskHeadContract` (the last two only for HTC's mask information flow;
:func:`has_mask_contract` checks), e.g. by deriving from
:class:`~lvis_longtail.modeling.mask_head.LongTailMaskRCNNConvUpsampleHead`.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol

import torch
from detectron2.layers import cat
from detectron2.structures import Instances

from lvis_longtail.modeling.mask_levels import MIN_AREA_RATIO, gt_area_ratios, gt_mask_areas
from lvis_longtail.modeling.mask_scoring import gt_area_fraction

__all__ = ["MaskHeadContract", "MaskHeadOutputs", "MaskTargets", "build_mask_targets"]


@dataclass
class MaskTargets:
    """Targets of the R foreground proposals of a batch (concatenated over images).

    Attributes:
        masks: (R, M, M) bool, each GT mask cropped to its proposal and resized to M.
        classes: (R,) int64 GT classes.
        area_ratios: (R,) fp32 ``clamp(A_mask / A_gt_box, MIN_AREA_RATIO, 1)`` of the matched
            GT (area-ratio level assignment), or None when not requested.
        area_fractions: (R,) fp32 fraction of the GT mask inside the proposal (Mask Scoring's
            IoU targets), or None when not requested.
    """

    masks: torch.Tensor
    classes: torch.Tensor
    area_ratios: Optional[torch.Tensor] = None
    area_fractions: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.classes.numel()


@dataclass
class MaskHeadOutputs:
    """What a mask head computes in training.

    Attributes:
        logits: (R, M, M) mask logits of each RoI's class (its GT class; the one channel of a
            class-agnostic head).
        boundary_logits: (R, M, M) boundary logits, or None (no boundary branch).
    """

    logits: torch.Tensor
    boundary_logits: Optional[torch.Tensor] = None


class MaskHeadContract(Protocol):
    """The methods an ROI heads' mask branch calls on its mask head."""

    def output_side(self, pooled_side: int) -> int:
        """M, the side of the mask logits for S x S pooled RoI features."""

    def predict_masks(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(R, C, S, S) RoI features, (R,) predicted classes -> (R, 1, M, M) mask logits of
        each RoI's class (inference)."""

    def train_outputs(self, x: torch.Tensor, classes: torch.Tensor) -> MaskHeadOutputs:
        """(R, C, S, S) RoI features, (R,) GT classes -> the training outputs."""

    def mask_losses(
        self, outputs: MaskHeadOutputs, targets: MaskTargets
    ) -> Dict[str, torch.Tensor]:
        """The head's loss dict (every term present, zero without positives)."""

    # Needed only by HTC's mask information flow (LongTailHTCROIHeads):

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, S, S) RoI features -> (R, D, S, S) features of the head's convs, before
        upsampling."""

    def predict_masks_from_convs(self, f: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """``predict_masks`` from (R, D, S, S) ``conv_features``."""


MASK_CONTRACT_METHODS = ("output_side", "predict_masks", "train_outputs", "mask_losses")


def has_mask_contract(head) -> bool:
    """Whether ``head`` provides the methods of :class:`MaskHeadContract` that every ROI heads
    call (HTC's mask information flow needs the last two as well)."""
    return all(callable(getattr(head, name, None)) for name in MASK_CONTRACT_METHODS)


def build_mask_targets(
    instances: List[Instances],
    mask_side_len: int,
    device: torch.device,
    *,
    area_ratios: bool = False,
    area_fractions: bool = False,
    min_ratio: float = MIN_AREA_RATIO,
) -> MaskTargets:
    """Build the mask targets of a batch once.

    Args:
        instances: per-image foreground proposals with ``proposal_boxes``, ``gt_classes``,
            ``gt_masks`` (BitMasks or PolygonMasks) and ``gt_boxes``; images without
            proposals are skipped (they may lack the GT fields).
        mask_side_len: M.
        device: device of the returned tensors.
        area_ratios: also compute :attr:`MaskTargets.area_ratios`.
        area_fractions: also compute :attr:`MaskTargets.area_fractions`.
        min_ratio: floor of the area ratios.

    Returns:
        The :class:`MaskTargets` (R = 0 gives empty tensors of the right shapes).
    """
    nonempty = [inst for inst in instances if len(inst) > 0]
    masks, classes, ratios, fractions = [], [], [], []
    for inst in nonempty:
        crop = inst.gt_masks.crop_and_resize(inst.proposal_boxes.tensor, mask_side_len)
        # BitMasks and PolygonMasks give bool; a float rasterization is thresholded.
        crop = (crop if crop.dtype == torch.bool else crop > 0.5).to(device=device)
        masks.append(crop)
        classes.append(inst.gt_classes.to(device=device, dtype=torch.int64))
        if area_ratios:
            ratios.append(gt_area_ratios([inst], min_ratio).to(device))
        if area_fractions:
            proposal_area = inst.proposal_boxes.area().to(device)
            fractions.append(gt_area_fraction(crop, proposal_area, gt_mask_areas(inst).to(device)))
    empty = torch.zeros((0,), dtype=torch.float32, device=device)
    masks.append(torch.zeros((0, mask_side_len, mask_side_len), dtype=torch.bool, device=device))
    classes.append(torch.zeros((0,), dtype=torch.int64, device=device))
    return MaskTargets(
        masks=cat(masks, dim=0),
        classes=cat(classes, dim=0),
        area_ratios=cat(ratios + [empty], dim=0) if area_ratios else None,
        area_fractions=cat(fractions + [empty], dim=0) if area_fractions else None,
    )
