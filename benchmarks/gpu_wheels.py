#!/usr/bin/env python
"""Wheels for the GPU check (``make gpu-wheels``, docs/gpu_check.md): the CPython 3.12 wheels
that a GPU machine with its own torch but no package registry lacks, into ``.whl/``.

The machine brings :data:`PREINSTALLED` (torch, torchvision, OpenCV, timm, ... and what they
depend on). Everything else that training, evaluation and the check import travels:

- :data:`WHEELS`: binary or universal wheels, downloaded for cp312 / manylinux x86-64 at the
  versions of requirements.lock;
- :data:`SDISTS`: pure-Python sdists, built into wheels here;
- detectron2 0.6, built from the sha256-pinned sdist by
  ``lvis_longtail/tools/install_detectron2.py`` (the wheel ``make setup`` installs).

The total must stay under :data:`LIMIT_MIB` (what a device run may carry with the working
tree). ``benchmarks/gpu_check.py --dry-run`` checks that these wheels plus
:data:`PREINSTALLED` cover every distribution the check imports.

    python benchmarks/gpu_wheels.py [--out .whl]
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 48  # of the 64 MiB a device run carries; the rest is the working tree
PLATFORM = [
    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
    "--platform", "manylinux2014_x86_64",
]  # fmt: skip
# On the GPU machine already (with their own dependencies): not shipped, never shadowed.
PREINSTALLED = (
    "torch", "torchvision", "opencv-python-headless", "timm", "pillow", "scipy", "numpy",
    "matplotlib", "pytest",
)  # fmt: skip
WHEELS = (
    "pycocotools", "shapely", "faster-coco-eval", "lvis", "iopath", "yacs", "omegaconf",
    "hydra-core", "termcolor", "tabulate", "portalocker", "cloudpickle",
)  # fmt: skip
SDISTS = ("fvcore", "antlr4-python3-runtime")
DETECTRON2 = "detectron2"


def locked_versions(lock: Path = REPO / "requirements.lock") -> dict:
    """``{normalised name: version}`` of requirements.lock."""
    pins = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if match:
            pins[normalise(match.group(1))] = match.group(2)
    return pins


def normalise(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def shipped() -> set:
    """Normalised names of every distribution ``.whl/`` holds."""
    return {normalise(n) for n in WHEELS + SDISTS + (DETECTRON2,)}


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def detectron2_wheel(out: Path) -> None:
    """The pure-Python detectron2 wheel of install_detectron2.py (its cached sdist and wheel
    in ``.cache`` are reused), copied into ``out``."""
    path = REPO / "lvis_longtail" / "tools" / "install_detectron2.py"
    spec = importlib.util.spec_from_file_location("install_detectron2", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cache = REPO / ".cache"
    wheel = cache / "wheels" / tool.WHEEL_NAME
    if not wheel.exists() or not tool.wheel_is_complete(wheel):
        wheel = tool.build_wheel(tool.download_sdist(cache / "sdist"), cache / "wheels")
    (out / wheel.name).write_bytes(wheel.read_bytes())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / ".whl"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.whl"):  # only this run's set, at the lock's versions
        stale.unlink()
    pins = locked_versions()
    spec = [f"{name}=={pins[normalise(name)]}" for name in WHEELS]
    pip("download", "--no-deps", *PLATFORM, "-d", str(out), *spec)
    sdists = [f"{name}=={pins[normalise(name)]}" for name in SDISTS]
    pip("wheel", "--no-deps", "-w", str(out), *sdists)
    detectron2_wheel(out)
    total = sum(f.stat().st_size for f in out.glob("*.whl")) / 2**20
    print(f"{len(list(out.glob('*.whl')))} wheels in {out}: {total:.1f} MiB (limit {LIMIT_MIB})")
    if total > LIMIT_MIB:
        print(f"error: {out} holds {total:.1f} MiB, over {LIMIT_MIB} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    sys.exit(main())
