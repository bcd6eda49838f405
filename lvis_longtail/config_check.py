"""One validation pass over a config, run by ``setup_cfg`` before any model or data is built.

What is checked, each with a message that names the key and what would be valid:

- every enum key: lvis_longtail's (declared with ``_enum`` in :mod:`lvis_longtail.config`,
  recorded in ``ENUM_KEYS``) and the detectron2 keys of ``DETECTRON2_ENUM_KEYS``;
- every registry-named key of ``REGISTRY_KEYS`` (``MODEL.ROI_HEADS.NAME``, ``CLS_LOSS_NAME``,
  ...): the registered names and the closest one;
- ``DATASETS.TRAIN``/``TEST`` name registered datasets (with ``check_files``, as
  ``train_net.py`` asks: whose json files exist; training sets only when training), and every
  ``DATASETS.LVIS_FORMAT`` json exists;
- the cross-key rules of :data:`RULES` (e.g. cascade heads need class-agnostic box
  regression).

Unknown keys (from yacs) get the closest known keys, and ``--flags`` placed after ``KEY VALUE``
options are named. Extending it: declare an enum with ``_enum``, list a registry key in
``REGISTRY_KEYS``, or decorate a ``fn(cfg) -> Optional[str]`` with :func:`rule`.
"""

import difflib
import importlib
import os
from typing import Callable, Iterable, List, Optional

from lvis_longtail.config import DETECTRON2_ENUM_KEYS, ENUM_KEYS, REGISTRY_KEYS, ConfigError

RULES: List[Callable] = []
SYNTHETIC_HINT = (
    "generate it with `python -m lvis_longtail.data.synthetic --out DIR` (or `make data`); "
    "datasets are found under $DETECTRON2_DATASETS (default ./datasets)"
)


def rule(fn: Callable) -> Callable:
    """Register ``fn(cfg) -> error message or None`` as a cross-key rule."""
    RULES.append(fn)
    return fn


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _has(cfg, key: str) -> bool:
    try:
        _get(cfg, key)
    except KeyError:
        return False
    return True


def all_keys(cfg, prefix: str = "") -> List[str]:
    """Every leaf key of ``cfg``, dotted."""
    out = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        out.extend(all_keys(v, full + ".") if isinstance(v, dict) else [full])
    return out


def closest(word: str, candidates: Iterable[str], n: int = 3) -> List[str]:
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)


def unknown_key_error(cfg, source: str, message: str) -> ConfigError:
    """yacs' "Non-existent (config) key: X" message, with the closest known keys."""
    key = message.rsplit(": ", 1)[-1].strip()
    known = all_keys(cfg)
    near = closest(key, known) or closest(key.rsplit(".", 1)[-1], known)
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    return ConfigError(f"{source}: {message}{hint}")


def check_opts(opts: List[str]) -> None:
    """``train_net.py --config-file F KEY VALUE --eval-only``: argparse hands every token
    after the first ``KEY`` to the config, flags included."""
    flags = [o for o in opts if isinstance(o, str) and o.startswith("--") and o[2:3].isalpha()]
    if flags:
        raise ConfigError(
            f"command-line options: {', '.join(flags)} came after the KEY VALUE options, "
            "where every token is read as config; put flags first, e.g. "
            "`train_net.py --eval-only --config-file F KEY VALUE ...`"
        )
    if len(opts) % 2:
        raise ConfigError(
            f"command-line options must be KEY VALUE pairs, got {len(opts)} tokens: {opts}"
        )


def _registry_names(spec: str):
    module, attr = spec.split(":")
    registry = getattr(importlib.import_module(module), attr)
    return sorted(name for name, _ in registry)


def _check_enums(cfg, errors: List[str]) -> None:
    for key, choices in {**DETECTRON2_ENUM_KEYS, **ENUM_KEYS}.items():
        if not _has(cfg, key):
            continue
        value = _get(cfg, key)
        if value not in choices:
            near = closest(str(value), [str(c) for c in choices], n=1)
            hint = f" (closest: {near[0]!r})" if near else ""
            errors.append(f"{key} is {value!r}; valid values: {list(choices)}{hint}")


def _check_registries(cfg, errors: List[str]) -> None:
    for key, (spec, extra) in REGISTRY_KEYS.items():
        if not _has(cfg, key):
            continue
        value = _get(cfg, key)
        names = _registry_names(spec) + list(extra)
        if value not in names:
            near = closest(str(value), names, n=1)
            hint = f"; closest: {near[0]!r}" if near else ""
            errors.append(f"{key} is {value!r}, which is not registered{hint}; registered: {names}")


def _looks_synthetic(*parts: str) -> bool:
    return any("synthetic" in str(p) for p in parts)


