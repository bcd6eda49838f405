"""LVIS AP with lvis-api 0.5.3's numbers, several times faster and in less memory.

lvis-api (``LVISResults`` + ``LVISEval``) deep-copies the split, makes a dict per detection,
and loops in Python over every (image, category) cell and every area range: 6 million IoU
entries and 24 million ``evaluate_img`` calls on a 5,000-image LVIS split, nearly all of them
empty. faster-coco-eval's LVIS mode (``lvis_style=True``) moves the matching and
accumulation to C++ but still builds that full image x category grid (more memory than
lvis-api) and goes through its own json/``COCO`` objects.

This module keeps the C++ matcher and accumulator of faster-coco-eval
(``COCOevalEvaluateAccumulate``, which implements lvis-api's rules, the not-exhaustive flag
included) and feeds it differently:

- ground truth indexed once from the loaded json (:class:`~.ground_truth.LVISGroundTruth`),
  detections as numpy columns (:class:`~.table.DetectionTable`); no json round trip, no deep
  copy;
- lvis-api's per-image cap, area filter and federated rules applied as array operations;
- one C++ call per category with only the images where that category has ground truth or
  kept detections, so nothing scales with images x categories;
- IoUs only for (image, category) pairs with both, with pycocotools' ``maskUtils.iou`` (the
  function lvis-api calls, hence the same bits); ground-truth polygons become RLEs only where
  a detection needs them, detection masks are read only there;
- Boundary AP (``iou_type="boundary"``, lvis-api's ``lvis_challenge_2021`` branch): the same,
  matched by min(mask IoU, boundary IoU) (:mod:`.boundary`).

Tie-breaking is lvis-api's: within an image, equal scores keep the earlier detection; across
images, the lower image id first. The one arithmetic difference is precision: the C++ code
computes ``tp / (tp + fp)``, lvis-api ``tp / (tp + fp + eps)``; metrics differ by < 1e-15.
"""

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import numpy as np
from lvis.eval import Params
from pycocotools import mask as mask_utils

from lvis_longtail.evaluation.boundary import DILATION_RATIO, cell_ious
from lvis_longtail.evaluation.ground_truth import LVISGroundTruth
from lvis_longtail.evaluation.table import DetectionTable, cap_per_image
from lvis_longtail.utils.io import gc_paused

logger = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm", "boundary")
AREA_LABELS = ("all", "small", "medium", "large")


def metric_names(max_dets: int) -> tuple:
    """Names of lvis-api's summary metrics, in its order (``AR@300`` for ``max_dets`` 300)."""
    ap = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
    return ap + tuple(f"AR{a}@{max_dets}" for a in ("", "s", "m", "l"))


