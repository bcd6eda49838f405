"""Dual head classification (SimCal, Wang et al. ECCV 2020; the fine-tune of the MMDet LVIS
2020 entry, Seesaw paper arXiv 2008.10032, appendix D.2): a trained detector is frozen and
every box stage gets a new classification branch, fine-tuned with its own loss (repeat-factor
sampling in the configs); at inference the two branches' scores are fused.

With ``MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED`` (docs/methods.md, "Dual head classification"),
:func:`attach_dual_head` changes each stage of the built ROI heads (Mask R-CNN: one, cascade and
HTC-Lite: each) so that the trained model's parameters keep their names (its checkpoint loads
unchanged) and the new branch's live under ``dual_*`` names:

* ``BRANCH "box_head"``: the box head becomes a :class:`DualBranchConvFCHead`, which also runs
  a second FC tower (``dual_branch``) on the same pooled RoI features; ``"classifier"``: the
  new branch is a classifier on the trained box head's features;
* the predictor becomes a :class:`DualHeadOutputLayers`: the trained classifier and box
  regression plus ``dual_cls_score`` and ``dual_cls_loss`` (``DUAL_HEAD.CLS_LOSS_NAME``, any
  loss of ``CLS_LOSS_REGISTRY``); only the new branch has a loss; boxes come from the trained
  regression; scores are fused by :func:`fuse_scores`.

``INIT "copy"``: when the checkpoint loaded into the model has no new-branch tensors (the
trained model's own), the new branch starts as a copy of the trained one (the classifier only
when its layout equals the trained classifier's). The trained branch is frozen here; the
engine's trainer freezes everything else outside :func:`dual_head_branches`.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.structures import Instances
from torch import nn

from lvis_longtail.data.class_stats import training_frequency
from lvis_longtail.modeling.cls_losses import CLS_LOSS_REGISTRY, ClassificationLoss
from lvis_longtail.modeling.fast_rcnn import LongTailFastRCNNOutputLayers, build_classifier

__all__ = ["DualBranchConvFCHead", "DualHeadOutputLayers", "attach_dual_head",
           "dual_head_branches", "fuse_scores"]  # fmt: skip

FUSIONS = ("mean", "geometric", "group")


def fuse_scores(old: torch.Tensor, new: torch.Tensor, fusion: str, weight: float = 0.5,
                new_columns: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
    """Fuse two branches' (R, K+1) ``[K class scores, background]`` probabilities.

    Args:
        old, new: the trained and the new branch's scores (each loss's ``predict_probs``).
        fusion: "mean": (1 - w) old + w new (the paper's average at w = 1/2); "geometric":
            old^(1 - w) new^w, per entry, not renormalised (detection ranks scores per class);
            "group": the new branch's score in the columns ``new_columns``, else the old one's.
        weight: w, the new branch's weight in [0, 1].
        new_columns: (K+1,) bool, for "group".

    Returns:
        (R, K+1) fp32 scores.
    """
    old, new = old.float(), new.float()
    if fusion == "mean":
        return torch.lerp(old, new, weight)
    if fusion == "geometric":
        return old.pow(1.0 - weight) * new.pow(weight)
    if fusion == "group":
        return torch.where(new_columns.to(old.device), new, old)
    raise ValueError(f"MODEL.ROI_BOX_HEAD.DUAL_HEAD.FUSION {fusion!r} is not one of {FUSIONS}")


class DualBranchConvFCHead(FastRCNNConvFCHead):
    """detectron2's ``FastRCNNConvFCHead`` (same layers and parameter names) plus a second
    tower of the same architecture, ``dual_branch``, on the same pooled features.
    (R, C, S, S) -> (R, D + D'): the trained tower's D features, then the new tower's D'.
    :attr:`output_shape` stays the trained tower's (what its predictor reads)."""

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, conv_dims: List[int], fc_dims: List[int],
                 conv_norm="", copy_init: bool = True):  # fmt: skip
        super().__init__(input_shape, conv_dims=conv_dims, fc_dims=fc_dims, conv_norm=conv_norm)
        self.dual_branch = FastRCNNConvFCHead(
            input_shape, conv_dims=conv_dims, fc_dims=fc_dims, conv_norm=conv_norm
        )
        if copy_init:
            self.register_load_state_dict_pre_hook(_copy_into("dual_branch.", ""))

    @property
    def dual_channels(self) -> int:
        """D', the size of the new tower's flattened output."""
        return int(np.prod(self.dual_branch._output_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for name, layer in self.named_children():
            if name != "dual_branch":
                out = layer(out)
        return torch.cat([out.flatten(1), self.dual_branch(x).flatten(1)], dim=1)


def _copy_into(new_prefix: str, old_prefix: str):
    """A load-state-dict pre-hook: when the state dict holds none of the module's
    ``new_prefix`` tensors but all their ``old_prefix`` counterparts, with the same shapes,
    the new tensors are loaded as copies of those (a checkpoint of the trained model)."""

    def hook(module, state_dict, prefix, *args):
        own = {k: v for k, v in module.state_dict().items() if k.startswith(new_prefix)}
        pairs = [(prefix + old_prefix + k[len(new_prefix) :], prefix + k) for k in own]
        if any(n in state_dict for _, n in pairs) or not all(o in state_dict for o, _ in pairs):
            return
        if all(state_dict[o].shape == own[n[len(prefix) :]].shape for o, n in pairs):
            state_dict.update({n: state_dict[o].clone() for o, n in pairs})

    return hook


class DualHeadOutputLayers(LongTailFastRCNNOutputLayers):
    """Identical to :class:`LongTailFastRCNNOutputLayers` (the trained classifier, box
    regression and loss keep their names), except:

    * input (R, D + D'): the first D features feed the trained layers, the last D' the new
      classifier ``dual_cls_score`` (D' = 0: both read the same D features);
    * :meth:`forward` returns ``(cat([trained logits, new logits], 1), deltas)``;
    * :meth:`losses`: only the new branch's classification terms (``dual_cls_loss``), the
      trained branch is frozen;
    * :meth:`predict_probs`: :func:`fuse_scores` of the two branches' probabilities
      (``TEST.CLS_CALIBRATION`` calibrates the trained branch's logits only).
    """

    @configurable
    def __init__(self, input_shape, *, dual_cls_loss: ClassificationLoss, dual_channels: int = 0,
                 fusion: str = "mean", new_weight: float = 0.5,
                 new_columns: Optional[torch.Tensor] = None, copy_init: bool = True,
                 **kwargs):  # fmt: skip
        """
        Args:
            input_shape, kwargs: as :class:`LongTailFastRCNNOutputLayers` (the trained branch).
            dual_cls_loss: the new branch's loss, for the same K classes.
            dual_channels: D', features of the new branch's own tower; 0: none.
            fusion, new_weight, new_columns: as :func:`fuse_scores`.
            copy_init: start ``dual_cls_score`` as a copy of ``cls_score`` when a loaded
                checkpoint has none and the layouts agree.
        """
        super().__init__(input_shape, **kwargs)
        if fusion not in FUSIONS or not 0.0 <= new_weight <= 1.0:
            raise ValueError(f"MODEL.ROI_BOX_HEAD.DUAL_HEAD: FUSION {fusion!r} (one of "
                             f"{FUSIONS}), NEW_WEIGHT {new_weight} (in [0, 1])")  # fmt: skip
        if fusion == "group" and new_columns is None:
            raise ValueError('MODEL.ROI_BOX_HEAD.DUAL_HEAD.FUSION "group" needs new_columns')
        self.trained_channels, self.dual_channels = self.cls_score.in_features, dual_channels
        self.dual_cls_loss = dual_cls_loss
        self.dual_cls_score = build_classifier(
            type(self.cls_score).__name__, dual_channels or self.trained_channels,
            dual_cls_loss.num_logits, getattr(self.cls_score, "scale", 20.0),
        )  # fmt: skip
        dual_cls_loss.init_bias(self.dual_cls_score.bias)
        self.fusion, self.new_weight = fusion, float(new_weight)
        self.register_buffer("new_columns", new_columns, persistent=False)
        if copy_init:
            self.register_load_state_dict_pre_hook(_copy_into("dual_cls_score.", "cls_score."))
        for p in [*self.cls_score.parameters(), *self.bbox_pred.parameters()]:
            p.requires_grad_(False)  # the trained branch feeds no loss

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        p = cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD
        ret["dual_cls_loss"] = CLS_LOSS_REGISTRY.get(p.CLS_LOSS_NAME)(cfg, ret["num_classes"])
        ret.update(fusion=p.FUSION, new_weight=p.NEW_WEIGHT, copy_init=p.INIT == "copy")
        if p.FUSION == "group":
            ret["new_columns"] = group_columns(cfg, p.NEW_BRANCH_GROUPS, ret["num_classes"])
        return ret

    def forward(self, x: torch.Tensor):
        """(R, D + D') features -> ((R, L + L') logits of both branches, deltas)."""
        x = x.flatten(1)
        trained = x[:, : self.trained_channels]
        new = x[:, self.trained_channels :] if self.dual_channels else trained
        scores = torch.cat([self.cls_score(trained), self.dual_cls_score(new)], dim=1)
        return scores, self.bbox_pred(trained)

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(R, D + D') features -> (R, L + L') logits of both branches."""
        return self(x)[0]

    def split(self, scores: torch.Tensor):
        """(R, L + L') -> the trained branch's (R, L) and the new branch's (R, L') logits."""
        return scores[:, : self.cls_loss.num_logits], scores[:, self.cls_loss.num_logits :]

    def losses(self, predictions, proposals: List[Instances]) -> Dict[str, torch.Tensor]:
        """The new branch's classification terms (each x ``CLS_LOSS_WEIGHT``), on every
        sampled RoI; no box regression loss (the regression is the trained branch's)."""
        _, new = self.split(predictions[0])
        if len(proposals):
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
        else:
            gt_classes = torch.empty(0, dtype=torch.long, device=new.device)
        self.dual_cls_loss.log_accuracy(new, gt_classes)
        weight = self.loss_weight.get("loss_cls", 1.0)
        return {k: v * weight for k, v in self.dual_cls_loss(new, gt_classes).items()}

    def predict_probs(self, predictions, proposals: List[Instances]):
        """Per image (Ri, K+1) fused scores of the two branches."""
        trained, new = self.split(predictions[0])
        if self.calibration is not None:
            trained = self.calibration(trained)
        scores = fuse_scores(
            self.cls_loss.predict_probs(trained), self.dual_cls_loss.predict_probs(new),
            self.fusion, self.new_weight, self.new_columns,
        )  # fmt: skip
        return scores.split([len(p) for p in proposals], dim=0)


def group_columns(cfg, groups: Sequence[str], num_classes: int) -> torch.Tensor:
    """(K+1,) bool: the classes of ``groups`` ("r", "c", "f") in the training set
    ``DATASETS.TRAIN``, background False."""
    if not set(groups) <= {"r", "c", "f"}:
        raise ValueError(f"MODEL.ROI_BOX_HEAD.DUAL_HEAD.NEW_BRANCH_GROUPS {list(groups)}: "
                         'each must be one of "r", "c", "f"')  # fmt: skip
    frequency, source = training_frequency(tuple(cfg.DATASETS.TRAIN))
    if frequency is None or len(frequency) != num_classes:
        raise ValueError(
            'MODEL.ROI_BOX_HEAD.DUAL_HEAD.FUSION "group" needs the frequency groups of the '
            f"{num_classes} classes of DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}: {source}"
        )
    return torch.tensor([f in groups for f in frequency] + [False])


def attach_dual_head(cfg, input_shape: Dict[str, ShapeSpec], ret: dict) -> dict:
    """With ``DUAL_HEAD.ENABLED``, replace the box head and predictor of every stage in the
    ROI heads' ``from_config`` dict ``ret`` (``box_head``/``box_predictor`` or the cascade's
    lists) as the module docstring says; returns ``ret``. With TSD (``ret["tsd_head"]``) the
    branch is added to each stage's TSD classification tower and predictor instead, the
    classifier used at inference (the sibling head is left as trained)."""
    p = cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD
    if not p.ENABLED:
        return ret
    cascade = "box_predictors" in ret
    res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
    channels = input_shape[ret["box_in_features"][0]].channels
    pooled = ShapeSpec(channels=channels, height=res, width=res)
    tsd = ret.get("tsd_head")
    if tsd is not None:  # the sibling and the TSD regression feed no loss of the fine-tune
        siblings = [*ret["box_heads"], *ret["box_predictors"]] if cascade else [
            ret["box_head"], ret["box_predictor"]]  # fmt: skip
        for k, stage in enumerate(tsd if cascade else [tsd]):
            for param in [*stage.parameters(), *(p for m in siblings for p in m.parameters())]:
                param.requires_grad_(False)
            stage.cls_head, stage.predictor = _dual_stage(
                cfg, pooled, k, stage.cls_head, stage.predictor
            )
        return ret
    heads = ret["box_heads"] if cascade else [ret.get("box_head")]
    predictors = ret["box_predictors"] if cascade else [ret.get("box_predictor")]
    for k, (head, predictor) in enumerate(zip(heads, predictors)):
        heads[k], predictors[k] = _dual_stage(cfg, pooled, k, head, predictor)
    if not cascade:
        ret["box_head"], ret["box_predictor"] = heads[0], predictors[0]
    return ret


def _dual_stage(cfg, pooled: ShapeSpec, k: int, head: nn.Module, predictor: nn.Module):
    """Stage ``k``'s (box head, predictor) with the new branch: (head or a
    :class:`DualBranchConvFCHead`, a :class:`DualHeadOutputLayers`)."""
    p = cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD
    if type(predictor) is not LongTailFastRCNNOutputLayers or (
        p.BRANCH == "box_head" and type(head) is not FastRCNNConvFCHead
    ):
        raise ValueError(
            f"MODEL.ROI_BOX_HEAD.DUAL_HEAD needs lvis_longtail's box predictor and, with "
            f'BRANCH "box_head", detectron2\'s FastRCNNConvFCHead (stage {k} has '
            f"{type(head).__name__} and {type(predictor).__name__})"
        )
    if p.BRANCH == "box_head":
        head = DualBranchConvFCHead(cfg, pooled, copy_init=p.INIT == "copy")
    for param in head.parameters():
        param.requires_grad_(False)  # the trained tower; the new one is trainable below
    dual = getattr(head, "dual_branch", None)
    for param in dual.parameters() if dual is not None else ():
        param.requires_grad_(True)
    new_predictor = DualHeadOutputLayers(
        cfg, head.output_shape, dual_channels=getattr(head, "dual_channels", 0),
        box2box_transform=predictor.box2box_transform,
    )  # fmt: skip
    new_predictor.log_prefix = predictor.log_prefix
    return head, new_predictor


def dual_head_branches(model: nn.Module) -> List[str]:
    """Names of the modules that make up the new branches of ``model`` (what a dual-head
    fine-tune trains): every ``dual_branch`` tower, ``dual_cls_score`` and ``dual_cls_loss``."""
    names = ("dual_branch", "dual_cls_score", "dual_cls_loss")
    return [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in names]
