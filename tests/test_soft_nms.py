"""Soft-NMS against a brute-force reference written from Bodla et al. 2017 (Algorithm 1), and
MODEL.ROI_HEADS.NMS_TYPE "hard" against detectron2's fast_rcnn_inference."""

import math

import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference

from lvis_longtail.modeling.postprocessing import (
    SoftNMSParams,
    batched_soft_nms,
    class_wise_suppression,
    longtail_fast_rcnn_inference,
)


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_soft_nms(boxes, scores, classes, method, sigma, nt, min_score):
    """Algorithm 1 of the paper, one box at a time, per class, in plain Python. Ties: the
    lower index first. Output: (index, score) sorted by score desc, then index."""
    out = []
    for c in sorted(set(classes)):
        remaining = {i: scores[i] for i in range(len(scores)) if classes[i] == c}
        remaining = {i: s for i, s in remaining.items() if s >= min_score}
        while remaining:
            m = min(remaining, key=lambda i: (-remaining[i], i))
            out.append((m, remaining.pop(m)))
            for i in list(remaining):
                iou = _iou(boxes[m], boxes[i])
                if method == "linear":
                    f = 1.0 - iou if iou >= nt else 1.0
                else:
                    f = math.exp(-(iou * iou) / sigma)
                remaining[i] *= f
                if remaining[i] < min_score:
                    del remaining[i]
    return sorted(out, key=lambda t: (-t[1], t[0]))


def _random_dets(n, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 60
    wh = torch.rand(n, 2, generator=g) * 30 + 2
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(n, generator=g)
    classes = torch.randint(0, num_classes, (n,), generator=g)
    return boxes.double(), scores.double(), classes


def _check(boxes, scores, classes, params):
    keep, new = batched_soft_nms(boxes, scores, classes, params)
    ref = reference_soft_nms(
        boxes.tolist(), scores.tolist(), classes.tolist(),
        params.method, params.sigma, params.iou_thresh, params.min_score,
    )  # fmt: skip
    assert keep.tolist() == [i for i, _ in ref]
    torch.testing.assert_close(new, torch.tensor([s for _, s in ref], dtype=new.dtype))


@pytest.mark.parametrize("method", ["linear", "gaussian"])
@pytest.mark.parametrize("num_classes,n,seed", [(1, 40, 0), (5, 60, 1), (300, 400, 2)])
def test_soft_nms_equals_reference(method, num_classes, n, seed):
    boxes, scores, classes = _random_dets(n, num_classes, seed)
    _check(boxes, scores, classes, SoftNMSParams(method, 0.5, 0.3, 1e-3))


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_ties_and_duplicates(method):
    # identical boxes with identical scores (ties): the lower index wins, the other decays
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30.0]])
    scores = torch.tensor([0.5, 0.5, 0.9, 0.5])
    classes = torch.tensor([0, 0, 0, 0])
    _check(boxes.double(), scores.double(), classes, SoftNMSParams(method, 0.5, 0.3, 1e-3))
    keep, new = batched_soft_nms(boxes, scores, classes, SoftNMSParams(method, 0.5, 0.3, 0))
    # box 2 first; box 3 (no overlap, 0.5) precedes the decayed box 0 -> order by hand
    assert keep[:2].tolist() == [2, 3]
    # linear: IoU 1 >= 0.3 -> score * 0 (dropped at min_score 0 only if < 0: kept as 0)
    expected = 0.0 if method == "linear" else 0.5 * math.exp(-1 / 0.5)
    assert new[2].item() == pytest.approx(expected)


def test_soft_nms_gaussian_closed_form():
    # IoU of [0,0,10,10] and [5,0,15,10] = 50 / 150 = 1/3
    boxes = torch.tensor([[0, 0, 10, 10], [5, 0, 15, 10.0]])
    keep, new = batched_soft_nms(
        boxes, torch.tensor([0.9, 0.8]), torch.tensor([3, 3]), SoftNMSParams("gaussian", 0.5)
    )
    assert keep.tolist() == [0, 1]
    assert new[1].item() == pytest.approx(0.8 * math.exp(-(1 / 9) / 0.5), rel=1e-6)
    # other class: no interaction
    keep, new = batched_soft_nms(
        boxes, torch.tensor([0.9, 0.8]), torch.tensor([3, 4]), SoftNMSParams("gaussian", 0.5)
    )
    assert new.tolist() == pytest.approx([0.9, 0.8])
    # linear: IoU 1/3 >= 0.3 -> 0.8 * 2/3; with N_t 0.5 unchanged
    _, new = batched_soft_nms(boxes, torch.tensor([0.9, 0.8]), torch.tensor([3, 3]),
                              SoftNMSParams("linear", iou_thresh=0.3))  # fmt: skip
    assert new[1].item() == pytest.approx(0.8 * 2 / 3, rel=1e-6)
    _, new = batched_soft_nms(boxes, torch.tensor([0.9, 0.8]), torch.tensor([3, 3]),
                              SoftNMSParams("linear", iou_thresh=0.5))  # fmt: skip
    assert new[1].item() == pytest.approx(0.8)


