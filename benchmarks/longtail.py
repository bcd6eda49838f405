#!/usr/bin/env python
"""Long-tail benchmark on the synthetic dataset: does each method really help rare classes?

Every row of ``longtail_rows.py`` is trained per seed (``train_net.py``) on a long-tailed split
from a backbone + FPN pre-trained once on a balanced split, and evaluated on a 400-image val
split; each run writes one record (config, overrides, seed, metrics, per-class AP, wall time) to
``results/longtail[_mode]/`` (a run with such a record is not trained again), and the page is
written from the records alone::

    python benchmarks/longtail.py                 # CPU: 3 rows x 3 seeds, 250 iterations
    python benchmarks/longtail.py --quick         # smoke run: the 3 rows, 1 seed, 60 iterations
    python benchmarks/longtail.py --device cuda   # GPU: every row, 5 seeds, 1000 iterations
    python benchmarks/longtail.py --methods all   # CPU: every row (hours on 2 cores)
    python benchmarks/longtail.py --dry-run       # the commands it would run
    python benchmarks/longtail.py --report-only   # the page from the records
"""

import argparse
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's lvis_longtail, before an installed one

import longtail_page  # noqa: E402
import longtail_rows as lr  # noqa: E402
import paired_stats as ps  # noqa: E402

from lvis_longtail.utils.io import atomic_write, read_json, write_json_atomic  # noqa: E402
from lvis_longtail.utils.per_class_csv import CSV_FILE  # noqa: E402

# mode -> (seeds, iterations, pre-training iterations, parallel runs); the CPU mode is sized for
# <= 60 min on an idle 2-core machine (benchmarks/results/longtail_calibration.md)
MODES = {"quick": ((0,), 60, 150, 2), "cpu": ((0, 1, 2), 250, 1000, 2),
         "cuda": ((0, 1, 2, 3, 4), 1000, 2000, 3)}  # fmt: skip
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
    method: Optional[lr.Method] = None  # None: the pre-training
    base: Optional["Run"] = None  # the run whose model it fine-tunes or evaluates
    pre: Optional["Run"] = None  # its row's own pre-training (None: the shared one)

    @property
    def key(self) -> str:
        return f"{self.name}_seed{self.seed}"

    @property
    def final(self) -> str:
        return os.path.join(self.out_dir, "model_final.pth")


def row_overrides(m: lr.Method, seed: int, args) -> List[str]:
    opts = list(m.opts)
    if not m.eval_only:  # a fine-tune: m.length of the schedule; else m.schedule x it
        iters = args.iters if m.base else max(1, round(args.iters * m.schedule))
        opts += lr.schedule_opts(iters, bool(m.base), m.length)
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
    table, names = lr.methods_by_name(), []

    def add(name: str) -> None:
        if name not in table:
            raise SystemExit(f"unknown benchmark row {name!r}; known: {sorted(table)}")
        for dep in (table[name].base, table[name].reference):
            if dep and dep not in names:
                add(dep)
        names.extend([name] if name not in names else [])

    for name in args.methods:
        add(name)
    pre, own = None, {}
    if args.pretrain_iters:
        opts = ["DATALOADER.SAMPLER_TRAIN", "TrainingSampler"]
        opts += [*lr.schedule_opts(args.pretrain_iters), "DATASETS.TRAIN", "('lt_bench_pretrain',)"]
        opts += ["DATASETS.TEST", "()", "SEED", "0", "MODEL.DEVICE", args.device]
        out_dir = os.path.join(args.output, f"pretrain_{args.pretrain_iters}")
        pre = Run("pretrain", 0, PRETRAIN_CONFIG, opts, out_dir)
        for m in (table[n] for n in names if table[n].pretrain):  # rows with their own
            own[m.name] = Run(f"pretrain_{m.name}", 0, m.pretrain, [*m.pretrain_opts, *opts],
                              f"{out_dir}_{m.name}")  # fmt: skip
    runs = {}
    for seed in args.seeds:
        for m in (table[n] for n in names):
            out_dir = os.path.join(args.output, m.name, f"seed{seed}")
            base = runs.get(f"{m.base}_seed{seed}")
            run = Run(m.name, seed, m.config, row_overrides(m, seed, args), out_dir, m, base,
                      base.pre if base else own.get(m.name))  # fmt: skip
            runs[run.key] = run
    return pre, list(runs.values())


