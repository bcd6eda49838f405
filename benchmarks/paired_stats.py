"""Paired statistics over seeds of per-class AP, and their markdown tables (``longtail.py``,
``self_training.py``). A run's result is its per-class AP ``{task: {category_id: AP in %}}``
(the evaluator's ``lvis_per_class.csv``); a group AP (``APr``, ``thin``, ...) is the mean over the
group's classes with a value, as lvis-api's APr/APc/APf are. Two rows are compared by their
difference per seed: 95 % t and seed x class bootstrap intervals, and the seeds a ±1-point t
interval would need at the observed spread."""

import functools
import math
import warnings
from typing import Dict, Mapping, NamedTuple, Sequence

import mpmath
import numpy as np

from lvis_longtail.utils.per_class_csv import read_per_class_csv

TASKS = ("bbox", "segm")
SUBSETS = ("AP", "APr", "APc", "APf", "thin", "filled")
PerClass = Dict[str, Dict[int, float]]  # {task: {category_id: AP in percent}} of one run


@functools.cache
def t975(df: int) -> float:
    """The two-sided 95 % Student-t quantile: the t whose two tails, the regularised
    incomplete beta ``I_{df / (df + t^2)}(df / 2, 1 / 2)``, hold 5 %."""
    tails = lambda t: mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True)  # noqa: E731
    return float(mpmath.findroot(lambda t: tails(t) - 0.05, (1.9, 13), solver="anderson"))


class PairedCI(NamedTuple):
    """Mean of paired differences, their sample std (ddof 1), the number of pairs and the 95 %
    t interval (std, low and high are nan below 2 pairs)."""

    mean: float
    std: float
    n: int
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)


def paired_t_ci(diffs: Sequence[float]) -> PairedCI:
    """95 % paired-t interval of the mean of ``diffs`` (NaNs dropped)."""
    d = np.asarray([x for x in diffs if not math.isnan(x)], dtype=np.float64)
    n, nan = int(d.size), float("nan")
    if n < 2:
        return PairedCI(float(d.mean()) if n else nan, nan, n, nan, nan)
    mean, std = float(d.mean()), float(d.std(ddof=1))
    half = t975(n - 1) * std / math.sqrt(n)
    return PairedCI(mean, std, n, mean - half, mean + half)


def seeds_needed(std: float, half_width: float, max_seeds: int = 100) -> int:
    """Smallest n >= 2 whose 95 % t interval ``t975(n-1) * std / sqrt(n)`` is within
    ``half_width``; ``max_seeds + 1`` when ``max_seeds`` are not enough (or std is nan)."""
    fits = (n for n in range(2, max_seeds + 1) if t975(n - 1) * std / math.sqrt(n) <= half_width)
    return next(fits, max_seeds + 1)


def bootstrap_group_diff(method_ap, base_ap, num_samples: int = 2000, seed: int = 0):
    """95 % percentile interval of a group-AP difference of per-class AP arrays (S seeds, C
    classes; NaN cells left out): each sample draws S seeds and C classes with replacement, the
    same for both rows, and averages ``method_ap - base_ap`` over the drawn cells (the
    class-sampling noise of a small group added to the seed noise). None below 2 seeds or 2
    classes; deterministic (``seed``)."""
    diff = np.asarray(method_ap, dtype=np.float64) - np.asarray(base_ap, dtype=np.float64)
    s, c = diff.shape
    if s < 2 or c < 2 or np.isnan(diff).all():
        return None
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, s, size=(num_samples, s, 1))
    classes = rng.integers(0, c, size=(num_samples, 1, c))
    with warnings.catch_warnings():  # a sample of only NaN cells gives NaN, left out below
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(diff[seeds, classes].reshape(num_samples, -1), axis=1)
    low, high = np.nanquantile(means, [0.025, 0.975])
    return float(low), float(high)


def read_per_class(path: str) -> PerClass:
    """Per-class AP of one run from its ``lvis_per_class.csv`` (blank cells: no ground truth)."""
    rows = read_per_class_csv(path)
    tasks = [t for t in TASKS if rows and f"{t}_AP" in rows[0]]
    return {t: {r["category_id"]: float(r[f"{t}_AP"]) for r in rows if r[f"{t}_AP"] is not None}
            for t in tasks}  # fmt: skip


def class_info(categories: Sequence[Mapping]) -> Dict[int, dict]:
    """``{category_id: {"name", "frequency", "thin"}}`` from a split json's categories."""
    return {int(c["id"]): {"name": c.get("name", str(c["id"])), "frequency": c["frequency"],
                           "thin": bool(c.get("thin", False))} for c in categories}  # fmt: skip


