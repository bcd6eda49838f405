"""TSD, task-aware spatial disentanglement (Song, Liu and Wang, *Revisiting the Sibling Head in
Object Detector*, CVPR 2020): the box branch classifies and regresses from two differently
placed samplings of each proposal instead of one shared RoI feature.

With ``MODEL.ROI_BOX_HEAD.TSD.ENABLED`` every box stage gets a :class:`TSDHead` next to its
ordinary ("sibling") box head and predictor. From the ordinary k x k RoIAlign feature F of a
proposal P = (x0, y0, x1, y1), size (w, h):

* a shared FC layer (``OFFSET_FC_DIM``, ReLU) feeds two offset MLPs (FC, ReLU, FC);
* classification: one (dx, dy) per output bin; bin (i, j) is sampled as RoIAlign's bin shifted
  by ``GAMMA`` (dx_ij w, dy_ij h) (deformable RoI pooling, :mod:`~lvis_longtail.layers.
  deform_roi_pool`), giving F_c;
* regression: one (dx, dy) per proposal, the translated proposal
  P_r = P + ``GAMMA`` (dx w, dy h, dx w, dy h), pooled again with RoIAlign, giving F_r (the
  same shift for every bin, so its gradient reaches (dx, dy));
* two towers of the box head's architecture (``ROI_BOX_HEAD.NAME``, 2 FC by default) read F_c
  and F_r; a :class:`LongTailFastRCNNOutputLayers` classifies on the first (any
  ``CLS_LOSS_NAME``, its own loss state) and regresses on the second, targets encoded relative
  to P_r (detached: P_r gets its gradient through the sampling and the localisation constraint).

Both samplings read the FPN level detectron2's rule gives P, in one pass. The last layer of
each offset MLP starts at zero: a new TSD head samples exactly F. The sibling head is trained
alongside on F (its losses are the usual ``loss_cls``/``loss_box_reg``) and is not run at
inference, where the TSD head gives the scores and the boxes (decoded against P_r).

Progressive constraints (``PC_CLS``, ``PC_LOC``), with s the sibling and t the TSD head:
``loss_tsd_pc_cls`` = mean over the sampled RoIs of relu(p_s + m_c - p_t), p the probability
of the RoI's label (background included) from each loss's ``predict_probs``, p_s detached,
m_c = min(``PC_CLS_MARGIN``, 1 - p_s); ``loss_tsd_pc_loc`` = mean over the positives of
relu(IoU_s + m_l - IoU_t), IoU of each head's decoded box with the matched GT, IoU_s detached,
m_l = min(``PC_LOC_MARGIN``, 1 - IoU_s).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.poolers import (
    ROIPooler,
    assign_boxes_to_levels,
    convert_boxes_to_pooler_format,
)
from detectron2.modeling.roi_heads.box_head import build_box_head
from detectron2.structures import Boxes, Instances
from fvcore.nn import weight_init
from torch import nn
from torch.nn import functional as F

from lvis_longtail.layers.deform_roi_pool import _deform_roi_align_levels
from lvis_longtail.modeling.fast_rcnn import LongTailFastRCNNOutputLayers

__all__ = [
    "TSDHead",
    "TSDOutputs",
    "aligned_iou",
    "attach_tsd",
    "pc_cls_loss",
    "pc_loc_loss",
    "translate_boxes",
    "with_proposal_boxes",
]


@dataclass
class TSDOutputs:
    """One box stage's TSD outputs for R proposals.

    Attributes:
        scores: (R, L) logits of the TSD classifier.
        deltas: (R, 4 or 4K) box deltas relative to ``boxes``.
        boxes: (R, 4) the translated proposals P_r (differentiable w.r.t. the offsets).
        sibling: the sibling predictor's (scores, deltas) on F, or None (inference).
    """

    scores: torch.Tensor
    deltas: torch.Tensor
    boxes: torch.Tensor
    sibling: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def predictions(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scores, deltas), the predictor's usual predictions."""
        return self.scores, self.deltas


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 when it is float64 (loss math never below fp32)."""
    return x if x.dtype == torch.float64 else x.float()


def translate_boxes(boxes: torch.Tensor, shifts: torch.Tensor, gamma: float) -> torch.Tensor:
    """(R, 4) boxes moved by ``gamma`` (dx w, dy h) for (R, 2) ``shifts`` (dx, dy), computed
    in fp32 (float64 for float64 input)."""
    boxes, shifts = _fp32(boxes), shifts.to(_fp32(boxes).dtype)
    move = gamma * shifts * (boxes[:, 2:] - boxes[:, :2])
    return boxes + torch.cat([move, move], dim=1)


def aligned_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(R,) IoU of the row-aligned (R, 4) boxes ``a`` and ``b`` (continuous coordinates,
    detectron2's convention), differentiable; a degenerate union gives 0."""
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    return inter / (area_a + area_b - inter).clamp(min=eps)


