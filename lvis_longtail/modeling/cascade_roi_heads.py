"""Import path kept for existing code: the class lives in
:mod:`lvis_longtail.modeling.roi_heads.cascade`."""

from lvis_longtail.modeling.roi_heads.cascade import LongTailCascadeROIHeads

__all__ = ["LongTailCascadeROIHeads"]
