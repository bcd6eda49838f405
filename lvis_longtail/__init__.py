"""lvis_longtail: long-tailed instance segmentation on detectron2.

Importing the package applies :mod:`lvis_longtail.compat` (detectron2 0.6 vs today's
packages), registers the built-in datasets and the models with detectron2's registries
(where torch is installed).
"""

import importlib.util

if importlib.util.find_spec("torch") is not None:
    from lvis_longtail import compat

    compat.apply()

    from lvis_longtail import data, modeling  # noqa: F401  (registration side effects)
# else: only the file tools (compare_runs) work, which need neither torch nor detectron2

__version__ = "0.1.0"
