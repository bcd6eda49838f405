"""LVIS evaluation around one detection table: detections as rows (:mod:`.rows`) streamed to
per-rank shards (:mod:`.shards`), the table, its ranking rule and the protocols
(:mod:`.table`, Fixed AP's running thresholds in :mod:`.class_thresholds`), results records,
their checks (:mod:`.record_checks`) and the results file (:mod:`.results`), lvis-api's
numbers by a fast evaluator (:mod:`.fast_eval` on :mod:`.ground_truth`) or lvis-api itself
(:mod:`.lvis_evaluation`), Boundary AP's boundary regions on mask crops (:mod:`.boundary`,
:mod:`.mask_crops`), per-class diagnostics (:mod:`.diagnostics`), and the detectron2
``DatasetEvaluator`` (:mod:`.evaluator`)."""

from lvis_longtail.evaluation.class_thresholds import ClassScoreThresholds
from lvis_longtail.evaluation.evaluator import LVISLongTailEvaluator
from lvis_longtail.evaluation.fast_eval import evaluate_detections, metric_names
from lvis_longtail.evaluation.ground_truth import LVISGroundTruth
from lvis_longtail.evaluation.lvis_evaluation import (
    EVALUATORS,
    METRICS,
    evaluate_lvis_results,
    run_lvis_eval,
)
from lvis_longtail.evaluation.results import (
    LVISResultsError,
    load_lvis_results,
    records_for_task,
    validate_lvis_results,
    write_results_file,
)
from lvis_longtail.evaluation.rows import instances_to_rows
from lvis_longtail.evaluation.shards import DetectionShard, ShardedDetections, read_shards
from lvis_longtail.evaluation.table import (
    PROTOCOLS,
    DetectionTable,
    EvalProtocol,
    cap_per_image,
    ranking_score,
    top_k_per_class,
)
from lvis_longtail.utils.io import write_json_atomic

__all__ = [
    "ClassScoreThresholds",
    "DetectionShard",
    "DetectionTable",
    "EVALUATORS",
    "EvalProtocol",
    "LVISGroundTruth",
    "LVISLongTailEvaluator",
    "LVISResultsError",
    "METRICS",
    "PROTOCOLS",
    "ShardedDetections",
    "cap_per_image",
    "evaluate_detections",
    "evaluate_lvis_results",
    "instances_to_rows",
    "load_lvis_results",
    "metric_names",
    "ranking_score",
    "read_shards",
    "records_for_task",
    "run_lvis_eval",
    "top_k_per_class",
    "validate_lvis_results",
    "write_json_atomic",
    "write_results_file",
]
