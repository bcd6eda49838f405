"""HTC-Lite: context targets and loss, fusion, equivalence with the cascade, gt_masks at the
last stage, one mask pass at inference, chunked mask inference on every path,
forward_with_given_boxes with the context, loss state through a checkpoint."""

import math

import pytest
import torch
from conftest import make_batch, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou

from lvis_longtail.data.image_labels import NEG_CLASSES_FIELD, attach_neg_classes
from lvis_longtail.modeling.roi_heads import LongTailHTCLiteROIHeads
from lvis_longtail.modeling.roi_heads.context_head import (
    GlobalContextHead,
    context_targets,
    fuse_context,
)
from lvis_longtail.modeling.roi_heads.htc_lite import cap_foreground, num_foreground

K = 6
SMALL = [
    "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", 48,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 24,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 48,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
    "MODEL.ROI_CONTEXT_HEAD.CONV_DIM", 32,
    "MODEL.ROI_CONTEXT_HEAD.NORM", "GN",
    "TEST.DETECTIONS_PER_IMAGE", 12,
]  # fmt: skip
SIZE = (64, 80)
HTC = ["MODEL.ROI_HEADS.NAME", "LongTailHTCLiteROIHeads"]
MASK_ALL_ON = [
    "MODEL.ROI_MASK_HEAD.NAME", "DiceBCEMaskHead",
    "MODEL.ROI_MASK_HEAD.BOUNDARY_LOSS_WEIGHT", 1.0,
    "MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE", "NormedConv",
    "MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT", "area_ratio",
    "MODEL.ROI_MASK_HEAD.TEST_AREA_RATIO", "two_pass",
    "MODEL.ROI_MASKIOU_HEAD.ENABLED", True,
]  # fmt: skip


def model_of(*opts, seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(K, opts=SMALL + list(opts)))


def train_step(model, seed=0):
    model.train()
    torch.manual_seed(seed)
    losses = model(make_batch(num_classes=K, size=SIZE, seed=seed))
    sum(losses.values()).backward()
    return losses


def images(seed=5):
    return [
        {k: d[k] for k in ("image", "height", "width")}
        for d in make_batch(num_classes=K, size=SIZE, seed=seed)
    ]


def infer(model):
    model.eval()
    with torch.no_grad():
        return [o["instances"] for o in model(images())]


def gts(classes, neg=None):
    inst = Instances((8, 8))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    inst.gt_boxes = Boxes(torch.zeros(len(classes), 4))
    if neg is not None:
        attach_neg_classes(inst, neg, {c + 1: c for c in range(K)})  # dataset ids 1..K
    return inst


