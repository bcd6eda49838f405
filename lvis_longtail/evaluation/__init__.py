"""LVIS evaluation with lvis-api's numbers (fast or official), streamed results, Fixed AP,
per-class diagnostics, and results export for the LVIS test-dev server."""

from lvis_longtail.evaluation.detections import DetectionTable, cap_per_image, top_k_per_class
from lvis_longtail.evaluation.evaluator import LVISLongTailEvaluator
from lvis_longtail.evaluation.export import (
    instances_to_lvis_records,
    records_for_export,
    records_for_task,
    write_json_atomic,
)
from lvis_longtail.evaluation.fast_eval import LVISGroundTruth, evaluate_detections, metric_names
from lvis_longtail.evaluation.lvis_evaluation import (
    EVALUATORS,
    METRICS,
    evaluate_lvis_results,
    run_lvis_eval,
)
from lvis_longtail.evaluation.protocol import PROTOCOLS, ClassScoreThresholds, EvalProtocol
from lvis_longtail.evaluation.shard_export import export_shards
from lvis_longtail.evaluation.store import LVISResultsStore, read_shards
from lvis_longtail.evaluation.validation import (
    LVISResultsError,
    load_lvis_results,
    validate_lvis_results,
)

__all__ = [
    "ClassScoreThresholds",
    "DetectionTable",
    "EVALUATORS",
    "EvalProtocol",
    "LVISGroundTruth",
    "LVISLongTailEvaluator",
    "LVISResultsError",
    "LVISResultsStore",
    "METRICS",
    "PROTOCOLS",
    "cap_per_image",
    "evaluate_detections",
    "evaluate_lvis_results",
    "export_shards",
    "instances_to_lvis_records",
    "load_lvis_results",
    "metric_names",
    "read_shards",
    "records_for_export",
    "records_for_task",
    "run_lvis_eval",
    "top_k_per_class",
    "validate_lvis_results",
    "write_json_atomic",
]
