#!/usr/bin/env python
"""Long-tail benchmark on the synthetic dataset: does each method really help rare classes?

Trains the tiny Mask R-CNN of ``configs/tiny/`` once per method x seed on ``lt_synthetic_train``
(each training in its own ``train_net.py`` subprocess, with its own OUTPUT_DIR and SEED),
evaluates it on ``lt_synthetic_val``, computes per-class AP with lvis-api from the written
results file, and writes ``benchmarks/results/longtail.md`` plus PNG plots::

    python benchmarks/longtail.py --quick              # smoke run: 1 seed, short schedule
    python benchmarks/longtail.py --jobs 2             # the full benchmark (3 seeds)
    python benchmarks/longtail.py --device cuda        # same, on a GPU (MODEL.DEVICE)
    python benchmarks/longtail.py --report-only        # re-aggregate finished runs

Finished runs (a ``benchmark_run.json`` with rc 0 in their folder) are reused, so an
interrupted benchmark continues where it stopped; ``--force`` retrains everything. The diagnostic
method ``bags_long`` runs only when named in ``--methods``. The report
appends ``<results>/longtail_notes.md`` (the hand-written interpretation) if it exists.

Schedule: ``--iters`` (default 250 at batch 4, 1/4 of the base 1000) with warmup and LR steps
scaled from the base config; the BAGS fine-tune runs a third of it. Repeat-factor sampling
uses ``--repeat-threshold`` (default 0.13, as the tiny configs): detectron2's t = 0.001
oversamples nothing on an 800-image set (the rarest class is in 3/800 = 0.0037 of the
images), while 0.13 oversamples the classes in fewer than ~104 images, the same rare + common
groups that t = 0.001 oversamples on LVIS v1 (and that the tiny EQL leaf's lambda 0.13
suppresses).
"""

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from lvis_longtail.utils.io import atomic_write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join("configs", "tiny")
TRAIN_SET, VAL_SET = "lt_synthetic_train", "lt_synthetic_val"
RUN_FILE = "benchmark_run.json"
INVOCATION_FILE = "benchmark_invocation.json"
PER_CLASS_FILE = "benchmark_per_class.json"
TASKS = ("bbox", "segm")
GROUPS = ("r", "c", "f")
BASELINE = "softmax"


@dataclass(frozen=True)
class Method:
    """One benchmarked method.

    Attributes:
        name: short key, used in folder names and ``--methods``.
        label: what the tables and plots call it.
        leaf: config file under ``configs/tiny/``.
        opts: extra ``KEY VALUE`` overrides.
        rfs: uses repeat-factor sampling (gets ``--repeat-threshold``).
        finetune_of: the method whose ``model_final.pth`` (same seed) this one starts from.
        group: "cls" (box classification) or "mask" (mask head).
        finetune_factor: fine-tune length as a fraction of ``--iters`` (the BAGS leaf: 1/3).
    """

    name: str
    label: str
    leaf: str
    opts: Sequence[str] = ()
    rfs: bool = True
    finetune_of: Optional[str] = None
    group: str = "cls"
    finetune_factor: float = 1 / 3


