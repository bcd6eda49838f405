"""Timing shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so this
folder is on ``sys.path``): interleaved calls and medians, synchronised on CUDA, and fresh
child processes measured for time and peak memory."""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
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


def run_child(script: str, *args, env=None, check: bool = True) -> tuple:
    """Run ``python script *args OUT`` in a fresh process that writes its result as json to OUT.

    Returns:
        (that json; without one, or when the child fails, a RuntimeError with ``check``, else
        ``{"error": ...}``; the child's peak RSS in MiB from ``os.wait4``, imports included).
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(script), *map(str, args), out]
    _, status, usage = os.wait4(subprocess.Popen(cmd, env=env).pid, 0)
    code = os.waitstatus_to_exitcode(status)
    try:
        with open(out) as f:
            result = json.load(f) if os.path.getsize(out) else None
    finally:
        os.remove(out)
    if check and (code or result is None):
        raise RuntimeError(f"{os.path.basename(script)} {args} failed with exit status {code}")
    return result or {"error": f"exit status {code}"}, usage.ru_maxrss / 1024  # KiB on Linux


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), 0)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (e.g. a worker pool)."""
    own, done = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + done.ru_utime + done.ru_stime


def child_main(fn, args, out: str) -> None:
    """The timed part of a :func:`run_child` process, after its imports: ``fn(*args)``, written
    to ``out`` with its wall and CPU seconds, the RSS after the imports (``baseline_mib``) and
    the peak RSS above it during the call (``growth_mib``; VmHWM reset through clear_refs)."""
    baseline = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        pass
    start, cpu = time.perf_counter(), _cpu_seconds()
    result = fn(*args)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    growth = (_status_kib("VmHWM") - baseline) / 1024
    with open(out, "w") as f:
        json.dump({"result": result, "seconds": seconds, "cpu_seconds": cpu,
                   "baseline_mib": baseline / 1024, "growth_mib": growth}, f)  # fmt: skip