def pc_cls_loss(
    tsd_probs: torch.Tensor, sibling_probs: torch.Tensor, labels: torch.Tensor, margin: float
) -> torch.Tensor:
    """The classification progressive constraint: mean over R RoIs of
    relu(p_s + min(margin, 1 - p_s) - p_t), p_s / p_t the (R, K+1) sibling / TSD probability
    of each RoI's label in [0, K] (p_s detached). Zero, in the graph, for R = 0."""
    rows = torch.arange(labels.numel(), device=labels.device)
    p_t = _fp32(tsd_probs)[rows, labels]
    p_s = _fp32(sibling_probs)[rows, labels].detach()
    loss = F.relu(p_s + torch.clamp(1.0 - p_s, max=margin) - p_t)
    return loss.sum() / max(labels.numel(), 1)


def pc_loc_loss(
    tsd_boxes: torch.Tensor, sibling_boxes: torch.Tensor, gt_boxes: torch.Tensor, margin: float
) -> torch.Tensor:
    """The localisation progressive constraint on P positives: mean of
    relu(IoU_s + min(margin, 1 - IoU_s) - IoU_t), IoU of each (P, 4) decoded box with its GT
    (IoU_s detached). Zero, in the graph, for P = 0."""
    iou_t = aligned_iou(_fp32(tsd_boxes), _fp32(gt_boxes))
    iou_s = aligned_iou(_fp32(sibling_boxes), _fp32(gt_boxes)).detach()
    loss = F.relu(iou_s + torch.clamp(1.0 - iou_s, max=margin) - iou_t)
    return loss.sum() / max(gt_boxes.shape[0], 1)


def with_proposal_boxes(proposals: List[Instances], boxes: torch.Tensor) -> List[Instances]:
    """Copies of ``proposals`` (every field) whose ``proposal_boxes`` are the rows of the
    (R, 4) ``boxes``, R the total number of proposals, in order."""
    out = []
    for p, b in zip(proposals, boxes.split([len(p) for p in proposals])):
        q = Instances(p.image_size)
        for name, value in p.get_fields().items():
            q.set(name, value)
        q.proposal_boxes = Boxes(b)
        out.append(q)
    return out


