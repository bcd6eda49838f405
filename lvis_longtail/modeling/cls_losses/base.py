"""The classifier/loss contract shared by every classification loss of the box predictor.

Shape shorthand: R sampled RoIs, K foreground classes, L = ``num_logits`` classifier outputs.
Labels follow detectron2: ``gt_classes`` in [0, K], K = background.
"""

import math
from typing import Dict, Optional

import torch
import torch.distributed as dist
from detectron2.utils.events import get_event_storage
from torch import nn


class ClassificationLoss(nn.Module):
    """Base class of the losses in ``CLS_LOSS_REGISTRY``; it owns everything that depends on
    the logit layout, so the box predictor needs no knowledge of the method:

    - :attr:`num_logits`: how many outputs the classifier needs for K classes;
    - :meth:`init_bias`: how the classifier bias is initialised (priors of sigmoid losses);
    - :meth:`forward`: the loss terms, a dict ``{"loss_cls": ..., <extra named terms>}``;
    - :meth:`predict_probs`: logits → ``[K class scores, background]`` (R, K+1), the layout
      detectron2's ``fast_rcnn_inference`` expects (it drops the last column);
    - :meth:`predict_classes` / :meth:`log_accuracy`: the predicted label in [0, K] and the
      ``fast_rcnn/*`` accuracy scalars derived from it.

    Subclasses are thin: they hold hyper-parameters and buffers and call pure loss functions.
    State (buffers) is updated only in training mode.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    @property
    def num_logits(self) -> int:
        """Number of classifier outputs; K+1 (softmax with a background logit) by default."""
        return self.num_classes + 1

    def init_bias(self, bias: torch.Tensor) -> None:
        """Initialise the classifier bias (L,) in place; zeros by default."""
        nn.init.constant_(bias, 0.0)

    def class_logit_columns(self) -> Optional[torch.Tensor]:
        """(K,) int64 column of each class's logit inside a softmax over classes, or None when
        the probabilities are not softmax-based (sigmoid losses; the default).

        Post-hoc calibration (NorCal, logit adjustment) subtracts a per-class offset from these
        columns and applies :meth:`predict_probs` unchanged, so a softmax loss supports it by
        naming the columns; the other logits (background, objectness, "others") stay as they
        are.
        """
        return None

    def forward(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Loss terms of one batch of RoIs.

        Args:
            logits: (R, L) classifier outputs, any float dtype (the math runs in fp32).
            gt_classes: (R,) int64 labels in [0, K].

        Returns:
            dict of scalar losses, always containing ``"loss_cls"``.
        """
        raise NotImplementedError

    def predict_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(R, L) logits → (R, K+1) fp32 scores: K class scores, then a background column."""
        raise NotImplementedError

    def predict_classes(self, logits: torch.Tensor) -> torch.Tensor:
        """(R, L) logits → (R,) predicted labels in [0, K]; argmax of :meth:`predict_probs`."""
        return self.predict_probs(logits).argmax(dim=1)

    def log_accuracy(
        self, logits: torch.Tensor, gt_classes: torch.Tensor, prefix: str = "fast_rcnn"
    ) -> None:
        """Log ``<prefix>/cls_accuracy``, ``fg_cls_accuracy`` and ``false_negative`` with the
        definitions of detectron2's ``_log_classification_stats``, on :meth:`predict_classes`.
        """
        if gt_classes.numel() == 0:
            return
        with torch.no_grad():
            log_classification_stats(
                self.predict_classes(logits), gt_classes, self.num_classes, prefix
            )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_logits={self.num_logits}"


def log_classification_stats(
    pred_classes: torch.Tensor, gt_classes: torch.Tensor, num_classes: int, prefix: str
) -> None:
    """Log classification accuracy to the current event storage.

    Args:
        pred_classes: (R,) predicted labels in [0, K], K = background.
        gt_classes: (R,) ground-truth labels in [0, K], R > 0.
        num_classes: K.
        prefix: scalar name prefix, e.g. "fast_rcnn".
    """
    fg = gt_classes < num_classes
    num_fg = int(fg.sum())
    storage = get_event_storage()
    storage.put_scalar(f"{prefix}/cls_accuracy", (pred_classes == gt_classes).float().mean().item())
    if num_fg > 0:
        fg_pred = pred_classes[fg]
        fg_accurate = int((fg_pred == gt_classes[fg]).sum())
        storage.put_scalar(f"{prefix}/fg_cls_accuracy", fg_accurate / num_fg)
        storage.put_scalar(f"{prefix}/false_negative", int((fg_pred == num_classes).sum()) / num_fg)


def sigmoid_predicted_classes(class_probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Predicted labels of independent sigmoid classifiers without a trained background score:
    the most likely class if its probability reaches ``threshold``, else background.

    Args:
        class_probs: (R, K) per-class probabilities.

    Returns:
        (R,) labels in [0, K].
    """
    best_prob, best_class = class_probs.max(dim=1)
    return torch.where(
        best_prob >= threshold, best_class, torch.full_like(best_class, class_probs.shape[1])
    )


def sigmoid_probs_with_background(logits: torch.Tensor) -> torch.Tensor:
    """(R, K+1) sigmoid logits, the last one background's -> (R, K+1) fp32 scores: each
    class's sigmoid times the probability of not being background, then background's."""
    probs = torch.sigmoid(logits.float())
    bg = probs[:, -1:]
    return torch.cat([probs[:, :-1] * (1 - bg), bg], dim=1)


def prior_logit(prior_prob: float) -> float:
    """Bias giving sigmoid probability ``prior_prob``: -log((1 - p) / p)."""
    return -math.log((1.0 - prior_prob) / prior_prob)


def empty_loss(logits: torch.Tensor) -> torch.Tensor:
    """A zero that stays in the autograd graph of ``logits`` (so every rank has gradients)."""
    return logits.sum() * 0.0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all processes when torch.distributed runs more than one;
    a no-op otherwise. Every rank must call it the same number of times."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