def _zipf_dets(n, num_classes, seed):
    """Boxes on a few objects, Zipf class sizes: one class of ~n/6 boxes, many of 1-3."""
    g = torch.Generator().manual_seed(seed)
    objects = torch.rand(20, 2, generator=g) * 80
    pick = torch.randint(0, 20, (n,), generator=g)
    xy = objects[pick] + torch.randn(n, 2, generator=g) * 3
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 20 + 5], dim=1)
    weights = 1.0 / torch.arange(1, num_classes + 1).double()
    classes = torch.multinomial(weights, n, replacement=True, generator=g)
    return boxes.double(), torch.rand(n, generator=g).double(), classes


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_mixed_class_sizes(method, monkeypatch):
    """Several size groups (one class of ~100 boxes, many of a few); the per-step IoU rows
    (groups above _PAIRWISE_LIMIT) give the same result bit for bit as the pairwise factors."""
    import lvis_longtail.modeling.postprocessing as pp

    boxes, scores, classes = _zipf_dets(600, 400, 3)
    counts = torch.bincount(classes)
    assert counts.max() >= 80 and (counts == 1).sum() >= 50  # the case is what it claims
    params = SoftNMSParams(method, 0.5, 0.3, 1e-3)
    _check(boxes, scores, classes, params)
    keep, new = batched_soft_nms(boxes, scores, classes, params)
    monkeypatch.setattr(pp, "_PAIRWISE_LIMIT", 0)
    keep_rows, new_rows = batched_soft_nms(boxes, scores, classes, params)
    assert torch.equal(keep, keep_rows) and torch.equal(new, new_rows)
    _check(boxes, scores, classes, params)


@pytest.mark.parametrize("per_step_rows", [False, True])
def test_soft_nms_linear_threshold_and_min_score_boundaries(per_step_rows, monkeypatch):
    import lvis_longtail.modeling.postprocessing as pp

    if per_step_rows:
        monkeypatch.setattr(pp, "_PAIRWISE_LIMIT", 0)
    # IoU([0,0,10,10], [0,0,10,5]) = 50 / 100 = 0.5 exactly; 0.75 * (1 - 0.5) = 0.375 exactly
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5.0]])
    scores, classes = torch.tensor([0.9, 0.75]), torch.tensor([7, 7])

    def run(nt, min_score):
        return batched_soft_nms(boxes, scores, classes, SoftNMSParams("linear", 0.5, nt, min_score))

    keep, new = run(0.5, 1e-3)  # IoU == N_t decays (>=)
    assert keep.tolist() == [0, 1] and new.tolist() == [pytest.approx(0.9), 0.375]
    keep, new = run(0.5 + 1e-6, 1e-3)  # just above: unchanged
    assert new.tolist() == [pytest.approx(0.9), 0.75]
    keep, new = run(0.5, 0.375)  # decayed exactly to MIN_SCORE: kept
    assert keep.tolist() == [0, 1] and new[1].item() == 0.375
    keep, _ = run(0.5, 0.376)  # below it: dropped
    assert keep.tolist() == [0]
    keep, new = run(0.5, 0.75)  # an input score equal to MIN_SCORE is kept, then dropped
    assert keep.tolist() == [0]
    keep, new = run(0.5, 0.9)  # the top box alone
    assert keep.tolist() == [0] and new.tolist() == [pytest.approx(0.9)]


@pytest.mark.parametrize("per_step_rows", [False, True])
@pytest.mark.parametrize("method,sigma", [("gaussian", 1e-3), ("linear", 0.5)])
def test_soft_nms_zero_factors_with_min_score_zero(method, sigma, per_step_rows, monkeypatch):
    """Factors of exactly 0 (linear at IoU 1; exp(-1 / 1e-3) underflows in fp32 and fp64)
    with MIN_SCORE 0 keep the zeroed duplicates (0 >= 0), after the others, by index."""
    import lvis_longtail.modeling.postprocessing as pp

    if per_step_rows:
        monkeypatch.setattr(pp, "_PAIRWISE_LIMIT", 0)
    # 12 disjoint boxes (IoU 0), then 3 exact copies of each of the first 4 (IoU 1)
    xy = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(3.0), indexing="ij"), -1)
    grid = torch.cat([xy.reshape(-1, 2) * 20, xy.reshape(-1, 2) * 20 + 10], 1)
    boxes = torch.cat([grid, grid[:4].repeat(3, 1)]).double()
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(24, generator=g).double()
    classes = torch.tensor([0, 1] * 6 + [0, 1] * 6)  # copies share their original's class
    params = SoftNMSParams(method, sigma, 0.3, 0.0)
    _check(boxes, scores, classes, params)
    keep, new = batched_soft_nms(boxes, scores, classes, params)
    # each of the first 4 boxes' 4 copies: the best one keeps its score, 3 are zeroed
    assert len(keep) == 24 and (new == 0).sum() == 12
    assert keep[new == 0].tolist() == sorted(keep[new == 0].tolist())


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_negative_min_score_keeps_every_box(method):
    boxes, scores, classes = _random_dets(60, 3, 4)
    boxes[10:20] = boxes[0]
    params = SoftNMSParams(method, 0.5, 0.3, -1.0)
    _check(boxes, scores, classes, params)
    assert len(batched_soft_nms(boxes, scores, classes, params)[0]) == 60


