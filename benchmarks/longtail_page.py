"""The long-tail benchmark's records and results page.

Each finished run has one record, ``<results>/longtail[_mode]/<row>_seed<k>.json``: its config
and ``train_net.py`` overrides (no paths), seed, the digest of the pre-trained checkpoint it
started from (``init``), wall time, metrics and per-class AP. ``classes.json`` next to them holds
the val split's categories. The page (tables, row notes, plots) is written from these alone.
"""

import json
import math
import os
from typing import Dict, Mapping

import numpy as np
from longtail_rows import BASELINE, NOTES, methods_by_name
from paired_stats import GROUPS, TASKS, class_info, delta_table, run_metrics, summary_table

from lvis_longtail.utils.io import atomic_write, read_json

TARGET_BBOX_AP = 30.0
SUMMARY_KEYS = (
    "bbox/AP", "bbox/APr", "bbox/APc", "bbox/APf",
    "segm/AP", "segm/APr", "segm/APc", "segm/APf", "segm/thin", "bbox/thin",
)  # fmt: skip
CLS_KEYS = ("bbox/APr", "bbox/AP", "bbox/APc", "bbox/APf", "segm/APr")
MASK_KEYS = ("segm/AP", "segm/APr", "segm/thin", "segm/APf", "bbox/AP")
NUMBER = (int, float)
FIELDS = {
    "row": str,
    "seed": int,
    "config": str,
    "overrides": list,
    "init": (str, type(None)),
    "wall_s": NUMBER,
    "s_per_iter": NUMBER + (type(None),),
    "metrics": dict,
    "per_class": dict,
}
ROW_NOTES = """\
How to read the rows. Every row is one config of `benchmarks/longtail_rows.py`, trained
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


def write_record(folder: str, record: dict) -> str:
    """Write one run's record atomically (NaN numbers as null); returns its path."""
    out = dict(
        record,
        per_class={t: {str(c): v for c, v in pc.items()} for t, pc in record["per_class"].items()},
    )
    out["metrics"] = {k: None if v != v else v for k, v in record["metrics"].items()}
    if out["s_per_iter"] != out["s_per_iter"]:
        out["s_per_iter"] = None
    path = os.path.join(folder, f"{record['row']}_seed{record['seed']}.json")
    os.makedirs(folder, exist_ok=True)
    with atomic_write(path) as f:
        json.dump(out, f, indent=1, allow_nan=False)
    return path


def read_records(folder: str) -> Dict[str, dict]:
    """``{"<row>_seed<k>": record}`` of a records folder (empty when absent); per-class AP with
    integer category ids.

    Raises:
        ValueError: naming the file and field of a malformed record.
    """
    out = {}
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for name in (n for n in names if n.endswith(".json") and n != "classes.json"):
        path = os.path.join(folder, name)
        rec = read_json(path, what="benchmark record")
        for field, kind in FIELDS.items():
            if not isinstance(rec, dict) or not isinstance(rec.get(field), kind):
                raise ValueError(f"{path}: field {field!r} missing or not {kind}")
        if name != f"{rec['row']}_seed{rec['seed']}.json":
            raise ValueError(f"{path}: holds row {rec['row']!r} seed {rec['seed']}")
        try:
            rec["per_class"] = {
                t: {int(c): float(v) for c, v in pc.items()} for t, pc in rec["per_class"].items()
            }
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"{path}: field 'per_class' must map task -> id -> AP") from None
        out[name[:-5]] = rec
    return out


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> None:
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")


