"""Loading a config: defaults, lvis_longtail's keys, a file and options, checked and frozen."""

import os
import re
from typing import Callable, List, Optional

import yaml
from detectron2.config import CfgNode, get_cfg

from lvis_longtail.config import ConfigError, add_longtail_config
from lvis_longtail.config_check import (
    all_keys,
    check_config,
    check_opts,
    get_key,
    has_last_checkpoint,
    unknown_key_error,
)
from lvis_longtail.data import register_from_config
from lvis_longtail.data.ignore_boxes import register_ignore_boxes_from_config

__all__ = ["setup_cfg"]

OPTIONS = "command-line options"
# yacs: "Type mismatch (<class 'int'> vs. <class 'str'>) with values (...) for config key: K"
_MISMATCH = re.compile(r"^Type mismatch .* for config key: (\S+)\s*$", re.S)
_MAX_BASE_DEPTH = 16
_TYPE_NAMES = {bool: "True or False", int: "an integer", float: "a float", str: "a string"}


def setup_cfg(
    config_file: str,
    opts=(),
    *,
    check_files: bool = False,
    eval_only: bool = False,
    resume: bool = False,
) -> CfgNode:
    """Load a config: detectron2 defaults + lvis_longtail keys + ``config_file`` + ``opts``.

    Also registers the datasets listed in ``DATASETS.LVIS_FORMAT`` and the ignore boxes of
    ``DATASETS.IGNORE_BOXES``, then checks the whole config
    (:func:`lvis_longtail.config_check.check_config`: enum values, registry names, value
    ranges, dataset and weight files, cross-key rules) before any model is built or data
    loaded. With ``check_files`` (``train_net.py``) the registered datasets' json files and a
    local ``MODEL.WEIGHTS`` file must exist too, except, with ``eval_only``, the training
    sets', and, with ``resume`` and a ``last_checkpoint`` in ``OUTPUT_DIR``, the weights.
    ``eval_only`` needs ``MODEL.WEIGHTS`` (or ``resume`` and a ``last_checkpoint``): a
    randomly initialised model is not evaluated. Returns a frozen config.

    Raises:
        ConfigError: a missing, empty or malformed config file (or ``_BASE_``), an unknown
            key (with the closest known keys), a renamed key (with its new name), a value of
            the wrong type (with the key and the type expected), a flag placed among the
            ``KEY VALUE`` options, or a value :func:`check_config` rejects.
    """
    cfg = get_cfg()
    add_longtail_config(cfg)
    opts = list(opts)
    check_opts(opts)
    if "://" not in config_file:
        _check_yaml_file(config_file)
    # yacs reports an unknown key as a KeyError (file) or a bare AssertionError (opts), a
    # value of the wrong type as a ValueError that prints the whole node.
    try:
        cfg.merge_from_file(config_file)
    except KeyError as e:
        keys = all_keys(CfgNode.load_yaml_with_base(config_file, allow_unsafe=True))
        raise unknown_key_error(cfg, config_file, e.args[0], keys) from None
    except ValueError as e:
        loaded = CfgNode.load_yaml_with_base(config_file, allow_unsafe=True)
        source = _setting_file(config_file, _mismatched_key(e)) or config_file
        if source != config_file:
            source = f"{source} (a _BASE_ of {config_file})"
        raise _type_error(cfg, source, e, lambda key: _lookup(loaded, key)) from None
    except AssertionError as e:  # e.g. "Cannot inherit key 'X' from base!"
        raise ConfigError(f"{config_file}: {e}") from None
    try:
        cfg.merge_from_list(opts)
    except (AssertionError, KeyError) as e:
        raise unknown_key_error(cfg, OPTIONS, e.args[0]) from None
    except ValueError as e:
        raise _type_error(cfg, OPTIONS, e, lambda key: _option_value(opts, key)) from None
    if eval_only:
        _check_eval_weights(cfg, config_file, opts, resume)
    register_from_config(cfg)
    register_ignore_boxes_from_config(cfg)
    check_config(cfg, check_files=check_files, eval_only=eval_only, resume=resume)
    cfg.freeze()
    return cfg


