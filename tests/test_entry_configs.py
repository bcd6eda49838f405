"""The MMDet LVIS 2020 entry as configs: each tiny twin builds every part of the entry, the
LVIS v1 leaves set the same method keys as their twins, and the tiny chain (train the entry,
dual-head fine-tune from its weights, test with TTA) runs end to end."""

import json
import math

import pytest
import torch
import yaml
from conftest import REPO, make_batch, register_unit_stats
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from lvis_longtail.data.builtin import register_synthetic
from lvis_longtail.data.synthetic import generate
from lvis_longtail.engine import Trainer, setup_cfg
from lvis_longtail.layers.carafe import CARAFE, CARAFEDown
from lvis_longtail.layers.sync_bn import LongTailSyncBatchNorm
from lvis_longtail.modeling.backbones import TimmBackbone, TimmDeformConv2d
from lvis_longtail.modeling.cls_losses import SeesawLoss
from lvis_longtail.modeling.dual_head import DualBranchConvFCHead, DualHeadOutputLayers
from lvis_longtail.modeling.fpg import FPG
from lvis_longtail.modeling.mask_scoring import MaskIoUHead
from lvis_longtail.modeling.roi_heads import GlobalContextHead, LongTailHTCLiteROIHeads
from lvis_longtail.modeling.tsd import TSDHead
from lvis_longtail.modeling.tta import LongTailTTA

TINY = REPO / "configs" / "tiny"
LVIS = REPO / "configs" / "LVISv1"
ENTRY = "htc_lite_R18_FPG_tiny_mmdet2020_entry"
TWINS = {  # tiny twin -> LVIS v1 leaf
    ENTRY: "htc_lite_ResNeSt200_DCNv2_FPG_2x_mmdet2020_entry",
    f"{ENTRY}_dualhead": "htc_lite_ResNeSt200_DCNv2_FPG_2x_mmdet2020_entry_dualhead",
    f"{ENTRY}_tta": "htc_lite_ResNeSt200_DCNv2_FPG_2x_mmdet2020_entry_tta",
}


def has(module, kind) -> bool:
    return any(isinstance(m, kind) for m in module.modules())


def entry_parts(cfg, model) -> dict:
    """Each part of the entry -> whether the built model (and its config) has it."""
    heads = model.roi_heads
    tsd = list(heads.tsd_head) if heads.tsd_head is not None else []
    predictors = [*heads.box_predictor, *(t.predictor for t in tsd)]
    return {
        "SyncBN": has(model.backbone.bottom_up, LongTailSyncBatchNorm)
        and has(model.backbone, LongTailSyncBatchNorm),
        "CARAFE mask upsampling": isinstance(heads.mask_head.deconv, CARAFE),
        "HTC-Lite": isinstance(heads, LongTailHTCLiteROIHeads)
        and isinstance(heads.context_head, GlobalContextHead),
        "TSD in every stage": len(tsd) == 3 and all(isinstance(t, TSDHead) for t in tsd),
        "TSD constraints as the entry": all(not t.pc_cls and t.pc_loc for t in tsd),
        "Mask Scoring": isinstance(heads.mask_iou_head, MaskIoUHead),
        "2020 augmentation": list(cfg.INPUT.AUGMENTATIONS)
        == ["InstaBoost", "ScaleJitter", "RandomFlip"],
        "FPG": isinstance(model.backbone, FPG) and has(model.backbone, CARAFEDown),
        "DCNv2 backbone": isinstance(model.backbone.bottom_up, TimmBackbone)
        and has(model.backbone.bottom_up, TimmDeformConv2d),
        "Seesaw in all stages": all(isinstance(p.cls_loss, SeesawLoss) for p in predictors),
        # The entry trained with a random sampler; RFS only in the dual-head fine-tune.
        "sampler as the entry": cfg.DATALOADER.SAMPLER_TRAIN
        == (
            "RepeatFactorTrainingSampler"
            if cfg.MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED
            else "TrainingSampler"
        ),
    }


