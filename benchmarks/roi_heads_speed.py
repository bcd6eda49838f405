"""Speed and memory of Mask R-CNN, Cascade Mask R-CNN, HTC-Lite and HTC (all with Seesaw Loss),
same backbone and data, side by side in one run, printed as ratios to Cascade Mask R-CNN.

Training: one step (forward, backward, SGD update) on a batch of ``--batch`` random images
with 1-4 rectangular instances each, median over ``--iters`` steps after ``--warmup``; the
three models' steps are interleaved, so drifting machine load affects them alike.
Inference: one image at a time (``model.eval()``, no grad), median per image.
Peak memory: CUDA ``max_memory_allocated`` of one training step and of one inference; on CPU
the peak RSS above the process's baseline, each model in its own forked child (one torch
thread there, whatever the thread count of the timings). The last row is HTC-Lite's
inference with ``ROI_MASK_HEAD.TEST_CHUNK_SIZE 0`` (all RoIs at once).

Bars: HTC-Lite <= 1.05x Cascade Mask R-CNN in training and inference (detectron2's cascade
already runs one mask head; HTC-Lite adds the context head on P6 and the fusion); HTC (three
mask heads, interleaved, with the mask information flow) <= 2.5x HTC-Lite in training and
<= 2x in inference. The mask RoIs per step of HTC add up its three heads.

Untrained models on random rectangles understate HTC-Lite's mask cost: its mask head trains on
the last stage's positives, and only a trained cascade has many (refined boxes overlap their
GT more). ``--weights`` loads one trained checkpoint into every model (non-strict: Mask R-CNN
takes its backbone and RPN) and ``--data`` draws the batches from an LVIS-format json through
detectron2's training mapper, so the stages see a trained regime's positives; the table then
also gives the mask RoIs per training step.

    .venv/bin/python benchmarks/roi_heads_speed.py                 # tiny R18 models, K = 1203
    .venv/bin/python benchmarks/roi_heads_speed.py --quick         # fewer steps, 2 cores
    .venv/bin/python benchmarks/roi_heads_speed.py --preset lvis --device cuda   # R50, 800 px
    # a trained regime: a long-tail benchmark run's HTC-Lite checkpoint on its training images
    .venv/bin/python benchmarks/roi_heads_speed.py \\
        --weights output/benchmarks/longtail_cpu/htc_lite/seed0/model_final.pth --batch 4 \\
        --data datasets/lt_bench/annotations/lt_synthetic_train.json datasets/lt_bench/images
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import time
import traceback

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer for detectron2 0.6)

# isort: on
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from synthetic_batch import make_batch
from timing import sync

from lvis_longtail.engine import setup_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    # name: (config folder, leaves, image (h, w))
    "tiny": (
        "tiny",
        {
            "Mask R-CNN": "mask_rcnn_R18_FPN_tiny_seesaw",
            "Cascade Mask R-CNN": "cascade_mask_rcnn_R18_FPN_tiny_seesaw",
            "HTC-Lite": "htc_lite_R18_FPN_tiny_seesaw",
            "HTC": "htc_R18_FPN_tiny_seesaw",
        },
        (128, 160),
    ),
    "lvis": (
        "LVISv1",
        {
            "Mask R-CNN": "mask_rcnn_R50_FPN_2x_seesaw",
            "Cascade Mask R-CNN": "cascade_mask_rcnn_R50_FPN_1x_seesaw",
            "HTC-Lite": "htc_lite_R50_FPN_1x_seesaw",
            "HTC": "htc_R50_FPN_1x_seesaw",
        },
        (800, 1088),
    ),
}
REFERENCE = "Cascade Mask R-CNN"


def gt_boxes(g, k, h, w):
    """The synthetic batches' GT boxes: corners in the image's first 60 %, sides from 16 pixels
    to 40 % of the image."""
    xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
    wh = 16 + torch.rand(k, 2, generator=g) * torch.tensor([w * 0.4 - 16, h * 0.4 - 16])
    return torch.cat([xy, xy + wh], dim=1)


def data_batches(cfg, args, num):
    """``num`` training batches of ``args.batch`` images of the ``--data`` json, mapped by
    detectron2's ``DatasetMapper`` (the config's training resize and flip; fixed seed)."""
    from detectron2.data import DatasetMapper

    from lvis_longtail.data.lvis_format import load_lvis_format_json

    records = [r for r in load_lvis_format_json(*args.data) if r["annotations"]]
    if len(records) < num * args.batch:
        raise ValueError(f"{args.data[0]}: {len(records)} images with annotations, need "
                         f"{num * args.batch} (--batch x 3 batches + 1)")  # fmt: skip
    mapper = DatasetMapper(cfg, is_train=True)
    torch.manual_seed(0)
    np.random.seed(0)
    out = []
    for b in range(num):
        batch = [mapper(r) for r in records[b * args.batch : (b + 1) * args.batch]]
        for d in batch:
            d["image"] = d["image"].to(args.device)
        out.append(batch)
    return out


def num_classes_of(json_file):
    with open(json_file) as f:
        return len(json.load(f)["categories"])


def build(preset, leaf, args, extra=()):
    folder = PRESETS[preset][0]
    # Random batches carry no neg_category_ids: the context loss is not federated here.
    # Score threshold 0: every model keeps TEST.DETECTIONS_PER_IMAGE detections (equal work).
    opts = [
        "MODEL.ROI_HEADS.NUM_CLASSES", str(args.num_classes), "MODEL.WEIGHTS", "",
        "MODEL.DEVICE", args.device, "MODEL.ROI_CONTEXT_HEAD.FEDERATED", "False",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", *extra,
    ]  # fmt: skip
    cfg = setup_cfg(os.path.join(REPO, "configs", folder, f"{leaf}.yaml"), opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    if args.weights:
        DetectionCheckpointer(model).load(args.weights)  # non-strict: the layers it has
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    return model, optimizer, cfg


def train_step(model, optimizer, batch):
    model.train()
    with count_mask_rois(model) as rois:
        losses = model(batch)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    return rois[0]


@contextlib.contextmanager
def count_mask_rois(model):
    """Counts the RoIs the mask heads of ``model`` train on (their ``train_outputs`` calls;
    HTC's ``mask_head`` is a ModuleList of one head per stage)."""
    count = [0]
    heads = model.roi_heads.mask_head
    heads = list(heads) if isinstance(heads, torch.nn.ModuleList) else [heads]

    def counting(train_outputs):
        def counted(x, *a, **kw):
            count[0] += int(x.shape[0])
            return train_outputs(x, *a, **kw)

        return counted

    for head in heads:
        head.train_outputs = counting(head.train_outputs)
    try:
        yield count
    finally:
        for head in heads:
            del head.train_outputs  # the class's method again


def infer(model, image):
    model.eval()
    with torch.no_grad():
        return model([image])[0]["instances"]


def measure_times(models, args, batches):
    images = [{k: d[k] for k in ("image", "height", "width")} for d in batches[0]]
    train_t = {name: [] for name in models}
    infer_t = {name: [] for name in models}
    dets = {name: [] for name in models}
    rois = {name: [] for name in models}
    with EventStorage(0):
        for it in range(args.warmup + args.iters):
            for name, (model, optimizer, _) in models.items():
                sync(args.device)
                start = time.perf_counter()
                n = train_step(model, optimizer, batches[it % len(batches)])
                sync(args.device)
                elapsed = time.perf_counter() - start
                if it >= args.warmup:
                    train_t[name].append(elapsed)
                    rois[name].append(n)
            for name, (model, _, _) in models.items():
                image = images[it % len(images)]
                sync(args.device)
                start = time.perf_counter()
                out = infer(model, image)
                sync(args.device)
                elapsed = time.perf_counter() - start
                if it >= args.warmup:
                    infer_t[name].append(elapsed)
                    dets[name].append(len(out))
    return (
        {k: statistics.median(v) for k, v in train_t.items()},
        {k: statistics.median(v) for k, v in infer_t.items()},
        {k: statistics.mean(v) for k, v in dets.items()},
        {k: statistics.mean(v) for k, v in rois.items()},
    )


def _peak_of(fn, device):
    """Peak memory (MiB) of ``fn()``: CUDA max allocated, or CPU peak RSS above the forked
    child's starting RSS. The child runs torch with one thread: a forked child inherits the
    parent's OpenMP thread pool without its threads, and its first parallel region would wait
    for them forever (torch's DataLoader workers do the same)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: its ru_maxrss starts at the parent's RSS at fork time
        status = 1
        try:
            os.close(read)
            torch.set_num_threads(1)  # before any tensor op of the child
            base = _rss_mib()
            fn()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            os.write(write, f"{peak - base:.1f}".encode())
            status = 0
        except Exception:
            traceback.print_exc()
        finally:  # never return into the parent's code
            os._exit(status)
    os.close(write)
    value = os.read(read, 64).decode()
    _, status = os.waitpid(pid, 0)
    os.close(read)
    if status != 0:
        raise RuntimeError(f"the memory measurement's child failed (wait status {status})")
    return float(value)


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_memory(models, args, batch):
    image = {k: batch[0][k] for k in ("image", "height", "width")}
    out = {}
    for name, (model, optimizer, _) in models.items():

        def train_once(model=model, optimizer=optimizer):
            with EventStorage(0):
                train_step(model, optimizer, batch)

        out[name] = (
            _peak_of(train_once, args.device),
            _peak_of(lambda m=model: infer(m, image), args.device),
        )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-classes", type=int, default=1203, help="(--data: its classes)")
    parser.add_argument("--batch", type=int, default=2, help="images per training step")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 steps after 1 warm-up")
    parser.add_argument("--weights", default="", help="checkpoint loaded into every model")
    parser.add_argument("--data", nargs=2, metavar=("JSON", "IMAGE_ROOT"),
                        help="LVIS-format json whose images form the batches")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.iters, args.warmup = 3, 1
    if args.data:
        args.num_classes = num_classes_of(args.data[0])
    folder, leaves, size = PRESETS[args.preset]
    models = {name: build(args.preset, leaf, args) for name, leaf in leaves.items()}
    # HTC-Lite's mask head on every last-stage positive (the configs cap it at the first
    # stage's count: MASK_MAX_POSITIVES -1)
    uncapped = "HTC-Lite, MASK_MAX_POSITIVES 0"
    models[uncapped] = build(
        args.preset, leaves["HTC-Lite"], args, ["MODEL.ROI_HEADS.HTC_LITE.MASK_MAX_POSITIVES", "0"]
    )
    if args.data:
        batches = data_batches(models[REFERENCE][2], args, 4)
        source = f"images of {args.data[0]}"
    else:
        batches = [
            make_batch(args.batch, args.num_classes, size, s, 4, gt_boxes, args.device)
            for s in (0, 1, 2, 7)
        ]
        source = f"random images {size[0]}x{size[1]}"
    # memory first, in forked children that start from the untouched models
    memory = measure_memory(models, args, batches[3])
    unchunked = build(
        args.preset, leaves["HTC-Lite"], args, ["MODEL.ROI_MASK_HEAD.TEST_CHUNK_SIZE", "0"]
    )
    image = {k: v for k, v in batches[3][0].items() if k != "instances"}
    unchunked_peak = _peak_of(lambda: infer(unchunked[0], image), args.device)
    train_t, infer_t, dets, rois = measure_times(models, args, batches[:3])
    unit = "MiB CUDA allocated" if args.device.startswith("cuda") else "MiB peak RSS above baseline"
    print(
        f"preset {args.preset} ({folder}), {args.device}, K = {args.num_classes}, {source}, "
        f"batch {args.batch}, median of {args.iters} after {args.warmup}, weights "
        f"{args.weights or 'random'}"
    )
    print(
        "| model | train step (ms) | vs Cascade | mask RoIs / step | inference / image (ms) "
        f"| vs Cascade | detections | train peak | inference peak ({unit}) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ref_t, ref_i = train_t[REFERENCE], infer_t[REFERENCE]
    for name in models:
        print(
            f"| {name} | {1000 * train_t[name]:.1f} | {train_t[name] / ref_t:.3f}x | "
            f"{rois[name]:.0f} | {1000 * infer_t[name]:.1f} | {infer_t[name] / ref_i:.3f}x | "
            f"{dets[name]:.0f} | {memory[name][0]:.0f} | {memory[name][1]:.0f} |"
        )
    print(f"| HTC-Lite, TEST_CHUNK_SIZE 0 | | | | | | | | {unchunked_peak:.0f} |")
    ok = train_t["HTC-Lite"] <= 1.05 * ref_t and infer_t["HTC-Lite"] <= 1.05 * ref_i
    print(f"bar HTC-Lite <= 1.05x Cascade in training and inference: {'met' if ok else 'NOT met'}")
    train_x = train_t["HTC"] / train_t["HTC-Lite"]
    infer_x = infer_t["HTC"] / infer_t["HTC-Lite"]
    ok = train_x <= 2.5 and infer_x <= 2.0
    print(
        f"HTC / HTC-Lite: training {train_x:.3f}x, inference {infer_x:.3f}x; bar <= 2.5x in "
        f"training and <= 2x in inference: {'met' if ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
