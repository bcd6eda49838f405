"""The long-tail benchmark's rows, planning and report (driven by ``benchmarks/longtail.py``)."""

from lvis_longtail.benchmark.methods import BASELINE, METHODS, Method, methods_by_name
from lvis_longtail.benchmark.plan import Run, Settings, plan_runs

__all__ = ["BASELINE", "METHODS", "Method", "Run", "Settings", "methods_by_name", "plan_runs"]
