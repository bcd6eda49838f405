"""The training data loader: detectron2's, with groups of images for multi-image steps.

Multi-image steps (mosaic, copy-paste) take their extra images from the same training sampler
as the main image: :class:`GroupedSampler` yields consecutive tuples of its indices, so
repeat-factor sampling decides which images appear in every slot, extra ones included.
"""

import itertools
import logging
import random

import torch.utils.data as torchdata
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data.build import _train_loader_from_config
from detectron2.data.common import AspectRatioGroupedDataset, DatasetFromList

from lvis_longtail.data.extra_images import LossWeightGroupedDataset, extra_images_dataset
from lvis_longtail.data.lvis_json import shared_reads
from lvis_longtail.data.mapper import LongTailDatasetMapper

logger = logging.getLogger(__name__)


class GroupedSampler(torchdata.Sampler):
    """Yields tuples of ``group_size`` consecutive indices of an (infinite) sampler."""

    def __init__(self, sampler, group_size: int):
        self.sampler = sampler
        self.group_size = int(group_size)

    def __iter__(self):
        it = iter(self.sampler)
        while True:
            group = tuple(itertools.islice(it, self.group_size))
            if len(group) < self.group_size:
                return
            yield group


class GroupMapDataset(torchdata.Dataset):
    """Maps a tuple of dataset indices with ``mapper.map_group``. A group that maps to None
    (every instance removed) is replaced by a random earlier successful group, or by random
    indices before there is one (as detectron2's ``MapDataset`` retries)."""

    def __init__(self, dataset, mapper: LongTailDatasetMapper, seed: int = 42):
        self.dataset = dataset
        self.mapper = mapper
        self._rng = random.Random(seed)
        self._fallback = []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, group):
        group = tuple(int(i) for i in group)
        for attempt in range(100):
            data = self.mapper.map_group([self.dataset[i] for i in group])
            if data is not None:
                if len(self._fallback) < 1000:
                    self._fallback.append(group)
                return data
            if attempt == 2:
                logger.warning(f"Mapping the image group {group} failed 3 times; retrying")
            if self._fallback:
                group = self._rng.choice(self._fallback)
            else:
                group = tuple(self._rng.randrange(len(self.dataset)) for _ in group)
        raise RuntimeError("the dataset mapper returned None for 100 image groups in a row")


def build_longtail_train_loader(cfg, mapper=None):
    """detectron2's training loader with :class:`LongTailDatasetMapper` (or ``mapper``).

    Without multi-image steps it is exactly ``build_detection_train_loader(cfg, mapper)``;
    with them the sampler's indices are grouped (1 + ``mapper.num_extra_images`` per sample).
    ``DATASETS.EXTRA_TRAIN`` adds pseudo-labelled extra images: their own per-epoch
    sub-sample, batches of one source (:mod:`~lvis_longtail.data.extra_images`).

    The loader carries the mapper's count of samples skipped for an unreadable image as
    ``skipped_images`` (when the mapper has one).
    """
    with shared_reads():  # a mapper reading class statistics and the dicts: one parse
        mapper = mapper if mapper is not None else LongTailDatasetMapper(cfg, True)
        kwargs = _train_loader_from_config(cfg, mapper=mapper)
    if cfg.DATASETS.EXTRA_TRAIN:  # pseudo-labelled extra images (extra_images.py)
        kwargs["dataset"], kwargs["sampler"] = extra_images_dataset(cfg, kwargs["dataset"])
    extra = getattr(mapper, "num_extra_images", 0)
    if extra == 0:
        loader = _group_by_loss_weight(cfg, build_detection_train_loader(**kwargs))
    else:
        dataset = kwargs.pop("dataset")
        if isinstance(dataset, list):
            dataset = DatasetFromList(dataset, copy=False)
        kwargs["dataset"] = GroupMapDataset(dataset, kwargs.pop("mapper"), seed=cfg.SEED)
        kwargs["sampler"] = GroupedSampler(kwargs["sampler"], 1 + extra)
        loader = _group_by_loss_weight(cfg, build_detection_train_loader(mapper=None, **kwargs))
    loader.skipped_images = getattr(mapper, "skipped_images", None)
    return loader


def _group_by_loss_weight(cfg, loader):
    """With extra images, batch by loss weight too (:class:`LossWeightGroupedDataset`)."""
    if not cfg.DATASETS.EXTRA_TRAIN or not isinstance(loader, AspectRatioGroupedDataset):
        return loader
    weights = [1.0, float(cfg.DATASETS.EXTRA_TRAIN_LOSS_WEIGHT)]
    return LossWeightGroupedDataset(loader.dataset, loader.batch_size, weights)


def build_longtail_test_loader(cfg, dataset_name: str):
    """detectron2's test loader (``InferenceSampler``: a share of the images per rank) mapping
    with ``LongTailDatasetMapper(cfg, False)``, so test images are read as training ones."""
    return build_detection_test_loader(
        cfg, dataset_name, mapper=LongTailDatasetMapper(cfg, is_train=False)
    )
