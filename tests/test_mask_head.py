"""DiceBCEMaskHead: construction from config, loss entries, equivalence with detectron2's
loss, normalized predictor, boundary branch, empty batches."""

import math

import pytest
import torch
from conftest import tiny_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    MaskRCNNConvUpsampleHead,
    build_mask_head,
)
from detectron2.structures import BitMasks, Boxes, Instances

from lvis_longtail.modeling.mask_head import (
    DiceBCEMaskHead,
    LongTailMaskRCNNConvUpsampleHead,
    NormedConv2d,
)
from lvis_longtail.modeling.mask_targets import MASK_CONTRACT_METHODS, has_mask_contract

SHAPE = ShapeSpec(channels=8, height=14, width=14)


def _head(*opts, num_classes=4):
    cfg = tiny_cfg(num_classes, opts=["MODEL.ROI_MASK_HEAD.NAME", "DiceBCEMaskHead",
                                      "MODEL.ROI_MASK_HEAD.CONV_DIM", 32, *opts])  # fmt: skip
    return build_mask_head(cfg, SHAPE)


def _proposals(num_classes=4, seed=0):
    """Two images of 64 x 64 with 3 and 0 foreground proposals (rectangular GT masks)."""
    g = torch.Generator().manual_seed(seed)
    a = Instances((64, 64))
    a.proposal_boxes = Boxes(torch.tensor([[4.0, 4, 40, 30], [0, 0, 64, 64], [50, 50, 64, 64]]))
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, 8:20, 8:36] = True
    masks[1, 10:12, 0:64] = True  # thin: r small, foreground weight clipped
    # masks[2] is empty inside its proposal at the image border: r = 0
    a.gt_masks = BitMasks(masks)
    a.gt_classes = torch.randint(0, num_classes, (3,), generator=g)
    b = Instances((64, 64))
    b.proposal_boxes = Boxes(torch.zeros(0, 4))
    b.gt_masks = BitMasks(torch.zeros(0, 64, 64, dtype=torch.bool))
    b.gt_classes = torch.zeros(0, dtype=torch.long)
    return [a, b]


