"""LongTailTTA: equality with detectron2's GeneralizedRCNNWithTTA when every new option is off,
valid ranges in augmented pixels, flip inversion, class factors, merge bookkeeping, the
"select" mask rule, and the Trainer.test hook."""

import pytest
import torch
from conftest import tiny_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.modeling import GeneralizedRCNNWithTTA, build_model
from detectron2.structures import Boxes, Instances

from lvis_longtail.config import ConfigError
from lvis_longtail.config_check import check_config
from lvis_longtail.engine import Trainer
from lvis_longtail.modeling.tta import LongTailTTA, class_score_factors, select_weights

AUG = ["TEST.AUG.MIN_SIZES", (64, 96), "TEST.AUG.MAX_SIZE", 160, "TEST.AUG.FLIP", True]


def _model(opts=(), seed=0):
    torch.manual_seed(seed)
    cfg = tiny_cfg(opts=AUG + list(opts))
    model = build_model(cfg).eval()
    return cfg, model


def _input(h=80, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (3, h, w), generator=g).to(torch.uint8),
            "height": h, "width": w}  # fmt: skip


def test_all_options_off_equals_detectron2_tta():
    cfg, model = _model(["TEST.AUG.MIN_SIZES", (48, 64), "TEST.DETECTIONS_PER_IMAGE", 40,
                         "MODEL.RPN.POST_NMS_TOPK_TEST", 60])  # fmt: skip
    inputs = [_input(56, 72)]
    with torch.no_grad():
        ref = GeneralizedRCNNWithTTA(cfg, model)(inputs)[0]["instances"]
        outs = [LongTailTTA(cfg, model)(inputs)[0]["instances"]]
        cfg.TEST.AUG.MASK_CHUNK_SIZE = 7  # several mask-head calls per augmented image
        outs.append(LongTailTTA(cfg, model)(inputs)[0]["instances"])
    assert len(ref) > 10  # a random model still detects plenty
    for a in outs:
        assert torch.equal(a.pred_boxes.tensor, ref.pred_boxes.tensor)
        assert torch.equal(a.scores, ref.scores) and torch.equal(a.pred_classes, ref.pred_classes)
        assert (a.pred_masks != ref.pred_masks).float().mean() < 1e-4  # fp ties at 0.5 only


class _StubModel:
    """Replaces a model's inference / mask pass with known outputs per augmented image."""

    def __init__(self, model, boxes_per_aug):
        self.seen_mask_boxes = []
        self.boxes_per_aug = boxes_per_aug
        self.calls = 0

        def inference(batch, detected_instances=None, do_postprocess=True):
            outs = []
            for x in batch:
                b = self.boxes_per_aug[self.calls]
                self.calls += 1
                inst = Instances(tuple(x["image"].shape[1:3]))
                inst.pred_boxes = Boxes(b)
                inst.scores = torch.linspace(0.9, 0.5, len(b))
                inst.pred_classes = torch.arange(len(b))
                outs.append(inst)
            return outs

        def given_boxes(features, instances):
            inst = instances[0]
            self.seen_mask_boxes.append(inst.pred_boxes.tensor.clone())
            m = torch.zeros(len(inst), 1, 28, 28)
            m[:, :, :, 0] = 1.0  # left column
            inst.pred_masks = m
            inst.mask_scores = inst.scores * 0.5
            return [inst]

        model.inference = inference
        model.roi_heads.forward_with_given_boxes = given_boxes


def test_valid_range_filters_in_augmented_pixels_before_inverse():
    # input 64 x 64; scale 0 = 64 px (factor 1), scale 1 = 128 px (factor 2)
    cfg, model = _model(["TEST.AUG.SCALES", [[64, 400], [128, 400]], "TEST.AUG.FLIP", False,
                         "TEST.AUG.VALID_RANGES", [[30, -1], [0, 30]]])  # fmt: skip
    box = torch.tensor([[0.0, 0, 40, 40], [0, 0, 20, 20]])
    _StubModel(model, [box, box])
    tta = LongTailTTA(cfg, model)
    aug, tfms, scale_ids = tta._augment(_input(64, 64))
    dets = tta.augmented_detections(aug, tfms, scale_ids)
    # scale 0: sqrt(wh) 40 kept, 20 dropped; scale 1: 40 dropped (it is 20 px in the input
    # image, so a filter after the inverse would keep it), 20 kept and halved
    assert dets["aug"].tolist() == [0, 1] and dets["row"].tolist() == [0, 1]
    torch.testing.assert_close(dets["boxes"], torch.tensor([[0.0, 0, 40, 40], [0, 0, 10, 10]]))


