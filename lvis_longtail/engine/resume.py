"""Exact resume: the training data stream's position and the random number generators.

detectron2 0.6 checkpoints the model, the iteration and the hooks (the LR scheduler). A
resumed run also needs, to continue as if never interrupted:

- the optimizer (SGD momentum) and the AMP grad scaler: ``SimpleTrainer``/``AMPTrainer``'s
  own ``state_dict`` (saved by :class:`lvis_longtail.engine.Trainer` under ``"_trainer"``);
- the **data stream**: detectron2's ``TrainingSampler``/``RepeatFactorTrainingSampler`` are
  infinite index streams regenerated from their seed on every ``iter()``, so a resumed run
  restarts them. :class:`ResumableSampler` wraps the sampler and skips, on the next
  ``iter()``, the indices already consumed; :class:`DataStream` counts the samples the
  ``DataLoader`` has delivered to the main process (not what the sampler yielded: workers
  prefetch) and snapshots the aspect-ratio buckets (``AspectRatioGroupedDataset`` holds up to
  ``batch - 1`` mapped samples per bucket between batches);
- the global RNGs of this process (torch, NumPy, Python; CUDA when used): detectron2's
  mapper draws augmentations from NumPy's, the ROI heads sample with torch's.

Exact (bit-identical to an uninterrupted run) in one process on CPU with
``DATALOADER.NUM_WORKERS 0``. With workers, the index stream and the buckets continue
exactly but the workers' augmentation RNGs are reseeded. With several processes, rank 0's
position and RNGs are saved (only rank 0 writes checkpoints); other ranks skip rank 0's
sample count (their exact position without aspect-ratio grouping, where every rank consumes
``iterations x batch``) and keep their freshly seeded RNGs.
"""

import logging
import pickle
import random
from typing import Optional

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.data.common import AspectRatioGroupedDataset, ToIterableDataset
from detectron2.utils import comm

logger = logging.getLogger(__name__)


class ResumableSampler(torchdata.Sampler):
    """Wraps a detectron2 training sampler: the same infinite index stream, whose first
    ``skip`` indices are dropped on the next ``iter()`` (regenerated from the sampler's seed,
    which only costs index generation).

    Args:
        sampler: an iterable of indices that restarts from its seed on each ``iter()``
            (``TrainingSampler``, ``RepeatFactorTrainingSampler``).
    """

    def __init__(self, sampler):
        self.sampler = sampler
        self.skip = 0

    def _seeded(self):
        """The sampler that holds the seed: ``sampler`` or the one it wraps (``.sampler``, as
        :class:`~lvis_longtail.data.loader.GroupedSampler` wraps detectron2's)."""
        s = self.sampler
        while not hasattr(s, "_seed") and hasattr(s, "sampler"):
            s = s.sampler
        return s if hasattr(s, "_seed") else None

    @property
    def seed(self) -> Optional[int]:
        s = self._seeded()
        return None if s is None else s._seed

    @seed.setter
    def seed(self, value: Optional[int]) -> None:
        s = self._seeded()
        if value is not None and s is not None:
            s._seed = int(value)

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it)
        yield from it

    def __len__(self):
        return len(self.sampler)


class _CountingLoader:
    """Iterates a ``DataLoader`` and counts the samples it delivers; ``prime()`` creates the
    loader's iterator ahead of the first ``next()`` (which draws its base seed from torch's
    RNG), so the RNGs can be restored after it."""

    def __init__(self, loader, batched: bool):
        self.loader = loader
        self.batched = batched
        self.count = 0
        self._primed = None

    def prime(self) -> None:
        if self._primed is None:
            self._primed = iter(self.loader)

    def __iter__(self):
        it = self._primed if self._primed is not None else iter(self.loader)
        self._primed = None
        for item in it:
            self.count += len(item) if self.batched else 1
            yield item

    def __len__(self):
        return len(self.loader)


def rng_state() -> dict:
    """The global RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    key = npy["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, npy["pos"], npy["has_gauss"], npy["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DataStream:
    """The resumable state of a detectron2 training loader (see the module docstring).

    Built by :meth:`attach` from ``SimpleTrainer.data_loader`` as
    ``build_detection_train_loader`` makes it: ``[MapDataset(collate_fn)] ->
    [AspectRatioGroupedDataset] -> DataLoader -> ToIterableDataset(dataset, sampler)``.
    """

    def __init__(self, grouped, counter, sampler):
        self._grouped = grouped
        self._counter = counter
        self._sampler = sampler

    @classmethod
    def attach(cls, simple_trainer) -> Optional["DataStream"]:
        """Wrap the sampler and the ``DataLoader`` of ``simple_trainer.data_loader`` in place.
        Returns None (with a warning) for a loader of another structure."""
        top = simple_trainer.data_loader
        node = getattr(top, "_dataset", top)  # MapDataset(grouped, collate_fn), if any
        grouped = node if isinstance(node, AspectRatioGroupedDataset) else None
        loader = grouped.dataset if grouped is not None else node
        if not isinstance(loader, torchdata.DataLoader) or not isinstance(
            loader.dataset, ToIterableDataset
        ):
            logger.warning(
                f"Training loader {type(top).__name__} is not detectron2's "
                "build_detection_train_loader structure: its position is not checkpointed, "
                "so --resume restarts the data stream from its seed."
            )
            return None
        sampler = ResumableSampler(loader.dataset.sampler)
        loader.dataset.sampler = sampler
        counter = _CountingLoader(loader, batched=grouped is None)
        if grouped is not None:
            grouped.dataset = counter
        else:
            simple_trainer._data_loader_iter = iter(counter)
        return cls(grouped, counter, sampler)

    def state_dict(self) -> dict:
        state = {
            "samples": self._sampler.skip + self._counter.count,
            "seed": self._sampler.seed,
            "rng": rng_state(),
        }
        if self._grouped is not None:
            size = self._grouped.batch_size
            # a full bucket is the batch just yielded, emptied on the next step
            buckets = [list(b) if len(b) < size else [] for b in self._grouped._buckets]
            # mapped samples (Instances, ...) as pickled bytes: fvcore loads checkpoints with
            # torch.load's default weights_only=True; these are only read back on --resume
            # from this run's own OUTPUT_DIR
            state["buckets"] = pickle.dumps(buckets)
        return state

    def load_state_dict(self, state: dict) -> None:
        self._sampler.skip = int(state["samples"])
        self._sampler.seed = state.get("seed")
        if self._grouped is not None and "buckets" in state and comm.get_rank() == 0:
            self._grouped._buckets = pickle.loads(state["buckets"])
        self._counter.count = 0
        self._counter.prime()
        if comm.get_rank() == 0:
            set_rng_state(state["rng"])
        logger.info(
            f"Resumed the training data stream after {self._sampler.skip} samples "
            f"(sampler seed {self._sampler.seed})."
        )
