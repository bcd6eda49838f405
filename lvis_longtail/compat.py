"""Run-time compatibility layer between detectron2 0.6 and today's packages.

:func:`apply` is called when :mod:`lvis_longtail` is imported. Import ``lvis_longtail`` before
``detectron2.data``, ``detectron2.engine`` or ``detectron2.layers``: with detectron2 0.6 and
Pillow >= 10 those fail at import time otherwise (``train_net.py`` and the tests do so).
Every shim checks whether it is needed and does nothing otherwise, so a
complete or newer detectron2 build is used untouched. Each shim states the break it fixes;
``tests/test_compat.py`` proves each one.
"""

import functools
import importlib.abc
import importlib.util
import random
import sys
import types
import warnings

import numpy as np

_APPLIED = False

# Functions of ``detectron2._C`` that report build information (``collect_env_info``); the
# stub answers them instead of failing, so ``default_setup`` can log the environment.
_C_INFO = {
    "get_compiler_version": lambda: "not built (pure-Python detectron2)",
    "get_cuda_version": lambda: "not built (pure-Python detectron2)",
    "has_cuda": lambda: False,
}


class MissingCOpsModule(types.ModuleType):
    """Stands in for ``detectron2._C`` when detectron2 was installed without its C++ ops.

    Importing succeeds (``detectron2.layers`` and ``detectron2.evaluation`` import ``_C`` at
    module import time); calling any op raises a ``RuntimeError`` that names it.
    """

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in _C_INFO:
            return _C_INFO[name]
        raise RuntimeError(
            f"detectron2._C.{name} is unavailable: this detectron2 was installed without its "
            "C++ ops (rotated boxes, deformable convolution, ROIAlignRotated, the fast COCO "
            "evaluator). Build detectron2 from source to use them; Mask R-CNN and everything "
            "in lvis_longtail run without them."
        )


def _stub_missing_c_ops() -> None:
    """detectron2 0.6 from the PyPI sdist has no compiled ``detectron2._C``."""
    if "detectron2._C" in sys.modules or importlib.util.find_spec("detectron2") is None:
        return
    if importlib.util.find_spec("detectron2._C") is not None:
        return
    import detectron2

    stub = MissingCOpsModule("detectron2._C")
    sys.modules["detectron2._C"] = stub
    detectron2._C = stub


def _pillow_linear() -> None:
    """Pillow 10 removed ``Image.LINEAR``, a default argument in d2's ``transform.py``."""
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


class _NumpyWithFloat(types.ModuleType):
    """numpy, plus the ``np.float`` and ``np.int`` aliases removed in NumPy 1.24 (lvis-api
    0.5.3 and detectron2 0.6 use them)."""

    float = float
    int = int

    def __getattr__(self, name):
        return getattr(np, name)


def _lvis_numpy_float() -> None:
    """lvis-api 0.5.3 ``eval.py`` calls ``astype(np.float)``; scoped to that module only."""
    if hasattr(np, "float") or importlib.util.find_spec("lvis") is None:
        return
    import lvis.eval

    if not isinstance(lvis.eval.np, _NumpyWithFloat):
        lvis.eval.np = _NumpyWithFloat("numpy")


def _map_dataset_retry() -> None:
    """``MapDataset.__getitem__`` retries with ``random.sample(<set>)``: TypeError on 3.11+."""
    from detectron2.data import common

    def __getitem__(self, idx):
        retry_count = 0
        cur_idx = int(idx)
        while True:
            data = self._map_func(self._dataset[cur_idx])
            if data is not None:
                self._fallback_candidates.add(cur_idx)
                return data
            retry_count += 1
            self._fallback_candidates.discard(cur_idx)
            if not self._fallback_candidates:
                raise RuntimeError("the dataset mapper returned None for every sample")
            cur_idx = self._rng.choice(sorted(self._fallback_candidates))
            if retry_count >= 3:
                common.logging.getLogger(common.__name__).warning(
                    f"Failed to apply `_map_func` for idx: {idx}, retry count: {retry_count}"
                )

    try:
        random.sample({0}, k=1)
    except TypeError:
        common.MapDataset.__getitem__ = __getitem__