def test_context_targets_multi_hot_and_federated_mask():
    targets = [gts([1, 3, 1], neg=[3, 5]), gts([0], neg=[])]  # neg: dataset ids 3, 5 = 2, 4
    target, counted = context_targets(targets, K, federated=False)
    assert target.tolist() == [[0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert counted.all()
    target, counted = context_targets(targets, K, federated=True)
    assert counted.tolist() == [
        [False, True, True, True, True, False],  # positives 1, 3; verified negatives 2, 4
        [True, False, False, False, False, False],
    ]
    with pytest.raises(ValueError, match=NEG_CLASSES_FIELD):
        context_targets([gts([1])], K, federated=True)


def test_context_loss_counts_only_verified_classes_when_federated():
    targets = [gts([1], neg=[3]), gts([0], neg=[])]
    logits = torch.zeros(2, K)
    logits[0, 5] = 100.0  # unverified class 5 of image 0 predicted present: BCE = 100
    for federated, expected in [
        (False, (100 + (2 * K - 1) * math.log(2)) / (2 * K)),
        (True, math.log(2)),  # 3 counted entries, all at logit 0
    ]:
        head = GlobalContextHead(
            in_feature="p6", in_channels=4, num_classes=K, conv_dim=4, loss_weight=3.0,
            federated=federated,
        )  # fmt: skip
        loss = head.losses(logits, targets)["loss_context"].item()
        assert loss == pytest.approx(3.0 * expected, rel=1e-5)


def test_fusion_adds_each_images_own_vector():
    x = torch.zeros(3, 2, 4, 4)
    context = torch.tensor([[1.0, 2.0], [30.0, 40.0]])
    fused = fuse_context(x, torch.tensor([0, 1, 0]), context)
    assert fused[:, :, 2, 3].tolist() == [[1, 2], [30, 40], [1, 2]]
    assert torch.equal(fused.amin(dim=(2, 3)), fused.amax(dim=(2, 3)))  # constant over S x S
    assert fuse_context(x, torch.tensor([0, 1, 0]), None) is x
    with pytest.raises(ValueError, match="CONV_DIM"):
        fuse_context(x, torch.tensor([0, 1, 0]), torch.zeros(2, 3))


def test_without_context_on_stage_0_it_is_the_cascade(storage):
    opts = ["MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "SeesawLoss",
            "MODEL.ROI_BOX_HEAD.PREDICTOR_TYPE", "NormedLinear"]  # fmt: skip
    cascade = model_of("MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads", *opts)
    htc = model_of(*HTC, *opts, "MODEL.ROI_CONTEXT_HEAD.ENABLED", False,
                   "MODEL.ROI_HEADS.HTC_LITE.MASK_TRAIN_STAGE", 0)  # fmt: skip
    assert htc.state_dict().keys() == cascade.state_dict().keys()
    assert all(torch.equal(v, cascade.state_dict()[k]) for k, v in htc.state_dict().items())
    a, b = train_step(cascade, seed=3), train_step(htc, seed=3)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), {k: (a[k], b[k]) for k in a}
    for pa, pb in zip(cascade.parameters(), htc.parameters()):
        assert (pa.grad is None) == (pb.grad is None)
        assert pa.grad is None or torch.equal(pa.grad, pb.grad)
    for x, y in zip(infer(cascade), infer(htc)):
        assert len(x) > 0
        for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
            u, v = x.get(field), y.get(field)
            assert torch.equal(getattr(u, "tensor", u), getattr(v, "tensor", v)), field


def test_last_stage_proposals_carry_matching_gt_masks(storage, monkeypatch):
    model = model_of(*HTC)
    heads = model.roi_heads
    assert isinstance(heads, LongTailHTCLiteROIHeads) and heads.mask_train_stage == 2
    seen = {}
    original = heads._forward_mask

    def spy(features, instances, context=None):
        seen["instances"], seen["context"] = instances, context
        return original(features, instances, context)

    monkeypatch.setattr(heads, "_forward_mask", spy)
    model.train()
    batch = make_batch(num_classes=K, size=SIZE, seed=1)
    losses = model(batch)
    assert {"loss_context", "loss_mask", "loss_cls_stage2"} <= set(losses)
    assert seen["context"].shape == (2, 32)
    fg_total = 0
    for props, d in zip(seen["instances"], batch):
        gt = d["instances"]
        fg = props.gt_classes < K
        fg_total += int(fg.sum())
        iou = pairwise_iou(props.proposal_boxes[fg], gt.gt_boxes)
        best = iou.argmax(dim=1)
        assert (iou.max(dim=1).values >= 0.7).all()  # the last stage's IoU threshold
        assert torch.equal(props.gt_masks.tensor[fg], gt.gt_masks.tensor[best])
        assert torch.equal(props.gt_classes[fg], gt.gt_classes[best])
    assert fg_total > 0


def test_mask_positive_cap_draws_a_subset_of_each_images_foreground(storage, monkeypatch):
    bg = K
    props = []
    for classes in ([0, bg, 1, 2, bg, 3, 4], [bg, 5, bg]):
        p = Instances((8, 8))
        p.gt_classes = torch.tensor(classes)
        p.row = torch.arange(len(classes))
        props.append(p)
    assert cap_foreground(props, K, 0) is props  # 0: no cap
    torch.manual_seed(0)
    capped = cap_foreground(props, K, 2)
    assert [len(p) for p in capped] == [2, 1]  # 5 positives -> 2; 1 positive -> kept
    rows = capped[0].row.tolist()
    assert len(set(rows)) == 2 and set(rows) <= {0, 2, 3, 5, 6}  # distinct positives
    assert capped[1].row.tolist() == [1]
    draws = set()
    for seed in range(8):
        torch.manual_seed(seed)
        draws.add(tuple(sorted(cap_foreground(props, K, 2)[0].row.tolist())))
    assert len(draws) > 1  # random, not the first ones
    assert [len(p) for p in cap_foreground(props, K, [0, 5])] == [0, 1]  # one cap per image
    assert [int(num_foreground(p, K)) for p in props] == [5, 1]

    # in the model: the key caps the RoIs the mask head trains on
    model = model_of(*HTC, "MODEL.ROI_HEADS.HTC_LITE.MASK_MAX_POSITIVES", 1)
    heads = model.roi_heads
    assert heads.mask_max_positives == 1
    seen = {}
    original = heads._forward_mask

    def spy(features, instances, context=None):
        seen["n"] = [len(i) for i in instances]
        return original(features, instances, context)

    monkeypatch.setattr(heads, "_forward_mask", spy)
    train_step(model, seed=1)
    assert seen["n"] and all(n <= 1 for n in seen["n"]) and sum(seen["n"]) > 0
    # -1: as many as the first stage's positives of each image
    first = {}
    model = model_of(*HTC, "MODEL.ROI_HEADS.HTC_LITE.MASK_MAX_POSITIVES", -1)
    heads = model.roi_heads
    original_box, original_mask = heads._forward_box, heads._forward_mask

    def spy_box(features, proposals, targets=None):
        first["n"] = [int(num_foreground(p, K)) for p in proposals]
        return original_box(features, proposals, targets)

    def spy_mask(features, instances, context=None):
        seen["n"] = [len(i) for i in instances]
        return original_mask(features, instances, context)

    monkeypatch.setattr(heads, "_forward_box", spy_box)
    monkeypatch.setattr(heads, "_forward_mask", spy_mask)
    train_step(model, seed=1)
    assert all(n <= f for n, f in zip(seen["n"], first["n"])) and sum(seen["n"]) > 0


def test_mask_head_runs_once_at_inference_on_the_final_boxes():
    model = model_of(*HTC, "MODEL.ROI_MASK_HEAD.TEST_CHUNK_SIZE", 0)
    calls = []
    predict_masks = model.roi_heads.mask_head.predict_masks

    def counted(x, classes):
        calls.append(x.shape[0])
        return predict_masks(x, classes)

    model.roi_heads.mask_head.predict_masks = counted
    outputs = infer(model)
    assert calls == [sum(len(o) for o in outputs)]


CHUNK_PATHS = {
    "standard_two_pass_scoring": MASK_ALL_ON,
    "cascade": ["MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads"],
    "htc_lite_all_mask_options": HTC + MASK_ALL_ON,
}


@pytest.mark.parametrize("path", list(CHUNK_PATHS))
def test_chunked_mask_inference_equals_one_shot(path):
    model = model_of(*CHUNK_PATHS[path], "MODEL.ROI_MASK_HEAD.TEST_CHUNK_SIZE", 0)
    whole = infer(model)
    model.roi_heads.mask_test_chunk_size = 5  # 12 detections per image: chunks cross images
    chunked = infer(model)
    for a, b in zip(whole, chunked):
        assert len(a) > 0
        torch.testing.assert_close(a.pred_masks, b.pred_masks, rtol=0, atol=1e-6)
        assert a.has("mask_scores") == ("ROI_MASKIOU_HEAD" in str(CHUNK_PATHS[path]))
        if a.has("mask_scores"):
            torch.testing.assert_close(a.mask_scores, b.mask_scores, rtol=0, atol=1e-6)


def test_every_mask_option_trains_on_htc_lite(storage):
    model = model_of(*HTC, *MASK_ALL_ON)
    losses = train_step(model)
    assert {"loss_mask", "loss_mask_dice", "loss_mask_boundary", "loss_maskiou"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.roi_heads.context_head.predictor.weight.grad.abs().sum() > 0
    assert all(out.has("mask_scores") for out in infer(model))


def test_forward_with_given_boxes_carries_the_context():
    model = model_of(*HTC).eval()
    inputs = images()
    with torch.no_grad():
        detections = model.inference(inputs, do_postprocess=False)  # network input frame
        features = model.backbone(model.preprocess_image(inputs).tensor)
        heads = model.roi_heads
        vector = heads.context_head(features)[0]
        runs = [
            heads.forward_with_given_boxes(features, [_boxes_only(d) for d in detections], ctx)
            for ctx in (None, vector, torch.zeros_like(vector))
        ]
    for full, implicit, explicit, zero in zip(detections, *runs):
        assert len(full) > 0
        assert torch.equal(implicit.pred_masks, full.pred_masks)
        assert torch.equal(explicit.pred_masks, full.pred_masks)
        assert not torch.equal(zero.pred_masks, full.pred_masks)  # the context reached the masks


def _boxes_only(inst: Instances) -> Instances:
    out = Instances(inst.image_size)
    for k in ("pred_boxes", "pred_classes", "scores"):
        out.set(k, inst.get(k))
    return out


def test_every_stage_keeps_its_loss_state_through_a_checkpoint(storage, tmp_path):
    opts = [*HTC, "MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "SeesawLoss"]
    model = model_of(*opts)
    train_step(model)
    counts = [p.cls_loss.cum_samples.clone() for p in model.roi_heads.box_predictor]
    assert len(counts) == 3 and all(c.sum() > 0 for c in counts)
    assert len({id(p.cls_loss) for p in model.roi_heads.box_predictor}) == 3  # own state each
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    fresh = model_of(*opts, seed=1)
    assert all(p.cls_loss.cum_samples.sum() == 0 for p in fresh.roi_heads.box_predictor)
    DetectionCheckpointer(fresh).load(str(tmp_path / "model.pth"))
    for saved, p in zip(counts, fresh.roi_heads.box_predictor):
        assert torch.equal(p.cls_loss.cum_samples, saved)


def test_federated_context_trains_with_the_image_labels(storage):
    model = model_of(*HTC, "MODEL.ROI_CONTEXT_HEAD.FEDERATED", True)
    batch = make_batch(num_classes=K, size=SIZE, seed=2)
    model.train()
    with pytest.raises(ValueError, match="LongTailDatasetMapper"):
        model(batch)
    for d in batch:
        attach_neg_classes(d["instances"], [K], {K: K - 1})
    losses = model(batch)
    assert torch.isfinite(losses["loss_context"]) and losses["loss_context"] > 0


@pytest.mark.parametrize(
    "opts, match",
    [
        (["MODEL.ROI_CONTEXT_HEAD.CONV_DIM", 16], "CONV_DIM"),
        (["MODEL.ROI_CONTEXT_HEAD.IN_FEATURE", "p7"], "IN_FEATURE"),
    ],
)
def test_bad_htc_lite_options_are_named(opts, match):
    with pytest.raises(ValueError, match=match):
        model_of(*HTC, *opts)
