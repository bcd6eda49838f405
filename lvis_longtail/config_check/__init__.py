"""The one validation pass over a config, run by ``setup_cfg`` before any model or data is built.

It owns, each with a message that names the key and what would be valid: :data:`ENUMS`
(every key whose value is one of a fixed set, lvis_longtail's and the detectron2 keys it
depends on, each set declared once: code that dispatches on such a value imports it from
here); :data:`REGISTRY_KEYS` (every key naming registry entries, each name of
``INPUT.AUGMENTATIONS`` included); :data:`RENAMED` (an old key in a file or option is rejected
with "X was renamed to Y"), all three in :mod:`.tables`; the cross-key rules of :data:`RULES`
(:mod:`.rules`); and the datasets of ``DATASETS.TRAIN``/``TEST``/``EXTRA_TRAIN`` (registered;
with ``check_files``, as ``train_net.py`` asks, their json files exist, and so does a local
``MODEL.WEIGHTS`` file). Unknown keys get the closest known keys, and ``--flags`` placed
after ``KEY VALUE`` options are named. Extending it: add a key to :data:`ENUMS` or
:data:`REGISTRY_KEYS`, or decorate a ``fn(cfg) -> Optional[str]`` with :func:`rule`.

Layering: of lvis_longtail, this package imports only :mod:`lvis_longtail.config` and
:mod:`lvis_longtail.registries`, never ``data``, ``modeling`` or ``evaluation`` (which import
it). Registries are read when a config is checked (``import lvis_longtail`` fills them).
"""

import difflib
import os
from typing import Iterable, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from lvis_longtail.config import ConfigError
from lvis_longtail.config_check import rules
from lvis_longtail.config_check.rules import RULES, check_task_evaluator, get_key, rule
from lvis_longtail.config_check.tables import (
    COUNT_SOURCES,
    ENUMS,
    IGNORE_METRICS,
    LVIS_TASKS,
    NMS_TYPES,
    POOLER_TYPES,
    REGISTRY_KEYS,
    RENAMED,
)

__all__ = [
    "COUNT_SOURCES",
    "ConfigError",
    "ENUMS",
    "IGNORE_METRICS",
    "LVIS_TASKS",
    "NMS_TYPES",
    "POOLER_TYPES",
    "REGISTRY_KEYS",
    "RENAMED",
    "RULES",
    "check_config",
    "check_task_evaluator",
    "has_last_checkpoint",
    "rule",
]

SYNTHETIC_HINT = (
    "generate it with `python -m lvis_longtail.data.synthetic --out DIR` (or `make data`); "
    "datasets are found under $DETECTRON2_DATASETS (default ./datasets)"
)


def all_keys(cfg, prefix: str = "") -> List[str]:
    """Every leaf key of ``cfg`` (a config or a nested dict), dotted."""
    out = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        out.extend(all_keys(v, full + ".") if isinstance(v, dict) else [full])
    return out


def closest(word: str, candidates: Iterable[str], n: int = 3) -> List[str]:
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)


def renamed_error(source: str, keys: Iterable[str]) -> Optional[ConfigError]:
    """A :class:`ConfigError` naming every renamed key among ``keys``, or None."""
    old = [k for k in keys if k in RENAMED]
    if not old:
        return None
    lines = [f"{k} was renamed to {RENAMED[k]}" for k in old]
    return ConfigError(f"{source}: " + "; ".join(lines))


def unknown_key_error(cfg, source: str, message: str, keys: Sequence[str] = ()) -> ConfigError:
    """yacs' "Non-existent (config) key: X" message, with the closest known keys, or, when
    X or another of ``keys`` (those ``source`` sets) was renamed, the new names."""
    key = message.rsplit(": ", 1)[-1].strip()
    renamed = renamed_error(source, list(dict.fromkeys([key, *keys])))
    if renamed is not None:
        return renamed
    known = all_keys(cfg)
    near = closest(key, known) or closest(key.rsplit(".", 1)[-1], known)
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    return ConfigError(f"{source}: {message}{hint}")


def check_opts(opts: List[str]) -> None:
    """``train_net.py --config-file F KEY VALUE --eval-only``: argparse hands every token
    after the first ``KEY`` to the config, flags included. Renamed keys are named too."""
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
    renamed = renamed_error("command-line options", opts[::2])
    if renamed is not None:
        raise renamed


