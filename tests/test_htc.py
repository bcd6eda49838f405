"""HTC without the semantic branch (LongTailHTCROIHeads): HTC-Lite bit for bit with its
switches off; interleaved execution (each mask head's RoIs are its own stage's refined boxes,
re-matched at that stage's IoU); the stages' sampling; the mask information flow at inference
(computed by hand) and in training (where the gradients go); per-stage mask loss weights;
every mask option, CARAFE and the context head, also on an empty batch."""

import pytest
import torch
from conftest import make_batch
from detectron2.modeling.matcher import Matcher
from detectron2.structures import BitMasks, Boxes, Instances, pairwise_iou
from test_htc_lite import MASK_ALL_ON, SIZE, K, images, infer, model_of, train_step

from lvis_longtail.modeling.roi_heads import LongTailHTCLiteROIHeads, LongTailHTCROIHeads
from lvis_longtail.modeling.roi_heads.htc import refined_positives, sample_stage

HTC = ["MODEL.ROI_HEADS.NAME", "LongTailHTCROIHeads"]
LITE = ["MODEL.ROI_HEADS.NAME", "LongTailHTCLiteROIHeads"]
OFF = [
    "MODEL.ROI_HEADS.HTC.PER_STAGE_MASKS", False,
    "MODEL.ROI_HEADS.HTC.INTERLEAVED", False,
    "MODEL.ROI_HEADS.HTC.MASK_INFO_FLOW", False,
    "MODEL.ROI_HEADS.HTC.SAMPLE_BOX_STAGES", False,
]  # fmt: skip
CARAFE = ["MODEL.ROI_MASK_HEAD.UPSAMPLE_TYPE", "carafe"]
IOUS = (0.5, 0.6, 0.7)  # the cascade's stage IoUs (detectron2's defaults)


def _value(x):
    return getattr(x, "tensor", x)


@pytest.mark.parametrize(
    "opts",
    [[], [*MASK_ALL_ON, *CARAFE, "MODEL.ROI_HEADS.HTC_LITE.MASK_MAX_POSITIVES", -1]],
    ids=["plain", "all_mask_options"],
)
def test_with_the_switches_off_it_is_htc_lite(storage, opts):
    lite = model_of(*LITE, *opts)
    htc = model_of(*HTC, *OFF, *opts)
    assert isinstance(htc.roi_heads, LongTailHTCROIHeads)
    assert htc.roi_heads.context_head is not None  # the tiny options keep the context head
    assert htc.state_dict().keys() == lite.state_dict().keys()
    assert all(torch.equal(v, lite.state_dict()[k]) for k, v in htc.state_dict().items())
    a, b = train_step(lite, seed=3), train_step(htc, seed=3)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), {k: (a[k], b[k]) for k in a}
    for pa, pb in zip(lite.parameters(), htc.parameters()):
        assert (pa.grad is None) == (pb.grad is None)
        assert pa.grad is None or torch.equal(pa.grad, pb.grad)
    for x, y in zip(infer(lite), infer(htc)):
        assert len(x) > 0 and x.get_fields().keys() == y.get_fields().keys()
        for field, value in x.get_fields().items():
            assert torch.equal(_value(value), _value(y.get(field))), field


def spy_stage_masks(monkeypatch, heads):
    """Record, per mask stage, the RoIs the head trains on and the box stages' state."""
    seen = []
    original = heads._stage_mask_losses

    def spy(features, instances, stage, context):
        state = heads._forward_state
        seen.append(
            (stage, instances, list(state["stage_proposals"]), state.get("stage_predictions"))
        )
        return original(features, instances, stage, context)

    monkeypatch.setattr(heads, "_stage_mask_losses", spy)
    return seen


def test_interleaved_heads_train_on_their_stages_refined_boxes(storage, monkeypatch):
    model = model_of(*HTC)
    heads = model.roi_heads
    assert heads.per_stage_masks and heads.interleaved and heads.mask_info_flow
    seen = spy_stage_masks(monkeypatch, heads)
    model.train()
    batch = make_batch(num_classes=K, size=SIZE, seed=1)
    losses = model(batch)
    assert {f"loss_mask_stage{t}" for t in range(3)} <= set(losses)
    assert [s[0] for s in seen] == [0, 1, 2]
    cap = int(heads.batch_size_per_image * heads.positive_fraction)
    for stage, instances, proposals, predictions in seen:
        refined = heads.box_predictor[stage].predict_boxes(predictions[stage], proposals[stage])
        previous = [p.proposal_boxes.tensor for p in proposals[stage]]  # stage's own input
        for inst, d, boxes, before in zip(instances, batch, refined, previous):
            gt = d["instances"]
            assert 0 < len(inst) <= cap
            iou = pairwise_iou(inst.proposal_boxes, gt.gt_boxes)
            best = iou.argmax(dim=1)
            assert (iou.max(dim=1).values >= IOUS[stage]).all()
            assert torch.equal(inst.gt_classes, gt.gt_classes[best])
            assert torch.equal(inst.gt_masks.tensor, gt.gt_masks.tensor[best])
            clipped = Boxes(boxes.detach().clone())
            clipped.clip(inst.image_size)
            candidates = torch.cat([clipped.tensor, gt.gt_boxes.tensor])
            rows = inst.proposal_boxes.tensor
            assert (rows[:, None] == candidates[None]).all(-1).any(1).all()  # refined or GT
            not_gt = ~(rows[:, None] == gt.gt_boxes.tensor[None]).all(-1).any(1)
            assert not_gt.any()  # refined boxes among them, not only the GT
            assert not (rows[not_gt][:, None] == before[None]).all(-1).any(1).any()


