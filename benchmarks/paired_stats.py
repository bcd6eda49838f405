"""Paired statistics over seeds of per-class AP, and the markdown tables that show them (used by
``longtail.py`` and ``self_training.py``).

A run's result is its per-class AP ``{task: {category_id: AP in percent}}``, read from the
evaluator's ``lvis_per_class.csv``. A group AP (``APr``, ``thin``, ...) is the mean per-class AP
over the group's classes with a value, which is what lvis-api's APr/APc/APf are. Two rows are
compared by their difference per seed: a 95 % Student-t interval over seeds, a seed x class
bootstrap interval, and the seeds a ±1-point t interval would need at the observed spread.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from lvis_longtail.utils.per_class_csv import read_per_class_csv

TASKS = ("bbox", "segm")
GROUPS = ("r", "c", "f")
SUBSETS = ("AP", "APr", "APc", "APf", "thin", "filled")
PerClass = Dict[str, Dict[int, float]]  # {task: {category_id: AP in percent}} of one run

# t_{0.975}(df) of Student's t for df = 1..100 (the two-sided 95 % quantile; mpmath's
# regularised incomplete beta function solved to 1e-12, rounded to 6 decimals).
T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
    2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
    2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
    2.048407, 2.045230, 2.042272, 2.039513, 2.036933, 2.034515, 2.032245, 2.030108, 2.028094,
    2.026192, 2.024394, 2.022691, 2.021075, 2.019541, 2.018082, 2.016692, 2.015368, 2.014103,
    2.012896, 2.011741, 2.010635, 2.009575, 2.008559, 2.007584, 2.006647, 2.005746, 2.004879,
    2.004045, 2.003241, 2.002465, 2.001717, 2.000995, 2.000298, 1.999624, 1.998972, 1.998341,
    1.997730, 1.997138, 1.996564, 1.996008, 1.995469, 1.994945, 1.994437, 1.993943, 1.993464,
    1.992997, 1.992543, 1.992102, 1.991673, 1.991254, 1.990847, 1.990450, 1.990063, 1.989686,
    1.989319, 1.988960, 1.988610, 1.988268, 1.987934, 1.987608, 1.987290, 1.986979, 1.986675,
    1.986377, 1.986086, 1.985802, 1.985523, 1.985251, 1.984984, 1.984723, 1.984467, 1.984217,
    1.983972,
)  # fmt: skip


def t975(df: int) -> float:
    """The two-sided 95 % Student-t quantile for ``df`` degrees of freedom (1..100)."""
    if not 1 <= df <= len(T975):
        raise ValueError(f"t quantiles are tabulated for 1 <= df <= {len(T975)}, got {df}")
    return T975[df - 1]


@dataclass(frozen=True)
class PairedCI:
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
    mean = float(d.mean()) if n else nan
    if n < 2:
        return PairedCI(mean, nan, n, nan, nan)
    std = float(d.std(ddof=1))
    half = t975(n - 1) * std / math.sqrt(n)
    return PairedCI(mean, std, n, mean - half, mean + half)


def seeds_needed(std: float, half_width: float, max_seeds: int = 100) -> int:
    """Smallest n >= 2 whose 95 % t interval ``t975(n-1) * std / sqrt(n)`` is within
    ``half_width``; ``max_seeds + 1`` when ``max_seeds`` are not enough (or std is nan)."""
    if half_width <= 0:
        raise ValueError(f"half_width must be > 0, got {half_width}")
    for n in range(2, max_seeds + 1):
        if t975(n - 1) * std / math.sqrt(n) <= half_width:
            return n
    return max_seeds + 1


def bootstrap_group_diff(method_ap, base_ap, num_samples: int = 2000, seed: int = 0):
    """95 % percentile interval of a group-AP difference, resampling seeds and classes.

    Each sample draws S seeds and C classes with replacement, the same draws for both rows (the
    pairing is kept), and takes the mean of ``method_ap - base_ap`` over the drawn cells: it
    adds the class-sampling noise of a small group (7 rare classes) to the seed noise.

    Args:
        method_ap, base_ap: per-class AP, (S seeds, C classes); NaN cells are left out.
        num_samples: bootstrap samples.
        seed: of the resampling generator (the interval is deterministic).

    Returns:
        (low, high), or None with fewer than 2 seeds or 2 classes, or no values.
    """
    diff = np.asarray(method_ap, dtype=np.float64) - np.asarray(base_ap, dtype=np.float64)
    if diff.ndim != 2:
        raise ValueError(f"per-class AP must be (seeds, classes), got shape {diff.shape}")
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
    """Per-class AP of one run from its ``lvis_per_class.csv`` (blank cells: no ground truth).

    Raises:
        ValueError: naming the file (and line and column) for a missing column or a bad cell.
    """
    rows = read_per_class_csv(path)
    tasks = [t for t in TASKS if rows and f"{t}_AP" in rows[0]]
    if not tasks:
        raise ValueError(f"{path}: not a per-class csv: no bbox_AP or segm_AP column")
    out: PerClass = {t: {} for t in tasks}
    for line, row in enumerate(rows, start=2):
        for t in tasks:
            cell = row[f"{t}_AP"]
            if isinstance(cell, str):
                raise ValueError(f"{path}: line {line}: {t}_AP {cell!r} is not a number")
            if cell is not None:
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
    """The category ids that a subset of :data:`SUBSETS` averages."""
    if subset == "AP":
        return sorted(classes)
    if subset in ("APr", "APc", "APf"):
        return sorted(c for c, v in classes.items() if v["frequency"] == subset[-1])
    if subset in ("thin", "filled"):
        return sorted(c for c, v in classes.items() if v["thin"] == (subset == "thin"))
    raise ValueError(f"unknown subset {subset!r}; valid: {SUBSETS}")


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
    common seeds of two rows (``{seed: PerClass}`` each).

    Returns:
        ``{"ci": PairedCI, "boot": (low, high) or None, "seeds": [...]}``.
    """
    task, subset = key.split("/")
    seeds = sorted(set(method) & set(reference))
    diffs = [
        run_metrics(method[s], classes)[key] - run_metrics(reference[s], classes)[key]
        for s in seeds
    ]
    cats = subset_classes(classes, subset)

    def matrix(runs):  # (seeds, classes), NaN where a run has no value
        return [[runs[s].get(task, {}).get(c, np.nan) for c in cats] for s in seeds]

    boot = bootstrap_group_diff(matrix(method), matrix(reference), bootstrap) if bootstrap else None
    return {"ci": paired_t_ci(diffs), "boot": boot, "seeds": seeds}


def fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


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
        return fmt(ci.mean, signed=True)
    text = f"{ci.mean:+.1f} [{ci.low:+.1f}, {ci.high:+.1f}]" + ("*" if ci.excludes_zero else "")
    if result["boot"] is not None:
        text += " {{{:+.1f}, {:+.1f}}}".format(*result["boot"])
    return text


def summary_table(rows: Sequence[tuple], runs, classes, keys: Sequence[str]) -> str:
    """One line per ``(name, label)`` row with runs: mean ± std over seeds of each key."""
    lines = ["| Method | " + " | ".join(keys) + " | seeds |", "|---" * (len(keys) + 2) + "|"]
    for name, label in rows:
        seeds = runs.get(name, {})
        if seeds:
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
