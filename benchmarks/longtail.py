#!/usr/bin/env python
"""Long-tail benchmark on the synthetic dataset: does each method really help rare classes?

Every row of ``benchmarks/longtail_rows.py`` (one line each; add yours there) is trained per
seed in its own ``train_net.py`` subprocess on the long-tailed train split, from a backbone +
FPN (and the mask head's class-agnostic layers) pre-trained once on a class-balanced synthetic
split (cached by its config), and evaluated on a 400-image val split with >= 25 instances per
class. Each finished run writes one record to ``benchmarks/results/longtail[_quick|_cuda]/``;
the page next to it (``longtail_page.py``) gives paired differences to each row's reference,
95 % t and bootstrap intervals and the seeds a ±1-point interval needs::

    python benchmarks/longtail.py                 # CPU: 3 rows x 3 seeds, 250 iterations
    python benchmarks/longtail.py --quick         # smoke run: the 3 rows, 1 seed, 60 iterations
    python benchmarks/longtail.py --device cuda   # GPU: every row, 5 seeds, 1000 iterations
    python benchmarks/longtail.py --methods all   # CPU: every row (hours on 2 cores)
    python benchmarks/longtail.py --dry-run       # the commands it would run
    python benchmarks/longtail.py --report-only   # the page from the records

The CPU and quick modes run ``CPU_ROWS`` unless ``--methods`` names rows. A run whose record has
the planned config and overrides is not trained again (``--force``: it is); when rows train from
a pre-trained checkpoint, the rows recorded from another one train again, so that paired rows
start from the same weights. ``<results>/longtail[_mode]_notes.md`` is appended to the page.
"""

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional

import torch
from detectron2.config import CfgNode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's lvis_longtail, before an installed one

import longtail_page as page  # noqa: E402
from longtail_rows import CPU_ROWS, Method, default_methods, methods_by_name, schedule_opts  # noqa: E402,E501
from paired_stats import class_info, read_per_class, run_metrics  # noqa: E402

from lvis_longtail.data import synthetic  # noqa: E402
from lvis_longtail.utils.io import atomic_write, read_json, write_json_atomic  # noqa: E402
from lvis_longtail.utils.per_class_csv import CSV_FILE  # noqa: E402

# mode -> (seeds, iterations, pre-training iterations, parallel runs); the CPU mode is sized for
# <= 60 min on an idle 2-core machine (benchmarks/results/longtail_calibration.md)
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
SPLITS = {  # registered name: dataset folder, annotation file
    "lt_bench_pretrain": ("lt_bench_pretrain", "lt_synthetic_train.json"),
    "lt_bench_train": ("lt_bench", "lt_synthetic_train.json"),
    "lt_bench_val": ("lt_bench", "lt_synthetic_val.json"),
}
PRETRAIN_CONFIG = "tiny/mask_rcnn_R18_FPN_tiny_softmax.yaml"
INIT_FILE = "init.pth"
# What a row takes from the pre-training: backbone + FPN and the class-agnostic layers of the
# mask head (thin walls need more than a row's schedule to be learnt from scratch); the RPN,
# the box head and the class-specific mask predictor start fresh (another class assignment).
INIT_PREFIXES = ("backbone.", "roi_heads.mask_head.mask_fcn", "roi_heads.mask_head.deconv")


@dataclass
class Run:
    """One ``train_net.py`` run; ``overrides`` are its options without paths (its record's)."""

    name: str
    seed: int
    config: str
    overrides: List[str]
    out_dir: str
    method: Optional[Method] = None  # None: the pre-training
    base: Optional["Run"] = None  # the run whose model it fine-tunes or evaluates

    @property
    def key(self) -> str:
        return f"{self.name}_seed{self.seed}"


