"""Dual head classification: score fusion against hand-computed values, the trained model's
detections when the new branch has no say, copy initialisation, only the new branches train
(test_frozen_modules.py: the fine-tune leaves the trained model bit-identical)."""

import pytest
import torch
from conftest import REPO, make_batch, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

from lvis_longtail.engine import Trainer
from lvis_longtail.modeling.dual_head import (
    DualBranchConvFCHead,
    DualHeadOutputLayers,
    attach_dual_head,
    dual_head_branches,
    fuse_scores,
    group_columns,
)

TINY = REPO / "configs" / "tiny"
SEESAW = TINY / "mask_rcnn_R18_FPN_tiny_seesaw.yaml"
CASCADE = TINY / "cascade_mask_rcnn_R18_FPN_tiny_seesaw.yaml"
HTC = TINY / "htc_R18_FPN_tiny_seesaw.yaml"  # one mask head per stage, built without the branch
DUAL = ["MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED", "True"]


def test_fuse_scores_against_hand_computed_values():
    old = torch.tensor([[0.6, 0.1, 0.3], [0.2, 0.2, 0.6]])
    new = torch.tensor([[0.2, 0.5, 0.3], [0.4, 0.4, 0.2]])
    mean = torch.tensor([[0.4, 0.3, 0.3], [0.3, 0.3, 0.4]])
    torch.testing.assert_close(fuse_scores(old, new, "mean"), mean)
    torch.testing.assert_close(
        fuse_scores(old, new, "mean", 0.25)[0], torch.tensor([0.5, 0.2, 0.3])
    )
    geo = torch.tensor([[0.12**0.5, 0.05**0.5, 0.3], [0.08**0.5, 0.08**0.5, 0.12**0.5]])
    torch.testing.assert_close(fuse_scores(old, new, "geometric"), geo)
    cols = torch.tensor([False, True, False])
    torch.testing.assert_close(fuse_scores(old, new, "group", new_columns=cols),
                               torch.tensor([[0.6, 0.5, 0.3], [0.2, 0.4, 0.6]]))  # fmt: skip
    for fusion in ("mean", "geometric"):  # no say for the new branch: exactly the old scores
        assert torch.equal(fuse_scores(old, new, fusion, 0.0), old)
        assert torch.equal(fuse_scores(old, new, fusion, 1.0), new)
    with pytest.raises(ValueError, match="FUSION 'max'"):
        fuse_scores(old, new, "max")


def test_group_columns_follow_the_training_frequency_groups():
    cfg = tiny_cfg(8)  # unit statistics: image counts 400, 141, 76, 50, 35, 27, 21, 17: f f c...
    cols = group_columns(cfg, ["r", "c"], 8)
    assert cols.tolist() == [False, False, True, True, True, True, True, True, False]
    assert group_columns(cfg, ["f"], 8).tolist() == [True, True] + [False] * 7
    with pytest.raises(ValueError, match="NEW_BRANCH_GROUPS"):
        group_columns(cfg, ["rare"], 8)


def _detections(model, image):
    model.eval()
    with torch.no_grad():
        inst = model([{"image": image, "height": 64, "width": 64}])[0]["instances"]
    return inst.pred_boxes.tensor, inst.scores, inst.pred_classes