def test_soft_nms_empty_and_all_below_min_score():
    params = SoftNMSParams("gaussian")
    keep, new = batched_soft_nms(
        torch.zeros((0, 4)), torch.zeros((0,)), torch.zeros((0,), dtype=torch.long), params
    )
    assert keep.shape == (0,) and new.shape == (0,) and keep.dtype == torch.int64
    keep, _ = batched_soft_nms(torch.tensor([[0, 0, 1, 1.0]]), torch.tensor([1e-4]),
                               torch.tensor([0]), params)  # fmt: skip
    assert keep.numel() == 0


def test_bad_method_and_type_are_named():
    with pytest.raises(ValueError, match="linear, gaussian"):
        SoftNMSParams("box")
    with pytest.raises(ValueError, match="hard, soft_linear, soft_gaussian"):
        class_wise_suppression(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0).long(),
                               "soft", 0.5)  # fmt: skip


@pytest.mark.parametrize("agnostic", [False, True])
def test_hard_equals_detectron2_fast_rcnn_inference(agnostic):
    g = torch.Generator().manual_seed(0)
    k, r = 30, 200
    boxes, scores, shapes = [], [], [(80, 100), (64, 64)]
    for _ in shapes:
        xy = torch.rand(r, 1, 2, generator=g) * 70
        wh = torch.rand(r, 1 if agnostic else k, 2, generator=g) * 40 + 1
        b = torch.cat([xy.expand_as(wh), xy + wh], dim=2).reshape(r, -1)
        b[0, 0] = float("nan")  # dropped by the finiteness check
        boxes.append(b)
        s = torch.rand(r, k + 1, generator=g) ** 4
        s[1, 2] = s[1, 3]  # a tie across classes
        scores.append(s)
    ours, rows = longtail_fast_rcnn_inference(boxes, scores, shapes, 0.05, 0.5, 100, "hard")
    ref, ref_rows = fast_rcnn_inference(boxes, scores, shapes, 0.05, 0.5, 100)
    for a, b, ra, rb in zip(ours, ref, rows, ref_rows):
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)
        assert torch.equal(ra, rb)


def test_nms_type_reaches_the_box_predictor():
    model = build_model(tiny_cfg(opts=["MODEL.ROI_HEADS.NMS_TYPE", "soft_linear",
                                       "MODEL.ROI_HEADS.SOFT_NMS.IOU_THRESH", 0.4]))  # fmt: skip
    predictor = model.roi_heads.box_predictor
    assert predictor.nms_type == "soft_linear" and predictor.soft_nms.iou_thresh == 0.4
    model.eval()
    from conftest import make_batch

    batch = [{k: v for k, v in d.items() if k != "instances"} for d in make_batch(1)]
    with torch.no_grad():
        out = model(batch)[0]["instances"]
    # Soft-NMS output: sorted, scores above MIN_SCORE
    assert torch.all(out.scores[:-1] >= out.scores[1:])
    assert torch.all(out.scores >= 1e-3)


def test_cascade_heads_use_the_nms_type():
    """The cascade's final detections go through the last predictor's ``postprocess``: with
    "hard" they equal detectron2's ``CascadeROIHeads._forward_box``; Soft-NMS changes them."""
    from conftest import make_batch
    from detectron2.modeling.roi_heads import CascadeROIHeads

    cascade = ["MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads",
               "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True,
               "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]  # fmt: skip
    torch.manual_seed(0)
    model = build_model(tiny_cfg(opts=cascade)).eval()
    batch = [{k: v for k, v in d.items() if k != "instances"} for d in make_batch(1)]
    with torch.no_grad():
        images = model.preprocess_image(batch)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features)
        ours = model.roi_heads._forward_box(features, proposals)[0]
        d2 = CascadeROIHeads._forward_box(model.roi_heads, features, proposals)[0]
        assert len(ours) > 0
        assert torch.equal(ours.pred_boxes.tensor, d2.pred_boxes.tensor)
        assert torch.equal(ours.scores, d2.scores)
        assert torch.equal(ours.pred_classes, d2.pred_classes)
        for p in model.roi_heads.box_predictor:
            p.nms_type = "soft_gaussian"
        soft = model.roi_heads._forward_box(features, proposals)[0]
    assert len(soft) >= len(ours) and torch.all(soft.scores >= 1e-3)
    assert not (len(soft) == len(ours) and torch.equal(soft.scores, ours.scores))