def subset_classes(classes: Mapping[int, dict], subset: str) -> list:
    """The category ids that a subset of :data:`SUBSETS` averages."""
    if subset in ("APr", "APc", "APf"):
        return sorted(c for c, v in classes.items() if v["frequency"] == subset[-1])
    if subset in ("thin", "filled"):
        return sorted(c for c, v in classes.items() if v["thin"] == (subset == "thin"))
    if subset != "AP":
        raise ValueError(f"unknown subset {subset!r}; valid: {SUBSETS}")
    return sorted(classes)


def run_metrics(per_class: PerClass, classes: Mapping[int, dict]) -> Dict[str, float]:
    """``{"bbox/AP": ..., "segm/APr": ..., "segm/thin": ...}``: the mean per-class AP of each
    subset over its classes with a value (nan when none has one)."""
    out = {}
    for task, pc in per_class.items():
        for subset in SUBSETS:
            vals = [pc[c] for c in subset_classes(classes, subset) if c in pc]
            out[f"{task}/{subset}"] = float(np.mean(vals)) if vals else float("nan")
    return out


def paired(method, reference, classes, key: str, bootstrap: int = 2000) -> dict:
    """Paired difference ``method - reference`` of ``key`` (``"<task>/<subset>"``) over the
    common seeds of two rows (``{seed: PerClass}`` each): ``{"ci": PairedCI, "boot": (low,
    high) or None, "seeds": [...]}``."""
    task, subset = key.split("/")
    seeds = sorted(set(method) & set(reference))
    metric = lambda runs, s: run_metrics(runs[s], classes)[key]  # noqa: E731
    diffs = [metric(method, s) - metric(reference, s) for s in seeds]
    cats = subset_classes(classes, subset)

    def matrix(runs):  # (seeds, classes), NaN where a run has no value
        return [[runs[s].get(task, {}).get(c, np.nan) for c in cats] for s in seeds]

    boot = bootstrap_group_diff(matrix(method), matrix(reference), bootstrap) if bootstrap else None
    return {"ci": paired_t_ci(diffs), "boot": boot, "seeds": seeds}


def fmt_mean_std(values: Sequence[float]) -> str:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return "–"
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if v.size > 1 else f"{v.mean():.1f}"


def fmt_ci(result: dict) -> str:
    """``+1.2 [-0.3, +2.7] {-0.5, +3.0}``: mean, t interval (``*`` when it excludes 0) and
    bootstrap interval."""
    ci = result["ci"]
    if ci.n < 2:
        return "–" if math.isnan(ci.mean) else f"{ci.mean:+.1f}"
    text = f"{ci.mean:+.1f} [{ci.low:+.1f}, {ci.high:+.1f}]" + ("*" if ci.excludes_zero else "")
    if result["boot"] is not None:
        text += " {{{:+.1f}, {:+.1f}}}".format(*result["boot"])
    return text


def summary_table(rows: Sequence[tuple], runs, classes, keys: Sequence[str]) -> str:
    """One line per ``(name, label)`` row with runs: mean ± std over seeds of each key."""
    lines = ["| Method | " + " | ".join(keys) + " | seeds |", "|---" * (len(keys) + 2) + "|"]
    for name, label in rows:
        if seeds := runs.get(name, {}):
            per_seed = [run_metrics(seeds[s], classes) for s in sorted(seeds)]
            cells = [fmt_mean_std([m.get(k, float("nan")) for m in per_seed]) for k in keys]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(seeds)} |")
    return "\n".join(lines)


def delta_table(rows: Sequence[tuple], runs, classes, keys: Sequence[str], target=1.0) -> str:
    """Paired differences of each ``(name, label, reference name, reference label)`` row to its
    reference, and the seeds a ±``target`` t interval on the first key would need."""
    head = "| Method | vs | " + " | ".join("Δ " + k for k in keys)
    lines = [head + f" | seeds for ±{target:g} ({keys[0]}) |", "|---" * (len(keys) + 3) + "|"]
    for name, label, ref, ref_label in rows:
        if not runs.get(name) or not runs.get(ref):
            continue
        results = [paired(runs[name], runs[ref], classes, k) for k in keys]
        ci = results[0]["ci"]
        need = seeds_needed(ci.std, target) if ci.n > 1 else None
        need_txt = "–" if need is None else ("> 100" if need > 100 else str(need))
        cells = " | ".join(fmt_ci(r) for r in results)
        lines.append(f"| {label} | {ref_label} | {cells} | {need_txt} |")
    return "\n".join(lines)
