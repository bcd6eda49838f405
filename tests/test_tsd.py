"""TSD (modeling/tsd.py): the re-sampled features against RoIAlign, the progressive
constraints against hand-computed values, gradient checks, the plain path with TSD off, the
heads with TSD on (training, inference from P_r, cascade refinement), the empty batch, the
config rules."""

import copy

import pytest
import torch
from conftest import make_batch, tiny_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torchvision.ops import roi_align

from lvis_longtail.config_check import ConfigError, check_config
from lvis_longtail.modeling.cls_losses import CLS_LOSS_REGISTRY
from lvis_longtail.modeling.tsd import (
    TSDHead,
    aligned_iou,
    pc_cls_loss,
    pc_loc_loss,
    translate_boxes,
    with_proposal_boxes,
)

CASCADE = ["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"]
HTC_ON = [  # every HTC switch on
    *(x for k in ("PER_STAGE_MASKS", "INTERLEAVED", "MASK_INFO_FLOW", "SAMPLE_BOX_STAGES")
      for x in (f"MODEL.ROI_HEADS.HTC.{k}", "True")),
    "MODEL.ROI_HEADS.HTC.MASK_STAGE_LOSS_WEIGHTS", "[1.0, 0.5, 0.25]",
]  # fmt: skip
HEADS = {
    "LongTailROIHeads": [],
    "LongTailCascadeROIHeads": CASCADE,
    "LongTailHTCLiteROIHeads": CASCADE + ["MODEL.ROI_CONTEXT_HEAD.CONV_DIM", "64"],
    "LongTailHTCROIHeads": CASCADE + ["MODEL.ROI_CONTEXT_HEAD.CONV_DIM", "64"] + HTC_ON,
}
TSD_ON = ["MODEL.ROI_BOX_HEAD.TSD.ENABLED", "True"]


def tsd_cfg(heads="LongTailROIHeads", tsd=True, extra=()):
    opts = ["MODEL.ROI_HEADS.NAME", heads, *HEADS[heads], *(TSD_ON if tsd else []), *extra]
    return tiny_cfg(opts=opts)


def head_and_pooler(channels=4, res=7, sampling_ratio=0):
    cfg = tsd_cfg(extra=["MODEL.ROI_BOX_HEAD.NUM_FC", "1", "MODEL.ROI_BOX_HEAD.FC_DIM", "16",
                         "MODEL.ROI_BOX_HEAD.NORM", "", "MODEL.ROI_BOX_HEAD.TSD.OFFSET_FC_DIM",
                         "8"])  # fmt: skip
    shape = ShapeSpec(channels=channels, height=res, width=res)
    head = TSDHead(cfg, shape)
    pooler = ROIPooler((res, res), (1 / 4, 1 / 8), sampling_ratio, "ROIAlignV2", 36, 4)
    return head, pooler


def maps(channels=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, 40, 48, generator=g, dtype=dtype),
            torch.randn(2, channels, 20, 24, generator=g, dtype=dtype)]  # fmt: skip


BOXES = [
    Boxes(torch.tensor([[10.0, 12.0, 60.0, 50.0], [30.5, 7.25, 44.0, 29.0]])),
    Boxes(torch.tensor([[5.0, 5.0, 120.0, 150.0], [70.0, 20.0, 90.0, 35.5], [2.0, 3.0, 9.0, 8.0]])),
]


def rois_levels(pooler, boxes=BOXES):
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b.tensor], 1)
                      for i, b in enumerate(boxes)])  # fmt: skip
    levels = assign_boxes_to_levels(boxes, pooler.min_level, pooler.max_level, 36, 4)
    return rois, levels


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_zero_offsets_give_the_sibling_features(sampling_ratio):
    head, pooler = head_and_pooler(sampling_ratio=sampling_ratio)
    feats = maps()
    plain = pooler(feats, BOXES)
    assert len(set(assign_boxes_to_levels(BOXES, 2, 3, 36, 4).tolist())) == 2  # both levels
    cls_shift, reg_shift = head.offsets(plain)  # a new head: zero-initialised last layers
    assert cls_shift.abs().max() == 0 and reg_shift.abs().max() == 0
    x_cls, x_reg = head.resample(feats, *rois_levels(pooler), pooler, cls_shift, reg_shift)
    torch.testing.assert_close(x_cls, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(x_reg, plain, rtol=0, atol=1e-5)


def test_constant_regression_offset_is_roialign_of_the_translated_box():
    head, pooler = head_and_pooler(sampling_ratio=2)
    feats = maps()
    rois, levels = rois_levels(pooler)
    shift = torch.tensor([[0.7, -1.3]]).expand(len(rois), 2)
    cls_shift = torch.zeros(len(rois), 2, 7, 7)
    _, x_reg = head.resample(feats, rois, levels, pooler, cls_shift, shift)
    moved = translate_boxes(rois[:, 1:], shift, 0.1)
    w, h = rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]
    expected_move = torch.stack([0.07 * w, -0.13 * h, 0.07 * w, -0.13 * h], 1)
    torch.testing.assert_close(moved, rois[:, 1:] + expected_move)
    for i in range(len(rois)):  # the level of P (P_r has P's size)
        level = int(levels[i])
        ref = roi_align(feats[level], torch.cat([rois[i : i + 1, :1], moved[i : i + 1]], 1),
                        (7, 7), 1 / 4 / 2**level, 2, aligned=True)  # fmt: skip
        torch.testing.assert_close(x_reg[i : i + 1], ref, rtol=0, atol=1e-5)