def _check_datasets(cfg, errors: List[str], check_files: bool, eval_only: bool) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for i, entry in enumerate(cfg.DATASETS.LVIS_FORMAT):
        name, json_file = entry[0], entry[1]
        needed = name in _get(cfg, "DATASETS.TEST") or not eval_only
        if check_files and needed and not os.path.isfile(json_file):
            hint = f"; {SYNTHETIC_HINT}" if _looks_synthetic(name, json_file) else ""
            errors.append(
                f"DATASETS.LVIS_FORMAT[{i}] ('{name}'): json file {json_file!r} not found "
                f"(resolved: {os.path.abspath(json_file)}){hint}"
            )
    listed = {e[0] for e in cfg.DATASETS.LVIS_FORMAT}
    # metadata-only registrations (class statistics for a model, no data) count too
    registered = sorted(set(DatasetCatalog.list()) | set(MetadataCatalog.list()))
    for key in ("DATASETS.TRAIN", "DATASETS.TEST", "DATASETS.EXTRA_TRAIN"):
        for name in _get(cfg, key):
            if name not in registered:
                near = closest(name, registered, n=1)
                hint = f"; closest: '{near[0]}'" if near else ""
                errors.append(
                    f"{key}: dataset '{name}' is not registered{hint} (register your own "
                    "with DATASETS.LVIS_FORMAT [[name, json, image_root]])"
                )
                continue
            if not check_files or name in listed or (eval_only and key != "DATASETS.TEST"):
                continue
            json_file = MetadataCatalog.get(name).get("json_file")
            if json_file and not os.path.isfile(json_file):
                hint = f"; {SYNTHETIC_HINT}" if _looks_synthetic(name, json_file) else ""
                errors.append(
                    f"{key}: dataset '{name}' json file {json_file!r} not found "
                    f"(resolved: {os.path.abspath(json_file)}){hint}"
                )


@rule
def _cascade_needs_class_agnostic_boxes(cfg) -> Optional[str]:
    from detectron2.modeling import ROI_HEADS_REGISTRY
    from detectron2.modeling.roi_heads import CascadeROIHeads

    name = cfg.MODEL.ROI_HEADS.NAME
    heads = ROI_HEADS_REGISTRY._obj_map.get(name)  # an unknown name is reported by its own check
    is_cascade = heads is not None and issubclass(heads, CascadeROIHeads)
    if is_cascade and not cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG:
        return (
            f"MODEL.ROI_HEADS.NAME {cfg.MODEL.ROI_HEADS.NAME!r} regresses class-agnostic boxes "
            "at every stage: set MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True"
        )
    return None


@rule
def _extra_images_need_grouped_weighted_batches(cfg) -> Optional[str]:
    from detectron2.modeling import META_ARCH_REGISTRY

    from lvis_longtail.modeling.ignore_regions import LongTailRCNN

    if not cfg.DATASETS.EXTRA_TRAIN:
        return None
    if not (cfg.DATASETS.EXTRA_TRAIN_LOSS_WEIGHT > 0):
        return f"DATASETS.EXTRA_TRAIN_LOSS_WEIGHT must be > 0, got {cfg.DATASETS.EXTRA_TRAIN_LOSS_WEIGHT}"  # noqa: E501
    arch = META_ARCH_REGISTRY._obj_map.get(cfg.MODEL.META_ARCHITECTURE)
    if arch is None or not issubclass(arch, LongTailRCNN):
        return (
            "DATASETS.EXTRA_TRAIN needs MODEL.META_ARCHITECTURE 'LongTailRCNN' (it applies "
            f"DATASETS.EXTRA_TRAIN_LOSS_WEIGHT), got {cfg.MODEL.META_ARCHITECTURE!r}"
        )
    if not cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        return (
            "DATASETS.EXTRA_TRAIN needs DATALOADER.ASPECT_RATIO_GROUPING True (batches of one "
            "source, so each gets its loss weight)"
        )
    return None


@rule
def _checkpoint_keep_not_negative(cfg) -> Optional[str]:
    if cfg.SOLVER.CHECKPOINT_KEEP < 0:
        return (
            f"SOLVER.CHECKPOINT_KEEP must be >= 0 (0 keeps every checkpoint), got "
            f"{cfg.SOLVER.CHECKPOINT_KEEP}"
        )
    return None


@rule
def _lvis_tasks(cfg) -> Optional[str]:
    from lvis_longtail.evaluation.lvis_evaluation import TASKS, check_task_evaluator

    tasks = tuple(cfg.TEST.LVIS_TASKS)
    if not tasks or not set(tasks) <= set(TASKS):
        return f"TEST.LVIS_TASKS is {tasks}; it must be a non-empty subset of {TASKS}"
    if not cfg.TEST.BOUNDARY_DILATION_RATIO > 0:
        return f"TEST.BOUNDARY_DILATION_RATIO must be > 0, got {cfg.TEST.BOUNDARY_DILATION_RATIO}"
    boundary = "boundary" in tasks or cfg.TEST.EVAL_PROTOCOL == "challenge2021"
    try:
        check_task_evaluator("boundary" if boundary else "bbox", cfg.TEST.LVIS_EVALUATOR)
    except ValueError as e:
        return f"TEST.LVIS_TASKS / TEST.EVAL_PROTOCOL: {e}"
    return None


def check_config(cfg, *, check_files: bool = False, eval_only: bool = False) -> None:
    """Check ``cfg`` (see the module docstring); all problems are reported at once.

    Args:
        check_files: also require the json files of ``DATASETS.LVIS_FORMAT`` and of the
            registered ``DATASETS.TRAIN`` / ``TEST`` / ``EXTRA_TRAIN`` sets (loading a config
            needs no data).
        eval_only: with ``check_files``, only the test sets' files.

    Raises:
        ConfigError: one line per problem.
    """
    errors: List[str] = []
    _check_enums(cfg, errors)
    _check_registries(cfg, errors)
    _check_datasets(cfg, errors, check_files, eval_only)
    errors.extend(msg for msg in (r(cfg) for r in RULES) if msg)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
