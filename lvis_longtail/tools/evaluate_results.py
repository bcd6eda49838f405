"""Evaluate an existing LVIS results file (e.g. ``lvis_instances_results.json``) against a split.

    python -m lvis_longtail.tools.evaluate_results RESULTS.json --gt datasets/lvis/lvis_v1_val.json
    python -m lvis_longtail.tools.evaluate_results RESULTS.json --gt VAL.json \
        --protocol challenge2021 --output DIR

The results are checked against the split first (a malformed record is named), then every task
is evaluated under the protocol with the fast evaluator: ``standard`` (at most 300 detections
per image), ``fixed`` (Fixed AP: the 10,000 best detections of each class, no per-image cap) or
``challenge2021`` (Fixed AP with Boundary AP added). APr/APc/APf use the split's ``frequency``
fields. The metrics (percent, lvis-api's names) are printed and, with ``--output``, written to
``DIR/lvis_metrics.json``.
"""

import argparse
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

from lvis_longtail.data.lvis_json import load_validated
from lvis_longtail.evaluation.ground_truth import LVISGroundTruth
from lvis_longtail.evaluation.lvis_evaluation import METRICS_FILE, TASKS, evaluate_lvis_results
from lvis_longtail.evaluation.results import load_lvis_results
from lvis_longtail.evaluation.table import PROTOCOLS, EvalProtocol
from lvis_longtail.utils.io import write_json_atomic

__all__ = ["evaluate_results_file", "main"]

logger = logging.getLogger(__name__)


def evaluate_results_file(
    results_file: str,
    gt_file: str,
    protocol: str = "standard",
    tasks: Optional[Sequence[str]] = None,
    dets_per_class: int = 10000,
    dilation_ratio: float = 0.02,
) -> Dict[str, Dict[str, float]]:
    """``{task: metrics in percent}`` of a results file under ``protocol``.

    Args:
        results_file: LVIS results json (records with ``segmentation`` for the mask tasks).
        gt_file: the split's LVIS json with annotations.
        protocol: "standard", "fixed" or "challenge2021".
        tasks: subset of ("bbox", "segm", "boundary"); None: bbox, plus segm when the records
            carry masks, plus the protocol's required tasks (boundary for challenge2021).
        dets_per_class: Fixed AP's detections per class over the split.
        dilation_ratio: Boundary AP's erosion radius over the image diagonal.
    """
    proto = EvalProtocol.create(protocol, 300, dets_per_class)
    validated = load_validated(gt_file)
    if not validated.has_annotations:
        raise ValueError(f"{gt_file}: the split has no annotations; nothing to evaluate against")
    table = load_lvis_results(results_file, validated.dataset, as_table=True)
    if len(table) == 0:
        logger.warning(f"{results_file}: holds no detections (an empty list): every AP is 0")
    has_masks = table.masks is not None
    if tasks is None:
        tasks = ["bbox"] + (["segm"] if has_masks else []) + list(proto.required_tasks)
    tasks = [t for t in TASKS if t in set(tasks) | set(proto.required_tasks)]
    if not has_masks and set(tasks) - {"bbox"}:
        raise ValueError(f"{results_file}: its records have no 'segmentation': only bbox can be "
                         f"evaluated, not {[t for t in tasks if t != 'bbox']}")  # fmt: skip
    gt = LVISGroundTruth(validated.dataset)
    return {
        task: evaluate_lvis_results(
            gt,
            proto.select_table(table, task),
            task,
            proto.eval_max_dets,
            dilation_ratio=dilation_ratio,
        )
        for task in tasks
    }


def _table(task: str, metrics: Dict[str, float]) -> str:
    keys = [k for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
            if k in metrics]  # fmt: skip
    head = f"{task:>8} | " + " | ".join(f"{k:>5}" for k in keys)
    return head + "\n" + f"{'':>8} | " + " | ".join(f"{metrics[k]:5.1f}" for k in keys)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("results", help="LVIS results json")
    p.add_argument("--gt", required=True, help="the split's LVIS json (with annotations)")
    p.add_argument("--protocol", default="standard", choices=PROTOCOLS)
    p.add_argument("--tasks", nargs="+", choices=TASKS, help="default: what the file holds")
    p.add_argument("--dets-per-class", type=int, default=10000, help="Fixed AP's cap")
    p.add_argument("--dilation-ratio", type=float, default=0.02, help="Boundary AP's d / diag")
    p.add_argument("--output", help="folder for lvis_metrics.json")
    args = p.parse_args(argv)
    results = evaluate_results_file(
        args.results, args.gt, args.protocol, args.tasks, args.dets_per_class, args.dilation_ratio
    )
    for task, metrics in results.items():
        print(_table(task, metrics))
    if args.output:
        path = os.path.join(args.output, METRICS_FILE)
        saved = dict(results, protocol=args.protocol, results_file=os.path.abspath(args.results))
        write_json_atomic(saved, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