def test_without_interleaving_heads_train_on_their_stages_positives(storage, monkeypatch):
    model = model_of(*HTC, "MODEL.ROI_HEADS.HTC.INTERLEAVED", False)
    heads = model.roi_heads
    seen = spy_stage_masks(monkeypatch, heads)
    model.train()
    batch = make_batch(num_classes=K, size=SIZE, seed=1)
    model(batch)
    for stage, instances, proposals, _ in seen:
        for inst, props, d in zip(instances, proposals[stage], batch):
            fg = props.gt_classes < K
            assert len(inst) == int(fg.sum()) > 0
            assert torch.equal(inst.proposal_boxes.tensor, props.proposal_boxes.tensor[fg])
            iou = pairwise_iou(inst.proposal_boxes, d["instances"].gt_boxes)
            assert (iou.max(dim=1).values >= IOUS[stage]).all()
            best = d["instances"].gt_masks.tensor[iou.argmax(dim=1)]
            assert torch.equal(inst.gt_masks.tensor, best)


def _gts(boxes, classes):
    gts = Instances((40, 40))
    gts.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    gts.gt_classes = torch.tensor(classes, dtype=torch.long)
    masks = torch.zeros(len(classes), 40, 40, dtype=torch.bool)
    for i in range(len(classes)):
        masks[i, i] = True  # one distinct row per GT
    gts.gt_masks = BitMasks(masks)
    return gts


def _boxes(rows):
    p = Instances((40, 40))
    p.proposal_boxes = Boxes(torch.tensor(rows, dtype=torch.float32).reshape(-1, 4))
    return p


def test_refined_positives_by_hand():
    matcher = Matcher([0.7], [0, 1], allow_low_quality_matches=False)
    gts = _gts([[0, 0, 10, 10], [20, 20, 30, 30]], [3, 5])
    # IoU with GT 0: 1.0, 0.8, 0.6; row 3 with GT 1: 0.9; row 4: 0 with both
    refined = _boxes(
        [[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 6], [20, 21, 30, 30], [5, 30, 9, 39]]
    )
    (out,) = refined_positives([refined], [gts], matcher, 100)
    # positives: rows 0, 1 (GT 0), 3 (GT 1, IoU 0.9), then the two GT boxes themselves
    expected = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 8], [20, 21, 30, 30],
                             [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)  # fmt: skip
    assert torch.equal(out.proposal_boxes.tensor, expected)
    assert out.gt_classes.tolist() == [3, 3, 5, 3, 5]
    assert torch.equal(out.gt_masks.tensor, gts.gt_masks.tensor[[0, 0, 1, 0, 1]])
    assert torch.equal(out.gt_boxes.tensor, gts.gt_boxes.tensor[[0, 0, 1, 0, 1]])
    draws = set()
    for seed in range(10):
        torch.manual_seed(seed)
        (capped,) = refined_positives([refined], [gts], matcher, 2)
        rows = [tuple(r) for r in capped.proposal_boxes.tensor.tolist()]
        assert len(capped) == 2 and set(rows) <= {tuple(r) for r in expected.tolist()}
        # each kept box keeps its own GT
        assert capped.gt_classes.tolist() == [3 if r[0] == 0 else 5 for r in rows]
        draws.add(tuple(sorted(rows)))
    assert len(draws) > 1  # random subsets
    (none,) = refined_positives([refined], [_gts([], [])], matcher, 100)
    assert len(none) == 0 and none.has("gt_masks") and none.has("gt_classes")


