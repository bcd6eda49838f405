"""Write the long-tail benchmark's results page: collect finished runs, render the markdown
(setup, summary, paired differences with intervals, plots) and a json of every number.

Next to the page, ``longtail[_mode]_runs.json`` archives every finished run: its fingerprint
(location-free, :mod:`lvis_longtail.benchmark.plan`), its per-class AP and its timing record.
The page is built from the planned runs that finished here and, for the others, from archived
runs with the planned fingerprint, so a results folder committed by one checkout is extended
by the next one without retraining what it holds; a run found both here and in the archive is
a reproduction, and the page lists how far the two differ.
"""

import json
import math
import os
import time
from typing import Dict, List, Optional, Sequence

from lvis_longtail.benchmark import plots
from lvis_longtail.benchmark.methods import BASELINE, NOTES, methods_by_name
from lvis_longtail.benchmark.plan import DATASET_NAMES, Run
from lvis_longtail.benchmark.report import (
    check_against_metrics,
    class_info,
    delta_table,
    read_per_class,
    run_metrics,
    summary_table,
)
from lvis_longtail.utils.io import atomic_write, write_json_atomic
from lvis_longtail.utils.per_class_csv import CSV_FILE

INVOCATION_FILE = "benchmark_invocations.json"
METRICS_FILE = "lvis_metrics.json"
TARGET_BBOX_AP = 30.0
SUMMARY_KEYS = (
    "bbox/AP", "bbox/APr", "bbox/APc", "bbox/APf",
    "segm/AP", "segm/APr", "segm/APc", "segm/APf", "segm/thin", "bbox/thin",
)  # fmt: skip
CLS_KEYS = ("bbox/APr", "bbox/AP", "bbox/APc", "bbox/APf", "segm/APr")
MASK_KEYS = ("segm/AP", "segm/APr", "segm/thin", "segm/APf", "bbox/AP")
REPRO_KEYS = ("bbox/AP", "bbox/APr", "segm/AP")
ROW_NOTES = """\
How to read the rows. Every row is one config of `lvis_longtail/benchmark/methods.py`, trained
per seed from the same pre-trained backbone + FPN on the same long-tailed train split. Each Δ is
paired by seed against the row named under *vs*, the run that differs only in what the row
adds (its base for fine-tunes and test-time rows; SoftmaxCE with the same sampler otherwise).
`[a, b]` is the 95 % Student-t interval over seeds (`*`: excludes 0); `{a, b}` a 95 % bootstrap
interval resampling seeds and the classes of the group together (it adds how much the few
rare classes happen to favour a method); *seeds for ±1* is how many seeds a ±1-point t interval
on the first Δ would need at the observed spread. A row shows what its change does to this
detector, at this schedule, on synthetic shapes whose class is given by shape and colour; it
cannot show what the method does on LVIS (real appearance variety, 1203 classes, 100k images),
at other schedules, or for methods whose hyper-parameters were tuned for LVIS and not here."""


ARCHIVE_VERSION = 1


def archive_path(results: str, mode: str) -> str:
    """``<results>/longtail[_mode]_runs.json``."""
    return os.path.join(results, "longtail" + ("" if mode == "cpu" else f"_{mode}") + "_runs.json")


def read_archive(path: str) -> dict:
    """``{"runs": {key: entry}, "invocations": [...]}`` of an archive (empty when absent).

    An entry is ``{"fingerprint": str, "record": {...}, "per_class": {task: {category id
    (str): AP}} or None}`` (None: the pre-training run).

    Raises:
        ValueError: naming the file, run and field of a malformed entry.
    """
    if not os.path.isfile(path):
        return {"version": ARCHIVE_VERSION, "runs": {}, "invocations": []}
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not json: {e}") from None
    if not isinstance(data, dict) or data.get("version") != ARCHIVE_VERSION:
        raise ValueError(f"{path}: not a version {ARCHIVE_VERSION} run archive")
    runs = data.get("runs")
    if not isinstance(runs, dict):
        raise ValueError(f"{path}: 'runs' must be an object of run key -> entry")
    for key, entry in runs.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("fingerprint"), str):
            raise ValueError(f"{path}: run {key!r}: 'fingerprint' missing or not a string")
        if not isinstance(entry.get("record"), dict):
            raise ValueError(f"{path}: run {key!r}: 'record' missing or not an object")
        pc = entry.get("per_class")
        if pc is None:
            continue
        if not isinstance(pc, dict):
            raise ValueError(f"{path}: run {key!r}: 'per_class' must be an object or null")
        for task, values in pc.items():
            if not isinstance(values, dict) or not all(
                isinstance(v, (int, float)) and k.isdigit() for k, v in values.items()
            ):
                raise ValueError(
                    f"{path}: run {key!r}: per_class[{task!r}] must map category ids to AP"
                )
    data.setdefault("invocations", [])
    return data