METHODS = (
    Method(
        "softmax",
        "SoftmaxCE (no RFS)",
        "mask_rcnn_R18_FPN_tiny_softmax.yaml",
        ("DATALOADER.SAMPLER_TRAIN", "TrainingSampler"),
        rfs=False,
    ),
    Method("softmax_rfs", "SoftmaxCE + RFS", "mask_rcnn_R18_FPN_tiny_softmax.yaml"),
    Method("seesaw", "Seesaw + NormedLinear + RFS", "mask_rcnn_R18_FPN_tiny_seesaw.yaml"),
    Method("eql", "EQL (λ 0.13) + RFS", "mask_rcnn_R18_FPN_tiny_eql.yaml"),
    Method("eqlv2", "EQLv2 (no RFS)", "mask_rcnn_R18_FPN_tiny_eqlv2.yaml", rfs=False),
    Method(
        "bags",
        "GroupSoftmax (fine-tune of SoftmaxCE + RFS)",
        "mask_rcnn_R18_FPN_tiny_bags.yaml",
        finetune_of="softmax_rfs",
    ),
    Method("fedloss", "FederatedLoss + RFS", "mask_rcnn_R18_FPN_tiny_fedloss.yaml"),
    Method("dicebce", "DiceBCEMaskHead + RFS", "mask_rcnn_R18_FPN_tiny_dicebce.yaml", group="mask"),
    Method(
        "dicebce_arealevel",
        "DiceBCEMaskHead + area_ratio + RFS",
        "mask_rcnn_R18_FPN_tiny_dicebce_arealevel.yaml",
        group="mask",
    ),
)
# Diagnostics, run only when named in --methods. BAGS with a fine-tune of --iters iterations
# instead of a third of them. EQLv2 with its classifier bias initialised to 0
# (prior 0.5) as in the reference (tztztztztz/eqlv2 ``bbox_head.py::init_weights``), instead of
# prior 1e-3 on all K+1 logits, the background logit included.
DIAGNOSTICS = (
    Method(
        "bags_long",
        "GroupSoftmax, fine-tune as long as the training [diagnostic]",
        "mask_rcnn_R18_FPN_tiny_bags.yaml",
        finetune_of="softmax_rfs",
        finetune_factor=1.0,
    ),
)
DEFAULT_METHODS = tuple(m.name for m in METHODS)
METHODS = METHODS + DIAGNOSTICS
METHODS_BY_NAME = {m.name: m for m in METHODS}
QUICK_METHODS = DEFAULT_METHODS


# ----------------------------------------------------------------------------- schedule / runs
def schedule_opts(iters: int, finetune: bool, finetune_factor: float = 1 / 3) -> List[str]:
    """Solver overrides for ``iters`` iterations, scaled from the tiny base schedule
    (1500 iterations, warmup 100, steps 1100/1400; BAGS leaf: 500, 50, 350/450, i.e. a
    fine-tune of ``finetune_factor`` = 1/3 of the training)."""
    if finetune:
        iters = max(10, round(iters * finetune_factor))
        warmup, steps = round(0.1 * iters), (round(0.7 * iters), round(0.9 * iters))
    else:
        warmup = min(100, round(iters / 15))
        steps = (round(iters * 1100 / 1500), round(iters * 1400 / 1500))
    return [
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.WARMUP_ITERS",
        str(max(1, warmup)),
        "SOLVER.STEPS",
        f"({steps[0]}, {steps[1]})",
        "SOLVER.CHECKPOINT_PERIOD",
        str(10 * iters),
    ]


@dataclass
class Run:
    method: Method
    seed: int
    out_dir: str
    deps: List["Run"] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.method.name}/seed{self.seed}"

    def done(self) -> bool:
        info = read_json(os.path.join(self.out_dir, RUN_FILE))
        return bool(info) and info.get("rc") == 0


def run_command(run: Run, args) -> List[str]:
    """The ``train_net.py`` command line of one run."""
    m = run.method
    opts = list(m.opts) + schedule_opts(args.iters, m.finetune_of is not None, m.finetune_factor)
    opts += ["OUTPUT_DIR", run.out_dir, "SEED", str(run.seed), "MODEL.DEVICE", args.device]
    opts += ["DATASETS.TEST", f"('{VAL_SET}',)", "TEST.EVAL_PERIOD", "0"]
    if m.rfs:
        opts += ["DATALOADER.REPEAT_THRESHOLD", str(args.repeat_threshold)]
    if m.finetune_of:
        opts += ["MODEL.WEIGHTS", os.path.join(run.deps[0].out_dir, "model_final.pth")]
    leaf = os.path.join(CONFIGS, m.leaf)
    return [sys.executable, "train_net.py", "--config-file", leaf] + opts


