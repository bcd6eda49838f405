"""Waiting for the main process's long work (LVIS evaluation) without a collective timeout.

Only the main process exports and scores an evaluation (about 6M detections with Fixed AP on
LVIS v1 val); the others return at once and would wait for it in their next collective: the
NCCL barrier after an evaluation, or the next split's shard gather, whose timeout is the
process group's (30 minutes by default). :func:`wait_for_main_process`, called by every
process when that work ends, makes them wait instead on a gloo group of its own whose
timeout is sized for evaluation (``TEST.EVAL_WAIT_MINUTES``), so every process leaves it
together and the next collective starts aligned. The main process also sends whether its
work succeeded, so the others stop with an error instead of training on alone.

Why a gloo group: CPU waits cost no GPU stream and no NCCL watchdog, and a group of its own
has its own timeout without lengthening the one that catches real hangs in training.
"""

import functools
from datetime import timedelta

import torch.distributed as dist
from detectron2.utils import comm

__all__ = ["wait_for_main_process"]


@functools.cache
def _wait_group(timeout_seconds: float, world):
    """A gloo group of all processes of the process group ``world`` with this timeout
    (created once per world and timeout, by every process)."""
    del world  # the cache key: a new default group needs a new wait group
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_seconds))


def wait_for_main_process(ok: bool, timeout: timedelta) -> None:
    """Called by every process: the main one announces the end of its work and ``ok``, the
    others wait up to ``timeout`` for it (no-op outside a multi-process run).

    Raises:
        RuntimeError: on the other processes, when the main one reports ``ok=False``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    status = [bool(ok) if comm.is_main_process() else None]
    dist.broadcast_object_list(
        status, src=0, group=_wait_group(timeout.total_seconds(), dist.group.WORLD)
    )
    if not status[0] and not comm.is_main_process():
        raise RuntimeError("the main process failed in its evaluation; see its log")
