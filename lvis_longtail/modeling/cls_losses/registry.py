"""Builder of the box predictor's classification loss (the registry itself lives in
:mod:`lvis_longtail.registries`, where the config check can read it)."""

from lvis_longtail.registries import CLS_LOSS_REGISTRY

__all__ = ["CLS_LOSS_REGISTRY", "build_cls_loss"]


def build_cls_loss(cfg, num_classes: int):
    """Build the classification loss named by ``cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME``.

    Raises:
        KeyError: the name is not registered (``setup_cfg`` reports it earlier, with the
            registered names).
    """
    return CLS_LOSS_REGISTRY.get(cfg.MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME)(cfg, num_classes)