def test_flip_inversion_of_boxes_and_masks():
    cfg, model = _model(["TEST.AUG.SCALES", [[64, 400]], "TEST.AUG.FLIP", True])
    flipped = torch.tensor([[4.0, 2, 14, 12]])  # in the flipped 64 x 64 image
    stub = _StubModel(model, [torch.tensor([[40.0, 30, 60, 50]]), flipped])
    tta = LongTailTTA(cfg, model)
    aug, tfms, scale_ids = tta._augment(_input(64, 64))
    dets = tta.augmented_detections(aug, tfms, scale_ids)
    torch.testing.assert_close(dets["boxes"][1], torch.tensor([50.0, 2, 60, 12]))
    merged, _ = tta.merge(dets, (64, 64))
    masks, mask_scores = tta.augmented_masks(aug, tfms, merged)
    # the flipped image's mask head saw the flipped boxes
    mirrored = 64 - merged.pred_boxes.tensor[:, [2, 0]]
    torch.testing.assert_close(stub.seen_mask_boxes[1][:, [0, 2]], mirrored)
    assert torch.all(masks[0, :, :, 0] == 1) and torch.all(masks[0, :, :, 1:] == 0)
    assert torch.all(masks[1, :, :, -1] == 1) and torch.all(masks[1, :, :, :-1] == 0)
    torch.testing.assert_close(mask_scores, merged.scores[None].expand(2, -1) * 0.5)


def _dets(classes, scores, boxes=None):
    n = len(classes)
    if boxes is None:
        boxes = torch.tensor([[10.0 * i, 0, 10.0 * i + 8, 8] for i in range(n)])
    return {"boxes": boxes, "scores": torch.tensor(scores), "classes": torch.tensor(classes),
            "aug": torch.arange(n) % 3, "row": torch.arange(n)}  # fmt: skip


def test_rare_factor_changes_only_rare_scores():
    name = "lt_tta_unit_frequency"
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(class_frequency=["f", "c", "r", "f", "c", "r", "f", "f"])
    classes, scores = [0, 1, 2, 5, 7], [0.3, 0.4, 0.5, 0.6, 0.2]
    cfg, model = _model(["TEST.AUG.RARE_SCORE_FACTOR", 1.5, "DATASETS.TRAIN", (name,)])
    merged, index = LongTailTTA(cfg, model).merge(_dets(classes, scores), (100, 100))
    got = dict(zip(merged.pred_classes.tolist(), merged.scores.tolist()))
    assert got == pytest.approx({0: 0.3, 1: 0.4, 2: 0.75, 5: 0.9, 7: 0.2})
    cfg, model = _model(["TEST.AUG.COMMON_SCORE_FACTOR", 2.0, "DATASETS.TRAIN", (name,)])
    merged, _ = LongTailTTA(cfg, model).merge(_dets(classes, scores), (100, 100))
    got = dict(zip(merged.pred_classes.tolist(), merged.scores.tolist()))
    assert got == pytest.approx({0: 0.3, 1: 0.8, 2: 0.5, 5: 0.6, 7: 0.2})
    cfg, model = _model(["TEST.AUG.RARE_SCORE_FACTOR", 1.5, "DATASETS.TRAIN", ()])
    with pytest.raises(ValueError, match="frequency groups of DATASETS.TRAIN"):
        LongTailTTA(cfg, model)
    assert class_score_factors(["r", "c", "f"], 1.2, 1.1).tolist() == pytest.approx([1.2, 1.1, 1])
    with pytest.raises(ValueError, match="not one of r, c, f"):
        class_score_factors(["x"], 1.2, 1.0)


@pytest.mark.parametrize("merge_type", ["hard", "soft_linear", "soft_gaussian"])
def test_bookkeeping_survives_nms_and_soft_nms(merge_type):
    g = torch.Generator().manual_seed(3)
    n = 60
    xy = torch.rand(n, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 30 + 5], dim=1)
    dets = _dets(torch.randint(0, 3, (n,), generator=g).tolist(),
                 torch.rand(n, generator=g).tolist(), boxes)  # fmt: skip
    cfg, model = _model(["TEST.AUG.NMS_THRESH", 0.7, "TEST.AUG.MERGE_NMS_TYPE", merge_type])
    merged, index = LongTailTTA(cfg, model).merge(dets, (60, 60))
    assert 0 < len(merged) < n
    ref = Boxes(dets["boxes"][index].clone())
    ref.clip((60, 60))
    assert torch.equal(merged.pred_boxes.tensor, ref.tensor)
    assert torch.equal(merged.pred_classes, dets["classes"][index])
    assert torch.all(merged.scores <= dets["scores"][index] + 1e-7)
    if merge_type == "hard":
        assert torch.equal(merged.scores, dets["scores"][index])
    assert torch.all(merged.scores[:-1] >= merged.scores[1:])
    # each kept detection's (augmentation, row) is that of the kept input
    assert torch.equal(dets["aug"][index], index % 3) and torch.equal(dets["row"][index], index)