@dataclass
class LVISEvalResult:
    """What one evaluation gives.

    Attributes:
        metrics: lvis-api's summary (:func:`metric_names`), fractions; -1 where undefined.
        precision: (T=10, R=101, K, A=4) as lvis-api's ``eval["precision"]``.
        recall: (T, K, A) as lvis-api's ``eval["recall"]``.
        cat_ids: (K,) the split's category ids, sorted.
        num_detections: (K,) detections of each category that took part (after the cap,
            the area filter and the federated rules).
    """

    metrics: "OrderedDict[str, float]"
    precision: np.ndarray
    recall: np.ndarray
    cat_ids: np.ndarray
    num_detections: np.ndarray

    def per_class_ap(self, iou: Optional[float] = None) -> np.ndarray:
        """(K,) AP of each category over all areas (at IoU ``iou`` if given); NaN where the
        category has no ground truth."""
        p = self.precision[..., 0]
        if iou is not None:
            p = p[np.flatnonzero(np.isclose(Params("bbox").iou_thrs, iou))]
        valid = p > -1
        total = np.where(valid, p, 0).sum(axis=(0, 1))
        count = valid.sum(axis=(0, 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def evaluate_detections(
    gt: LVISGroundTruth,
    dets: DetectionTable,
    iou_type: str,
    max_dets: int = 300,
    dilation_ratio: float = DILATION_RATIO,
) -> LVISEvalResult:
    """lvis-api's ``LVISResults(gt, results, max_dets)`` + ``LVISEval(...).run()``, exactly
    (for "boundary", ``LVISEval`` of lvis-api's ``lvis_challenge_2021`` branch).

    Args:
        gt: the indexed split.
        dets: the detections, in the results' order (which breaks ties as in lvis-api).
            Ranked by :meth:`DetectionTable.task_score`. Images must be of the split.
        iou_type: "bbox", "segm" or "boundary" (:mod:`.boundary`: matched by min(mask IoU,
            boundary IoU)); segm and boundary area = mask pixel count.
        max_dets: per-image cap; -1 for none (Fixed AP).
        dilation_ratio: boundary's erosion radius over the image diagonal.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    boundary = gt.boundary_cache(dilation_ratio) if iou_type == "boundary" else None
    with gc_paused():
        return _evaluate(gt, dets, iou_type, max_dets, boundary)


def _evaluate(gt, dets, iou_type, max_dets, boundary) -> "LVISEvalResult":
    start = time.perf_counter()
    params = Params(iou_type)
    params.max_dets = max_dets
    dets = _prepare_detections(gt, dets, iou_type, max_dets)
    num_t, num_r, num_a = len(params.iou_thrs), len(params.rec_thrs), len(params.area_rng)
    precision = -np.ones((num_t, num_r, gt.num_cats, num_a))
    recall = -np.ones((num_t, gt.num_cats, num_a))
    num_detections = np.bincount(dets.cat, minlength=gt.num_cats)
    gt_bounds = _bounds(gt.ann_cat, gt.num_cats)
    dt_bounds = _bounds(dets.cat, gt.num_cats)
    for k in np.flatnonzero(gt_bounds[1:] > gt_bounds[:-1]).tolist():
        g = np.arange(gt_bounds[k], gt_bounds[k + 1])
        d = np.arange(dt_bounds[k], dt_bounds[k + 1])
        p, r = _evaluate_category(gt, dets, g, d, iou_type, params, boundary)
        precision[:, :, k, :] = p
        recall[:, k, :] = r
    metrics = _summarize(precision, recall, gt, params)
    logger.info(
        f"Evaluated {iou_type} ({len(dets.cat):,} detections after the federated rules) in "
        f"{time.perf_counter() - start:.1f} s."
    )
    return LVISEvalResult(metrics, precision, recall, gt.cat_ids, num_detections)


@dataclass
class _Prepared:
    """Kept detections grouped by category, image, then results order."""

    table: DetectionTable
    cat: np.ndarray
    img: np.ndarray
    score: np.ndarray
    area: np.ndarray
    not_exhaustive: np.ndarray


def _prepare_detections(gt, dets: DetectionTable, iou_type, max_dets) -> _Prepared:
    img = gt.image_index(dets.image_id)
    if (img < 0).any():
        bad = dets.image_id[img < 0][0]
        raise ValueError(f"detections of image {bad}, which is not an image of the split")
    if iou_type == "bbox" and dets.bbox is None and len(dets):
        raise ValueError("bbox evaluation needs a 'bbox' in every detection")
    if iou_type != "bbox" and dets.masks is None and len(dets):
        if iou_type == "boundary" or dets.mask_area is None:
            raise ValueError(f"{iou_type} evaluation needs a 'segmentation' in every detection")
    score = dets.task_score(iou_type)
    rows = np.flatnonzero(cap_per_image(img, score, max_dets))  # LVISResults' cap first
    img, cat = img[rows], gt.category_index(dets.category_id[rows])
    key = gt.pair_key(img, cat)
    # federated rules: only categories positive or negative in the image are evaluated
    keep = (cat >= 0) & (_isin_sorted(key, gt.pos_keys) | _isin_sorted(key, gt.neg_keys))
    rows, img, cat, key = rows[keep], img[keep], cat[keep], key[keep]
    table = dets.take(rows)
    area = table.areas(iou_type)
    # lvis-api drops detections with area 0 (get_ann_ids keeps 0 < area < inf)
    keep = np.flatnonzero((area > 0) & (area < math.inf))
    order = keep[np.lexsort((keep, img[keep], cat[keep]))]
    return _Prepared(
        table=table.take(order),
        cat=cat[order],
        img=img[order],
        score=score[rows][order],
        area=area[order],
        not_exhaustive=_isin_sorted(key[order], gt.not_exhaustive_keys),
    )


def _isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[pos] == values


def _bounds(sorted_groups: np.ndarray, num_groups: int) -> np.ndarray:
    """(num_groups + 1,) start offsets of each group id in a sorted array."""
    return np.searchsorted(sorted_groups, np.arange(num_groups + 1))


def _cpp():
    """faster-coco-eval's C++ module (its internal API: pinned to faster-coco-eval 1.8.0)."""
    try:
        import faster_coco_eval.faster_eval_api_cpp as cpp
    except ImportError as e:
        raise ImportError(
            "the fast LVIS evaluator needs faster-coco-eval (pip install faster-coco-eval==1.8.0);"
            " or set TEST.LVIS_EVALUATOR lvis_api / evaluator='lvis_api'"
        ) from e
    return cpp


def _evaluate_category(gt, dets: _Prepared, g_rows, d_rows, iou_type, params, boundary):
    """One C++ evaluate + accumulate over the images where the category occurs.

    ``g_rows``/``d_rows``: contiguous ranges of ground-truth / detection rows, grouped by
    image (ascending) then in lvis-api's order."""
    g_img, d_img = gt.ann_img[g_rows], dets.img[d_rows]
    images = np.union1d(g_img, d_img)  # sorted: lvis-api's image order
    g_cut = np.searchsorted(g_img, images, side="right").tolist()
    d_cut = np.searchsorted(d_img, images, side="right").tolist()
    cpp = _cpp()
    gt_data, dt_data = cpp.Dataset(), cpp.Dataset()
    for image, mid, area, ignore in zip(
        g_img.tolist(),
        gt.ann_match_id[g_rows].tolist(),
        gt.ann_area[g_rows].tolist(),
        gt.ann_ignore[g_rows].tolist(),
    ):
        gt_data.append(image, 0, {"id": mid, "area": area, "ignore": ignore})
    for image, r, score, area, mark in zip(
        d_img.tolist(),
        d_rows.tolist(),
        dets.score[d_rows].tolist(),
        dets.area[d_rows].tolist(),
        dets.not_exhaustive[d_rows].tolist(),
    ):
        dt_data.append(image, 0, {"id": r + 1, "score": score, "area": area, "lvis_mark": mark})
    # a pair below the lowest threshold is never matched (lvis-api caps them at 1 - 1e-10)
    min_iou = min(float(params.iou_thrs.min()), 1 - 1e-10)
    ious = _cell_ious(gt, dets, g_rows, d_rows, (g_cut, d_cut), iou_type, (boundary, min_iou))
    counts = np.diff(np.concatenate([[0], d_cut]))
    img_list = images.astype(np.float64).tolist()
    cpp_params = SimpleNamespace(
        iouThrs=params.iou_thrs.tolist(),
        recThrs=params.rec_thrs.tolist(),
        areaRng=[list(a) for a in params.area_rng],
        # no cap here: the per-image cap was applied before, as in LVISResults
        maxDets=[max(1, int(counts.max(initial=0)))],
        useCats=1,
        catIds=[0.0],
        imgIds=img_list,
    )
    out = cpp.COCOevalEvaluateAccumulate(cpp_params, ious, gt_data, dt_data, img_list, [0.0], True)
    return out["precision"][:, :, 0, :, 0], out["recall"][:, 0, :, 0]


def _cell_ious(gt, dets: _Prepared, g_rows, d_rows, cuts, iou_type, boundary) -> list:
    """The C++ code's IoU input: per image, [(D, G) IoUs] (or [[]] without both), detections
    sorted by score as it sorts them (stable). ``boundary``: (the ground truth's
    :class:`~.boundary.BoundaryCache`, the lowest IoU threshold) for "boundary"."""
    cells, g0, d0 = [], 0, 0
    for g1, d1 in zip(*cuts):
        d = d_rows[d0:d1][np.argsort(-dets.score[d_rows[d0:d1]], kind="stable")]
        cells.append((d, g_rows[g0:g1]) if g1 > g0 and d1 > d0 else None)
        g0, d0 = g1, d1
    full = [c for c in cells if c is not None]
    if iou_type == "boundary" and full:
        d_all = np.concatenate([d for d, _ in full])
        ends = np.cumsum([len(d) for d, _ in full])
        positions = np.split(np.arange(len(d_all)), ends[:-1])
        parts = [(p, g) for p, (_, g) in zip(positions, full)]
        values = iter(cell_ious(parts, dets.table.masks.rles(d_all), gt.rles, *boundary))
    else:
        values = (_ious(gt, dets, g, d, iou_type) for d, g in full)
    return [[next(values).tolist()] if c is not None else [[]] for c in cells]


def _ious(gt, dets: _Prepared, g_rows, d_rows, iou_type) -> np.ndarray:
    """(D, G) bbox or segm IoUs of detection rows (in matching order) and ground truth."""
    iscrowd = [0] * len(g_rows)
    if iou_type == "bbox":
        d = dets.table.bbox[d_rows].tolist()
        return mask_utils.iou(d, gt.boxes(g_rows), iscrowd)
    d = dets.table.masks.rles(d_rows)
    return mask_utils.iou(d, gt.rles(g_rows), iscrowd)


def _summarize(precision, recall, gt: LVISGroundTruth, params) -> "OrderedDict[str, float]":
    """lvis-api's ``LVISEval.summarize``, on the same arrays, in the same order."""
    freq_groups = [[] for _ in params.img_count_lbl]
    for idx, frequency in enumerate(gt.frequency):
        freq_groups[params.img_count_lbl.index(frequency)].append(idx)

    def summarize(ap, iou_thr=None, area_rng="all", freq_group_idx=None):
        aidx = [i for i, lbl in enumerate(params.area_rng_lbl) if lbl == area_rng]
        s = precision if ap else recall
        if iou_thr is not None:
            s = s[np.where(iou_thr == params.iou_thrs)[0]]
        if ap:
            cats = freq_groups[freq_group_idx] if freq_group_idx is not None else slice(None)
            s = s[:, :, cats, aidx]
        else:
            s = s[:, :, aidx]
        return -1 if len(s[s > -1]) == 0 else np.mean(s[s > -1])

    values = [
        summarize(True),
        summarize(True, iou_thr=0.5),
        summarize(True, iou_thr=0.75),
        summarize(True, area_rng="small"),
        summarize(True, area_rng="medium"),
        summarize(True, area_rng="large"),
        summarize(True, freq_group_idx=0),
        summarize(True, freq_group_idx=1),
        summarize(True, freq_group_idx=2),
        summarize(False),
        summarize(False, area_rng="small"),
        summarize(False, area_rng="medium"),
        summarize(False, area_rng="large"),
    ]
    return OrderedDict((name, float(v)) for name, v in zip(metric_names(params.max_dets), values))


__all__ = [
    "LVISEvalResult",
    "LVISGroundTruth",
    "evaluate_detections",
    "metric_names",
]
