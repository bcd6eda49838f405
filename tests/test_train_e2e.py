"""End to end on CPU: train a tiny model on a tiny synthetic split, evaluate on val, export
test-dev, resume with the loss statistics intact, and train with 2 gloo processes."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_BASE
from detectron2.checkpoint import DetectionCheckpointer

from lvis_longtail.data import register_lvis_format
from lvis_longtail.data.builtin import register_synthetic
from lvis_longtail.data.synthetic import generate
from lvis_longtail.engine import Trainer, setup_cfg

pytestmark = pytest.mark.slow  # end to end: trains on a generated dataset

NUM_CLASSES = 8
# Shrink the tiny model further: the point here is the pipeline, not the accuracy.
FAST_OPTS = {
    "MODEL.ROI_HEADS.NUM_CLASSES": NUM_CLASSES,
    "MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME": "SeesawLoss",
    "MODEL.ROI_BOX_HEAD.PREDICTOR_TYPE": "NormedLinear",
    "MODEL.RPN.POST_NMS_TOPK_TEST": 20,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32,
    "INPUT.MIN_SIZE_TRAIN": (64,),
    "INPUT.MAX_SIZE_TRAIN": 64,
    "INPUT.MIN_SIZE_TEST": 64,
    "INPUT.MAX_SIZE_TEST": 64,
    "SOLVER.IMS_PER_BATCH": 2,
    "SOLVER.WARMUP_ITERS": 1,
    "SOLVER.STEPS": (),
    "SOLVER.BASE_LR": 0.005,
    "DATALOADER.NUM_WORKERS": 0,
    "TEST.DETECTIONS_PER_IMAGE": 20,
}
FAST = [str(x) for kv in FAST_OPTS.items() for x in kv]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    generate(
        str(root / "lt_synthetic"),
        seed=1,
        num_train=60,
        num_val=6,
        num_test=4,
        image_size=(64, 64),
        num_classes=NUM_CLASSES,
        progress=False,
    )
    register_synthetic(str(root / "lt_synthetic"), prefix="lt_e2e")
    return root


def e2e_cfg(output_dir, max_iter, extra=()):
    opts = FAST + [
        "DATASETS.TRAIN",
        "('lt_e2e_train',)",
        "DATASETS.TEST",
        "('lt_e2e_val', 'lt_e2e_test_dev')",
        "SOLVER.MAX_ITER",
        str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD",
        "3",
        "OUTPUT_DIR",
        str(output_dir),
    ]
    return setup_cfg(str(TINY_BASE), opts + list(extra))


def seesaw_counts(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "cum_samples" in k}


def test_train_evaluate_export_and_resume(synthetic_root, tmp_path):
    trainer = Trainer(e2e_cfg(tmp_path, max_iter=3))
    trainer.resume_or_load(resume=False)
    trainer.train()

    val = json.loads((tmp_path / "inference" / "lt_e2e_val" / "lvis_metrics.json").read_text())
    for task in ("bbox", "segm"):
        assert {"AP", "APr", "APc", "APf"} <= set(val[task])
    export = tmp_path / "inference" / "lt_e2e_test_dev" / "lvis_instances_results.json"
    dets = json.loads(export.read_text())
    test_ids = {
        img["id"]
        for img in json.load(
            open(synthetic_root / "lt_synthetic" / "annotations" / "lt_synthetic_test_dev.json")
        )["images"]
    }
    assert dets and {d["image_id"] for d in dets} <= test_ids
    assert {"image_id", "category_id", "score", "bbox", "segmentation"} <= set(dets[0])
    assert (
        1 <= min(d["category_id"] for d in dets)
        and max(d["category_id"] for d in dets) <= NUM_CLASSES
    )
    assert isinstance(dets[0]["segmentation"]["counts"], str)

    counts = seesaw_counts(trainer.model)
    assert counts and all(v.sum() > 0 for v in counts.values())
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert saved["iteration"] == 2
    for k, v in counts.items():
        torch.testing.assert_close(saved["model"][k], v)

    # Resume into a longer schedule: iteration, optimizer/scheduler and statistics carry on.
    resumed = Trainer(e2e_cfg(tmp_path, max_iter=5, extra=["TEST.EVAL_PERIOD", "0"]))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    for k, v in seesaw_counts(resumed.model).items():
        torch.testing.assert_close(v, counts[k])
    assert resumed.checkpointer.has_checkpoint()


def test_eval_only_loads_weights(synthetic_root, tmp_path):
    cfg = e2e_cfg(tmp_path, max_iter=1)
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    results = Trainer.test(cfg, model)
    assert set(results) == {"lt_e2e_val", "lt_e2e_test_dev"} and results["lt_e2e_test_dev"] == {}


def test_eval_only_with_only_the_evaluated_splits_json(synthetic_root, tmp_path):
    """--eval-only when the training json is absent: the class count is checked against
    the evaluated split, and APr/APc/APf use its json's 'frequency' fields, which the log and
    the metrics file say."""
    register_lvis_format("lt_e2e_no_train", str(tmp_path / "absent.json"), str(tmp_path))
    cfg = e2e_cfg(tmp_path, 1, ["DATASETS.TRAIN", "('lt_e2e_no_train',)",
                                "DATASETS.TEST", "('lt_e2e_val',)"])  # fmt: skip
    model = Trainer.build_model(cfg)
    results = Trainer.test(cfg, model)  # one dataset: detectron2 returns its results alone
    assert {"AP", "APr", "APc", "APf"} <= set(results["bbox"])
    saved = json.loads((tmp_path / "inference" / "lt_e2e_val" / "lvis_metrics.json").read_text())
    assert saved["frequency_source"] == (
        f"the json's 'frequency' fields ({NUM_CLASSES} categories); training split "
        "['lt_e2e_no_train'] not available (FileNotFoundError)"
    )
    bad = e2e_cfg(tmp_path, 1, ["DATASETS.TRAIN", "('lt_e2e_no_train',)",
                                "MODEL.ROI_HEADS.NUM_CLASSES", "1203"])  # fmt: skip
    with pytest.raises(ValueError, match="NUM_CLASSES is 1203 but dataset 'lt_e2e_val' has 8"):
        Trainer.build_model(bad)


def test_num_classes_mismatch_is_explained(synthetic_root, tmp_path):
    cfg = e2e_cfg(tmp_path, max_iter=1, extra=["MODEL.ROI_HEADS.NUM_CLASSES", "1230"])
    with pytest.raises(ValueError, match=r"NUM_CLASSES is 1230 but dataset 'lt_e2e_train' has 8"):
        Trainer.build_model(cfg)


def test_frozen_modules(synthetic_root, tmp_path):
    cfg = e2e_cfg(tmp_path, 1, ["MODEL.FROZEN_MODULES", "['backbone', 'proposal_generator']"])
    model = Trainer.build_model(cfg)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any(
        g for n, g in grads.items() if n.startswith(("backbone.", "proposal_generator."))
    )
    assert all(g for n, g in grads.items() if n.startswith("roi_heads."))
    cfg = e2e_cfg(tmp_path, 1, ["MODEL.FROZEN_MODULES", "['backbon']"])
    with pytest.raises(ValueError, match="'backbon' matches no parameter"):
        Trainer.build_model(cfg)


def test_two_cpu_processes_with_gloo(synthetic_root, tmp_path):
    """train_net.py --num-gpus 2 MODEL.DEVICE cpu: two gloo processes train and evaluate."""
    opts = [o.replace("'lt_e2e", "'lt_synthetic") for o in FAST] + [
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "OUTPUT_DIR",
        str(tmp_path),
        "DATASETS.TEST",
        "('lt_synthetic_val',)",
        "MODEL.DEVICE",
        "cpu",
    ]
    env = dict(os.environ, DETECTRON2_DATASETS=str(synthetic_root))
    cmd = [
        sys.executable,
        str(REPO / "train_net.py"),
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        "--config-file",
        str(TINY_BASE),
        *opts,
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log
    assert "Saved LVIS results (standard protocol)" in log  # lvis_longtail's loggers reach it
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    trained = [m for m in metrics if "total_loss" in m]
    assert trained and all(math.isfinite(m["total_loss"]) for m in trained)
    assert (tmp_path / "inference" / "lt_synthetic_val" / "lvis_instances_results.json").exists()
    assert "lt_synthetic_val bbox: AP " in proc.stdout  # the closing summary has the metrics
