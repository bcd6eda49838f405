"""Ignore regions: background anchors / proposals covered by an ignore box get label -1 (RPN,
standard sampler) or are dropped (cascade stages >= 1); nothing else changes; with no ignore
boxes the model computes exactly detectron2's losses."""

import copy

import pytest
import torch
from conftest import REPO, make_batch, tiny_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou

from lvis_longtail.modeling.ignore_regions import ignore_mask, ignore_regions

CASCADE = REPO / "configs" / "tiny" / "cascade_mask_rcnn_R18_FPN_tiny_seesaw.yaml"
HTC = REPO / "configs" / "tiny" / "htc_lite_R18_FPN_tiny_seesaw.yaml"
HTC_NOCTX = REPO / "configs" / "tiny" / "htc_lite_R18_FPN_tiny_seesaw_noctx.yaml"  # no neg ids
LT = ["MODEL.META_ARCHITECTURE", "LongTailRCNN", "MODEL.PROPOSAL_GENERATOR.NAME", "LongTailRPN"]
GT = [10.0, 10.0, 50.0, 50.0]  # the annotated object
UNANNOTATED = [70.0, 70.0, 110.0, 110.0]  # a real object without annotation


def test_ignore_mask_iou_and_iof_by_hand():
    boxes = Boxes(torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 20], [50, 50, 60, 60]]))
    ignore = Boxes(torch.tensor([[0.0, 0, 20, 10]]))  # area 200
    # IoU: 100/200 = 0.5, 200/400 = 0.5, 0 ; IoF (over each box's area): 1.0, 0.5, 0
    assert ignore_mask(boxes, ignore, "iou", 0.5).tolist() == [True, True, False]
    assert ignore_mask(boxes, ignore, "iou", 0.51).tolist() == [False, False, False]
    assert ignore_mask(boxes, ignore, "iof", 0.6).tolist() == [True, False, False]
    assert ignore_mask(boxes, Boxes(torch.zeros(0, 4)), "iof", 0.1).tolist() == [False] * 3
    with pytest.raises(ValueError, match="METRIC"):
        ignore_mask(boxes, ignore, "giou", 0.5)


def _targets():
    t = Instances((128, 128))
    t.gt_boxes = Boxes(torch.tensor([GT]))
    t.gt_classes = torch.tensor([3])
    return [t]


# ignore boxes: the unannotated object, and one on the GT itself (its anchors stay positive)
IGNORE = [Boxes(torch.tensor([UNANNOTATED, GT]))]


def _model(config_file=None, opts=()):
    kw = {} if config_file is None else {"config_file": config_file}
    cfg = tiny_cfg(opts=LT + ["MODEL.DEVICE", "cpu"] + list(opts), **kw)
    return build_model(cfg)