def plan_runs(args) -> List[Run]:
    """All runs of the benchmark; fine-tunes depend on their seed's base run."""
    names = list(args.methods)
    for name in names:  # a fine-tune needs its base method
        base = METHODS_BY_NAME[name].finetune_of
        if base and base not in names:
            names.insert(0, base)
    runs: Dict[str, Run] = {}
    for seed in args.seeds:
        for name in names:
            m = METHODS_BY_NAME[name]
            run = Run(m, seed, os.path.join(args.output, name, f"seed{seed}"))
            if m.finetune_of:
                run.deps = [runs[f"{m.finetune_of}/seed{seed}"]]
            runs[run.key] = run
    # seed by seed (an interrupted benchmark leaves whole seeds), fine-tune bases first
    bases = {m.finetune_of for m in METHODS}
    return sorted(
        runs.values(),
        key=lambda r: (r.seed, r.method.finetune_of is not None, r.method.name not in bases),
    )


def execute(runs: List[Run], args) -> int:
    """Run the pending trainings, ``args.jobs`` at a time, each followed by per-class AP.

    Returns:
        the number of torch threads per run.
    """
    pending = [r for r in runs if args.force or not r.done()]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    active: Dict[str, tuple] = {}
    failed = set()
    print(f"{len(pending)} of {len(runs)} runs to do, {args.jobs} at a time, {threads} thread(s)")
    while pending or active:
        for run in list(pending):
            if len(active) >= args.jobs:
                break
            if any(d.key in failed for d in run.deps):
                pending.remove(run)
                failed.add(run.key)
                print(f"SKIP {run.key}: its base run failed", flush=True)
                continue
            if any(not d.done() for d in run.deps):
                continue
            pending.remove(run)
            os.makedirs(run.out_dir, exist_ok=True)
            cmd = run_command(run, args)
            log = open(os.path.join(run.out_dir, "benchmark_stdout.log"), "w")
            log.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            active[run.key] = (run, proc, time.time(), log, cmd)
            print(f"START {run.key}", flush=True)
        time.sleep(2)
        for key, (run, proc, t0, log, cmd) in list(active.items()):
            if proc.poll() is None:
                continue
            wall = time.time() - t0
            log.close()
            del active[key]
            rc = proc.returncode
            if rc == 0:
                try:
                    write_per_class(run.out_dir)
                except Exception as e:  # keep the benchmark going; reported as missing
                    print(f"per-class AP of {key} failed: {e!r}", flush=True)
                    rc = -1
            else:
                failed.add(key)
            write_json(os.path.join(run.out_dir, RUN_FILE), {"rc": rc, "wall_s": wall, "cmd": cmd})
            print(f"{'DONE' if rc == 0 else 'FAIL'} {key} rc={rc} {wall:.0f}s", flush=True)
        if pending and not active and all(any(not d.done() for d in r.deps) for r in pending):
            for run in pending:
                print(f"SKIP {run.key}: its base run did not finish", flush=True)
            break
    return threads


# ----------------------------------------------------------------------------- evaluation
def per_class_ap(gt_json: str, results_json: str, iou_type: str) -> Dict[int, float]:
    """``{category_id: AP in percent}`` of one task with lvis-api's ``LVISEval`` (classes with
    no ground truth in the split are left out).

    Per-class AP = mean over IoU thresholds and recall points of ``eval['precision']``
    ([T, R, K, A]) at area "all", ignoring -1, as lvis-api's summary does for all classes.
    """
    # isort: off
    import lvis_longtail  # noqa: F401  (first: lvis-api's np.float shim)

    # isort: on
    from lvis import LVIS, LVISEval, LVISResults

    gt = LVIS(gt_json)
    with open(results_json) as f:
        results = json.load(f)
    if iou_type == "bbox":  # lvis-api computes bbox IoU from "segmentation" when present
        results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    if not results:
        return {c: 0.0 for c in gt.get_cat_ids() if gt.get_ann_ids(cat_ids=[c])}
    ev = LVISEval(gt, LVISResults(gt, results, max_dets=300), iou_type)
    ev.run()
    precision = ev.eval["precision"]
    out = {}
    for k, cat in enumerate(ev.params.cat_ids):
        p = precision[:, :, k, 0]
        p = p[p > -1]
        if p.size:
            out[int(cat)] = float(100 * p.mean())
    return out