def _check_enums(cfg, errors: List[str]) -> None:
    known = set(all_keys(cfg))
    for key, choices in ENUMS.items():
        if key not in known:
            continue
        value = get_key(cfg, key)
        if value not in choices:
            near = closest(str(value), [str(c) for c in choices], n=1)
            hint = f" (closest: {near[0]!r})" if near else ""
            errors.append(f"{key} is {value!r}; valid values: {list(choices)}{hint}")


def registered_names(key: str) -> List[str]:
    """The names ``key`` of :data:`REGISTRY_KEYS` accepts, sorted."""
    registry, extra = REGISTRY_KEYS[key]
    return sorted([name for name, _ in registry] + list(extra))


def _check_registries(cfg, errors: List[str]) -> None:
    known = set(all_keys(cfg))
    for key in REGISTRY_KEYS:
        if key not in known:
            continue
        value = get_key(cfg, key)
        names = registered_names(key)
        for i, name in enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]:
            if name in names:
                continue
            near = closest(str(name), names, n=1)
            hint = f"; closest: {near[0]!r}" if near else ""
            where = key if i is None else f"{key}[{i}]"
            errors.append(
                f"{where} is {name!r}, which is not registered{hint}; registered: {names}"
            )


def _missing_json(name: str, json_file: str) -> str:
    hint = f"; {SYNTHETIC_HINT}" if "synthetic" in f"{name} {json_file}" else ""
    return f"json file {json_file!r} not found (resolved: {os.path.abspath(json_file)}){hint}"


def _check_datasets(cfg, errors: List[str], check_files: bool, eval_only: bool) -> None:
    for i, entry in enumerate(cfg.DATASETS.LVIS_FORMAT):
        name, json_file = entry[0], entry[1]
        needed = name in cfg.DATASETS.TEST or not eval_only
        if check_files and needed and not os.path.isfile(json_file):
            errors.append(f"DATASETS.LVIS_FORMAT[{i}] ('{name}'): {_missing_json(name, json_file)}")
    listed = {e[0] for e in cfg.DATASETS.LVIS_FORMAT}
    # metadata-only registrations (class statistics for a model, no data) count too
    registered = sorted(set(DatasetCatalog.list()) | set(MetadataCatalog.list()))
    for key in ("DATASETS.TRAIN", "DATASETS.TEST", "DATASETS.EXTRA_TRAIN"):
        for name in get_key(cfg, key):
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
                errors.append(f"{key}: dataset '{name}' {_missing_json(name, json_file)}")


def has_last_checkpoint(output_dir: str) -> bool:
    """Whether ``--resume`` finds a checkpoint pointer (``last_checkpoint``, detectron2's
    name) in ``output_dir``; a remote folder (``scheme://``) is assumed to have one."""
    return "://" in output_dir or os.path.isfile(os.path.join(output_dir, "last_checkpoint"))


def _check_weights(cfg, errors: List[str], check_files: bool, resume: bool) -> None:
    """A local ``MODEL.WEIGHTS`` file exists (a ``scheme://`` one, such as detectron2's
    ``detectron2://`` model catalog or a URL, is fetched when loaded); unless ``--resume``
    loads ``OUTPUT_DIR``'s last checkpoint instead."""
    weights = cfg.MODEL.WEIGHTS
    if not check_files or not weights or "://" in weights:
        return
    if (resume and has_last_checkpoint(cfg.OUTPUT_DIR)) or os.path.isfile(weights):
        return
    errors.append(
        f"MODEL.WEIGHTS: checkpoint file {weights!r} not found "
        f"(resolved: {os.path.abspath(weights)})"
    )


def check_config(
    cfg, *, check_files: bool = False, eval_only: bool = False, resume: bool = False
) -> None:
    """Check ``cfg`` (see the module docstring); all problems are reported at once.

    Args:
        check_files: also require the json files of ``DATASETS.LVIS_FORMAT`` and of the
            registered ``DATASETS.TRAIN`` / ``TEST`` / ``EXTRA_TRAIN`` sets (loading a config
            needs no data), and a local ``MODEL.WEIGHTS`` file.
        eval_only: with ``check_files``, only the test sets' files.
        resume: with ``check_files``, ``MODEL.WEIGHTS`` need not exist when ``OUTPUT_DIR``
            has a ``last_checkpoint`` (``--resume`` loads that instead).

    Raises:
        ConfigError: one line per problem.
    """
    errors: List[str] = []
    _check_enums(cfg, errors)
    _check_registries(cfg, errors)
    _check_datasets(cfg, errors, check_files, eval_only)
    _check_weights(cfg, errors, check_files, resume)
    errors.extend(msg for msg in (r(cfg) for r in rules.RULES) if msg)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
