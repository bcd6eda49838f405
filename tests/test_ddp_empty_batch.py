"""Every tiny architecture config trains under 2-process DDP (gloo) while one rank's batch
holds no instance, as detectron2 0.6 wraps the model: ``DistributedDataParallel`` without
``find_unused_parameters``. A parameter left out of one rank's graph (a branch skipped for an
empty batch) fails the next step ("Expected to have finished reduction in the prior
iteration") or leaves the other rank waiting in the all-reduce (the small process-group
timeout turns that into an error)."""

import math
import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, free_port, register_unit_stats
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.engine.defaults import create_ddp_model
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode
from detectron2.utils.events import EventStorage

from lvis_longtail.data.image_labels import set_neg_classes
from lvis_longtail.engine import setup_cfg

WORLD_SIZE = 2
NUM_CLASSES = 12
SIZE = 64  # image side: the smallest that every backbone (stride 32, P6) takes
# Per step, whether each rank's images hold instances: each rank has an empty batch once,
# and every step after it would fail on a parameter that its empty step skipped.
SCHEDULE = ((True, False), (False, True), (True, True))
TINY = REPO / "configs" / "tiny"
# Options every run gets: the unit-test class statistics (no json), small images.
OPTS = [
    "MODEL.ROI_HEADS.NUM_CLASSES", str(NUM_CLASSES),
    "MODEL.DEVICE", "cpu",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.ROI_BOX_HEAD.FED_LOSS.NUM_CLASSES", "6",
    "DATASETS.IGNORE_BOXES", "()",
    "DATASETS.EXTRA_TRAIN", "()",
    "DATASETS.LVIS_FORMAT", "()",
]  # fmt: skip


def architecture_configs():
    """The tiny configs, one per distinct ``MODEL`` node (others differ only in data,
    schedule or test options and train the same graph). None is excluded: the configs that
    name data files (pseudo-label ignore boxes, extra images, BAGS's stage-1 weights) only
    read them in the data loader or the checkpointer, which this test does not use (the
    batches carry ``ignore_boxes`` themselves)."""
    seen, names = {}, []
    for path in sorted(TINY.glob("*.yaml")):
        cfg = load_cfg(path.name)
        model = cfg.MODEL.clone()
        model.defrost()
        model.WEIGHTS = ""  # a path, not the architecture
        key = model.dump()
        if key not in seen:
            seen[key] = path.name
            names.append(path.name)
    return names


def load_cfg(name: str):
    stats = register_unit_stats(NUM_CLASSES, name="lt_unit_ddp")
    return setup_cfg(str(TINY / name), OPTS + ["DATASETS.TRAIN", f"('{stats}',)"])


def batch(has_instances: bool, seed: int):
    """Two mapped training images as LongTailDatasetMapper makes them: polygon masks,
    verified negative classes on the GT instances, ignore boxes; or no instance at all."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(2):
        annos = []
        for _ in range(int(rng.integers(1, 4)) if has_instances else 0):
            x0, y0 = rng.uniform(0, SIZE / 2, 2)
            w, h = rng.uniform(12, SIZE / 2, 2)
            poly = [x0, y0, x0 + w, y0, x0 + w / 2, y0 + h]  # a triangle
            annos.append({
                "bbox": [x0, y0, x0 + w, y0 + h], "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": int(rng.integers(0, NUM_CLASSES)), "segmentation": [poly],
            })  # fmt: skip
        inst = annotations_to_instances(annos, (SIZE, SIZE), mask_format="polygon")
        set_neg_classes(inst, [int(rng.integers(0, NUM_CLASSES))])
        image = torch.as_tensor(rng.integers(0, 256, (3, SIZE, SIZE)), dtype=torch.float32)
        ignore = Boxes(torch.tensor([[SIZE / 2, SIZE / 2, SIZE - 1.0, SIZE - 1.0]]))
        images.append({"image": image, "instances": inst, "height": SIZE, "width": SIZE,
                       "ignore_boxes": ignore})  # fmt: skip
    return images


def train_steps(name: str, rank: int) -> None:
    cfg = load_cfg(name)
    torch.manual_seed(0)
    model = create_ddp_model(build_model(cfg), broadcast_buffers=False)  # as DefaultTrainer
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    with EventStorage(0) as storage:
        for step, has in enumerate(SCHEDULE):
            storage.iter = step
            losses = model(batch(has[rank], seed=100 * step + rank))
            total = sum(losses.values())
            if not math.isfinite(total.item()):
                raise AssertionError(f"{name} step {step} rank {rank}: losses {losses}")
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
    # every parameter was all-reduced: both ranks end with the same weights
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()])
    gathered = [torch.zeros_like(checksum) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, checksum)
    if not torch.allclose(gathered[0], gathered[1], rtol=0, atol=1e-9):
        raise AssertionError(f"{name}: parameters differ across ranks after the DDP steps")


def _worker(rank, port, names, done_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=timedelta(seconds=90))  # fmt: skip
    torch.set_num_threads(1)
    try:
        for name in names:
            try:
                train_steps(name, rank)
            except Exception as e:
                raise RuntimeError(f"{name} (rank {rank}): {type(e).__name__}: {e}") from e
            with open(os.path.join(done_dir, f"rank{rank}.txt"), "a") as f:
                f.write(name + "\n")
    finally:
        dist.destroy_process_group()


def test_architecture_configs_are_deduplicated_by_model():
    names = architecture_configs()
    for needed in (
        "Base-MaskRCNN-Tiny.yaml",
        "htc_lite_R18_FPN_tiny_seesaw.yaml",
        "mask_rcnn_R18_FPN_tiny_carafe.yaml",
        "mask_rcnn_R18_FPN_tiny_deformpool.yaml",
        "mask_rcnn_R18_FPN_tiny_maskscoring.yaml",
        "mask_rcnn_R18_FPN_tiny_seesaw_selftrain.yaml",
    ):
        assert needed in names
    # same MODEL node as the seesaw leaf (only the augmentations differ): one of them runs
    pair = {"mask_rcnn_R18_FPN_tiny_mmdet2020.yaml", "mask_rcnn_R18_FPN_tiny_seesaw.yaml"}
    assert len(pair & set(names)) == 1


@pytest.mark.slow
def test_every_architecture_trains_under_ddp_with_an_empty_rank(tmp_path):
    names = architecture_configs()
    mp.spawn(_worker, args=(free_port(), names, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):  # each rank trained every architecture, in order
        assert (tmp_path / f"rank{rank}.txt").read_text().split() == names
