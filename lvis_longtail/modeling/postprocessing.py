"""Detection post-processing of lvis_longtail: class-wise hard NMS or Soft-NMS.

Soft-NMS (Bodla et al., ICCV 2017, Algorithm 1): instead of discarding every box that
overlaps the current top box M by IoU >= N_t, decay its score by f(IoU(M, b_i)):

* linear:   s_i <- s_i * (1 - IoU)          if IoU >= N_t, else unchanged;
* gaussian: s_i <- s_i * exp(-IoU^2 / sigma) for every remaining box.

then pick the next highest (decayed) score, until no box is left. Boxes whose score falls
below ``min_score`` are dropped (the usual implementations' pruning; the paper keeps them
all). Classes are independent (per-class Soft-NMS, as detectron2's ``batched_nms`` for hard
NMS).

:func:`batched_soft_nms` runs all classes at once: the boxes are laid out in padded
(classes, boxes per class) tensors, one per group of classes of similar size, and each step
selects the top box of *every* class of a group, so the Python loops run over the groups and
the boxes of each group's largest class, never over classes. The decay factors of a group
are computed once for all its within-class pairs, so a step is a max, a gather and a
multiply.

:func:`longtail_fast_rcnn_inference` is detectron2's ``fast_rcnn_inference`` whose NMS step
is :func:`class_wise_suppression` (``MODEL.ROI_HEADS.NMS_TYPE``); with "hard" it is exactly
detectron2's.
"""

import math
from dataclasses import dataclass
from typing import List, Tuple

import torch
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances

from lvis_longtail.config_check import NMS_TYPES

__all__ = [
    "NMS_TYPES",
    "SoftNMSParams",
    "batched_soft_nms",
    "class_wise_suppression",
    "longtail_fast_rcnn_inference",
    "longtail_fast_rcnn_inference_single_image",
]


@dataclass(frozen=True)
class SoftNMSParams:
    """Soft-NMS parameters (the ``SOFT_NMS`` config sub-nodes).

    Attributes:
        method: "linear" or "gaussian".
        sigma: Gaussian width (paper: 0.5).
        iou_thresh: N_t of the linear decay (paper: 0.3).
        min_score: boxes whose decayed score is below it are dropped (0.001).
    """

    method: str = "gaussian"
    sigma: float = 0.5
    iou_thresh: float = 0.3
    min_score: float = 1e-3

    def __post_init__(self):
        if self.method not in ("linear", "gaussian"):
            raise ValueError(f"Soft-NMS method {self.method!r} is not one of: linear, gaussian")
        if self.method == "gaussian" and not self.sigma > 0:
            raise ValueError(f"Soft-NMS sigma must be > 0, got {self.sigma}")

    @classmethod
    def from_config(cls, node, method: str) -> "SoftNMSParams":
        """From a ``SOFT_NMS`` config node (SIGMA, IOU_THRESH, MIN_SCORE) and a method."""
        return cls(method, float(node.SIGMA), float(node.IOU_THRESH), float(node.MIN_SCORE))


# Categories are grouped by size, largest first: group g holds the categories with
# (largest / ratio^(g+1), largest / ratio^g] boxes and runs as many steps as its largest one.
_GROUP_RATIO = 3
# A group's pairwise decay factors (categories x width x width) are computed once when they
# have at most this many elements (16 MiB in fp32); larger groups compute each step's row.
_PAIRWISE_LIMIT = 2**22


def _iou(a, b, area_a, area_b) -> torch.Tensor:
    """IoU of boxes ``a`` and ``b`` (broadcast, (..., 4) XYXY) with their areas (...): the
    formula of torchvision's ``box_iou`` (no +1), one coordinate at a time."""
    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    w = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0)
    h = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(min=0)
    inter = w * h
    return inter / (area_a + area_b - inter).clamp(min=1e-12)


def _decay(iou: torch.Tensor, params: SoftNMSParams) -> torch.Tensor:
    """Soft-NMS factor f(IoU) of the method of ``params``."""
    if params.method == "linear":
        return torch.where(iou >= params.iou_thresh, 1.0 - iou, torch.ones_like(iou))
    return torch.exp(-(iou * iou) / params.sigma)


