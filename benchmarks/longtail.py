#!/usr/bin/env python
"""Long-tail benchmark on the synthetic dataset: does each method really help rare classes?

Every row of ``lvis_longtail/benchmark/methods.py`` (one line each; add yours there) is trained
per seed in its own ``train_net.py`` subprocess, from a backbone + FPN (and the mask head's
class-agnostic layers, ``plan.INIT_PREFIXES``) pre-trained once on a separate, class-balanced
synthetic split (the analogue of ImageNet initialisation; cached), on
the long-tailed train split, and evaluated on a 400-image val split with >= 25 instances per
class. The report (``lvis_longtail.benchmark.report``) reads each run's ``lvis_per_class.csv``
and writes ``benchmarks/results/longtail[_quick|_cuda].md`` with paired differences to each
row's reference, 95 % t intervals over seeds, seed x class bootstrap intervals and the seeds a
±1-point interval needs::

    python benchmarks/longtail.py                 # CPU: 3 rows x 3 seeds, 250 iterations
    python benchmarks/longtail.py --quick         # smoke run: the 3 rows, 1 seed, 60 iterations
    python benchmarks/longtail.py --device cuda   # GPU: every row, 5 seeds, 1000 iterations
    python benchmarks/longtail.py --methods all   # CPU: every row (hours on 2 cores)
    python benchmarks/longtail.py --report-only   # re-aggregate finished runs

The CPU and quick modes run ``methods.CPU_ROWS`` unless ``--methods`` names rows; the GPU
mode runs every row but the diagnostics.

A finished run (``benchmark_run.json`` with rc 0 and the planned fingerprint) is reused, so an
interrupted benchmark continues where it stopped; a changed option retrains what it affects.
``--force`` retrains everything. ``<results>/longtail[_mode]_notes.md`` (hand-written) is
appended to the report.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lvis_longtail.benchmark import methods as methods_mod  # noqa: E402
from lvis_longtail.benchmark import page, plan  # noqa: E402
from lvis_longtail.utils.io import write_json_atomic  # noqa: E402

# mode -> (seeds, iterations, pre-training iterations, parallel runs); the CPU mode is sized
# for <= 60 min on an idle 2-core machine: pre-training ~17.5 min, then 9 runs of ~495 s, 2 at
# a time (benchmarks/results/longtail_calibration.md)
MODES = {
    "quick": ((0,), 60, 150, 2),
    "cpu": ((0, 1, 2), 250, 1000, 2),
    "cuda": ((0, 1, 2, 3, 4), 1000, 2000, 3),
}
DATASETS = {  # generator options (lvis_longtail.data.synthetic.generate)
    "lt_bench": dict(seed=0, num_train=800, num_val=400, num_test=1, thickness_scale=1.5,
                     eval_min_per_class=25),
    "lt_bench_pretrain": dict(seed=1000, num_train=1600, num_val=1, num_test=1,
                              thickness_scale=1.5, head_tail_ratio=1.0),
}  # fmt: skip
MANIFEST = "benchmark_dataset.json"


def ensure_dataset(root: str, options: dict) -> None:
    """Generate the dataset at ``root`` unless its manifest records the same options."""
    from lvis_longtail.data import synthetic

    manifest = os.path.join(root, MANIFEST)
    if os.path.isfile(manifest):
        with open(manifest) as f:
            if json.load(f) == options:
                return
    print(f"generating {root} with {options}", flush=True)
    synthetic.generate(root, progress=False, **options)
    write_json_atomic(options, manifest)


def dataset_paths(root: str) -> Dict[str, tuple]:
    ann = lambda name, split: os.path.join(root, name, "annotations", f"lt_synthetic_{split}.json")  # noqa: E731,E501
    img = lambda name: os.path.join(root, name, "images")  # noqa: E731
    return {
        "pretrain": (ann("lt_bench_pretrain", "train"), img("lt_bench_pretrain")),
        "train": (ann("lt_bench", "train"), img("lt_bench")),
        "val": (ann("lt_bench", "val"), img("lt_bench")),
    }


def seconds_per_iter(out_dir: str) -> float:
    """Median detectron2 iteration time of a run (its ``metrics.json``), nan if unknown."""
    path = os.path.join(out_dir, "metrics.json")
    times = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "time" in rec:
                    times.append(rec["time"])
    return float(sorted(times)[len(times) // 2]) if times else float("nan")


def execute(runs: List[plan.Run], jobs: int, threads: int, force: bool, poll_s: float = 1.0) -> int:
    """Run the pending runs, ``jobs`` at a time, each after its dependencies (a run whose
    dependency failed is skipped); each finished run gets its ``benchmark_run.json``.

    Returns:
        how many runs were pending (0: nothing trained).
    """
    pending = [r for r in runs if force or not r.done()]
    num_pending = len(pending)

    def env(run):  # the pre-training runs alone: it gets every job's threads
        n = str(threads * jobs if run.method is None else threads)
        out = dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
        out["PYTHONPATH"] = REPO + os.pathsep + out.get("PYTHONPATH", "")
        return out

    active, failed, finished = {}, set(), set()
    print(f"{len(pending)} of {len(runs)} runs to do, {jobs} at a time, {threads} thread(s) each")
    while pending or active:
        for run in list(pending):
            if len(active) >= jobs:
                break
            if any(d.key in failed for d in run.deps):
                pending.remove(run)
                failed.add(run.key)
                print(f"SKIP {run.key}: a run it starts from failed", flush=True)
                continue
            if any(d in pending or d.key in active for d in run.deps):
                continue
            pending.remove(run)
            os.makedirs(run.out_dir, exist_ok=True)
            log = open(os.path.join(run.out_dir, "benchmark_stdout.log"), "w")
            log.write(" ".join(shlex.quote(c) for c in run.cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(
                run.cmd, cwd=REPO, env=env(run), stdout=log, stderr=subprocess.STDOUT
            )
            active[run.key] = (run, proc, time.time(), log, os.getloadavg())
            print(f"START {run.key}", flush=True)
        time.sleep(poll_s)
        for key, (run, proc, t0, log, load0) in list(active.items()):
            if proc.poll() is None:
                continue
            log.close()
            del active[key]
            rc = proc.returncode
            if rc == 0 and run.method is None:  # the pre-training: keep plan.INIT_PREFIXES
                plan.extract_init(
                    os.path.join(run.out_dir, "model_final.pth"),
                    os.path.join(run.out_dir, plan.INIT_FILE),
                )
            (finished if rc == 0 else failed).add(key)
            record = {
                "rc": rc,
                "fingerprint": run.fingerprint,
                "wall_s": time.time() - t0,
                "s_per_iter": seconds_per_iter(run.out_dir),
                "loadavg_start": load0,
                "loadavg_end": os.getloadavg(),
                "cmd": run.cmd,
                "init": plan.init_of(run) if rc == 0 else None,
            }
            write_json_atomic(
                {
                    k: (None if v != v else v) if isinstance(v, float) else v
                    for k, v in record.items()
                },
                os.path.join(run.out_dir, plan.RUN_FILE),
            )
            print(
                f"{'DONE' if rc == 0 else 'FAIL'} {key} rc={rc} {record['wall_s']:.0f}s", flush=True
            )
    return num_pending


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 60 iterations")
    p.add_argument("--device", default="cpu", help="MODEL.DEVICE; cuda selects the GPU mode")
    p.add_argument("--seeds", type=int, nargs="+", help="default: per mode (cpu: 0 1 2)")
    p.add_argument("--iters", type=int, help="iterations per row (cpu: 250)")
    p.add_argument("--pretrain-iters", type=int, help="shared pre-training (cpu: 1000; 0: none)")
    p.add_argument("--methods", nargs="+", help="rows or all (CPU: CPU_ROWS; GPU: all)")
    p.add_argument("--jobs", type=int, help="runs in parallel (cpu: 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (cpus // jobs)")
    p.add_argument("--repeat-threshold", type=float, default=0.13)
    p.add_argument("--output", help="runs folder (output/benchmarks/longtail_<mode>)")
    p.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--datasets", help="dataset root ($DETECTRON2_DATASETS or ./datasets)")
    p.add_argument("--force", action="store_true", help="retrain finished runs")
    p.add_argument("--report-only", action="store_true", help="only aggregate finished runs")
    p.add_argument(
        "--reuse-archive",
        action="store_true",
        help="do not retrain runs whose results the results folder archives (same fingerprint)",
    )
    args = p.parse_args(argv)
    args.mode = "quick" if args.quick else ("cuda" if args.device.startswith("cuda") else "cpu")
    seeds, iters, pre, jobs = MODES[args.mode]
    args.seeds = args.seeds or list(seeds)
    args.iters = args.iters or iters
    args.pretrain_iters = pre if args.pretrain_iters is None else args.pretrain_iters
    args.jobs = args.jobs or jobs
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    if not args.methods:
        args.methods = list(
            methods_mod.default_methods() if args.mode == "cuda" else methods_mod.CPU_ROWS
        )
    elif args.methods == ["all"]:
        args.methods = list(methods_mod.default_methods())
    args.output = os.path.abspath(
        args.output or os.path.join(REPO, "output", "benchmarks", f"longtail_{args.mode}")
    )
    args.datasets = os.path.abspath(
        args.datasets
        or os.path.expanduser(os.getenv("DETECTRON2_DATASETS", os.path.join(REPO, "datasets")))
    )
    args.command = " ".join(
        ["python benchmarks/longtail.py"]
        + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]
    )
    return args


def settings(args) -> plan.Settings:
    return plan.Settings(
        iters=args.iters,
        pretrain_iters=args.pretrain_iters,
        device=args.device,
        repeat_threshold=args.repeat_threshold,
        output=args.output,
        datasets=dataset_paths(args.datasets),
        dataset_key=json.dumps(DATASETS, sort_keys=True),
        python=sys.executable,
        configs="configs",  # relative to the repository (the runs' cwd): location-free fingerprints
        root=REPO,
        anchors={args.output: "<runs>", args.datasets: "<data>"},  # absolute (parse_args)
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    for name, options in DATASETS.items():
        ensure_dataset(os.path.join(args.datasets, name), options)
    runs = plan.plan_runs(args.methods, args.seeds, settings(args))
    archive = page.read_archive(page.archive_path(args.results, args.mode))
    if not args.report_only:
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        load0 = os.getloadavg()
        opts = (args.jobs, args.threads, args.force)
        pre, trained, reusable = set(), 0, set()
        if args.reuse_archive:
            # archived runs are reusable only from the pre-training they descend from: one that
            # must train here goes first and decides which they are
            first = [
                r for r in plan.runs_to_train(runs, page.reusable(runs, archive)) if not r.method
            ]
            trained += execute(first, *opts)
            pre, reusable = {r.key for r in first}, page.reusable(runs, archive)
        todo = [r for r in plan.runs_to_train(runs, reusable) if r.key not in pre]
        trained += execute(todo, *opts)
        if trained:  # the page lists the invocations that trained runs
            page.record_invocation(
                args.output,
                {
                    "command": args.command,
                    "started": started,
                    "start_ts": t0,
                    "wall_s": time.time() - t0,
                    "jobs": args.jobs,
                    "threads": args.threads,
                    "cpus": os.cpu_count(),
                    "loadavg_start": list(load0),
                    "loadavg_end": list(os.getloadavg()),
                },
            )
    # the page shows this invocation's rows and seeds and every archived one
    names, seeds = page.archived_plan(archive)
    known = methods_mod.methods_by_name()
    names = list(dict.fromkeys(args.methods + [n for n in names if n in known]))
    shown = plan.plan_runs(names, sorted(set(args.seeds) | set(seeds)), settings(args))
    path = page.write(args, shown, DATASETS, dataset_paths(args.datasets)["val"][0])
    print(f"wrote {path}")
    init = page.current_init(runs, archive)
    missing = [r.key for r in runs if not (r.done() or page.archived(r, archive, init))]
    if missing:
        print(f"missing runs: {missing}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
