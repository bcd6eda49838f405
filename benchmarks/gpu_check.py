#!/usr/bin/env python
"""One prepared GPU check (docs/gpu_check.md), sized for one H100 and about 8 minutes.

1. parity: every classification loss at K = 1203, the mask losses and the class-gathered mask
   head, deformable RoI pooling, CARAFE, DCNv2 and Soft-NMS, on the device in fp32 and under
   fp16 autocast against the CPU in fp32 (``gpu_parity.py``);
2. configs: every ``configs/tiny`` config trains ``--iters`` iterations and evaluates on a
   synthetic dataset generated here; :data:`MAIN_CONFIGS` again with ``SOLVER.AMP.ENABLED``;
   host-device synchronisations per training step counted with
   ``torch.cuda.set_sync_debug_mode`` (and where they happen);
3. benchmarks: the benchmark scripts' device modes, the R50 / K = 1203 / 800-px row last.

A time budget (``--budget``) skips what would not fit, saying so. Everything goes to ``--out``
(``$OUT``, default ``output/gpu_check``): ``gpu_check.log``, ``gpu_check.json``,
``summary.md``, each config's metrics and each benchmark's output. ``--dry-run`` runs the
same code on the CPU with tiny sizes and 1 iteration, and checks that ``.whl/`` (made by
``gpu_wheels.py``) plus the GPU machine's own packages cover every distribution imported.

    bash benchmarks/gpu_check.sh             # on the GPU machine (installs .whl/ first)
    bash benchmarks/gpu_check.sh --dry-run   # anywhere, CPU
"""

import sys

BASELINE_MODULES = set(sys.modules)  # before anything of the check is imported

# isort: off
import lvis_longtail  # noqa: E402, F401  (first: compat layer for detectron2 0.6)

# isort: on
import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import gpu_parity  # noqa: E402
import gpu_train  # noqa: E402
import gpu_wheels  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAIN_CONFIGS = (
    "mask_rcnn_R18_FPN_tiny_seesaw.yaml",
    "cascade_mask_rcnn_R18_FPN_tiny_seesaw.yaml",
    "htc_lite_R18_FPN_tiny_seesaw.yaml",
    "mask_rcnn_R18_FPN_tiny_heavymask.yaml",
    "mask_rcnn_ResNeSt14_FPN_tiny_strong.yaml",
)
BENCHMARK_RESERVE_S = 150  # kept for the benchmarks when training the configs


def benchmarks(device: str, dry: bool):
    """(name, script and arguments, timeout s): the benchmarks' device modes, LVIS row last."""
    if dry:
        return [
            ("cls_loss_speed", ["cls_loss_speed.py", "--images", "1", "--rois-per-image", "32",
                                "--repeats", "1", "--losses", "SoftmaxCE", "SeesawLoss"], 120),
            ("mask_head_speed", ["mask_head_speed.py", "--rois", "4", "--classes", "20",
                                 "--channels", "16", "--detections", "4", "--repeats", "1"], 120),
            ("ops_speed", ["ops_speed.py", "--height", "64", "--width", "64", "--rois", "4",
                           "--blocks", "1", "--repeats", "1", "--devices", "cpu"], 120),
            ("ignore_regions_speed", ["ignore_regions_speed.py", "--size", "64", "--iters", "1",
                                      "--warmup", "0", "--ignore", "2"], 120),
            ("roi_heads_speed", ["roi_heads_speed.py", "--num-classes", "8", "--iters", "1",
                                 "--warmup", "0"], 180),
        ]  # fmt: skip
    return [
        ("cls_loss_speed", ["cls_loss_speed.py", "--device", device, "--repeats", "5"], 90),
        ("mask_head_speed", ["mask_head_speed.py", "--device", device, "--repeats", "3"], 90),
        ("ops_speed", ["ops_speed.py", "--devices", device], 90),
        ("ignore_regions_speed", ["ignore_regions_speed.py", "--device", device, "--quick"], 90),
        ("roi_heads_speed", ["roi_heads_speed.py", "--device", device, "--quick"], 90),
        ("roi_heads_speed_lvis_R50_K1203_800px",
         ["roi_heads_speed.py", "--preset", "lvis", "--device", device, "--quick"], 150),
    ]  # fmt: skip


