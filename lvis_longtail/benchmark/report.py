"""The long-tail benchmark's report: per-run metrics from each run's per-class csv, paired
differences with confidence intervals, and the markdown tables.

Inputs are the evaluator's ``lvis_per_class.csv`` (``category_id``, ``frequency``, ``bbox_AP``,
``segm_AP`` in percent, blank where the class has no ground truth) and the val json's
categories (the ``thin`` flag of the synthetic classes). Group APs are means of per-class AP
over the group's classes with ground truth, which is what lvis-api's APr/APc/APf are (every
cell of a class with ground truth is valid, so the pooled mean equals the mean of per-class
means); :func:`check_against_metrics` compares them with the run's ``lvis_metrics.json``.
"""

import math
from typing import Dict, List, Mapping, Sequence

import numpy as np

from lvis_longtail.benchmark.stats import bootstrap_group_diff, paired_t_ci, seeds_needed
from lvis_longtail.utils.per_class_csv import read_per_class_csv

TASKS = ("bbox", "segm")
GROUPS = ("r", "c", "f")
SUBSETS = ("AP", "APr", "APc", "APf", "thin", "filled")
REQUIRED_COLUMNS = ("category_id", "frequency")

# ``{task: {category_id: AP in percent}}`` of one run
PerClass = Dict[str, Dict[int, float]]


def read_per_class(path: str) -> PerClass:
    """Per-class AP of one run from its ``lvis_per_class.csv``.

    Raises:
        ValueError: naming the file, line and column, for a missing column or a bad cell.
    """
    rows = read_per_class_csv(path)
    fields = list(rows[0]) if rows else []
    missing = [c for c in REQUIRED_COLUMNS if c not in fields]
    tasks = [t for t in TASKS if f"{t}_AP" in fields]
    if missing or not tasks:
        raise ValueError(
            f"{path}: not a per-class csv: missing column(s) "
            f"{missing + ([] if tasks else ['bbox_AP or segm_AP'])}"
        )
    out: PerClass = {t: {} for t in tasks}
    for line, row in enumerate(rows, start=2):
        for t in tasks:
            cell = row[f"{t}_AP"]
            if cell is None:
                continue
            if isinstance(cell, str):
                raise ValueError(f"{path}: line {line}: {t}_AP {cell!r} is not a number")
            out[t][row["category_id"]] = float(cell)
    return out


def class_info(categories: Sequence[Mapping]) -> Dict[int, dict]:
    """``{category_id: {"name", "frequency", "thin"}}`` from a split json's categories."""
    return {
        int(c["id"]): {
            "name": c.get("name", str(c["id"])),
            "frequency": c["frequency"],
            "thin": bool(c.get("thin", False)),
        }
        for c in categories
    }


def subset_classes(classes: Mapping[int, dict], subset: str) -> List[int]:
    """The category ids that a subset (``AP``, ``APr``/``APc``/``APf``, ``thin``, ``filled``)
    averages."""
    if subset == "AP":
        return sorted(classes)
    if subset in ("APr", "APc", "APf"):
        return sorted(c for c, v in classes.items() if v["frequency"] == subset[-1])
    if subset in ("thin", "filled"):
        return sorted(c for c, v in classes.items() if v["thin"] == (subset == "thin"))
    raise ValueError(f"unknown subset {subset!r}; valid: {SUBSETS}")


def run_metrics(per_class: PerClass, classes: Mapping[int, dict]) -> Dict[str, float]:
    """``{"bbox/AP": ..., "segm/APr": ..., "segm/thin": ...}``: mean per-class AP of each subset
    over its classes with a value (nan when none has one)."""
    out = {}
    for task, pc in per_class.items():
        for subset in SUBSETS:
            vals = [pc[c] for c in subset_classes(classes, subset) if c in pc]
            out[f"{task}/{subset}"] = float(np.mean(vals)) if vals else float("nan")
    return out


def check_against_metrics(metrics: Dict[str, float], lvis_metrics: Mapping, tol: float = 0.05):
    """The keys whose csv-derived value differs from ``lvis_metrics.json`` by more than ``tol``
    AP points: ``[(key, from csv, from json), ...]``."""
    bad = []
    for task in TASKS:
        for key in ("AP", "APr", "APc", "APf"):
            ref = lvis_metrics.get(task, {}).get(key)
            mine = metrics.get(f"{task}/{key}")
            if ref is None or mine is None or (math.isnan(mine) and ref < 0):
                continue
            if math.isnan(mine) or abs(mine - ref) > tol:
                bad.append((f"{task}/{key}", mine, ref))
    return bad


