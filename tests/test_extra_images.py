"""Pseudo-labelled extra images: the per-epoch sub-sample, batches of one source, the loss
weight, the config rules, and 2 training iterations of the tiny recipe end to end."""

import copy
import json
import math
from collections import Counter

import pytest
import torch
from conftest import REPO, make_batch, tiny_cfg
from detectron2.data.common import AspectRatioGroupedDataset
from detectron2.modeling import build_model

from lvis_longtail.config import ConfigError
from lvis_longtail.data.extra_images import ExtraImagesSampler, LossWeightGroupedDataset
from lvis_longtail.engine import setup_cfg
from lvis_longtail.modeling.ignore_regions import batch_loss_weight

CONFIG = REPO / "configs" / "tiny" / "mask_rcnn_R18_FPN_tiny_seesaw_selftrain_extra.yaml"


def _epochs(sampler, n_epochs):
    g = torch.Generator()
    g.manual_seed(7)
    return [sampler.epoch_indices(g).tolist() for _ in range(n_epochs)]


def test_each_epoch_is_the_main_set_once_plus_a_fresh_subsample_of_extras():
    sampler = ExtraImagesSampler(num_main=10, num_extra=30, per_epoch=4, seed=0)
    epochs = _epochs(sampler, 3)
    extras = []
    for epoch in epochs:
        assert sorted(i for i in epoch if i < 10) == list(range(10))  # main: each once
        extra = [i for i in epoch if i >= 10]
        assert len(extra) == len(set(extra)) == 4 and max(extra) < 40  # without replacement
        extras.append(frozenset(extra))
        assert epoch != sorted(epoch)  # shuffled together
    assert len(set(extras)) == 3  # a new sub-sample every epoch
    everything = ExtraImagesSampler(10, 30, per_epoch=-1, seed=0)
    assert sorted(_epochs(everything, 1)[0]) == list(range(40))
    too_many = ExtraImagesSampler(10, 3, per_epoch=50, seed=0)
    assert too_many.per_epoch == 3


def test_repeat_factors_govern_the_main_part_only():
    factors = torch.tensor([1.0, 2.0, 2.5, 1.0])
    sampler = ExtraImagesSampler(4, 5, per_epoch=2, repeat_factors=factors, seed=0)
    counts = Counter()
    for epoch in _epochs(sampler, 200):
        main = Counter(i for i in epoch if i < 4)
        assert main[0] == 1 and main[1] == 2 and main[2] in (2, 3) and main[3] == 1
        assert sum(1 for i in epoch if i >= 4) == 2
        counts[2] += main[2]
    assert abs(counts[2] / 200 - 2.5) < 0.15  # stochastic rounding of 2.5
    with pytest.raises(ValueError, match="3 repeat factors for 4 main images"):
        ExtraImagesSampler(4, 5, 2, repeat_factors=torch.ones(3), seed=0)


def test_stream_is_seeded_and_split_across_ranks():
    a = ExtraImagesSampler(6, 6, per_epoch=3, seed=5)
    b = ExtraImagesSampler(6, 6, per_epoch=3, seed=5)
    first = [i for _, i in zip(range(30), iter(a))]
    assert first == [i for _, i in zip(range(30), iter(b))]
    ranks = []
    for rank in range(2):
        s = ExtraImagesSampler(6, 6, per_epoch=3, seed=5)
        s._rank, s._world_size = rank, 2
        ranks.append([i for _, i in zip(range(15), iter(s))])
    assert ranks[0] == first[0::2] and ranks[1] == first[1::2]


def test_batches_hold_one_loss_weight_and_equal_detectron2_without_extras():
    samples = [
        {"width": 4 + (k % 3), "height": 5, "id": k, **({"loss_weight": 0.5} if k % 4 == 0 else {})}
        for k in range(40)
    ]
    batches = list(LossWeightGroupedDataset(samples, 2, [1.0, 0.5]))
    assert batches and all(len({d.get("loss_weight", 1.0) for d in b}) == 1 for b in batches)
    assert all(len({d["width"] > d["height"] for d in b}) == 1 for b in batches)
    plain = [dict(s, loss_weight=1.0) if "loss_weight" in s else s for s in samples]
    ours = [[d["id"] for d in b] for b in LossWeightGroupedDataset(plain, 2, [1.0])]
    theirs = [[d["id"] for d in b] for b in AspectRatioGroupedDataset(plain, 2)]
    assert ours == theirs


