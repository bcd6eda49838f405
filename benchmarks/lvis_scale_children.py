"""The measurements of ``lvis_scale.py``, each run in a fresh subprocess by it:

    python benchmarks/lvis_scale_children.py loader {detectron2,lvis_longtail} JSON ROOT ...
    python benchmarks/lvis_scale_children.py config NAME JSON ROOT --device D --threads T ...
    python benchmarks/lvis_scale_children.py eval --device D --repeats R ...

Each writes its result as json to ``--out``.
"""

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer for detectron2 0.6)

# isort: on
import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from timing import median_times, sync

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "LVISv1" / "Base-MaskRCNN-R50-FPN.yaml"
DATASET = "lvis_v1_scale_train"  # "v1": detectron2's load_lvis_json knows its metadata
EVAL_SIZES = ((480, 640), (800, 1333))
MASKS_PER_IMAGE = 300


def memory(pid="self") -> dict:
    """MiB of a process: ``rss``, ``pss``, ``uss`` (private pages) from smaps_rollup."""
    kib = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                kib[key] = int(value.split()[0])
    return {
        "rss": kib["Rss"] / 1024,
        "pss": kib["Pss"] / 1024,
        "uss": (kib["Private_Clean"] + kib["Private_Dirty"]) / 1024,
    }


def child_pids() -> list:
    """The processes this one forked (the data loader's workers)."""
    me, pids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == me:
                pids.append(int(entry))
    return pids


# ----------------------------------------------------------------------------- (a)


def loader_cfg():
    from detectron2.config import get_cfg

    from lvis_longtail.config import add_longtail_config

    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(str(BASE_CONFIG))  # RFS 0.001, 4 workers, LVIS input sizes
    cfg.DATASETS.TRAIN = (DATASET,)
    cfg.SOLVER.IMS_PER_BATCH = 2  # one GPU's share of 16
    return cfg


def build_loader(args, cfg):
    """The training loader as detectron2 or as lvis_longtail's trainer builds it."""
    from detectron2.data import build_detection_train_loader
    from detectron2.data.datasets import register_lvis_instances

    from lvis_longtail.data import (
        get_class_stats,
        register_lvis_format,
        set_image_check,
        shared_reads,
    )
    from lvis_longtail.data.loader import build_longtail_train_loader

    if args.loader == "detectron2":
        register_lvis_instances(DATASET, {}, args.json, args.image_root + "/")
        return build_detection_train_loader(cfg)
    set_image_check(args.image_check)
    register_lvis_format(DATASET, args.json, args.image_root)
    with shared_reads():  # as Trainer.__init__: the losses' class statistics, then the loader
        get_class_stats(DATASET)
        return build_longtail_train_loader(cfg)


def loader_main(args) -> dict:
    cfg = loader_cfg()
    gc.collect()
    base = memory()
    start, cpu = time.perf_counter(), time.process_time()
    loader = build_loader(args, cfg)
    startup, startup_cpu = time.perf_counter() - start, time.process_time() - cpu
    gc.collect()
    after = memory()
    batches = iter(loader)
    for _ in range(args.batches):
        next(batches)
    gc.collect()
    forked = memory()
    workers = [memory(pid) for pid in child_pids()]
    return {
        "startup_s": startup,
        "startup_cpu_s": startup_cpu,
        "base": base,
        "after": after,
        "retained_mib": after["rss"] - base["rss"],
        "forked": forked,
        "workers": workers,
    }


# ----------------------------------------------------------------------------- (b)


def config_opts(raw, args, output_dir) -> tuple:
    """Options that run the config here (generated data, no downloads), and notes on them."""
    fmt = [[DATASET, args.json, args.image_root]]
    fmt += [[entry[0], args.json, args.image_root] for entry in raw.DATASETS.LVIS_FORMAT]
    opts = ["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", "", "OUTPUT_DIR", output_dir]
    opts += ["DATASETS.LVIS_FORMAT", repr(fmt), "DATASETS.TRAIN", f"('{DATASET}',)"]
    opts += ["DATASETS.TEST", f"('{DATASET}',)", "SOLVER.IMS_PER_BATCH", "2"]
    opts += ["DATALOADER.NUM_WORKERS", "0"]
    notes = ["random init" + (f" (not {raw.MODEL.WEIGHTS})" if raw.MODEL.WEIGHTS else "")]
    if len(fmt) > 1:
        notes.append("DATASETS.LVIS_FORMAT / EXTRA_TRAIN: the generated split")
    if raw.DATASETS.IGNORE_BOXES:
        opts += ["DATASETS.IGNORE_BOXES", repr([[DATASET, args.json]])]
        notes.append("ignore boxes: the generated split's boxes")
    if raw.SOLVER.AMP.ENABLED and args.device == "cpu":
        opts += ["SOLVER.AMP.ENABLED", "False"]
        notes.append("AMP off on CPU")
    return opts, notes


def train_step(cfg, model, optimizer, loader) -> tuple:
    """(data seconds, step seconds, total loss) of one iteration of detectron2's trainer
    loop."""
    from detectron2.engine import AMPTrainer, SimpleTrainer
    from detectron2.utils.events import EventStorage

    trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, loader, optimizer)
    with EventStorage(0) as storage:
        start = time.perf_counter()
        trainer.run_step()
        sync(cfg.MODEL.DEVICE)
        total = time.perf_counter() - start
        data = storage.history("data_time").latest()
        loss = storage.history("total_loss").latest()
    return data, total - data, loss


