"""Per-image LVIS labels for the model: verified negative classes on the GT instances.

detectron2's ``DatasetMapper`` keeps a dataset dict's extra keys (``neg_category_ids``)
in the mapped dict, but ``GeneralizedRCNN`` hands the ROI heads only ``instances``, and
``Instances`` holds per-instance fields only. So the image's verified negative classes
(contiguous ids) ride on every GT instance as the (n, L) int64 field
:data:`NEG_CLASSES_FIELD`, -1 padded, each row the same; indexing, filtering and ``.to()``
keep it. An image left without instances loses it (it has no positive classes either).
"""

from typing import Dict, Sequence

import torch
from detectron2.structures import Instances

__all__ = [
    "NEG_CLASSES_FIELD",
    "attach_neg_classes",
    "needs_image_labels",
    "set_neg_classes",
]

NEG_CLASSES_FIELD = "gt_neg_classes"


def attach_neg_classes(
    instances: Instances, neg_category_ids: Sequence[int], id_map: Dict[int, int]
) -> Instances:
    """Set :data:`NEG_CLASSES_FIELD` on ``instances`` in place.

    Args:
        instances: an image's GT instances (n of them).
        neg_category_ids: the image's ``neg_category_ids`` (dataset category ids).
        id_map: dataset id -> contiguous id (``thing_dataset_id_to_contiguous_id``).

    Returns:
        ``instances``, with an (n, max(L, 1)) int64 field, -1 padded.

    Raises:
        ValueError: a negative category id is not in ``id_map``.
    """
    unknown = [c for c in neg_category_ids if c not in id_map]
    if unknown:
        raise ValueError(f"neg_category_ids {unknown[:5]} are not categories of the dataset")
    return set_neg_classes(instances, [id_map[c] for c in neg_category_ids])


def set_neg_classes(instances: Instances, neg_classes: Sequence[int]) -> Instances:
    """Set :data:`NEG_CLASSES_FIELD` on ``instances`` in place from the image's verified
    negative classes as contiguous ids; returns ``instances``."""
    neg = torch.tensor(list(neg_classes) or [-1], dtype=torch.int64)
    instances.set(NEG_CLASSES_FIELD, neg.expand(len(instances), -1).clone())
    return instances


def needs_image_labels(cfg) -> bool:
    """Whether the model needs :data:`NEG_CLASSES_FIELD`: a federated context head on ROI
    heads that build one (their class says ``builds_context_head``: HTC-Lite and HTC)."""
    from detectron2.modeling import ROI_HEADS_REGISTRY

    node, name = cfg.MODEL.get("ROI_CONTEXT_HEAD"), cfg.MODEL.ROI_HEADS.NAME
    if node is None or not (node.ENABLED and node.FEDERATED) or name not in ROI_HEADS_REGISTRY:
        return False
    return bool(getattr(ROI_HEADS_REGISTRY.get(name), "builds_context_head", False))
