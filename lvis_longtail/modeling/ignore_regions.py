"""Ignore regions in the RPN and the ROI heads (crowd boxes, pseudo boxes of unannotated
objects, "don't care" areas).

An anchor or proposal that would be **background** and overlaps one of its image's ignore
boxes by at least ``THRESH`` (``METRIC`` "iou", or "iof": intersection over the
anchor's / proposal's own area) is *ignored*: label -1, never sampled, no loss.
Anchors/proposals matched to a real GT (or already ignored by the matcher) are unchanged,
and ignore boxes are never added as proposals. Keys: ``MODEL.RPN.IGNORE`` and
``MODEL.ROI_HEADS.IGNORE`` (docs/config_keys.md).

How the boxes reach the heads. detectron2's ``GeneralizedRCNN`` passes only the GT
``Instances`` to the RPN and the ROI heads, and ignore boxes cannot be a field of those
(an ``Instances`` field has one row per GT; an image has a different number of ignore
boxes). :class:`LongTailRCNN` (``MODEL.META_ARCHITECTURE: LongTailRCNN``) is
``GeneralizedRCNN`` plus one step: in training, when the mapped batch carries
``ignore_boxes`` (:class:`~lvis_longtail.data.mapper.LongTailDatasetMapper`), it hands the
per-image boxes to every submodule that accepts them (:class:`IgnoreRegionsMixin`) for the
duration of that forward (:func:`ignore_regions`), then clears them. The heads' hooks are
detectron2's per-image sampling steps: ``RPN._subsample_labels`` (:class:`LongTailRPN`,
``MODEL.PROPOSAL_GENERATOR.NAME: LongTailRPN``), ``ROIHeads._sample_proposals`` (the
standard sampler and the first cascade stage) and ``CascadeROIHeads._match_and_label_boxes``
(cascade stages >= 1, which have no sampler: their ignored proposals are dropped from the
stage). With no ignore boxes in the batch nothing is overridden: the model is detectron2's.
"""

from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, pairwise_ioa, pairwise_iou
from torch import nn

from lvis_longtail.config_check import IGNORE_METRICS

__all__ = [
    "IGNORE_METRICS",
    "IgnoreRegionsMixin",
    "LongTailRCNN",
    "LongTailRPN",
    "ignore_mask",
    "ignore_regions",
]


def ignore_mask(boxes: Boxes, ignore: Boxes, metric: str, thresh: float) -> torch.Tensor:
    """Which boxes overlap an ignore box.

    Args:
        boxes: (R, 4) anchors or proposals.
        ignore: (M, 4) ignore boxes of the same image (M may be 0).
        metric: "iou", or "iof" (intersection over the area of each of ``boxes``).
        thresh: overlap at or above which a box is covered.

    Returns:
        (R,) bool: max overlap with an ignore box >= ``thresh`` (all False when M = 0).
    """
    if metric not in IGNORE_METRICS:
        raise ValueError(f"ignore-region METRIC {metric!r} is not one of {IGNORE_METRICS}")
    ignore = Boxes(ignore.tensor.to(device=boxes.tensor.device, dtype=boxes.tensor.dtype))
    if len(ignore) == 0 or len(boxes) == 0:
        return torch.zeros(len(boxes), dtype=torch.bool, device=boxes.tensor.device)
    if metric == "iou":
        overlap = pairwise_iou(ignore, boxes)  # (M, R)
    else:
        overlap = pairwise_ioa(ignore, boxes)  # intersection / area of `boxes`
    return overlap.amax(dim=0) >= thresh


class IgnoreRegionsMixin:
    """Holds the per-image ignore boxes of the current training forward (None outside one)
    and the queue of per-image masks that detectron2's per-image sampling steps consume."""

    ignore_metric: str = "iou"
    ignore_thresh: float = 0.5

    def set_ignore_boxes(self, boxes: Optional[List[Boxes]]) -> None:
        """Per-image (M_i, 4) ignore boxes for the next forward, or None to clear them."""
        self.__dict__["_ignore_boxes"] = boxes
        self.__dict__["_ignore_queue"] = None

    @property
    def ignore_boxes(self) -> Optional[List[Boxes]]:
        return self.__dict__.get("_ignore_boxes")

    def _ignore_masks(self, boxes_per_image: List[Boxes]) -> List[torch.Tensor]:
        """(R_i,) bool masks of ``boxes_per_image`` covered by each image's ignore boxes."""
        return [
            ignore_mask(b, ig, self.ignore_metric, self.ignore_thresh)
            for b, ig in zip(boxes_per_image, self.ignore_boxes)
        ]

    def _queue_masks(self, masks: Optional[List[torch.Tensor]]) -> None:
        self.__dict__["_ignore_queue"] = None if masks is None else iter(masks)

    def _next_mask(self) -> Optional[torch.Tensor]:
        """The next image's mask of the queue, or None when no queue is active."""
        queue: Optional[Iterator] = self.__dict__.get("_ignore_queue")
        return None if queue is None else next(queue)