@pytest.mark.parametrize("name", list(TWINS))
def test_tiny_twin_builds_every_part_of_the_entry(name):
    stats = register_unit_stats(24, name="lt_unit_stats_24")
    cfg = setup_cfg(str(TINY / f"{name}.yaml"), ["DATASETS.TRAIN", f"('{stats}',)"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)  # freezes the trained model of the fine-tune
    parts = entry_parts(cfg, model)
    assert all(parts.values()), [k for k, v in parts.items() if not v]
    tsd = list(model.roi_heads.tsd_head)
    dual = name != ENTRY
    assert all(isinstance(t.predictor, DualHeadOutputLayers) == dual for t in tsd)
    assert all(isinstance(t.cls_head, DualBranchConvFCHead) == dual for t in tsd)
    assert cfg.TEST.AUG.ENABLED == name.endswith("_tta") and cfg.TEST.AUG.FLIP
    if dual:  # only the new branches train; attach_dual_head already freezes the box
        # branch, sibling and TSD regression included (DDP without the Trainer's freezing)
        bare = build_model(cfg).roi_heads
        trainable = {n for n, p in bare.named_parameters() if p.requires_grad}
        trainable = {n for n in trainable if n.startswith(("box_", "tsd_head."))}
        assert trainable and all(".dual_" in n and n.startswith("tsd_head.") for n in trainable)


def test_tiny_entry_step_on_a_batch():
    """One training step of the tiny entry (federated context off: the unit batch has no
    verified negatives): every loss family, finite, every parameter gets a gradient."""
    stats = register_unit_stats(24, name="lt_unit_stats_24")
    opts = ["DATASETS.TRAIN", f"('{stats}',)", "MODEL.ROI_CONTEXT_HEAD.FEDERATED", "False"]
    torch.manual_seed(0)
    model = Trainer.build_model(setup_cfg(str(TINY / f"{ENTRY}.yaml"), opts))
    with EventStorage(0):
        losses = model(make_batch(num_images=2, num_classes=24, size=(64, 64)))
    for family in ("loss_tsd_cls_stage2", "loss_tsd_pc_loc_stage0", "loss_cls_stage0",
                   "loss_maskiou", "loss_context", "loss_mask"):  # fmt: skip
        assert family in losses
    assert not any("pc_cls" in k for k in losses)
    total = sum(losses.values())
    assert math.isfinite(total.item())
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def _method_keys(path):
    """The keys that make the entry, resolved through _BASE_ (sizes excluded)."""
    cfg = setup_cfg(str(path))
    box, fpg, timm = cfg.MODEL.ROI_BOX_HEAD, cfg.MODEL.FPG, cfg.MODEL.TIMM
    return {
        "heads": (cfg.MODEL.ROI_HEADS.NAME, dict(cfg.MODEL.ROI_HEADS.HTC_LITE)),
        "box": (box.CLS_LOSS_NAME, box.PREDICTOR_TYPE, box.CLS_AGNOSTIC_BBOX_REG),
        "tsd": {k: v for k, v in box.TSD.items() if k != "OFFSET_FC_DIM"},
        "dual": dict(box.DUAL_HEAD),
        "mask": (cfg.MODEL.ROI_MASK_HEAD.UPSAMPLE_TYPE, dict(cfg.MODEL.ROI_MASKIOU_HEAD)),
        "context": (cfg.MODEL.ROI_CONTEXT_HEAD.ENABLED, cfg.MODEL.ROI_CONTEXT_HEAD.FEDERATED),
        "neck": (cfg.MODEL.BACKBONE.NAME, fpg.NORM, fpg.DEFORM_UPSAMPLE, fpg.DOWNSAMPLE_TYPE),
        "backbone": (timm.NORM, list(timm.DEFORM_ON_PER_STAGE), timm.DEFORM_MODULATED),
        "augmentation": list(cfg.INPUT.AUGMENTATIONS),
        "sampler": cfg.DATALOADER.SAMPLER_TRAIN,
        "tta": (cfg.TEST.AUG.ENABLED, cfg.TEST.AUG.FLIP, len(cfg.TEST.AUG.SCALES) > 1),
    }


@pytest.mark.parametrize("tiny, lvis", list(TWINS.items()))
def test_lvis_leaf_sets_the_tiny_twins_method_keys(tiny, lvis):
    assert _method_keys(TINY / f"{tiny}.yaml") == _method_keys(LVIS / f"{lvis}.yaml")
    leaf = yaml.safe_load((LVIS / f"{lvis}.yaml").read_text())
    assert leaf["OUTPUT_DIR"].endswith(lvis)


def test_lvis_entry_uses_resnest200_fpg256():
    cfg = setup_cfg(str(LVIS / f"{TWINS[ENTRY]}.yaml"))
    assert cfg.MODEL.TIMM.NAME == "resnest200e" and cfg.MODEL.FPG.CHANNELS == 256
    assert cfg.MODEL.FPG.NUM_PATHWAYS == 9 and cfg.MODEL.ROI_BOX_HEAD.TSD.GAMMA == 0.1
    assert cfg.INPUT.SCALE_JITTER.PRESET == "mmdet_1280"
    dual = setup_cfg(str(LVIS / f"{TWINS[f'{ENTRY}_dualhead']}.yaml"))
    assert dual.MODEL.WEIGHTS.endswith(f"{TWINS[ENTRY]}/model_final.pth")


FAST = [
    "MODEL.ROI_HEADS.NUM_CLASSES", "8", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "INPUT.SCALE_JITTER.TARGET_SIZE", "(64, 64)",
    "INPUT.SCALE_JITTER.CROP_SIZE", "(64, 64)", "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
    "SOLVER.BASE_LR", "0.005", "SOLVER.CHECKPOINT_PERIOD", "100", "DATALOADER.NUM_WORKERS", "0",
    "DATASETS.TRAIN", "('lt_entry_train',)", "DATASETS.TEST", "()",
    "DATALOADER.REPEAT_THRESHOLD", "0.3",
]  # fmt: skip


@pytest.mark.slow
def test_tiny_entry_trains_fine_tunes_and_tests(tmp_path):
    """The tiny chain through the Trainer: the entry trains 2 iterations; the dual-head leaf
    fine-tunes 2 iterations from its weights, leaving every tensor of them bit-identical;
    the TTA leaf detects with masks and mask scores from the fine-tuned weights."""
    root = tmp_path / "lt_entry"
    generate(str(root), seed=5, num_train=12, num_val=2, num_test=1, image_size=(64, 64),
             num_classes=8, progress=False)  # fmt: skip
    register_synthetic(str(root), prefix="lt_entry")
    runs = {}
    weights = ""
    for name in (ENTRY, f"{ENTRY}_dualhead"):
        out = tmp_path / name
        opts = FAST + ["OUTPUT_DIR", str(out), "MODEL.WEIGHTS", weights]
        trainer = Trainer(setup_cfg(str(TINY / f"{name}.yaml"), opts))
        trainer.resume_or_load(resume=False)
        trainer.train()
        metrics = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
        trained = [m for m in metrics if "total_loss" in m]
        assert trained and all(math.isfinite(m["total_loss"]) for m in trained)
        weights = str(out / "model_final.pth")
        runs[name] = torch.load(weights, map_location="cpu", weights_only=False)["model"]
    start, final = runs[ENTRY], runs[f"{ENTRY}_dualhead"]
    changed = [k for k in start if not torch.equal(start[k], final[k])]
    assert not changed, changed[:5]
    assert all(".dual_" in k for k in set(final) - set(start))

    tta_opts = ["MODEL.WEIGHTS", weights, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    cfg = setup_cfg(str(TINY / f"{ENTRY}_tta.yaml"), FAST + tta_opts)
    model = Trainer.build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    # 4 iterations from scratch leave BatchNorm's running statistics near their initial
    # values, so the detections themselves mean nothing (test_tta_twin_detects_with_masks)
    _assert_tta_detections(cfg, model, at_least=0)


def _assert_tta_detections(cfg, model, at_least: int):
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        out = LongTailTTA(cfg, model)([{"image": image, "height": 64, "width": 64}])[0]
    inst = out["instances"]
    assert len(inst) >= at_least and inst.pred_masks.shape == (len(inst), 64, 64)
    if len(inst):  # the merged detections carry the MaskIoU head's scores
        assert inst.mask_scores.shape == inst.scores.shape


@pytest.mark.slow
def test_tta_twin_detects_with_masks():
    """The TTA leaf's wrapper around the dual-head TSD model: flip and 3 scales merged, masks
    and mask scores (an untrained model, whose BatchNorm statistics are consistent)."""
    stats = register_unit_stats(24, name="lt_unit_stats_24")
    opts = ["DATASETS.TRAIN", f"('{stats}',)", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    cfg = setup_cfg(str(TINY / f"{ENTRY}_tta.yaml"), opts)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).eval()
    _assert_tta_detections(cfg, model, at_least=1)
