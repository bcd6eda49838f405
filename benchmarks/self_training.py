#!/usr/bin/env python
"""Self-training on the synthetic set with withheld annotations: does ignoring pseudo-labelled
objects (and training on pseudo-labelled extra images) help?

The synthetic generator leaves ``--withhold`` of each training image's annotations out (their
classes marked not exhaustive, as LVIS does) and writes an unannotated split. Per seed, all
runs from the same random initialisation and schedule (``train_net.py`` subprocesses):

1. ``baseline``: the tiny Seesaw + RFS model on the train split (round 1);
2. its model pseudo-labels the train split and the unannotated split
   (``python -m lvis_longtail.tools.pseudo_label``, score >= ``--score-thresh``);
3. ``ignore``: round 2 with the train pseudo labels as ignore regions
   (``mask_rcnn_R18_FPN_tiny_seesaw_selftrain.yaml``);
4. ``ignore_extra``: round 2 with ignore regions plus the pseudo-labelled extra images
   (``..._selftrain_extra.yaml``: ``--extra-per-epoch`` of them per epoch, loss weight 0.5).

Every run is evaluated on val; the report (``benchmarks/results/self_training[_quick].md``)
gives mean ± std over seeds and the paired differences to the baseline with 95 % t intervals
(``paired_stats.py``, from each run's per-class csv). Finished steps are reused.

    python benchmarks/self_training.py              # 3 seeds, 300 iterations, 2 runs at a time
    python benchmarks/self_training.py --quick      # 1 seed, 30 iterations (smoke run)
    python benchmarks/self_training.py --report-only  # the report of the finished runs
"""

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from longtail_rows import schedule_opts  # noqa: E402
from paired_stats import class_info, fmt_ci, fmt_mean_std, paired, read_per_class, run_metrics  # noqa: E402,E501

from lvis_longtail.utils.io import atomic_write, read_json  # noqa: E402

CONFIGS = {
    "baseline": "configs/tiny/mask_rcnn_R18_FPN_tiny_seesaw.yaml",
    "ignore": "configs/tiny/mask_rcnn_R18_FPN_tiny_seesaw_selftrain.yaml",
    "ignore_extra": "configs/tiny/mask_rcnn_R18_FPN_tiny_seesaw_selftrain_extra.yaml",
}
KEYS = ("bbox/AP", "bbox/APr", "bbox/APc", "bbox/APf", "segm/AP", "segm/APr")
NAME = "lt_st"