def _soft_nms_rows(boxes, scores, params: SoftNMSParams):
    """Soft-NMS of every row of a padded layout at once.

    Each step selects the top box of every row and multiplies the row's scores by its
    decay factors; the selected box's own factor is NaN, so that it fails ``>= min_score``
    with the boxes decayed below it and leaves the row. The factors come from a (C, W, W)
    matrix computed once, or (above ``_PAIRWISE_LIMIT``) from the top box's IoU per step.

    Args:
        boxes: (C, W, 4) fp32 boxes of C categories in W columns.
        scores: (C, W) fp32 scores, -inf at padding.

    Returns:
        (T, C) column selected by each row at each step and (T, C) its score at selection
        (-inf: the row had no box left), T <= W.
    """
    num_rows, width = scores.shape
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    areas = wh[..., 0] * wh[..., 1]
    pairwise = num_rows * width * width <= _PAIRWISE_LIMIT
    rows = torch.arange(num_rows, device=scores.device)
    if pairwise:
        iou = _iou(boxes[:, :, None], boxes[:, None], areas[:, :, None], areas[:, None])
        decay = _decay(iou, params)
        decay.diagonal(dim1=1, dim2=2).fill_(float("nan"))
        decay, rows = decay.view(num_rows * width, width), rows * width
    neg_inf = scores.new_tensor(float("-inf"))
    tops, top_scores = [], []
    for step in range(width):
        top_score, top = scores.max(dim=1)  # first maximum = lowest input index among ties
        tops.append(top)
        top_scores.append(top_score)
        if pairwise:
            factor = decay.index_select(0, rows + top)
        else:
            iou = _iou(boxes[rows, top][:, None], boxes, areas[rows, top][:, None], areas)
            factor = _decay(iou, params).scatter_(1, top[:, None], float("nan"))
        scores = scores * factor
        scores = torch.where(scores >= params.min_score, scores, neg_inf)
        if step % 4 == 3 and not bool(scores.max() > neg_inf):
            break
    return torch.stack(tops), torch.stack(top_scores)


def batched_soft_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, params: SoftNMSParams
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS of each category independently, all categories at once.

    Boxes below ``min_score`` are dropped first. The categories, largest first, are laid
    out as padded (categories, boxes) tensors, one per group of sizes in
    (largest / 3^(g+1), largest / 3^g] (so a category with 300 boxes does not make 1000
    categories with 2 boxes iterate 300 times, and a few groups cover any size range); each
    step selects the top box of all categories of a group. The Python loops run over these
    groups and over the steps of each group's largest category (stopping early once every
    score is below ``min_score``), never over categories. Ties are broken by the lower input
    index (within a class and in the output order). Results equal the one-box-at-a-time
    algorithm in fp32: same IoU formula, same decay, the factors applied in the same order.

    Args:
        boxes: (N, 4) boxes, XYXY.
        scores: (N,) scores.
        idxs: (N,) int64 category of each box.
        params: method and parameters.

    Returns:
        keep: (M,) int64 indices into the inputs of the kept boxes, sorted by decayed score
            (descending, ties by index).
        new_scores: (M,) their decayed scores.
    """
    device = boxes.device
    index = torch.nonzero(scores >= params.min_score).squeeze(1)
    if index.numel() == 0:
        return torch.zeros((0,), dtype=torch.int64, device=device), scores.new_zeros((0,))
    _, row, counts = torch.unique(idxs[index], return_inverse=True, return_counts=True)
    by_size = torch.argsort(counts, descending=True, stable=True)
    rank_of = torch.empty_like(by_size)
    rank_of[by_size] = torch.arange(len(counts), device=device)
    rank = rank_of[row]
    order = torch.argsort(rank, stable=True)  # by category rank, then input index
    index, rank, counts = index[order], rank[order], counts[by_size]
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(len(index), device=device) - starts[rank]
    ratio = counts[0].double() / counts.double()
    group = torch.cummax(torch.floor(torch.log(ratio) / math.log(_GROUP_RATIO)).long(), 0).values
    sizes = torch.unique_consecutive(group, return_counts=True)[1]  # categories per group
    class_end = torch.cumsum(sizes, 0)
    class_start = class_end - sizes
    box_end = (starts + counts)[class_end - 1]
    bounds = torch.stack([class_start, class_end, counts[class_start], box_end]).T.tolist()
    kept_index, kept_score = [], []
    box_start = 0
    for c0, c1, width, b1 in bounds:
        sel = index[box_start:b1]
        r, c = rank[box_start:b1] - c0, col[box_start:b1]
        pad_boxes = boxes.new_zeros((c1 - c0, width, 4), dtype=torch.float32)
        pad_boxes[r, c] = boxes[sel].float()
        pad_scores = torch.full((c1 - c0, width), float("-inf"), device=device)
        pad_scores[r, c] = scores[sel].float()
        tops, top_scores = _soft_nms_rows(pad_boxes, pad_scores, params)
        valid = top_scores > float("-inf")
        kept_index.append(index[(starts[c0:c1] + tops)[valid]])
        kept_score.append(top_scores[valid])
        box_start = b1
    kept_index, kept_score = torch.cat(kept_index), torch.cat(kept_score)
    by_index = torch.argsort(kept_index)
    kept_index, kept_score = kept_index[by_index], kept_score[by_index]
    by_score = torch.argsort(kept_score, descending=True, stable=True)
    return kept_index[by_score], kept_score[by_score].to(scores.dtype)


def class_wise_suppression(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    nms_type: str,
    nms_thresh: float,
    soft: SoftNMSParams = SoftNMSParams(),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class suppression replacing detectron2's ``batched_nms`` step.

    Args:
        boxes, scores, classes: (N, 4), (N,), (N,) detections.
        nms_type: "hard" (``batched_nms`` at ``nms_thresh``), "soft_linear" or
            "soft_gaussian" (:func:`batched_soft_nms` with ``soft``'s parameters; its method
            is taken from ``nms_type``).
        nms_thresh: IoU threshold of hard NMS.
        soft: Soft-NMS parameters.

    Returns:
        keep (M,) indices sorted by score (descending) and their (M,) scores (decayed for
        Soft-NMS).
    """
    if nms_type == "hard":
        keep = batched_nms(boxes, scores, classes, nms_thresh)
        return keep, scores[keep]
    if nms_type in ("soft_linear", "soft_gaussian"):
        params = SoftNMSParams(
            nms_type[len("soft_") :], soft.sigma, soft.iou_thresh, soft.min_score
        )
        return batched_soft_nms(boxes, scores, classes, params)
    raise ValueError(f"NMS type {nms_type!r} is not one of: {', '.join(NMS_TYPES)}")


