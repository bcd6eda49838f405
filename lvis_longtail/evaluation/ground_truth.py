"""An LVIS split indexed once for evaluation: :class:`LVISGroundTruth` (what the fast
evaluator, :mod:`.fast_eval`, matches detections against)."""

import math
from typing import Dict, List

import numpy as np
from pycocotools import mask as mask_utils

from lvis_longtail.evaluation.boundary import BoundaryCache
from lvis_longtail.evaluation.table import index_in_sorted

__all__ = ["FREQUENCY_GROUPS", "LVISGroundTruth", "check_frequencies"]

FREQUENCY_GROUPS = ("r", "c", "f")


class LVISGroundTruth:
    """An LVIS split indexed for evaluation, built once from its json dict (not copied).

    Follows lvis-api's ``LVISEval._prepare``: only annotations with 0 < area < inf of the
    split's images and categories take part; an image's positive categories are those with
    such an annotation; ``neg_category_ids`` and ``not_exhaustive_category_ids`` (absent: none)
    are read per image; ``ignore`` (absent: 0) marks annotations to ignore.
    """

    def __init__(self, dataset: dict):
        self.dataset = dataset
        images = dataset["images"]
        self.img_ids = np.unique(np.array([img["id"] for img in images], dtype=np.int64))
        self.cat_ids = np.array(sorted(c["id"] for c in dataset["categories"]), dtype=np.int64)
        by_id = {c["id"]: c for c in dataset["categories"]}
        check_frequencies(dataset["categories"])
        self.frequency = [by_id[c]["frequency"] for c in self.cat_ids.tolist()]
        self.num_cats = len(self.cat_ids)
        self.image_size = {img["id"]: (img["height"], img["width"]) for img in images}

        anns = dataset.get("annotations") or []
        area = np.fromiter((a["area"] for a in anns), dtype=np.float64, count=len(anns))
        img = self.image_index(np.fromiter((a["image_id"] for a in anns), np.int64, len(anns)))
        cat = self.category_index(
            np.fromiter((a["category_id"] for a in anns), np.int64, len(anns))
        )
        keep = np.flatnonzero((area > 0) & (area < math.inf) & (img >= 0) & (cat >= 0))
        # grouped by category, then image, then the json's order (lvis-api's order)
        order = keep[np.lexsort((keep, img[keep], cat[keep]))]
        self.ann_index = order  # rows of dataset["annotations"]
        self.ann_cat, self.ann_img, self.ann_area = cat[order], img[order], area[order]
        self.ann_ignore = np.array([bool(anns[i].get("ignore", 0)) for i in order], dtype=bool)
        ids = np.array([anns[i]["id"] for i in order], dtype=np.int64)
        # The C++ matcher records a match by the ground truth's id and reads id 0 as "no
        # match", as lvis-api does; any other id only needs to be non-zero.
        self.ann_match_id = np.where(ids != 0, np.arange(1, len(order) + 1), 0)
        self.ann_key = self.pair_key(self.ann_img, self.ann_cat)
        self.pos_keys = np.unique(self.ann_key)
        self.neg_keys = self._image_category_keys(images, "neg_category_ids")
        self.not_exhaustive_keys = self._image_category_keys(images, "not_exhaustive_category_ids")
        self._rle_cache: Dict[int, dict] = {}
        self._boundary_caches: Dict[float, BoundaryCache] = {}

    def image_index(self, image_ids: np.ndarray) -> np.ndarray:
        """Row of each id in ``img_ids``; -1 where the id is not an image of the split."""
        return index_in_sorted(self.img_ids, image_ids)

    def category_index(self, category_ids: np.ndarray) -> np.ndarray:
        """Row of each id in ``cat_ids``; -1 where the id is not a category of the split."""
        return index_in_sorted(self.cat_ids, category_ids)

    def pair_key(self, img_index: np.ndarray, cat_index: np.ndarray) -> np.ndarray:
        return img_index.astype(np.int64) * self.num_cats + cat_index

    def _image_category_keys(self, images: list, field: str) -> np.ndarray:
        img, cat = [], []
        for image in images:
            ids = image.get(field) or []
            img.extend([image["id"]] * len(ids))
            cat.extend(ids)
        img_index = self.image_index(np.array(img, dtype=np.int64))
        cat_index = self.category_index(np.array(cat, dtype=np.int64))
        ok = (img_index >= 0) & (cat_index >= 0)
        return np.unique(self.pair_key(img_index[ok], cat_index[ok]))

    def rles(self, rows: np.ndarray) -> List[dict]:
        """RLEs of ground-truth rows (``ann_*`` order), converted as lvis-api's
        ``ann_to_rle`` does and cached."""
        out = []
        anns = self.dataset["annotations"]
        for row in np.asarray(rows).tolist():
            rle = self._rle_cache.get(row)
            if rle is None:
                ann = anns[self.ann_index[row]]
                h, w = self.image_size[ann["image_id"]]
                segm = ann["segmentation"]
                if isinstance(segm, list):
                    rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
                elif isinstance(segm["counts"], list):
                    rle = mask_utils.frPyObjects(segm, h, w)
                else:
                    rle = segm
                self._rle_cache[row] = rle
            out.append(rle)
        return out

    def boundary_cache(self, ratio: float) -> BoundaryCache:
        """The ground truth's boundary regions at dilation ``ratio`` (:mod:`.boundary`),
        computed once per annotation row and kept."""
        if ratio not in self._boundary_caches:
            self._boundary_caches[ratio] = BoundaryCache(ratio, self.rles)
        return self._boundary_caches[ratio]

    def boxes(self, rows: np.ndarray) -> List[list]:
        anns = self.dataset["annotations"]
        return [anns[self.ann_index[row]]["bbox"] for row in rows.tolist()]


def check_frequencies(categories: List[dict]) -> None:
    """Raise ValueError unless every category has an LVIS ``frequency`` (r/c/f)."""
    missing = [c["id"] for c in categories if c.get("frequency") not in FREQUENCY_GROUPS]
    if missing:
        raise ValueError(
            f"categories {missing[:10]}{'...' if len(missing) > 10 else ''} have no LVIS "
            "'frequency' (APr/APc/APf need the training set's groups): add the fields, or "
            "evaluate with LVISLongTailEvaluator and the training split in DATASETS.TRAIN"
        )
