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
(classes, boxes per class) tensors (one per power-of-two group of class sizes), and each
iteration selects the top box of *every* class of a group, so the Python loops run over the
groups and the boxes of the largest class, never over classes.

:func:`longtail_fast_rcnn_inference` is detectron2's ``fast_rcnn_inference`` whose NMS step
is :func:`class_wise_suppression` (``MODEL.ROI_HEADS.NMS_TYPE``); with "hard" it is exactly
detectron2's.
"""

from dataclasses import dataclass
from typing import List, Tuple

import torch
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances

__all__ = [
    "NMS_TYPES",
    "SoftNMSParams",
    "batched_soft_nms",
    "class_wise_suppression",
    "longtail_fast_rcnn_inference",
    "longtail_fast_rcnn_inference_single_image",
]

NMS_TYPES = ("hard", "soft_linear", "soft_gaussian")


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


def _row_iou(top: torch.Tensor, top_area: torch.Tensor, boxes, areas) -> torch.Tensor:
    """IoU of each row's box ``top`` (C, 4) with that row's boxes ``boxes`` (C, N, 4) ->
    (C, N); same formula as torchvision's ``box_iou`` (no +1), areas precomputed."""
    lt = torch.maximum(top[:, None, :2], boxes[..., :2])
    rb = torch.minimum(top[:, None, 2:], boxes[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (top_area[:, None] + areas - inter).clamp(min=1e-12)


def _soft_nms_padded(boxes, scores, index, params: SoftNMSParams):
    """Soft-NMS of every row of a padded layout at once.

    Args:
        boxes: (C, W, 4) boxes of C categories, W columns (padding anywhere).
        scores: (C, W) fp32 scores, -inf at padding.
        index: (C, W) input index of each box (-1 at padding).

    Returns:
        (M,) input indices and (M,) scores at selection of the kept boxes, unordered.
    """
    num_rows, width = scores.shape
    rows = torch.arange(num_rows, device=scores.device)
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    areas = wh[..., 0] * wh[..., 1]
    alive = scores > float("-inf")
    neg_inf = torch.tensor(float("-inf"), device=scores.device)
    kept_index, kept_score = [], []
    for _ in range(width):
        top_score, top = scores.max(dim=1)  # first maximum = lowest input index among ties
        has = alive[rows, top]
        kept_index.append(torch.where(has, index[rows, top], -1))
        kept_score.append(top_score)
        alive[rows, top] = False
        iou = _row_iou(boxes[rows, top], areas[rows, top], boxes, areas)
        if params.method == "linear":
            decay = torch.where(iou >= params.iou_thresh, 1.0 - iou, torch.ones_like(iou))
        else:
            decay = torch.exp(-(iou * iou) / params.sigma)
        scores = scores * decay
        alive &= scores >= params.min_score
        scores = torch.where(alive, scores, neg_inf)
        if not bool(alive.any()):
            break
    kept_index, kept_score = torch.stack(kept_index).flatten(), torch.stack(kept_score).flatten()
    valid = kept_index >= 0
    return kept_index[valid], kept_score[valid]


def batched_soft_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, params: SoftNMSParams
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS of each category independently, all categories at once.

    The categories are laid out as padded (categories, boxes) tensors, one per group of
    categories with 2^(b-1) < boxes <= 2^b (so a category with 300 boxes does not make 1000
    categories with 2 boxes iterate 300 times); each group selects the top box of all its
    categories per step. The Python loops run over these <= log2(N) + 1 groups and over the
    steps, never over categories. Ties are broken by the lower input index (within a class
    and in the output order).

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
    alive_in = scores >= params.min_score
    if not bool(alive_in.any()):
        return torch.zeros((0,), dtype=torch.int64, device=device), scores.new_zeros((0,))
    index = torch.nonzero(alive_in).squeeze(1)
    _, row = torch.unique(idxs[index], return_inverse=True)
    order = torch.argsort(row, stable=True)  # by category, then input index
    index, row = index[order], row[order]
    counts = torch.bincount(row)
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(len(index), device=device) - starts[row]
    group = torch.ceil(torch.log2(counts.double())).long()  # per category
    kept_index, kept_score = [], []
    for g in torch.unique(group).tolist():
        members = torch.nonzero(group == g).squeeze(1)  # categories of this group
        local = torch.full_like(counts, -1)
        local[members] = torch.arange(len(members), device=device)
        sel = torch.nonzero(local[row] >= 0).squeeze(1)  # boxes of this group
        r, c = local[row[sel]], col[sel]
        width = int(counts[members].max())
        pad_boxes = boxes.new_zeros((len(members), width, 4), dtype=torch.float32)
        pad_boxes[r, c] = boxes[index[sel]].float()
        pad_scores = torch.full((len(members), width), float("-inf"), device=device)
        pad_scores[r, c] = scores[index[sel]].float()
        pad_index = torch.full((len(members), width), -1, dtype=torch.int64, device=device)
        pad_index[r, c] = index[sel]
        ki, ks = _soft_nms_padded(pad_boxes, pad_scores, pad_index, params)
        kept_index.append(ki)
        kept_score.append(ks)
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
        params = SoftNMSParams(nms_type[len("soft_"):], soft.sigma, soft.iou_thresh, soft.min_score)
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
