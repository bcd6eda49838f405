"""Area-ratio-aware FPN level assignment of mask RoIs (LVIS 2020 1st place, Eq. 1).

detectron2 (FPN paper Eq. 1) pools an RoI of size w x h from level
``k = clamp(floor(k0 + log2(sqrt(w h) / 224)), k_min, k_max)``, k0 = 4. The report adds the
ratio ``r = A_mask / A_box`` of the instance: ``k = clamp(floor(k0 + log2(sqrt(w h r) / 224)),
k_min, k_max)``, so a large box around a thin object is pooled from a finer level. The
report does not print the equation in full; this is the reconstruction of
docs/methods.md, "Area-ratio level assignment" (k0 and 224 are the ``ROIPooler``
arguments, so they stay configurable in code). ``r = 1`` is exactly detectron2's rule.

* Training: r of each positive proposal's matched GT (:func:`gt_area_ratios`).
* Test: r is unknown. Either r = 1, or two passes (:func:`two_pass_mask_logits`): predict
  with the box rule, estimate r from the predicted mask, re-pool and re-predict the RoIs
  whose level changed.

Ratios are clamped into ``[MIN_AREA_RATIO, 1]``: a GT whose mask is empty inside its box
(r = 0) or a predicted mask with no pixel above 0.5 is treated as r = 0.01, which moves an
RoI at most floor(log2(10)) + 1 = 4 levels finer (then clamped to the finest level);
r > 1 (overlapping polygons, masks spilling out of their box) is treated as 1.
"""

from typing import Callable, List, Optional, Tuple

import torch
from detectron2.layers import cat, nonzero_tuple
from detectron2.modeling.poolers import ROIPooler, convert_boxes_to_pooler_format
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

__all__ = [
    "MIN_AREA_RATIO",
    "AreaRatioROIPooler",
    "assign_boxes_to_levels_by_area",
    "gt_area_ratios",
    "gt_mask_areas",
    "plain_pool_at_levels",
    "pool_at_levels",
    "pooler_levels",
    "predicted_area_ratios",
    "two_pass_mask_logits",
    "two_pass_pooled",
]

MIN_AREA_RATIO = 0.01


def gt_mask_areas(instances: Instances) -> torch.Tensor:
    """(N,) fp32 area in pixels of each ``gt_masks`` entry: pixel count of BitMasks, shoelace
    area (summed over the polygons of an instance) of PolygonMasks."""
    masks = instances.gt_masks
    device = instances.gt_boxes.device
    if isinstance(masks, BitMasks):
        return masks.tensor.flatten(1).sum(1).to(device=device, dtype=torch.float32)
    if isinstance(masks, PolygonMasks):
        if len(masks) == 0:
            return torch.zeros((0,), dtype=torch.float32, device=device)
        return masks.area().to(device=device, dtype=torch.float32)
    raise TypeError(f"gt_masks of type {type(masks).__name__} have no area")


def gt_area_ratios(instances: List[Instances], min_ratio: float = MIN_AREA_RATIO) -> torch.Tensor:
    """(R,) ``clamp(A_mask / A_gt_box, min_ratio, 1)`` of the GT matched to each proposal,
    concatenated over images. Needs the ``gt_masks`` and ``gt_boxes`` fields that
    ``label_and_sample_proposals`` copies onto proposals (images without proposals, which
    may lack them, are skipped). A degenerate GT box (area 0) gets r = 1 (the box rule)."""
    ratios = []
    for inst in instances:
        if len(inst) == 0:
            continue
        box_area = inst.gt_boxes.area().float()
        mask_area = gt_mask_areas(inst)
        ratio = torch.where(box_area > 0, mask_area / box_area.clamp(min=1e-6), 1.0)
        ratios.append(ratio.clamp(min=min_ratio, max=1.0))
    return cat(ratios, dim=0) if ratios else torch.zeros((0,))


