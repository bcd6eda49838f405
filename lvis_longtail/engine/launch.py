"""detectron2's ``launch()``, extended to CPU processes and to preemption.

detectron2 0.6's ``launch`` asserts CUDA in every worker and uses NCCL. With ``backend="gloo"``
(what ``train_net.py`` picks for ``MODEL.DEVICE cpu``) the same multi-process, multi-machine
semantics run on CPU, so the distributed code paths can be tested without a GPU. With NCCL the
workers are detectron2's own (``_distributed_worker``). Both differ from ``mp.spawn`` in how
the launcher waits (see :mod:`lvis_longtail.engine.faults`): SIGTERM and SIGUSR1 sent to the
launcher are passed on to the workers, and when workers exit with ``PREEMPTED_EXIT_CODE``
(checkpoint saved) the others get a grace period to finish on their own before being
terminated, and the launcher exits with that code too.
"""

import logging
import os
from datetime import timedelta
from typing import Callable, Optional

import cv2
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.data import build as d2_build
from detectron2.engine.launch import _distributed_worker, _find_free_port
from detectron2.utils import comm

from lvis_longtail.engine.faults import (
    PREEMPTED_EXIT_CODE,
    TrainingPreempted,
    forward_preemption_signals,
)

DEFAULT_TIMEOUT = timedelta(minutes=30)
# Once a worker has exited with an error or PREEMPTED_EXIT_CODE, the others get this long to
# exit on their own (a preempted rank's peers are finishing their after_train hooks) before
# SIGTERM, and as long again before SIGKILL.
EXIT_GRACE_S = 10.0


def launch(
    main_func,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args=(),
    backend: str = "nccl",
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` in ``num_processes_per_machine`` processes on each machine.

    Args:
        main_func: the function every process runs.
        num_processes_per_machine: GPUs per machine (nccl) or CPU processes per machine (gloo).
        num_machines, machine_rank, dist_url, timeout: as in detectron2's ``launch``;
            ``dist_url="auto"`` picks a free local port (single machine only).
        backend: "nccl" (detectron2's workers, one GPU per process) or "gloo" (CPU processes).

    Raises:
        TrainingPreempted: a worker exited with ``PREEMPTED_EXIT_CODE``.
    """
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' is not supported in multi-machine jobs")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    context = mp.start_processes(
        _cpu_worker if backend == "gloo" else _distributed_worker,
        nprocs=num_processes_per_machine,
        args=(
            main_func,
            world_size,
            num_processes_per_machine,
            machine_rank,
            dist_url,
            args,
            timeout,
        ),
        daemon=False,
        start_method="spawn",
        join=False,
    )
    with forward_preemption_signals(context.processes):
        try:
            while not context.join(grace_period=EXIT_GRACE_S):
                pass
        except mp.ProcessExitedException as e:
            if e.exit_code == PREEMPTED_EXIT_CODE:
                raise TrainingPreempted() from None
            raise


def _cpu_worker(
    local_rank, main_func, world_size, per_machine, machine_rank, dist_url, args, timeout
):
    global_rank = machine_rank * per_machine + local_rank
    try:
        dist.init_process_group(
            "gloo", init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
        )
    except Exception as e:
        logging.getLogger(__name__).error(f"Process group URL: {dist_url}")
        raise e
    # detectron2's comm.get_local_rank() needs the group of the processes on this machine.
    for i in range(world_size // per_machine):
        group = dist.new_group(list(range(i * per_machine, (i + 1) * per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    main_func(*args)


def cpu_threads(cfg, processes_per_machine: int = 1) -> int:
    """Torch threads per process for ``CPU_THREADS`` (docs/config_keys.md):
    the key, else ``$LVIS_LONGTAIL_CPU_THREADS``, else ``$OMP_NUM_THREADS``, else
    ``cores // processes - DATALOADER.NUM_WORKERS``, at least 1."""
    if cfg.CPU_THREADS > 0:
        return int(cfg.CPU_THREADS)
    for var in ("LVIS_LONGTAIL_CPU_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_process = max(1, (cores or 1) // max(1, processes_per_machine))
    return max(1, per_process - cfg.DATALOADER.NUM_WORKERS)


# detectron2's seed reset for DataLoader workers, taken before limit_worker_opencv_threads
# replaces the module attribute: pickle finds functions by their qualified name, which
# then names the replacement, so the original travels to spawned workers as a marker.
_D2_RESET_SEED = d2_build.worker_init_reset_seed
_D2_RESET_SEED_MARK = "detectron2.data.build.worker_init_reset_seed"


class OpenCVThreadsWorkerInit:
    """A DataLoader ``worker_init_fn``: limits OpenCV's thread pool in the worker to
    ``threads``, then calls ``base`` (e.g. detectron2's seed reset). A picklable object, so
    it also reaches workers started by ``spawn`` (the workers of every rank that
    :func:`launch` starts), which inherit nothing from their parent."""

    def __init__(self, threads: int, base: Optional[Callable[[int], None]] = None):
        self.threads = int(threads)
        self.base = base.base if isinstance(base, OpenCVThreadsWorkerInit) else base

    def __call__(self, worker_id: int) -> None:
        cv2.setNumThreads(self.threads)
        if self.base is not None:
            self.base(worker_id)

    def __getstate__(self):
        base = _D2_RESET_SEED_MARK if self.base is _D2_RESET_SEED else self.base
        return {"threads": self.threads, "base": base}

    def __setstate__(self, state):
        self.threads = state["threads"]
        base = state["base"]
        self.base = _D2_RESET_SEED if base == _D2_RESET_SEED_MARK else base


def limit_worker_opencv_threads(threads: int) -> None:
    """Limit OpenCV in the workers of every detectron2 training loader built from now on:
    detectron2 gives them ``worker_init_fn=detectron2.data.build.worker_init_reset_seed``,
    looked up when a loader is built, which becomes :class:`OpenCVThreadsWorkerInit` around
    the original (idempotent). The test loaders' workers: ``Trainer.build_test_loader``."""
    d2_build.worker_init_reset_seed = OpenCVThreadsWorkerInit(
        threads, d2_build.worker_init_reset_seed
    )


def configure_cpu_threads(cfg, processes_per_machine: int = 1) -> None:
    """Thread counts of this process and of its data workers.

    On every device OpenCV gets ``OPENCV_THREADS`` threads, in this process and in
    each DataLoader worker (:func:`limit_worker_opencv_threads`): otherwise each of the
    GPUs x ``DATALOADER.NUM_WORKERS`` workers of a node may start an all-cores pool. For CPU
    runs torch's intra-op threads follow :func:`cpu_threads` (torch sets one thread in each
    worker itself); on GPU torch's are left alone."""
    opencv = int(cfg.OPENCV_THREADS)
    cv2.setNumThreads(opencv)
    limit_worker_opencv_threads(opencv)
    log = logging.getLogger(__name__)
    if cfg.MODEL.DEVICE != "cpu":
        log.info(f"OpenCV threads: {opencv} per process and data worker (OPENCV_THREADS)")
        return
    threads = cpu_threads(cfg, processes_per_machine)
    torch.set_num_threads(threads)
    log.info(
        f"CPU threads: torch {threads}, OpenCV {opencv} per process and data worker "
        "(CPU_THREADS, $LVIS_LONGTAIL_CPU_THREADS or $OMP_NUM_THREADS to change)"
    )