def row_overrides(m: Method, seed: int, args) -> List[str]:
    opts = list(m.opts)
    if not m.eval_only:  # a fine-tune: m.length of the schedule; else m.schedule x it
        iters = args.iters if m.base else max(1, round(args.iters * m.schedule))
        opts += schedule_opts(iters, bool(m.base), m.length)
    opts += ["DATASETS.TRAIN", "('lt_bench_train',)", "DATASETS.TEST", "('lt_bench_val',)"]
    opts += ["SEED", str(seed), "MODEL.DEVICE", args.device, "TEST.EVAL_PERIOD", "0"]
    if m.rfs:
        opts += ["DATALOADER.REPEAT_THRESHOLD", str(args.repeat_threshold)]
    elif "DATALOADER.SAMPLER_TRAIN" not in m.opts[::2]:
        opts += ["DATALOADER.SAMPLER_TRAIN", "TrainingSampler"]
    return opts


def plan(args):
    """``(pre-training run or None, row runs)``: the rows of ``args.methods`` with their bases
    and references before them, seed by seed."""
    table, names = methods_by_name(), []

    def add(name: str) -> None:
        if name not in table:
            raise SystemExit(f"unknown benchmark row {name!r}; known: {sorted(table)}")
        for dep in (table[name].base, table[name].reference):
            if dep and dep not in names:
                add(dep)
        names.extend([name] if name not in names else [])

    for name in args.methods:
        add(name)
    pre = None
    if args.pretrain_iters:
        opts = ["DATALOADER.SAMPLER_TRAIN", "TrainingSampler", *schedule_opts(args.pretrain_iters)]
        opts += ["DATASETS.TRAIN", "('lt_bench_pretrain',)", "DATASETS.TEST", "()"]
        opts += ["SEED", "0", "MODEL.DEVICE", args.device]
        # cached by its config: the YAML chain (as train_net.py reads it), overrides and data
        yaml = CfgNode.load_yaml_with_base(os.path.join(REPO, "configs", PRETRAIN_CONFIG))
        key = json.dumps([yaml, opts, DATASETS, INIT_PREFIXES], sort_keys=True, default=str)
        out_dir = os.path.join(
            args.output, "pretrain_" + hashlib.sha1(key.encode()).hexdigest()[:12]
        )
        pre = Run("pretrain", 0, PRETRAIN_CONFIG, opts, out_dir)
    runs = {}
    for seed in args.seeds:
        for m in (table[n] for n in names):
            out_dir = os.path.join(args.output, m.name, f"seed{seed}")
            base = runs.get(f"{m.base}_seed{seed}")
            run = Run(m.name, seed, m.config, row_overrides(m, seed, args), out_dir, m, base)
            runs[run.key] = run
    return pre, list(runs.values())


def command(run: Run, args, pre: Optional[Run]) -> List[str]:
    """The ``train_net.py`` command line of ``run``: its overrides and the paths."""
    cmd = [sys.executable, "train_net.py", "--config-file", os.path.join("configs", run.config)]
    cmd += ["--eval-only"] if run.method and run.method.eval_only else []
    data = []
    for name, (folder, ann) in SPLITS.items():
        folder = os.path.join(args.datasets, folder)
        data.append(
            [name, os.path.join(folder, "annotations", ann), os.path.join(folder, "images")]
        )
    cmd += ["DATASETS.LVIS_FORMAT", repr(data), *run.overrides, "OUTPUT_DIR", run.out_dir]
    if run.method is not None:
        init = os.path.join(pre.out_dir, INIT_FILE) if pre else ""
        cmd += ["MODEL.WEIGHTS", _final(run.base) if run.base else init]
    return cmd


def _final(run: Run) -> str:
    return os.path.join(run.out_dir, "model_final.pth")


def matches(rec: Optional[dict], run: Run) -> bool:
    """Whether a record holds ``run`` (the same config and overrides)."""
    return rec is not None and (rec["config"], rec["overrides"]) == (run.config, run.overrides)


def to_train(runs: List[Run], records: dict, init: Optional[str], force: bool) -> List[Run]:
    """The runs without a record (all with ``force``), the rows from the initialisation recorded
    from another one than ``init`` (when known), the bases of these whose model is not here and
    the runs that start from a base that trains."""
    todo = {r.key for r in runs if force or not matches(records.get(r.key), r)}
    todo |= {
        r.key for r in runs if init and not r.base and records.get(r.key, {}).get("init") != init
    }
    for r in reversed(runs):
        if r.key in todo and r.base and not os.path.isfile(_final(r.base)):
            todo.add(r.base.key)
    todo |= {r.key for r in runs if r.base and r.base.key in todo}
    return [r for r in runs if r.key in todo]