def test_bin_offsets_shift_each_bin():
    """One classification bin moved by a whole bin width samples its right neighbour."""
    head, pooler = head_and_pooler(sampling_ratio=2)
    feats = maps()
    rois, levels = rois_levels(pooler)
    cls_shift = torch.zeros(len(rois), 2, 7, 7)
    cls_shift[:, 0, 3, 2] = 1 / 7  # x by one bin
    x_cls, _ = head.resample(feats, rois, levels, pooler, cls_shift, torch.zeros(len(rois), 2))
    plain = pooler(feats, BOXES)
    torch.testing.assert_close(x_cls[:, :, 3, 2], plain[:, :, 3, 3], rtol=0, atol=1e-5)
    torch.testing.assert_close(x_cls[:, :, 4], plain[:, :, 4], rtol=0, atol=1e-5)


def test_pc_cls_loss_hand_computed():
    tsd = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1]])
    sib = torch.tensor([[0.6, 0.2, 0.2], [0.2, 0.1, 0.7], [0.05, 0.9, 0.05]])
    labels = torch.tensor([0, 2, 1])
    # row 0: p_s .6, m = min(.3, .4) = .3, relu(.6 + .3 - .5) = .4
    # row 1: p_s .7, m = .3, relu(.7 + .3 - .8) = .2
    # row 2: p_s .9, m = min(.3, .1) = .1, relu(.9 + .1 - .7) = .3
    loss = pc_cls_loss(tsd, sib, labels, 0.3)
    torch.testing.assert_close(loss, torch.tensor((0.4 + 0.2 + 0.3) / 3))
    assert pc_cls_loss(sib, tsd, labels, 0.0) == pytest.approx((0.1 + 0 + 0) / 3)


def test_pc_loc_loss_hand_computed():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0]])
    sib = torch.tensor([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 4.0, 4.0]])  # IoU .5, 1
    tsd = torch.tensor([[0.0, 0.0, 10.0, 6.0], [0.0, 0.0, 4.0, 2.0]])  # IoU .6, .5
    torch.testing.assert_close(aligned_iou(sib, gt), torch.tensor([0.5, 1.0]))
    # row 0: relu(.5 + min(.3, .5) - .6) = .2; row 1: relu(1 + min(.3, 0) - .5) = .5
    torch.testing.assert_close(pc_loc_loss(tsd, sib, gt, 0.3), torch.tensor(0.35))
    empty = torch.zeros(0, 4, requires_grad=True)
    zero = pc_loc_loss(empty, empty, empty, 0.3)
    assert zero == 0 and zero.requires_grad


def test_gradcheck_constraints_and_translation():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    sib = torch.softmax(torch.randn(5, 4, generator=g, dtype=torch.float64), 1)
    labels = torch.tensor([0, 3, 1, 2, 3])
    assert torch.autograd.gradcheck(lambda z: pc_cls_loss(z.softmax(1), sib, labels, 0.3), logits)
    boxes = torch.tensor([[1.0, 2.0, 9.0, 8.0], [3.0, 1.0, 7.0, 12.0]], dtype=torch.float64)
    gt = torch.tensor([[2.0, 2.5, 10.0, 9.0], [2.0, 2.0, 8.0, 10.0]], dtype=torch.float64)
    shift = torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=torch.float64, requires_grad=True)

    def loc(s):
        return pc_loc_loss(translate_boxes(boxes, s, 0.1), boxes, gt, 0.3)

    assert torch.autograd.gradcheck(loc, shift)