def test_select_picks_the_scale_of_sqrt_whr():
    # box 40 x 40 in the input image, predicted mask covers 1/4 of it -> sqrt(w h r) = 20 px;
    # scale 0 (factor 1): 20 px in [0, 24]; scale 1 (factor 2): 40 px not in [48, inf)
    masks = torch.zeros(4, 1, 28, 28)  # augs: scale 0, scale 0 flip, scale 1, scale 1 flip
    masks[:, :, :14, :14] = 0.9
    masks[2:, :, :14, :14] = 0.7  # different values at scale 1
    boxes = torch.tensor([[0.0, 0, 40, 40]])
    scale_ids, factors = torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 2.0])
    ranges = torch.tensor([[0.0, 24], [48, -1]])
    assert select_weights(masks, boxes, scale_ids, factors, ranges)[:, 0].tolist() == [1, 1, 0, 0]
    # with a full mask (r = 1): 40 px at scale 0 (no), 80 px at scale 1 (yes)
    full = torch.full((4, 1, 28, 28), 0.9)
    assert select_weights(full, boxes, scale_ids, factors, ranges)[:, 0].tolist() == [0, 0, 1, 1]
    # in no range -> the mean of all
    none = torch.tensor([[0.0, 1], [0, 1]])
    assert select_weights(masks, boxes, scale_ids, factors, none)[:, 0].tolist() == [1, 1, 1, 1]
    cfg, model = _model(["TEST.AUG.SCALES", [[64, 400], [128, 400]], "TEST.AUG.MASK_RULE",
                         "select", "TEST.AUG.VALID_RANGES", [[0, 24], [48, -1]]])  # fmt: skip
    tta = LongTailTTA(cfg, model)
    merged = Instances((64, 64), pred_boxes=Boxes(boxes), scores=torch.tensor([0.8]))
    mscores = torch.tensor([[0.1], [0.3], [0.5], [0.7]])
    mask, mscore = tta.reduce_masks(masks, mscores, merged, scale_ids, factors)
    assert torch.allclose(mask[0, 0, :14, :14], torch.tensor(0.9))
    assert mscore.tolist() == pytest.approx([0.2])


def test_config_errors_name_the_keys():
    with pytest.raises(ConfigError, match="VALID_RANGES has 1 ranges for 2 scales"):
        check_config(tiny_cfg(opts=AUG + ["TEST.AUG.VALID_RANGES", [[0, 10]]]))
    with pytest.raises(ConfigError, match='MASK_RULE "select" needs TEST.AUG.VALID_RANGES'):
        check_config(tiny_cfg(opts=AUG + ["TEST.AUG.MASK_RULE", "select"]))


def test_trainer_test_wraps_the_model_when_enabled(monkeypatch):
    monkeypatch.setattr(DefaultTrainer, "test", classmethod(lambda cls, cfg, m, ev=None: m))
    cfg, model = _model()
    assert Trainer.test(cfg, model) is model
    cfg.TEST.AUG.ENABLED = True
    wrapped = Trainer.test(cfg, model)
    assert isinstance(wrapped, LongTailTTA) and wrapped.model is model


def test_cascade_two_pass_and_mask_scores_through_tta():
    opts = ["MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads",
            "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True,
            "MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT", "area_ratio",
            "MODEL.ROI_MASK_HEAD.TEST_AREA_RATIO", "two_pass", "MODEL.ROI_MASKIOU_HEAD.ENABLED",
            True, "TEST.AUG.SCALES", [[48, 80], [64, 100]], "TEST.AUG.VALID_RANGES",
            [[8, -1], [0, 60]], "TEST.AUG.MASK_RULE", "select", "TEST.AUG.MASK_CHUNK_SIZE", 16,
            "TEST.AUG.MERGE_NMS_TYPE", "soft_linear", "TEST.AUG.FLIP", False,
            "TEST.DETECTIONS_PER_IMAGE", 30, "MODEL.RPN.POST_NMS_TOPK_TEST", 40]  # fmt: skip
    cfg, model = _model(opts)
    with torch.no_grad():
        out = LongTailTTA(cfg, model)([_input(48, 64)])[0]["instances"]
    assert len(out) > 0 and out.pred_masks.shape == (len(out), 48, 64)
    # mask_scores = merged score x mean predicted IoU (clamped to [0, 1]) of the selected scales
    assert out.mask_scores.shape == out.scores.shape
    assert torch.all(out.mask_scores <= out.scores + 1e-6) and torch.all(out.mask_scores >= 0)


def test_no_detection_gives_empty_masks():
    cfg, model = _model(["TEST.AUG.SCALES", [[64, 400]], "TEST.AUG.FLIP", True])
    _StubModel(model, [torch.zeros((0, 4)), torch.zeros((0, 4))])
    out = LongTailTTA(cfg, model)([_input(64, 48)])[0]["instances"]
    assert len(out) == 0 and out.pred_masks.shape == (0, 64, 48)
