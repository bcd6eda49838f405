"""The training loader: sampler grouping, retries, determinism, the recipe YAMLs train, and
the augmentation grid tool."""

import gc
import itertools
import math
import uuid
import weakref

import numpy as np
import pytest
import torch
from augment_helpers import aug_cfg, rect, write_record
from conftest import REPO
from detectron2.data import MetadataCatalog
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from PIL import Image

from lvis_longtail.data import lvis_json, register_lvis_format
from lvis_longtail.data.augmentations.mosaic import MosaicStep
from lvis_longtail.data.builtin import register_synthetic
from lvis_longtail.data.loader import GroupedSampler, GroupMapDataset
from lvis_longtail.data.mapper import LongTailDatasetMapper
from lvis_longtail.data.synthetic import generate
from lvis_longtail.engine import Trainer, setup_cfg
from lvis_longtail.tools import show_augmentations

NEW_CONFIGS = [
    "LVISv1/mask_rcnn_R50_FPN_mmdet2020_seesaw.yaml",
    "LVISv1/mask_rcnn_R50_FPN_1st2020_stage1.yaml",
    "tiny/mask_rcnn_R18_FPN_tiny_mmdet2020.yaml",
    "tiny/mask_rcnn_R18_FPN_tiny_1st2020_stage1.yaml",
    "tiny/mask_rcnn_R18_FPN_tiny_copypaste_lsj.yaml",
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("aug_datasets") / "lt_synthetic"
    generate(
        str(root),
        seed=3,
        num_train=16,
        num_val=2,
        num_test=2,
        image_size=(64, 64),
        num_classes=8,
        progress=False,
    )
    register_synthetic(str(root), prefix="lt_aug")
    return "lt_aug_train"


def test_grouped_sampler_is_the_sampler_stream():
    factors = torch.tensor([1.0, 3.5, 1.0, 0.2, 2.0])
    flat = list(itertools.islice(iter(RepeatFactorTrainingSampler(factors, seed=5)), 40))
    groups = list(
        itertools.islice(GroupedSampler(RepeatFactorTrainingSampler(factors, seed=5), 4), 10)
    )
    assert [i for g in groups for i in g] == flat


def _empty_after_mosaic(tmp_path):
    """A group whose only instances are in tile 0, which a centre at (0, 0) cuts away."""
    recs = [write_record(tmp_path, "full", (40, 40), [(0, rect(5, 5, 30, 30))])]
    recs += [write_record(tmp_path, f"e{k}", (40, 40), [], seed=k) for k in range(3)]
    mapper = LongTailDatasetMapper(aug_cfg(["Mosaic"]), True)
    mapper.segments = [("step", MosaicStep(1.0, (40, 40), (0.0, 0.0), 0.0))]
    return recs, mapper


def test_all_instances_removed_is_retried(tmp_path):
    recs, mapper = _empty_after_mosaic(tmp_path)
    np.random.seed(0)
    assert mapper.map_group(recs) is None
    # The sample is replaced by another group; here only groups that keep tile 0 elsewhere.
    good = write_record(tmp_path, "good", (40, 40), [(1, rect(0, 0, 40, 40))])
    dataset = GroupMapDataset(recs + [good], mapper, seed=0)
    out = dataset[(0, 1, 2, 3)]
    (replacement,) = dataset._fallback  # the group that was mapped instead
    assert replacement != (0, 1, 2, 3)
    # a centre at (0, 0) keeps only tile 3: the output holds exactly its record's instances
    tile3 = (recs + [good])[replacement[3]]
    assert len(out["instances"]) == len(tile3["annotations"]) > 0
    assert dataset[(3, 4, 4, 4)] is not None  # tile 3 (the full image) stays
    assert (3, 4, 4, 4) in dataset._fallback
    out = dataset[(0, 1, 2, 3)]
    assert len(out["instances"]) > 0


def test_loader_is_deterministic(synthetic):
    opts = [
        "DATASETS.TRAIN",
        f"('{synthetic}',)",
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "8",
        "DATALOADER.NUM_WORKERS",
        "0",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SEED",
        "7",
    ]
    cfg = setup_cfg(str(REPO / "configs/tiny/mask_rcnn_R18_FPN_tiny_1st2020_stage1.yaml"), opts)

    def first_batches():
        seed_all_rng(7)
        it = iter(Trainer.build_train_loader(cfg))
        return [next(it) for _ in range(2)]

    a, b = first_batches(), first_batches()
    for xa, xb in zip(itertools.chain(*a), itertools.chain(*b)):
        assert xa["image_id"] == xb["image_id"]
        assert torch.equal(xa["image"], xb["image"])
        assert torch.equal(xa["instances"].gt_boxes.tensor, xb["instances"].gt_boxes.tensor)
        assert torch.equal(xa["neg_category_ids"], xb["neg_category_ids"])


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_recipe_yaml_trains_two_iterations(synthetic, name):
    opts = [
        "DATASETS.TRAIN",
        f"('{synthetic}',)",
        "DATASETS.TEST",
        "()",
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "8",
        "MODEL.WEIGHTS",
        "",
        "MODEL.DEVICE",
        "cpu",
        "DATALOADER.NUM_WORKERS",
        "0",
        "SOLVER.IMS_PER_BATCH",
        "1",
    ]
    if name.startswith("LVISv1"):  # the recipe at 128 px on an R18 trunk, fast on a CPU
        opts += [
            "MODEL.RESNETS.DEPTH",
            "18",
            "MODEL.RESNETS.RES2_OUT_CHANNELS",
            "64",
            "MODEL.FPN.OUT_CHANNELS",
            "64",
            "INPUT.SCALE_JITTER.PRESET",
            "custom",
            "INPUT.SCALE_JITTER.TARGET_SIZE",
            "(128, 128)",
            "INPUT.SCALE_JITTER.CROP_SIZE",
            "(128, 128)",
            "INPUT.MOSAIC.TILE_SIZE",
            "(64, 64)",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN",
            "100",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            "64",
        ]
    cfg = setup_cfg(str(REPO / "configs" / name), opts)
    seed_all_rng(0)
    model = build_model(cfg)
    trainer = SimpleTrainer(model, Trainer.build_train_loader(cfg), build_optimizer(cfg, model))
    with EventStorage(0) as storage:
        trainer.storage = storage
        for trainer.iter in range(2):
            trainer.run_step()
            storage.step()
        losses = storage.histories()["total_loss"].values()
    assert len(losses) == 2 and all(math.isfinite(v) for v, _ in losses)


def test_show_augmentations_writes_a_grid(synthetic, tmp_path):
    path = show_augmentations.main(
        [
            "--config-file",
            str(REPO / "configs/tiny/mask_rcnn_R18_FPN_tiny_copypaste_lsj.yaml"),
            "--num",
            "4",
            "--output",
            str(tmp_path),
            "--cell",
            "96",
            "DATASETS.TRAIN",
            f"('{synthetic}',)",
            "MODEL.ROI_HEADS.NUM_CLASSES",
            "8",
        ]
    )
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 100 + 4, 2 * 100 + 4, 3)
    assert grid.std() > 10  # images drawn, not a blank canvas