def own_pretrainings(runs: List[Run]) -> List[Run]:
    """The rows' own pre-trainings that ``runs`` start from, once each."""
    return list({r.pre.key: r.pre for r in runs if r.pre}.values())


def init_file(run: Run, pre: Optional[Run]) -> Optional[str]:
    """The initialisation ``run`` trains from: its row's own pre-training, else ``pre``'s."""
    src = run.pre or pre
    return os.path.join(src.out_dir, INIT_FILE) if src else None


def registered_splits(root: str) -> List[list]:
    """The ``DATASETS.LVIS_FORMAT`` entries of :data:`SPLITS` under the dataset ``root``."""
    return [[name, os.path.join(root, d, "annotations", ann), os.path.join(root, d, "images")]
            for name, (d, ann) in SPLITS.items()]  # fmt: skip


def command(run: Run, args, pre: Optional[Run]) -> List[str]:
    """The ``train_net.py`` command line of ``run``: its overrides and the paths."""
    cmd = [sys.executable, "train_net.py", "--config-file", os.path.join("configs", run.config)]
    cmd += ["--eval-only"] if run.method and run.method.eval_only else []
    data = registered_splits(args.datasets)
    cmd += ["DATASETS.LVIS_FORMAT", repr(data), *run.overrides, "OUTPUT_DIR", run.out_dir]
    if run.method is not None:
        cmd += ["MODEL.WEIGHTS", run.base.final if run.base else init_file(run, pre) or ""]
    return cmd


def init_digest(path: str) -> Optional[str]:
    """The first 16 hex digits of the sha256 of the initialisation file (None: no file)."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def matches(rec: Optional[dict], run: Run, init: Optional[str] = None) -> bool:
    """A record of ``run``'s config and overrides, trained from the initialisation of digest
    ``init`` (when both say which)."""
    if rec is None or (rec["config"], rec["overrides"]) != (run.config, run.overrides):
        return False
    return init is None or rec.get("init_sha256") in (None, init)


def to_train(runs: List[Run], records: dict, force: bool, init: Optional[str] = None) -> List[Run]:
    """The runs without a record from the initialisation ``init`` (those of a row's own
    pre-training: from its digest; all with ``force``), the bases of these whose model is not
    here and the runs that start from a base that trains."""
    digest = lambda r: init_digest(init_file(r, None)) if r.pre else init  # noqa: E731
    todo = {r.key for r in runs if force or not matches(records.get(r.key), r, digest(r))}
    for r in reversed(runs):
        if r.key in todo and r.base and not os.path.isfile(r.base.final):
            todo.add(r.base.key)
    todo |= {r.key for r in runs if r.base and r.base.key in todo}
    return [r for r in runs if r.key in todo]


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
    wall, events, times = time.time() - start, os.path.join(run.out_dir, "metrics.json"), []
    print(f"{'DONE' if rc == 0 else 'FAIL'} {run.key} rc={rc} {wall:.0f}s", flush=True)
    if rc == 0 and os.path.isfile(events):  # detectron2's event log
        with open(events) as f:
            times = sorted(t for t in (json.loads(x).get("time") for x in f) if t is not None)
    return rc, wall, float(times[len(times) // 2]) if times else float("nan")


def write_record(
    folder: str, run: Run, timing: tuple, per_class: dict, classes, init: Optional[str] = None
) -> dict:
    """Write one run's record, ``<row>_seed<k>.json`` (NaN numbers as null; ``init``: the
    digest of the initialisation it started from); returns it."""
    null = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    metrics = {k: null(v) for k, v in ps.run_metrics(per_class, classes).items()}
    rec = dict(row=run.name, seed=run.seed, config=run.config, overrides=run.overrides,
               wall_s=timing[1], s_per_iter=null(timing[2]), metrics=metrics,
               per_class=per_class)  # fmt: skip
    if init:
        rec["init_sha256"] = init
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(rec, os.path.join(folder, f"{run.key}.json"))
    return rec


def read_records(folder: str) -> dict:
    """``{"<row>_seed<k>": record}`` of a records folder (empty when absent), per-class AP with
    integer category ids."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    out = {n[:-5]: read_json(os.path.join(folder, n)) for n in names
           if n.endswith(".json") and n != "classes.json"}  # fmt: skip
    for rec in out.values():
        rec["per_class"] = {t: {int(c): v for c, v in pc.items()}
                            for t, pc in rec["per_class"].items()}  # fmt: skip
    return out