def test_heavy_head_has_seven_convs_and_all_losses(storage):
    head = _head("MODEL.ROI_MASK_HEAD.NUM_CONV", 7, "MODEL.ROI_MASK_HEAD.BOUNDARY_LOSS_WEIGHT", 0.5)
    assert isinstance(head, DiceBCEMaskHead) and len(head.conv_norm_relus) == 7
    x = torch.randn(3, 8, 14, 14)
    losses = head(x, _proposals())
    assert set(losses) == {"loss_mask", "loss_mask_dice", "loss_mask_boundary"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert head.boundary_predictor.weight.grad is not None
    assert "mask_rcnn/accuracy" in storage.latest()
    head.eval()
    proposals = _proposals()
    for inst in proposals:
        inst.pred_classes = inst.gt_classes
    with torch.no_grad():
        head(x, proposals)
    assert proposals[0].pred_masks.shape == (3, 1, 28, 28)


def test_boundary_off_builds_nothing(storage):
    head = _head()
    assert head.boundary_predictor is None
    assert set(head(torch.randn(3, 8, 14, 14), _proposals())) == {"loss_mask", "loss_mask_dice"}


def test_reduces_to_detectron2_loss(storage):
    """DICE_LOSS_WEIGHT 0 and FG_WEIGHT_MAX 1: loss_mask equals detectron2's mask loss."""
    ours = _head(
        "MODEL.ROI_MASK_HEAD.DICE_LOSS_WEIGHT", 0.0, "MODEL.ROI_MASK_HEAD.FG_WEIGHT_MAX", 1.0
    )
    ref = MaskRCNNConvUpsampleHead(SHAPE, num_classes=4, conv_dims=[32, 32, 32], conv_norm="GN")
    ref.load_state_dict(ours.state_dict())
    torch.nn.init.normal_(ref.predictor.weight, std=0.3)
    ours.predictor.load_state_dict(ref.predictor.state_dict())
    x = torch.randn(3, 8, 14, 14)
    expected = ref(x, _proposals())["loss_mask"]
    losses = ours(x, _proposals())
    assert losses["loss_mask"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["loss_mask_dice"].item() == 0.0


def test_class_agnostic(storage):
    head = _head("MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", True)
    assert head.predictor.out_channels == 1
    losses = head(torch.randn(3, 8, 14, 14), _proposals())
    assert all(torch.isfinite(v) for v in losses.values())


def test_no_positive_rois(storage):
    head = _head("MODEL.ROI_MASK_HEAD.BOUNDARY_LOSS_WEIGHT", 1.0,
                 "MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE", "NormedConv")  # fmt: skip
    empty = [_proposals()[1], _proposals()[1]]
    losses = head(torch.zeros(0, 8, 14, 14), empty)
    assert {k: v.item() for k, v in losses.items()} == {
        "loss_mask": 0.0, "loss_mask_dice": 0.0, "loss_mask_boundary": 0.0
    }  # fmt: skip
    sum(losses.values()).backward()  # every parameter stays in the graph (DDP)
    assert all(p.grad is not None for p in head.parameters())


def test_normed_conv_predictor():
    head = _head("MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE", "NormedConv",
                 "MODEL.ROI_MASK_HEAD.NORMED_SCALE", 20.0)  # fmt: skip
    assert isinstance(head.predictor, NormedConv2d)
    assert list(head._modules)[-1] == "predictor"  # position in the Sequential kept
    conv = NormedConv2d(2, 2, scale=20.0)
    conv.weight.data = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(2, 2, 1, 1)
    x = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # |x| = 5
    # 20 * <(0.6, 0.8), (1, 0)> = 12 ; 20 * <(0.6, 0.8), (0, 1)> = 16
    assert conv(x).flatten().tolist() == pytest.approx([12.0, 16.0])
    assert conv(torch.zeros(1, 2, 3, 3)).abs().max().item() == 0.0  # zero feature: no NaN


def test_unknown_predictor_rejected():
    with pytest.raises(ValueError, match="mask predictor type 'Linear' is not one of"):
        _head("MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE", "Linear")


def test_losses_are_weighted(storage):
    x = torch.randn(3, 8, 14, 14)
    torch.manual_seed(0)
    base = _head("MODEL.ROI_MASK_HEAD.BOUNDARY_LOSS_WEIGHT", 1.0)
    torch.manual_seed(0)
    scaled = _head("MODEL.ROI_MASK_HEAD.BOUNDARY_LOSS_WEIGHT", 0.5,
                   "MODEL.ROI_MASK_HEAD.DICE_LOSS_WEIGHT", 2.0,
                   "MODEL.ROI_MASK_HEAD.BCE_LOSS_WEIGHT", 3.0)  # fmt: skip
    a, b = base(x, _proposals()), scaled(x, _proposals())
    for key, factor in [("loss_mask", 3.0), ("loss_mask_dice", 2.0), ("loss_mask_boundary", 0.5)]:
        assert b[key].item() == pytest.approx(factor * a[key].item(), rel=1e-5)
    assert math.isfinite(a["loss_mask_boundary"].item())


class ContractByMethodsMaskHead(torch.nn.Module):
    """Not a LongTailMaskRCNNConvUpsampleHead: provides the contract's methods by delegating."""

    def __init__(self, cfg, input_shape):
        super().__init__()
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
        self.inner = LongTailMaskRCNNConvUpsampleHead(cfg, input_shape)
        self.calls = []

    def __getattr__(self, name):
        if name in MASK_CONTRACT_METHODS:
            self.calls.append(name)
            return getattr(self.inner, name)
        return super().__getattr__(name)


class NoContractMaskHead(MaskRCNNConvUpsampleHead):
    """detectron2's head under another name: no mask-branch contract."""


def test_mask_heads_plug_in_through_the_contract_methods(storage, monkeypatch):
    from conftest import make_batch
    from detectron2.modeling import build_model

    for head in (ContractByMethodsMaskHead, NoContractMaskHead):  # registered for this test only
        monkeypatch.setitem(ROI_MASK_HEAD_REGISTRY._obj_map, head.__name__, head)

    assert has_mask_contract(_head()) and not has_mask_contract(MaskRCNNConvUpsampleHead(
        input_shape=SHAPE, num_classes=4, conv_dims=[8, 8]))  # fmt: skip
    cfg = tiny_cfg(4, opts=["MODEL.ROI_MASK_HEAD.NAME", "ContractByMethodsMaskHead"])
    model = build_model(cfg)
    assert isinstance(model.roi_heads.mask_head, ContractByMethodsMaskHead)
    losses = model(make_batch(num_classes=4))
    assert torch.isfinite(losses["loss_mask"])
    assert {"output_side", "train_outputs", "mask_losses"} <= set(model.roi_heads.mask_head.calls)
    cfg = tiny_cfg(4, opts=["MODEL.ROI_MASK_HEAD.NAME", "NoContractMaskHead"])
    with pytest.raises(ValueError, match="'NoContractMaskHead'.*mask-branch contract"):
        build_model(cfg)


MASK_HEADS = sorted(name for name, _ in ROI_MASK_HEAD_REGISTRY)  # every registered mask head


@pytest.mark.parametrize("name", MASK_HEADS)
def test_every_registered_mask_head_trains_and_predicts(name, storage):
    from conftest import make_batch
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    cfg = tiny_cfg(4, opts=["MODEL.ROI_MASK_HEAD.NAME", name, "MODEL.ROI_MASK_HEAD.CONV_DIM", 32])
    model = build_model(cfg)
    head = model.roi_heads.mask_head
    assert has_mask_contract(head)  # detectron2's head is built as its contract twin
    losses = model(make_batch(num_classes=4))
    assert torch.isfinite(losses["loss_mask"]) and losses["loss_mask"] > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in head.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    batch = make_batch(num_classes=4, seed=1)
    with torch.no_grad():
        outputs = model([{k: x[k] for k in ("image", "height", "width")} for x in batch])
    for x, out in zip(batch, outputs):
        inst = out["instances"]
        assert inst.pred_masks.shape[1:] == (x["height"], x["width"])
