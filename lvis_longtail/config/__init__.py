"""The config keys lvis_longtail adds to detectron2's, with their defaults.

Defaults only, one comment above every key, grouped by node in detectron2's order:
``DATASETS``, ``DATALOADER``, ``INPUT`` (:mod:`.data`); ``MODEL`` up to ``ROI_HEADS``
(:mod:`.model`); the ROI heads' components (:mod:`.roi_heads`); ``SOLVER``, ``TEST`` and the
top-level keys (:mod:`.runtime`). Selectors live on the node that owns the component
(``MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME``), each method's parameters in a sub-node
(``MODEL.ROI_BOX_HEAD.SEESAW.P``); a ``*_NAME`` key names a registry entry, a ``*_TYPE`` key
is one of a fixed set of values.

This package is the lowest layer of lvis_longtail: it imports no other module of it. Valid
values, registry names, renamed keys and cross-key rules are checked by
:mod:`lvis_longtail.config_check`; a config is loaded by
:func:`lvis_longtail.engine.setup_cfg`; ``docs/config_keys.md`` is generated from this
package by ``python -m lvis_longtail.tools.config_reference``.
"""

from detectron2.config import CfgNode as CN

from .data import add_data_config
from .model import add_model_config
from .roi_heads import add_roi_heads_config
from .runtime import add_runtime_config

__all__ = ["ConfigError", "NODE_GROUPS", "add_longtail_config"]

# The functions that add the keys, in the order of the nodes (docs/config_keys.md follows it).
NODE_GROUPS = (add_data_config, add_model_config, add_roi_heads_config, add_runtime_config)


class ConfigError(ValueError):
    """A config file or option names an unknown key or has a malformed value."""


def add_longtail_config(cfg: CN) -> CN:
    """Add lvis_longtail's keys, with their defaults, to a detectron2 config in place."""
    for add in NODE_GROUPS:
        add(cfg)
    return cfg
