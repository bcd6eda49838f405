#!/usr/bin/env python
"""Each LVIS 2020 entry's pipeline on the long-tail benchmark, against its plain baseline
trained for the same total number of iterations (paired over seeds).

Both start from the long-tail benchmark's pre-training (``longtail.py``: R18-FPN backbone and
the mask head's shared layers, trained once on the balanced split) and evaluate on its 400-image
val split. The pipelines share ``4 x`` the benchmark's schedule (CPU: 1,000 iterations) between
their training stages:

- ``lvis2020_1st`` (the configs of ``recipe.py --quick``): stage 1 (EQL, RFS, mosaic, rotation,
  jitter; 40 %) -> pseudo labels of the training set and of 400 unannotated images ->
  stage 1 again from the pre-training with ignore regions and the pseudo-labelled images (40 %)
  -> stage 2 (frozen backbone and RPN, BAGS, the heavy DiceBCE mask head; 20 %) -> the 1st
  place's TTA. Baseline: EQL + RFS for the whole schedule.
- ``lvis2020_mmdet`` on the benchmark's Mask R-CNN (the entry's own tiny model costs ~8x an
  iteration of it on CPU): Seesaw + jitter/crop + InstaBoost-style paste with a random sampler
  (2/3) -> the dual-head fine-tune with RFS (1/3) -> flip + 3 scales TTA. Baseline: Seesaw + RFS
  for the whole schedule.

::

    python benchmarks/pipelines.py              # 3 seeds, 2 runs at a time (105 min on 2 cores)
    python benchmarks/pipelines.py --dry-run    # the commands
    python benchmarks/pipelines.py --report-only

Records (one per evaluated stage and seed, as ``longtail.py``'s) go to ``results/pipelines/``,
the page to ``results/pipelines.md``. A chain reruns from its first stage without a record.
"""

import argparse
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import longtail as lt
import longtail_rows as lr
import paired_stats as ps

from lvis_longtail.tools.recipe import CONFIGS
from lvis_longtail.utils.io import atomic_write, read_json

SCHEDULE = 4.0  # the pipelines' total, in units of the benchmark's schedule
EXTRA = "lt_bench_extra"  # the unannotated images the 1st place pseudo-labels
EXTRA_DATA = dict(lt.DATASETS["lt_bench"], num_unlabeled=400)  # same classes as lt_bench
EXTRA_PSEUDO = "lt_bench_extra_pseudo"
TTA_ENTRY = ("TEST.AUG.ENABLED", "True", "TEST.AUG.FLIP", "True",
             "TEST.AUG.SCALES", "((96, 144), (128, 192), (160, 240))")  # fmt: skip
KEYS = ("bbox/AP", "bbox/APr", "bbox/APc", "bbox/APf", "segm/AP", "segm/APr")


@dataclass
class Step:
    """One stage of a chain: ``kind`` train (``share`` of the total, from ``weights``: "init"
    or an earlier step's name), pseudo (labels ``dataset`` with the ``weights`` step's model)
    or eval (``--eval-only`` of the ``weights`` step's model)."""

    name: str
    kind: str
    config: str
    share: float = 0.0
    weights: str = "init"
    rfs: bool = True
    opts: Sequence[str] = ()
    dataset: str = ""


def _cfg(path: str) -> str:  # a recipe config path, relative to configs/
    return os.path.relpath(path, "configs")


def _recipe(role: str) -> str:
    return _cfg(CONFIGS[("lvis2020_1st", True)][role][0])


PIPELINES = {
    "lvis2020_1st": ("eql_4x", [
        Step("stage1", "train", _recipe("stage1"), 0.4),
        Step("pseudo_train", "pseudo", _recipe("stage1"), weights="stage1",
             dataset="lt_bench_train"),
        Step("pseudo_extra", "pseudo", _recipe("stage1"), weights="stage1", dataset=EXTRA),
        Step("selftrain", "train", _recipe("selftrain"), 0.4),
        Step("stage2", "train", _recipe("stage2"), 0.2, weights="selftrain"),
        Step("tta", "eval", _recipe("tta"), weights="stage2"),
    ]),
    "lvis2020_mmdet": ("seesaw_4x", [
        Step("model", "train", "tiny/mask_rcnn_R18_FPN_tiny_mmdet2020.yaml", 2 / 3, rfs=False),
        Step("dualhead", "train", "tiny/mask_rcnn_R18_FPN_tiny_seesaw_dualhead.yaml", 1 / 3,
             weights="model"),
        Step("tta", "eval", "tiny/mask_rcnn_R18_FPN_tiny_seesaw_dualhead.yaml", weights="dualhead",
             opts=TTA_ENTRY),
    ]),
}  # fmt: skip


@dataclass
class Chain:
    """One pipeline of one seed: its stages' runs in order (``steps[i]`` made ``runs[i]``)."""

    pipeline: str
    seed: int
    steps: List[Step]
    runs: List[lt.Run] = field(default_factory=list)
    cmds: List[List[str]] = field(default_factory=list)