def predicted_area_ratios(
    mask_logits: torch.Tensor, classes: torch.Tensor, min_ratio: float = MIN_AREA_RATIO
) -> torch.Tensor:
    """(R,) estimated r = fraction of the predicted mask above 0.5, clamped to [min_ratio, 1].

    Args:
        mask_logits: (R, K or 1, M, M) mask logits (the M x M mask spans the box).
        classes: (R,) predicted classes (ignored if class-agnostic).
    """
    if mask_logits.size(1) > 1:
        rows = torch.arange(mask_logits.size(0), device=mask_logits.device)
        mask_logits = mask_logits[rows, classes]
    else:
        mask_logits = mask_logits[:, 0]
    return (mask_logits > 0).flatten(1).float().mean(1).clamp(min=min_ratio, max=1.0)


def assign_boxes_to_levels_by_area(
    box_lists: List[Boxes],
    area_ratios: Optional[torch.Tensor],
    min_level: int,
    max_level: int,
    canonical_box_size: int,
    canonical_level: int,
) -> torch.Tensor:
    """detectron2's ``assign_boxes_to_levels`` with sqrt(w h r) in place of sqrt(w h).

    Args:
        box_lists: N Boxes, M boxes in total.
        area_ratios: (M,) r per box in (0, 1], or None for r = 1 (the box rule).
        min_level, max_level, canonical_box_size, canonical_level: as ``ROIPooler``.

    Returns:
        (M,) int64 level index minus ``min_level``.
    """
    areas = cat([boxes.area() for boxes in box_lists])
    if area_ratios is not None:
        areas = areas * area_ratios.to(areas)
    # Same form (and 1e-8) as detectron2, so r = 1 reproduces its levels bit for bit.
    levels = torch.floor(
        canonical_level + torch.log2(torch.sqrt(areas) / canonical_box_size + 1e-8)
    )
    return levels.clamp(min=min_level, max=max_level).to(torch.int64) - min_level


