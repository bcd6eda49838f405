"""Golden-value tests of the box classification losses (lvis_longtail.modeling.cls_losses).

Every expected value is derived by hand from the methods' equations (docs/methods.md) on tiny
logits chosen so that softmax/sigmoid take simple values (e.g. z = log([1, 2, 3]) gives softmax
[1/6, 2/6, 3/6]; z = 0 gives sigmoid 1/2 and BCE log 2).
"""

import math

import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling.roi_heads.fast_rcnn import _log_classification_stats
from torch.nn import functional as F

import lvis_longtail.modeling  # noqa: F401  (registers the ROI heads)
from lvis_longtail.config import ConfigError
from lvis_longtail.config_check import check_config
from lvis_longtail.modeling.cls_losses import (
    CLS_LOSS_REGISTRY,
    EQL,
    EQLv2,
    FederatedLoss,
    GroupSoftmax,
    SeesawLoss,
    SigmoidCE,
    SoftmaxCE,
    build_cls_loss,
    eql_loss,
    eqlv2_class_weights,
    eqlv2_gradient_stats,
    eqlv2_loss,
    federated_loss,
    group_softmax_loss,
    sample_federated_classes,
    seesaw_loss,
    sigmoid_ce_loss,
)
from lvis_longtail.modeling.cls_losses.group_softmax import assign_groups, sample_group_rows
from lvis_longtail.modeling.cls_losses.seesaw import seesaw_log_factors
from lvis_longtail.modeling.cls_losses.sigmoid import one_hot_bce
from lvis_longtail.modeling.fast_rcnn import NormedLinear

LOG2, LOG3 = math.log(2.0), math.log(3.0)
ALL_NAMES = sorted(name for name, _ in CLS_LOSS_REGISTRY)  # a new loss is covered as registered


def one_hot(gt, num_columns):
    """(R,) labels -> (R, num_columns) float one-hot; labels >= num_columns give zero rows."""
    return F.one_hot(gt, max(num_columns, int(gt.max()) + 1))[:, :num_columns].to(torch.float32)


def explicit_bce_sum(logits, targets, weights):
    """The definition: sum of W * BCE, from torch's own BCE-with-logits."""
    bce = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return (weights * bce).sum()


def log_t(values):
    return torch.tensor(values, dtype=torch.float32).log()


def build_all(num_classes=8):
    """Every registered loss for ``num_classes`` classes, built from the tiny config."""
    losses = {}
    for name in ALL_NAMES:
        cfg = tiny_cfg(num_classes, opts=["MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", name])
        losses[name] = build_cls_loss(cfg, num_classes)
    return losses


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_doc():
    shipped = {"SoftmaxCE", "SigmoidCE", "SeesawLoss", "EQL", "EQLv2", "GroupSoftmax",
               "FederatedLoss", "BalancedSoftmax", "LogitAdjustedCE", "ECMLoss"}  # fmt: skip
    assert shipped <= set(ALL_NAMES)  # none dropped
    assert "obj(cfg, num_classes)" in CLS_LOSS_REGISTRY.__doc__