def test_trainer_parses_the_training_json_once_and_keeps_none(synthetic, tmp_path, monkeypatch):
    """The model's class statistics (Federated Loss) and the loader's dicts come from one
    parse of the training json, and once the trainer is built nothing holds that parse: only
    detectron2's serialized dicts and the derived metadata remain."""
    meta = MetadataCatalog.get(synthetic)
    name = f"lt_once_{uuid.uuid4().hex[:8]}"  # fresh: its metadata is not derived yet
    register_lvis_format(name, meta.json_file, meta.image_root)
    parsed, validate = [], lvis_json.validate_lvis_dict

    def spy(data, source):
        validated = validate(data, source)
        parsed.append(weakref.ref(validated))
        return validated

    monkeypatch.setattr(lvis_json, "validate_lvis_dict", spy)
    opts = ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "MODEL.WEIGHTS", ""]
    opts += ["MODEL.ROI_HEADS.NUM_CLASSES", "8", "DATALOADER.NUM_WORKERS", "0"]
    opts += ["SOLVER.IMS_PER_BATCH", "1", "OUTPUT_DIR", str(tmp_path)]
    cfg = setup_cfg(str(REPO / "configs/tiny/mask_rcnn_R18_FPN_tiny_fedloss.yaml"), opts)
    trainer = Trainer(cfg)
    assert len(parsed) == 1  # class statistics for the loss, dicts for the loader: one parse
    gc.collect()
    assert parsed[0]() is None and not lvis_json._CACHE
    assert MetadataCatalog.get(name).class_image_count and len(parsed) == 1  # kept, derived
    assert len(next(iter(trainer._trainer.data_loader))) == 1  # the loader still works
