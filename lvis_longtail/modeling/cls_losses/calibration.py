"""Post-hoc calibration of softmax class scores, selected by ``TEST.CLS_CALIBRATION``.

Both forms subtract ``strength * b_c`` from the logit of every foreground class c inside its
softmax and leave the other logits (background, Seesaw's objectness pair, BAGS's "others")
untouched, then the loss's own ``predict_probs`` renormalises:

- ``norcal`` (Pan et al., NeurIPS 2021; reference tydpan/NorCal ``norcal/roi_heads.py``,
  ``TEST.CALIBRATION.WITH exps``): b_c = log N_c, so for softmax CE
  p_c = (e^{z_c} / N_c^gamma) / (sum_j e^{z_j} / N_j^gamma + e^{z_bg}); strength = gamma.
- ``logit_adjustment`` (Menon et al., ICLR 2021, post-hoc form): b_c = log(K pi_c), the
  centred log prior of :func:`centered_log_prior`; strength = tau.

N_c are training counts (``COUNT``: images or instances) from the dataset's metadata, clamped
to >= 1 (the reference reads a pasted LVIS table chosen by the *test* set's name). For Seesaw
and BAGS the class softmax is calibrated and the objectness / background-group probabilities
are kept, a factorised reading of "background untouched". Sigmoid losses are rejected.
"""

from typing import Optional

import torch
from torch import nn

from .base import ClassificationLoss
from .priors import centered_log_prior, log_counts, training_class_counts


class ClassLogitCalibration(nn.Module):
    """z' = z - strength * b, b zero outside the class columns.

    Attributes:
        strength: gamma (NorCal) or tau (logit adjustment); a plain float, so a sweep can
            change it on a built model (:func:`set_calibration_strength`).
    """

    def __init__(
        self,
        num_logits: int,
        class_columns: torch.Tensor,
        class_offsets: torch.Tensor,
        strength: float,
        kind: str = "norcal",
    ):
        """
        Args:
            num_logits: L, the classifier's outputs.
            class_columns: (K,) column of each class's logit.
            class_offsets: (K,) b_c.
            strength: gamma or tau.
            kind: "norcal" or "logit_adjustment" (for the repr).
        """
        super().__init__()
        if class_columns.numel() != class_offsets.numel():
            raise ValueError(
                f"{class_columns.numel()} class columns but {class_offsets.numel()} offsets"
            )
        offset = torch.zeros(num_logits, dtype=torch.float32)
        offset[class_columns] = class_offsets.to(torch.float32)
        self.register_buffer("offset", offset, persistent=False)
        self.strength = float(strength)
        self.kind = kind

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """(R, L) logits -> (R, L) fp32 calibrated logits."""
        return logits.float() - self.strength * self.offset

    def extra_repr(self) -> str:
        return f"kind={self.kind}, strength={self.strength}"


def build_cls_calibration(cfg, cls_loss: ClassificationLoss) -> Optional[ClassLogitCalibration]:
    """The calibration of ``TEST.CLS_CALIBRATION`` for ``cls_loss``; None for "none".

    Raises:
        ValueError: the loss's probabilities are not softmax-based.
    """
    kind = cfg.TEST.CLS_CALIBRATION  # its valid values are checked with the other enums
    if kind == "none":
        return None
    columns = cls_loss.class_logit_columns()
    if columns is None:
        raise ValueError(
            f"TEST.CLS_CALIBRATION '{kind}' calibrates softmax probabilities, but "
            f"MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME '{cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME}' "
            "produces sigmoid ones; use it with a softmax-based loss (SoftmaxCE, SeesawLoss, "
            "GroupSoftmax, BalancedSoftmax, LogitAdjustedCE) or set TEST.CLS_CALIBRATION none"
        )
    if kind == "norcal":
        node, strength = cfg.TEST.NORCAL, cfg.TEST.NORCAL.GAMMA
        offsets = log_counts(training_class_counts(cfg, node.COUNT))
    else:
        node, strength = cfg.TEST.LOGIT_ADJUSTMENT, cfg.TEST.LOGIT_ADJUSTMENT.TAU
        offsets = centered_log_prior(training_class_counts(cfg, node.COUNT))
    if offsets.numel() != cls_loss.num_classes:
        raise ValueError(
            f"the training set has {offsets.numel()} classes, the model "
            f"{cls_loss.num_classes} (MODEL.ROI_HEADS.NUM_CLASSES)"
        )
    return ClassLogitCalibration(cls_loss.num_logits, columns, offsets, strength, kind)


def set_calibration_strength(model: nn.Module, strength: float) -> int:
    """Set gamma / tau of every :class:`ClassLogitCalibration` in ``model`` (each cascade
    stage has one); returns how many were set."""
    found = 0
    for module in model.modules():
        if isinstance(module, ClassLogitCalibration):
            module.strength = float(strength)
            found += 1
    return found