def longtail_fast_rcnn_inference_single_image(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    image_shape: Tuple[int, int],
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
    nms_type: str = "hard",
    soft: SoftNMSParams = SoftNMSParams(),
) -> Tuple[Instances, torch.Tensor]:
    """detectron2's ``fast_rcnn_inference_single_image`` with :func:`class_wise_suppression`
    as its NMS step.

    Args:
        boxes: (R, K*4) or (R, 4) predicted boxes.
        scores: (R, K+1) class scores, background last.
        image_shape: (height, width) to clip the boxes to.
        score_thresh, nms_thresh, topk_per_image: as detectron2.
        nms_type, soft: see :func:`class_wise_suppression`.

    Returns:
        Instances (pred_boxes, scores, pred_classes) and the (M,) row of each in ``boxes``.
    """
    valid_mask = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    if not valid_mask.all():
        boxes, scores = boxes[valid_mask], scores[valid_mask]
    scores = scores[:, :-1]
    num_bbox_reg_classes = boxes.shape[1] // 4
    boxes = Boxes(boxes.reshape(-1, 4))
    boxes.clip(image_shape)
    boxes = boxes.tensor.view(-1, num_bbox_reg_classes, 4)
    filter_mask = scores > score_thresh
    filter_inds = filter_mask.nonzero()
    boxes = boxes[filter_inds[:, 0], 0] if num_bbox_reg_classes == 1 else boxes[filter_mask]
    scores = scores[filter_mask]
    keep, scores = class_wise_suppression(
        boxes, scores, filter_inds[:, 1], nms_type, nms_thresh, soft
    )
    if topk_per_image >= 0:
        keep, scores = keep[:topk_per_image], scores[:topk_per_image]
    boxes, filter_inds = boxes[keep], filter_inds[keep]
    result = Instances(image_shape)
    result.pred_boxes = Boxes(boxes)
    result.scores = scores
    result.pred_classes = filter_inds[:, 1]
    return result, filter_inds[:, 0]


def longtail_fast_rcnn_inference(
    boxes: List[torch.Tensor],
    scores: List[torch.Tensor],
    image_shapes: List[Tuple[int, int]],
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
    nms_type: str = "hard",
    soft: SoftNMSParams = SoftNMSParams(),
) -> Tuple[List[Instances], List[torch.Tensor]]:
    """detectron2's ``fast_rcnn_inference`` (per image lists, same returns) with the NMS
    step of :func:`longtail_fast_rcnn_inference_single_image`."""
    results = [
        longtail_fast_rcnn_inference_single_image(
            b, s, shape, score_thresh, nms_thresh, topk_per_image, nms_type, soft
        )
        for b, s, shape in zip(boxes, scores, image_shapes)
    ]
    return [r[0] for r in results], [r[1] for r in results]
