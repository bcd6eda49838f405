"""Faults during training, as real processes of train_net.py on the tiny config (64 px
images, 6 iterations): SIGTERM saves a checkpoint at the current iteration, exits with
status 75, and --resume ends bit-identical to an uninterrupted run (one CPU process, no
DataLoader workers: the documented exact case); SIGKILL in the middle of a checkpoint write
leaves the previous checkpoint and last_checkpoint intact and the next run continues from it;
with 2 ranks a signal on one rank stops both at the same iteration, no DataLoader worker
outlives the run, and unreadable training images are skipped and counted. The launcher
passes the signals it receives on to its workers."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from conftest import REPO, TINY_BASE

from lvis_longtail.data.synthetic import generate
from lvis_longtail.engine.faults import PREEMPTED_EXIT_CODE, forward_preemption_signals

DRIVER = REPO / "tests" / "fault_driver.py"
OPTS = {
    "MODEL.ROI_HEADS.NUM_CLASSES": 6,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 16,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 32,
    "INPUT.MIN_SIZE_TRAIN": "(48,)",
    "INPUT.MAX_SIZE_TRAIN": 64,
    "DATASETS.TEST": "()",
    "DATALOADER.NUM_WORKERS": 0,
    "SOLVER.IMS_PER_BATCH": 2,
    "SOLVER.BASE_LR": 0.01,
    "SOLVER.WARMUP_ITERS": 1,
    "SOLVER.STEPS": "(3,)",
    "SOLVER.MAX_ITER": 6,
    "SOLVER.CHECKPOINT_PERIOD": 2,
    "SEED": 3,
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_datasets")
    generate(str(root / "lt_synthetic"), seed=3, num_train=12, num_val=1, num_test=1,
             image_size=(48, 64), num_classes=6, progress=False)  # fmt: skip
    return root


def command(out, resume=False, num_gpus=1, **opts):
    args = [str(x) for kv in {**OPTS, **opts, "OUTPUT_DIR": out}.items() for x in kv]
    extra = ["--resume"] if resume else []
    if num_gpus > 1:
        extra += ["--num-gpus", str(num_gpus), "--dist-url", "auto"]
    return [sys.executable, str(DRIVER), "--config-file", str(TINY_BASE), *extra, *args]


def start(root, out, faults=None, **kw):
    """Start a training process in its own process group; its output goes to a file (a full
    pipe would block it while the test waits)."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(root), OMP_NUM_THREADS="1", **(faults or {}))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(suffix=".console.txt", dir=out.parent)
    console = os.fdopen(fd, "w")
    proc = subprocess.Popen(
        command(str(out), **kw),
        env=env,
        cwd=str(out.parent),
        stdout=console,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc.console, proc.console_path = console, name
    return proc


def finish(proc, timeout=600):
    try:
        proc.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        timed_out = True
    proc.console.close()
    log = open(proc.console_path).read()
    if timed_out:
        pytest.fail(f"training did not end in {timeout} s: {log[-3000:]}")
    return proc.returncode, log


def run(root, out, faults=None, **kw):
    return finish(start(root, out, faults, **kw))


def final_state(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    momentum = ckpt["trainer"]["_trainer"]["optimizer"]["state"]
    return ckpt["model"], {k: v["momentum_buffer"] for k, v in momentum.items()}


def assert_same_final_state(a, b):
    (wa, ma), (wb, mb) = final_state(a), final_state(b)
    assert wa.keys() == wb.keys() and ma.keys() == mb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k


@pytest.fixture(scope="module")
def uninterrupted(datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    code, log = run(datasets, out)
    assert code == 0, log[-3000:]
    return out / "model_final.pth"


def lingering_processes(group: int):
    """Command lines of the live processes of process group ``group``, except
    multiprocessing's resource tracker (a helper that exits on its own once its last user
    has) and processes already exiting (their command line is empty)."""
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            cmdline = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state, parent, process group, ...
        if int(fields[2]) == group and fields[0] != "Z" and cmdline:
            if "multiprocessing.resource_tracker" not in cmdline:
                left.append(f"{pid}: {cmdline[:300]}")
    return left


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_is_exact(datasets, uninterrupted, tmp_path):
    out = tmp_path / "out"
    code, log = run(datasets, out, {"FAULT_SIGNAL": "1:SIGTERM"})
    assert code == PREEMPTED_EXIT_CODE, log[-3000:]
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    assert torch.load(out / "model_0000002.pth", weights_only=False)["iteration"] == 2
    assert not (out / "model_final.pth").exists()
    assert (
        "SIGTERM: saving model_0000002.pth and stopping (exit 75)" in (out / "log.txt").read_text()
    )

    code, log = run(datasets, out, resume=True)
    assert code == 0, log[-3000:]
    assert "Starting training from iteration 3" in log
    assert_same_final_state(out / "model_final.pth", uninterrupted)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(
    datasets, uninterrupted, tmp_path
):
    out, marker = tmp_path / "out", tmp_path / "saving"
    proc = start(datasets, out, {"FAULT_BLOCK_SAVE": "model_0000003", "FAULT_MARKER": str(marker)})
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), finish(proc, timeout=1)[1][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # in the middle of writing model_0000003.pth
    assert finish(proc)[0] == -signal.SIGKILL

    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (out / "model_0000003.pth").exists()
    temps = [p for p in out.iterdir() if p.name.startswith(".model_0000003.pth.")]
    assert len(temps) == 1  # the killed write's full-size temporary file
    assert temps[0].stat().st_size > 0.9 * (out / "model_0000001.pth").stat().st_size
    assert torch.load(out / "model_0000001.pth", weights_only=False)["iteration"] == 1

    code, log = run(datasets, out, resume=True)
    assert code == 0, log[-3000:]
    assert "Starting training from iteration 2" in log
    assert not temps[0].exists()  # removed by the next run's checkpoint saves
    assert_same_final_state(out / "model_final.pth", uninterrupted)


@pytest.mark.slow
def test_two_ranks_agree_workers_exit_and_unreadable_images_are_counted(tmp_path):
    root = tmp_path / "data"
    # square images: the dataset's header check (image sizes) then does not decode them
    generate(str(root / "lt_synthetic"), seed=5, num_train=4, num_val=1, num_test=1,
             image_size=(64, 64), num_classes=6, progress=False)  # fmt: skip
    images = sorted((root / "lt_synthetic" / "images" / "train").iterdir())
    data = images[0].read_bytes()
    images[0].write_bytes(data[: len(data) // 2])  # a truncated training image
    out = tmp_path / "out"
    opts = {"DATALOADER.NUM_WORKERS": 1, "DATALOADER.SAMPLER_TRAIN": "TrainingSampler"}
    # rank 1 alone receives the signal, after iteration 1
    proc = start(root, out, {"FAULT_SIGNAL": "1:SIGUSR1:1"}, num_gpus=2, **opts)
    code, log = finish(proc)
    assert code == PREEMPTED_EXIT_CODE, log[-3000:]
    assert lingering_processes(proc.pid) == []  # ranks and their DataLoader workers
    rank0, rank1 = (out / "log.txt").read_text(), (out / "log.txt.rank1").read_text()
    assert "another rank's signal: saving model_0000002.pth" in rank0
    assert "SIGUSR1: saving model_0000002.pth" in rank1
    assert torch.load(out / "model_0000002.pth", weights_only=False)["iteration"] == 2
    logs = rank0 + rank1
    assert f"{images[0].name} (image id" in logs and "truncated" in logs
    assert "training samples were skipped because an image could not be read" in logs


def test_the_launcher_passes_preemption_signals_on(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time; "
         "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); "
         "print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout.readline().strip() == "ready"

    class Worker:  # what the launcher knows of a worker process
        pid = child.pid

        @property
        def exitcode(self):
            return child.poll()

    before = signal.getsignal(signal.SIGTERM)
    with forward_preemption_signals([Worker()]):
        os.kill(os.getpid(), signal.SIGTERM)
        assert child.wait(timeout=30) == 75
    assert signal.getsignal(signal.SIGTERM) is before
