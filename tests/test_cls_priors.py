"""Balanced Softmax / logit adjustment, ECM loss, and the post-hoc calibrations (NorCal,
logit adjustment): golden values derived by hand, equivalences, and the predictor path."""

import math

import pytest
import torch
from conftest import REPO, make_batch, tiny_cfg
from detectron2.modeling import build_model
from torch.nn import functional as F

import lvis_longtail.modeling  # noqa: F401  (registers the ROI heads)
from lvis_longtail.engine import setup_cfg
from lvis_longtail.modeling.cls_losses import (
    BalancedSoftmax,
    ClassLogitCalibration,
    ECMLoss,
    GroupSoftmax,
    LogitAdjustedCE,
    SeesawLoss,
    SoftmaxCE,
    build_cls_calibration,
    build_cls_loss,
    ecm_loss,
    ecm_margins,
    set_calibration_strength,
)
from lvis_longtail.modeling.cls_losses.priors import centered_log_prior, training_class_counts

COUNTS = torch.tensor([1.0, 4.0])  # K = 2: pi = [1/5, 4/5], K pi = [0.4, 1.6]
NEW_TINY = ["balanced_softmax", "logit_adjustment", "ecm", "softmax_norcal"]


# ----------------------------------------------------------------------------- priors


def test_centered_log_prior_golden_and_uniform_is_zero():
    assert torch.allclose(centered_log_prior(COUNTS), torch.tensor([0.4, 1.6]).double().log())
    assert torch.allclose(centered_log_prior(torch.full((5,), 7.0)), torch.zeros(5).double())
    # a class without samples counts as 1: [1, 1, 2] -> K pi = [3/4, 3/4, 6/4]
    expected = torch.tensor([0.75, 0.75, 1.5]).double().log()
    assert torch.allclose(centered_log_prior(torch.tensor([0.0, 1.0, 2.0])), expected)


def test_counts_come_from_the_training_metadata():
    cfg = tiny_cfg(8)
    image = training_class_counts(cfg, "image")
    assert image.tolist() == [max(1, int(400 / (k + 1) ** 1.5)) for k in range(8)]
    assert training_class_counts(cfg, "instance").tolist() == (2 * image).tolist()
    with pytest.raises(ValueError, match="image, instance"):
        training_class_counts(cfg, "box")


# ----------------------------------------------------------------------------- logit adjustment


def test_logit_adjusted_ce_golden():
    z = torch.zeros(1, 3)
    # CE(z + log(K pi)) at z = 0: -log(0.4 / (0.4 + 1.6 + 1)) = log 7.5; background: log 3
    loss = LogitAdjustedCE(num_classes=2, class_counts=COUNTS, tau=1.0)
    assert loss(z, torch.tensor([0]))["loss_cls"].item() == pytest.approx(math.log(7.5))
    assert loss(z, torch.tensor([2]))["loss_cls"].item() == pytest.approx(math.log(3.0))
    # tau = 1/2: e^o = [sqrt(0.4), sqrt(1.6)] = sqrt(0.4) [1, 2]
    half = LogitAdjustedCE(num_classes=2, class_counts=COUNTS, tau=0.5)
    expected = math.log(3 + 1 / math.sqrt(0.4))
    assert half(z, torch.tensor([0]))["loss_cls"].item() == pytest.approx(expected)


def test_balanced_softmax_is_the_count_weighted_softmax():
    """p_j = n_j e^{z_j} / sum_k n_k e^{z_k}, background weighted by the mean count."""
    torch.manual_seed(0)
    counts = torch.tensor([3.0, 10.0, 50.0, 1.0])
    logits, gt = torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, 4, 2])
    weights = torch.cat([counts, counts.mean().reshape(1)])
    probs = weights * logits.exp() / (weights * logits.exp()).sum(dim=1, keepdim=True)
    expected = -probs[torch.arange(7), gt].log().mean()
    loss = BalancedSoftmax(num_classes=4, class_counts=counts)
    assert loss(logits, gt)["loss_cls"].item() == pytest.approx(expected.item(), rel=1e-6)
    # inference: the plain softmax of the unshifted logits
    assert torch.allclose(loss.predict_probs(logits), F.softmax(logits, dim=1))


