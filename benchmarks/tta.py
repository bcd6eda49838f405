#!/usr/bin/env python
"""Test-time augmentation benchmark (issue 12), three parts in one run::

    python benchmarks/tta.py --quick                 # ~30 min on a loaded 2-core CPU
    python benchmarks/tta.py --weights W.pth         # a trained tiny model, all val images

1. AP / APr / APc / APf (bbox, segm) and time per image on ``lt_synthetic_val`` (the first
   ``--images`` images) of the tiny softmax model of ``configs/tiny/`` (trained here for
   ``--iters`` iterations unless ``--weights`` is given): without TTA, with detectron2's
   ``GeneralizedRCNNWithTTA``, then :class:`LongTailTTA` with each of the four changes of
   ``configs/tiny/mask_rcnn_R18_FPN_tiny_tta.yaml`` added alone (valid ranges; rare factor;
   NMS 0.7 + Soft-NMS; valid ranges + ``select`` masks), and all four.
2. The merge of 10 augmentations x 300 detections over 1203 classes: torchvision's
   ``batched_nms`` on the 3000 boxes vs Gaussian Soft-NMS on its survivors at IoU 0.7 (and on
   all 3000), medians of 5 interleaved rounds, and Soft-NMS's share of the median TTA time
   per image measured in part 1 (bar: <= 5%), median and range over the rounds;
   ``--merge-only S`` runs this part alone against a given TTA time S per image.
3. Peak memory (RSS above the baseline, fresh subprocess each) of mask inference for 300
   detections with a 1203-class class-specific mask head: one call vs the TTA's chunks.

Writes ``--out`` (json) and prints markdown tables.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# isort: off
import lvis_longtail  # noqa: E402,F401  (compat layer first)

# isort: on
import torch  # noqa: E402

from lvis_longtail.utils.io import write_json_atomic  # noqa: E402

TTA_LEAF = os.path.join(REPO, "configs", "tiny", "mask_rcnn_R18_FPN_tiny_tta.yaml")
BASE_LEAF = os.path.join(REPO, "configs", "tiny", "mask_rcnn_R18_FPN_tiny_softmax.yaml")
OFF = [  # the tiny TTA leaf with every new option off = detectron2's TTA on its scales
    "TEST.AUG.VALID_RANGES", [], "TEST.AUG.RARE_SCORE_FACTOR", 1.0, "TEST.AUG.NMS_THRESH", -1.0,
    "TEST.AUG.MERGE_NMS_TYPE", "hard", "TEST.AUG.MASK_RULE", "mean",
]  # fmt: skip


def _leaf_value(key):
    from lvis_longtail.engine import setup_cfg

    node = setup_cfg(TTA_LEAF)
    for part in key.split("."):
        node = node[part]
    return node


def variants():
    """(name, TTA kind, opts on top of the TTA leaf)."""
    ranges = ["TEST.AUG.VALID_RANGES", _leaf_value("TEST.AUG.VALID_RANGES")]
    rare = ["TEST.AUG.RARE_SCORE_FACTOR", _leaf_value("TEST.AUG.RARE_SCORE_FACTOR")]
    merge = ["TEST.AUG.NMS_THRESH", _leaf_value("TEST.AUG.NMS_THRESH"),
             "TEST.AUG.MERGE_NMS_TYPE", _leaf_value("TEST.AUG.MERGE_NMS_TYPE")]  # fmt: skip
    select = ["TEST.AUG.MASK_RULE", "select"]
    return [
        ("no TTA", None, OFF),
        # detectron2's TTA reads MIN_SIZES / MAX_SIZE, not SCALES: the same short sides (the
        # images are square, so the max sizes do not bind)
        (
            "detectron2 TTA",
            "detectron2",
            OFF
            + [
                "TEST.AUG.MIN_SIZES",
                tuple(s for s, _ in _leaf_value("TEST.AUG.SCALES")),
                "TEST.AUG.MAX_SIZE",
                max(m for _, m in _leaf_value("TEST.AUG.SCALES")),
            ],
        ),
        ("ours, all off", "ours", OFF),
        ("+ valid ranges", "ours", OFF + ranges),
        ("+ rare factor", "ours", OFF + rare),
        ("+ NMS 0.7, Soft-NMS", "ours", OFF + merge),
        ("+ valid ranges, select masks", "ours", OFF + ranges + select),
        ("all four", "ours", []),
    ]


def ensure_dataset():
    root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", os.path.join(REPO, "datasets")))
    out = os.path.join(root, "lt_synthetic")
    if not os.path.isfile(os.path.join(out, "annotations", "lt_synthetic_val.json")):
        cmd = [sys.executable, "-m", "lvis_longtail.data.synthetic", "--out", out]
        subprocess.run(cmd, cwd=REPO, check=True)
    return out


def train(args, out_dir):
    weights = os.path.join(out_dir, "model_final.pth")
    if os.path.isfile(weights):
        return weights
    steps = f"({int(args.iters * 0.7)}, {int(args.iters * 0.9)})"
    cmd = [sys.executable, "train_net.py", "--config-file", BASE_LEAF,
           "SOLVER.MAX_ITER", str(args.iters), "SOLVER.STEPS", steps,
           "SOLVER.WARMUP_ITERS", str(min(100, args.iters // 5)), "SOLVER.CHECKPOINT_PERIOD",
           str(10 ** 6), "DATASETS.TEST", "()", "OUTPUT_DIR", out_dir]  # fmt: skip
    print("training:", " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": REPO}
    subprocess.run(cmd, cwd=REPO, check=True, env=env)
    return weights


def subset_dataset(root, num_images, out_dir):
    """Register the first ``num_images`` val images (all their annotations) as a dataset."""
    from lvis_longtail.data import register_lvis_format

    with open(os.path.join(root, "annotations", "lt_synthetic_val.json")) as f:
        data = json.load(f)
    images = sorted(data["images"], key=lambda x: x["id"])[:num_images]
    ids = {x["id"] for x in images}
    data["images"] = images
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    path = os.path.join(out_dir, f"lt_synthetic_val_first{num_images}.json")
    write_json_atomic(data, path)
    name = f"lt_synthetic_val_first{num_images}"
    register_lvis_format(name, path, os.path.join(root, "images"))
    return name


class _Timed(torch.nn.Module):
    """Accumulates the wall time of the wrapped model's calls (not the evaluator's)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seconds, self.images = model, 0.0, 0

    def forward(self, inputs):
        start = time.perf_counter()
        out = self.model(inputs)
        self.seconds += time.perf_counter() - start
        self.images += len(inputs)
        return out