def archived_plan(archive: dict) -> tuple:
    """The row names and seeds an archive (:func:`read_archive`) holds (the driver reports
    them too)."""
    names, seeds = {}, set()
    for key in archive["runs"]:
        name, _, seed = key.rpartition("/seed")
        if name != "pretrain" and seed.isdigit():
            names[name] = None  # ordered, unique
            seeds.add(int(seed))
    return list(names), sorted(seeds)


def _same_fingerprint(run: Run, entry) -> bool:
    return (
        entry is not None
        and entry["fingerprint"] == run.fingerprint
        and (run.method is None or entry["per_class"] is not None)
    )


def current_init(runs: Sequence[Run], archive: dict) -> Optional[str]:
    """The pre-training realisation the page and the reuse of archived runs follow: the one
    finished here, else the archived one (``"scratch"`` when the rows have no pre-training;
    None for records older than the ``init`` field)."""
    pre = next((r for r in runs if r.method is None), None)
    if pre is None:
        return "scratch"
    if pre.done():
        return pre.init()
    entry = archive["runs"].get(pre.key)
    return entry["record"].get("init") if _same_fingerprint(pre, entry) else None


def archived(run: Run, archive: dict, init: Optional[str]) -> bool:
    """Whether ``archive`` (:func:`read_archive`) holds ``run``'s results: same fingerprint,
    descended from the pre-training realisation ``init`` (:func:`current_init`)."""
    entry = archive["runs"].get(run.key)
    return _same_fingerprint(run, entry) and entry["record"].get("init") == init


def reusable(runs: Sequence[Run], archive: dict) -> set:
    """Keys of ``runs`` whose results the archive holds for the current realisation."""
    init = current_init(runs, archive)
    return {r.key for r in runs if archived(r, archive, init)}


def _archived_per_class(entry: dict) -> dict:
    return {t: {int(c): float(v) for c, v in pc.items()} for t, pc in entry["per_class"].items()}


def record_invocation(output: str, invocation: dict) -> None:
    path = os.path.join(output, INVOCATION_FILE)
    previous = read_invocations(output)
    write_json_atomic(previous + [invocation], path)