def write_per_class(run_dir: str) -> dict:
    inference = os.path.join(run_dir, "inference", VAL_SET)
    gt_json = dataset_json(VAL_SET)
    results = os.path.join(inference, "lvis_instances_results.json")
    out = {task: per_class_ap(gt_json, results, task) for task in TASKS}
    write_json(os.path.join(run_dir, PER_CLASS_FILE), out)
    return out


def dataset_json(split: str) -> str:
    root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", os.path.join(REPO, "datasets")))
    return os.path.join(root, "lt_synthetic", "annotations", f"{split}.json")


def ensure_dataset(gen_args: Sequence[str]) -> None:
    """Generate the synthetic dataset if its jsons are missing."""
    if all(os.path.isfile(dataset_json(s)) for s in (TRAIN_SET, VAL_SET)):
        return
    out = os.path.dirname(os.path.dirname(dataset_json(TRAIN_SET)))
    cmd = [sys.executable, "-m", "lvis_longtail.data.synthetic", "--out", out, *gen_args]
    print("generating the dataset:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


# ----------------------------------------------------------------------------- aggregation
def read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_invocations(output: str) -> List[dict]:
    """The benchmark invocations recorded in ``output`` (oldest first)."""
    found = read_json(os.path.join(output, INVOCATION_FILE)) or []
    return [found] if isinstance(found, dict) else found


def wall_span(invocations: List[dict]) -> float:
    """Wall time from the first start to the last end (invocations may overlap); the sum of
    their wall times if a start time is missing."""
    if all("start_ts" in i for i in invocations):
        return max(i["start_ts"] + i["wall_s"] for i in invocations) - min(
            i["start_ts"] for i in invocations
        )
    return sum(i["wall_s"] for i in invocations)


def write_json(path: str, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1)


def class_info(gt_json: str, train_json: str) -> Dict[int, dict]:
    """``{category_id: {name, frequency, thin, train_instances}}`` from the split jsons."""
    val, train = read_json(gt_json), read_json(train_json)
    counts: Dict[int, int] = {}
    for ann in train["annotations"]:
        counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + 1
    return {
        c["id"]: {
            "name": c["name"],
            "frequency": c["frequency"],
            "thin": bool(c.get("thin", False)),
            "train_instances": counts.get(c["id"], 0),
        }
        for c in val["categories"]
    }


def run_metrics(metrics: dict, per_class: dict, classes: Dict[int, dict]) -> Dict[str, float]:
    """One run's table metrics: ``{"bbox/AP": ..., "segm/APr": ..., "segm/thin": ...}``."""
    out = {}
    for task in TASKS:
        for key in ("AP", "APr", "APc", "APf"):
            out[f"{task}/{key}"] = float(metrics[task][key])
        if per_class is not None:
            pc = {int(k): v for k, v in per_class[task].items()}
            thin = [v for c, v in pc.items() if classes.get(c, {}).get("thin")]
            out[f"{task}/thin"] = float(np.mean(thin)) if thin else float("nan")
            filled = [v for c, v in pc.items() if c in classes and not classes[c]["thin"]]
            out[f"{task}/filled"] = float(np.mean(filled)) if filled else float("nan")
    return out


def mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) ignoring NaN."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt(mean: float, std: float, seeds: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.1f} ± {std:.1f}" if seeds > 1 else f"{mean:.1f}"


