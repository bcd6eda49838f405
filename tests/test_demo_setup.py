"""The demo's promises: CPU thread policy, fixed seed and short schedule, closing summary."""

import json

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, TINY_BASE
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.data import build as d2_build

from lvis_longtail.data.mapper import LongTailDatasetMapper
from lvis_longtail.engine import Trainer, setup_cfg
from lvis_longtail.engine.faults import _WorkerInit as faults_worker_init
from lvis_longtail.engine.launch import (
    OpenCVThreadsWorkerInit,
    configure_cpu_threads,
    cpu_threads,
    limit_worker_opencv_threads,
)
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


@pytest.fixture
def restore_threads():
    before, before_cv = torch.get_num_threads(), cv2.getNumThreads()
    init = d2_build.worker_init_reset_seed
    yield
    torch.set_num_threads(before)
    cv2.setNumThreads(before_cv)
    d2_build.worker_init_reset_seed = init


def test_configure_cpu_threads_sets_torch_and_opencv(no_thread_env, restore_threads):
    configure_cpu_threads(setup_cfg(str(TINY_BASE), ["CPU_THREADS", "2"]))
    assert torch.get_num_threads() == 2 and cv2.getNumThreads() == 1
    cv2.setNumThreads(3)
    gpu = ["MODEL.DEVICE", "cuda", "OPENCV_THREADS", "2"]
    configure_cpu_threads(setup_cfg(str(TINY_BASE), gpu))  # no CUDA call
    assert torch.get_num_threads() == 2  # torch's threads are left alone on GPU
    assert cv2.getNumThreads() == 2  # OpenCV's are not


def _opencv_threads_in_worker(record):
    return dict(record, opencv_threads=cv2.getNumThreads())


def test_data_workers_limit_opencv_also_on_gpu_runs(tmp_path, restore_threads, monkeypatch):
    """Each worker of a training loader and of a test loader sets OPENCV_THREADS itself
    (the parent's own setting, 3 here, is not what a worker keeps)."""
    cfg = setup_cfg(str(TINY_BASE), ["MODEL.DEVICE", "cuda", "DATALOADER.NUM_WORKERS", "1"])
    configure_cpu_threads(cfg)
    cv2.setNumThreads(3)
    records = [{"image_id": i, "file_name": str(tmp_path / "a.png")} for i in range(2)]
    train = build_detection_train_loader(
        records, mapper=_opencv_threads_in_worker, total_batch_size=2,
        aspect_ratio_grouping=False, num_workers=1,
    )  # fmt: skip
    assert [r["opencv_threads"] for r in next(iter(train))] == [1, 1]
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    DatasetCatalog.register(
        "lt_opencv_threads", lambda: [dict(r, height=8, width=8) for r in records]
    )
    mapper_call = LongTailDatasetMapper.__call__
    monkeypatch.setattr(
        LongTailDatasetMapper,
        "__call__",
        lambda self, r: _opencv_threads_in_worker(mapper_call(self, r)),
    )
    try:
        test = Trainer.build_test_loader(cfg, "lt_opencv_threads")
        assert [batch[0]["opencv_threads"] for batch in test] == [1, 1]
    finally:
        DatasetCatalog.remove("lt_opencv_threads")


def test_worker_init_pickles_for_spawned_workers(restore_threads):
    """Ranks started by launch() start their DataLoader workers by spawn, which pickles the
    worker_init_fn. pickle finds a function by its qualified name, and detectron2's seed
    reset's name then leads to the replacement: the original must travel another way."""
    import pickle

    original = d2_build.worker_init_reset_seed
    limit_worker_opencv_threads(2)
    limit_worker_opencv_threads(3)  # idempotent: wraps the original, not the wrapper
    patched = d2_build.worker_init_reset_seed
    assert isinstance(patched, OpenCVThreadsWorkerInit) and patched.base is original
    copy = pickle.loads(pickle.dumps(patched))
    assert copy.threads == 3 and copy.base is original
    nested = pickle.loads(pickle.dumps(faults_worker_init(patched)))
    assert nested.worker_init_fn.base is original


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
