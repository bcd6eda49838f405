"""The box predictor and ROI heads with every classification loss: one training iteration and
one inference of the tiny Mask R-CNN, cascade heads, checkpoints, and equivalence of the
SoftmaxCE baseline with detectron2's own box predictor."""

import pytest
import torch
from conftest import make_batch, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

import lvis_longtail.modeling  # noqa: F401  (registers the ROI heads)
from lvis_longtail.modeling.cls_losses import CLS_LOSS_REGISTRY
from lvis_longtail.modeling.fast_rcnn import (
    LongTailFastRCNNOutputLayers,
    NormedLinear,
    build_classifier,
)
from lvis_longtail.modeling.roi_heads import LongTailCascadeROIHeads

K = 8
ALL_NAMES = sorted(name for name, _ in CLS_LOSS_REGISTRY)  # every registered loss
# shrink the tiny model further: these tests check plumbing, not accuracy
SMALL = [
    "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 32,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
    "TEST.DETECTIONS_PER_IMAGE", 20,
]  # fmt: skip


def small_model(*opts, seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(K, opts=SMALL + list(opts)))


def train_step(model, seed=0):
    model.train()
    torch.manual_seed(seed)
    losses = model(make_batch(num_classes=K, seed=seed))
    sum(losses.values()).backward()
    return losses


def infer(model):
    model.eval()
    batch = make_batch(num_classes=K, seed=5)
    inputs = [{"image": x["image"], "height": x["height"], "width": x["width"]} for x in batch]
    with torch.no_grad():
        return model(inputs)


def check_train_and_infer(model, storage, extra_terms=()):
    losses = train_step(model)
    for name in ("loss_cls", "loss_box_reg", "loss_mask", *extra_terms):
        assert any(k.startswith(name) for k in losses), name
    assert all(torch.isfinite(v) for v in losses.values())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    scalars = storage.latest()
    assert any(k.endswith("cls_accuracy") for k in scalars)
    outputs = infer(model)
    assert len(outputs) == 2
    for out in outputs:
        inst = out["instances"]
        assert len(inst) > 0 and ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < K)).all()
        assert inst.pred_masks.shape[1:] == (96, 128)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_train_iteration_and_inference(name, storage):
    model = small_model("MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", name)
    predictor = model.roi_heads.box_predictor
    assert isinstance(predictor, LongTailFastRCNNOutputLayers)
    assert predictor.cls_score.out_features == predictor.cls_loss.num_logits
    extra = ("loss_cls_objectness",) if name == "SeesawLoss" else ()
    check_train_and_infer(model, storage, extra)


def test_normed_linear_classifier(storage):
    model = small_model(
        "MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "SeesawLoss",
        "MODEL.ROI_BOX_HEAD.PREDICTOR_TYPE", "NormedLinear",
        "MODEL.ROI_BOX_HEAD.NORMED_SCALE", 10.0,
    )  # fmt: skip
    classifier = model.roi_heads.box_predictor.cls_score
    assert isinstance(classifier, NormedLinear) and classifier.scale == 10.0
    check_train_and_infer(model, storage, ("loss_cls_objectness",))


def test_unknown_classifier_type_from_python_is_rejected():
    assert isinstance(build_classifier("NormedLinear", 16, K + 1), NormedLinear)
    with pytest.raises(ValueError, match=r"classifier type 'Cosine' is not one of \('Linear', "):
        build_classifier("Cosine", 16, K + 1)


def test_sigmoid_prior_bias_and_class_agnostic_regression(storage):
    model = small_model(
        "MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "EQLv2",
        "MODEL.ROI_BOX_HEAD.PREDICTOR_TYPE", "NormedLinear",
        "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True,
    )  # fmt: skip
    predictor = model.roi_heads.box_predictor
    assert torch.sigmoid(predictor.cls_score.bias).allclose(torch.tensor(0.5))  # zero bias
    assert predictor.bbox_pred.out_features == 4
    check_train_and_infer(model, storage)


def test_cascade_heads_with_long_tail_predictors(storage):
    model = small_model(
        "MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads",
        "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True,
        "MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "SeesawLoss",
    )  # fmt: skip
    heads = model.roi_heads
    assert isinstance(heads, LongTailCascadeROIHeads) and heads.num_cascade_stages == 3
    predictors = list(heads.box_predictor)
    assert all(isinstance(p, LongTailFastRCNNOutputLayers) for p in predictors)
    assert len({id(p.cls_loss) for p in predictors}) == 3  # own loss state per stage
    weights = [p.box2box_transform.weights for p in predictors]
    assert weights == [(10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)]
    check_train_and_infer(model, storage, ("loss_cls_objectness_stage2",))
    assert all(p.cls_loss.cum_samples.sum() > 0 for p in predictors)


def test_cascade_heads_share_the_long_tail_mask_branch(storage):
    model = small_model(
        "MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads",
        "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True,
        "MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT", "area_ratio",
        "MODEL.ROI_MASK_HEAD.TEST_AREA_RATIO", "two_pass",
        "MODEL.ROI_MASKIOU_HEAD.ENABLED", True,
    )  # fmt: skip
    heads = model.roi_heads
    assert heads.mask_level_assignment == "area_ratio" and heads.mask_iou_head is not None
    check_train_and_infer(model, storage, ("loss_maskiou",))
    assert all(out["instances"].has("mask_scores") for out in infer(model))


