"""Pseudo-labelled extra images trained jointly with the main training set.

The 1st place LVIS 2020 entry pseudo-labels unannotated images (Open Images), draws a fresh
sub-sample of them every epoch and trains on them together with LVIS, their losses scaled by
a weight. Here (``DATASETS.EXTRA_TRAIN*``, docs/config_keys.md):

- the records of ``DATASETS.EXTRA_TRAIN`` (registered datasets, e.g. an LVIS-format file of
  pseudo labels from ``python -m lvis_longtail.tools.pseudo_label``) follow those of
  ``DATASETS.TRAIN`` in one list, each with ``loss_weight`` = ``EXTRA_TRAIN_LOSS_WEIGHT``;
- :class:`ExtraImagesSampler` makes the index stream: each epoch is one epoch of the main
  set (every image once, or the repeat-factor sampler's epoch when
  ``DATALOADER.SAMPLER_TRAIN`` is ``RepeatFactorTrainingSampler``; repeat factors come from
  the main set only) plus ``EXTRA_TRAIN_PER_EPOCH`` extra images drawn without replacement,
  shuffled together;
- :class:`LossWeightGroupedDataset` batches like detectron2's ``AspectRatioGroupedDataset``,
  with the buckets also split by ``loss_weight``, so every batch comes from one source and
  :class:`~lvis_longtail.modeling.ignore_regions.LongTailRCNN` scales its losses by the
  batch's weight.
"""

import itertools
import logging
from typing import List, Optional, Sequence, Tuple

import torch
import torch.utils.data as torchdata
from detectron2.data import DatasetCatalog
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.data.common import AspectRatioGroupedDataset
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.utils import comm

__all__ = ["ExtraImagesSampler", "LossWeightGroupedDataset", "extra_images_dataset"]

logger = logging.getLogger(__name__)

LOSS_WEIGHT = "loss_weight"  # the record / mapped-sample key


class ExtraImagesSampler(torchdata.Sampler):
    """Infinite training indices over ``num_main`` main images followed by ``num_extra``
    extra ones (module docstring), split across ranks as detectron2's samplers are.

    Args:
        num_main: images of the main set (indices ``0 .. num_main - 1``).
        num_extra: extra images (indices ``num_main ..``).
        per_epoch: extra images per epoch (at most ``num_extra``; < 0: all).
        repeat_factors: (num_main,) float repeat factors of the main images, or None (each
            main image once per epoch).
        seed: shared by all ranks; None: detectron2's ``shared_random_seed()``.
    """

    def __init__(
        self,
        num_main: int,
        num_extra: int,
        per_epoch: int,
        repeat_factors: Optional[torch.Tensor] = None,
        seed: Optional[int] = None,
    ):
        if num_main <= 0:
            raise ValueError(f"ExtraImagesSampler: the main training set is empty ({num_main})")
        self.num_main, self.num_extra = int(num_main), int(num_extra)
        self.per_epoch = self.num_extra if per_epoch < 0 else min(int(per_epoch), self.num_extra)
        self._rfs = None
        if repeat_factors is not None:
            if len(repeat_factors) != self.num_main:
                raise ValueError(
                    f"ExtraImagesSampler: {len(repeat_factors)} repeat factors for "
                    f"{self.num_main} main images"
                )
            self._rfs = RepeatFactorTrainingSampler(repeat_factors, seed=0)  # its epoch rule
        self._seed = int(comm.shared_random_seed() if seed is None else seed)
        self._rank, self._world_size = comm.get_rank(), comm.get_world_size()

    def epoch_indices(self, generator: torch.Generator) -> torch.Tensor:
        """One epoch: the main set's indices and ``per_epoch`` extra ones, shuffled."""
        if self._rfs is not None:
            main = self._rfs._get_epoch_indices(generator)
        else:
            main = torch.arange(self.num_main)
        extra = torch.randperm(self.num_extra, generator=generator)[: self.per_epoch]
        indices = torch.cat([main, extra + self.num_main])
        return indices[torch.randperm(len(indices), generator=generator)]

    def _infinite_indices(self):
        g = torch.Generator()
        g.manual_seed(self._seed)
        while True:
            yield from self.epoch_indices(g).tolist()

    def __iter__(self):
        yield from itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)


class LossWeightGroupedDataset(AspectRatioGroupedDataset):
    """detectron2's aspect-ratio batching (landscape / portrait buckets), with the buckets
    also split by each sample's ``loss_weight`` (1.0 when absent): every batch holds samples
    of one weight.

    Args:
        dataset: an iterable of mapped samples with "width" and "height".
        batch_size: samples per batch.
        weights: the loss weights that occur.
    """

    def __init__(self, dataset, batch_size: int, weights: Sequence[float]):
        super().__init__(dataset, batch_size)
        self._weights = sorted({float(w) for w in weights} | {1.0})
        self._buckets = [[] for _ in range(2 * len(self._weights))]

    def __iter__(self):
        for d in self.dataset:
            weight = float(d.get(LOSS_WEIGHT, 1.0))
            bucket = self._buckets[
                (0 if d["width"] > d["height"] else 1) + 2 * self._weights.index(weight)
            ]
            bucket.append(d)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                del bucket[:]


def extra_images_dataset(cfg, main: List[dict]) -> Tuple[List[dict], ExtraImagesSampler]:
    """The records ``main`` (of ``DATASETS.TRAIN``, as detectron2's loader config read them)
    then those of ``DATASETS.EXTRA_TRAIN`` (with ``loss_weight``), and the
    :class:`ExtraImagesSampler` over them."""
    sampler_name = cfg.DATALOADER.SAMPLER_TRAIN  # one of two: lvis_longtail.config_check
    filter_empty = cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    extra = []
    for name in cfg.DATASETS.EXTRA_TRAIN:
        records = DatasetCatalog.get(name)
        if filter_empty and not any(r.get("annotations") for r in records):
            raise ValueError(
                f"DATASETS.EXTRA_TRAIN: no image of '{name}' has an annotation ({len(records)} "
                "images): a pseudo-label file without labels (a --score-thresh above every "
                "score?) trains nothing"
            )
        extra += records
    if filter_empty:
        extra = filter_images_with_only_crowd_annotations(extra)
    weight = float(cfg.DATASETS.EXTRA_TRAIN_LOSS_WEIGHT)
    extra = [dict(r, **{LOSS_WEIGHT: weight}) for r in extra]
    repeat_factors = None
    if sampler_name == "RepeatFactorTrainingSampler":
        repeat_factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            main, cfg.DATALOADER.REPEAT_THRESHOLD
        )
    sampler = ExtraImagesSampler(
        len(main), len(extra), cfg.DATASETS.EXTRA_TRAIN_PER_EPOCH, repeat_factors
    )
    logger.info(
        f"Training on {len(main)} images of {list(cfg.DATASETS.TRAIN)} and, per epoch, "
        f"{sampler.per_epoch} of the {len(extra)} extra images of "
        f"{list(cfg.DATASETS.EXTRA_TRAIN)} (loss weight {weight})"
    )
    return main + extra, sampler
