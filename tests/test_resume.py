"""Exact resume: K iterations uninterrupted == K/2, checkpoint, a new trainer with resume, K/2
more: same weights, loss statistics (Seesaw / EQLv2 buffers), SGD momentum, LR scheduler and
data stream position (also with pseudo-labelled extra images), on CPU with
DATALOADER.NUM_WORKERS 0."""

import pickle

import pytest
import torch
from conftest import TINY_BASE
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from lvis_longtail.data.builtin import register_synthetic
from lvis_longtail.data.synthetic import generate
from lvis_longtail.engine import Trainer, setup_cfg
from lvis_longtail.engine.resume import ResumableSampler, rng_state, set_rng_state

K = 4
SEED = 3


@pytest.fixture(scope="module")
def two_aspect_sets(tmp_path_factory):
    """Landscape and portrait images, so the aspect-ratio buckets hold partial batches."""
    root = tmp_path_factory.mktemp("resume_data")
    for name, size in (("wide", (48, 64)), ("tall", (64, 48))):
        generate(
            str(root / name),
            seed=3,
            num_train=12,
            num_val=1,
            num_test=1,
            image_size=size,
            num_classes=6,
            progress=False,
        )
        register_synthetic(str(root / name), prefix=f"lt_resume_{name}")
    return root


# the tall images as a pseudo-labelled extra set: 4 of them per epoch, losses weighted 0.5,
# batched apart from the main images (4 buckets), sampled by ExtraImagesSampler
EXTRA = {
    "MODEL.META_ARCHITECTURE": "LongTailRCNN",
    "DATASETS.TRAIN": "('lt_resume_wide_train',)",
    "DATASETS.EXTRA_TRAIN": "('lt_resume_tall_train',)",
    "DATASETS.EXTRA_TRAIN_PER_EPOCH": 4,
    "DATASETS.EXTRA_TRAIN_LOSS_WEIGHT": 0.5,
}


def resume_cfg(out, loss, extra=False):
    opts = {
        "MODEL.ROI_HEADS.NUM_CLASSES": 6,
        "MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME": loss,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 16,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": 32,
        "INPUT.MIN_SIZE_TRAIN": (40, 48),
        "INPUT.MAX_SIZE_TRAIN": 64,
        "DATASETS.TRAIN": "('lt_resume_wide_train', 'lt_resume_tall_train')",
        "DATASETS.TEST": "()",
        "DATALOADER.NUM_WORKERS": 0,
        "SOLVER.IMS_PER_BATCH": 3,
        "SOLVER.BASE_LR": 0.01,
        "SOLVER.MOMENTUM": 0.9,
        "SOLVER.WARMUP_ITERS": 1,
        "SOLVER.STEPS": (K // 2 + 1,),  # the LR drops after the interruption
        "SOLVER.MAX_ITER": K,
        "SOLVER.CHECKPOINT_PERIOD": K // 2,
        "SEED": SEED,
        "OUTPUT_DIR": str(out),
        **(EXTRA if extra else {}),
    }
    return setup_cfg(str(TINY_BASE), [str(x) for kv in opts.items() for x in kv])


class _Interrupted(Exception):
    pass


class _StopAfter(HookBase):
    """Raises after the checkpoint of iteration ``it`` was written (a killed job)."""

    def __init__(self, it):
        self.it = it

    def after_step(self):
        if self.trainer.iter == self.it:
            raise _Interrupted


def new_trainer(cfg):
    seed_all_rng(SEED)  # what default_setup does in every new process
    return Trainer(cfg)


def final_state(trainer):
    opt = trainer.optimizer.state_dict()
    momentum = {k: v["momentum_buffer"].clone() for k, v in opt["state"].items()}
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    return trainer.model.state_dict(), momentum, (trainer.scheduler.last_epoch, lrs)


@pytest.mark.slow  # end to end: trains, is interrupted, resumes
@pytest.mark.parametrize(
    "loss, extra", [("SeesawLoss", False), ("EQLv2", False), ("SeesawLoss", True)]
)
def test_interrupted_and_resumed_run_equals_uninterrupted(two_aspect_sets, tmp_path, loss, extra):
    torch.set_num_threads(1)
    full = new_trainer(resume_cfg(tmp_path / "full", loss, extra))
    full.resume_or_load(resume=False)
    full.train()
    weights, momentum, sched = final_state(full)
    consumed = full._data_stream.state_dict()["samples"]

    part = new_trainer(resume_cfg(tmp_path / "part", loss, extra))
    part.register_hooks([_StopAfter(K // 2 - 1)])
    part.resume_or_load(resume=False)
    with pytest.raises(_Interrupted):
        part.train()
    ckpt = torch.load(tmp_path / "part" / f"model_{K // 2 - 1:07d}.pth", weights_only=True)
    assert ckpt["trainer"]["_trainer"]["optimizer"]["state"], "optimizer state is checkpointed"
    buckets = pickle.loads(ckpt["trainer"]["data_stream"]["buckets"])
    waiting = sum(len(b) for b in buckets)
    assert waiting > 0, "the test needs a partial aspect-ratio bucket at the checkpoint"
    assert ckpt["trainer"]["data_stream"]["samples"] == K // 2 * 3 + waiting

    resumed = new_trainer(resume_cfg(tmp_path / "part", loss, extra))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == K // 2
    resumed.train()
    r_weights, r_momentum, r_sched = final_state(resumed)

    stats = [k for k in weights if "cum_samples" in k or "pos_grad" in k or "neg_grad" in k]
    assert stats, "the loss keeps statistics in buffers"
    assert weights.keys() == r_weights.keys()
    for k in weights:
        assert torch.equal(weights[k], r_weights[k]), k
    assert momentum.keys() == r_momentum.keys()
    for k in momentum:
        assert torch.equal(momentum[k], r_momentum[k]), k
    assert sched == r_sched and sched[0] == K
    stream = resumed._data_stream.state_dict()
    assert stream["samples"] == consumed >= K * 3
    if extra:  # the sampler's stream, with its per-epoch draw of extra images, was resumed
        assert type(resumed._data_stream._sampler.sampler).__name__ == "ExtraImagesSampler"
        assert len(buckets) == 4


def test_resumable_sampler_skips_the_consumed_indices():
    from detectron2.data.samplers import RepeatFactorTrainingSampler

    base = RepeatFactorTrainingSampler(torch.tensor([1.0, 2.5, 1.0, 3.2]), seed=5)
    stream = ResumableSampler(base)
    first = [i for _, i in zip(range(20), stream)]
    stream.skip = 7
    assert [i for _, i in zip(range(13), stream)] == first[7:]
    fresh = ResumableSampler(RepeatFactorTrainingSampler(torch.ones(4), seed=9))
    fresh.seed = 5  # the checkpointed seed replaces a random one
    assert fresh.seed == 5
    # multi-image steps group detectron2's sampler: the seed is the wrapped sampler's
    from lvis_longtail.data.loader import GroupedSampler

    grouped = ResumableSampler(
        GroupedSampler(RepeatFactorTrainingSampler(torch.ones(4), seed=9), 2)
    )
    assert grouped.seed == 9
    grouped.seed = 5
    same = ResumableSampler(GroupedSampler(RepeatFactorTrainingSampler(torch.ones(4), seed=5), 2))
    assert [g for _, g in zip(range(6), grouped)] == [g for _, g in zip(range(6), same)]


def test_rng_state_round_trip_is_exact():
    import random

    import numpy as np

    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2:] == b[2:]