def pretrain(pre: Run, args, records: dict) -> None:
    """Train the pre-training on every job's threads and keep :data:`INIT_PREFIXES` of it."""
    import torch

    timing = train_run(pre, command(pre, args, None), args.threads * args.jobs)
    if timing[0]:
        raise SystemExit(f"pre-training failed (rc {timing[0]}); see {pre.out_dir}")
    state = torch.load(pre.final, map_location="cpu", weights_only=False)["model"]
    kept = {k: v for k, v in state.items() if k.startswith(INIT_PREFIXES)}
    if not kept:
        raise SystemExit(f"{pre.final}: no weights start with {INIT_PREFIXES}")
    init = os.path.join(pre.out_dir, INIT_FILE)
    with atomic_write(init, "wb") as f:
        torch.save({"model": kept}, f)
    records[pre.key] = write_record(args.records, pre, timing, {}, {}, init_digest(init))


def run_and_record(
    run: Run,
    cmd: List[str],
    args,
    records: dict,
    classes,
    init: Optional[str],
    evaluated: bool = True,
) -> bool:
    """Run ``cmd`` on ``args.threads`` threads and, when it succeeds and ``evaluated``, record
    its val per-class AP (from the initialisation of digest ``init``); True on success."""
    timing = train_run(run, cmd, args.threads)
    if timing[0]:
        return False
    if evaluated:
        pc = ps.read_per_class(os.path.join(run.out_dir, "inference", "lt_bench_val", CSV_FILE))
        records[run.key] = write_record(args.records, run, timing, pc, classes, init)
    return True


def execute(todo: List[Run], args, pre, records: dict, classes) -> None:
    """Train and record ``todo``, ``args.jobs`` at a time, the runs from a base after it."""
    failed = set()

    def one(run: Run) -> None:
        if run.base and run.base.key in failed:
            return print(f"SKIP {run.key}: its base {run.base.key} failed", flush=True)
        init = init_digest(init_file(run, pre)) if run.pre or pre else None
        if not run_and_record(run, command(run, args, pre), args, records, classes, init):
            failed.add(run.key)

    with ThreadPoolExecutor(args.jobs) as pool:
        for wave in ([r for r in todo if not r.base], [r for r in todo if r.base]):
            list(pool.map(one, wave))


def prepare_data(args, datasets: dict = DATASETS) -> list:
    """Generate ``datasets`` (folder: generator options) unless their manifests record the same
    options; write the val split's categories next to the records and return them."""
    from lvis_longtail.data import synthetic

    for name, options in datasets.items():
        manifest = os.path.join(args.datasets, name, "benchmark_dataset.json")
        if not os.path.isfile(manifest) or read_json(manifest) != options:
            print(f"generating {args.datasets}/{name} with {options}", flush=True)
            synthetic.generate(os.path.join(args.datasets, name), progress=False, **options)
            write_json_atomic(options, manifest)
    folder, ann = SPLITS["lt_bench_val"]
    val = read_json(os.path.join(args.datasets, folder, "annotations", ann))
    keep = ("id", "name", "frequency", "thin", "image_count")
    categories = [{k: c[k] for k in keep if k in c} for c in val["categories"]]
    os.makedirs(args.records, exist_ok=True)
    write_json_atomic(categories, os.path.join(args.records, "classes.json"))
    return categories