def test_gradcheck_resampling_offsets_and_features():
    head, pooler = head_and_pooler(channels=2, res=3, sampling_ratio=2)
    feats = [f[:, :, :12, :12].clone().requires_grad_() for f in maps(2, torch.float64)]
    boxes = [Boxes(torch.tensor([[3.3, 2.1, 30.2, 25.7]], dtype=torch.float64)),
             Boxes(torch.tensor([[8.4, 6.3, 19.1, 14.6]], dtype=torch.float64))]  # fmt: skip
    rois, levels = rois_levels(pooler, boxes)
    g = torch.Generator().manual_seed(1)
    cls_shift = (0.05 * torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    reg_shift = (0.3 * torch.randn(2, 2, generator=g, dtype=torch.float64)).requires_grad_()

    def run(c, r, f0, f1):
        x_cls, x_reg = head.resample([f0, f1], rois, levels, pooler, c, r)
        return x_cls, x_reg

    assert torch.autograd.gradcheck(run, (cls_shift, reg_shift, *feats), atol=1e-6)


def _losses(model, batch, seed=0):
    torch.manual_seed(seed)
    with EventStorage(0):
        return model(copy.deepcopy(batch))


@pytest.mark.parametrize("heads", list(HEADS))
def test_tsd_off_is_the_plain_path_and_on_keeps_its_sibling(heads):
    """TSD off builds no TSD module; the TSD model holds the plain model's parameters under
    the same names plus ``tsd_head.*``; with the plain weights loaded, its sibling, mask and
    RPN losses equal the plain losses (of a cascade: the first stage's and the RPN's; later
    stages start from the TSD boxes, as HTC's interleaved mask heads do)."""
    torch.manual_seed(0)
    plain = build_model(tsd_cfg(heads, tsd=False))
    tsd = build_model(tsd_cfg(heads))
    assert plain.roi_heads.tsd_head is None
    assert not any("tsd" in k for k in plain.state_dict())
    result = tsd.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".tsd_head." in k for k in result.missing_keys)
    batch = make_batch()
    base, with_tsd = _losses(plain, batch), _losses(tsd, batch)
    assert set(with_tsd) - set(base) and all(
        k.startswith("loss_tsd") for k in set(with_tsd) - set(base)
    )
    same = [k for k in base if heads == "LongTailROIHeads" or k.endswith("_stage0") or "rpn" in k]
    if heads == "LongTailHTCROIHeads":  # interleaved: mask head 0 trains on stage 0's TSD boxes
        same = [k for k in same if "mask" not in k]
    assert len(same) >= 4
    for k in same:
        assert torch.equal(base[k], with_tsd[k]), k


