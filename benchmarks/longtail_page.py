"""The long-tail benchmark's records and results page.

Each finished run has one record, ``<results>/longtail[_mode]/<row>_seed<k>.json``: its config
and ``train_net.py`` overrides (no paths), seed, the digest of the pre-trained checkpoint it
started from (``init``), wall time, metrics and per-class AP; ``classes.json`` next to them holds
the val split's categories. The page (tables, row notes, plots) is written from these alone.
"""

import math
import os
from typing import Dict

import numpy as np
from longtail_rows import BASELINE, NOTES, methods_by_name
from paired_stats import GROUPS, TASKS, class_info, delta_table, run_metrics, summary_table

from lvis_longtail.utils.io import atomic_write, read_json, write_json_atomic

FIELDS = "row seed config overrides init wall_s s_per_iter metrics per_class".split()
SUMMARY_KEYS = (
    "bbox/AP", "bbox/APr", "bbox/APc", "bbox/APf",
    "segm/AP", "segm/APr", "segm/APc", "segm/APf", "segm/thin", "bbox/thin",
)  # fmt: skip
CLS_KEYS = ("bbox/APr", "bbox/AP", "bbox/APc", "bbox/APf", "segm/APr")
MASK_KEYS = ("segm/AP", "segm/APr", "segm/thin", "segm/APf", "bbox/AP")
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
    null = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    out = dict(record, s_per_iter=null(record["s_per_iter"]))
    out["metrics"] = {k: null(v) for k, v in record["metrics"].items()}
    out["per_class"] = {
        t: {str(c): v for c, v in pc.items()} for t, pc in record["per_class"].items()
    }
    path = os.path.join(folder, f"{record['row']}_seed{record['seed']}.json")
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(out, path)
    return path


