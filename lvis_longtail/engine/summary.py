"""The closing summary of ``train_net.py``: LVIS AP per split and the exported results files."""

import math
import os
from typing import Mapping

from lvis_longtail.evaluation.lvis_evaluation import TASKS
from lvis_longtail.evaluation.results import RESULTS_FILE

COLUMNS = ("AP", "APr", "APc", "APf")


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.1f}"


def format_summary(cfg, results: Mapping, seconds: float = None) -> str:
    """A few lines: per evaluated split, bbox, segm and (when evaluated) boundary
    AP/APr/APc/APf; per split, the results file written under
    ``OUTPUT_DIR/inference/<split>/`` (if any).

    Args:
        cfg: the run's config (``DATASETS.TEST``, ``OUTPUT_DIR``).
        results: ``{dataset: {"bbox": {"AP": ...}, "segm": {...}, "boundary": {...}}}`` as
            ``Trainer.test`` returns it (``{}`` for a split without annotations; with one test
            split, detectron2 returns that split's dict itself).
        seconds: wall time of the run, printed if given.
    """
    if len(cfg.DATASETS.TEST) == 1 and cfg.DATASETS.TEST[0] not in results:
        results = {cfg.DATASETS.TEST[0]: results}  # detectron2's test() unwraps a single split
    lines = ["", "=== Summary" + (f" ({seconds / 60:.1f} min)" if seconds else "") + " ==="]
    for name in cfg.DATASETS.TEST:
        metrics = results.get(name) or {}
        for task in TASKS:
            if task in metrics:
                values = ", ".join(f"{c} {_fmt(metrics[task].get(c))}" for c in COLUMNS)
                lines.append(f"{name} {task}: {values}")
        path = os.path.join(cfg.OUTPUT_DIR, "inference", name, RESULTS_FILE)
        if os.path.isfile(path):
            kind = "metrics above" if metrics else "no annotations: for the evaluation server"
            lines.append(f"{name} results file ({kind}): {path}")
    return "\n".join(lines)