def evaluate_variants(args, weights, dataset, out_dir):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.evaluation import inference_on_dataset
    from detectron2.modeling import GeneralizedRCNNWithTTA

    from lvis_longtail.engine import Trainer, setup_cfg
    from lvis_longtail.modeling.tta import LongTailTTA

    rows = []
    for name, kind, opts in variants():
        cfg = setup_cfg(TTA_LEAF, ["MODEL.WEIGHTS", weights, "DATASETS.TEST", f"('{dataset}',)",
                                   "OUTPUT_DIR", out_dir, *map(str, opts)])  # fmt: skip
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model).load(weights)
        model.eval()
        if kind == "detectron2":
            model = GeneralizedRCNNWithTTA(cfg, model)
        elif kind == "ours":
            model = LongTailTTA(cfg, model)
        folder = os.path.join(out_dir, "inference", name.replace(" ", "_").replace(",", ""))
        evaluator = Trainer.build_evaluator(cfg, dataset, folder)
        loader = Trainer.build_test_loader(cfg, dataset)
        timed = _Timed(model)
        res = inference_on_dataset(timed, loader, evaluator)
        row = {"variant": name, "s_per_image": timed.seconds / timed.images}
        for task in ("bbox", "segm"):
            for m in ("AP", "APr", "APc", "APf"):
                row[f"{task}_{m}"] = res[task][m]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def merge_speed(tta_seconds, rounds=5, repeats=7):
    """10 augs x 300 dets over 1203 classes: torchvision's batched_nms on the 3000 boxes,
    Gaussian Soft-NMS on the survivors of NMS 0.7 (the merge's step) and on all 3000 boxes;
    ``rounds`` interleaved medians of ``repeats`` calls each; Soft-NMS's share of
    ``tta_seconds`` (TTA time per image) per round, its median and range."""
    from timing import median_times
    from torchvision.ops import batched_nms

    from lvis_longtail.modeling.postprocessing import SoftNMSParams, batched_soft_nms

    g = torch.Generator().manual_seed(0)
    # 300 detections per augmentation on ~100 objects; classes Zipf-like over 1203
    objects = torch.rand(100, 2, generator=g) * 700
    objects = torch.cat([objects, objects + torch.rand(100, 2, generator=g) * 300 + 10], 1)
    weights = 1.0 / torch.arange(1, 1204).float()
    obj_class = torch.multinomial(weights, 100, replacement=True, generator=g)
    pick = torch.randint(0, 100, (3000,), generator=g)
    boxes = objects[pick] + torch.randn(3000, 4, generator=g) * 8
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    other = torch.multinomial(weights, 3000, replacement=True, generator=g)
    classes = torch.where(torch.rand(3000, generator=g) < 0.6, obj_class[pick], other)
    scores = torch.rand(3000, generator=g) ** 2
    params = SoftNMSParams("gaussian", 0.5, 0.3, 1e-3)
    kept = batched_nms(boxes, scores, classes, 0.7)
    fns = {
        "batched_nms": lambda: batched_nms(boxes, scores, classes, 0.7),
        "soft_nms_after_nms": lambda: batched_soft_nms(
            boxes[kept], scores[kept], classes[kept], params),
        "soft_nms_all": lambda: batched_soft_nms(boxes, scores, classes, params),
    }  # fmt: skip
    per_round = [median_times(fns, repeats, "cpu") for _ in range(rounds)]
    ms = {k: 1000 * statistics.median(r[k] for r in per_round) for k in fns}
    shares = [r["soft_nms_after_nms"] / tta_seconds for r in per_round]
    return {"ms": ms, "rounds": rounds, "repeats": repeats, "tta_s_per_image": tta_seconds,
            "max_boxes_per_class_after_nms": int(torch.bincount(classes[kept]).max()),
            "boxes_after_nms": len(kept), "soft_nms_share_per_round": shares,
            "soft_nms_share_of_tta": statistics.median(shares)}  # fmt: skip


