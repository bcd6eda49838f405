"""Classification losses of the box predictor, selected by ``MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME``.

Each loss is a pure function plus a thin :class:`ClassificationLoss` module registered in
:data:`CLS_LOSS_REGISTRY`; the module owns the classifier/loss contract (number of logits, bias
init, loss terms, probabilities, accuracy).
"""

from .base import ClassificationLoss
from .calibration import ClassLogitCalibration, build_cls_calibration, set_calibration_strength
from .ecm import ECMLoss, ecm_loss, ecm_margins
from .eql import EQL, eql_loss
from .eqlv2 import EQLv2, eqlv2_class_weights, eqlv2_gradient_stats, eqlv2_loss
from .federated import FederatedLoss, federated_loss, sample_federated_classes
from .group_softmax import GroupSoftmax, group_softmax_loss, group_softmax_probs
from .logit_adjustment import BalancedSoftmax, LogitAdjustedCE, logit_adjusted_ce
from .registry import CLS_LOSS_REGISTRY, build_cls_loss
from .seesaw import SeesawLoss, seesaw_loss
from .sigmoid import SigmoidCE, sigmoid_ce_loss
from .softmax import SoftmaxCE, softmax_ce_loss

__all__ = [
    "BalancedSoftmax",
    "CLS_LOSS_REGISTRY",
    "ClassLogitCalibration",
    "ClassificationLoss",
    "ECMLoss",
    "EQL",
    "EQLv2",
    "FederatedLoss",
    "GroupSoftmax",
    "LogitAdjustedCE",
    "SeesawLoss",
    "SigmoidCE",
    "SoftmaxCE",
    "build_cls_calibration",
    "build_cls_loss",
    "ecm_loss",
    "ecm_margins",
    "eql_loss",
    "eqlv2_class_weights",
    "eqlv2_gradient_stats",
    "eqlv2_loss",
    "federated_loss",
    "group_softmax_loss",
    "group_softmax_probs",
    "logit_adjusted_ce",
    "sample_federated_classes",
    "seesaw_loss",
    "set_calibration_strength",
    "sigmoid_ce_loss",
    "softmax_ce_loss",
]
