"""Which classes gained or lost most between two LVIS evaluations.

    python -m lvis_longtail.tools.compare_runs RUN_A RUN_B [--metric segm_AP] [--top 15]

``--metric`` is any AP column of the csv: ``{bbox,segm,boundary}_AP`` or ``..._AP50``
(``boundary_*`` where Boundary AP was evaluated); the default is segm_AP, else bbox_AP, else
boundary_AP, whichever both runs have.

A RUN is a per-class csv (``lvis_per_class.csv``, written by the evaluator next to
``lvis_metrics.json``) or a folder holding one, e.g. ``output/x/inference/lvis_v1_val`` or
``output/x`` if only one dataset was evaluated there. Classes are matched by category id;
those without a value in either run (no ground truth) are left out. Prints the mean change per
frequency group and the ``--top`` classes with the largest gains and losses (B - A).

Two runs must be evaluations of the same dataset: runs whose folders name different datasets
(``inference/<dataset>/``) or whose csv files list different classes are refused. Reading two
csv files needs no torch or detectron2 (this module imports only the standard library,
tabulate and :mod:`lvis_longtail.utils.per_class_csv`; ``lvis_longtail`` skips its model set-up
where torch is absent).
"""

import argparse
import glob
import os
import sys
from typing import Dict, List, Optional

from tabulate import tabulate

from lvis_longtail.utils.per_class_csv import CSV_FILE
from lvis_longtail.utils.per_class_csv import read_per_class_csv as read_csv

GROUPS = ("r", "c", "f")


def dataset_of(csv_path: str) -> Optional[str]:
    """The dataset a csv was evaluated on, from ``.../inference/<dataset>/lvis_per_class.csv``."""
    folder = os.path.dirname(os.path.abspath(csv_path))
    if os.path.basename(os.path.dirname(folder)) == "inference":
        return os.path.basename(folder)
    return None


def check_same_dataset(path_a: str, rows_a: List[dict], path_b: str, rows_b: List[dict]):
    """Raise ValueError unless A and B evaluate the same dataset (same folder name where
    both have one, and the same category ids and names)."""
    da, db = dataset_of(path_a), dataset_of(path_b)
    if da and db and da != db:
        raise ValueError(f"A is an evaluation of '{da}', B of '{db}': compare the same dataset")
    names_a = {r["category_id"]: r.get("name") for r in rows_a}
    names_b = {r["category_id"]: r.get("name") for r in rows_b}
    if names_a != names_b:
        only = sorted(set(names_a) ^ set(names_b))
        renamed = sorted(k for k in set(names_a) & set(names_b) if names_a[k] != names_b[k])
        detail = (
            f"category ids in one run only: {only[:5]}"
            if only
            else f"category {renamed[0]} is '{names_a[renamed[0]]}' in A, "
            f"'{names_b[renamed[0]]}' in B"
        )
        raise ValueError(
            f"A and B list different classes, so they are not the same dataset ({detail})"
        )


def find_csv(run: str) -> str:
    """The per-class csv of a RUN (a csv path, or a folder with exactly one below it)."""
    if os.path.isfile(run):
        return run
    if not os.path.isdir(run):
        raise FileNotFoundError(f"{run}: no such file or folder")
    direct = os.path.join(run, CSV_FILE)
    if os.path.isfile(direct):
        return direct
    found = sorted(glob.glob(os.path.join(run, "**", CSV_FILE), recursive=True))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(
            f"{run}: no {CSV_FILE} in this folder or below (it is written by the LVIS evaluator "
            "of lvis_longtail into OUTPUT_DIR/inference/<dataset>/)"
        )
    listing = "\n  ".join(found)
    raise ValueError(f"{run}: several {CSV_FILE} below; pass one of them:\n  {listing}")


DEFAULT_METRICS = ("segm_AP", "bbox_AP", "boundary_AP")


def default_metric(rows_a: List[dict], rows_b: List[dict]) -> str:
    for metric in DEFAULT_METRICS:
        if rows_a and rows_b and metric in rows_a[0] and metric in rows_b[0]:
            return metric
    raise ValueError(f"the runs share none of the columns {list(DEFAULT_METRICS)}")