@contextmanager
def ignore_regions(model: nn.Module, boxes: List[Boxes]):
    """Give ``boxes`` (one Boxes per image) to every :class:`IgnoreRegionsMixin` submodule of
    ``model`` for the duration of the block; raise if none accepts them."""
    holders = [m for m in model.modules() if isinstance(m, IgnoreRegionsMixin)]
    if not holders:
        raise ValueError(
            "the batch has 'ignore_boxes' but neither the proposal generator nor the ROI heads "
            "support ignore regions: use MODEL.PROPOSAL_GENERATOR.NAME LongTailRPN and "
            "lvis_longtail's ROI heads (LongTailROIHeads, LongTailCascadeROIHeads, "
            "LongTailHTCLiteROIHeads)"
        )
    for m in holders:
        m.set_ignore_boxes(boxes)
    try:
        yield holders
    finally:
        for m in holders:
            m.set_ignore_boxes(None)


@PROPOSAL_GENERATOR_REGISTRY.register()
class LongTailRPN(IgnoreRegionsMixin, RPN):
    """detectron2's ``RPN``; with ignore boxes, background anchors covered by one
    (``MODEL.RPN.IGNORE``) become -1 before the anchors are sampled."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["ignore_metric"] = cfg.MODEL.RPN.IGNORE.METRIC
        ret["ignore_thresh"] = cfg.MODEL.RPN.IGNORE.THRESH
        return ret

    @configurable
    def __init__(self, *, ignore_metric: str = "iou", ignore_thresh: float = 0.5, **kwargs):
        """
        Args:
            ignore_metric: "iou" or "iof" (:func:`ignore_mask`).
            ignore_thresh: overlap from which a background anchor is ignored.
            kwargs: as detectron2's ``RPN``.
        """
        super().__init__(**kwargs)
        self.ignore_metric = ignore_metric
        self.ignore_thresh = ignore_thresh

    @torch.no_grad()
    def label_and_sample_anchors(self, anchors, gt_instances):
        if self.ignore_boxes is None:
            return super().label_and_sample_anchors(anchors, gt_instances)
        all_anchors = Boxes.cat(anchors)
        self._queue_masks(self._ignore_masks([all_anchors] * len(gt_instances)))
        try:
            return super().label_and_sample_anchors(anchors, gt_instances)
        finally:
            self._queue_masks(None)

    def _subsample_labels(self, label):
        mask = self._next_mask()
        if mask is not None:
            label[(label == 0) & mask] = -1
        return super()._subsample_labels(label)


@META_ARCH_REGISTRY.register()
class LongTailRCNN(GeneralizedRCNN):
    """``GeneralizedRCNN`` that forwards each training image's ``ignore_boxes`` (a Boxes in
    the mapped image's coordinates) to the RPN and ROI heads (module docstring), and scales
    the losses of a batch of extra images by their ``loss_weight``
    (:mod:`lvis_longtail.data.extra_images`)."""

    # Read by lvis_longtail.config_check (which cannot import this class): this architecture
    # applies a batch's ``loss_weight``, so DATASETS.EXTRA_TRAIN may be used with it.
    supports_loss_weight = True

    def forward(self, batched_inputs):
        if not self.training:
            return super().forward(batched_inputs)
        weight = batch_loss_weight(batched_inputs)
        if not any("ignore_boxes" in x for x in batched_inputs):
            losses = super().forward(batched_inputs)
        else:
            empty = Boxes(torch.zeros((0, 4), device=self.device))
            boxes = [
                x["ignore_boxes"].to(self.device) if "ignore_boxes" in x else empty
                for x in batched_inputs
            ]
            with ignore_regions(self, boxes):
                losses = super().forward(batched_inputs)
        if weight != 1.0:  # a batch of extra images (DATASETS.EXTRA_TRAIN_LOSS_WEIGHT)
            losses = {k: v * weight for k, v in losses.items()}
        return losses


def batch_loss_weight(batched_inputs) -> float:
    """The ``loss_weight`` shared by a training batch's images (1.0 when absent).

    Raises:
        ValueError: the batch mixes weights (extra images need batches of one source:
            ``DATALOADER.ASPECT_RATIO_GROUPING True``).
    """
    weights = {float(x.get("loss_weight", 1.0)) for x in batched_inputs}
    if len(weights) > 1:
        raise ValueError(
            f"a training batch mixes images with loss weights {sorted(weights)}; with "
            "DATASETS.EXTRA_TRAIN keep DATALOADER.ASPECT_RATIO_GROUPING True (batches of one "
            "source)"
        )
    return weights.pop() if weights else 1.0