def test_softmax_ce_is_detectron2s_default_predictor(storage):
    # detectron2's poolers hard-code the canonical box size 224
    ours = small_model(
        "MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "SoftmaxCE", "MODEL.ROI_HEADS.CANONICAL_BOX_SIZE", 224
    )
    theirs = small_model("MODEL.ROI_HEADS.NAME", "StandardROIHeads")
    theirs.load_state_dict(ours.state_dict())  # same parameter names and shapes
    losses_ours, losses_theirs = train_step(ours, seed=3), train_step(theirs, seed=3)
    assert losses_ours.keys() == losses_theirs.keys()
    for name in losses_ours:
        assert losses_ours[name].item() == pytest.approx(losses_theirs[name].item(), rel=1e-6)
    out_ours, out_theirs = infer(ours), infer(theirs)
    for a, b in zip(out_ours, out_theirs):
        assert torch.equal(a["instances"].pred_classes, b["instances"].pred_classes)
        assert torch.allclose(a["instances"].scores, b["instances"].scores)


@pytest.mark.parametrize(
    "name, buffers",
    [("SeesawLoss", ["cum_samples"]), ("EQLv2", ["pos_grad", "neg_grad", "pos_neg"])],
)
def test_loss_statistics_survive_a_checkpoint(name, buffers, storage, tmp_path):
    model = small_model("MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", name)
    train_step(model)
    loss = model.roi_heads.box_predictor.cls_loss
    saved = {b: getattr(loss, b).clone() for b in buffers}
    assert all(v.abs().sum() > 0 for v in saved.values())
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")

    fresh = small_model("MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", name)
    fresh_loss = fresh.roi_heads.box_predictor.cls_loss
    assert not all(torch.equal(getattr(fresh_loss, b), saved[b]) for b in buffers)
    DetectionCheckpointer(fresh).load(str(tmp_path / "model.pth"))
    for b in buffers:
        assert torch.equal(getattr(fresh_loss, b), saved[b]), b
        assert getattr(fresh_loss, b).dtype == torch.float64


def head_inputs(predictor, num_rois=12, seed=0):
    """Box features and sampled proposals (with GT) for a box predictor, without a model."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(num_rois, 16, generator=g)
    boxes = torch.rand(num_rois, 4, generator=g) * 50
    boxes[:, 2:] += boxes[:, :2] + 5
    proposals = Instances((100, 100))
    proposals.proposal_boxes = Boxes(boxes)
    proposals.gt_boxes = Boxes(boxes + torch.randn(num_rois, 4, generator=g))
    proposals.gt_classes = torch.tensor([0, 1, 2, 7, 5] + [K] * (num_rois - 5))
    return predictor(features), [proposals]


def test_cls_loss_weight_scales_every_classification_term(storage):
    def head(weight):
        torch.manual_seed(0)
        cfg = tiny_cfg(K, opts=["MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "SeesawLoss",
                                "MODEL.ROI_BOX_HEAD.CLS_LOSS_WEIGHT", weight])  # fmt: skip
        return LongTailFastRCNNOutputLayers(cfg, ShapeSpec(channels=16))

    one, three = head(1.0), head(3.0)
    l1, l3 = one.losses(*head_inputs(one)), three.losses(*head_inputs(three))
    for name in ("loss_cls", "loss_cls_objectness"):
        assert l3[name].item() == pytest.approx(3 * l1[name].item(), rel=1e-6)
    assert l3["loss_box_reg"].item() == pytest.approx(l1["loss_box_reg"].item(), rel=1e-6)
    # the box regression loss is detectron2's, computed by the parent's box_reg_loss
    predictions, proposals = head_inputs(one)
    expected = one.box_reg_loss(
        proposals[0].proposal_boxes.tensor, proposals[0].gt_boxes.tensor,
        predictions[1], proposals[0].gt_classes,
    )  # fmt: skip
    assert l1["loss_box_reg"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_losses_without_proposals(storage):
    cfg = tiny_cfg(K, opts=["MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "EQLv2"])
    predictor = LongTailFastRCNNOutputLayers(cfg, ShapeSpec(channels=16))
    predictions = predictor(torch.randn(0, 16))
    losses = predictor.losses(predictions, [])
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(v.item() == 0 for v in losses.values())


def test_bags_fine_tune_starts_from_a_softmax_checkpoint(tmp_path):
    """The decoupled recipe: a trained softmax-CE model's weights load into a GroupSoftmax
    model; only the classifier (another shape) keeps its fresh initialisation."""
    softmax = small_model("MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "SoftmaxCE")
    DetectionCheckpointer(softmax, save_dir=str(tmp_path)).save("softmax")
    bags = small_model("MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "GroupSoftmax", seed=1)
    assert not torch.equal(bags.backbone.bottom_up.stem.conv1.weight,
                           softmax.backbone.bottom_up.stem.conv1.weight)  # fmt: skip
    fresh_classifier = bags.roi_heads.box_predictor.cls_score.weight.clone()
    DetectionCheckpointer(bags).load(str(tmp_path / "softmax.pth"))
    theirs = softmax.state_dict()
    for name, value in bags.state_dict().items():
        if name.startswith("roi_heads.box_predictor.cls_score"):
            assert value.shape != theirs[name].shape
        else:
            assert torch.equal(value, theirs[name]), name
    assert torch.equal(bags.roi_heads.box_predictor.cls_score.weight, fresh_classifier)
