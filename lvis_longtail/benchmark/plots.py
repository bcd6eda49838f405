"""PNG plots of the long-tail benchmark (matplotlib, Agg; written atomically)."""

from typing import Mapping, Sequence

import numpy as np

from lvis_longtail.benchmark.report import GROUPS, TASKS, run_metrics
from lvis_longtail.utils.io import atomic_write

GROUP_COLORS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}


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


def plot_groups(path: str, rows: Sequence[tuple], runs, classes, title: str) -> None:
    """APr / APc / APf bars per row (bbox and segm panels), error bars = std over seeds."""
    shown = [(n, label) for n, label in rows if runs.get(n)]
    fig = _figure((14, 4.8))
    x = np.arange(len(shown))
    for i, task in enumerate(TASKS):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, g in enumerate(GROUPS):
            vals = [
                [run_metrics(pc, classes)[f"{task}/AP{g}"] for pc in runs[n].values()]
                for n, _ in shown
            ]
            std = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
            ax.bar(
                x + (j - 1) * 0.26,
                [np.mean(v) for v in vals],
                0.26,
                yerr=std,
                capsize=2,
                label=f"AP{g}",
                color=GROUP_COLORS[g],
            )
        ax.set_xticks(x)
        ax.set_xticklabels([label for _, label in shown], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(f"{task} AP (%)")
        ax.set_title(f"{task}: {title}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_per_class(
    path: str, rows: Sequence[tuple], runs, classes, train_images: Mapping[int, int]
) -> None:
    """Per-class AP (mean over seeds) against the class's training images (log x); one colour
    per row, hollow markers for the thin/hollow classes."""
    fig = _figure((13, 4.8))
    for i, task in enumerate(TASKS):
        ax = fig.add_subplot(1, 2, i + 1)
        for (name, label), color in zip(rows, ("#1f77b4", "#d62728", "#2ca02c")):
            seeds = runs.get(name, {})
            for thin in (False, True):
                cats = [c for c, v in classes.items() if v["thin"] == thin]
                pts = [
                    (train_images.get(c, 0), np.mean([pc[task][c] for pc in seeds.values()]))
                    for c in cats
                    if seeds and all(c in pc.get(task, {}) for pc in seeds.values())
                ]
                if not pts:
                    continue
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