def test_sample_stage_by_hand():
    matcher = Matcher([0.5], [0, 1], allow_low_quality_matches=False)
    gts = _gts([[0, 0, 10, 10]], [2])
    rows = [[0, 0, 10, 9], [0, 0, 10, 8]] + [[x, 20, x + 5, 25] for x in range(0, 35, 5)]
    refined = _boxes(rows)  # 2 positives, 7 background; the GT box is added: 3 positives
    for seed in range(5):
        torch.manual_seed(seed)
        (out,) = sample_stage([refined], [gts], matcher, 4, 0.5, num_classes=K)
        iou = pairwise_iou(out.proposal_boxes, gts.gt_boxes)[:, 0]
        assert len(out) == 4 and int((iou >= 0.5).sum()) == 2  # 4 RoIs, half positive
        assert out.get_fields().keys() == {"proposal_boxes"}
    # background boxes covered by an ignore box are never drawn
    ignore = torch.zeros(len(rows) + 1, dtype=torch.bool)
    ignore[2:8] = True  # all background boxes but the last
    for seed in range(5):
        torch.manual_seed(seed)
        (out,) = sample_stage([refined], [gts], matcher, 8, 0.5, K, [ignore])
        background = out.proposal_boxes.tensor[
            pairwise_iou(out.proposal_boxes, gts.gt_boxes)[:, 0] < 0.5
        ]
        assert background.tolist() == [rows[8]]
    (empty,) = sample_stage([refined], [_gts([], [])], matcher, 4, 0.5, K)
    assert len(empty) == 4  # background only


def test_box_stages_are_sampled(storage, monkeypatch):
    model = model_of(*HTC, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16)
    heads = model.roi_heads
    seen = spy_stage_masks(monkeypatch, heads)
    train_step(model, seed=1)
    proposals = seen[-1][2]
    for stage in (1, 2):
        for p in proposals[stage]:
            assert len(p) == 16  # stage 0's 16 refined boxes + the GT boxes, sampled to 16
            assert int((p.gt_classes < K).sum()) <= 4  # POSITIVE_FRACTION 0.25
    assert storage.history("stage2/roi_head/num_bg_samples").latest() >= 12


def test_inference_averages_the_heads_through_the_flow_by_hand():
    model = model_of(*HTC).eval()
    heads = model.roi_heads
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, 14, 14, generator=g)
    classes = torch.tensor([0, 3, 5, 1, 3])
    rows = torch.arange(5)
    with torch.no_grad():
        got = heads._predict_mask_logits(x, classes)
        probs, prev = [], None
        for t, head in enumerate(heads.mask_head):
            inputs = x if prev is None else x + heads.mask_flows[t - 1](prev)
            h = inputs
            for conv in head.conv_norm_relus:
                h = conv(h)
            prev = h
            probs.append(head.layers(inputs)[rows, classes].sigmoid())  # detectron2's path
    assert got.shape == (5, 1, 28, 28) and got.dtype == torch.float32
    expected = torch.stack(probs).mean(0)
    torch.testing.assert_close(got[:, 0].sigmoid(), expected, rtol=0, atol=1e-6)
    assert all((p - expected).abs().max() > 1e-4 for p in probs)  # not one head's mask


@pytest.mark.parametrize("flow", [True, False])
def test_flow_carries_later_stages_gradients_into_earlier_heads(storage, flow):
    model = model_of(*HTC, "MODEL.ROI_HEADS.HTC.MASK_INFO_FLOW", flow,
                     "MODEL.ROI_HEADS.HTC.MASK_STAGE_LOSS_WEIGHTS", [0.0, 1.0, 0.0])  # fmt: skip
    train_step(model, seed=1)
    heads = model.roi_heads
    head0, head1, head2 = heads.mask_head

    def norm(p):
        return float(p.grad.abs().sum())

    assert norm(head1.mask_fcn1.weight) > 0 and norm(head1.predictor.weight) > 0
    assert norm(head0.predictor.weight) == 0 and norm(head2.mask_fcn1.weight) == 0
    assert (norm(head0.mask_fcn1.weight) > 0) == flow  # stage 1's loss through the flow
    if flow:
        assert norm(heads.mask_flows[0].weight) > 0 and norm(heads.mask_flows[1].weight) == 0
    else:
        assert heads.mask_flows is None


def test_stage_loss_weights_scale_each_stages_mask_losses(storage):
    weights = "MODEL.ROI_HEADS.HTC.MASK_STAGE_LOSS_WEIGHTS"
    a = train_step(model_of(*HTC, *MASK_ALL_ON), seed=2)  # 1, 0.5, 0.25
    b = train_step(model_of(*HTC, *MASK_ALL_ON, weights, [1.0, 1.0, 1.0]), seed=2)
    assert a.keys() == b.keys()
    for name in ("loss_mask", "loss_mask_dice", "loss_mask_boundary"):
        for stage, w in enumerate((1.0, 0.5, 0.25)):
            key = f"{name}_stage{stage}"
            assert b[key] > 0 and torch.equal(a[key], b[key] * w), key
    assert torch.equal(a["loss_maskiou"], b["loss_maskiou"])  # not stage-weighted