def test_losses_of_an_extra_batch_are_scaled_by_its_weight(storage):
    cfg = tiny_cfg(opts=["MODEL.META_ARCHITECTURE", "LongTailRCNN", "MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    model.train()
    batch = make_batch()
    torch.manual_seed(0)
    plain = model(copy.deepcopy(batch))
    torch.manual_seed(0)
    weighted = model([dict(x, loss_weight=0.25) for x in copy.deepcopy(batch)])
    assert plain.keys() == weighted.keys()
    for k in plain:
        torch.testing.assert_close(weighted[k], 0.25 * plain[k], rtol=1e-6, atol=0)
    assert batch_loss_weight(batch) == 1.0
    with pytest.raises(ValueError, match=r"mixes images with loss weights \[0.5, 1.0\]"):
        model([dict(batch[0], loss_weight=0.5), batch[1]])


def test_config_rules_name_the_keys():
    extra = ["DATASETS.EXTRA_TRAIN", "('lt_synthetic_val',)"]
    base = REPO / "configs" / "tiny" / "mask_rcnn_R18_FPN_tiny_seesaw.yaml"
    with pytest.raises(ConfigError, match="needs MODEL.META_ARCHITECTURE 'LongTailRCNN'"):
        setup_cfg(str(base), extra)
    lt = extra + ["MODEL.META_ARCHITECTURE", "LongTailRCNN"]
    with pytest.raises(ConfigError, match="needs DATALOADER.ASPECT_RATIO_GROUPING True"):
        setup_cfg(str(base), lt + ["DATALOADER.ASPECT_RATIO_GROUPING", "False"])
    with pytest.raises(ConfigError, match="EXTRA_TRAIN_LOSS_WEIGHT must be > 0"):
        setup_cfg(str(base), lt + ["DATASETS.EXTRA_TRAIN_LOSS_WEIGHT", "0.0"])
    with pytest.raises(ConfigError, match="DATASETS.EXTRA_TRAIN: dataset 'nope' is not registered"):
        setup_cfg(str(base), ["DATASETS.EXTRA_TRAIN", "('nope',)"] + lt[2:])


@pytest.mark.slow
def test_tiny_recipe_trains_on_pseudo_labelled_extra_images(tmp_path):
    from detectron2.data import DatasetCatalog

    from lvis_longtail.data.builtin import register_synthetic
    from lvis_longtail.data.synthetic import generate
    from lvis_longtail.engine import Trainer
    from lvis_longtail.tools.pseudo_label import main as pseudo_label

    generate(str(tmp_path / "syn"), seed=5, num_train=6, num_val=1, num_test=1,
             image_size=(64, 64), num_classes=8, withhold_fraction=0.4, num_unlabeled=6,
             progress=False)  # fmt: skip
    register_synthetic(str(tmp_path / "syn"), prefix="lt_ex")
    fast = ["MODEL.ROI_HEADS.NUM_CLASSES", "8", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MAX_SIZE_TRAIN", "64", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS",
            "1", "SOLVER.STEPS", "()", "SOLVER.MAX_ITER", "4", "DATALOADER.NUM_WORKERS", "0",
            "DATASETS.TEST", "()", "DATASETS.TRAIN", "('lt_ex_train',)", "MODEL.DEVICE", "cpu",
            "DATASETS.IGNORE_BOXES", "[]"]  # fmt: skip
    pseudo = tmp_path / "unlabeled_pseudo.json"
    summary = pseudo_label(["--config-file", str(CONFIG), "--dataset", "lt_ex_unlabeled",
                            "--output", str(pseudo), "--score-thresh", "0.0",
                            *fast, "DATASETS.EXTRA_TRAIN", "()", "DATASETS.LVIS_FORMAT", "[]"])  # fmt: skip  # noqa: E501
    assert summary["images"] == 6 and summary["pseudo_labels"] > 0
    images = str(tmp_path / "syn" / "images")
    opts = fast + ["OUTPUT_DIR", str(tmp_path / "out"), "DATASETS.EXTRA_TRAIN_PER_EPOCH", "3",
                   "DATASETS.LVIS_FORMAT",
                   f"[['lt_ex_unlabeled_pseudo', '{pseudo}', '{images}']]",
                   "DATASETS.EXTRA_TRAIN", "('lt_ex_unlabeled_pseudo',)"]  # fmt: skip
    cfg = setup_cfg(str(CONFIG), opts, check_files=True)
    extra = DatasetCatalog.get("lt_ex_unlabeled_pseudo")
    assert extra and all(r["annotations"] for r in extra)
    trainer = Trainer(cfg)
    seen = []
    model_forward = trainer.model.forward

    def recording_forward(batched_inputs):
        seen.append({x.get("loss_weight", 1.0) for x in batched_inputs})
        return model_forward(batched_inputs)

    trainer.model.forward = recording_forward
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert all(len(w) == 1 for w in seen) and len(seen) == 4  # batches of one source
    assert {0.5} in seen and {1.0} in seen  # both sources trained (SEED fixes the draw)
    lines = (tmp_path / "out" / "metrics.json").read_text().splitlines()
    trained = [m for m in map(json.loads, lines) if "total_loss" in m]
    assert trained and all(math.isfinite(m["total_loss"]) for m in trained)


def test_an_extra_set_without_labels_is_named():
    from detectron2.data import DatasetCatalog

    from lvis_longtail.data.extra_images import extra_images_dataset

    DatasetCatalog.register("lt_ex_empty", lambda: [{"image_id": 1, "annotations": []}])
    try:
        cfg = tiny_cfg(opts=["DATASETS.EXTRA_TRAIN", "('lt_ex_empty',)"])
        with pytest.raises(ValueError, match="no image of 'lt_ex_empty' has an annotation"):
            extra_images_dataset(cfg, main=[])
    finally:
        DatasetCatalog.remove("lt_ex_empty")