def test_unknown_loss_name_is_named_and_the_check_lists_valid_names():
    cfg = tiny_cfg(8, opts=["MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "Focal"])
    with pytest.raises(KeyError, match="No object named 'Focal'"):
        build_cls_loss(cfg, 8)
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    for name in ["Focal"] + ALL_NAMES:
        assert name in str(err.value)


def test_contract_of_every_loss():
    """num_logits, prediction layout (R, K+1) in [0, 1], labels in [0, K], loss dict."""
    k = 8
    expected_logits = {
        "SoftmaxCE": k + 1,
        "SigmoidCE": k,
        "SeesawLoss": k + 2,
        "EQL": k,
        "EQLv2": k + 1,
        "FederatedLoss": k + 1,
        # unit instance counts [800, 282, 152, 100, 70, 54, 42, 34]: bins [10, 100) and
        # [100, 1000) hold 4 classes each, [0, 10) and >= 1000 are empty and dropped
        "GroupSoftmax": k + 1 + 3,
        "BalancedSoftmax": k + 1,
        "LogitAdjustedCE": k + 1,
        "ECMLoss": k + 1,
    }
    for name, loss in build_all(k).items():
        assert loss.num_logits == expected_logits[name]
        logits = torch.randn(5, loss.num_logits)
        probs = loss.predict_probs(logits)
        assert probs.shape == (5, k + 1) and probs.dtype == torch.float32
        assert ((probs >= 0) & (probs <= 1)).all()
        assert ((loss.predict_classes(logits) >= 0) & (loss.predict_classes(logits) <= k)).all()
        terms = loss(logits, torch.tensor([0, 3, k, k, 7]))
        assert "loss_cls" in terms and all(t.dim() == 0 for t in terms.values())


@pytest.mark.parametrize("name", ALL_NAMES)
def test_empty_batch_is_a_zero_in_the_graph(name):
    loss = build_all()[name]
    logits = torch.randn(0, loss.num_logits, requires_grad=True)
    terms = loss(logits, torch.zeros(0, dtype=torch.long))
    total = sum(terms.values())
    assert total.item() == 0.0 and total.requires_grad
    total.backward()
    assert logits.grad.shape == (0, loss.num_logits)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_all_background_and_fp16_give_finite_fp32_losses(name):
    loss = build_all()[name]
    torch.manual_seed(0)
    for gt in [torch.full((6,), 8), torch.tensor([0, 1, 2, 8, 8, 5])]:
        logits = (3 * torch.randn(6, loss.num_logits)).half().requires_grad_(True)
        terms = loss(logits, gt)
        assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())
        sum(terms.values()).backward()
        assert torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_autocast_does_not_lower_the_loss_precision(name):
    """Under mixed precision the loss math still runs in fp32 (CPU autocast uses bfloat16)."""
    loss = build_all()[name]
    torch.manual_seed(0)
    logits, gt = 3 * torch.randn(512, loss.num_logits), torch.randint(0, 9, (512,))
    loss.eval()  # no statistics update, so both calls see the same state
    torch.manual_seed(1)  # same class / "others" sampling in both calls
    reference = loss(logits, gt)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(logits, gt)
    for term, value in reference.items():
        assert mixed[term].dtype == torch.float32
        assert mixed[term].item() == pytest.approx(value.item(), rel=1e-6), term


@pytest.mark.parametrize("name", ALL_NAMES)
def test_gradient_signs(name):
    """Lowering the loss raises the GT score: d loss / d (GT class probability) < 0 along the
    gradient, i.e. one small gradient step increases the predicted probability of the GT class
    and of background on background RoIs."""
    loss = build_all()[name]
    torch.manual_seed(1)
    gt = torch.tensor([0, 3, 8, 6])
    logits = torch.randn(4, loss.num_logits, requires_grad=True)
    sum(loss(logits, gt).values()).backward()
    with torch.no_grad():
        before = loss.predict_probs(logits)
        after = loss.predict_probs(logits - 0.1 * logits.grad)
    rows = torch.arange(4)
    fg = gt < 8
    assert (after[rows, gt][fg] > before[rows, gt][fg]).all()


def test_log_accuracy_matches_detectron2_for_softmax(storage):
    torch.manual_seed(0)
    logits, gt = torch.randn(40, 6), torch.randint(0, 6, (40,))
    SoftmaxCE(num_classes=5).log_accuracy(logits, gt, prefix="ours")
    _log_classification_stats(logits, gt, prefix="d2")
    latest = storage.latest()
    for key in ["cls_accuracy", "fg_cls_accuracy", "false_negative"]:
        assert latest[f"ours/{key}"][0] == pytest.approx(latest[f"d2/{key}"][0])


# ----------------------------------------------------------------------------- softmax


def test_softmax_ce_golden():
    logits = torch.stack([log_t([1, 2, 3]), log_t([1, 2, 3])])  # softmax 1/6, 2/6, 3/6
    terms = SoftmaxCE(num_classes=2)(logits, torch.tensor([2, 0]))
    assert terms["loss_cls"].item() == pytest.approx((math.log(2) + math.log(6)) / 2, rel=1e-6)
    probs = SoftmaxCE(num_classes=2).predict_probs(logits)
    assert torch.allclose(probs[0], torch.tensor([1 / 6, 2 / 6, 3 / 6]))


# ----------------------------------------------------------------------------- seesaw


def test_seesaw_p_q_zero_is_softmax_ce_plus_objectness_ce():
    # RoI 0: class logits log[1,2,3], label 2 -> CE = log 2; RoI 1: background.
    # Objectness logits [0, 0] -> 2-way CE log 2 for both RoIs.
    logits = torch.tensor([[0.0, LOG2, LOG3, 0.0, 0.0], [1.0, -1.0, 2.0, 0.0, 0.0]])
    counts = torch.tensor([100.0, 1.0, 5.0, 1000.0])
    loss_cls, loss_obj = seesaw_loss(logits, torch.tensor([2, 3]), counts, p=0.0, q=0.0)
    assert loss_cls.item() == pytest.approx(LOG2 / 2, rel=1e-6)  # sum over positives / R
    assert loss_obj.item() == pytest.approx(LOG2, rel=1e-6)
    # equals F.cross_entropy over the class logits of the positives, summed / R
    torch.manual_seed(0)
    logits, gt = torch.randn(10, 7), torch.tensor([0, 1, 4, 5, 5, 2, 3, 4, 1, 5])
    loss_cls, _ = seesaw_loss(logits, gt, torch.rand(6) * 100, p=0.0, q=0.0)
    pos = gt < 5
    expected = F.cross_entropy(logits[pos, :5], gt[pos], reduction="sum") / 10
    assert loss_cls.item() == pytest.approx(expected.item(), rel=1e-6)


def test_seesaw_mitigation_shifts_by_minus_log_count_ratio():
    counts = torch.tensor([1e6, 1.0, 1.0])
    z = torch.tensor([[0.5, 0.2, -0.3], [0.5, 0.2, -0.3]])
    log_s = seesaw_log_factors(z, torch.tensor([0, 1]), counts, p=1.0, q=0.0, eps=1e-2)
    shift = math.log(1e6)
    # label 0 (frequent): both rarer classes shifted by -log(N_i / N_j); label 1: nothing
    assert torch.allclose(log_s, torch.tensor([[0.0, -shift, -shift], [0.0, 0.0, 0.0]]))
    logits = torch.cat([z[:1], torch.zeros(1, 2)], dim=1)
    counts = torch.tensor([1e3, 1.0, 1.0, 1.0])
    loss_cls, _ = seesaw_loss(logits, torch.tensor([0]), counts, p=1.0, q=0.0)
    expected = -0.5 + math.log(math.exp(0.5) + (math.exp(0.2) + math.exp(-0.3)) / 1e3)
    assert loss_cls.item() == pytest.approx(expected, abs=1e-7)


def test_seesaw_compensation_shifts_by_log_score_ratio():
    # class logits [0, log 4, 0]: sigma = [1/6, 4/6, 1/6]; label 0: sigma_1 / sigma_0 = 4, so
    # with q = 1 logit 1 becomes log 4 + log 4 = log 16; class 2 (equal score) is unchanged.
    logits = torch.tensor([[0.0, math.log(4.0), 0.0, 0.0, 0.0]])
    loss_cls, _ = seesaw_loss(logits, torch.tensor([0]), torch.ones(4), p=0.0, q=1.0, eps=1e-2)
    assert loss_cls.item() == pytest.approx(math.log(1 + 16 + 1), rel=1e-6)
    # sigma_i below eps: the ratio uses eps instead (log C_ij = q (log sigma_j - log eps))
    z = torch.tensor([[-20.0, 0.0, 0.0]])
    log_s = seesaw_log_factors(z, torch.tensor([0]), torch.ones(3), p=0.0, q=2.0, eps=1e-2)
    sigma_j = 1 / (2 + math.exp(-20.0))
    expected = 2 * (math.log(sigma_j) - math.log(1e-2))
    assert log_s[0, 1].item() == pytest.approx(expected, rel=1e-5) and log_s[0, 0] == 0


def test_seesaw_counts_are_updated_before_the_loss():
    loss = SeesawLoss(num_classes=3, p=1.0, q=0.0)
    gt = torch.tensor([0, 0, 0, 1, 3, 3])
    logits = torch.zeros(6, 5)
    terms = loss(logits, gt)
    assert loss.cum_samples.tolist() == [3, 1, 0, 2]
    # with N = [3, 1, 0 -> 1]: label-0 RoIs see both other classes shifted by -log 3
    per_label0 = -0 + math.log(1 + 2 / 3)
    expected = (3 * per_label0 + math.log(3)) / 6  # label 1: N_0 > N_1 is no mitigation
    assert terms["loss_cls"].item() == pytest.approx(expected, rel=1e-6)
    loss.eval()
    loss(logits, gt)  # no update outside training
    assert loss.cum_samples.tolist() == [3, 1, 0, 2]
    assert "cum_samples" in loss.state_dict()


def test_seesaw_probabilities():
    logits = torch.cat([log_t([1, 1, 2]), torch.tensor([math.log(3.0), 0.0])])[None]
    probs = SeesawLoss(num_classes=3).predict_probs(logits)
    assert torch.allclose(probs, torch.tensor([[0.1875, 0.1875, 0.375, 0.25]]))


def test_seesaw_all_background_has_no_class_gradient():
    logits = torch.randn(4, 5, requires_grad=True)
    loss_cls, loss_obj = seesaw_loss(logits, torch.full((4,), 3), torch.ones(4))
    (loss_cls + loss_obj).backward()
    assert loss_cls.item() == 0 and loss_obj.item() > 0
    assert (logits.grad[:, :3] == 0).all() and (logits.grad[:, 4] < 0).all()


# ----------------------------------------------------------------------------- sigmoid / EQL


def test_one_hot_bce_matches_explicit_weights_and_gradcheck():
    torch.manual_seed(0)
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    gt = torch.tensor([0, 4, 5, 2, 5, 1, 3])  # 5 = no positive column
    pos_w, neg_w, row_w = torch.rand(3, 5, dtype=torch.float64) + 0.1
    for positive_row_neg_weight in [None, row_w]:
        loss, prob_sum = one_hot_bce(logits, gt, pos_w, neg_w, positive_row_neg_weight)
        y = one_hot(gt, 5).double()
        neg = neg_w.expand(7, 5)
        if positive_row_neg_weight is not None:
            neg = torch.where((gt < 5)[:, None], row_w.expand(7, 5), neg)
        weights = torch.where(y > 0, pos_w.expand(7, 5), neg)
        assert loss.item() == pytest.approx(explicit_bce_sum(logits, y, weights).item(), rel=1e-12)
        assert torch.allclose(prob_sum, torch.sigmoid(logits).sum(0))
        assert torch.autograd.gradcheck(
            lambda z, w=positive_row_neg_weight: one_hot_bce(z, gt, pos_w, neg_w, w)[0], (logits,)
        )


def test_sigmoid_ce_golden():
    # z = 0: every BCE term is log 2, K = 3 terms per RoI
    assert sigmoid_ce_loss(torch.zeros(4, 3), torch.tensor([0, 1, 3, 3])).item() == pytest.approx(
        3 * LOG2
    )
    torch.manual_seed(0)
    logits, gt = torch.randn(6, 4), torch.tensor([0, 4, 3, 4, 1, 2])
    expected = F.binary_cross_entropy_with_logits(logits, one_hot(gt, 4), reduction="sum") / 6
    assert sigmoid_ce_loss(logits, gt).item() == pytest.approx(expected.item(), rel=1e-6)
    probs = SigmoidCE(num_classes=2).predict_probs(torch.tensor([[0.0, math.log(3.0)]]))
    assert torch.allclose(probs, torch.tensor([[0.5, 0.75, 0.0]]))


def test_eql_lambda_zero_is_sigmoid_ce():
    torch.manual_seed(0)
    logits, gt = torch.randn(6, 4), torch.tensor([0, 4, 3, 4, 1, 2])
    no_rare = torch.zeros(4, dtype=torch.bool)
    assert eql_loss(logits, gt, no_rare).item() == pytest.approx(
        sigmoid_ce_loss(logits, gt).item(), rel=1e-6
    )
    eql = EQL(num_classes=4, image_frequency=torch.tensor([0.5, 0.01, 1e-4, 1e-5]), lambda_=0.0)
    assert not eql.rare.any()


def test_eql_golden_with_suppressed_classes():
    # K = 3, classes 1 and 2 rare. z = 0: each kept BCE term is log 2.
    # RoI 0 (label 0): keeps only j = 0 -> 1 term; RoI 1 (label 1, itself rare): keeps j = 0
    # and its own class -> 2 terms; RoI 2 (background): keeps all 3 terms. Mean over 3 RoIs.
    rare = torch.tensor([False, True, True])
    logits = torch.zeros(3, 3, requires_grad=True)
    loss = eql_loss(logits, torch.tensor([0, 1, 3]), rare)
    assert loss.item() == pytest.approx(6 * LOG2 / 3, rel=1e-6)
    loss.backward()
    suppressed = torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    assert (logits.grad[suppressed] == 0).all() and (logits.grad[~suppressed] != 0).all()
    assert logits.grad[0, 0] < 0 and logits.grad[1, 1] < 0 and (logits.grad[2] > 0).all()


def test_eql_rare_classes_come_from_the_dataset_image_frequency():
    # unit stats: image_count = [400, 141, 76, 50, 35, 27, 21, 17] over 500 images
    cfg = tiny_cfg(
        8, opts=["MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "EQL", "MODEL.ROI_BOX_HEAD.EQL.LAMBDA", 0.05]
    )
    eql = build_cls_loss(cfg, 8)
    assert eql.rare.tolist() == [False] * 6 + [True, True]  # 21/500, 17/500 < 0.05
    assert "rare" not in eql.state_dict()
    probs = eql.predict_probs(torch.zeros(2, 8))
    assert torch.allclose(probs[:, :8], torch.full((2, 8), 0.5)) and (probs[:, 8] == 0).all()
    # background is predicted when no class reaches 0.5
    assert eql.predict_classes(torch.full((1, 8), -1.0)).item() == 8


# ----------------------------------------------------------------------------- EQLv2


def test_eqlv2_first_iteration_is_plain_sigmoid_ce_over_k_plus_1():
    torch.manual_seed(0)
    logits, gt = torch.randn(6, 5), torch.tensor([0, 4, 3, 4, 1, 2])
    loss = EQLv2(num_classes=4)
    expected = F.binary_cross_entropy_with_logits(logits, one_hot(gt, 5), reduction="sum") / 6
    assert loss(logits, gt)["loss_cls"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_eqlv2_class_weights_closed_form():
    pos_w, neg_w = eqlv2_class_weights(torch.tensor([0.8, 0.0, 100.0]), gamma=12, mu=0.8, alpha=4)
    r0 = 1 / (1 + math.exp(12 * 0.8))
    assert neg_w.tolist() == pytest.approx([0.5, r0, 1.0, 1.0])
    assert pos_w.tolist() == pytest.approx([3.0, 1 + 4 * (1 - r0), 1.0, 1.0])


def test_eqlv2_statistics_golden():
    # z = 0, first iteration (weights 1): |sigmoid - y| = 1/2 everywhere, so
    # pos_grad_j = n_j / 2 and neg_grad_j = (R - n_j) / 2 for the n_j RoIs labelled j.
    loss = EQLv2(num_classes=3)
    gt = torch.tensor([0, 0, 1, 3, 3])
    loss(torch.zeros(5, 4), gt)
    assert loss.pos_grad.tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert loss.neg_grad.tolist() == pytest.approx([1.5, 2.0, 2.5])
    assert loss.pos_neg.tolist() == pytest.approx([2 / 3, 0.25, 0.0])
    # second iteration: weights from the statistics
    pos_w, neg_w = eqlv2_class_weights(loss.pos_neg)
    logits = torch.randn(5, 4)
    y = one_hot(gt, 4)
    weights = torch.where(y > 0, pos_w.expand(5, 4), neg_w.expand(5, 4))
    expected = explicit_bce_sum(logits, y, weights) / 5
    assert loss(logits, gt)["loss_cls"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(loss.state_dict()) == {"pos_grad", "neg_grad", "pos_neg"}


def test_eqlv2_gradient_stats_match_definition():
    torch.manual_seed(0)
    logits, gt = torch.randn(9, 5), torch.tensor([0, 4, 3, 4, 1, 2, 0, 0, 3])
    pos_w, neg_w = torch.rand(5) + 1, torch.rand(5)
    _, prob_sum = eqlv2_loss(logits, gt, pos_w, neg_w)
    pos, neg = eqlv2_gradient_stats(logits, gt, prob_sum, pos_w, neg_w)
    y = one_hot(gt, 5)
    weights = torch.where(y > 0, pos_w.expand(9, 5), neg_w.expand(9, 5))
    grad = (torch.sigmoid(logits) - y).abs() * weights
    assert torch.allclose(pos, (grad * y).sum(0)[:4], atol=1e-6)
    assert torch.allclose(neg, (grad * (1 - y)).sum(0)[:4], atol=1e-6)


def test_eqlv2_probabilities():
    logits = torch.tensor([[0.0, math.log(3.0), 0.0]])  # sigmoid [1/2, 3/4], bg 1/2
    probs = EQLv2(num_classes=2).predict_probs(logits)
    assert torch.allclose(probs, torch.tensor([[0.25, 0.375, 0.5]]))


# ----------------------------------------------------------------------------- BAGS


def test_groups_from_instance_counts_drop_empty_bins():
    counts = torch.tensor([1.0, 5, 50, 500, 5000, 10, 100, 1000])
    assert assign_groups(counts, [10, 100, 1000]).tolist() == [1, 1, 2, 3, 4, 2, 3, 4]
    assert assign_groups(torch.tensor([1.0, 500, 600]), [10, 100, 1000]).tolist() == [1, 2, 2]


def small_bags(ratio=8.0):
    # classes 0 (1 instance) -> G1, 1 and 2 (500, 600) -> G2; the [10, 100) and >= 1000 bins
    # are empty. Layout: G0 [bg, fg] | G1 [others, c0] | G2 [others, c1, c2] -> 7 logits.
    return GroupSoftmax(
        num_classes=3, instance_count=torch.tensor([1.0, 500, 600]), others_sample_ratio=ratio
    )


def test_group_softmax_layout_and_label_remapping():
    bags = small_bags()
    assert bags.num_groups == 3 and bags.num_logits == 7
    assert bags.group_slices == [(0, 2), (2, 4), (4, 7)]
    assert bags.class_columns.tolist() == [3, 5, 6]
    labels = torch.tensor([0, 1, 2, 3])
    assert bags.label_maps[0][labels].tolist() == [1, 1, 1, 0]  # fg / bg
    assert bags.label_maps[1][labels].tolist() == [1, 0, 0, 0]  # c0 or others
    assert bags.label_maps[2][labels].tolist() == [0, 1, 2, 0]  # c1, c2 or others
    assert bags.state_dict() == {}


def test_group_softmax_probabilities():
    # G0 [log 1, log 3] -> p_bg 1/4, p_fg 3/4; G1 [0, 0] -> p(c0 | G1) 1/2;
    # G2 [log 2, 0, 0] -> p(c1 | G2) = p(c2 | G2) = 1/4.
    logits = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0, LOG2, 0.0, 0.0]])
    probs = small_bags().predict_probs(logits)
    assert torch.allclose(probs, torch.tensor([[0.375, 0.1875, 0.1875, 0.25]]))


def test_group_softmax_loss_golden():
    bags = small_bags(ratio=8.0)  # enough "others" ratio to take every other RoI
    gt = torch.tensor([0, 1, 3])
    # z = 0: G0 over 3 RoIs: log 2; G1 (positive RoI 0 + 2 others): log 2; G2: log 3
    loss = bags(torch.zeros(3, 7), gt)["loss_cls"]
    assert loss.item() == pytest.approx(2 * LOG2 + LOG3, rel=1e-6)
    # ratio 0: positives only, and a group without positives contributes 0
    logits = torch.randn(3, 7)
    args = (bags.group_slices, bags.label_maps, bags.class_group)
    only_pos = group_softmax_loss(logits, gt, *args, others_ratio=0.0)
    expected = (
        F.cross_entropy(logits[:, 0:2], torch.tensor([1, 1, 0]))
        + F.cross_entropy(logits[0:1, 2:4], torch.tensor([1]))
        + F.cross_entropy(logits[1:2, 4:7], torch.tensor([1]))
    )
    assert only_pos.item() == pytest.approx(expected.item(), rel=1e-6)
    all_bg = group_softmax_loss(logits, torch.tensor([3, 3, 3]), *args, others_ratio=8.0)
    expected = F.cross_entropy(logits[:, 0:2], torch.tensor([0, 0, 0]))
    assert all_bg.item() == pytest.approx(expected.item(), rel=1e-6)


def test_group_others_sampling_without_replacement():
    in_group = torch.tensor([True, False, False, True, False, False, False, False])
    g = torch.Generator().manual_seed(0)
    rows = sample_group_rows(in_group, 1.5, generator=g)  # int(1.5 * 2) = 3 others
    assert rows[:2].tolist() == [0, 3] and rows.numel() == 5
    others = rows[2:].tolist()
    assert len(set(others)) == 3 and not {0, 3} & set(others)
    assert sample_group_rows(in_group, 8.0).sort().values.tolist() == list(range(8))
    assert sample_group_rows(torch.zeros(4, dtype=torch.bool), 8.0).numel() == 0


def test_group_softmax_accuracy_is_argmax_of_final_probabilities():
    logits = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0, LOG2, 0.0, 0.0]])
    assert small_bags().predict_classes(logits).item() == 0  # 0.375 is the largest
    logits[0, 0] = 5.0  # background dominates
    assert small_bags().predict_classes(logits).item() == 3


