"""Loading a config: defaults, lvis_longtail's keys, a file and options, checked and frozen."""

from detectron2.config import CfgNode, get_cfg

from lvis_longtail.config import add_longtail_config
from lvis_longtail.config_check import all_keys, check_config, check_opts, unknown_key_error
from lvis_longtail.data import register_from_config
from lvis_longtail.data.ignore_boxes import register_ignore_boxes_from_config

__all__ = ["setup_cfg"]


def setup_cfg(
    config_file: str, opts=(), *, check_files: bool = False, eval_only: bool = False
) -> CfgNode:
    """Load a config: detectron2 defaults + lvis_longtail keys + ``config_file`` + ``opts``.

    Also registers the datasets listed in ``DATASETS.LVIS_FORMAT`` and the ignore boxes of
    ``DATASETS.IGNORE_BOXES``, then checks the whole config
    (:func:`lvis_longtail.config_check.check_config`: enum values, registry names, dataset
    files, cross-key rules) before any model is built or data loaded. With ``check_files``
    (``train_net.py``) the registered datasets' json files must exist too, except, with
    ``eval_only``, the training sets'. Returns a frozen config.

    Raises:
        ConfigError: an unknown key (with the closest known keys), a renamed key (with its
            new name), a flag placed among the ``KEY VALUE`` options, or a value
            :func:`check_config` rejects.
    """
    cfg = get_cfg()
    add_longtail_config(cfg)
    opts = list(opts)
    check_opts(opts)
    # yacs reports an unknown key as a KeyError (file) or a bare AssertionError (opts).
    try:
        cfg.merge_from_file(config_file)
    except KeyError as e:
        keys = all_keys(CfgNode.load_yaml_with_base(config_file, allow_unsafe=True))
        raise unknown_key_error(cfg, config_file, e.args[0], keys) from None
    try:
        cfg.merge_from_list(opts)
    except (AssertionError, KeyError) as e:
        raise unknown_key_error(cfg, "command-line options", e.args[0]) from None
    register_from_config(cfg)
    register_ignore_boxes_from_config(cfg)
    check_config(cfg, check_files=check_files, eval_only=eval_only)
    cfg.freeze()
    return cfg