def _empty_batch():
    batch = make_batch(num_classes=K, size=SIZE, seed=4)
    for d in batch:
        d["instances"] = d["instances"][:0]
    return batch


@pytest.mark.parametrize("empty", [False, True], ids=["batch", "empty_batch"])
def test_every_option_trains_every_parameter(storage, empty):
    model = model_of(*HTC, *MASK_ALL_ON, *CARAFE)
    heads = model.roi_heads
    assert heads.mask_iou_head is not None and heads.context_head is not None
    assert all(type(h.deconv).__name__ == "CARAFE" for h in heads.mask_head)
    assert all(h.boundary_predictor is not None for h in heads.mask_head)
    model.train()
    torch.manual_seed(0)
    losses = model(_empty_batch() if empty else make_batch(num_classes=K, size=SIZE, seed=0))
    sum(losses.values()).backward()
    expected = {f"{n}_stage{t}" for n in ("loss_mask", "loss_mask_dice", "loss_mask_boundary")
                for t in range(3)} | {"loss_maskiou", "loss_context"}  # fmt: skip
    assert expected <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # DDP without find_unused_parameters needs every one in the graph
    if not empty:
        assert float(heads.mask_head[2].predictor.weight.grad.abs().sum()) > 0
    outputs = infer(model)
    assert all(len(o) > 0 and o.has("mask_scores") for o in outputs)


def test_flow_from_heads_without_convs(storage):
    """NUM_CONV 0: each head passes its RoI features on, so the flow convs take their width
    (not CONV_DIM); it trains and infers."""
    model = model_of(*HTC, "MODEL.ROI_MASK_HEAD.NUM_CONV", 0, "MODEL.ROI_MASK_HEAD.CONV_DIM", 16)
    assert all(f.in_channels == f.out_channels for f in model.roi_heads.mask_flows)
    model.train()
    losses = model(make_batch(num_classes=K, size=SIZE, seed=0))
    sum(losses.values()).backward()
    assert all(len(o) > 0 for o in infer(model))


def test_chunked_mask_inference_equals_one_shot():
    model = model_of(*HTC, *MASK_ALL_ON, "MODEL.ROI_MASK_HEAD.TEST_CHUNK_SIZE", 0)
    whole = infer(model)
    model.roi_heads.mask_test_chunk_size = 5
    for a, b in zip(whole, infer(model)):
        assert len(a) > 0
        torch.testing.assert_close(a.pred_masks, b.pred_masks, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.mask_scores, b.mask_scores, rtol=0, atol=1e-6)


def test_forward_with_given_boxes_is_the_full_inference():
    model = model_of(*HTC, *MASK_ALL_ON).eval()  # context head on: computed from the features
    inputs = images()
    with torch.no_grad():
        detections = model.inference(inputs, do_postprocess=False)
        features = model.backbone(model.preprocess_image(inputs).tensor)
        given = [Instances(d.image_size, pred_boxes=d.pred_boxes, pred_classes=d.pred_classes,
                           scores=d.scores) for d in detections]  # fmt: skip
        again = model.roi_heads.forward_with_given_boxes(features, given)
    for full, other in zip(detections, again):
        assert len(full) > 0
        assert torch.equal(full.pred_masks, other.pred_masks)
        assert torch.equal(full.mask_scores, other.mask_scores)


def test_mask_max_positives_caps_every_head(storage, monkeypatch):
    model = model_of(*HTC, "MODEL.ROI_HEADS.HTC_LITE.MASK_MAX_POSITIVES", 1)
    seen = spy_stage_masks(monkeypatch, model.roi_heads)
    train_step(model, seed=1)
    assert len(seen) == 3
    assert all(len(i) <= 1 for _, instances, _, _ in seen for i in instances)
    assert all(sum(len(i) for i in instances) > 0 for _, instances, _, _ in seen)


def test_lite_heads_are_not_the_htc_class():
    lite = model_of(*LITE).roi_heads
    assert type(lite) is LongTailHTCLiteROIHeads and not hasattr(lite, "mask_flows")


@pytest.mark.parametrize(
    "opts, match",
    [
        (["MODEL.ROI_HEADS.HTC.PER_STAGE_MASKS", False], "need PER_STAGE_MASKS"),
        (["MODEL.ROI_HEADS.HTC.MASK_STAGE_LOSS_WEIGHTS", [1.0, 0.5]], "MASK_STAGE_LOSS_WEIGHTS"),
    ],
)
def test_bad_htc_options_are_named(opts, match):
    with pytest.raises(ValueError, match=match):
        model_of(*HTC, *opts)