def weights_digest(path: str) -> str:
    """Hash of a checkpoint's weights (names, dtypes, shapes and bytes): which pre-trained
    weights a run starts from (the same command trains other weights on another CPU)."""
    state, h = torch.load(path, map_location="cpu", weights_only=False), hashlib.sha1()
    for name, t in sorted(state.get("model", state).items()):
        t = torch.as_tensor(t).detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def train_run(run: Run, cmd: List[str], threads: int) -> tuple:
    """Run ``cmd`` in the repository with ``threads`` torch threads, its output to the run's
    log; returns (return code, wall seconds, median seconds per iteration or nan)."""
    os.makedirs(run.out_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    print(f"START {run.key}", flush=True)
    start = time.time()
    with open(os.path.join(run.out_dir, "benchmark_stdout.log"), "w") as log:
        print(shlex.join(cmd), file=log, flush=True)
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall, times = time.time() - start, []
    print(f"{'DONE' if rc == 0 else 'FAIL'} {run.key} rc={rc} {wall:.0f}s", flush=True)
    if rc == 0 and os.path.isfile(os.path.join(run.out_dir, "metrics.json")):  # d2's event log
        with open(os.path.join(run.out_dir, "metrics.json")) as f:
            times = sorted(t for t in (json.loads(x).get("time") for x in f) if t is not None)
    return rc, wall, float(times[len(times) // 2]) if times else float("nan")


def record(run: Run, timing: tuple, init: str, per_class: dict, classes) -> dict:
    return {"row": run.name, "seed": run.seed, "config": run.config, "overrides": run.overrides,
            "init": init, "wall_s": timing[1], "s_per_iter": timing[2],
            "metrics": run_metrics(per_class, classes), "per_class": per_class}  # fmt: skip


def pretrain(pre: Run, args, records: dict, train: bool) -> Optional[str]:
    """The digest of the pre-trained checkpoint: cached, else trained (with ``train``, on every
    job's threads), cut to :data:`INIT_PREFIXES` and recorded; None when neither."""
    path = os.path.join(pre.out_dir, INIT_FILE)
    if train and not os.path.isfile(path):
        timing = train_run(pre, command(pre, args, None), args.threads * args.jobs)
        if timing[0]:
            raise SystemExit(f"pre-training failed (rc {timing[0]}); see {pre.out_dir}")
        state = torch.load(_final(pre), map_location="cpu", weights_only=False)["model"]
        kept = {k: v for k, v in state.items() if k.startswith(INIT_PREFIXES)}
        if not kept:
            raise SystemExit(f"{_final(pre)}: no weights start with {INIT_PREFIXES}")
        with atomic_write(path, "wb") as f:
            torch.save({"model": kept}, f)
        records[pre.key] = record(pre, timing, weights_digest(path), {}, {})
        page.write_record(args.records, records[pre.key])
    return weights_digest(path) if os.path.isfile(path) else None


def execute(todo: List[Run], args, pre, init: str, records: dict, classes) -> None:
    """Train ``todo``, ``args.jobs`` at a time: the rows from the initialisation, then the runs
    that start from them (skipped when their base failed); record each finished run."""
    failed = set()

    def one(run: Run) -> None:
        if run.base and run.base.key in failed:
            return print(f"SKIP {run.key}: its base {run.base.key} failed", flush=True)
        timing = train_run(run, command(run, args, pre), args.threads)
        if timing[0]:
            return failed.add(run.key)
        run_init = records[run.base.key]["init"] if run.base else init
        csv = os.path.join(run.out_dir, "inference", "lt_bench_val", CSV_FILE)
        records[run.key] = record(run, timing, run_init, read_per_class(csv), classes)
        page.write_record(args.records, records[run.key])

    with ThreadPoolExecutor(args.jobs) as pool:
        for wave in ([r for r in todo if not r.base], [r for r in todo if r.base]):
            list(pool.map(one, wave))


def prepare_data(args) -> list:
    """Generate the datasets unless their manifests record the same options; write the val
    split's categories next to the records and return them."""
    for name, options in DATASETS.items():
        manifest = os.path.join(args.datasets, name, "benchmark_dataset.json")
        if not os.path.isfile(manifest) or read_json(manifest) != options:
            print(f"generating {args.datasets}/{name} with {options}", flush=True)
            synthetic.generate(os.path.join(args.datasets, name), progress=False, **options)
            write_json_atomic(options, manifest)
    val = read_json(
        os.path.join(args.datasets, "lt_bench", "annotations", SPLITS["lt_bench_val"][1])
    )
    keep = ("id", "name", "frequency", "thin", "image_count")
    categories = [{k: c[k] for k in keep if k in c} for c in val["categories"]]
    os.makedirs(args.records, exist_ok=True)
    write_json_atomic(categories, os.path.join(args.records, "classes.json"))
    return categories


def report(args, records: dict) -> str:
    """Write the page from the records of this mode's plan for their row and seed."""
    table = methods_by_name()
    names = [r["row"] for r in records.values() if r["row"] in table]
    seeds = sorted(set(args.seeds) | {r["seed"] for r in records.values()})
    full = argparse.Namespace(**{**vars(args), "methods": args.methods + names, "seeds": seeds})
    pre, runs = plan(full)
    planned = {r.key: r for r in runs + ([pre] if pre else [])}
    shown = {k: r for k, r in records.items() if k in planned and matches(r, planned[k])}
    categories = read_json(os.path.join(args.records, "classes.json"), what="val categories")
    stale = sorted(set(records) - set(shown))
    return page.write_page(args, shown, stale, DATASETS, categories)


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
    p.add_argument("--force", action="store_true", help="retrain runs that have a record")
    p.add_argument("--dry-run", action="store_true", help="print the runs to train, train none")
    p.add_argument("--report-only", action="store_true", help="only write the page")
    args = p.parse_args(argv)
    args.mode = "quick" if args.quick else ("cuda" if args.device.startswith("cuda") else "cpu")
    args.suffix = "" if args.mode == "cpu" else f"_{args.mode}"
    seeds, iters, pre, jobs = MODES[args.mode]
    args.seeds, args.iters, args.jobs = (
        args.seeds or list(seeds),
        args.iters or iters,
        args.jobs or jobs,
    )
    args.pretrain_iters = pre if args.pretrain_iters is None else args.pretrain_iters
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    rows = default_methods() if args.mode == "cuda" else CPU_ROWS
    args.methods = list(default_methods() if args.methods == ["all"] else args.methods or rows)
    out = os.path.join(REPO, "output", "benchmarks", f"longtail_{args.mode}")
    args.output = os.path.abspath(args.output or out)
    data = os.getenv("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
    args.datasets = os.path.abspath(args.datasets or os.path.expanduser(data))
    args.records = os.path.join(args.results, f"longtail{args.suffix}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    pre, runs = plan(args)
    records = page.read_records(args.records)
    if not args.report_only:
        init = pretrain(pre, args, records, train=False) if pre else "scratch"
        todo = to_train(runs, records, init, args.force)
        needs_pre = init is None and any(not r.base for r in todo)
        if args.dry_run:
            cmds = [(pre, None)] * needs_pre + [(r, pre) for r in todo]
            for run, init_run in cmds:
                print(f"{run.key}: {shlex.join(command(run, args, init_run))}")
            print(f"{len(todo)} of {len(runs)} runs to train (more if the pre-training gives "
                  f"other weights than their records'); records: {args.records}")  # fmt: skip
            return 0
        if todo:
            categories = prepare_data(args)
            if needs_pre:
                init = pretrain(pre, args, records, train=True)
                todo = to_train(runs, records, init, args.force)
            execute(todo, args, pre, init, records, class_info(categories))
    print(f"wrote {report(args, records)}")
    missing = [r.key for r in runs if not matches(records.get(r.key), r)]
    print(f"missing runs: {missing}" if missing else "every planned run has its record")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