def config_main(args) -> dict:
    from detectron2.config import get_cfg

    from lvis_longtail.config import add_longtail_config
    from lvis_longtail.engine import Trainer, setup_cfg
    from lvis_longtail.modeling.tta import LongTailTTA

    torch.set_num_threads(args.threads)
    path = str(REPO / "configs" / "LVISv1" / args.name)
    raw = get_cfg()
    add_longtail_config(raw)
    raw.merge_from_file(path)
    output_dir = tempfile.mkdtemp(prefix="lvis_scale_cfg_")
    opts, notes = config_opts(raw, args, output_dir)
    cfg = setup_cfg(path, opts)
    seconds = {}
    start = time.perf_counter()
    model = Trainer.build_model(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    loader = Trainer.build_train_loader(cfg)
    seconds["build"] = time.perf_counter() - start
    # inference first: one SGD step from random init may leave no score above the threshold
    inputs = next(iter(Trainer.build_test_loader(cfg, DATASET)))
    model.eval()
    net = LongTailTTA(cfg, model) if cfg.TEST.AUG.ENABLED else model
    with torch.no_grad():
        start = time.perf_counter()
        outputs = net(inputs)
        sync(cfg.MODEL.DEVICE)
        seconds["inference"] = time.perf_counter() - start
    evaluator = Trainer.build_evaluator(cfg, DATASET, output_dir)
    evaluator.reset()
    start = time.perf_counter()
    evaluator.process(inputs, outputs)
    seconds["process"] = time.perf_counter() - start
    evaluator.reset()
    model.train()
    seconds["data"], seconds["train"], loss = train_step(cfg, model, optimizer, loader)
    if not np.isfinite(loss):
        notes.append(f"training loss {loss}")
    return {"seconds": seconds, "detections": len(outputs[0]["instances"]), "notes": notes}


# ----------------------------------------------------------------------------- (c)


def pasted_instances(n, h, w, seed, device):
    """``n`` detections of an (h, w) image with masks pasted as detectron2's postprocessing
    pastes them (28x28 probabilities into boxes of 8 px to most of the image)."""
    from detectron2.layers.mask_ops import paste_masks_in_image
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    side = torch.exp(torch.empty(n).uniform_(np.log(8), np.log(0.8 * min(h, w)), generator=g))
    wh = torch.stack([side * torch.empty(n).uniform_(0.6, 1.4, generator=g) for _ in "xy"], 1)
    wh = torch.minimum(wh, torch.tensor([w - 1.0, h - 1.0]))
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)
    probs = torch.nn.functional.avg_pool2d(torch.rand(n, 1, 28, 28, generator=g), 5, 1, 2)
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(torch.cat([xy, xy + wh], 1).to(device))
    inst.scores = torch.rand(n, generator=g).to(device)
    inst.pred_classes = torch.randint(0, 1203, (n,), generator=g).to(device)
    masks = (probs[:, 0] * 1.6 - 0.3).to(device)
    inst.pred_masks = paste_masks_in_image(masks, inst.pred_boxes, (h, w))
    return inst


def eval_main(args) -> dict:
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json

    from lvis_longtail.evaluation import LVISLongTailEvaluator
    from lvis_longtail.evaluation.mask_rle import encode_masks

    torch.set_num_threads(1)
    MetadataCatalog.get(DATASET).set(
        json_file="(not read by process())",
        thing_dataset_id_to_contiguous_id={k + 1: k for k in range(1203)},
    )
    evaluator = LVISLongTailEvaluator(DATASET, tempfile.mkdtemp(), distributed=False)
    evaluator.reset()
    rows = []
    for h, w in EVAL_SIZES:
        images = [pasted_instances(MASKS_PER_IMAGE, h, w, s, args.device) for s in range(4)]
        cpu = images[0].to("cpu")
        ours = [r["counts"].decode() for r in encode_masks(images[0].pred_masks)]
        assert ours == [r["segmentation"]["counts"] for r in instances_to_coco_json(cpu, 0)], (
            "the RLEs differ from detectron2's"
        )

        def theirs(images=images):
            for i, inst in enumerate(images):
                instances_to_coco_json(inst.to("cpu"), i)

        def ours(images=images):
            for i, inst in enumerate(images):
                evaluator.process([{"image_id": i}], [{"instances": inst}])

        fns = {"detectron2": theirs, "lvis_longtail": ours}
        times = median_times(fns, args.repeats, args.device)
        rows.append(
            dict(height=h, width=w, masks=MASKS_PER_IMAGE)
            | {k: v / len(images) for k, v in times.items()}
        )
    evaluator.reset()
    return {"rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("loader")
    p.add_argument("loader", choices=("detectron2", "lvis_longtail"))
    p.add_argument("json")
    p.add_argument("image_root")
    p.add_argument("--image-check", default="all")
    p.add_argument("--batches", type=int, default=20)
    p = sub.add_parser("config")
    p.add_argument("name")
    p.add_argument("json")
    p.add_argument("image_root")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("eval")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    for p in sub.choices.values():
        p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    run = {"loader": loader_main, "config": config_main, "eval": eval_main}[args.what]
    try:
        result = run(args)
    except Exception as e:  # the table says why a config cannot run
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        traceback.print_exc()
    with open(args.out, "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    os._exit(0)  # no teardown of the loader's workers and threads


if __name__ == "__main__":
    main()
