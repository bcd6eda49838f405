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


@pytest.mark.slow
def test_builds_pure_python_wheel_named_detectron2(tmp_path):
    sdist = tmp_path / "fake.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for rel, text in {
            "detectron2/__init__.py": "__version__ = '0.6'\n",
            "detectron2/layers/__init__.py": "",
            "detectron2/model_zoo/__init__.py": "",
            "detectron2/model_zoo/configs/Base-RCNN-FPN.yaml": "MODEL: {}\n",
            "detectron2/model_zoo/configs/common/optim.py": "lr = 0.1\n",
            "detectron2/projects/__init__.py": "",
            "projects/PointRend/point_rend/__init__.py": "",
            "projects/DeepLab/deeplab/__init__.py": "",
            "projects/Panoptic-DeepLab/panoptic_deeplab/__init__.py": "",
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
    # package data and the projects, as upstream's setup.py installs them
    assert "detectron2/model_zoo/configs/Base-RCNN-FPN.yaml" in names
    assert "detectron2/model_zoo/configs/common/optim.py" in names
    for pkg in ("point_rend", "deeplab", "panoptic_deeplab"):
        assert f"detectron2/projects/{pkg}/__init__.py" in names
    assert inst.wheel_is_complete(wheel)
    metadata = zipfile.ZipFile(wheel).read("detectron2-0.6.dist-info/METADATA").decode()
    assert "Name: detectron2" in metadata and "Requires-Dist: fvcore" in metadata
    assert "Requires-Dist: hydra-core" in metadata


def test_incomplete_wheel_is_detected(tmp_path):
    old = tmp_path / inst.WHEEL_NAME
    with zipfile.ZipFile(old, "w") as zf:
        zf.writestr("detectron2/__init__.py", "")
    assert not inst.wheel_is_complete(old)
    assert inst.installed_is_complete()  # this environment's detectron2 is complete


def test_lock_pins_what_detectron2_lazyconfig_needs():
    lock = (inst.Path(__file__).resolve().parents[1] / "requirements.lock").read_text()
    for pin in ("hydra-core==1.3.8", "omegaconf==2.3.1", "antlr4-python3-runtime==4.9.3"):
        assert pin in lock.splitlines()