@pytest.mark.parametrize("heads", list(HEADS))
def test_trains_two_iterations_and_every_parameter_learns(heads):
    torch.manual_seed(0)
    model = build_model(tsd_cfg(heads, extra=["MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "SeesawLoss"]))
    before = {k: v.detach().clone() for k, v in model.named_parameters() if "tsd_head" in k}
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for it in range(2):
        losses = _losses(model, make_batch(seed=it), seed=it)
        assert all(torch.isfinite(v) for v in losses.values())
        assert any(k.startswith("loss_tsd_pc_cls") for k in losses)
        assert any(k.startswith("loss_tsd_pc_loc") for k in losses)
        opt.zero_grad()
        sum(losses.values()).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, missing
        opt.step()
    after = dict(model.named_parameters())
    stuck = [k for k, v in before.items() if torch.equal(v, after[k])]
    assert not stuck, stuck  # the offset MLPs too (zero last layers learn at step 1)


def _empty_inputs(model, heads):
    images = [torch.zeros(3, 64, 64)]
    with torch.no_grad():
        feats = model.backbone(model.preprocess_image([{"image": images[0]}]).tensor)
    prop = Instances((64, 64))
    prop.proposal_boxes = Boxes(torch.zeros(0, 4))
    prop.objectness_logits = torch.zeros(0)
    gt = Instances((64, 64))
    gt.gt_boxes = Boxes(torch.zeros(0, 4))
    gt.gt_classes = torch.zeros(0, dtype=torch.long)
    return feats, [prop], [gt]


@pytest.mark.parametrize("heads", list(HEADS))
def test_empty_batch_gives_every_tsd_parameter_a_gradient(heads):
    torch.manual_seed(0)
    model = build_model(tsd_cfg(heads))
    roi_heads = model.roi_heads
    feats, props, gts = _empty_inputs(model, heads)
    feats = {k: v.requires_grad_() for k, v in feats.items()}
    features = [feats[f] for f in roi_heads.box_in_features]
    stages = roi_heads.tsd_head if heads != "LongTailROIHeads" else [roi_heads.tsd_head]
    predictors = (
        roi_heads.box_predictor if heads != "LongTailROIHeads" else [roi_heads.box_predictor]
    )
    heads_ = roi_heads.box_head if heads != "LongTailROIHeads" else [roi_heads.box_head]
    with EventStorage(0):
        props = roi_heads.label_and_sample_proposals(props, gts)
        assert sum(len(p) for p in props) == 0
        total = 0
        for tsd, head, pred in zip(stages, heads_, predictors):
            out = tsd(features, props, roi_heads.box_pooler, (head, pred))
            losses = tsd.losses(out, props, pred)
            assert {"loss_tsd_cls", "loss_tsd_pc_cls", "loss_tsd_pc_loc", "loss_cls"} <= set(losses)
            assert all(torch.isfinite(v) and v == 0 for v in losses.values())
            total = total + sum(losses.values())
    total.backward()
    for tsd, head, pred in zip(stages, heads_, predictors):
        for module in (tsd, head, pred):
            missing = [n for n, p in module.named_parameters() if p.grad is None]
            assert not missing, missing


def test_inference_uses_the_tsd_head_and_decodes_against_the_translated_proposals():
    torch.manual_seed(0)
    model = build_model(tsd_cfg()).eval()
    tsd = model.roi_heads.tsd_head
    with torch.no_grad():
        tsd.reg_offset[2].bias.copy_(torch.tensor([1.5, -0.5]))
        tsd.predictor.bbox_pred.weight.zero_()
        tsd.predictor.bbox_pred.bias.zero_()

    def fail(*args):
        raise AssertionError("the sibling head runs at inference")

    model.roi_heads.box_head.forward = fail
    seen = {}
    inference = tsd.predictor.inference

    def spy(predictions, proposals):
        seen["boxes"] = tsd.predictor.predict_boxes(predictions, proposals)
        seen["proposals"] = [p.proposal_boxes.tensor.clone() for p in proposals]
        return inference(predictions, proposals)

    tsd.predictor.inference = spy
    features = {k: v for k, v in model.backbone(torch.randn(1, 3, 64, 64)).items()}
    prop = Instances((64, 64))
    prop.proposal_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 24.0], [20.0, 30.0, 28.0, 62.0]]))
    with torch.no_grad():
        model.roi_heads._forward_box(features, [prop])
    expected = prop.proposal_boxes.tensor + torch.tensor(
        [[4.8, -0.8, 4.8, -0.8], [1.2, -1.6, 1.2, -1.6]]
    )
    torch.testing.assert_close(seen["proposals"][0], expected)
    torch.testing.assert_close(seen["boxes"][0], expected.repeat(1, 8))  # zero deltas


@pytest.mark.parametrize("heads", list(HEADS)[1:])
def test_cascade_refines_each_stage_from_the_translated_proposals(heads):
    """Zero deltas and a constant regression offset per stage: each stage's proposals are the
    previous stage's translated ones, so the final boxes move by the three shifts."""
    torch.manual_seed(0)
    model = build_model(tsd_cfg(heads)).eval()
    for tsd in model.roi_heads.tsd_head:
        with torch.no_grad():
            tsd.reg_offset[2].bias.copy_(torch.tensor([1.0, 0.5]))
            tsd.predictor.bbox_pred.weight.zero_()
            tsd.predictor.bbox_pred.bias.zero_()
    last = model.roi_heads.tsd_head[-1].predictor
    seen = {}
    postprocess = last.postprocess

    def spy(boxes, scores, image_sizes):
        seen["boxes"] = boxes
        return postprocess(boxes, scores, image_sizes)

    last.postprocess = spy
    prop = Instances((200, 200))
    prop.proposal_boxes = Boxes(torch.tensor([[10.0, 20.0, 50.0, 60.0]]))
    features = model.backbone(torch.randn(1, 3, 64, 64))
    model.roi_heads._forward_state = None
    with torch.no_grad():
        model.roi_heads._forward_box(features, [prop])
    # each stage: + 0.1 (1.0 * 40, 0.5 * 40) = (4, 2)
    torch.testing.assert_close(seen["boxes"][0], torch.tensor([[22.0, 26.0, 62.0, 66.0]]))