def pooler_levels(
    pooler: ROIPooler, box_lists: List[Boxes], area_ratios: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """(M,) level offsets (0 = ``pooler.min_level``) of the boxes for any ``ROIPooler``
    (detectron2's rule when ``area_ratios`` is None)."""
    return assign_boxes_to_levels_by_area(
        box_lists,
        area_ratios,
        pooler.min_level,
        pooler.max_level,
        pooler.canonical_box_size,
        pooler.canonical_level,
    )


def pool_at_levels(
    pooler: ROIPooler, x: List[torch.Tensor], pooler_boxes: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    """Pool (M, 5) boxes in pooler format (batch index, x0, y0, x1, y1) from the given (M,)
    level offsets (what ``ROIPooler.forward`` does after assigning levels). A pooler with a
    ``pool_at_levels`` method of its own (e.g. deformable RoI pooling, which adds a second,
    shifted pass) is used through it, so the mask branch never bypasses a pooler's own
    computation. Returns (M, C, S, S)."""
    own = getattr(pooler, "pool_at_levels", None)
    if own is not None:
        return own(x, pooler_boxes, levels)
    return plain_pool_at_levels(pooler, x, pooler_boxes, levels)


def plain_pool_at_levels(
    pooler: ROIPooler, x: List[torch.Tensor], pooler_boxes: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    """:func:`pool_at_levels` with ``pooler``'s level poolers only."""
    assert len(x) == len(pooler.level_poolers), "one feature map per pooler level"
    num_boxes, channels = pooler_boxes.size(0), x[0].shape[1]
    if len(pooler.level_poolers) == 1:
        return pooler.level_poolers[0](x[0], pooler_boxes)
    out = x[0].new_zeros((num_boxes, channels) + tuple(pooler.output_size))
    for level, level_pooler in enumerate(pooler.level_poolers):
        inds = nonzero_tuple(levels == level)[0]
        if inds.numel() > 0:
            out.index_put_((inds,), level_pooler(x[level], pooler_boxes[inds]))
    return out


class AreaRatioROIPooler(ROIPooler):
    """``ROIPooler`` whose level assignment can take a per-box area ratio
    (:func:`assign_boxes_to_levels_by_area`). Without ratios it is detectron2's pooler."""

    def assign_levels(
        self, box_lists: List[Boxes], area_ratios: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(M,) level offsets (0 = ``min_level``) of the boxes."""
        return pooler_levels(self, box_lists, area_ratios)

    def pool_at_levels(
        self, x: List[torch.Tensor], pooler_boxes: torch.Tensor, levels: torch.Tensor
    ) -> torch.Tensor:
        """:func:`plain_pool_at_levels` with this pooler."""
        return plain_pool_at_levels(self, x, pooler_boxes, levels)

    def forward(
        self,
        x: List[torch.Tensor],
        box_lists: List[Boxes],
        area_ratios: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            x: feature maps, as ``ROIPooler``.
            box_lists: N Boxes, M boxes in total.
            area_ratios: (M,) r per box, or None for the box rule.

        Returns:
            (M, C, S, S) pooled features.
        """
        if len(box_lists) == 0 or sum(len(b) for b in box_lists) == 0:
            return x[0].new_zeros((0, x[0].shape[1]) + tuple(self.output_size))
        pooler_boxes = convert_boxes_to_pooler_format(box_lists)
        return self.pool_at_levels(x, pooler_boxes, self.assign_levels(box_lists, area_ratios))


def two_pass_mask_logits(
    pooler: AreaRatioROIPooler,
    x: List[torch.Tensor],
    box_lists: List[Boxes],
    classes: torch.Tensor,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    min_ratio: float = MIN_AREA_RATIO,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-pass test-time area-ratio level assignment (inference: updates in place, so call it
    under ``torch.no_grad()``).

    Pass 1 pools with the box rule (r = 1) and predicts; r is estimated as the fraction of
    the predicted mask of each RoI's class above 0.5 (:func:`predicted_area_ratios`); only
    RoIs whose level changes with that r are pooled again and predicted again.

    Args:
        pooler: the mask pooler.
        x: feature maps.
        box_lists: N Boxes (predicted boxes), M in total.
        classes: (M,) predicted classes.
        predict: (m, C, S, S) RoI features and their (m,) classes -> (m, K or 1, 2S, 2S)
            mask logits (e.g. the mask head's ``predict_masks``: (m, 1, 2S, 2S) of the
            given classes).
        min_ratio: floor of the estimated r.

    Returns:
        The final (M, C, S, S) RoI features, the final (M, K or 1, 2S, 2S) mask logits and
        the (M,) bool mask of the RoIs that were re-pooled.
    """
    pooler_boxes = convert_boxes_to_pooler_format(box_lists)

    def pool(boxes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return pool_at_levels(pooler, x, boxes, levels)

    return two_pass_pooled(pooler, pool, pooler_boxes, classes, predict, min_ratio)


def two_pass_pooled(
    pooler: ROIPooler,
    pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pooler_boxes: torch.Tensor,
    classes: torch.Tensor,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    min_ratio: float = MIN_AREA_RATIO,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`two_pass_mask_logits` on (M, 5) boxes in pooler format, pooling with
    ``pool(pooler_boxes, levels) -> (m, C, S, S)`` (which may also fuse per-image features
    into the RoI features); ``pooler`` gives the level rule. Same returns."""
    box_lists = [Boxes(pooler_boxes[:, 1:])]
    levels = pooler_levels(pooler, box_lists)
    features = pool(pooler_boxes, levels)
    logits = predict(features, classes)
    ratios = predicted_area_ratios(logits, classes, min_ratio)
    new_levels = pooler_levels(pooler, box_lists, ratios)
    changed = new_levels != levels
    if changed.any():
        inds = nonzero_tuple(changed)[0]
        new_features = pool(pooler_boxes[inds], new_levels[inds])
        # In place (inference only): no second (M, ...) copy of features and logits.
        features.index_put_((inds,), new_features)
        logits.index_put_((inds,), predict(new_features, classes[inds]))
    return features, logits, changed