def read_records(folder: str) -> Dict[str, dict]:
    """``{"<row>_seed<k>": record}`` of a records folder (empty when absent), per-class AP with
    integer category ids.

    Raises:
        ValueError: naming the file and field of a malformed record.
    """
    out = {}
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for name in (n for n in names if n.endswith(".json") and n != "classes.json"):
        path = os.path.join(folder, name)
        rec = read_json(path, what="benchmark record")
        missing = [k for k in FIELDS if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise ValueError(f"{path}: field(s) {missing} missing")
        if name != f"{rec['row']}_seed{rec['seed']}.json":
            raise ValueError(f"{path}: holds row {rec['row']!r} seed {rec['seed']!r}")
        for key, convert in (("wall_s", float), ("per_class", _per_class)):
            try:
                rec[key] = convert(rec[key])
            except (AttributeError, TypeError, ValueError):
                raise ValueError(f"{path}: field {key!r} malformed: {rec[key]!r:.80}") from None
        out[name[:-5]] = rec
    return out


def _per_class(pc: dict) -> dict:  # {task: {category id: AP}}, ids as int
    return {t: {int(c): float(v) for c, v in d.items()} for t, d in pc.items()}


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def _axes(size):
    """A two-panel figure (bbox, segm) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, 2, i + 1) for i in range(len(TASKS))]


def _save(fig, path: str) -> None:
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")


def plot_groups(path: str, rows, runs, classes) -> None:
    """APr / APc / APf bars per row (bbox and segm panels), error bars = std over seeds."""
    (fig, axes), x = _axes((14, 4.8)), np.arange(len(rows))
    for ax, task in zip(axes, TASKS):
        for j, (g, color) in enumerate(zip(GROUPS, ("#d62728", "#ff7f0e", "#1f77b4"))):
            key = f"{task}/AP{g}"
            vals = [[run_metrics(pc, classes)[key] for pc in runs[n].values()] for n, _ in rows]
            std = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
            mean = [np.mean(v) for v in vals]
            ax.bar(x + (j - 1) * 0.26, mean, 0.26, yerr=std, capsize=2, label=f"AP{g}", color=color)
        ax.set_xticks(x)
        ax.set_xticklabels([label for _, label in rows], rotation=35, ha="right", fontsize=7)
        ax.set(ylabel=f"{task} AP (%)", title=f"{task}: mean ± std over seeds")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_per_class(path: str, rows, runs, classes, train_images) -> None:
    """Per-class AP (mean over seeds) against the class's training images (log x); one colour
    per row, hollow markers for the thin/hollow classes."""
    fig, axes = _axes((13, 4.8))
    for ax, task in zip(axes, TASKS):
        for (name, label), color in zip(rows, ("#1f77b4", "#d62728", "#2ca02c")):
            seeds = runs[name].values()
            full = [c for c in classes if all(c in pc.get(task, {}) for pc in seeds)]
            for thin in (False, True):
                pts = [(train_images.get(c, 0), np.mean([pc[task][c] for pc in seeds]))
                       for c in full if classes[c]["thin"] == thin]  # fmt: skip
                if pts:
                    xs, ys = np.array(pts, dtype=float).T
                    face, kind = ("none", "thin") if thin else (color, "filled")
                    ax.scatter(xs, ys, s=36, facecolors=face, edgecolors=color,
                               label=f"{label} ({kind})")  # fmt: skip
        for edge in (10, 100):  # the LVIS frequency-group bounds (training images)
            ax.axvline(edge, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set(xlabel="training images of the class (log)", ylabel=f"{task} AP (%)",
               title=f"{task}: per-class AP, mean over seeds")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def _setup(args, runs, shown, datasets, categories) -> list:
    """The page's setup lines: data, initialisation, schedule, seeds."""
    count = lambda key, value: sum(c.get(key) == value for c in categories)  # noqa: E731
    inits = sorted({str(r["init"]) for r in runs})
    one = len(inits) == 1 and inits != ["None"]
    init = f"; every row shown starts from the checkpoint `{inits[0]}`" if one else ""
    longer = "".join(f"; {', '.join(m.name for m in shown if m.schedule == x)}: {x:g}× that"
                     for x in sorted({m.schedule for m in shown} - {1.0}))  # fmt: skip
    return [
        "- Data: `lvis_longtail.data.synthetic.generate` with "
        + "; ".join(f"`{name}`: `{opts}`" for name, opts in datasets.items())
        + f" — train 800 images (long tail, head/tail 500), val {datasets['lt_bench']['num_val']}"
        f" images, {len(categories)} classes ({count('frequency', 'r')} rare, "
        f"{count('frequency', 'c')} common, {count('frequency', 'f')} frequent; "
        f"{count('thin', True)} thin/hollow, walls 1.5x the default).",
        "- Initialisation: backbone + FPN and the mask head's convolutions and deconvolution of "
        f"SoftmaxCE trained {args.pretrain_iters} iterations on the class-balanced pre-training "
        "split (1600 images, another seed and class assignment), cached; the RPN, the box head "
        f"and the class-specific mask predictor start fresh in every row{init}."
        if args.pretrain_iters
        else "- Initialisation: none (every row from scratch).",
        f"- Schedule: {args.iters} iterations at batch 4 (warmup 10 %, LR steps at 70 % and 90 "
        f"%), fine-tunes a third of that{longer}; `DATALOADER.REPEAT_THRESHOLD "
        f"{args.repeat_threshold}` for RFS rows; `MODEL.DEVICE {args.device}`; seeds "
        f"{', '.join(str(s) for s in sorted({r['seed'] for r in runs}))}.",
    ]


def write_page(args, records: Dict[str, dict], stale, datasets: dict, categories) -> str:
    """Write ``<results>/longtail[_mode].md`` and its two plots from ``records`` (those of the
    plan; the pre-training's is ``pretrain_seed0``); returns the md path.

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
        pairs = [(m.name, m.label, m.reference, table[m.reference].label) for m in shown
                 if m.reference and (m.group == "mask") == mask]  # fmt: skip
        return delta_table(pairs, per_class, classes, keys)

    base_ap = _mean(
        [run_metrics(pc, classes)["bbox/AP"] for pc in per_class.get(BASELINE, {}).values()]
    )
    spi = _mean([r["s_per_iter"] for r in runs if table[r["row"]].kind == "train"])
    pre = records.get("pretrain_seed0")
    inits = sorted({str(r["init"]) for r in runs})
    flag = {"quick": " --quick", "cuda": " --device cuda"}.get(args.mode, "")
    lines = [
        f"# Long-tail benchmark on the synthetic LVIS-format dataset ({args.mode} mode)", "",
        f"`python benchmarks/longtail.py{flag}` trains every row and seed that has no record "
        f"yet, writes one record per run to `longtail{sfx}/` (config, overrides, seed, the "
        "digest of the pre-trained checkpoint it started from, metrics, per-class AP, wall "
        "time) and this page from the records (`--report-only`: the page alone).", "",
        "Per-run wall time (training + evaluation): mean "
        f"{_mean([r['wall_s'] for r in runs]):.0f} s over {len(runs)} runs; training {spi:.3f} "
        "s/iter (median per run, mean over rows from the initialisation)"
        + (f"; pre-training {pre['wall_s'] / 60:.1f} min." if pre else "."),
        "", *_setup(args, runs, shown, datasets, categories),
        f"- Baseline level: SoftmaxCE (no RFS) bbox AP {base_ap:.1f} on val (target ≥ 30: "
        f"{'met' if base_ap >= 30 else 'NOT met'}).",
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
        f"{len(runs)} runs shown, from their records in `longtail{sfx}/`."
        + (f" **Warning**: they start from {len(inits)} pre-trained checkpoints ("
           f"{', '.join(inits)}): their differences include the pre-training's own."
           if len(inits) > 1 else "")
        + (f" Records not shown (other overrides than this mode's): {', '.join(stale)}."
           if stale else ""),
    ]  # fmt: skip
    notes = os.path.join(args.results, f"longtail{sfx}_notes.md")
    if os.path.isfile(notes):
        with open(notes) as f:
            lines += ["", "## Interpretation", "", f.read()]
    path = os.path.join(args.results, f"longtail{sfx}.md")
    with atomic_write(path) as f:
        f.write("\n".join(lines))
    return path
