"""Loading a config, training and launching."""

from lvis_longtail.engine.launch import launch
from lvis_longtail.engine.setup import setup_cfg
from lvis_longtail.engine.trainer import Trainer

__all__ = ["Trainer", "launch", "setup_cfg"]