def test_logit_adjustment_tau_zero_and_equal_counts_are_softmax_ce():
    torch.manual_seed(0)
    logits, gt = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 3, 1])
    reference = F.cross_entropy(logits, gt)
    tau0 = LogitAdjustedCE(num_classes=3, class_counts=torch.tensor([1.0, 9.0, 90.0]), tau=0.0)
    equal = BalancedSoftmax(num_classes=3, class_counts=torch.full((3,), 12.0))
    assert tau0(logits, gt)["loss_cls"].item() == pytest.approx(reference.item())
    assert equal(logits, gt)["loss_cls"].item() == pytest.approx(reference.item())


def test_logit_adjustment_from_config():
    cfg = tiny_cfg(
        8,
        opts=[
            "MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "LogitAdjustedCE",
            "MODEL.ROI_BOX_HEAD.LOGIT_ADJUSTMENT.TAU", "0.5",
            "MODEL.ROI_BOX_HEAD.LOGIT_ADJUSTMENT.COUNT", "instance",
        ],
    )  # fmt: skip
    loss = build_cls_loss(cfg, 8)
    prior = centered_log_prior(training_class_counts(cfg, "instance"))
    assert torch.allclose(loss.logit_offset, F.pad(0.5 * prior, (0, 1)).float())
    cfg = tiny_cfg(8, opts=["MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "BalancedSoftmax"])
    balanced = build_cls_loss(cfg, 8)
    prior = centered_log_prior(training_class_counts(cfg, "image"))
    assert balanced.tau == 1.0
    assert torch.allclose(balanced.logit_offset, F.pad(prior, (0, 1)).float())


# ----------------------------------------------------------------------------- ECM


def test_ecm_margins_golden():
    # n = [1], bg = 3 x 1 -> n = [1, 3], n- = [3, 1]; a = [3, 1/3]
    shift, weight = ecm_margins(torch.tensor([1.0]), fg_bg_ratio=3.0)
    assert shift.tolist() == pytest.approx([math.log(1 / 3) / 4, math.log(3) / 4])
    assert weight.tolist() == pytest.approx([3 * math.log(4 / 3), math.log(4) / 3])


def test_ecm_margins_are_the_reference_definitions():
    """shift = m+ - m- with m+ = log((n+^1/4 + n-^1/4) / n-^1/4), m- = log((..) / n+^1/4)."""
    counts = torch.tensor([2.0, 30.0, 700.0])
    shift, _ = ecm_margins(counts, fg_bg_ratio=6.3313)
    n = torch.cat([counts, counts.sum().reshape(1) * 6.3313]).double()
    pos, neg = n**0.25, (n.sum() - n) ** 0.25
    assert torch.allclose(shift, ((pos + neg) / neg).log() - ((pos + neg) / pos).log())


def test_ecm_loss_golden():
    """z = 0, one foreground RoI: u = shift, BCE(u0, 1) = softplus(log 3 / 4) = BCE(u1, 0)."""
    shift, weight = ecm_margins(torch.tensor([1.0]), fg_bg_ratio=3.0)
    loss = ecm_loss(torch.zeros(1, 2), torch.tensor([0]), shift, weight)
    expected = (3 * math.log(4 / 3) + math.log(4) / 3) * math.log(1 + 3**0.25)
    assert loss.item() == pytest.approx(expected)


def test_ecm_loss_matches_the_reference_form_and_gradients():
    """p+ = e^{z + m+} / (e^{z + m+} + e^{-z + m-}), L = sum_rc w_c BCE(p+, y) / R."""
    torch.manual_seed(0)
    counts = torch.tensor([2.0, 30.0, 700.0])
    module = ECMLoss(num_classes=3, class_counts=counts)
    logits, gt = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 3, 1])
    n = torch.cat([counts, counts.sum().reshape(1) * 6.3313]).double()
    pos, neg = n**0.25, (n.sum() - n) ** 0.25
    m_pos, m_neg = ((pos + neg) / neg).log(), ((pos + neg) / pos).log()
    a = (n.sum() - n) / n
    w = a * ((1 + a) / a).log()

    def reference(z):
        e_pos, e_neg = (z + m_pos).exp(), (-z + m_neg).exp()
        p_pos, p_neg = e_pos / (e_pos + e_neg), e_neg / (e_pos + e_neg)
        y = F.one_hot(gt, 4).double()
        return (-(p_pos.log() * y + p_neg.log() * (1 - y)) * w).sum() / z.shape[0]

    ours = logits.clone().requires_grad_(True)
    theirs = logits.clone().requires_grad_(True)
    value = module(ours, gt)["loss_cls"]
    value.backward()
    expected = reference(theirs)
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6)