def plot_groups(path: str, rows, runs, classes) -> None:
    """APr / APc / APf bars per row (bbox and segm panels), error bars = std over seeds."""
    fig, x = _figure((14, 4.8)), np.arange(len(rows))
    for i, task in enumerate(TASKS):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, g in enumerate(GROUPS):
            vals = [
                [run_metrics(pc, classes)[f"{task}/AP{g}"] for pc in runs[n].values()]
                for n, _ in rows
            ]
            std = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
            color = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}[g]
            ax.bar(
                x + (j - 1) * 0.26,
                [np.mean(v) for v in vals],
                0.26,
                yerr=std,
                capsize=2,
                label=f"AP{g}",
                color=color,
            )
        ax.set_xticks(x)
        ax.set_xticklabels([label for _, label in rows], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(f"{task} AP (%)")
        ax.set_title(f"{task}: mean ± std over seeds")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_per_class(path: str, rows, runs, classes, train_images: Mapping[int, int]) -> None:
    """Per-class AP (mean over seeds) against the class's training images (log x); one colour
    per row, hollow markers for the thin/hollow classes."""
    fig = _figure((13, 4.8))
    for i, task in enumerate(TASKS):
        ax = fig.add_subplot(1, 2, i + 1)
        for (name, label), color in zip(rows, ("#1f77b4", "#d62728", "#2ca02c")):
            seeds = runs[name]
            for thin in (False, True):
                pts = [
                    (train_images.get(c, 0), np.mean([pc[task][c] for pc in seeds.values()]))
                    for c, v in classes.items()
                    if v["thin"] == thin and all(c in pc.get(task, {}) for pc in seeds.values())
                ]
                if pts:
                    xs, ys = np.array(pts, dtype=float).T
                    ax.scatter(
                        xs,
                        ys,
                        s=36,
                        facecolors="none" if thin else color,
                        edgecolors=color,
                        label=f"{label} ({'thin' if thin else 'filled'})",
                    )
        for edge in (10, 100):  # the LVIS frequency-group bounds (training images)
            ax.axvline(edge, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("training images of the class (log)")
        ax.set_ylabel(f"{task} AP (%)")
        ax.set_title(f"{task}: per-class AP, mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def _setup_lines(args, runs, shown, datasets, categories) -> list:
    """The page's setup paragraph: data, initialisation, schedule, seeds."""
    count = lambda key, value: sum(c.get(key, False) == value for c in categories)  # noqa: E731
    inits = sorted({str(r["init"]) for r in runs})
    one_init = len(inits) == 1 and inits[0] != "None"
    longer = sorted({m.schedule for m in shown} - {1.0})
    seeds = sorted({r["seed"] for r in runs})
    return [
        "- Data: `lvis_longtail.data.synthetic.generate` with "
        + "; ".join(f"`{name}`: `{opts}`" for name, opts in datasets.items())
        + f" — train 800 images (long tail, head/tail 500), val "
        f"{datasets['lt_bench']['num_val']} images, {len(categories)} classes "
        f"({count('frequency', 'r')} rare, {count('frequency', 'c')} common, "
        f"{count('frequency', 'f')} frequent; {count('thin', True)} thin/hollow, walls 1.5x the "
        "default).",
        f"- Initialisation: backbone + FPN and the mask head's convolutions and deconvolution of "
        f"SoftmaxCE trained {args.pretrain_iters} iterations on the class-balanced pre-training "
        "split (1600 images, another seed and class assignment), cached; the RPN, the box head "
        "and the class-specific mask predictor start fresh in every row"
        + (f"; every row shown starts from the checkpoint `{inits[0]}`." if one_init else ".")
        if args.pretrain_iters
        else "- Initialisation: none (every row from scratch).",
        f"- Schedule: {args.iters} iterations at batch 4 (warmup 10 %, LR steps at 70 % and 90 "
        "%), fine-tunes a third of that"
        + "".join(
            f"; {', '.join(m.name for m in shown if m.schedule == x)}: {x:g}× that" for x in longer
        )
        + f"; `DATALOADER.REPEAT_THRESHOLD {args.repeat_threshold}` for RFS rows; "
        f"`MODEL.DEVICE {args.device}`; seeds {', '.join(map(str, seeds))}.",
    ]


def write_page(args, records: Dict[str, dict], stale, datasets: dict, categories) -> str:
    """Write ``<results>/longtail[_mode].md`` and its two plots from ``records`` (those that
    match the plan; the pre-training's is ``pretrain_seed0``); returns the md path.

    Args:
        args: the driver's options (mode, suffix, iters, pretrain_iters, device,
            repeat_threshold, results).
        stale: names of the records not shown (other overrides than the plan's).
        datasets: the generator options, for the page.
        categories: the val split's categories (``classes.json``).
    """
    classes, table, sfx = class_info(categories), methods_by_name(), args.suffix
    runs = [r for r in records.values() if r["row"] in table]
    per_class: Dict[str, Dict[int, dict]] = {}
    for rec in runs:
        per_class.setdefault(rec["row"], {})[rec["seed"]] = rec["per_class"]
    shown = [m for m in table.values() if m.name in per_class]
    rows = [(m.name, m.label) for m in shown]
    groups_png, pc_png = f"longtail_groups{sfx}.png", f"longtail_per_class{sfx}.png"
    os.makedirs(args.results, exist_ok=True)
    plot_groups(os.path.join(args.results, groups_png), rows, per_class, classes)
    images = {c["id"]: c.get("image_count", 0) for c in categories}
    pc_rows = [r for r in rows if r[0] in (BASELINE, "softmax_rfs")]
    plot_per_class(os.path.join(args.results, pc_png), pc_rows, per_class, classes, images)

    def deltas(mask, keys):
        refs = [
            (m.name, m.label, m.reference, table[m.reference].label)
            for m in shown
            if m.reference and (m.group == "mask") == mask
        ]
        return delta_table(refs, per_class, classes, keys)

    base = per_class.get(BASELINE, {}).values()
    base_ap = _mean([run_metrics(pc, classes)["bbox/AP"] for pc in base])
    spi = _mean([r["s_per_iter"] for r in runs if table[r["row"]].kind == "train"])
    pre = records.get("pretrain_seed0")
    flag = {"quick": " --quick", "cuda": " --device cuda"}.get(args.mode, "")
    lines = [
        f"# Long-tail benchmark on the synthetic LVIS-format dataset ({args.mode} mode)",
        "",
        f"`python benchmarks/longtail.py{flag}` trains every row and seed that has no record "
        f"yet, writes one record per run to `longtail{sfx}/` (config, overrides, seed, the "
        "digest of the pre-trained checkpoint it started from, metrics, per-class AP, wall "
        "time) and this page from the records (`--report-only`: the page alone).",
        "",
        "Per-run wall time (training + evaluation): mean "
        f"{_mean([r['wall_s'] for r in runs]):.0f} s over {len(runs)} runs; training {spi:.3f} "
        "s/iter (median per run, mean over rows from the initialisation)"
        + (f"; pre-training {pre['wall_s'] / 60:.1f} min." if pre else "."),
        "",
        *_setup_lines(args, runs, shown, datasets, categories),
        f"- Baseline level: SoftmaxCE (no RFS) bbox AP {base_ap:.1f} on val (target ≥ "
        f"{TARGET_BBOX_AP:.0f}: {'met' if base_ap >= TARGET_BBOX_AP else 'NOT met'}).",
        "", "## Summary (mean ± std over seeds; AP in %)", "",
        summary_table(rows, per_class, classes, SUMMARY_KEYS),
        "", "## Classification rows: paired differences to their reference", "",
        deltas(False, CLS_KEYS),
        "", "## Mask rows: paired differences to their reference", "",
        deltas(True, MASK_KEYS),
        "", ROW_NOTES, "", "What each row shows, and cannot show:", "",
        *(f"- *{m.label}*: {NOTES[m.name]}" for m in shown if m.name in NOTES),
        "", f"![APr/APc/APf per row]({groups_png})", "",
        f"![per-class AP vs training images]({pc_png})", "", "## Runs", "",
        f"{len(runs)} runs shown, from their records in `longtail{sfx}/`.",
    ]  # fmt: skip
    inits = sorted({str(r["init"]) for r in runs})
    if len(inits) > 1:
        lines.append(
            f"**Warning**: the rows start from {len(inits)} pre-trained checkpoints "
            f"({', '.join(inits)}); their differences include the pre-training's own."
        )
    if stale:
        lines.append(f"Records not shown (other overrides than this mode's): {', '.join(stale)}.")
    notes = os.path.join(args.results, f"longtail{sfx}_notes.md")
    if os.path.isfile(notes):
        with open(notes) as f:
            lines += ["", "## Interpretation", "", f.read()]
    path = os.path.join(args.results, f"longtail{sfx}.md")
    with atomic_write(path) as f:
        f.write("\n".join(lines))
    return path