def _class_deltas(deltas: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(R, 4) deltas of each row's class from (R, 4) agnostic or (R, 4K) class deltas."""
    if deltas.shape[1] == 4:
        return deltas
    rows = torch.arange(deltas.shape[0], device=deltas.device)
    return deltas.view(deltas.shape[0], deltas.shape[1] // 4, 4)[rows, classes]


def _tsd_name(name: str) -> str:
    """A loss term's name for the TSD head: loss_cls -> loss_tsd_cls."""
    return "loss_tsd_" + name[len("loss_") :] if name.startswith("loss_") else "tsd_" + name


class TSDHead(nn.Module):
    """One box stage's TSD branch (see the module docstring). Submodules: ``shared_fc``,
    ``cls_offset``, ``reg_offset`` (the offset MLPs), ``cls_head`` / ``reg_head`` (towers of
    the box head's architecture) and ``predictor`` (a :class:`LongTailFastRCNNOutputLayers`
    whose ``cls_score`` reads ``cls_head`` and ``bbox_pred`` reads ``reg_head``)."""

    def __init__(self, cfg, pooled_shape: ShapeSpec, box2box_transform=None):
        """
        Args:
            cfg: the config (``MODEL.ROI_BOX_HEAD`` and its ``TSD`` node).
            pooled_shape: (C, k, k) of the RoI features.
            box2box_transform: the stage's box transform (cascade stages); None: the config's.
        """
        super().__init__()
        p = cfg.MODEL.ROI_BOX_HEAD.TSD
        c, kh, kw = pooled_shape.channels, pooled_shape.height, pooled_shape.width
        self.output_size = (kh, kw)
        self.gamma = float(p.GAMMA)
        self.pc_cls, self.pc_cls_margin = bool(p.PC_CLS), float(p.PC_CLS_MARGIN)
        self.pc_loc, self.pc_loc_margin = bool(p.PC_LOC), float(p.PC_LOC_MARGIN)
        dim = p.OFFSET_FC_DIM
        self.shared_fc = nn.Linear(c * kh * kw, dim)
        self.cls_offset = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 2 * kh * kw)
        )
        self.reg_offset = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 2)
        )
        for layer in (self.shared_fc, self.cls_offset[0], self.reg_offset[0]):
            weight_init.c2_xavier_fill(layer)
        for layer in (self.cls_offset[2], self.reg_offset[2]):  # starts sampling F itself
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.cls_head = build_box_head(cfg, pooled_shape)
        self.reg_head = build_box_head(cfg, pooled_shape)
        extra = {} if box2box_transform is None else {"box2box_transform": box2box_transform}
        self.predictor = LongTailFastRCNNOutputLayers(cfg, self.cls_head.output_shape, **extra)
        self.predictor.log_prefix = "tsd"

    @property
    def trains_sibling(self) -> bool:
        """Whether training runs the sibling head and the constraints (not in a dual-head
        fine-tune, where the trained model, sibling included, is frozen)."""
        return not hasattr(self.predictor, "dual_cls_loss")

    def forward(
        self,
        features: List[torch.Tensor],
        proposals: List[Instances],
        pooler: ROIPooler,
        sibling: Optional[Tuple[nn.Module, nn.Module]] = None,
        prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> TSDOutputs:
        """The TSD outputs of ``proposals`` (their ``proposal_boxes``).

        Args:
            features: the box branch's feature maps, ``pooler``'s levels.
            pooler: the ordinary box pooler (ROIAlignV2), which gives F.
            sibling: (box head, predictor) run on F in training, or None.
            prepare: applied to every pooled feature (F, F_c, F_r) before a head reads it
                (HTC-Lite's context vector, the cascade's gradient scale), or None.
        """
        boxes = [p.proposal_boxes for p in proposals]
        prepare = prepare or (lambda x: x)
        x = prepare(pooler(features, boxes))
        num = x.shape[0]
        if num:
            rois = convert_boxes_to_pooler_format(boxes)
        else:
            rois = x.new_zeros((0, 5))
        levels = assign_boxes_to_levels(
            boxes, pooler.min_level, pooler.max_level, pooler.canonical_box_size,
            pooler.canonical_level,
        )  # fmt: skip
        cls_shift, reg_shift = self.offsets(x)
        x_cls, x_reg = self.resample(features, rois, levels, pooler, cls_shift, reg_shift)
        scores = self.predictor.class_logits(self.cls_head(prepare(x_cls)))
        deltas = self.predictor.bbox_pred(self.reg_head(prepare(x_reg)).flatten(1))
        out = TSDOutputs(scores, deltas, translate_boxes(rois[:, 1:], reg_shift, self.gamma))
        if sibling is not None:
            head, predictor = sibling
            out.sibling = predictor(head(x))
        return out

    def offsets(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(R, C, k, k) RoI features F -> the (R, 2, k, k) classification bin offsets (x then
        y, fractions of the proposal's width and height, ``GAMMA`` applied) and the (R, 2)
        regression offset (dx, dy) (in units of ``GAMMA`` (w, h))."""
        hidden = F.relu(self.shared_fc(x.flatten(1)))
        kh, kw = self.output_size
        cls_shift = self.gamma * self.cls_offset(hidden).view(-1, 2, kh, kw)
        return cls_shift, self.reg_offset(hidden)

    def resample(self, features, rois, levels, pooler: ROIPooler, cls_shift, reg_shift):
        """F_c and F_r, (R, C, k, k) each: RoIAlign of the (R, 5) pooler-format ``rois`` at
        their (R,) ``levels`` with every classification bin shifted by its ``cls_shift``, and
        with every bin shifted by ``GAMMA`` ``reg_shift`` (RoIAlign of P_r); one pass."""
        num, (kh, kw) = rois.shape[0], self.output_size
        reg_bins = (self.gamma * reg_shift)[:, :, None, None].expand(num, 2, kh, kw)
        pooled = _deform_roi_align_levels(
            features, torch.cat([rois, rois]), torch.cat([levels, levels]),
            torch.cat([cls_shift, reg_bins.to(cls_shift.dtype)]), self.output_size,
            [lp.spatial_scale for lp in pooler.level_poolers],
            pooler.level_poolers[0].sampling_ratio,
        )  # fmt: skip
        return pooled[:num], pooled[num:]

    def losses(
        self,
        out: TSDOutputs,
        proposals: List[Instances],
        sibling_predictor: Optional[LongTailFastRCNNOutputLayers] = None,
    ) -> Dict[str, torch.Tensor]:
        """Training losses: the TSD predictor's terms renamed ``loss_tsd_*`` (regression
        targets relative to P_r); with ``out.sibling``, the sibling predictor's own terms and
        the enabled progressive constraints."""
        refined = with_proposal_boxes(proposals, out.boxes.detach())
        losses = {
            _tsd_name(k): v for k, v in self.predictor.losses(out.predictions, refined).items()
        }
        if out.sibling is None:
            return losses
        losses.update(sibling_predictor.losses(out.sibling, proposals))
        if len(proposals):
            labels = cat([p.gt_classes for p in proposals])
        else:
            labels = torch.empty(0, dtype=torch.long, device=out.scores.device)
        if self.pc_cls:
            losses["loss_tsd_pc_cls"] = pc_cls_loss(
                self.predictor.cls_loss.predict_probs(out.scores),
                sibling_predictor.cls_loss.predict_probs(out.sibling[0]),
                labels, self.pc_cls_margin,
            )  # fmt: skip
        if self.pc_loc:
            losses["loss_tsd_pc_loc"] = self._pc_loc(out, proposals, labels, sibling_predictor)
        return losses

    def _pc_loc(self, out: TSDOutputs, proposals, labels, sibling_predictor) -> torch.Tensor:
        """``loss_tsd_pc_loc`` on the positives (labels in [0, K))."""
        fg = (labels >= 0) & (labels < self.predictor.num_classes)
        if len(proposals):
            gt = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals]
            )
            boxes = cat([p.proposal_boxes.tensor for p in proposals])
        else:
            gt = boxes = out.boxes.new_zeros((0, 4))
        classes = labels[fg]
        sib = sibling_predictor.box2box_transform.apply_deltas(
            _class_deltas(out.sibling[1][fg], classes).float(), boxes[fg].float()
        )
        tsd = self.predictor.box2box_transform.apply_deltas(
            _class_deltas(out.deltas[fg], classes).float(), out.boxes[fg].float()
        )
        return pc_loc_loss(tsd, sib, gt[fg], self.pc_loc_margin)


def attach_tsd(cfg, input_shape: Dict[str, ShapeSpec], ret: dict) -> dict:
    """With ``MODEL.ROI_BOX_HEAD.TSD.ENABLED``, put a :class:`TSDHead` per box stage in the ROI
    heads' ``from_config`` dict ``ret`` (``tsd_head``: one module, or a list for a cascade,
    with each stage's box transform); returns ``ret``."""
    if not cfg.MODEL.ROI_BOX_HEAD.TSD.ENABLED:
        return ret
    pooler = ret.get("box_pooler")
    if type(pooler) is not ROIPooler or pooler.level_poolers[0].aligned is not True:
        raise ValueError(
            "MODEL.ROI_BOX_HEAD.TSD samples around detectron2's ROIAlignV2 box pooler "
            f"(MODEL.ROI_BOX_HEAD.POOLER_TYPE 'ROIAlignV2'); this config builds {pooler!r}"
        )
    res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
    channels = input_shape[ret["box_in_features"][0]].channels
    shape = ShapeSpec(channels=channels, height=res, width=res)
    if "box_predictors" in ret:
        ret["tsd_head"] = [TSDHead(cfg, shape, p.box2box_transform) for p in ret["box_predictors"]]
    else:
        ret["tsd_head"] = TSDHead(cfg, shape)
    return ret
