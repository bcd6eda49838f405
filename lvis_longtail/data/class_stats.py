"""Per-class training statistics that long-tail losses and samplers need.

They always come from the dataset (LVIS json ``categories`` fields or a recount of the
annotations, see :mod:`lvis_longtail.data.lvis_format`), exposed as detectron2 metadata:

- ``class_image_count``: list[int] (K,), training images containing each class;
- ``class_instance_count``: list[int] (K,), training instances of each class;
- ``class_frequency``: list[str] (K,), LVIS frequency group "r" | "c" | "f";
- ``num_annotated_images``: int, training images with at least one annotation.
"""

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from detectron2.data import MetadataCatalog

from lvis_longtail.data.categories import category_fields, dataset_categories

logger = logging.getLogger(__name__)

STAT_FIELDS = (
    "class_image_count",
    "class_instance_count",
    "class_frequency",
    "num_annotated_images",
)


@dataclass(frozen=True)
class ClassStats:
    """Class statistics of a training set.

    Attributes:
        image_count: (K,) float64, images containing each class.
        instance_count: (K,) float64, instances of each class.
        frequency: K strings in {"r", "c", "f"}.
        num_images: number of images with at least one annotation.
    """

    image_count: torch.Tensor
    instance_count: torch.Tensor
    frequency: tuple
    num_images: int

    @property
    def num_classes(self) -> int:
        return int(self.image_count.numel())

    @property
    def image_frequency(self) -> torch.Tensor:
        """(K,) fraction of training images that contain each class (EQL's f_j, RFS's f(c))."""
        return self.image_count / max(self.num_images, 1)


def frequency_group(image_count: int) -> str:
    """LVIS frequency group from a training image count: <= 10 rare, 11-100 common, > 100."""
    if image_count <= 10:
        return "r"
    return "c" if image_count <= 100 else "f"


def get_class_stats(dataset_names: Union[str, Sequence[str]]) -> ClassStats:
    """Class statistics summed over the given (training) datasets.

    Raises:
        KeyError: a dataset's metadata lacks the statistics, or datasets disagree on K.
    """
    if isinstance(dataset_names, str):
        dataset_names = [dataset_names]
    if not dataset_names:
        raise KeyError("get_class_stats needs at least one dataset name (DATASETS.TRAIN is empty)")
    image_count = instance_count = None
    num_images = 0
    frequency = None
    for name in dataset_names:
        meta = MetadataCatalog.get(name)
        try:  # lazily derived from the json
            missing = [f for f in STAT_FIELDS if not hasattr(meta, f)]
        except OSError as e:
            raise FileNotFoundError(
                f"dataset '{name}': its class statistics come from its json, which the "
                "frequency-aware losses and calibrations need whenever the model is built "
                f"(--eval-only included; their buffers are not checkpointed): {e}"
            ) from e
        if missing:
            raise KeyError(
                f"dataset '{name}' has no class statistics (missing metadata {missing}); register "
                "it with lvis_longtail.data.register_lvis_format or DATASETS.LVIS_FORMAT"
            )
        img = torch.tensor(meta.class_image_count, dtype=torch.float64)
        ins = torch.tensor(meta.class_instance_count, dtype=torch.float64)
        if image_count is not None and img.numel() != image_count.numel():
            raise KeyError(
                f"dataset '{name}' has {img.numel()} classes, the previous ones "
                f"{image_count.numel()}"
            )
        image_count = img if image_count is None else image_count + img
        instance_count = ins if instance_count is None else instance_count + ins
        num_images += int(meta.num_annotated_images)
        frequency = frequency or tuple(meta.class_frequency)
    if len(dataset_names) > 1:  # groups follow the summed counts
        frequency = tuple(frequency_group(int(c)) for c in image_count)
    return ClassStats(image_count, instance_count, frequency, num_images)


def _json_frequency(name: str) -> Optional[tuple]:
    """The ``frequency`` fields of a dataset's json categories when all have one, else None
    (also for a malformed json, which the full read then reports).

    Raises:
        FileNotFoundError: the json does not exist."""
    try:
        cats = dataset_categories(name)
    except ValueError:
        return None
    groups = None if cats is None else category_fields(cats, "frequency")
    return None if groups is None else tuple(groups)


def training_frequency(dataset_names: Sequence[str]) -> Tuple[Optional[tuple], str]:
    """The training set's frequency groups per contiguous class id, and where they came from.

    Returns:
        ``(groups, description)``; ``(None, reason)`` when no training split is known (no
        names, or their metadata or json is not available, as in an eval-only run on a
        foreign json).
    """
    names = [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
    if not names:
        return None, "no training split given (DATASETS.TRAIN is empty)"
    if len(names) == 1 and "class_frequency" not in MetadataCatalog.get(names[0]).as_dict():
        try:  # the categories alone, when they carry the groups
            groups = _json_frequency(names[0])
        except OSError as e:
            logger.warning(f"No frequency groups from the training split {names}: {e}")
            return None, f"training split {names} not available ({type(e).__name__})"
        if groups is not None:
            return groups, f"the training split {names[0]} (its json's 'frequency' fields)"
    try:
        stats = get_class_stats(names)
        from_json = all(MetadataCatalog.get(n).get("frequency_from_json", False) for n in names)
    except (KeyError, OSError, ValueError) as e:
        logger.warning(f"No frequency groups from the training split {names}: {e}")
        return None, f"training split {names} not available ({type(e).__name__})"
    how = "its json's 'frequency' fields" if from_json else "recounted from its annotations"
    if len(names) > 1:
        how = "recounted from their summed image counts"
    return stats.frequency, f"the training split {', '.join(names)} ({how})"