def test_rpn_ignores_background_anchors_on_the_unannotated_object():
    model = _model()
    rpn = model.proposal_generator
    rpn.batch_size_per_image = 10**9  # keep every labelled anchor: no random subsampling
    strides = [s for s in rpn.anchor_generator.strides]
    anchors = rpn.anchor_generator([torch.zeros(1, 1, 128 // s, 128 // s) for s in strides])
    base, _ = rpn.label_and_sample_anchors(anchors, _targets())
    with ignore_regions(model, IGNORE):
        ignored, _ = rpn.label_and_sample_anchors(anchors, _targets())
    base, ignored = base[0], ignored[0]
    covered = pairwise_iou(IGNORE[0], Boxes.cat(anchors)).amax(0) >= 0.5
    expect = base.clone()
    expect[(base == 0) & covered] = -1
    assert torch.equal(ignored, expect)
    assert ((base == 0) & covered).sum() > 0  # the unannotated object's anchors are demoted
    assert ((base == 1) & covered).sum() > 0 and (ignored[base == 1] == 1).all()  # GT kept
    assert rpn.ignore_boxes is None  # cleared after the block


def _proposals(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 90
    wh = 8 + torch.rand(n, 2, generator=g) * 40
    p = Instances((128, 128))
    p.proposal_boxes = Boxes(torch.cat([xy, xy + wh], 1))
    p.objectness_logits = -1.0 - torch.arange(n, dtype=torch.float32)  # identifies each row
    return [p]


def _by_row(props):
    """{proposal row: gt class} of sampled proposals (rows of the given proposals only)."""
    rows = (-props.objectness_logits - 1).round().long()
    given = props.objectness_logits < 0  # the appended GT proposals have positive logits
    return dict(zip(rows[given].tolist(), props.gt_classes[given].tolist()))


@pytest.mark.parametrize("config_file", [None, CASCADE, HTC])
def test_roi_sampler_ignores_background_proposals_only(config_file, storage):
    model = _model(config_file)
    heads = model.roi_heads
    heads.batch_size_per_image = 10**9  # sample every labelled proposal
    proposals = _proposals()
    base = _by_row(heads.label_and_sample_proposals(proposals, _targets())[0])
    with ignore_regions(model, IGNORE):
        out = heads.label_and_sample_proposals(proposals, _targets())[0]
    ignored = _by_row(out)
    covered = pairwise_iou(IGNORE[0], proposals[0].proposal_boxes).amax(0) >= 0.5
    k = heads.num_classes
    dropped = {r for r, c in base.items() if c == k and covered[r]}
    assert dropped and len(base) == 400  # some background proposals are covered
    assert ignored == {r: c for r, c in base.items() if r not in dropped}
    assert any(c != k and covered[r] for r, c in base.items())  # matched to GT: kept
    assert (out.objectness_logits > 0).sum() == 1  # the GT proposal, not the ignore boxes


@pytest.mark.parametrize("config_file", [CASCADE, HTC])
def test_cascade_later_stages_drop_ignored_proposals(config_file, storage):
    model = _model(config_file)
    heads = model.roi_heads
    proposals = _proposals(seed=1)
    covered = pairwise_iou(IGNORE[0], proposals[0].proposal_boxes).amax(0) >= 0.5
    base = heads._match_and_label_boxes([proposals[0][:]], 1, _targets())[0]
    with ignore_regions(model, IGNORE):
        out = heads._match_and_label_boxes([proposals[0][:]], 1, _targets())[0]
    rows = (-out.objectness_logits - 1).round().long()
    keep = ~((base.gt_classes == heads.num_classes) & covered)
    assert 0 < int((~keep).sum()) and torch.equal(rows, torch.arange(400)[keep])
    assert torch.equal(out.gt_classes, base.gt_classes[keep])


def _losses(model, batch, seed=0):
    """Losses of a fresh copy of ``model`` (the Seesaw loss accumulates class counts)."""
    torch.manual_seed(seed)
    return {k: float(v) for k, v in copy.deepcopy(model)(batch).items()}


@pytest.mark.parametrize("config_file", [None, CASCADE, HTC_NOCTX])
def test_without_ignore_boxes_losses_equal_detectron2(config_file, storage):
    kw = {} if config_file is None else {"config_file": config_file}
    torch.manual_seed(0)
    plain = build_model(tiny_cfg(opts=["MODEL.DEVICE", "cpu"], **kw))
    ours = _model(config_file)
    ours.load_state_dict(plain.state_dict())
    plain.train()
    ours.train()
    batch = make_batch(size=(128, 128))
    expected = _losses(plain, batch)
    assert _losses(ours, batch) == expected  # no ignore_boxes key
    empty = [{**x, "ignore_boxes": Boxes(torch.zeros(0, 4))} for x in batch]
    assert _losses(ours, empty) == expected  # ignore boxes present but none in any image
    some = [{**x, "ignore_boxes": Boxes(torch.tensor([UNANNOTATED]))} for x in batch]
    changed = _losses(ours, some)
    assert changed.keys() == expected.keys() and changed != expected


def test_model_without_support_rejects_ignore_boxes():
    with pytest.raises(ValueError, match="LongTailRPN"):
        with ignore_regions(torch.nn.Sequential(torch.nn.Linear(1, 1)), IGNORE):
            pass