# ----------------------------------------------------------------------------- federated


def test_federated_classes_contain_present_classes_and_respect_weights():
    weights = torch.tensor([1.0, 4.0, 0.0, 9.0, 0.0, 1.0])
    gt = torch.tensor([2, 2, 6, 6])  # class 2 present (weight 0), background ignored
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = sample_federated_classes(gt, weights, num_sampled=3, generator=g)
        assert mask[2] and int(mask.sum()) == 3 and not mask[4]
    # more wanted than available: every class with weight > 0, plus the present ones
    mask = sample_federated_classes(gt, weights, num_sampled=50)
    assert mask.tolist() == [True, True, True, True, False, True]
    mask = sample_federated_classes(torch.tensor([6]), torch.zeros(6), num_sampled=50)
    assert not mask.any()


def test_federated_loss_golden_and_zero_gradient_outside_the_mask():
    mask = torch.tensor([True, False, True, False])
    logits = torch.zeros(3, 5, requires_grad=True)
    loss = federated_loss(logits, torch.tensor([0, 1, 4]), mask)
    assert loss.item() == pytest.approx(2 * LOG2, rel=1e-6)  # 2 classes x log 2 per RoI
    loss.backward()
    assert (logits.grad[:, [1, 3, 4]] == 0).all()
    assert logits.grad[0, 0] < 0 and logits.grad[1, 0] > 0
    torch.manual_seed(0)
    z, gt = torch.randn(5, 5), torch.tensor([0, 1, 2, 4, 3])
    expected = explicit_bce_sum(z[:, :4], one_hot(gt, 4), mask.float().expand(5, 4)) / 5
    assert federated_loss(z, gt, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_federated_module_inference_drops_background_logit():
    fed = FederatedLoss(num_classes=2, image_count=torch.tensor([10.0, 1.0]))
    probs = fed.predict_probs(torch.tensor([[0.0, math.log(3.0), 9.0]]))
    assert torch.allclose(probs, torch.tensor([[0.5, 0.75, 0.0]]))


# ----------------------------------------------------------------------------- classifier


def test_normed_linear_is_a_scaled_cosine_plus_bias():
    layer = NormedLinear(2, 2, scale=20.0)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
        layer.bias.copy_(torch.tensor([0.5, 0.0]))
    out = layer(torch.tensor([[3.0, 4.0], [30.0, 40.0]]))
    expected = torch.tensor([20 * 0.6 + 0.5, 20 * 0.7 * math.sqrt(2)])
    assert torch.allclose(out, expected.expand(2, 2), atol=1e-4)
    fresh = NormedLinear(16, 4)
    assert (fresh.bias == 0).all() and fresh.weight.std().item() == pytest.approx(0.01, rel=0.5)