def read_invocations(output: str) -> List[dict]:
    path = os.path.join(output, INVOCATION_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def collect(runs: Sequence[Run], val_dataset: str, classes: Dict[int, dict], archive: dict):
    """Per-class AP ``{row: {seed: PerClass}}`` and run records of the finished runs (here, or
    archived with the planned fingerprint and pre-training realisation), csv/json mismatches,
    reproductions (runs found in both, as different runs: ``[(key, metric, here, archived,
    same realisation)]``; a run of another realisation is replaced, not paired) and the
    updated archive entries."""
    per_class: Dict[str, Dict[int, dict]] = {}
    records: Dict[str, Dict[int, dict]] = {}
    mismatches, reproduced = [], []
    entries = dict(archive["runs"])
    init = current_init(runs, archive)
    for run in runs:
        entry = entries.get(run.key)
        old = entry if archived(run, archive, init) else None
        other = entry if old is None and _same_fingerprint(run, entry) else None
        if run.done() and run.init() != init:  # from a pre-training no longer here
            continue
        if not run.done():
            if old is not None and run.method is not None:
                records.setdefault(run.name, {})[run.seed] = old["record"]
                per_class.setdefault(run.name, {})[run.seed] = _archived_per_class(old)
            continue
        record = {k: v for k, v in run.record().items() if k != "cmd"}  # cmd: local paths
        if run.method is None:  # the pre-training: its record only
            entries[run.key] = {"fingerprint": run.fingerprint, "record": record, "per_class": None}
            continue
        inference = os.path.join(run.out_dir, "inference", val_dataset)
        csv_path = os.path.join(inference, CSV_FILE)
        if not os.path.isfile(csv_path):  # reported on the page, not fatal
            mismatches.append((run.key, "per-class csv missing", float("nan"), float("nan")))
            continue
        pc = read_per_class(csv_path)
        per_class.setdefault(run.name, {})[run.seed] = pc
        records.setdefault(run.name, {})[run.seed] = record
        metrics = run_metrics(pc, classes)
        metrics_path = os.path.join(inference, METRICS_FILE)
        if os.path.isfile(metrics_path):
            with open(metrics_path) as f:
                bad = check_against_metrics(metrics, json.load(f))
            mismatches += [(run.key, *m) for m in bad]
        for prev, same in ((old, True), (other, False)):  # another run of it: a reproduction
            if prev is not None and prev["record"] != record:
                before = run_metrics(_archived_per_class(prev), classes)
                reproduced += [(run.key, k, metrics[k], before[k], same) for k in REPRO_KEYS]
        entries[run.key] = {
            "fingerprint": run.fingerprint,
            "record": record,
            "per_class": {t: {str(c): v for c, v in d.items()} for t, d in pc.items()},
        }
    return per_class, records, mismatches, reproduced, entries


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def write(args, runs: Sequence[Run], datasets: dict, val_json: str) -> str:
    """Write ``<results>/longtail[_mode].md``, its json and plots; returns the md path.

    Args:
        args: the driver's options (mode, seeds, iters, pretrain_iters, device,
            repeat_threshold, output, results).
        runs: the planned runs (finished ones are reported).
        datasets: the generator options, for the page.
        val_json: the val split's json (categories and thin flags).
    """
    with open(val_json) as f:
        val = json.load(f)
    classes = class_info(val["categories"])
    train_images = {c["id"]: c.get("image_count", 0) for c in val["categories"]}
    archive_file = archive_path(args.results, args.mode)
    archive = read_archive(archive_file)
    per_class, records, mismatches, reproduced, entries = collect(
        runs, DATASET_NAMES["val"], classes, archive
    )
    table = methods_by_name()
    shown = [m for m in table.values() if m.name in per_class]
    rows = [(m.name, m.label) for m in shown]
    suffix = "" if args.mode == "cpu" else f"_{args.mode}"
    os.makedirs(args.results, exist_ok=True)
    groups_png, pc_png = f"longtail_groups{suffix}.png", f"longtail_per_class{suffix}.png"
    plots.plot_groups(
        os.path.join(args.results, groups_png), rows, per_class, classes, "mean ± std over seeds"
    )
    pc_rows = [r for r in rows if r[0] in (BASELINE, "softmax_rfs")]
    plots.plot_per_class(
        os.path.join(args.results, pc_png), pc_rows, per_class, classes, train_images
    )

    def deltas(group_filter, keys):
        rows_ = [
            (m.name, m.label, m.reference, table[m.reference].label)
            for m in shown
            if m.reference and group_filter(m)
        ]
        return delta_table(rows_, per_class, classes, keys)

    base_runs = per_class.get(BASELINE, {})
    base_ap = _mean([run_metrics(pc, classes)["bbox/AP"] for pc in base_runs.values()])
    seen = {i.get("start_ts") for i in archive["invocations"]}
    invocations = archive["invocations"] + [
        i for i in read_invocations(args.output) if i.get("start_ts") not in seen
    ]
    wall = [r["wall_s"] for rs in records.values() for r in rs.values()]
    spi = [
        r.get("s_per_iter")
        for n, rs in records.items()
        for r in rs.values()
        if table[n].kind == "train"
    ]
    pre = next((r for r in runs if r.method is None), None)
    pre_entry = entries.get(pre.key) if pre is not None else None
    pre_rec = (
        pre_entry["record"]
        if pre_entry is not None and pre_entry["fingerprint"] == pre.fingerprint
        else None
    )
    shown_seeds = sorted({seed for v in per_class.values() for seed in v})
    init = current_init(runs, archive)
    updated = {"runs": entries}
    stale = sorted(r.key for r in runs if r.key in entries and not archived(r, updated, init))
    lines = [
        f"# Long-tail benchmark on the synthetic LVIS-format dataset ({args.mode} mode)",
        "",
        "Produced by (later invocations reuse the finished runs of earlier ones):",
        "",
        *(
            f"- `{i['command']}`: started {i['started']}, {i['wall_s'] / 60:.1f} min, {i['jobs']} "
            f"run(s) at a time x {i['threads']} torch thread(s), {i['cpus']} CPUs, load average "
            f"{i['loadavg_start'][0]:.1f} at the start, {i['loadavg_end'][0]:.1f} at the end"
            for i in invocations
        ),
        "",
        f"Per-run wall time (training + evaluation): mean {_mean(wall):.0f} s over {len(wall)} "
        f"runs; training {_mean(spi):.3f} s/iter (median per run, mean over rows from "
        f"the initialisation)"
        + (f"; pre-training {pre_rec['wall_s'] / 60:.1f} min" if pre_rec else "")
        + f". Report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "- Data: `lvis_longtail.data.synthetic.generate` with "
        + "; ".join(f"`{name}`: `{opts}`" for name, opts in datasets.items())
        + f" — train 800 images (long tail, head/tail 500), val {len(val['images'])} images, "
        f"{len(classes)} classes ({sum(c['frequency'] == 'r' for c in classes.values())} rare, "
        f"{sum(c['frequency'] == 'c' for c in classes.values())} common, "
        f"{sum(c['frequency'] == 'f' for c in classes.values())} frequent; "
        f"{sum(c['thin'] for c in classes.values())} thin/hollow, walls 1.5x the default).",
        f"- Initialisation: backbone + FPN and the mask head's convolutions and deconvolution of "
        f"SoftmaxCE trained {args.pretrain_iters} iterations on the class-balanced pre-training "
        "split (1600 images, another seed and class assignment), cached; the RPN, the box head "
        "and the class-specific mask predictor start fresh in every row"
        + (f"; every row shown descends from its realisation `{init}`." if init else ".")
        if args.pretrain_iters
        else "- Initialisation: none (every row from scratch).",
        f"- Schedule: {args.iters} iterations at batch 4 (warmup 10 %, LR steps at 70 % and 90 "
        f"%), fine-tunes a third of that"
        + "".join(
            f"; {', '.join(m.name for m in shown if m.schedule == x)}: {x:g}× that"
            for x in sorted({m.schedule for m in shown} - {1.0})
        )
        + f"; `DATALOADER.REPEAT_THRESHOLD {args.repeat_threshold}` "
        f"for RFS rows; `MODEL.DEVICE {args.device}`; seeds {', '.join(map(str, shown_seeds))}.",
        f"- Baseline level: SoftmaxCE (no RFS) bbox AP {base_ap:.1f} on val (target ≥ "
        f"{TARGET_BBOX_AP:.0f}: {'met' if base_ap >= TARGET_BBOX_AP else 'NOT met'}).",
        "",
        "## Summary (mean ± std over seeds; AP in %)",
        "",
        summary_table(rows, per_class, classes, SUMMARY_KEYS),
        "",
        "## Classification rows: paired differences to their reference",
        "",
        deltas(lambda m: m.group != "mask", CLS_KEYS),
        "",
        "## Mask rows: paired differences to their reference",
        "",
        deltas(lambda m: m.group == "mask", MASK_KEYS),
        "",
        ROW_NOTES,
        "",
        "What each row shows, and cannot show:",
        "",
        *(f"- *{m.label}*: {NOTES[m.name]}" for m in shown if m.name in NOTES),
        "",
        f"![APr/APc/APf per row]({groups_png})",
        "",
        f"![per-class AP vs training images]({pc_png})",
        "",
    ]
    here = sum(
        r.method is not None
        and r.done()
        and r.init() == init
        and r.seed in per_class.get(r.name, {})
        for r in runs
    )
    shown_n = sum(len(v) for v in per_class.values())
    lines += [
        "## Runs",
        "",
        f"{shown_n} runs shown: {here} finished in this checkout's runs folder, "
        f"{shown_n - here} from the archive `{os.path.basename(archive_file)}` (same "
        "fingerprint: same command line, config content, schedule, data and initialisation).",
    ]
    for same, head in (
        (True, "Reproduction: {n} archived runs were run again here"),
        (False, "Reproduction from another pre-training realisation (the same commands, "
         "other weights, e.g. another CPU's floating-point kernels): {n} archived runs of it "
         "were replaced here, not paired"),
    ):  # fmt: skip
        rep = [r[:4] for r in reproduced if r[4] == same]
        if not rep:
            continue
        worst = {k: max(abs(a - b) for _, key, a, b in rep if key == k) for k in REPRO_KEYS}
        differing = "; ".join(
            f"{key} {k} {a:.1f} vs {b:.1f}"
            for key, k, a, b in rep
            if abs(a - b) > 0.05 and k == REPRO_KEYS[0]
        )
        lines += [
            "",
            head.format(n=len(rep) // len(REPRO_KEYS))
            + "; largest |difference| "
            + ", ".join(f"{k} {v:.2f}" for k, v in worst.items())
            + " AP points"
            + (f" ({differing})." if differing else "."),
        ]
    if stale:
        lines += ["", "Archived runs not shown (another fingerprint than the plan's, or from "
                  f"another pre-training realisation): {', '.join(stale)}."]  # fmt: skip
    lines.append("")
    if mismatches:
        lines += [
            "**Warning**: a per-class csv is missing, or its group AP differs from "
            "lvis_metrics.json:",
            "",
        ]
        lines += [f"- {k} {key}: csv {a:.2f}, json {b:.2f}" for k, key, a, b in mismatches] + [""]
    notes = os.path.join(args.results, f"longtail{suffix}_notes.md")
    if os.path.isfile(notes):
        with open(notes) as f:
            lines += ["## Interpretation", "", f.read()]
    path = os.path.join(args.results, f"longtail{suffix}.md")
    with atomic_write(path) as f:
        f.write("\n".join(lines))
    summary = {
        name: {
            str(seed): {
                k: (None if math.isnan(v) else v) for k, v in run_metrics(pc, classes).items()
            }
            for seed, pc in seeds.items()
        }
        for name, seeds in per_class.items()
    }
    write_json_atomic({"per_run": summary, "invocations": invocations}, path[:-3] + ".json")
    write_json_atomic(
        {"version": ARCHIVE_VERSION, "runs": entries, "invocations": invocations}, archive_file
    )
    return path