class Run:
    """The log, the record and the time budget of one check."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.budget_s, self.start = out, budget_s, time.perf_counter()
        self.record = {"failures": []}
        self._log = open(out / "gpu_check.log", "a")

    def log(self, line: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {line}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def fail(self, what: str) -> None:
        self.record["failures"].append(what)
        self.log(f"FAIL {what}")

    def save(self) -> None:
        text = json.dumps(self.record, indent=1, default=str)
        (self.out / "gpu_check.json").write_text(text)


def environment(device: torch.device) -> dict:
    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "device": device.type, "cpu_count": os.cpu_count()}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())  # fmt: skip
    return env


def run_benchmarks(run: Run, device: str, dry: bool) -> list:
    folder = run.out / "benchmarks"
    folder.mkdir(exist_ok=True)
    rows = []
    for name, argv, timeout in benchmarks(device, dry):
        if run.left() < min(timeout, 60) and not dry:
            rows.append({"benchmark": name, "skipped": "time budget"})
            run.log(f"benchmark {name}: skipped (time budget)")
            continue
        cmd = [sys.executable, str(REPO / "benchmarks" / argv[0]), *argv[1:]]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, output = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
        seconds = time.perf_counter() - start
        (folder / f"{name}.log").write_text(" ".join(cmd) + "\n\n" + str(output))
        rows.append({"benchmark": name, "rc": rc, "seconds": round(seconds, 1)})
        run.log(f"benchmark {name}: rc {rc}, {seconds:.1f} s (benchmarks/{name}.log)")
        if rc != 0:
            run.fail(f"benchmark {name} (rc {rc})")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, 1 iteration")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "output/gpu_check"))
    parser.add_argument("--budget", type=float, default=450, help="seconds for the whole check")
    parser.add_argument("--iters", type=int, default=30, help="training iterations per config")
    parser.add_argument("--sections", nargs="+", default=["parity", "configs", "benchmarks"])
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.budget)
    if not args.dry_run and not torch.cuda.is_available():
        run.log("no CUDA device: run with --dry-run on a CPU machine")
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    run.record["environment"] = environment(device)
    run.log(f"environment: {run.record['environment']}")
    sections = {
        "parity": lambda: gpu_parity.run(device, args.dry_run, run.log),
        "configs": lambda: configs_section(run, device, args),
        "benchmarks": lambda: run_benchmarks(run, device.type, args.dry_run),
    }
    for name in args.sections:
        try:
            run.record[name] = sections[name]()
        except Exception:
            run.fail(f"section {name}: {traceback.format_exc(limit=5)}")
        run.save()
    bad = [r["case"] + " " + r["mode"] for r in run.record.get("parity", []) if not r["ok"]]
    for what in bad:
        run.fail(f"parity {what}")
    run.record["imports"] = gpu_train.import_check(BASELINE_MODULES, gpu_wheels)
    missing = run.record["imports"]["missing_from_wheels"]
    run.log(f"imported distributions not covered by .whl/ nor the GPU machine: {missing}")
    if missing:
        run.fail(f"wheel set incomplete: {missing}")
    files = run.record["imports"]["missing_files"]
    run.log(f".whl/: {'not built' if files is None else f'missing {files}'}")
    if files:
        run.fail(f".whl/ lacks wheels of {files}: run make gpu-wheels")
    run.record["seconds"] = round(run.elapsed(), 1)
    run.save()
    gpu_train.write_summary(run.out / "summary.md", run.record)
    run.log(f"done in {run.elapsed():.0f} s; {len(run.record['failures'])} failure(s); "
            f"summary: {out / 'summary.md'}")  # fmt: skip
    return 1 if run.record["failures"] else 0


def configs_section(run: Run, device: torch.device, args) -> list:
    """Every tiny config (main ones first, then with AMP), on synthetic data made here."""
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        data = gpu_train.make_data(work / "datasets", args.dry_run)
        run.log(f"synthetic data: {data['num_classes']} classes at {work}")
        names = sorted(p.name for p in (REPO / "configs" / "tiny").glob("*.yaml"))
        order = [n for n in MAIN_CONFIGS if n in names] + [
            n for n in names if n not in MAIN_CONFIGS
        ]
        jobs = [(n, False) for n in order[: len(MAIN_CONFIGS)]]
        jobs += [(n, True) for n in MAIN_CONFIGS] + [(n, False) for n in order[len(MAIN_CONFIGS) :]]
        rows = []
        for name, amp in jobs:
            if amp and device.type != "cuda":
                rows.append({"config": name, "amp": True, "skipped": "AMP needs CUDA"})
                continue
            if not args.dry_run and run.left() < BENCHMARK_RESERVE_S:
                rows.append({"config": name, "amp": amp, "skipped": "time budget"})
                run.log(f"config {name}{' AMP' if amp else ''}: skipped (time budget)")
                continue
            iters = 1 if args.dry_run else args.iters
            syncs = name == MAIN_CONFIGS[0] or amp
            row = gpu_train.train_config(name, device, data, work / "runs", iters, amp, syncs)
            gpu_train.keep_outputs(work / "runs", run.out / "configs", name, amp)
            run.log(gpu_train.describe(row))
            if not row["ok"]:
                run.fail(f"config {name}{' AMP' if amp else ''}: {row.get('error', 'not ok')}")
            rows.append(row)
            run.save()
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
