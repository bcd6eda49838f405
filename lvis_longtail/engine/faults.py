"""Faults a long training run meets: preemption signals and unreadable training images.

Preemption. Cluster schedulers send SIGTERM (preemption, ``scancel``, the time limit) or a
signal the job asked for ahead of its end (SLURM ``#SBATCH --signal=USR1@120``).
:class:`PreemptionHook` turns SIGTERM and SIGUSR1 into: finish the current iteration, agree
across ranks, save ``model_<iteration>.pth`` as a periodic checkpoint would be saved, shut the
data-loader workers down, and exit with :data:`PREEMPTED_EXIT_CODE`. ``--resume`` continues
from that checkpoint as from any other (exactly, in the documented exact case of
:mod:`lvis_longtail.engine.resume`).

Agreement: the signal handler only records the signal. After every iteration each rank adds
its flag to one all-reduce (MAX) of a CPU int over detectron2's gloo group, so every rank sees
the same decision at the same iteration without a device synchronisation; in one process
there is no collective at all. Data-loader workers ignore both signals (a scheduler signals
every process of the job step): the training process owns the shutdown.

Unreadable images. :class:`SkippedImagesReport` puts the number of training samples skipped
for an unreadable image (``DATALOADER.SKIP_UNREADABLE_IMAGES``) in the metrics
(``data/skipped_images``) and logs it at the end of training.

:func:`fault_tolerance_hooks` adds both hooks to detectron2's default hooks.
"""

import contextlib
import logging
import os
import signal
import threading
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.utils.data as torchdata
from detectron2.engine import HookBase
from detectron2.engine import hooks as d2_hooks
from detectron2.utils import comm

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# EX_TEMPFAIL of sysexits.h: a temporary failure, the same command will succeed when run
# again (a job script can requeue on it: `[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID`).
PREEMPTED_EXIT_CODE = 75


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank: one all-reduce (MAX) of a CPU int over
    detectron2's gloo group (no device synchronisation); no collective in one process. Every
    rank must call it at the same point."""
    if comm.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=comm._get_global_gloo_group())
    return bool(value.item())


class TrainingPreempted(SystemExit):
    """Training stopped after a preemption signal, its checkpoint saved; the process exits
    with :data:`PREEMPTED_EXIT_CODE`."""

    def __init__(self, iteration: Optional[int] = None):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.iteration = iteration


class PreemptionHook(HookBase):
    """On SIGTERM or SIGUSR1 (any rank): save a checkpoint after the current iteration, stop
    the data-loader workers, raise :class:`TrainingPreempted` on every rank. When training
    ends for any reason, the training loader's workers are shut down.

    Register it after the LR scheduler and the periodic checkpointer (the checkpoint must hold
    the same state theirs would) and before evaluation (a pending stop does not wait for it).

    Args:
        checkpointer: the trainer's checkpointer (only the main process writes).
    """

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer
        self.received = None
        self._previous = {}

    def _record(self, signum, frame):  # a signal handler: only records
        self.received = signum

    def before_train(self):
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training outside the main thread: preemption signals not handled")
            return
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)

    def after_train(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        # the workers ignore SIGTERM, which is also how Python's exit ends daemonic children:
        # left running, they would keep a trainer that outlives training (it evaluates) and
        # then the interpreter's exit waiting on them
        close_train_loader(self.trainer)

    def after_step(self):
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            return  # the final checkpoint is being written anyway
        if any_rank(self.received is not None):
            self._save_and_stop(self.trainer.iter)

    def _save_and_stop(self, iteration: int) -> None:
        what = signal.Signals(self.received).name if self.received else "another rank's signal"
        name = f"model_{iteration:07d}"
        logger.warning(f"{what}: saving {name}.pth and stopping (exit {PREEMPTED_EXIT_CODE})")
        if os.path.basename(self.checkpointer.get_checkpoint_file()) != f"{name}.pth":
            self.checkpointer.save(name, iteration=iteration)  # a no-op on other ranks
        close_train_loader(self.trainer)
        comm.synchronize()  # no rank exits before the checkpoint is on disk
        raise TrainingPreempted(iteration)


class SkippedImagesReport(HookBase):
    """Reports the training samples skipped for an unreadable image.

    Args:
        skipped: the mapper's :class:`~lvis_longtail.data.image_io.SkippedImages`.
    """

    def __init__(self, skipped):
        self.skipped = skipped

    def after_step(self):
        count = self.skipped.total()
        if count:
            self.trainer.storage.put_scalar("data/skipped_images", count, smoothing_hint=False)

    def after_train(self):
        messages = self.skipped.messages()
        if messages:
            distinct = sorted(set(messages))
            listed = "\n  ".join(distinct[:20]) + ("\n  ..." if len(distinct) > 20 else "")
            logger.warning(
                f"{len(messages)} training samples were skipped because an image could not be "
                f"read ({len(distinct)} distinct; DATALOADER.SKIP_UNREADABLE_IMAGES False stops "
                f"at the first instead):\n  {listed}"
            )


def fault_tolerance_hooks(hooks: List[HookBase], checkpointer, data_loader) -> List[HookBase]:
    """detectron2's default ``hooks`` with a :class:`PreemptionHook` before evaluation and,
    if ``data_loader`` carries ``skipped_images``, a :class:`SkippedImagesReport`."""
    hooks = list(hooks)
    evals = [i for i, h in enumerate(hooks) if isinstance(h, d2_hooks.EvalHook)]
    added = [PreemptionHook(checkpointer)]
    skipped = getattr(data_loader, "skipped_images", None)
    if skipped is not None:
        added.append(SkippedImagesReport(skipped))
    at = evals[0] if evals else len(hooks)  # before evaluation and the metrics writer
    return hooks[:at] + added + hooks[at:]


def close_train_loader(trainer) -> None:
    """Close the training data iterator now, so its workers are shut down and joined (else
    they outlive the process until their watchdog notices)."""
    inner = getattr(trainer, "_trainer", trainer)
    for attr in ("_data_loader_iter", "_data_loader_iter_obj"):
        it = inner.__dict__.get(attr)
        if hasattr(it, "close"):  # a generator: closing it releases the DataLoader iterator
            it.close()
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class _WorkerInit:
    """A DataLoader ``worker_init_fn`` (picklable) that ignores the preemption signals, then
    calls the loader's own."""

    def __init__(self, worker_init_fn):
        self.worker_init_fn = worker_init_fn

    def __call__(self, worker_id: int) -> None:
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if self.worker_init_fn is not None:
            self.worker_init_fn(worker_id)


def workers_ignore_preemption(loader):
    """Make the workers of the ``DataLoader`` inside ``loader`` (a detectron2 training loader:
    the ``DataLoader`` itself or a wrapper holding it as ``.dataset``) ignore the preemption
    signals. Returns ``loader``."""
    node = loader
    while not isinstance(node, torchdata.DataLoader) and hasattr(node, "dataset"):
        node = node.dataset
    if isinstance(node, torchdata.DataLoader) and not isinstance(node.worker_init_fn, _WorkerInit):
        node.worker_init_fn = _WorkerInit(node.worker_init_fn)
    return loader


@contextlib.contextmanager
def forward_preemption_signals(processes):
    """While in the block, pass SIGTERM and SIGUSR1 received by this (launcher) process on to
    ``processes`` that still run: a container runtime or ``sbatch --signal=B:...`` signals
    only the launcher."""

    def forward(signum, frame):
        for p in processes:
            if p.pid is not None and p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in PREEMPTION_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
