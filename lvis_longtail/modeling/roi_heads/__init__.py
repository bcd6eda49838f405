"""ROI heads of lvis_longtail (importing registers them):

* :class:`LongTailROIHeads` (``standard``): detectron2's ``StandardROIHeads`` with the
  long-tail box predictor and the contract-based mask branch;
* :class:`LongTailCascadeROIHeads` (``cascade``): detectron2's ``CascadeROIHeads`` with
  those at every stage;
* :class:`LongTailHTCLiteROIHeads` (``htc_lite``): the cascade plus a global context head
  and one mask head trained on a chosen (default: the last) stage;
* :class:`LongTailHTCROIHeads` (``htc``): HTC without the semantic branch, HTC-Lite's heads
  with a mask head per stage, interleaved execution and the mask information flow;
* :class:`GlobalContextHead` (``context_head``): HTC-Lite's image-level context.
"""

from lvis_longtail.modeling.roi_heads.cascade import LongTailCascadeROIHeads
from lvis_longtail.modeling.roi_heads.context_head import GlobalContextHead
from lvis_longtail.modeling.roi_heads.htc import LongTailHTCROIHeads
from lvis_longtail.modeling.roi_heads.htc_lite import LongTailHTCLiteROIHeads
from lvis_longtail.modeling.roi_heads.standard import LongTailROIHeads

__all__ = [
    "GlobalContextHead",
    "LongTailCascadeROIHeads",
    "LongTailHTCLiteROIHeads",
    "LongTailHTCROIHeads",
    "LongTailROIHeads",
]
