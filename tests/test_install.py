"""The pure-Python detectron2 install: sha256 pinning and the wheel it builds."""

import importlib.metadata
import io
import tarfile
import zipfile

import pytest

from lvis_longtail.tools import install_detectron2 as inst


def test_installed_detectron2_is_0_6():
    assert importlib.metadata.version("detectron2") == "0.6"


def test_sdist_with_wrong_hash_is_rejected_and_removed(tmp_path):
    fake = tmp_path / f"{inst.SDIST_NAME}-{inst.SDIST_VERSION}.tar.gz"
    fake.write_bytes(b"not the sdist")
    with pytest.raises(RuntimeError, match="does not match the pinned"):
        inst.download_sdist(tmp_path)
    assert not fake.exists()


def test_builds_pure_python_wheel_named_detectron2(tmp_path):
    sdist = tmp_path / "fake.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for rel, text in {
            "detectron2/__init__.py": "__version__ = '0.6'\n",
            "detectron2/layers/__init__.py": "",
            "setup.py": "raise SystemExit('the sdist setup.py must not run')\n",
        }.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{inst.SDIST_NAME}-{inst.SDIST_VERSION}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    wheel = inst.build_wheel(sdist, tmp_path / "wheels")
    assert wheel.name == "detectron2-0.6-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert "detectron2/__init__.py" in names and "detectron2/layers/__init__.py" in names
    metadata = zipfile.ZipFile(wheel).read("detectron2-0.6.dist-info/METADATA").decode()
    assert "Name: detectron2" in metadata and "Requires-Dist: fvcore" in metadata