def per_class_matrix(runs: Mapping[int, PerClass], task: str, cats: Sequence[int], seeds):
    """(len(seeds), len(cats)) per-class AP, NaN where a run has no value."""
    return np.array(
        [[runs[s].get(task, {}).get(c, np.nan) for c in cats] for s in seeds], dtype=np.float64
    )


def paired(
    method: Mapping[int, PerClass],
    reference: Mapping[int, PerClass],
    classes: Mapping[int, dict],
    key: str,
    level: float = 0.95,
    bootstrap: int = 2000,
) -> dict:
    """Paired difference ``method - reference`` of one metric over their common seeds.

    Args:
        method, reference: ``{seed: per-class AP}`` of the two rows.
        classes: :func:`class_info`.
        key: ``"<task>/<subset>"``.
        level: interval coverage.
        bootstrap: seed x class bootstrap samples (0: none).

    Returns:
        ``{"ci": PairedCI over seeds, "boot": (low, high) or None, "seeds": [...]}``.
    """
    task, subset = key.split("/")
    seeds = sorted(set(method) & set(reference))
    diffs = [
        run_metrics(method[s], classes)[key] - run_metrics(reference[s], classes)[key]
        for s in seeds
    ]
    boot = None
    if bootstrap:
        cats = subset_classes(classes, subset)
        boot = bootstrap_group_diff(
            per_class_matrix(method, task, cats, seeds),
            per_class_matrix(reference, task, cats, seeds),
            num_samples=bootstrap,
            level=level,
        )
    return {"ci": paired_t_ci(diffs, level), "boot": boot, "seeds": seeds}


def fmt(value: float, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def fmt_mean_std(values: Sequence[float]) -> str:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return "–"
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if v.size > 1 else f"{v.mean():.1f}"


def fmt_ci(result: dict, with_boot: bool = True) -> str:
    """``+1.2 [−0.3, +2.7]`` (t interval); ``*`` when it excludes 0; the bootstrap interval in
    braces after it."""
    ci = result["ci"]
    if ci.n == 0:
        return "–"
    if ci.n == 1:
        return fmt(ci.mean, signed=True)
    text = f"{ci.mean:+.1f} [{ci.low:+.1f}, {ci.high:+.1f}]" + ("*" if ci.excludes_zero else "")
    if with_boot and result["boot"] is not None:
        text += " {{{:+.1f}, {:+.1f}}}".format(*result["boot"])
    return text


def summary_table(rows: Sequence[tuple], runs, classes, keys: Sequence[str]) -> str:
    """One line per ``(name, label)`` row: mean ± std over seeds of each key."""
    lines = ["| Method | " + " | ".join(keys) + " | seeds |", "|---" * (len(keys) + 2) + "|"]
    for name, label in rows:
        seeds = runs.get(name, {})
        if not seeds:
            continue
        per_seed = [run_metrics(seeds[s], classes) for s in sorted(seeds)]
        cells = [fmt_mean_std([m.get(k, float("nan")) for m in per_seed]) for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(seeds)} |")
    return "\n".join(lines)


def delta_table(
    rows: Sequence[tuple],
    runs,
    classes,
    keys: Sequence[str],
    level: float = 0.95,
    bootstrap: int = 2000,
    target: float = 1.0,
) -> str:
    """Paired differences of each ``(name, label, reference name, reference label)`` row to its
    reference, with t intervals (and bootstrap ones), and the seeds that a ±``target`` t
    interval on the first key would need at the observed spread."""
    head = "| Method | vs | " + " | ".join("Δ " + k for k in keys)
    lines = [head + f" | seeds for ±{target:g} ({keys[0]}) |", "|---" * (len(keys) + 3) + "|"]
    for name, label, ref, ref_label in rows:
        if not runs.get(name) or not runs.get(ref):
            continue
        results = [paired(runs[name], runs[ref], classes, k, level, bootstrap) for k in keys]
        ci = results[0]["ci"]
        need = seeds_needed(ci.std, target, level) if ci.n > 1 else None
        need_txt = "–" if need is None else ("> 100" if need > 100 else str(need))
        cells = [fmt_ci(r) for r in results]
        lines.append(f"| {label} | {ref_label} | " + " | ".join(cells) + f" | {need_txt} |")
    return "\n".join(lines)
