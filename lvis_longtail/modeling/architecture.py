"""Architecture options of the ROI heads: deformable RoI pooling and CARAFE mask upsampling.

The ROI heads' ``from_config`` calls :func:`plain_pooler_cfg` before detectron2 builds the
heads (detectron2's ``ROIPooler`` knows no deformable type) and :func:`adjust_roi_heads`
after, which swaps in what the config asks for:

* ``MODEL.ROI_BOX_HEAD.POOLER_TYPE`` / ``ROI_MASK_HEAD.POOLER_TYPE: "DeformROIAlignV2"``:
  a :class:`~lvis_longtail.layers.deform_roi_pool.DeformROIPooler` with the built pooler's
  geometry and the node's ``DEFORM_POOL`` parameters;
* ``MODEL.ROI_MASK_HEAD.UPSAMPLE_TYPE: "carafe"``: the mask head's 2x ``deconv`` becomes a
  :class:`~lvis_longtail.layers.carafe.CARAFE` (``ROI_MASK_HEAD.CARAFE``), followed by the
  head's ReLU as before;
* ``MODEL.ROI_BOX_HEAD.TSD.ENABLED``: every box stage gets a TSD head
  (:func:`~lvis_longtail.modeling.tsd.attach_tsd`);
* ``MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED``: every box stage gets the dual head's new branch
  (:func:`~lvis_longtail.modeling.dual_head.attach_dual_head`; on the TSD classifier with TSD).
"""

from typing import Dict

from detectron2.modeling.poolers import ROIPooler

from lvis_longtail.layers.carafe import CARAFE
from lvis_longtail.layers.deform_roi_pool import DeformROIPooler
from lvis_longtail.modeling.dual_head import attach_dual_head
from lvis_longtail.modeling.tsd import attach_tsd

__all__ = ["DEFORM_POOLER_TYPE", "adjust_roi_heads", "carafe_from_cfg", "plain_pooler_cfg"]

DEFORM_POOLER_TYPE = "DeformROIAlignV2"
# ROI heads' pooler argument -> (config node with POOLER_TYPE / DEFORM_POOL, in-features key)
_POOLERS = {
    "box_pooler": ("ROI_BOX_HEAD", "box_in_features"),
    "mask_pooler": ("ROI_MASK_HEAD", "mask_in_features"),
}


def plain_pooler_cfg(cfg):
    """``cfg`` with every "DeformROIAlignV2" ``POOLER_TYPE`` replaced by "ROIAlignV2", for
    detectron2 to build plain poolers that :func:`adjust_roi_heads` then replaces. Returns
    ``cfg`` itself when no pooler is deformable."""
    nodes = [n for n, _ in _POOLERS.values() if cfg.MODEL[n].POOLER_TYPE == DEFORM_POOLER_TYPE]
    if not nodes:
        return cfg
    plain = cfg.clone()
    plain.defrost()
    for node in nodes:
        plain.MODEL[node].POOLER_TYPE = "ROIAlignV2"
    plain.freeze()
    return plain


def carafe_from_cfg(node, channels: int) -> CARAFE:
    """A 2x :class:`CARAFE` for ``channels`` with the parameters of ``node.CARAFE``."""
    p = node.CARAFE
    return CARAFE(channels, 2, p.COMPRESSED_CHANNELS, p.ENCODER_KERNEL, p.UP_KERNEL)


def adjust_roi_heads(cfg, input_shape: Dict, ret: Dict) -> Dict:
    """Apply the options of the module docstring to the ROI heads' ``from_config`` dict
    ``ret`` (in place; returned)."""
    for key, (node, in_features) in _POOLERS.items():
        pooler = ret.get(key)
        if cfg.MODEL[node].POOLER_TYPE != DEFORM_POOLER_TYPE or pooler is None:
            continue
        if type(pooler) is not ROIPooler:
            raise ValueError(
                f"MODEL.{node}.POOLER_TYPE {DEFORM_POOLER_TYPE!r} replaces detectron2's "
                f"ROIPooler, but this config builds a {type(pooler).__name__} (e.g. "
                "ROI_MASK_HEAD.LEVEL_ASSIGNMENT 'area_ratio'); use one or the other"
            )
        params = cfg.MODEL[node].DEFORM_POOL
        ret[key] = DeformROIPooler(
            output_size=pooler.output_size,
            scales=[p.spatial_scale for p in pooler.level_poolers],
            sampling_ratio=pooler.level_poolers[0].sampling_ratio,
            in_channels=input_shape[ret[in_features][0]].channels,
            canonical_box_size=pooler.canonical_box_size,
            canonical_level=pooler.canonical_level,
            fc_dim=params.FC_DIM,
            gamma=params.GAMMA,
        )
    head = ret.get("mask_head")
    if head is not None and cfg.MODEL.ROI_MASK_HEAD.UPSAMPLE_TYPE == "carafe":
        deconv = getattr(head, "deconv", None)
        if deconv is None or deconv.in_channels != deconv.out_channels:
            raise ValueError(
                'MODEL.ROI_MASK_HEAD.UPSAMPLE_TYPE "carafe" replaces the 2x `deconv` of '
                f"detectron2's MaskRCNNConvUpsampleHead; {type(head).__name__} has none "
                "with equal input and output channels"
            )
        head.deconv = carafe_from_cfg(cfg.MODEL.ROI_MASK_HEAD, deconv.in_channels)
    return attach_dual_head(cfg, input_shape, attach_tsd(cfg, input_shape, ret))