def test_htc_interleaved_mask_heads_train_on_each_tsd_stage_boxes(monkeypatch):
    """HTC with TSD: mask head t (interleaved) takes the boxes TSD stage t decoded from its
    translated proposals; with zero deltas and a constant offset they are stage t's proposals
    moved by 0.1 x (1.0 w, 0.5 h), clipped, the empty ones dropped."""
    from lvis_longtail.modeling.roi_heads import htc

    torch.manual_seed(0)
    model = build_model(tsd_cfg("LongTailHTCROIHeads"))
    heads = model.roi_heads
    for tsd in heads.tsd_head:
        with torch.no_grad():
            tsd.reg_offset[2].bias.copy_(torch.tensor([1.0, 0.5]))
            tsd.predictor.bbox_pred.weight.zero_()
            tsd.predictor.bbox_pred.bias.zero_()
    stage_inputs, mask_inputs = [], []
    prepare, positives = heads._stage_prepare, htc.refined_positives

    def spy_prepare(proposals):
        stage_inputs.append([Boxes(p.proposal_boxes.tensor.clone()) for p in proposals])
        return prepare(proposals)

    def spy_positives(refined, *args):
        mask_inputs.append([r.proposal_boxes.tensor.clone() for r in refined])
        return positives(refined, *args)

    monkeypatch.setattr(heads, "_stage_prepare", spy_prepare)
    monkeypatch.setattr(htc, "refined_positives", spy_positives)
    losses = _losses(model, make_batch())
    assert {f"loss_mask_stage{t}" for t in range(3)} <= set(losses)
    assert len(stage_inputs) == len(mask_inputs) == 3
    for boxes, refined in zip(stage_inputs, mask_inputs):
        for b, r in zip(boxes, refined):
            wh = b.tensor[:, 2:] - b.tensor[:, :2]
            moved = Boxes(b.tensor + (0.1 * torch.tensor([1.0, 0.5]) * wh).repeat(1, 2))
            moved.clip((96, 128))
            torch.testing.assert_close(r, moved.tensor[moved.nonempty()])


def test_with_proposal_boxes_keeps_fields():
    p = Instances((10, 10))
    p.proposal_boxes = Boxes(torch.zeros(2, 4))
    p.gt_classes = torch.tensor([1, 2])
    (q,) = with_proposal_boxes([p], torch.ones(2, 4))
    assert torch.equal(q.gt_classes, p.gt_classes) and q.proposal_boxes.tensor.sum() == 8
    assert p.proposal_boxes.tensor.sum() == 0


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.ROI_HEADS.NAME", "StandardROIHeads"], "run TSD heads"),
        (["MODEL.ROI_BOX_HEAD.POOLER_TYPE", "DeformROIAlignV2"], "ROIAlignV2"),
        (["MODEL.ROI_BOX_HEAD.TSD.PC_LOC_MARGIN", "1.5"], "PC_LOC_MARGIN"),
        (["MODEL.ROI_BOX_HEAD.TSD.GAMMA", "0.0"], "GAMMA"),
    ],
)
def test_config_rules(opts, message):
    cfg = tiny_cfg(opts=TSD_ON + opts)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
    cfg.MODEL.ROI_BOX_HEAD.TSD.ENABLED = False
    if "StandardROIHeads" in opts or "DeformROIAlignV2" in opts:
        check_config(cfg)  # fine without TSD


@pytest.mark.parametrize("loss", sorted(CLS_LOSS_REGISTRY._obj_map))
def test_every_classification_loss_works_on_the_tsd_classifier(loss):
    """Training (the TSD terms, the constraint on each loss's probabilities) and inference
    (scores from the TSD classifier through the loss's predict_probs) for every loss."""
    torch.manual_seed(0)
    model = build_model(tsd_cfg(extra=["MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", loss]))
    assert model.roi_heads.tsd_head.predictor.cls_loss is not model.roi_heads.box_predictor.cls_loss
    assert type(model.roi_heads.tsd_head.predictor.cls_loss).__name__ == loss
    losses = _losses(model, make_batch())
    assert {"loss_tsd_cls", "loss_tsd_pc_cls", "loss_tsd_pc_loc", "loss_cls"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}])
    scores = out[0]["instances"].scores
    assert len(scores) and bool(((scores >= 0) & (scores <= 1)).all())