def _detectron2_numpy_int() -> None:
    """NumPy 2 removed ``np.int``: d2's ``print_instances_class_histogram`` (``data/build.py``)
    and ``SemSegEvaluator`` use it, and the histogram's error is swallowed by its caller, so the
    per-category instance table never printed. Scoped to those two modules."""
    if hasattr(np, "int") or importlib.util.find_spec("detectron2") is None:
        return
    from detectron2.data import build
    from detectron2.evaluation import sem_seg_evaluation

    for module in (build, sem_seg_evaluation):
        if not isinstance(module.np, _NumpyWithFloat):
            module.np = _NumpyWithFloat("numpy")


class _MissingCaffe2:
    """Any name reached through the ``caffe2`` stub: attribute access works (d2's export code
    uses caffe2 types in annotations), calling raises an error naming the missing name."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _MissingCaffe2(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"{self._name} is unavailable: caffe2 is not part of PyTorch >= 1.10, so "
            "detectron2.export's caffe2/ONNX-via-caffe2 path (Caffe2Tracer.export_caffe2, "
            "Caffe2Model) cannot run. TorchScript export (scripting_with_instances, "
            "TracingAdapter, Caffe2Tracer.export_torchscript) works."
        )

    def __repr__(self):
        return f"<missing caffe2 name {self._name}>"


class MissingCaffe2Module(types.ModuleType):
    """Stands in for ``caffe2`` and its submodules (``caffe2.proto.caffe2_pb2``,
    ``caffe2.python.core``, ...), which ``detectron2.export`` imports at module level."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _MissingCaffe2(f"{self.__name__}.{name}")


