"""Class-specific masks at K = 1203 without (R, K, M, M) logits: the heads gather each RoI's
class's predictor weights first. Losses and every gradient equal the full computation
(``layers`` -> select the class), for the Conv and NormedConv predictors, class-agnostic
masks, the CARAFE upsampler and an empty batch; inference gives the same masks."""

import pytest
import torch
from conftest import tiny_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import build_mask_head
from detectron2.structures import BitMasks, Boxes, Instances

from lvis_longtail.modeling.architecture import carafe_from_cfg
from lvis_longtail.modeling.mask_head import NormedConv2d, class_mask_logits, select_class_masks
from lvis_longtail.modeling.mask_targets import MaskHeadOutputs, build_mask_targets

K = 1203
SHAPE = ShapeSpec(channels=8, height=14, width=14)
DICE = ["MODEL.ROI_MASK_HEAD.NAME", "DiceBCEMaskHead"]
# what the ROI heads build for detectron2's MaskRCNNConvUpsampleHead (same parameters)
D2 = ["MODEL.ROI_MASK_HEAD.NAME", "LongTailMaskRCNNConvUpsampleHead"]
HEADS = {
    "detectron2_conv": D2,
    "dicebce_conv_boundary": DICE + ["MODEL.ROI_MASK_HEAD.BOUNDARY_LOSS_WEIGHT", 1.0],
    "dicebce_normed": DICE + ["MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE", "NormedConv"],
    "dicebce_class_agnostic": DICE + ["MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", True],
    "carafe": D2 + ["MODEL.ROI_MASK_HEAD.UPSAMPLE_TYPE", "carafe"],
}


def build_head(opts):
    """The mask head as the ROI heads build it (CARAFE swapped in as adjust_roi_heads does),
    float64, with a predictor far from its near-zero initialisation."""
    cfg = tiny_cfg(K, opts=["MODEL.ROI_MASK_HEAD.CONV_DIM", 32, *opts])
    torch.manual_seed(0)
    head = build_mask_head(cfg, SHAPE)
    if cfg.MODEL.ROI_MASK_HEAD.UPSAMPLE_TYPE == "carafe":
        head.deconv = carafe_from_cfg(cfg.MODEL.ROI_MASK_HEAD, head.deconv.in_channels)
    torch.nn.init.normal_(head.predictor.weight, std=0.3)
    torch.nn.init.normal_(head.predictor.bias, std=0.3)
    return head.double()


def proposals(num: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((64, 64))
    xy = torch.rand(num, 2, generator=g) * 30
    inst.proposal_boxes = Boxes(torch.cat([xy, xy + 8 + torch.rand(num, 2, generator=g) * 24], 1))
    inst.gt_masks = BitMasks(torch.rand(num, 64, 64, generator=g) > 0.6)
    inst.gt_classes = torch.randint(0, K, (num,), generator=g)
    return [inst]


def losses_and_grads(head, x, targets, full: bool):
    """The head's loss dict on the gathered path, or on the full (R, K, M, M) logits with the
    class selected afterwards; and the gradient of the summed losses w.r.t. x and every
    parameter."""
    x = x.detach().requires_grad_(True)
    if full:
        features = head.mask_features(x)
        logits = select_class_masks(head.predictor(features), targets.classes)
        boundary = None
        if getattr(head, "boundary_predictor", None) is not None:
            boundary = head.boundary_predictor(features)[:, 0]
        outputs = MaskHeadOutputs(logits, boundary)
    else:
        outputs = head.train_outputs(x, targets.classes)
    losses = head.mask_losses(outputs, targets)
    params = [p for p in head.parameters()]
    grads = torch.autograd.grad(sum(losses.values()), [x] + params, allow_unused=True)
    return {k: v.detach() for k, v in losses.items()}, outputs.logits.detach(), grads


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("num_rois", [7, 0])
def test_gathered_training_equals_the_full_computation(name, num_rois, storage):
    head = build_head(HEADS[name])
    props = proposals(num_rois)
    x = torch.randn(num_rois, 8, 14, 14, dtype=torch.float64)
    targets = build_mask_targets(props, 28, x.device)
    ours, logits, grads = losses_and_grads(head, x, targets, full=False)
    ref, ref_logits, ref_grads = losses_and_grads(head, x, targets, full=True)
    assert set(ours) == set(ref) and "loss_mask" in ours  # detectron2's loss names
    assert logits.shape == (num_rois, 28, 28)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-12, atol=1e-12)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-12, atol=1e-12)
    for (pname, _), g, r in zip([("x", None)] + list(head.named_parameters()), grads, ref_grads):
        assert g is not None, f"{pname} left out of the graph"
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=pname)
    if num_rois == 0:
        assert all(v.item() == 0 for v in ours.values())


@pytest.mark.parametrize("name", list(HEADS))
def test_no_logits_of_every_class_are_formed(name, storage):
    """Training and inference never run the predictor over all K classes (its forward is the
    (R, K, M, M) computation); a class-agnostic predictor has one channel and runs as is."""
    head = build_head(HEADS[name])
    shapes = []
    head.predictor.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    props = proposals(5)
    x = torch.randn(5, 8, 14, 14, dtype=torch.float64)
    losses = head(x, props)
    sum(losses.values()).backward()
    head.eval()
    props[0].pred_classes = props[0].gt_classes
    with torch.no_grad():
        head(x, props)
    assert props[0].pred_masks.shape == (5, 1, 28, 28)
    assert all(s[1] == 1 for s in shapes), shapes


@pytest.mark.parametrize("name", list(HEADS))
def test_inference_masks_equal_the_full_computation(name):
    head = build_head(HEADS[name]).eval()
    x = torch.randn(6, 8, 14, 14, dtype=torch.float64)
    classes = torch.tensor([0, K - 1, 17, 17, 600, 3])
    with torch.no_grad():
        ours = head.predict_masks(x, classes)
        ref = select_class_masks(head.layers(x), classes)[:, None]
    assert ours.shape == (6, 1, 28, 28)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_other_predictors_run_in_full():
    """A predictor that is not a plain 1x1 convolution (here 3x3) is applied as is."""
    conv = torch.nn.Conv2d(4, 9, 3, padding=1).double()
    f = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    classes = torch.tensor([8, 0, 4])
    ref = select_class_masks(conv(f), classes)
    torch.testing.assert_close(class_mask_logits(conv, f, classes), ref)


def test_normed_conv_forward_classes_under_autocast_matches_its_forward():
    """Reduced precision: the gathered path follows the full path's dtype (bf16 on CPU)."""
    conv = NormedConv2d(16, K)
    torch.nn.init.normal_(conv.bias, std=0.5)
    f = torch.randn(4, 16, 7, 7)
    classes = torch.tensor([5, 1202, 0, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = conv.forward_classes(f, classes)
        ref = select_class_masks(conv(f), classes)
    assert ours.dtype == ref.dtype
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=0.3)
