"""Attach per-image ignore boxes to a registered dataset's records.

``DATASETS.IGNORE_BOXES`` lists ``[dataset_name, json_file]`` pairs: every annotation box
of the LVIS-format ``json_file`` (e.g. the pseudo labels written by
``python -m lvis_longtail.tools.pseudo_label``; only ``image_id`` and ``bbox`` [x, y, w, h]
are read) is appended to the ``ignore_boxes`` (XYXY_ABS lists) of the record with that
``image_id`` in ``dataset_name``. The mapper
(:class:`~lvis_longtail.data.mapper.LongTailDatasetMapper`) transforms them with the image
and the model (:mod:`lvis_longtail.modeling.ignore_regions`) ignores the background anchors
and proposals they cover. Registration wraps the dataset's loader function; registering
the same pair again replaces the earlier wrap (idempotent).
"""

import math
import os
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog

from lvis_longtail.data.lvis_geometry_checks import far_outside
from lvis_longtail.utils.io import read_json

__all__ = ["attach_ignore_boxes", "read_ignore_boxes", "register_ignore_boxes_from_config"]


def read_ignore_boxes(
    json_file: str, sizes: Optional[Dict[int, Tuple[int, int]]] = None
) -> Dict[int, List[List[float]]]:
    """``{image_id: [[x0, y0, x1, y1], ...]}`` of the annotations of an LVIS-format json.

    Args:
        sizes: ``{image_id: (height, width)}``: a box lying far outside its image (as
            :data:`~.lvis_geometry_checks.FAR_OUTSIDE` defines for ground truth) is an error.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not valid JSON, or a malformed annotation (naming the file,
            the annotation and the field).
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"ignore-box file {json_file} (DATASETS.IGNORE_BOXES) not found")
    data = read_json(json_file, ValueError, "ignore-box file (DATASETS.IGNORE_BOXES)")
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f"{json_file}: needs an 'annotations' list (LVIS format)")
    sizes = sizes or {}
    boxes: Dict[int, List[List[float]]] = defaultdict(list)
    for i, ann in enumerate(anns):
        rid = ann.get("id", "?") if isinstance(ann, dict) else "?"
        where = f"{json_file}: annotations[{i}] (id={rid!r:.40})"
        for key in ("image_id", "bbox"):
            if not isinstance(ann, dict) or key not in ann:
                raise ValueError(f"{where}: field '{key}' is missing")
        b = ann["bbox"]
        if isinstance(ann["image_id"], bool) or not isinstance(ann["image_id"], int):
            raise ValueError(
                f"{where}: field 'image_id' must be an integer, got {ann['image_id']!r:.60}"
            )
        numbers = (
            isinstance(b, (list, tuple))
            and len(b) == 4
            and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in b
            )
        )
        if not (numbers and b[2] >= 0 and b[3] >= 0):
            raise ValueError(
                f"{where}: field 'bbox' must be [x, y, w, h] of finite numbers with w, h >= 0, "
                f"got {b!r:.60}"
            )
        x0, y0, x1, y1 = b[0], b[1], b[0] + b[2], b[1] + b[3]
        h, w = sizes.get(ann["image_id"], (math.inf, math.inf))
        if far_outside(x0, x1, w) or far_outside(y0, y1, h):
            raise ValueError(
                f"{where}: field 'bbox' {b} lies far outside its {w}x{h} image "
                f"(image_id {ann['image_id']}); wrong image size or coordinate scale?"
            )
        boxes[ann["image_id"]].append([x0, y0, x1, y1])
    return dict(boxes)


def attach_ignore_boxes(records: List[dict], json_file: str, dataset: str = "") -> List[dict]:
    """Append the boxes of ``json_file`` to each record's ``ignore_boxes`` (in place; returned).
    Boxes are checked against the size of the records that have ``height`` and ``width``.

    Raises:
        ValueError: an ``image_id`` of the file is not an image of the records, or a box
            lies far outside its image.
    """
    sizes = {
        r["image_id"]: (r["height"], r["width"]) for r in records if "height" in r and "width" in r
    }
    boxes = read_ignore_boxes(json_file, sizes)
    ids = {r["image_id"] for r in records}
    unknown = sorted(set(boxes) - ids)
    if unknown:
        raise ValueError(
            f"{json_file}: {len(unknown)} image_id(s) not in dataset {dataset!r}, "
            f"e.g. {unknown[:5]} (DATASETS.IGNORE_BOXES)"
        )
    for r in records:
        if r["image_id"] in boxes:
            r["ignore_boxes"] = list(r.get("ignore_boxes", [])) + boxes[r["image_id"]]
    return records


def register_ignore_boxes_from_config(cfg) -> None:
    """Wrap the loader of each dataset of ``cfg.DATASETS.IGNORE_BOXES`` (module docstring)."""
    for entry in cfg.DATASETS.IGNORE_BOXES:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise ValueError(
                f"DATASETS.IGNORE_BOXES entries must be [dataset_name, json_file], got {entry!r}"
            )
        name, json_file = entry
        if name not in DatasetCatalog.list():
            raise ValueError(f"DATASETS.IGNORE_BOXES: dataset {name!r} is not registered")
        loader = DatasetCatalog[name]
        loader = getattr(loader, "_without_ignore_boxes", loader)

        def load(loader=loader, json_file=json_file, name=name):
            return attach_ignore_boxes(loader(), json_file, name)

        load._without_ignore_boxes = loader
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, load)
