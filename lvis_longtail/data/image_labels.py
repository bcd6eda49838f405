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
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.structures import Instances

__all__ = [
    "NEG_CLASSES_FIELD",
    "LVISImageLabelsMapper",
    "attach_neg_classes",
    "needs_image_labels",
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
    neg = torch.tensor([id_map[c] for c in neg_category_ids] or [-1], dtype=torch.int64)
    instances.set(NEG_CLASSES_FIELD, neg.expand(len(instances), -1).clone())
    return instances


class LVISImageLabelsMapper(DatasetMapper):
    """detectron2's ``DatasetMapper`` plus :func:`attach_neg_classes` on the mapped
    instances (training), for the federated context loss of HTC-Lite."""

    def __init__(self, cfg, is_train: bool = True):
        super().__init__(cfg, is_train)
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        self.id_map = dict(meta.get("thing_dataset_id_to_contiguous_id", {}))

    def __call__(self, dataset_dict):
        neg = dataset_dict.get("neg_category_ids")
        out = super().__call__(dataset_dict)
        if "instances" in out and neg is not None:
            try:
                attach_neg_classes(out["instances"], neg, self.id_map)
            except ValueError as e:
                raise ValueError(
                    f"{dataset_dict.get('file_name')} (image id {dataset_dict.get('image_id')}): "
                    f"field 'neg_category_ids': {e}"
                ) from None
        return out


def needs_image_labels(cfg) -> bool:
    """Whether the model needs :data:`NEG_CLASSES_FIELD` (a federated context head)."""
    node = cfg.MODEL.get("ROI_CONTEXT_HEAD")
    htc_lite = cfg.MODEL.ROI_HEADS.NAME == "LongTailHTCLiteROIHeads"
    return bool(htc_lite and node is not None and node.ENABLED and node.FEDERATED)
