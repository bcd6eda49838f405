"""Detection post-processing of lvis_longtail: class-wise hard NMS or Soft-NMS.

Soft-NMS (Bodla et al., ICCV 2017, Algorithm 1): instead of discarding every box that
overlaps the current top box M by IoU >= N_t, decay its score by f(IoU(M, b_i)):

* linear:   s_i <- s_i * (1 - IoU)          if IoU >= N_t, else unchanged;
* gaussian: s_i <- s_i * exp(-IoU^2 / sigma) for every remaining box.

then pick the next highest (decayed) score, until no box is left. Boxes whose score falls
below ``min_score`` are dropped (the usual implementations' pruning; the paper keeps them
all). Classes are independent (per-class Soft-NMS, as detectron2's ``batched_nms`` for hard
NMS).

:func:`batched_soft_nms` runs all classes at once: the boxes are laid out in a padded
(classes, max boxes per class) tensor, and each iteration selects the top box of *every*
class, so the Python loop runs ``max boxes per class`` times, never over classes.

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


def _pairwise_row_iou(top: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of each row's box ``top`` (C, 4) with that row's boxes ``boxes`` (C, N, 4) ->
    (C, N); same formula as torchvision's ``box_iou`` (no +1, union clamped)."""
    lt = torch.maximum(top[:, None, :2], boxes[..., :2])
    rb = torch.minimum(top[:, None, 2:], boxes[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_top = (top[:, 2:] - top[:, :2]).clamp(min=0).prod(-1)
    area = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_top[:, None] + area - inter).clamp(min=1e-12)


def batched_soft_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, params: SoftNMSParams
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS of each category independently, all categories at once.

    Ties are broken by the lower input index (within a class and in the output order).

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
    empty = torch.zeros((0,), dtype=torch.int64, device=device)
    alive_in = scores >= params.min_score
    if not bool(alive_in.any()):
        return empty, scores.new_zeros((0,))
    index = torch.nonzero(alive_in).squeeze(1)
    cls = idxs[index]
    # Padded layout: row = category (only those present), columns = its boxes by input index.
    uniq, row = torch.unique(cls, return_inverse=True)
    order = torch.argsort(row, stable=True)  # by row, then input index
    index, row = index[order], row[order]
    counts = torch.bincount(row, minlength=len(uniq))
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(len(index), device=device) - starts[row]
    num_rows, width = len(uniq), int(counts.max())
    pad_boxes = boxes.new_zeros((num_rows, width, 4))
    pad_boxes[row, col] = boxes[index].to(pad_boxes.dtype)
    cur = scores.new_full((num_rows, width), float("-inf"), dtype=torch.float32)
    cur[row, col] = scores[index].float()
    pad_index = torch.full((num_rows, width), -1, dtype=torch.int64, device=device)
    pad_index[row, col] = index
    alive = cur > float("-inf")
    rows = torch.arange(num_rows, device=device)

    kept_index, kept_score = [], []
    for _ in range(width):
        top_score, top = cur.max(dim=1)  # first maximum = lowest input index among ties
        has = alive[rows, top]
        kept_index.append(torch.where(has, pad_index[rows, top], -1))
        kept_score.append(top_score)
        alive[rows, top] = False
        cur[rows, top] = float("-inf")
        iou = _pairwise_row_iou(pad_boxes[rows, top], pad_boxes)
        if params.method == "linear":
            decay = torch.where(iou >= params.iou_thresh, 1.0 - iou, torch.ones_like(iou))
        else:
            decay = torch.exp(-(iou * iou) / params.sigma)
        cur = torch.where(alive & has[:, None], cur * decay, cur)
        alive &= cur >= params.min_score
        cur = torch.where(alive, cur, torch.full_like(cur, float("-inf")))
        if not bool(alive.any()):
            break
    kept_index = torch.stack(kept_index).flatten()
    kept_score = torch.stack(kept_score).flatten()
    valid = kept_index >= 0
    kept_index, kept_score = kept_index[valid], kept_score[valid]
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
