"""Install detectron2 0.6 as a pure-Python package from the ``pb1-detectron2`` sdist on PyPI.

detectron2 is not published on PyPI under its own name. The sdist ``pb1-detectron2==0.6``
holds upstream's v0.6 Python sources, but not the C++ ops (``detectron2/layers/csrc``), so its
own ``setup.py`` cannot build. This script:

1. leaves any importable detectron2 untouched (a complete build with ``_C`` included);
2. otherwise installs the cached wheel ``.cache/wheels/detectron2-0.6-py3-none-any.whl``;
3. otherwise downloads the sdist with pip, checks its sha256, and builds that wheel from its
   ``detectron2/`` package with a minimal ``setup.py`` (package name ``detectron2``, no C++
   extension, the runtime dependencies detectron2 imports). Like upstream's ``setup.py``, the
   wheel carries the model-zoo configs as package data (``detectron2/model_zoo/configs/``, for
   ``model_zoo.get_config_file``) and the sdist's ``projects/`` as ``detectron2.projects.*``
   (PointRend, DeepLab, Panoptic-DeepLab).

A cached wheel or an installed pure-Python detectron2 that lacks the model-zoo configs or the
projects (built by an earlier version of this script) is rebuilt and reinstalled.

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
import zipfile
from pathlib import Path

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
WHEEL_NAME = "detectron2-0.6-py3-none-any.whl"

# Subpackages upstream's setup.py maps from the sdist's projects/ folder into detectron2.projects.
PROJECTS = {
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}
# Files whose presence tells a complete wheel/install from one built by an earlier version.
COMPLETENESS_MARKERS = (
    "detectron2/model_zoo/configs/Base-RCNN-FPN.yaml",
    "detectron2/projects/point_rend/__init__.py",
)

# What detectron2 0.6 imports at run time, minus what only its optional tools use (black:
# LazyConfig.to_py formatting, pinned in requirements.lock; pydot, future: caffe2 export, gone
# from PyTorch). hydra-core (LazyConfig.apply_overrides) is pinned with omegaconf there too.
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
    "hydra-core>=1.1",
]

SETUP_PY = """\
from setuptools import find_packages, setup

PROJECTS = {projects!r}

setup(
    name="detectron2",
    version="{version}",
    description="detectron2 {version} Python sources (from the {sdist} sdist), without C++ ops",
    packages=find_packages(include=["detectron2", "detectron2.*"]) + list(PROJECTS),
    package_dir=PROJECTS,
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
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
    """Build ``detectron2-0.6-py3-none-any.whl`` from the sdist's ``detectron2/`` sources,
    its model-zoo configs and its ``projects/`` packages."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        root = f"{SDIST_NAME}-{SDIST_VERSION}/"
        wanted = ("detectron2/",) + tuple(d + "/" for d in PROJECTS.values())
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name[len(root) :].startswith(wanted)]
            for m in members:
                m.name = m.name[len(root) :]
            tar.extractall(src, members=members, filter="data")
        projects = {k: v for k, v in PROJECTS.items() if (src / v).is_dir()}
        (src / "setup.py").write_text(
            SETUP_PY.format(
                version=SDIST_VERSION,
                sdist=SDIST_NAME,
                requires=RUNTIME_REQUIRES,
                projects=projects,
            )
        )
        if wheel_dir.joinpath(WHEEL_NAME).exists():
            wheel_dir.joinpath(WHEEL_NAME).unlink()
        _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(src))
    wheel = wheel_dir / WHEEL_NAME
    if not wheel.exists():
        raise RuntimeError(f"building detectron2 did not produce {wheel}")
    return wheel


def wheel_is_complete(wheel: Path) -> bool:
    """Whether a cached wheel has the model-zoo configs and the projects."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    return all(m in names for m in COMPLETENESS_MARKERS)


def installed_is_complete() -> bool:
    """Whether the importable detectron2 has the model-zoo configs and the projects."""
    spec = importlib.util.find_spec("detectron2")
    site = Path(next(iter(spec.submodule_search_locations))).parent
    return all((site / m).is_file() for m in COMPLETENESS_MARKERS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=".cache", help="folder for the sdist and the wheel")
    parser.add_argument("--constraint", help="pip constraints file for the dependencies")
    args = parser.parse_args(argv)

    reinstall = False
    if importlib.util.find_spec("detectron2") is not None:
        has_c = importlib.util.find_spec("detectron2._C") is not None
        if has_c or installed_is_complete():
            print(
                f"detectron2 already installed ({'with' if has_c else 'without'} C++ ops); "
                "leaving it untouched."
            )
            return 0
        print("installed detectron2 lacks the model-zoo configs or projects; reinstalling.")
        reinstall = True
    cache = Path(args.cache)
    wheel = cache / "wheels" / WHEEL_NAME
    if not wheel.exists() or not wheel_is_complete(wheel):
        wheel = build_wheel(download_sdist(cache / "sdist"), cache / "wheels")
    extra = ["-c", args.constraint] if args.constraint else []
    if reinstall:
        extra += ["--force-reinstall", "--no-deps"]
    _pip("install", *extra, str(wheel))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    sys.exit(main())