class _Caffe2StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves :class:`MissingCaffe2Module` for ``caffe2`` and every ``caffe2.*`` import."""

    def find_spec(self, name, path=None, target=None):
        if name == "caffe2" or name.startswith("caffe2."):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = MissingCaffe2Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _stub_caffe2() -> None:
    """``detectron2.export`` imports caffe2 (removed from PyTorch) at module level, so even its
    TorchScript export could not be imported."""
    if importlib.util.find_spec("caffe2") is not None:
        return
    if not any(isinstance(f, _Caffe2StubFinder) for f in sys.meta_path):
        sys.meta_path.append(_Caffe2StubFinder())


def _ddp_on_cpu() -> None:
    """``create_ddp_model`` passes ``device_ids=[local_rank]``, which DDP rejects on CPU."""
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    if getattr(original, "_lvis_longtail_cpu", False):
        return

    @functools.wraps(original)
    def create_ddp_model(model, *, fp16_compression=False, **kwargs):
        if "device_ids" not in kwargs and next(model.parameters()).device.type == "cpu":
            kwargs["device_ids"] = None
        return original(model, fp16_compression=fp16_compression, **kwargs)

    create_ddp_model._lvis_longtail_cpu = True
    defaults.create_ddp_model = create_ddp_model


def _lr_scheduler_checkpoint() -> None:
    """d2's ``LRScheduler`` hook only checkpoints ``_LRScheduler`` instances; torch 2.x
    schedulers derive from ``LRScheduler``, and would silently restart on resume."""
    import torch
    from detectron2.engine import hooks

    base = getattr(torch.optim.lr_scheduler, "LRScheduler", None)
    if base is None or getattr(hooks.LRScheduler, "_lvis_longtail_state", False):
        return

    def state_dict(self):
        return self.scheduler.state_dict() if isinstance(self.scheduler, base) else {}

    def load_state_dict(self, state_dict):
        if isinstance(self.scheduler, base):
            self.scheduler.load_state_dict(state_dict)

    hooks.LRScheduler.state_dict = state_dict
    hooks.LRScheduler.load_state_dict = load_state_dict
    hooks.LRScheduler._lvis_longtail_state = True


# --- Deformable convolution without detectron2._C; SyncBN on CPU (issue 15) --------------


def _deform_conv_via_torchvision() -> None:
    """d2's ``DeformConv``/``ModulatedDeformConv`` call ``_C`` ops (CPU: no backward at all).

    Only when ``_C`` is the :class:`MissingCOpsModule` stub: the module-level functions
    ``deform_conv`` and ``modulated_deform_conv`` of ``detectron2.layers.deform_conv``, which
    the two modules look up at call time, become :mod:`lvis_longtail.layers.deform_conv`'s
    (torchvision's ``deform_conv2d``: same offset/mask layout, autograd on CPU and GPU).
    ``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` etc. then work on a PyPI-only install.
    """
    if not isinstance(sys.modules.get("detectron2._C"), MissingCOpsModule):
        return
    from detectron2.layers import deform_conv as d2_deform_conv

    from lvis_longtail.layers import deform_conv as tv_deform_conv

    d2_deform_conv.deform_conv = tv_deform_conv.deform_conv
    d2_deform_conv.modulated_deform_conv = tv_deform_conv.modulated_deform_conv


class _TorchNNWithCPUSyncBN(types.ModuleType):
    """torch.nn, whose ``SyncBatchNorm`` is ``lvis_longtail.layers.LongTailSyncBatchNorm``."""

    def __getattr__(self, name):
        import torch.nn

        if name == "SyncBatchNorm":
            from lvis_longtail.layers.sync_bn import LongTailSyncBatchNorm

            return LongTailSyncBatchNorm
        return getattr(torch.nn, name)


def _sync_bn_on_cpu() -> None:
    """d2's ``get_norm("SyncBN")`` builds ``nn.SyncBatchNorm``, which raises on CPU tensors
    whenever a process group exists: CPU (gloo) training with SyncBN failed. Scoped to
    ``detectron2.layers.batch_norm``: its ``nn`` resolves ``SyncBatchNorm`` to a subclass
    that all-reduces the statistics itself on CPU (``nn.SyncBatchNorm`` on accelerators)."""
    from detectron2.layers import batch_norm

    if not isinstance(batch_norm.nn, _TorchNNWithCPUSyncBN):
        batch_norm.nn = _TorchNNWithCPUSyncBN("torch.nn")


# Deprecation warnings that importing detectron2 0.6 and fvcore triggers in today's packages,
# each silenced by its message and the module it is attributed to, so a command's first line
# of output is its own. Appended after any filter the user set (-W, PYTHONWARNINGS), which wins.
QUIET_WARNINGS = (
    # fvcore.nn.focal_loss scripts two functions at import; torch 2.x deprecates jit.script
    (FutureWarning, r"`torch\.jit\.script` is deprecated", r"torch\.jit\._script"),
    # detectron2.model_zoo imports pkg_resources (setuptools >= 67 warns at import)
    (UserWarning, r"pkg_resources is deprecated", r"detectron2\.model_zoo\.model_zoo"),
)


def _quiet_dependency_warnings() -> None:
    """Known deprecation warnings of detectron2 0.6's dependencies at import time."""
    for category, message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module,
                                append=True)  # fmt: skip


def apply() -> None:
    """Apply every needed shim once. Safe to call repeatedly."""
    global _APPLIED
    if _APPLIED:
        return
    _quiet_dependency_warnings()
    _stub_missing_c_ops()
    _pillow_linear()
    _lvis_numpy_float()
    _detectron2_numpy_int()
    _stub_caffe2()
    _map_dataset_retry()
    _ddp_on_cpu()
    _lr_scheduler_checkpoint()
    _deform_conv_via_torchvision()
    _sync_bn_on_cpu()
    _APPLIED = True
