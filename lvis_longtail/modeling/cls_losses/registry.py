"""Registry of the box predictor's classification losses."""

from detectron2.utils.registry import Registry

CLS_LOSS_REGISTRY = Registry("CLS_LOSS")
CLS_LOSS_REGISTRY.__doc__ = """
Registry for the classification losses of the box predictor, selected by
``MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME``.

The registered object is called as ``obj(cfg, num_classes)`` and must return a
:class:`lvis_longtail.modeling.cls_losses.ClassificationLoss` for ``num_classes`` foreground
classes; it decides the classifier's number of logits, bias initialisation, loss terms,
inference probabilities and accuracy logging.
"""


def build_cls_loss(cfg, num_classes: int):
    """Build the classification loss named by ``cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME``.

    Raises:
        KeyError: the name is not registered; the message lists the valid names.
    """
    name = cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME
    if name not in CLS_LOSS_REGISTRY:
        valid = ", ".join(sorted(n for n, _ in CLS_LOSS_REGISTRY))
        raise KeyError(f"MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME '{name}' is not one of: {valid}")
    return CLS_LOSS_REGISTRY.get(name)(cfg, num_classes)