def run(cmd, log_path):
    """Run ``cmd`` in the repository; its output goes to ``log_path``. Raises on failure."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.time()
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (rc {rc}); see {log_path}")
    return time.time() - start


def dataset_entries(data, extra_json=None):
    images = os.path.join(data, "images")
    entries = [
        [f"{NAME}_{split}", os.path.join(data, "annotations", f"lt_synthetic_{split}.json"), images]
        for split in ("train", "val", "unlabeled")
    ]
    if extra_json:
        entries.append([f"{NAME}_unlabeled_pseudo", extra_json, images])
    return entries


def common_opts(args, data, seed, out_dir, extra_json=None, threads=1):
    return [
        *schedule_opts(args.iters, False),
        "DATASETS.LVIS_FORMAT", repr(dataset_entries(data, extra_json)),
        "DATASETS.TRAIN", f"('{NAME}_train',)", "DATASETS.TEST", f"('{NAME}_val',)",
        "TEST.EVAL_PERIOD", "0", "MODEL.WEIGHTS", "", "SEED", str(seed),
        "OUTPUT_DIR", out_dir, "MODEL.DEVICE", args.device, "CPU_THREADS", str(threads),
    ]  # fmt: skip


def train(args, data, seed, variant, threads, pseudo=None):
    out_dir = os.path.join(args.output, f"{variant}_seed{seed}")
    if os.path.isfile(os.path.join(out_dir, "inference", f"{NAME}_val", "lvis_per_class.csv")):
        return out_dir
    extra_json = pseudo["unlabeled"] if variant == "ignore_extra" else None
    opts = common_opts(args, data, seed, out_dir, extra_json, threads)
    if variant != "baseline":
        opts += ["DATASETS.IGNORE_BOXES", repr([[f"{NAME}_train", pseudo["train"]]])]
    if variant == "ignore_extra":
        opts += ["DATASETS.EXTRA_TRAIN", f"('{NAME}_unlabeled_pseudo',)",
                 "DATASETS.EXTRA_TRAIN_PER_EPOCH", str(args.extra_per_epoch)]  # fmt: skip
    cmd = [sys.executable, "train_net.py", "--config-file", CONFIGS[variant], *opts]
    seconds = run(cmd, os.path.join(out_dir, "benchmark_stdout.log"))
    print(f"  {variant} seed {seed}: {seconds / 60:.1f} min", flush=True)
    return out_dir


def pseudo_label(args, data, seed, baseline_dir, threads):
    out = {}
    for split in ("train", "unlabeled"):
        path = os.path.join(args.output, f"pseudo_seed{seed}", f"{split}.json")
        out[split] = path
        if os.path.isfile(path):
            continue
        opts = common_opts(args, data, seed, os.path.dirname(path), threads=threads)
        opts += ["MODEL.WEIGHTS", os.path.join(baseline_dir, "model_final.pth")]
        cmd = [sys.executable, "-m", "lvis_longtail.tools.pseudo_label", "--config-file",
               CONFIGS["baseline"], "--dataset", f"{NAME}_{split}", "--output", path,
               "--score-thresh", str(args.score_thresh), *opts]  # fmt: skip
        seconds = run(cmd, path + ".log")
        summary = read_json(path + ".summary.json")
        print(f"  pseudo labels seed {seed} {split}: {summary['pseudo_labels']} on "
              f"{summary['images']} images ({seconds / 60:.1f} min)", flush=True)  # fmt: skip
    return out


def seed_pipeline(args, data, seed, threads):
    base = train(args, data, seed, "baseline", threads)
    pseudo = pseudo_label(args, data, seed, base, threads)
    return pseudo


def report(args, data, seeds, wall):
    val = read_json(os.path.join(data, "annotations", "lt_synthetic_val.json"))
    classes = class_info(val["categories"])
    per = {v: {} for v in CONFIGS}
    for variant in CONFIGS:
        for seed in seeds:
            csv = os.path.join(args.output, f"{variant}_seed{seed}", "inference", f"{NAME}_val",
                               "lvis_per_class.csv")  # fmt: skip
            if os.path.isfile(csv):
                per[variant][seed] = read_per_class(csv)
    if not per["baseline"]:  # nothing to report: keep the page there is
        print(f"no finished baseline run under {args.output}; the page is left as it is",
              file=sys.stderr)  # fmt: skip
        return None
    counts = {}
    for seed in seeds:
        for split in ("train", "unlabeled"):
            p = os.path.join(args.output, f"pseudo_seed{seed}", f"{split}.json.summary.json")
            if os.path.isfile(p):
                counts.setdefault(split, []).append(read_json(p)["pseudo_labels"])
    lines = [
        f"# Self-training on the synthetic set ({args.withhold:.0%} of train annotations withheld)",
        "",
        f"`{args.command}` — {len(seeds)} seed(s), {args.iters} iterations per run, "
        f"{args.num_train} train / {args.num_unlabeled} unannotated / 150 val images, pseudo "
        f"labels at score >= {args.score_thresh}, {args.extra_per_epoch} extra images per "
        f"epoch (loss weight 0.5); wall {wall / 60:.0f} min on {os.cpu_count()} CPUs.",
        "",
        "Pseudo labels per seed: train "
        + ", ".join(map(str, counts.get("train", [])))
        + "; unannotated "
        + ", ".join(map(str, counts.get("unlabeled", [])))
        + ".",
        "",
        "| run | " + " | ".join(KEYS) + " |",
        "|---|" + "---:|" * len(KEYS),
    ]
    for variant in CONFIGS:
        runs = per[variant]
        if not runs:
            continue
        cells = [fmt_mean_std([run_metrics(runs[s], classes)[k] for s in sorted(runs)])
                 for k in KEYS]  # fmt: skip
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "Paired difference to the baseline (mean, 95 % t interval over seeds, "
              "[seed x class bootstrap]):", "",
              "| run | " + " | ".join(KEYS) + " |", "|---|" + "---:|" * len(KEYS)]  # fmt: skip
    for variant in ("ignore", "ignore_extra"):
        if not per[variant]:
            continue
        cells = [fmt_ci(paired(per[variant], per["baseline"], classes, k)) for k in KEYS]
        lines.append(f"| {variant} − baseline | " + " | ".join(cells) + " |")
    notes = os.path.join(args.results, f"self_training{args.suffix}_notes.md")
    if os.path.isfile(notes):
        lines += ["", open(notes).read().strip()]
    path = os.path.join(args.results, f"self_training{args.suffix}.md")
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 30 iterations")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--iters", type=int)
    p.add_argument("--withhold", type=float, default=0.4)
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--num-unlabeled", type=int, default=400)
    p.add_argument("--extra-per-epoch", type=int, default=200)
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--output", default=None)
    p.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--report-only", action="store_true", help="only report finished runs")
    args = p.parse_args(argv)
    args.command = "python benchmarks/self_training.py " + " ".join(sys.argv[1:])
    args.suffix = "_quick" if args.quick else ""
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.iters = args.iters or (30 if args.quick else 300)
    default_out = os.path.join(REPO, "output", "benchmarks", f"self_training{args.suffix}")
    args.output = args.output or default_out
    start = time.time()
    data = os.path.join(args.output, "data")
    if args.report_only:
        if not os.path.isfile(os.path.join(data, "annotations", "lt_synthetic_val.json")):
            print(f"no runs under {args.output}; the page is left as it is", file=sys.stderr)
            return 1
        invocation = os.path.join(args.output, "invocation.json")
        saved = read_json(invocation) if os.path.isfile(invocation) else {}
        args.command = saved.get("command", args.command)
        return 0 if report(args, data, args.seeds, saved.get("wall_s", 0.0)) else 1
    if not os.path.isfile(os.path.join(data, "annotations", "lt_synthetic_unlabeled.json")):
        subprocess.check_call(
            [sys.executable, "-m", "lvis_longtail.data.synthetic", "--out", data,
             "--num-train", str(args.num_train), "--num-unlabeled", str(args.num_unlabeled),
             "--withhold-fraction", str(args.withhold), "--eval-min-per-class", "10"],
            cwd=REPO,
        )  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with cf.ThreadPoolExecutor(args.jobs) as pool:  # a seed's round 2 starts once it can
        firsts = {pool.submit(seed_pipeline, args, data, s, threads): s for s in args.seeds}
        jobs = []
        for done in cf.as_completed(firsts):
            seed, pseudo = firsts[done], done.result()
            jobs += [pool.submit(train, args, data, seed, v, threads, pseudo)
                     for v in ("ignore", "ignore_extra")]  # fmt: skip
        for j in jobs:
            j.result()
    path = report(args, data, args.seeds, time.time() - start)
    print(f"wrote {path}")
    with atomic_write(os.path.join(args.output, "invocation.json")) as f:
        json.dump({"command": args.command, "wall_s": time.time() - start}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
