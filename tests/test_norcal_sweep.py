"""The gamma sweep tool: one backbone pass, per-value RoI heads equal to full inference, and
the printed / saved table (tiny synthetic split, untrained tiny model)."""

import json

import pytest
import torch
from conftest import TINY_BASE
from detectron2.evaluation.evaluator import inference_context

from lvis_longtail.data.builtin import register_synthetic
from lvis_longtail.data.synthetic import generate
from lvis_longtail.engine import Trainer, setup_cfg
from lvis_longtail.modeling.cls_losses import set_calibration_strength
from lvis_longtail.tools import norcal_sweep

NUM_CLASSES = 8
OPTS = {
    "MODEL.ROI_HEADS.NUM_CLASSES": NUM_CLASSES,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 30,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,
    "INPUT.MIN_SIZE_TEST": 64,
    "INPUT.MAX_SIZE_TEST": 64,
    "DATALOADER.NUM_WORKERS": 0,
    "TEST.DETECTIONS_PER_IMAGE": 20,
    "DATASETS.TRAIN": "('lt_sweep_train',)",
    "DATASETS.TEST": "('lt_sweep_val',)",
}


@pytest.fixture(scope="module")
def sweep_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep") / "lt_synthetic"
    generate(str(root), seed=2, num_train=12, num_val=3, num_test=1, image_size=(64, 64),
             num_classes=NUM_CLASSES, progress=False)  # fmt: skip
    register_synthetic(str(root), prefix="lt_sweep")
    return root


def sweep_cfg(output_dir, calibration="norcal"):
    opts = [str(x) for kv in OPTS.items() for x in kv]
    opts += ["OUTPUT_DIR", str(output_dir), "TEST.CLS_CALIBRATION", calibration]
    return setup_cfg(str(TINY_BASE), opts)


def test_one_backbone_pass_equals_full_inference_per_gamma(sweep_split, tmp_path):
    cfg = sweep_cfg(tmp_path)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    inputs = next(iter(Trainer.build_test_loader(cfg, "lt_sweep_val")))
    gammas = [0.0, 0.5, 2.0]
    with inference_context(model), torch.no_grad():
        swept = norcal_sweep.sweep_inference(model, inputs, gammas)
        for gamma, outputs in zip(gammas, swept):
            set_calibration_strength(model, gamma)
            for ours, full in zip(outputs, model(inputs)):
                a, b = ours["instances"], full["instances"]
                assert torch.equal(a.pred_classes, b.pred_classes)
                assert torch.allclose(a.scores, b.scores)
                assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor)
                assert torch.equal(a.pred_masks, b.pred_masks)
    # calibration changes the scores: gamma 2 is not gamma 0
    first = [o["instances"].scores for o in swept[0]]
    last = [o["instances"].scores for o in swept[2]]
    assert any(f.shape != s.shape or not torch.allclose(f, s) for f, s in zip(first, last))


@pytest.mark.slow
def test_sweep_table_and_gamma_zero_row_is_the_uncalibrated_evaluation(sweep_split, tmp_path):
    torch.manual_seed(0)
    model = Trainer.build_model(sweep_cfg(tmp_path / "plain", "none"))
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    plain = Trainer.test(sweep_cfg(tmp_path / "plain", "none"), model)  # one split: flat

    out = tmp_path / "sweep"
    argv = ["--config-file", str(TINY_BASE), "--gammas", "0", "1", "--output", str(out)]
    argv += [str(x) for kv in OPTS.items() for x in kv] + ["MODEL.WEIGHTS", str(weights)]
    assert norcal_sweep.main(argv) == 0
    saved = json.loads((out / norcal_sweep.RESULTS_FILE).read_text())
    assert saved["method"] == "norcal" and [r["value"] for r in saved["rows"]] == [0.0, 1.0]
    for task in ("bbox", "segm"):
        assert saved["rows"][0][task] == pytest.approx(plain[task], nan_ok=True)
    table = norcal_sweep.format_table(saved["rows"], "gamma")
    assert table.splitlines()[0].split("|")[1].strip() == "gamma"
    assert "segm APr" in table and len(table.splitlines()) == 4


def test_sweep_needs_a_softmax_loss(sweep_split, tmp_path):
    argv = ["--config-file", str(TINY_BASE), "--output", str(tmp_path)]
    argv += [str(x) for kv in OPTS.items() for x in kv]
    with pytest.raises(ValueError, match="CLS_LOSS_NAME 'EQL'"):
        norcal_sweep.main(argv + ["MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "EQL"])