def _data(args, extra_pseudo: Optional[str] = None) -> List[list]:
    """The ``DATASETS.LVIS_FORMAT`` value: the benchmark's splits, the extra images (and their
    pseudo labels)."""
    data = lt.registered_splits(args.datasets)
    extra = os.path.join(args.datasets, EXTRA)
    data.append([EXTRA, os.path.join(extra, "annotations", "lt_synthetic_unlabeled.json"),
                 os.path.join(extra, "images")])  # fmt: skip
    if extra_pseudo:
        data.append([EXTRA_PSEUDO, extra_pseudo, os.path.join(extra, "images")])
    return data


def build_chain(pipeline: str, seed: int, args, init: str) -> Chain:
    """The runs and commands of ``pipeline`` for ``seed`` (paths under ``args.output``)."""
    chain = Chain(pipeline, seed, PIPELINES[pipeline][1])
    total = round(args.iters * SCHEDULE)
    folder = os.path.join(args.output, pipeline, f"seed{seed}")
    out = {s.name: os.path.join(folder, s.name) for s in chain.steps}
    pseudo = {s.dataset: os.path.join(out[s.name], f"{s.dataset}_pseudo.json")
              for s in chain.steps if s.kind == "pseudo"}  # fmt: skip
    for s in chain.steps:
        weights = init if s.weights == "init" else os.path.join(out[s.weights], "model_final.pth")
        common = ["SEED", str(seed), "MODEL.DEVICE", args.device]
        if s.kind == "pseudo":
            opts = ["DATASETS.LVIS_FORMAT", repr(_data(args)), *common]
            cmd = [sys.executable, "-m", "lvis_longtail.tools.pseudo_label", "--config-file",
                   os.path.join("configs", s.config), "--dataset", s.dataset,
                   "--output", pseudo[s.dataset], "--score-thresh", "0.5"]  # fmt: skip
        else:
            extra = None
            opts = list(s.opts) + ["DATASETS.TEST", "('lt_bench_val',)", *common]
            if s.kind == "train":
                opts += lr.schedule_opts(max(1, round(total * s.share)))
                opts += ["DATASETS.TRAIN", "('lt_bench_train',)", "TEST.EVAL_PERIOD", "0"]
                opts += (["DATALOADER.REPEAT_THRESHOLD", str(args.repeat_threshold)] if s.rfs
                         else ["DATALOADER.SAMPLER_TRAIN", "TrainingSampler"])  # fmt: skip
                if s.name == "selftrain":
                    extra = pseudo[EXTRA]
                    opts += ["DATASETS.IGNORE_BOXES", repr([["lt_bench_train", pseudo["lt_bench_train"]]]),  # noqa: E501
                             "DATASETS.EXTRA_TRAIN", f"('{EXTRA_PSEUDO}',)"]  # fmt: skip
            opts = ["DATASETS.LVIS_FORMAT", repr(_data(args, extra)), *opts]
            cmd = [sys.executable, "train_net.py", "--config-file",
                   os.path.join("configs", s.config)] + (["--eval-only"] if s.kind == "eval" else [])  # fmt: skip  # noqa: E501
        run = lt.Run(f"{pipeline}_{s.name}", seed, s.config, opts, out[s.name])
        chain.runs.append(run)
        chain.cmds.append(cmd + opts + ["OUTPUT_DIR", run.out_dir, "MODEL.WEIGHTS", weights])
    return chain


def baseline_run(name: str, seed: int, args) -> lt.Run:
    m = lr.methods_by_name()[name]
    out_dir = os.path.join(args.output, m.name, f"seed{seed}")
    return lt.Run(m.name, seed, m.config, lt.row_overrides(m, seed, args), out_dir, m)


def _done(run: lt.Run, step: Step, records: dict, init: Optional[str]) -> bool:
    if step.kind == "pseudo":
        return os.path.isfile(os.path.join(run.out_dir, f"{step.dataset}_pseudo.json.summary.json"))
    return lt.matches(records.get(run.key), run, init)


def first_todo(chain: Chain, records: dict, force: bool = False, init: Optional[str] = None) -> int:
    """Index of the chain's first stage to run (``len(steps)``: none): the first without a
    record from the initialisation of digest ``init``; every later stage reruns."""
    for i, (s, run) in enumerate(zip(chain.steps, chain.runs)):
        if force or not _done(run, s, records, init):
            return i
    return len(chain.steps)


def run_chain(chain: Chain, start: int, args, records: dict, classes, init: Optional[str]) -> None:
    for s, run, cmd in list(zip(chain.steps, chain.runs, chain.cmds))[start:]:
        if not lt.run_and_record(run, cmd, args, records, classes, init, s.kind != "pseudo"):
            return print(f"STOP {chain.pipeline} seed {chain.seed}: {s.name} failed", flush=True)