def aggregate(
    per_run: Dict[str, Dict[int, Dict[str, float]]], baseline: str = BASELINE
) -> Dict[str, Dict[str, tuple]]:
    """``{method: {metric: (mean, std, n)}}`` from ``{method: {seed: {metric: value}}}``;
    also the paired difference to the baseline of the same seed (``d_<metric>``)."""
    out = {}
    base = per_run.get(baseline, {})
    for method, seeds in per_run.items():
        metrics = sorted({k for v in seeds.values() for k in v})
        agg = {}
        for key in metrics:
            vals = [seeds[s][key] for s in sorted(seeds) if key in seeds[s]]
            agg[key] = (*mean_std(vals), len(vals))
            diffs = [seeds[s][key] - base[s][key] for s in seeds if key in base.get(s, {})]
            if diffs and key.split("/")[0] in TASKS:
                agg["d_" + key] = (*mean_std(diffs), len(diffs))
        out[method] = agg
    return out


TABLE_COLUMNS = (
    ("bbox AP", "bbox/AP"),
    ("APr", "bbox/APr"),
    ("APc", "bbox/APc"),
    ("APf", "bbox/APf"),
    ("segm AP", "segm/AP"),
    ("APr", "segm/APr"),
    ("APc", "segm/APc"),
    ("APf", "segm/APf"),
    ("segm thin", "segm/thin"),
    ("bbox thin", "bbox/thin"),
    ("wall s/run", "wall_s"),
)


