"""Training and launching."""

from lvis_longtail.engine.launch import launch
from lvis_longtail.engine.trainer import Trainer, setup_cfg

__all__ = ["Trainer", "launch", "setup_cfg"]