def _check_eval_weights(cfg, config_file: str, opts: List[str], resume: bool) -> None:
    """``--eval-only`` with an empty ``MODEL.WEIGHTS`` would evaluate a random model."""
    if cfg.MODEL.WEIGHTS or (resume and has_last_checkpoint(cfg.OUTPUT_DIR)):
        return
    origin = f"the {OPTIONS}" if "MODEL.WEIGHTS" in opts[::2] else config_file
    if resume:
        also = f"; --resume found no last_checkpoint in OUTPUT_DIR {cfg.OUTPUT_DIR!r}"
    else:
        also = " (or add --resume to evaluate OUTPUT_DIR's last checkpoint)"
    raise ConfigError(
        f"--eval-only needs MODEL.WEIGHTS (the checkpoint to evaluate); it is '' in {origin}: "
        f"add MODEL.WEIGHTS path/to/model_final.pth{also}"
    )


def _check_yaml_file(path: str, included_by: Optional[str] = None, depth: int = 0) -> None:
    """A config file and its ``_BASE_`` files exist and each holds a mapping of keys."""
    where = f" (the _BASE_ of {included_by})" if included_by else ""
    if not os.path.isfile(path):
        what = "_BASE_ file" if included_by else "config file (--config-file)"
        raise ConfigError(f"{path}: {what} not found{where}")
    if depth > _MAX_BASE_DEPTH:
        raise ConfigError(f"{path}: _BASE_ files nested over {_MAX_BASE_DEPTH} deep (a cycle?)")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.constructor.ConstructorError:
        return  # Python tags: detectron2 loads such a file with yaml.unsafe_load
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        reason = " ".join(str(e).split())
        raise ConfigError(f"{path}{where}: not a valid YAML file: {reason}") from None
    if data is None:
        raise ConfigError(f"{path}{where}: empty config file")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}{where}: a config file is a mapping of KEY: value at its top level, "
            f"not a {type(data).__name__}"
        )
    for base in _base_names(data):
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: _BASE_ must name a file (or list files), got {base!r}")
    for base in _bases(path, data):
        if "://" not in base:
            _check_yaml_file(base, path, depth + 1)


def _base_names(data: dict) -> list:
    """The ``_BASE_`` entries of a loaded config file (one, a list, or none)."""
    bases = data.get("_BASE_")
    return bases if isinstance(bases, list) else [] if bases is None else [bases]


def _bases(path: str, data: dict) -> List[str]:
    """The paths of a config file's ``_BASE_`` files (relative to its folder)."""
    return [os.path.join(os.path.dirname(path), os.path.expanduser(b)) for b in _base_names(data)]


def _setting_file(path: str, key: Optional[str], depth: int = 0) -> Optional[str]:
    """The file of ``path``'s ``_BASE_`` chain whose value of ``key`` is the one merged."""
    if key is None or depth > _MAX_BASE_DEPTH or "://" in path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    if _lookup(data, key) is not None:
        return path
    for base in reversed(_bases(path, data)):  # a later base overrides an earlier one
        found = _setting_file(base, key, depth + 1)
        if found:
            return found
    return None


def _mismatched_key(error: ValueError) -> Optional[str]:
    match = _MISMATCH.match(str(error))
    return match.group(1) if match else None


def _lookup(loaded: dict, key: str):
    """The value of dotted ``key`` in a loaded YAML mapping, or None."""
    node = loaded
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _option_value(opts: List[str], key: str):
    """The last value given to ``key`` among the ``KEY VALUE`` options, or None."""
    values = [v for k, v in zip(opts[::2], opts[1::2]) if k == key]
    return CfgNode._decode_cfg_value(values[-1]) if values else None  # as yacs reads it


def _type_error(cfg, source: str, error: ValueError, value_of: Callable) -> ConfigError:
    """yacs' type mismatch, short: the key, the type expected with the default as an example,
    and the value given (not yacs' dump of the whole node)."""
    key = _mismatched_key(error)
    if key is None:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return ConfigError(f"{source}: {lines[0][:300]}")
    try:
        default = get_key(cfg, key)
    except KeyError:
        return ConfigError(f"{source}: {key} has a value of the wrong type")
    value = value_of(key)
    got = "" if value is None else f", got {value!r}"
    if isinstance(default, CfgNode):
        sub = next(iter(default), "KEY")
        return ConfigError(
            f"{source}: {key} is a section of keys (like {key}.{sub}), not a value{got}"
        )
    if isinstance(default, (tuple, list)):
        hint = f"; write [{value}] for a list of one" if isinstance(value, str) else ""
        like = f" (like {list(default)})" if len(default) else ""
        return ConfigError(f"{source}: {key} must be a list{like}{got}{hint}")
    expected = _TYPE_NAMES.get(type(default), type(default).__name__)
    hint = f"; write {value}.0" if isinstance(default, float) and isinstance(value, int) else ""
    return ConfigError(f"{source}: {key} must be {expected} (like {default!r}){got}{hint}")
