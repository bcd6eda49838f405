"""Frozen modules stay frozen: their parameters get no gradient and their BatchNorm/SyncBN and
dropout layers stay in eval mode, so a fine-tune (BAGS's decoupled classifier, the dual head)
leaves every frozen tensor of the starting checkpoint bit-identical, statistics included."""

import pytest
import torch
from conftest import REPO
from detectron2.modeling import build_model
from torch import nn

from lvis_longtail.data.builtin import register_synthetic
from lvis_longtail.data.synthetic import generate
from lvis_longtail.engine import Trainer, setup_cfg
from lvis_longtail.engine.trainer import freeze_modules

TINY = REPO / "configs" / "tiny"


def test_frozen_batchnorm_and_dropout_stay_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
    )
    with torch.no_grad():
        model[0][1].running_mean.uniform_(-1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze_modules(model, ["0"])
    x = torch.randn(4, 3, 8, 8)
    reference = model[0].eval()(x)
    model.train()
    assert not model[0][1].training and not model[0][2].training and model[1][1].training
    out = model[0](x)
    assert torch.equal(out, reference)  # running statistics, no dropout
    model(x).sum().backward()
    state = model.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in before if k.startswith("0."))
    assert not torch.equal(state["1.1.running_mean"], before["1.1.running_mean"])
    assert model[0][0].weight.grad is None and model[1][0].weight.grad is not None


# BatchNorm in the backbone, SyncBN in the FPN and the mask head: statistics a fine-tune of a
# frozen model must not move.
BN = ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "SyncBN", "MODEL.ROI_MASK_HEAD.NORM", "BN"]
FAST = [
    "MODEL.ROI_HEADS.NUM_CLASSES", "8", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
    "SOLVER.CHECKPOINT_PERIOD", "100", "DATALOADER.NUM_WORKERS", "0",
    "DATASETS.TRAIN", "('lt_dual_train',)", "DATASETS.TEST", "()",
    "DATALOADER.REPEAT_THRESHOLD", "0.3",
]  # fmt: skip


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets") / "lt_dual"
    generate(str(root), seed=3, num_train=12, num_val=2, num_test=1, image_size=(64, 64),
             num_classes=8, progress=False)  # fmt: skip
    register_synthetic(str(root), prefix="lt_dual")


def _start_checkpoint(path, config):
    """A 'trained' model: random weights, with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = build_model(setup_cfg(str(config), FAST + BN))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"model": state}, path)
    return state


# fine-tune leaf, the leaf it starts from, the checkpoint's tensors that must not move (None:
# all of them)
FINE_TUNES = [
    ("mask_rcnn_R18_FPN_tiny_seesaw_dualhead.yaml", "mask_rcnn_R18_FPN_tiny_seesaw.yaml", None),
    ("mask_rcnn_R18_FPN_tiny_bags.yaml", "mask_rcnn_R18_FPN_tiny_softmax.yaml",
     ("backbone.", "proposal_generator.", "roi_heads.box_head.", "roi_heads.mask_head.",
      "roi_heads.box_predictor.bbox_pred.")),
]  # fmt: skip


@pytest.mark.parametrize("leaf,base,frozen", FINE_TUNES)
def test_fine_tune_leaves_the_frozen_model_bit_identical(synthetic, tmp_path, leaf, base, frozen):
    """A few iterations of the fine-tune through the Trainer: every tensor of the starting
    checkpoint outside what trains is bit-identical in the saved model, BatchNorm statistics
    and their counters included; the new branch moved."""
    start = _start_checkpoint(tmp_path / "start.pth", TINY / base)
    opts = FAST + BN + ["MODEL.WEIGHTS", str(tmp_path / "start.pth"), "OUTPUT_DIR", str(tmp_path)]
    trainer = Trainer(setup_cfg(str(TINY / leaf), opts))
    trainer.resume_or_load(resume=False)
    trainer.train()
    final = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    assert trainer.iter == 3  # the 3 iterations ran
    kept = set(start) if frozen is None else {k for k in start if k.startswith(frozen)}
    assert any("running_mean" in k for k in kept) and any("num_batches_tracked" in k for k in kept)
    changed = [k for k in kept if not torch.equal(final[k], start[k])]
    assert not changed, changed[:5]
    if frozen is None:  # the dual head: the new tower left its copy of the trained one
        assert all(".dual_" in k for k in set(final) - set(start))
        new = final["roi_heads.box_head.dual_branch.fc1.weight"]
        assert not torch.equal(new, start["roi_heads.box_head.fc1.weight"])
