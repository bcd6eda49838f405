"""Each shim of lvis_longtail.compat, proven against the break it fixes."""

import numpy as np
import pytest
import torch
from conftest import REPO

import lvis_longtail  # noqa: F401
from lvis_longtail import compat


def test_missing_c_ops_import_but_fail_clearly_when_called():
    from detectron2 import _C

    if not isinstance(_C, compat.MissingCOpsModule):
        pytest.fail("this environment is expected to run the pure-Python detectron2 build")
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated  # imports _C at import

    boxes = torch.tensor([[10.0, 10.0, 4.0, 4.0, 0.0]])
    with pytest.raises(RuntimeError, match=r"box_iou_rotated is unavailable.*C\+\+ ops"):
        pairwise_iou_rotated(boxes, boxes)


def test_collect_env_info_runs_without_c_ops():
    from detectron2.utils.collect_env import collect_env_info

    info = collect_env_info()
    assert "detectron2" in info and "not built (pure-Python detectron2)" in info


def test_pillow_linear_alias_lets_transforms_import():
    from detectron2.data.transforms import ExtentTransform
    from PIL import Image

    assert Image.LINEAR == Image.BILINEAR
    assert ExtentTransform((0, 0, 4, 4), (2, 2)).interp == Image.BILINEAR


def test_numpy_float_alias_is_scoped_to_lvis_eval():
    import lvis.eval

    assert lvis.eval.np.float is float
    assert lvis.eval.np.cumsum is np.cumsum
    assert not hasattr(np, "float"), "numpy itself must stay unpatched"


def test_map_dataset_retries_when_mapper_returns_none():
    from detectron2.data.common import MapDataset

    ds = MapDataset(list(range(5)), lambda x: None if x == 0 else x * 10)
    assert ds[0] in {10, 20, 30, 40}  # TypeError on Python >= 3.11 without the shim


def test_map_dataset_fails_clearly_when_every_sample_is_none():
    from detectron2.data.common import MapDataset

    ds = MapDataset([1, 2], lambda x: None)
    with pytest.raises(RuntimeError, match="returned None for every sample"):
        ds[0]


def test_lr_scheduler_hook_checkpoints_torch2_schedulers():
    from detectron2.engine.hooks import LRScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        opt.step()
        sched.step()
    hook = LRScheduler(opt, sched)
    state = hook.state_dict()
    assert state["last_epoch"] == 3
    fresh_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    fresh = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
    LRScheduler(fresh_opt, fresh).load_state_dict(state)
    assert fresh.last_epoch == 3


def test_create_ddp_model_is_identity_in_one_process():
    from detectron2.engine.defaults import create_ddp_model

    model = torch.nn.Linear(2, 2)
    assert create_ddp_model(model, broadcast_buffers=False) is model


def test_apply_is_idempotent():
    from detectron2.engine import defaults

    before = defaults.create_ddp_model
    compat._APPLIED = False
    compat.apply()
    assert defaults.create_ddp_model is before


def test_numpy_int_alias_lets_the_instance_histogram_print(monkeypatch):
    from detectron2.data import build

    assert not hasattr(np, "int"), "numpy itself must stay unpatched"
    printed = []
    monkeypatch.setattr(build, "log_first_n", lambda lvl, msg, **kw: printed.append(msg))
    dicts = [{"annotations": [{"category_id": 0}, {"category_id": 1}, {"category_id": 1}]}]
    build.print_instances_class_histogram(dicts, ["cat", "dog"])
    assert "Distribution of instances among all 2 categories" in printed[0]
    assert "total" in printed[0] and "3" in printed[0]


def test_detectron2_export_imports_and_caffe2_use_fails_clearly():
    import detectron2.export as export
    from detectron2.export.api import caffe2_pb2

    assert callable(export.TracingAdapter) and callable(export.scripting_with_instances)
    with pytest.raises(RuntimeError, match=r"caffe2\.proto\.caffe2_pb2\.NetDef is unavailable"):
        caffe2_pb2.NetDef()


def test_torchscript_export_of_a_detectron2_module_works():
    from detectron2.export import TracingAdapter

    model = torch.nn.Conv2d(3, 2, 1)
    adapter = TracingAdapter(model, torch.zeros(1, 3, 4, 4))
    traced = torch.jit.trace(adapter, adapter.flattened_inputs)
    x = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(traced(x)[0], model(x))


def test_model_zoo_configs_and_projects_are_installed():
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.projects import point_rend

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    cfg = get_cfg()
    cfg.merge_from_file(path)
    assert cfg.MODEL.MASK_ON and cfg.MODEL.RESNETS.DEPTH == 50
    point_rend.add_pointrend_config(cfg)
    assert "POINT_HEAD" in cfg.MODEL


def test_lazy_config_overrides_use_hydra():
    from detectron2 import model_zoo
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(model_zoo.get_config_file("common/optim.py"))
    cfg = LazyConfig.apply_overrides(cfg, ["SGD.lr=0.5", "SGD.momentum=0.8"])
    assert cfg.SGD.lr == 0.5 and cfg.SGD.momentum == 0.8


@pytest.mark.slow
def test_dependency_import_warnings_are_silenced_precisely():
    """Importing the package and detectron2's model zoo prints no dependency warning; the same
    messages attributed to another module, or another FutureWarning, still show."""
    import os
    import subprocess
    import sys

    code = (
        "import warnings, lvis_longtail\n"
        "from detectron2 import model_zoo\n"
        "import detectron2.engine, detectron2.modeling\n"
        "warnings.warn_explicit('`torch.jit.script` is deprecated. x', FutureWarning, 'u.py', 1,"
        " module='user_module')\n"
        "warnings.warn('pkg_resources is deprecated as an API', UserWarning)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "Warning" in ln]
    assert len(lines) == 2, out.stderr  # only the two raised by the snippet itself
    assert lines[0].startswith("u.py:1: FutureWarning") and "<string>" in lines[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [["train_net.py"], ["-m", "lvis_longtail.tools.evaluate_results"],
     ["-m", "lvis_longtail.tools.pseudo_label"]],
    ids=["train_net", "evaluate_results", "pseudo_label"],
)  # fmt: skip
def test_a_commands_first_line_is_its_own(command):
    """``--help`` of the training script and of the tools prints their usage first, and no
    dependency warning at all."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True,
                         env=env, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout.startswith("usage: "), out.stdout[:200]