def print_merge(merge):
    ms, shares = merge["ms"], merge["soft_nms_share_per_round"]
    print(
        f"\nmerge, 3000 dets / 1203 classes (medians of {merge['rounds']} rounds): "
        f"batched_nms {ms['batched_nms']:.2f} ms; Gaussian Soft-NMS on the "
        f"{merge['boxes_after_nms']} survivors of NMS 0.7 {ms['soft_nms_after_nms']:.2f} ms "
        f"= {100 * merge['soft_nms_share_of_tta']:.2f}% (range {100 * min(shares):.2f}-"
        f"{100 * max(shares):.2f}%) of {merge['tta_s_per_image']:.2f} s TTA/image; "
        f"on all 3000 boxes {ms['soft_nms_all']:.2f} ms"
    )


def _mask_memory_child(chunk):
    """Peak RSS (MiB) above the baseline of 300-box mask inference, 1203-class head."""
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances

    from lvis_longtail.engine import setup_cfg

    cfg = setup_cfg(BASE_LEAF, ["MODEL.ROI_HEADS.NUM_CLASSES", "1203", "DATASETS.TRAIN", "()"])
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    feats = {f"p{k}": torch.randn(1, 64, 512 // 2**k, 512 // 2**k, generator=g)
             for k in (2, 3, 4, 5, 6)}  # fmt: skip
    xy = torch.rand(300, 2, generator=g) * 400
    boxes = torch.cat([xy, xy + torch.rand(300, 2, generator=g) * 100 + 8], 1)
    classes = torch.randint(0, 1203, (300,), generator=g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        for c in range(0, 300, chunk):
            inst = Instances((512, 512), pred_boxes=Boxes(boxes[c : c + chunk]),
                             pred_classes=classes[c : c + chunk],
                             scores=torch.ones(len(boxes[c : c + chunk])))  # fmt: skip
            model.roi_heads.forward_with_given_boxes(feats, [inst])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"chunk": chunk, "peak_mib": peak - base}))


def mask_memory(chunk):
    res = {}
    for c in (300, chunk):
        out = subprocess.run([sys.executable, __file__, "--mask-memory-child", str(c)],
                             cwd=REPO, check=True, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": REPO})  # fmt: skip
        res[c] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    return {"unchunked_mib": res[300], "chunked_mib": res[chunk], "chunk": chunk}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="200 iterations, 12 val images")
    p.add_argument("--weights", default="", help="a trained tiny model (skip training)")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--images", type=int, default=150)
    p.add_argument("--output", default=os.path.join(REPO, "output", "benchmark_tta"))
    p.add_argument("--out", default=os.path.join(REPO, "output", "benchmark_tta", "tta.json"))
    p.add_argument(
        "--merge-only",
        type=float,
        default=0.0,
        metavar="TTA_S_PER_IMAGE",
        help="only part 2, its share taken of this TTA time per image",
    )
    p.add_argument("--mask-memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mask_memory_child:
        return _mask_memory_child(args.mask_memory_child)
    if args.merge_only:
        return print_merge(merge_speed(args.merge_only)) or 0
    if args.quick:
        args.iters, args.images = min(args.iters, 200), min(args.images, 12)
    os.makedirs(args.output, exist_ok=True)
    root = ensure_dataset()
    weights = args.weights or train(args, os.path.join(args.output, f"train_{args.iters}"))
    dataset = subset_dataset(root, args.images, args.output)
    rows = evaluate_variants(args, weights, dataset, args.output)
    tta_seconds = statistics.median(r["s_per_image"] for r in rows[1:])
    merge = merge_speed(tta_seconds)
    memory = mask_memory(_leaf_value("TEST.AUG.MASK_CHUNK_SIZE"))
    result = {"args": vars(args), "weights": weights, "variants": rows, "merge": merge,
              "mask_memory": memory}  # fmt: skip
    write_json_atomic(result, args.out)

    cols = [f"{t}_{m}" for t in ("bbox", "segm") for m in ("AP", "APr", "APc", "APf")]
    print("\n| variant | " + " | ".join(cols) + " | s/image |")
    print("|---|" + "---:|" * (len(cols) + 1))
    for r in rows:
        print(f"| {r['variant']} | " + " | ".join(f"{r[c]:.1f}" for c in cols)
              + f" | {r['s_per_image']:.2f} |")  # fmt: skip
    print_merge(merge)
    print(
        f"mask inference, 300 dets, 1203 classes: peak +{memory['unchunked_mib']:.0f} MiB "
        f"unchunked, +{memory['chunked_mib']:.0f} MiB in chunks of {memory['chunk']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
