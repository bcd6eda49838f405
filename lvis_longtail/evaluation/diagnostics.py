"""Per-class diagnostics of an LVIS evaluation: a csv and a plot.

``lvis_per_class.csv`` has one row per category of the split::

    category_id, name, frequency, train_image_count, gt_instances, gt_images,
    bbox_AP, bbox_AP50, bbox_detections, segm_AP, segm_AP50, segm_detections

(and ``boundary_AP, boundary_AP50, boundary_detections`` when Boundary AP is evaluated).

``frequency`` is the split's (what APr/APc/APf use); ``train_image_count`` the training set's
images per class (blank when unknown); ``gt_*`` count the evaluated split's annotations; APs
are in percent over all areas, blank where the class has no ground truth; ``*_detections``
count the detections that took part (after the protocol's cap and the federated rules).

``lvis_per_class.png`` plots each class's AP against its training image count (log x; the
split's own annotated image count when the training counts are unknown), coloured by
frequency group (the first task of boundary, segm, bbox evaluated), next to the APr/APc/APf
bars of each task.
"""

import math
import os
from collections import defaultdict
from typing import Dict, List, Mapping, Optional

import numpy as np

from lvis_longtail.utils.io import atomic_write
from lvis_longtail.utils.per_class_csv import CSV_FILE, write_per_class_csv
from lvis_longtail.utils.per_class_csv import read_per_class_csv as read_csv  # noqa: F401

PLOT_FILE = "lvis_per_class.png"
BASE_COLUMNS = (
    "category_id",
    "name",
    "frequency",
    "train_image_count",
    "gt_instances",
    "gt_images",
)
GROUP_COLORS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}


def per_class_rows(
    dataset: dict, per_task: Mapping[str, object], train_counts: Optional[Mapping[int, int]]
) -> List[dict]:
    """Rows of the csv (values as Python numbers; None = blank).

    Args:
        dataset: the split's json dict (categories and annotations).
        per_task: ``{task: LVISEvalResult}`` (:mod:`.fast_eval`).
        train_counts: ``{category id: training images}`` or None.
    """
    instances, images = defaultdict(int), defaultdict(set)
    for ann in dataset.get("annotations", []):
        instances[ann["category_id"]] += 1
        images[ann["category_id"]].add(ann["image_id"])
    columns = {}
    for task, result in per_task.items():
        index = {c: k for k, c in enumerate(result.cat_ids.tolist())}
        ap, ap50 = result.per_class_ap(), result.per_class_ap(iou=0.5)
        columns[task] = (index, ap, ap50, result.num_detections)
    rows = []
    for cat in sorted(dataset["categories"], key=lambda c: c["id"]):
        cid = cat["id"]
        row = {
            "category_id": cid,
            "name": cat.get("name", str(cid)),
            "frequency": cat.get("frequency"),
            "train_image_count": None if train_counts is None else train_counts.get(cid),
            "gt_instances": instances[cid],
            "gt_images": len(images[cid]),
        }
        for task, (index, ap, ap50, dets) in columns.items():
            k = index.get(cid)
            row[f"{task}_AP"] = _pct(ap[k]) if k is not None else None
            row[f"{task}_AP50"] = _pct(ap50[k]) if k is not None else None
            row[f"{task}_detections"] = int(dets[k]) if k is not None else 0
        rows.append(row)
    return rows


def _pct(value) -> Optional[float]:
    return None if value is None or math.isnan(value) else float(value) * 100


def write_csv(path: str, rows: List[dict]) -> None:
    """Write the rows atomically (blank cells for None)."""
    write_per_class_csv(path, rows, BASE_COLUMNS)


def plot(path: str, rows: List[dict], group_metrics: Mapping[str, Mapping[str, float]]) -> None:
    """Per-class AP against training images (log x) and APr/APc/APf bars, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = [t for t in ("boundary", "segm", "bbox") if rows and f"{t}_AP" in rows[0]]
    fig = Figure(figsize=(12, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax, bars = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    known = any(r["train_image_count"] is not None for r in rows)
    x_key, x_label = (
        ("train_image_count", "training images")
        if known
        else (
            "gt_images",
            "annotated images in the evaluated split",
        )
    )
    if tasks:
        metric = f"{tasks[0]}_AP"
        for group, color in GROUP_COLORS.items():
            pts = [
                (r[x_key], r[metric])
                for r in rows
                if r["frequency"] == group and r[metric] is not None and (r[x_key] or 0) > 0
            ]
            if pts:
                xs, ys = np.array(pts, dtype=float).T
                ax.scatter(xs, ys, s=10, alpha=0.7, color=color, label=f"{group} ({len(pts)})")
        ax.set_xscale("log")
        ax.set_xlabel(f"{x_label} (log)")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"Per-class {metric}")
        ax.legend(title="frequency")
        ax.grid(True, alpha=0.3)
    width = 0.8 / max(len(group_metrics), 1)
    for i, (task, metrics) in enumerate(group_metrics.items()):
        values = [max(metrics.get(f"AP{g}", -1), 0) for g in GROUP_COLORS]
        pos = np.arange(3) + (i - (len(group_metrics) - 1) / 2) * width
        bars.bar(pos, values, width, label=task)
        for p, v in zip(pos, values):
            bars.text(p, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    bars.set_xticks(np.arange(3), ["APr", "APc", "APf"])
    bars.set_ylabel("AP (%)")
    bars.set_title("AP by frequency group")
    if group_metrics:
        bars.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")


def save(output_dir: str, dataset: dict, per_task: Mapping[str, object], train_counts) -> Dict:
    """Write the csv and the plot to ``output_dir``; returns their paths."""
    rows = per_class_rows(dataset, per_task, train_counts)
    csv_path = os.path.join(output_dir, CSV_FILE)
    png_path = os.path.join(output_dir, PLOT_FILE)
    write_csv(csv_path, rows)
    group_metrics = {
        t: {k: (v * 100 if v >= 0 else -1) for k, v in r.metrics.items()}
        for t, r in per_task.items()
    }
    plot(png_path, rows, group_metrics)
    return {"csv": csv_path, "plot": png_path}
