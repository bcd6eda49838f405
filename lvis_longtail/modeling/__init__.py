"""Models of lvis_longtail; importing this module registers them with detectron2."""

from lvis_longtail.modeling.backbones import build_timm_fpn_backbone  # noqa: F401
from lvis_longtail.modeling.fpg import build_resnet_fpg_backbone  # noqa: F401
from lvis_longtail.modeling.ignore_regions import LongTailRCNN, LongTailRPN  # noqa: F401
from lvis_longtail.modeling.mask_head import DiceBCEMaskHead  # noqa: F401
from lvis_longtail.modeling.roi_heads import (  # noqa: F401
    LongTailCascadeROIHeads,
    LongTailHTCLiteROIHeads,
    LongTailROIHeads,
)