def compare(rows_a: List[dict], rows_b: List[dict], metric: str, top: int = 15) -> Dict:
    """Per-class changes of ``metric`` from A to B.

    Returns:
        ``{"changes": [...], "gains": [...], "losses": [...], "groups": {g: (mean delta,
        n)}, "mean": mean delta, "missing": classes without a value in a run}``; each change
        is a dict with category_id, name, frequency, train_image_count, a, b, delta. Ties in
        delta are ordered by category id.
    """
    for name, rows in (("A", rows_a), ("B", rows_b)):
        if rows and metric not in rows[0]:
            raise ValueError(f"run {name} has no column {metric!r}")
    by_id = {r["category_id"]: r for r in rows_b}
    changes, missing = [], 0
    for ra in rows_a:
        rb = by_id.get(ra["category_id"])
        if rb is None or ra[metric] is None or rb[metric] is None:
            missing += 1
            continue
        changes.append(
            {
                "category_id": ra["category_id"],
                "name": ra["name"],
                "frequency": ra["frequency"] or rb["frequency"],
                "train_image_count": ra.get("train_image_count") or rb.get("train_image_count"),
                "a": ra[metric],
                "b": rb[metric],
                "delta": rb[metric] - ra[metric],
            }
        )
    missing += len(set(by_id) - {r["category_id"] for r in rows_a})
    order = sorted(changes, key=lambda c: (-c["delta"], c["category_id"]))
    groups = {}
    for g in GROUPS:
        deltas = [c["delta"] for c in changes if c["frequency"] == g]
        groups[g] = (sum(deltas) / len(deltas) if deltas else None, len(deltas))
    return {
        "changes": changes,
        "gains": [c for c in order if c["delta"] > 0][:top],
        "losses": [c for c in reversed(order) if c["delta"] < 0][:top],
        "groups": groups,
        "mean": sum(c["delta"] for c in changes) / len(changes) if changes else None,
        "missing": missing,
    }


def _table(changes: List[dict]) -> str:
    rows = [
        [
            c["category_id"],
            c["name"],
            c["frequency"],
            "" if c["train_image_count"] is None else c["train_image_count"],
            f"{c['a']:.1f}",
            f"{c['b']:.1f}",
            f"{c['delta']:+.1f}",
        ]
        for c in changes
    ]
    headers = ["id", "class", "freq", "train imgs", "A", "B", "B - A"]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    return table if rows else "(none)"


def format_report(result: Dict, metric: str, path_a: str, path_b: str, top: int) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:+.2f}"

    lines = [
        f"A: {path_a}",
        f"B: {path_b}",
        f"{metric} of {len(result['changes'])} classes with a value in both runs "
        f"({result['missing']} left out); mean change B - A: {fmt(result['mean'])}",
        "by frequency group: "
        + ", ".join(f"{g} {fmt(m)} ({n})" for g, (m, n) in result["groups"].items()),
        "",
        f"Largest gains (top {top}):",
        _table(result["gains"]),
        "",
        f"Largest losses (top {top}):",
        _table(result["losses"]),
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_a", metavar="RUN_A", help="per-class csv or a folder holding one")
    parser.add_argument("run_b", metavar="RUN_B", help="per-class csv or a folder holding one")
    parser.add_argument(
        "--metric",
        help="csv column to compare, e.g. boundary_AP (default segm_AP, else bbox_AP, else "
        "boundary_AP)",
    )
    parser.add_argument("--top", type=int, default=15, help="classes listed per direction")
    args = parser.parse_args(argv)
    try:
        path_a, path_b = find_csv(args.run_a), find_csv(args.run_b)
        rows_a, rows_b = read_csv(path_a), read_csv(path_b)
        check_same_dataset(path_a, rows_a, path_b, rows_b)
        metric = args.metric or default_metric(rows_a, rows_b)
        result = compare(rows_a, rows_b, metric, args.top)
    except (OSError, ValueError) as e:
        print(f"compare_runs: {e}", file=sys.stderr)
        return 2
    print(format_report(result, metric, path_a, path_b, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