def markdown_table(agg: Dict[str, Dict[str, tuple]], methods: Sequence[Method]) -> str:
    """The summary table, one row per method, ``mean ± std`` over seeds."""
    lines = ["| Method | " + " | ".join(c for c, _ in TABLE_COLUMNS) + " | seeds |"]
    lines.append("|---" * (len(TABLE_COLUMNS) + 2) + "|")
    for m in methods:
        if m.name not in agg:
            continue
        a, cells, n = agg[m.name], [], 0
        for _, key in TABLE_COLUMNS:
            mean, std, n_key = a.get(key, (float("nan"), float("nan"), 0))
            if key == "wall_s":
                cells.append("–" if math.isnan(mean) else f"{mean:.0f} ± {std:.0f}")
            else:
                cells.append(fmt(mean, std, n_key))
            n = max(n, n_key)
        lines.append(f"| {m.label} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines)


DELTA_KEYS = ("bbox/AP", "bbox/APr", "bbox/APc", "bbox/APf", "segm/AP", "segm/APr", "segm/thin")
MASK_DELTA_KEYS = ("segm/AP", "segm/APr", "segm/APc", "segm/APf", "bbox/AP", "bbox/APr", "bbox/APf")


def delta_table(
    agg: Dict[str, Dict[str, tuple]],
    methods: Sequence[Method],
    keys: Sequence[str] = DELTA_KEYS,
    baseline: str = BASELINE,
) -> str:
    """Paired (same seed) differences to the baseline, mean ± std over seeds."""
    lines = ["| Method | " + " | ".join("Δ " + k for k in keys) + " |"]
    lines.append("|---" * (len(keys) + 1) + "|")
    for m in methods:
        if (
            m.name == baseline
            or m.name not in agg
            or not any("d_" + k in agg[m.name] for k in keys)
        ):
            continue
        cells = [fmt_signed(*agg[m.name].get("d_" + k, (float("nan"),) * 3)) for k in keys]
        lines.append(f"| {m.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_signed(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:+.1f} ± {std:.1f}" if n > 1 else f"{mean:+.1f}"


# ----------------------------------------------------------------------------- plots
def plot_groups(path: str, agg, methods: Sequence[Method]) -> None:
    """Grouped bars of APr/APc/APf per method (bbox and segm panels), error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in methods if m.name in agg]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), sharey=False)
    x = np.arange(len(shown))
    width = 0.26
    colors = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}
    for ax, task in zip(axes, TASKS):
        for i, g in enumerate(GROUPS):
            vals = [agg[m.name].get(f"{task}/AP{g}", (np.nan, 0, 0)) for m in shown]
            ax.bar(
                x + (i - 1) * width,
                [v[0] for v in vals],
                width,
                yerr=[v[1] for v in vals],
                capsize=2,
                label=f"AP{g}",
                color=colors[g],
            )
        ax.set_xticks(x)
        ax.set_xticklabels([m.label for m in shown], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(f"{task} AP (%)")
        ax.set_title(f"{task}: APr / APc / APf on {VAL_SET} (mean ± std over seeds)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_class(path: str, per_class_mean, classes, names: Sequence[tuple]) -> None:
    """Per-class AP (mean over seeds) against training instance count, log x, one marker
    colour per method; hollow markers for thin/hollow classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, task in zip(axes, TASKS):
        for (name, label), color in zip(names, ("#1f77b4", "#d62728", "#2ca02c")):
            pc = per_class_mean.get(name, {}).get(task, {})
            for thin in (False, True):
                cats = [c for c in pc if classes[c]["thin"] == thin]
                xs = [classes[c]["train_instances"] for c in cats]
                ax.scatter(
                    xs,
                    [pc[c] for c in cats],
                    s=36,
                    facecolors="none" if thin else color,
                    edgecolors=color,
                    label=f"{label} ({'thin' if thin else 'filled'})",
                )
        for edge in (10, 100):  # LVIS group bounds are on image counts; shown as a guide
            ax.axvline(edge, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("training instances of the class (log)")
        ax.set_ylabel(f"{task} AP (%)")
        ax.set_title(f"{task}: per-class AP on {VAL_SET}, mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- report
def collect(runs: List[Run], classes):
    """Per-run metrics ``{method: {seed: metrics}}`` and per-class AP ``{method: {seed: pc}}``."""
    per_run: Dict[str, Dict[int, Dict[str, float]]] = {}
    per_class: Dict[str, Dict[int, dict]] = {}
    for run in runs:
        info = read_json(os.path.join(run.out_dir, RUN_FILE))
        metrics = read_json(os.path.join(run.out_dir, "inference", VAL_SET, "lvis_metrics.json"))
        if not info or info.get("rc") != 0 or not metrics:
            continue
        pc = read_json(os.path.join(run.out_dir, PER_CLASS_FILE))
        values = run_metrics(metrics, pc, classes)
        values["wall_s"] = float(info["wall_s"])
        per_run.setdefault(run.method.name, {})[run.seed] = values
        if pc:
            per_class.setdefault(run.method.name, {})[run.seed] = pc
    return per_run, per_class


def mean_per_class(per_class) -> Dict[str, Dict[str, Dict[int, float]]]:
    out = {}
    for method, seeds in per_class.items():
        out[method] = {}
        for task in TASKS:
            cats = sorted({int(c) for pc in seeds.values() for c in pc[task]})
            out[method][task] = {
                c: float(np.mean([pc[task][str(c)] for pc in seeds.values() if str(c) in pc[task]]))
                for c in cats
            }
    return out


def write_report(args, runs, total_wall: float) -> str:
    classes = class_info(dataset_json(VAL_SET), dataset_json(TRAIN_SET))
    per_run, per_class = collect(runs, classes)
    agg = aggregate(per_run)
    methods = [m for m in METHODS if m.name in agg and m not in DIAGNOSTICS]
    diagnostics = [m for m in DIAGNOSTICS if m.name in agg]
    suffix = "_quick" if args.quick else ""
    os.makedirs(args.results, exist_ok=True)
    groups_png = f"longtail_groups{suffix}.png"
    plot_groups(os.path.join(args.results, groups_png), agg, methods)
    cls_methods = [m for m in methods if m.group == "cls" and m.name != BASELINE]
    best = max(cls_methods, key=lambda m: agg[m.name]["bbox/APr"][0], default=None)
    perclass_png = f"longtail_per_class{suffix}.png"
    pcm = mean_per_class(per_class)
    shown = [(BASELINE, METHODS_BY_NAME[BASELINE].label)] if BASELINE in pcm else []
    if best is not None and best.name in pcm:
        shown.append((best.name, best.label))
    plot_per_class(os.path.join(args.results, perclass_png), pcm, classes, shown)
    summary = {
        "agg": agg,
        "per_run": per_run,
        "total_wall_s": total_wall,
        "best": best and best.name,
    }
    write_json(os.path.join(args.results, f"longtail{suffix}.json"), summary)
    md = render_markdown(args, agg, methods, classes, best, total_wall, groups_png, perclass_png)
    versus_rfs = [m for m in METHODS if m.group == "mask" or m.finetune_of]
    versus_rfs = [m for m in versus_rfs if m.name in agg]
    if versus_rfs and "softmax_rfs" in agg:
        agg_rfs = aggregate(per_run, baseline="softmax_rfs")
        md += "\n".join(
            [
                "",
                VERSUS_RFS_HEADER,
                "",
                delta_table(agg_rfs, versus_rfs, MASK_DELTA_KEYS, "softmax_rfs"),
            ]
        )
        md += "\n"
    if diagnostics:
        md += "\n".join(["", DIAGNOSTICS_HEADER, "", markdown_table(agg, diagnostics), ""])
        md += "\n".join(["", delta_table(agg, diagnostics), ""])
    notes = os.path.join(args.results, f"longtail{suffix}_notes.md")
    if os.path.isfile(notes):
        with open(notes) as f:
            md += "\n## Interpretation\n\n" + f.read()
    path = os.path.join(args.results, f"longtail{suffix}.md")
    with open(path, "w") as f:
        f.write(md)
    return path


VERSUS_RFS_HEADER = (
    "## Mask heads and fine-tunes against their reference, SoftmaxCE + RFS (stock mask head), "
    "paired by seed"
)
DIAGNOSTICS_HEADER = (
    "## Diagnostics (extra runs to tell bugs from findings; not in the default method list)"
)


def render_markdown(args, agg, methods, classes, best, total_wall, groups_png, perclass_png):
    groups = {g: sum(c["frequency"] == g for c in classes.values()) for g in GROUPS}
    thin = sum(c["thin"] for c in classes.values())
    base = agg.get(BASELINE, {})
    gap = {
        t: base.get(f"{t}/APf", (np.nan,))[0] - base.get(f"{t}/APr", (np.nan,))[0] for t in TASKS
    }
    sched = schedule_opts(args.iters, False)
    ft = schedule_opts(args.iters, True)
    invocations = read_invocations(args.output) or [
        {"command": args.command, "started": "?", "wall_s": total_wall, "jobs": args.jobs}
    ]
    total = wall_span(invocations)
    run_sum = sum(a["wall_s"][0] * a["wall_s"][2] for a in agg.values() if "wall_s" in a)
    gen = " ".join(["--out datasets/lt_synthetic", *args.gen_args])
    lines = [
        "# Long-tail benchmark on the synthetic LVIS-format dataset",
        "",
        "Produced by these commands, in this order (a later one reuses the finished runs of the "
        "earlier ones; runs are stored under `output/benchmarks/longtail/<method>/seed<k>/`):",
        "",
        *(
            f"- `{i['command']}`: started {i['started']}, {i['wall_s'] / 60:.1f} min, "
            f"{i.get('jobs', '?')} run(s) at a time, {i.get('threads', '?')} torch thread(s) each"
            for i in invocations
        ),
        "",
        f"Machine: {invocations[-1].get('machine', args.machine)}. Total wall time: "
        f"{total / 60:.1f} min from the first start to the last end (per-run wall times add up "
        f"to {run_sum / 60:.1f} min). Report written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"- Dataset: `datasets/lt_synthetic` made by `python -m lvis_longtail.data.synthetic "
        f"{gen}` (train 800 / val 150 images; {len(classes)} classes: {groups['r']} rare, "
        f"{groups['c']} common, {groups['f']} frequent; {thin} thin/hollow).",
        f"- Schedule: {args.iters} iterations at batch 4 (`{' '.join(sched[:6])}`), "
        f"BAGS fine-tune `{' '.join(ft[:6])}`; repeat-factor sampling with "
        f"`DATALOADER.REPEAT_THRESHOLD {args.repeat_threshold}` where RFS is used; "
        f"`MODEL.DEVICE {args.device}`; all other settings from each `configs/tiny/` leaf.",
        f"- Seeds: {', '.join(map(str, args.seeds))} (`SEED`; the dataset is the same).",
        f"- Evaluation: `{VAL_SET}` (LVIS AP via the project's evaluator, 300 dets/image); "
        "per-class AP, thin-class AP (mean per-class AP over the `thin: true` classes) from "
        "lvis-api's `LVISEval` on the written results file.",
        "",
        "## Summary (mean ± std over seeds)",
        "",
        markdown_table(agg, methods),
        "",
        f"Baseline (SoftmaxCE, no RFS) APf − APr: bbox {gap['bbox']:.1f}, segm {gap['segm']:.1f} "
        "points.",
        "",
        "## Difference to the baseline, paired by seed (mean ± std)",
        "",
        delta_table(agg, methods),
        "",
        "The stock mask head row is SoftmaxCE + RFS (the same run); the DiceBCE rows differ "
        "from it only in the mask head, and the BAGS rows start from it: see the table against "
        "it below.",
        "",
        f"![APr/APc/APf per method]({groups_png})",
        "",
        f"![per-class AP vs training instances]({perclass_png})",
        "",
        f"Per-class plot: the baseline and the classification method with the highest mean "
        f"bbox APr ({best.label if best else '–'}).",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 80 iterations (smoke run)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    p.add_argument("--iters", type=int, default=None, help="default 250 (quick: 80)")
    p.add_argument("--methods", nargs="+", default=None, choices=[m.name for m in METHODS])
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    p.add_argument("--threads", type=int, default=0, help="torch threads/run (cpus // jobs)")
    p.add_argument("--device", default="cpu", help="MODEL.DEVICE, e.g. cuda")
    p.add_argument("--repeat-threshold", type=float, default=0.13)
    p.add_argument("--output", default=None, help="runs folder (output/benchmarks/longtail*)")
    p.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--gen-args", nargs=argparse.REMAINDER, default=[], help="synthetic args")
    p.add_argument("--machine", default=f"{os.cpu_count()} CPU cores", help="for the report")
    p.add_argument("--force", action="store_true", help="retrain finished runs")
    p.add_argument("--report-only", action="store_true", help="only aggregate finished runs")
    args = p.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.iters = args.iters or (80 if args.quick else 250)
    args.methods = args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS)
    args.output = args.output or os.path.join(
        REPO, "output", "benchmarks", "longtail_quick" if args.quick else "longtail"
    )
    args.command = "python benchmarks/longtail.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    os.chdir(REPO)
    ensure_dataset(args.gen_args)
    runs = plan_runs(args)
    if not args.report_only:
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        threads = execute(runs, args)
        invocation = {"command": args.command, "started": started, "wall_s": time.time() - t0}
        invocation["start_ts"] = t0
        invocation.update(machine=args.machine, jobs=args.jobs, threads=threads)
        invocations = read_invocations(args.output) + [invocation]
        write_json(os.path.join(args.output, INVOCATION_FILE), invocations)
    path = write_report(args, runs, time.time() - t0)
    print(f"wrote {path}")
    missing = [r.key for r in runs if not r.done()]
    if missing:
        print(f"missing runs: {missing}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
