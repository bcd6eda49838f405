"""benchmarks/roi_heads_speed.py measures CPU memory in forked children: they must not hang
when the parent has already run torch with several threads (a forked child's OpenMP pool has
no threads; its first parallel region used to wait for them forever)."""

import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO

CHILD = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("roi_heads_speed", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
torch.set_num_threads(2)
a = torch.randn(512, 512)
x, w = torch.randn(1, 8, 64, 64), torch.randn(8, 8, 3, 3)
(a @ a).sum(), torch.nn.functional.conv2d(x, w).sum()  # the parent's thread pool starts

def step():
    held = torch.ones(16, 1024, 1024)  # 64 MiB, touched
    return (a @ a).sum() + torch.nn.functional.conv2d(x, w).sum() + held.sum()

print("peak", bench._peak_of(step, "cpu"))
"""


@pytest.mark.slow
def test_forked_memory_measurement_works_after_multithreaded_torch():
    path = os.pathsep.join([str(REPO), str(REPO / "benchmarks")])  # as a script run has it
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=path)
    script = str(REPO / "benchmarks" / "roi_heads_speed.py")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the hung forked child too
        proc.communicate()
        pytest.fail("the forked memory measurement hung")
    assert proc.returncode == 0, err[-2000:]
    peak = float(out.split("peak")[-1])
    assert 60 <= peak <= 400, out
