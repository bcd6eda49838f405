"""`make setup TORCH=keep` keeps the torch/torchvision already in the venv (e.g. CUDA 12
builds for an older driver): the Makefile runs for real against a stub venv whose python
logs every call, answers the import check with fake torch/torchvision modules, and keeps a
copy of the requirements file pip is given."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

FILES = ("Makefile", "requirements.lock", "pyproject.toml",
         "lvis_longtail/tools/install_detectron2.py")  # fmt: skip
KEPT = {"torch": "2.5.1+cu121", "torchvision": "0.20.1+cu121"}
CUDA13 = ("torch==", "torchvision==", "triton==", "nvidia-", "cuda-")


@pytest.fixture
def tree(tmp_path):
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    fake = tmp_path / "fake_site"
    for module, version in KEPT.items():
        (fake / module).mkdir(parents=True)
        (fake / module / "__init__.py").write_text(f"__version__ = {version!r}\n")
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {tmp_path}/calls.log\n'
        'case "$1" in\n'
        f'  -c) PYTHONPATH="$FAKE_SITE" exec {sys.executable} -S "$@";;\n'
        f'  -m) if [ "$3" = install ] && [ "$5" = -r ]; then cp "$6" {tmp_path}/pip_r.txt; fi;;\n'
        "esac\n"
    )
    python.chmod(0o755)
    return tmp_path


def make(tree, *args, fake_site=True):
    env = {"PATH": "/usr/bin:/bin", "FAKE_SITE": str(tree / "fake_site") if fake_site else ""}
    cmd = ["make", "setup", f"VENV={tree / 'venv'}", "PYTHON=false", *args]
    return subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=60)


def lines(path: Path):
    return [x for x in path.read_text().splitlines() if x and not x.startswith("#")]


def test_keep_installs_the_lock_without_torch_and_pins_the_kept_versions(tree):
    proc = make(tree, "TORCH=keep")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    given = lines(tree / "pip_r.txt")
    assert [x for x in given if x.startswith(CUDA13)] == [
        f"torch=={KEPT['torch']}",
        f"torchvision=={KEPT['torchvision']}",
    ]
    lock = lines(REPO / "requirements.lock")
    assert [x for x in lock if not x.startswith(CUDA13)] == given[:-2]  # all the rest
    calls = (tree / "calls.log").read_text()
    assert "--constraint .cache/requirements.keep-torch.lock" in calls
    assert "-r requirements.lock" not in calls


def test_default_installs_the_pinned_lock(tree):
    proc = make(tree)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines(tree / "pip_r.txt") == lines(REPO / "requirements.lock")
    assert "torch==2.14.1" in lines(tree / "pip_r.txt")


def test_keep_without_torch_in_the_venv_says_what_to_do(tree):
    proc = make(tree, "TORCH=keep", fake_site=False)
    assert proc.returncode != 0
    assert "TORCH=keep: install torch and torchvision into" in proc.stdout + proc.stderr
    assert not (tree / "pip_r.txt").exists()


def test_unknown_torch_value_is_rejected(tree):
    proc = make(tree, "TORCH=cuda12")
    assert proc.returncode != 0 and 'TORCH must be "pinned" (default) or "keep"' in proc.stderr
