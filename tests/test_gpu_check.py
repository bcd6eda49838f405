"""The prepared GPU check stays runnable: its wheel list is pinned and complete, and its dry
run (the same code on the CPU, tiny sizes, one iteration) passes every section."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gpu_train
import gpu_wheels
import pytest
from conftest import REPO

from lvis_longtail.modeling.cls_losses import CLS_LOSS_REGISTRY


def test_every_shipped_wheel_is_pinned_and_none_shadows_the_machines_packages():
    pins = gpu_wheels.locked_versions()
    for name in gpu_wheels.WHEELS + gpu_wheels.SDISTS:
        assert gpu_wheels.normalise(name) in pins, name
    machine = {gpu_wheels.normalise(n) for n in gpu_wheels.PREINSTALLED}
    assert not machine & gpu_wheels.shipped()


def test_import_check_names_a_distribution_nothing_provides():
    """absl-py (a TensorBoard dependency here) is neither shipped nor on the GPU machine."""
    baseline = set(sys.modules) - {m for m in sys.modules if m.split(".")[0] == "absl"}
    __import__("absl.flags")
    report = gpu_train.import_check(baseline, gpu_wheels)
    assert report["missing_from_wheels"] == ["absl-py"]


@pytest.mark.slow
def test_dry_run_passes_every_section(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["failures"] == []
    cases = {r["case"].split(" (K=")[0] for r in record["parity"] if r["ok"]}
    assert {name for name, _ in CLS_LOSS_REGISTRY} <= cases
    assert {"DeformROIPooler", "CARAFE", "Soft-NMS gaussian", "dice_loss"} <= cases
    trained = {r["config"] for r in record["configs"] if r.get("ok")}
    assert trained == {p.name for p in Path(REPO, "configs", "tiny").glob("*.yaml")}
    assert all(r["rc"] == 0 for r in record["benchmarks"]) and len(record["benchmarks"]) == 5
    assert record["imports"]["missing_from_wheels"] == []
    assert {"detectron2", "pycocotools", "faster-coco-eval"} <= set(record["imports"]["imported"])
    assert (tmp_path / "summary.md").read_text().startswith("# GPU check")