def write_page(args, records: dict, digest: Optional[str]) -> str:
    classes = ps.class_info(read_json(os.path.join(args.records, "classes.json")))
    per_class, labels = {}, {}
    for rec in records.values():
        per_class.setdefault(rec["row"], {})[rec["seed"]] = rec["per_class"]
    lines = [
        "# Both LVIS 2020 entries' pipelines on the long-tail benchmark",
        "",
        f"Written by `python benchmarks/pipelines.py` (module docstring: the stages). Each "
        f"pipeline trains {round(args.iters * SCHEDULE)} iterations in all, as its baseline; "
        f"seeds {', '.join(map(str, args.seeds))}; every run from the long-tail benchmark's "
        f"pre-training `init.pth` (sha256 {digest or 'unknown'}…). Mean ± std over seeds; "
        "Δ: paired difference, 95 % t interval [ ] (`*`: excludes 0) and bootstrap interval "
        "{ } over classes.",
    ]
    for pipeline, (base, steps) in PIPELINES.items():
        rows = [
            (f"{pipeline}_{s.name}", f"{pipeline}: {s.name}") for s in steps if s.kind != "pseudo"
        ]  # noqa: E501
        rows.append((base, lr.methods_by_name()[base].label))
        labels.update(rows)
        lines += ["", f"## `{pipeline}`", "", ps.summary_table(rows, per_class, classes, KEYS), ""]
        stages = rows[:-1]  # each stage against the one before it, then against the baseline
        pairs = [(n, label, p, p_label) for (p, p_label), (n, label) in zip(stages, stages[1:])]
        pairs += [(n, label, base, labels[base]) for n, label in stages]
        lines.append(ps.delta_table(pairs, per_class, classes, KEYS))
    notes = os.path.join(args.results, "pipelines_notes.md")
    if os.path.isfile(notes):
        with open(notes) as f:
            lines += ["", "## Interpretation", "", f.read()]
    path = os.path.join(args.results, "pipelines.md")
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=lt.MODES["cpu"][1], help="the 1x schedule")
    p.add_argument("--jobs", type=int, default=2, help="chains in parallel")
    p.add_argument("--output", help="runs folder (the long-tail benchmark's, to share its "
                   "pre-training: output/benchmarks/longtail_cpu)")  # fmt: skip
    p.add_argument("--datasets", help="dataset root ($DETECTRON2_DATASETS or ./datasets)")
    p.add_argument("--results", default=os.path.join(lt.REPO, "benchmarks", "results"))
    p.add_argument("--force", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    opts = ["--seeds", *map(str, a.seeds), "--iters", str(a.iters), "--jobs", str(a.jobs)]
    opts += ["--results", a.results, "--methods", "seesaw"]
    opts += [f"--{k}={v}" for k, v in (("output", a.output), ("datasets", a.datasets)) if v]
    args = lt.parse_args(opts)  # the benchmark's defaults: device, threads, paths
    args.records = os.path.join(a.results, "pipelines")
    for k in ("pipelines", "force", "dry_run", "report_only"):
        setattr(args, k, getattr(a, k))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    pre, _ = lt.plan(args)
    init = os.path.join(pre.out_dir, lt.INIT_FILE)
    records = lt.read_records(args.records)
    chains = [build_chain(p, s, args, init) for p in args.pipelines for s in args.seeds]
    bases = [baseline_run(PIPELINES[p][0], s, args) for p in args.pipelines for s in args.seeds]
    planned = {r.key: r for r in [*(r for c in chains for r in c.runs), *bases]}

    def plan_todo(digest, force):
        todo = [(c, first_todo(c, records, force, digest)) for c in chains]
        base_todo = [b for b in bases if force or not lt.matches(records.get(b.key), b, digest)]
        return [(c, i) for c, i in todo if i < len(c.steps)], base_todo

    digest = lt.init_digest(init)
    todo, base_todo = plan_todo(digest, args.force)
    if args.dry_run:
        for c, i in todo:
            for cmd in c.cmds[i:]:
                print(shlex.join(cmd))
        for b in base_todo:
            print(shlex.join(lt.command(b, args, pre)))
        print(f"{len(todo)} chains and {len(base_todo)} baselines to run")
        return 0
    if not args.report_only and (todo or base_todo):
        classes = ps.class_info(lt.prepare_data(args, {**lt.DATASETS, EXTRA: EXTRA_DATA}))
        if not digest:  # a new pre-training: every run again
            lt.pretrain(pre, args, {})
            digest = lt.init_digest(init)
            todo, base_todo = plan_todo(digest, True)
        jobs = [lambda c=c, i=i: run_chain(c, i, args, records, classes, digest) for c, i in todo]
        jobs += [lambda b=b: lt.run_and_record(b, lt.command(b, args, pre), args, records,
                                               classes, digest) for b in base_todo]  # fmt: skip
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: job(), jobs))
    shown = {k: r for k, r in records.items() if k in planned and lt.matches(r, planned[k], digest)}
    print(f"wrote {write_page(args, shown, digest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
