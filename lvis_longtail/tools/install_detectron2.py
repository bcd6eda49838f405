"""Install detectron2 0.6 as a pure-Python package from the ``pb1-detectron2`` sdist on PyPI.

detectron2 is not published on PyPI under its own name. The sdist ``pb1-detectron2==0.6``
holds upstream's v0.6 Python sources, but not the C++ ops (``detectron2/layers/csrc``), so its
own ``setup.py`` cannot build. This script:

1. leaves any importable detectron2 untouched (a complete build with ``_C`` included);
2. otherwise installs the cached wheel ``.cache/wheels/detectron2-0.6-py3-none-any.whl``;
3. otherwise downloads the sdist with pip, checks its sha256, and builds that wheel from its
   ``detectron2/`` package with a minimal ``setup.py`` (package name ``detectron2``, no C++
   extension, the runtime dependencies detectron2 imports).

The missing ``detectron2._C`` and other incompatibilities with today's packages are handled at
run time by :mod:`lvis_longtail.compat`.

Usage: ``python lvis_longtail/tools/install_detectron2.py [--cache DIR] [--constraint FILE]``
(run as a file, not with ``-m``: importing the ``lvis_longtail`` package needs detectron2, and
this script imports nothing but the standard library).
"""

import argparse
import hashlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
WHEEL_NAME = "detectron2-0.6-py3-none-any.whl"

# What detectron2 0.6 imports at run time, minus what only its optional tools use
# (black, hydra-core, pydot, future: LazyConfig formatting/overrides and caffe2 export).
RUNTIME_REQUIRES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
]

SETUP_PY = """\
from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="{version}",
    description="detectron2 {version} Python sources (from the {sdist} sdist), without C++ ops",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    python_requires=">=3.7",
    install_requires={requires!r},
)
"""


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sdist(dest: Path) -> Path:
    """Download the pinned sdist with pip and verify its sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    sdist = dest / f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
    if not sdist.exists():
        # --no-build-isolation: pip prepares the sdist's metadata, and its setup.py imports torch.
        _pip(
            "download",
            "--no-deps",
            "--no-build-isolation",
            "--no-binary",
            ":all:",
            "-d",
            str(dest),
            f"{SDIST_NAME}=={SDIST_VERSION}",
        )
    actual = sha256_of(sdist)
    if actual != SDIST_SHA256:
        sdist.unlink()
        raise RuntimeError(
            f"{sdist}: sha256 {actual} does not match the pinned {SDIST_SHA256}; file removed."
        )
    return sdist


def build_wheel(sdist: Path, wheel_dir: Path) -> Path:
    """Build ``detectron2-0.6-py3-none-any.whl`` from the sdist's ``detectron2/`` sources."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        prefix = f"{SDIST_NAME}-{SDIST_VERSION}/detectron2/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(f"{SDIST_NAME}-{SDIST_VERSION}/") :]
            tar.extractall(src, members=members, filter="data")
        (src / "setup.py").write_text(
            SETUP_PY.format(version=SDIST_VERSION, sdist=SDIST_NAME, requires=RUNTIME_REQUIRES)
        )
        _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(src))
    wheel = wheel_dir / WHEEL_NAME
    if not wheel.exists():
        raise RuntimeError(f"building detectron2 did not produce {wheel}")
    return wheel


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=".cache", help="folder for the sdist and the wheel")
    parser.add_argument("--constraint", help="pip constraints file for the dependencies")
    args = parser.parse_args(argv)

    if importlib.util.find_spec("detectron2") is not None:
        has_c = importlib.util.find_spec("detectron2._C") is not None
        print(
            f"detectron2 already installed ({'with' if has_c else 'without'} C++ ops); "
            "leaving it untouched."
        )
        return 0
    cache = Path(args.cache)
    wheel = cache / "wheels" / WHEEL_NAME
    if not wheel.exists():
        wheel = build_wheel(download_sdist(cache / "sdist"), cache / "wheels")
    extra = ["-c", args.constraint] if args.constraint else []
    _pip("install", *extra, str(wheel))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    sys.exit(main())