def report(args, records: dict) -> tuple:
    """Write the page from the records of this mode's plan for their row and seed, each from
    the pre-training its plan names; returns (page path, the keys of the records shown)."""
    names = [r["row"] for r in records.values() if r["row"] in lr.methods_by_name()]
    seeds = sorted(set(args.seeds) | {r["seed"] for r in records.values()})
    full = argparse.Namespace(**dict(vars(args), methods=args.methods + names, seeds=seeds))
    pre, runs = plan(full)
    planned = {r.key: r for r in runs + ([pre] if pre else []) + own_pretrainings(runs)}

    def init(run: Run) -> Optional[str]:  # the digest its pre-training's record gives
        src = None if run.method is None else run.pre or pre
        return (records.get(src.key) or {}).get("init_sha256") if src else None

    shown = {k: r for k, r in records.items()
             if k in planned and matches(r, planned[k], init(planned[k]))}  # fmt: skip
    categories = read_json(os.path.join(args.records, "classes.json"), what="val categories")
    stale = sorted(set(records) - set(shown))
    return longtail_page.write_page(args, shown, stale, categories, DATASETS), set(shown)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 60 iterations")
    p.add_argument("--device", default="cpu", help="MODEL.DEVICE; cuda selects the GPU mode")
    p.add_argument("--seeds", type=int, nargs="+", help="default: per mode (cpu: 0 1 2)")
    p.add_argument("--iters", type=int, help="iterations per row (cpu: 250)")
    p.add_argument("--pretrain-iters", type=int, help="shared pre-training (cpu: 1000; 0: none)")
    p.add_argument("--methods", nargs="+", help="rows or all (CPU: CPU_ROWS; GPU: all)")
    p.add_argument("--jobs", type=int, help="runs in parallel (cpu: 2)")
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
    args.seeds, args.iters = args.seeds or list(seeds), args.iters or iters
    args.jobs = args.jobs or jobs
    args.pretrain_iters = pre if args.pretrain_iters is None else args.pretrain_iters
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs)  # torch threads per run
    rows = lr.default_methods() if args.mode == "cuda" else lr.CPU_ROWS
    args.methods = list(lr.default_methods() if args.methods == ["all"] else args.methods or rows)
    out = os.path.join(REPO, "output", "benchmarks", f"longtail_{args.mode}")
    args.output = os.path.abspath(args.output or out)
    data = os.getenv("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
    args.datasets = os.path.abspath(args.datasets or os.path.expanduser(data))
    args.records = os.path.join(args.results, f"longtail{args.suffix}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    pre, runs = plan(args)
    records = read_records(args.records)
    if not args.report_only:
        init = os.path.join(pre.out_dir, INIT_FILE) if pre else None
        todo = to_train(runs, records, args.force, init_digest(init) if init else None)
        shared = [r for r in todo if not r.base and not r.pre]
        new = [p for p in ([pre] if pre and shared else []) + own_pretrainings(todo)
               if not os.path.isfile(os.path.join(p.out_dir, INIT_FILE))]  # fmt: skip
        if args.dry_run:
            for run, init_run in [(p, None) for p in new] + [(r, pre) for r in todo]:
                print(f"{run.key}: {shlex.join(command(run, args, init_run))}")
            print(f"{len(todo)} of {len(runs)} runs to train; records: {args.records}")
            return 0
        if todo:
            categories = prepare_data(args)
            for p in new:  # new weights (another CPU trains others): their runs all again
                pretrain(p, args, records)
                todo = [r for r in runs if r in todo or (r.pre or pre) is p]
            execute(todo, args, pre, records, ps.class_info(categories))
    path, shown = report(args, records)
    print(f"wrote {path}")
    missing = [r.key for r in runs if r.key not in shown]
    print(f"missing runs: {missing}" if missing else "every planned run has its record")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
