"""lvis_longtail: long-tailed instance segmentation on detectron2.

Importing the package applies :mod:`lvis_longtail.compat` (detectron2 0.6 vs today's
packages), registers the built-in datasets and the models with detectron2's registries.
"""

from lvis_longtail import compat

compat.apply()

from lvis_longtail import data, modeling  # noqa: E402,F401  (registration side effects)

__version__ = "0.1.0"
