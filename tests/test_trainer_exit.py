"""The training loader's DataLoader workers ignore SIGTERM (so a preemption signal reaches only
the training process), which also stops Python's exit from terminating them: when the trainer
outlived training (it does once it has evaluated), ``train_net.py`` waited for them forever
after its summary. Training now shuts them down when it ends."""

import multiprocessing

import pytest
from conftest import TINY_BASE

from lvis_longtail.data.builtin import register_synthetic
from lvis_longtail.data.synthetic import generate
from lvis_longtail.engine import Trainer, setup_cfg


@pytest.mark.slow
def test_training_loader_workers_are_gone_when_training_ends(tmp_path):
    generate(str(tmp_path / "syn"), seed=4, num_train=8, num_val=1, num_test=1,
             image_size=(64, 64), num_classes=8, progress=False)  # fmt: skip
    register_synthetic(str(tmp_path / "syn"), prefix="lt_exit")
    opts = ["MODEL.ROI_HEADS.NUM_CLASSES", "8", "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MAX_SIZE_TRAIN", "64", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
            "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "1",
            "DATASETS.TRAIN", "('lt_exit_train',)", "DATASETS.TEST", "()",
            "OUTPUT_DIR", str(tmp_path / "out")]  # fmt: skip
    trainer = Trainer(setup_cfg(str(TINY_BASE), opts))
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == 2  # trained to MAX_ITER (and the trainer is still referenced here)
    assert multiprocessing.active_children() == []