def test_ecm_probabilities_and_config():
    cfg = tiny_cfg(8, opts=["MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "ECMLoss"])
    loss = build_cls_loss(cfg, 8)
    shift, weight = ecm_margins(training_class_counts(cfg, "image"), 6.3313)
    assert torch.allclose(loss.shift, shift.float()) and torch.allclose(loss.weight, weight.float())
    z = torch.tensor([[0.0] * 8 + [math.log(3.0)]])  # sigmoid: classes 1/2, background 3/4
    assert loss.predict_probs(z).tolist()[0] == pytest.approx([1 / 8] * 8 + [3 / 4])


# ----------------------------------------------------------------------------- calibration


def calibration_cfg(kind, loss_name="SoftmaxCE", extra=()):
    opts = ["MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", loss_name, "TEST.CLS_CALIBRATION", kind]
    return tiny_cfg(8, opts=opts + list(extra))


def test_norcal_golden():
    """K = 2, N = [1, 4], gamma = 1, z = 0: [1, 1/4, 1] / 2.25 = [4/9, 1/9, 4/9]."""
    loss = SoftmaxCE(num_classes=2)
    norcal = ClassLogitCalibration(3, loss.class_logit_columns(), COUNTS.log(), 1.0)
    probs = loss.predict_probs(norcal(torch.zeros(1, 3)))
    assert probs.tolist()[0] == pytest.approx([4 / 9, 1 / 9, 4 / 9])
    set_calibration_strength(norcal, 0.5)  # N^1/2 = [1, 2]: [1, 1/2, 1] / 2.5
    assert loss.predict_probs(norcal(torch.zeros(1, 3))).tolist()[0] == pytest.approx(
        [0.4, 0.2, 0.4]
    )


def test_posthoc_logit_adjustment_golden_and_inverse_of_training_offset():
    """z - log(K pi) at z = 0: e = [1/0.4, 1/1.6, 1] = [2.5, 0.625, 1] / 4.125."""
    loss = SoftmaxCE(num_classes=2)
    adjust = ClassLogitCalibration(3, loss.class_logit_columns(), centered_log_prior(COUNTS), 1.0)
    probs = loss.predict_probs(adjust(torch.zeros(1, 3)))
    assert probs.tolist()[0] == pytest.approx([2.5 / 4.125, 0.625 / 4.125, 1 / 4.125])
    # the post-hoc form undoes the training-time offset exactly
    trained = LogitAdjustedCE(num_classes=2, class_counts=COUNTS)
    z = torch.randn(4, 3)
    assert torch.allclose(adjust(z + trained.logit_offset), z, atol=1e-6)


def test_norcal_from_config_for_every_softmax_loss():
    for name in ["SoftmaxCE", "SeesawLoss", "GroupSoftmax", "BalancedSoftmax", "LogitAdjustedCE"]:
        cfg = calibration_cfg("norcal", name, ["TEST.NORCAL.GAMMA", "0.7"])
        loss = build_cls_loss(cfg, 8)
        calibration = build_cls_calibration(cfg, loss)
        log_n = training_class_counts(cfg, "image").log().float()
        columns = loss.class_logit_columns()
        assert calibration.strength == 0.7
        assert torch.allclose(calibration.offset[columns], log_n), name
        others = torch.ones(loss.num_logits, dtype=torch.bool)
        others[columns] = False
        assert (calibration.offset[others] == 0).all(), name
    assert build_cls_calibration(tiny_cfg(8), build_cls_loss(tiny_cfg(8), 8)) is None


def test_calibration_keeps_factorised_background_probabilities():
    """Seesaw: objectness untouched; BAGS: background group untouched, each group's sum kept."""
    torch.manual_seed(0)
    seesaw = SeesawLoss(num_classes=3)
    cal = ClassLogitCalibration(5, seesaw.class_logit_columns(), torch.tensor([0.0, 1.0, 2.0]), 1)
    z = torch.randn(4, 5)
    before, after = seesaw.predict_probs(z), seesaw.predict_probs(cal(z))
    assert torch.allclose(before[:, -1], after[:, -1])
    assert torch.allclose(before[:, :3].sum(1), after[:, :3].sum(1))
    expected = F.softmax(z[:, :3] - torch.tensor([0.0, 1.0, 2.0]), dim=1)
    assert torch.allclose(after[:, :3] / after[:, :3].sum(1, keepdim=True), expected)
    bags = GroupSoftmax(num_classes=4, instance_count=torch.tensor([5.0, 5.0, 50.0, 50.0]))
    offsets = torch.tensor([0.5, 1.0, 1.5, 2.0])
    cal = ClassLogitCalibration(bags.num_logits, bags.class_logit_columns(), offsets, 1.0)
    z = torch.randn(4, bags.num_logits)
    before, after = bags.predict_probs(z), bags.predict_probs(cal(z))
    assert torch.allclose(before[:, -1], after[:, -1])
    columns = bags.class_columns
    assert torch.allclose(cal(z)[:, columns], z[:, columns] - offsets)


@pytest.mark.parametrize("loss_name", ["SigmoidCE", "EQL", "EQLv2", "FederatedLoss", "ECMLoss"])
def test_calibration_rejects_sigmoid_losses(loss_name):
    cfg = calibration_cfg("norcal", loss_name)
    with pytest.raises(ValueError, match=f"CLS_LOSS_NAME '{loss_name}'.*sigmoid"):
        build_cls_calibration(cfg, build_cls_loss(cfg, 8))


def test_predictor_applies_calibration_in_predict_probs():
    cfg = calibration_cfg("logit_adjustment", extra=["TEST.LOGIT_ADJUSTMENT.TAU", "0.5"])
    model = build_model(cfg).eval()
    predictor = model.roi_heads.box_predictor
    torch.manual_seed(0)
    logits, deltas = torch.randn(5, 9), torch.randn(5, 32)
    proposals = [type("P", (), {"__len__": lambda self: 5})()]
    prior = centered_log_prior(training_class_counts(cfg, "image")).float()
    expected = F.softmax(logits - 0.5 * F.pad(prior, (0, 1)), dim=1)
    assert torch.allclose(predictor.predict_probs((logits, deltas), proposals)[0], expected)
    assert set_calibration_strength(model, 0.0) == 1
    plain = predictor.predict_probs((logits, deltas), proposals)[0]
    assert torch.allclose(plain, F.softmax(logits, dim=1))


def test_cascade_calibrates_every_stage():
    cfg = calibration_cfg(
        "norcal",
        extra=[
            "MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads",
            "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True",
        ],
    )  # fmt: skip
    assert set_calibration_strength(build_model(cfg), 0.3) == 3


# ----------------------------------------------------------------------------- tiny configs


@pytest.mark.parametrize("name", NEW_TINY)
def test_new_tiny_config_trains_two_iterations(name, storage):
    path = REPO / "configs" / "tiny" / f"mask_rcnn_R18_FPN_tiny_{name}.yaml"
    cfg = setup_cfg(str(path), ["MODEL.ROI_HEADS.NUM_CLASSES", "8"])
    cfg.defrost()
    cfg.DATASETS.TRAIN = tiny_cfg(8).DATASETS.TRAIN
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005)
    for iteration in range(2):
        losses = model(make_batch(2, 8, seed=iteration))
        total = sum(losses.values())
        assert torch.isfinite(total), losses
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        (out,) = model([{k: v for k, v in make_batch(1, 8)[0].items() if k != "instances"}])
    scores = out["instances"].scores
    assert ((scores >= 0) & (scores <= 1)).all() and (out["instances"].pred_classes < 8).all()