@pytest.mark.parametrize("config", [SEESAW, CASCADE, HTC])
@pytest.mark.parametrize("opts", [
    ["DUAL_HEAD.CLS_LOSS_NAME", "SeesawLoss"],  # copied tower and classifier: equal branches
    ["DUAL_HEAD.CLS_LOSS_NAME", "SeesawLoss", "DUAL_HEAD.BRANCH", "classifier"],
    ["DUAL_HEAD.NEW_WEIGHT", "0.0"],  # a fresh softmax branch without a say
    ["DUAL_HEAD.NEW_WEIGHT", "0.0", "DUAL_HEAD.FUSION", "geometric", "DUAL_HEAD.BRANCH",
     "classifier"],
])  # fmt: skip
def test_dual_head_model_detects_what_the_trained_model_detects(config, opts, tmp_path):
    """The trained model's checkpoint loads into the dual-head model unchanged (same names);
    with a copied branch, or a new branch of weight 0, its detections are the trained model's."""
    torch.manual_seed(0)
    trained = build_model(tiny_cfg(8, config))
    path = tmp_path / "trained.pth"
    torch.save({"model": trained.state_dict()}, path)
    torch.manual_seed(1)
    opts = [f"MODEL.ROI_BOX_HEAD.{o}" if o.startswith("DUAL_HEAD") else o for o in opts]
    dual = build_model(tiny_cfg(8, config, DUAL + opts))
    DetectionCheckpointer(dual).load(str(path))
    state = dual.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.state_dict().items())
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    expected, got = _detections(trained, image), _detections(dual, image)
    assert len(expected[0]) > 0
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_copy_initialisation_only_when_the_checkpoint_has_no_new_branch(tmp_path):
    torch.manual_seed(0)
    trained = build_model(tiny_cfg(8, SEESAW))
    torch.save({"model": trained.state_dict()}, tmp_path / "trained.pth")
    dual = build_model(tiny_cfg(8, SEESAW, DUAL))  # new loss: SoftmaxCE, K+1 logits
    DetectionCheckpointer(dual).load(str(tmp_path / "trained.pth"))
    head, pred = dual.roi_heads.box_head, dual.roi_heads.box_predictor
    assert isinstance(head, DualBranchConvFCHead) and isinstance(pred, DualHeadOutputLayers)
    assert torch.equal(head.dual_branch.fc1.weight, head.fc1.weight)
    assert head.dual_branch.fc1.weight.data_ptr() != head.fc1.weight.data_ptr()
    # Seesaw's K+2 logits vs softmax's K+1: the classifier cannot be copied, it stays fresh
    assert pred.dual_cls_score.weight.shape[0] == 9 and pred.cls_score.weight.shape[0] == 10
    with torch.no_grad():
        head.dual_branch.fc1.weight.add_(1.0)
    torch.save({"model": dual.state_dict()}, tmp_path / "dual.pth")  # a dual-head checkpoint
    again = build_model(tiny_cfg(8, SEESAW, DUAL))
    DetectionCheckpointer(again).load(str(tmp_path / "dual.pth"))
    assert torch.equal(again.roi_heads.box_head.dual_branch.fc1.weight, head.dual_branch.fc1.weight)
    fresh = build_model(tiny_cfg(8, SEESAW, DUAL + ["MODEL.ROI_BOX_HEAD.DUAL_HEAD.INIT", "random"]))
    before = fresh.roi_heads.box_head.dual_branch.fc1.weight.clone()
    DetectionCheckpointer(fresh).load(str(tmp_path / "trained.pth"))
    assert torch.equal(fresh.roi_heads.box_head.dual_branch.fc1.weight, before)


@pytest.mark.parametrize("config", [SEESAW, CASCADE, HTC])
def test_only_the_new_branches_train(config):
    cfg = tiny_cfg(8, config, DUAL)
    cfg.DATASETS.TEST = ()  # the 8 unit classes only (not a synthetic set under ./datasets)
    model = Trainer.build_model(cfg)
    branches = dual_head_branches(model)
    stages = 1 if config == SEESAW else 3
    assert len(branches) == 3 * stages  # a tower, a classifier and a loss per stage
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".dual_branch." in n or ".dual_cls_score." in n for n in trainable)
    model.train()
    with EventStorage(0):
        losses = model(make_batch(2, 8, (64, 64)))
    cls_terms = [k for k in losses if k.startswith("loss_cls")]
    assert len(cls_terms) == stages and not any(k.startswith("loss_box_reg") for k in losses)
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if n in trainable)  # fmt: skip


def test_attach_rejects_box_heads_it_cannot_mirror():
    cfg = tiny_cfg(8, SEESAW, DUAL)
    model = build_model(tiny_cfg(8, SEESAW))
    ret = {"box_head": nn.Identity(), "box_predictor": model.roi_heads.box_predictor,
           "box_in_features": ["p2"]}  # fmt: skip
    with pytest.raises(ValueError, match="stage 0 has Identity"):
        attach_dual_head(cfg, model.backbone.output_shape(), ret)


@pytest.mark.parametrize("heads", ["StandardROIHeads", "CascadeROIHeads"])
def test_detectron2_heads_with_the_dual_head_are_rejected(heads):
    """detectron2's own heads get no new branch (nothing would train): a config error."""
    from lvis_longtail.config_check import ConfigError, check_config

    named = rf"DUAL_HEAD\.ENABLED\b.*: read by lvis_longtail.*'{heads}'"
    with pytest.raises(ConfigError, match=named):
        check_config(tiny_cfg(8, CASCADE, DUAL + ["MODEL.ROI_HEADS.NAME", heads]))
    check_config(tiny_cfg(8, HTC, DUAL))  # every lvis_longtail head takes it
