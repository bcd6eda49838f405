"""The demo's promises: CPU thread policy, fixed seed and short schedule, closing summary."""

import json

import pytest
import torch
from conftest import REPO, TINY_BASE

from lvis_longtail.engine import setup_cfg
from lvis_longtail.engine.launch import configure_cpu_threads, cpu_threads
from lvis_longtail.engine.summary import format_summary


@pytest.fixture
def no_thread_env(monkeypatch):
    monkeypatch.delenv("LVIS_LONGTAIL_CPU_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)


def test_cpu_threads_auto_leaves_cores_to_data_workers(no_thread_env):
    cfg = setup_cfg(str(TINY_BASE), ["DATALOADER.NUM_WORKERS", "1"])
    assert cpu_threads(cfg) == 7 and cpu_threads(cfg, processes_per_machine=2) == 3
    cfg = setup_cfg(str(TINY_BASE), ["DATALOADER.NUM_WORKERS", "9"])
    assert cpu_threads(cfg) == 1


def test_cpu_threads_overrides(no_thread_env, monkeypatch):
    cfg = setup_cfg(str(TINY_BASE))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads(cfg) == 3
    monkeypatch.setenv("LVIS_LONGTAIL_CPU_THREADS", "2")
    assert cpu_threads(cfg) == 2
    assert cpu_threads(setup_cfg(str(TINY_BASE), ["CPU_THREADS", "5"])) == 5


def test_configure_cpu_threads_sets_torch_and_opencv(no_thread_env):
    import cv2

    before, before_cv = torch.get_num_threads(), cv2.getNumThreads()
    try:
        configure_cpu_threads(setup_cfg(str(TINY_BASE), ["CPU_THREADS", "2"]))
        assert torch.get_num_threads() == 2 and cv2.getNumThreads() == 1
        configure_cpu_threads(setup_cfg(str(TINY_BASE), ["MODEL.DEVICE", "cuda"]))  # no-op
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        cv2.setNumThreads(before_cv)


def test_tiny_configs_have_a_fixed_seed_and_the_demo_schedule():
    for path in sorted((REPO / "configs" / "tiny").glob("*.yaml")):
        cfg = setup_cfg(str(path))
        assert cfg.SEED >= 0, path
    base = setup_cfg(str(TINY_BASE))
    assert base.SOLVER.MAX_ITER == 300 and max(base.SOLVER.STEPS) < base.SOLVER.MAX_ITER


def test_summary_lists_ap_per_group_and_the_results_file(tmp_path):
    cfg = setup_cfg(
        str(TINY_BASE),
        [
            "OUTPUT_DIR",
            str(tmp_path),
            "DATASETS.TEST",
            "('lt_synthetic_val', 'lt_synthetic_test_dev')",
        ],
    )
    export = tmp_path / "inference" / "lt_synthetic_test_dev" / "lvis_instances_results.json"
    export.parent.mkdir(parents=True)
    export.write_text(json.dumps([]))
    metrics = {"AP": 41.234, "APr": 10.0, "APc": 40.0, "APf": float("nan")}
    results = {"lt_synthetic_val": {"bbox": metrics, "segm": dict(metrics, AP=20.0)},
               "lt_synthetic_test_dev": {}}  # fmt: skip
    text = format_summary(cfg, results, seconds=90)
    assert "=== Summary (1.5 min) ===" in text
    assert "lt_synthetic_val bbox: AP 41.2, APr 10.0, APc 40.0, APf n/a" in text
    assert "lt_synthetic_val segm: AP 20.0," in text
    assert (
        f"lt_synthetic_test_dev results file (no annotations: for the evaluation server): {export}"
        in text
    )


def test_summary_of_a_single_test_split(tmp_path):
    """detectron2's ``test`` returns the split's own dict when there is one split."""
    cfg = setup_cfg(
        str(TINY_BASE), ["OUTPUT_DIR", str(tmp_path), "DATASETS.TEST", "('lt_synthetic_val',)"]
    )
    text = format_summary(cfg, {"bbox": {"AP": 12.0, "APr": 1.0, "APc": 2.0, "APf": 3.0}})
    assert "lt_synthetic_val bbox: AP 12.0, APr 1.0, APc 2.0, APf 3.0" in text
