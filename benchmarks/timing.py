"""Timing shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so this
folder is on ``sys.path``): interleaved calls and medians, synchronised on CUDA."""

import statistics
import time

import torch


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_times(fns, repeats: int, device) -> dict:
    """Median seconds of each function of ``fns`` (a dict), after one warm-up call each;
    calls are interleaved so that drifting machine load affects all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
