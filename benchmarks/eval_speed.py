#!/usr/bin/env python
"""LVIS evaluation at LVIS scale: lvis-api against lvis_longtail's fast evaluator.

Generates, with numpy and pycocotools (no images rendered), an LVIS-format split of
``--images`` images (default 5,000) over 1,203 categories (337 r / 461 c / 405 f, drawn
long-tailed) with ~12 polygon annotations per image, negative and not-exhaustive category
lists, and a results file of exactly 300 detections per image with box and mask (compressed
RLE): jittered copies of the objects, confusions, detections of negative categories and many
of other categories (which the federated rules ignore). Scores have 4 decimals, so ties occur.

Each evaluator runs in a fresh subprocess (``--child``), from the same two json files to the
metrics, and its peak RSS is read with ``os.wait4`` (per child, not the max over all of them):

- ``lvis_api``: lvis-api 0.5.3 as the LVIS server runs it (``LVIS``, ``LVISResults`` with
  300 per image, ``LVISEval``; segm without the records' ``bbox``, i.e. mask areas);
- ``fce``: faster-coco-eval 1.8.0 ``COCOeval_faster(lvis_style=True)`` (for reference);
- ``fast``: ``load_split_json`` + ``load_lvis_results(..., as_table=True)`` (every record
  checked) + ``run_lvis_eval(evaluator="fast")``, as ``evaluate_lvis_results`` runs it.

Every child imports the same modules before its timer starts. The table gives the times, the
ratio lvis-api / evaluator, the child's peak RSS (imports included: ~1 GiB of it is torch and
detectron2, imported by ``lvis_longtail``), its peak above the RSS right after the imports
(``/proc/self/clear_refs``), and the largest absolute difference over every metric (AP ...
APf, AR@300, ARs/m/l@300) in AP points. Then, export: peak RSS of a child that pushes N images
of 300 records through a ``DetectionShard`` and writes the validated results file from the
shards read back as one table (``streamed``), against holding them in a list first
(``in_memory``, what the evaluator did before the streamed store), for growing N. Last, the
pseudo-label pass (``tools.pseudo_label``) over N unannotated images with a stand-in model:
its peak must not grow with N. Compare times within one run only: other load on the machine
changes them.

    python benchmarks/eval_speed.py                 # full: 5,000 images (several minutes)
    python benchmarks/eval_speed.py --quick         # 500 images, export at 250/500/1000
    python benchmarks/eval_speed.py --images 2000 --tasks bbox --skip fce
"""

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer incl. lvis-api's np.float)

# isort: on
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import lvis_generator as gen
import numpy as np
from lvis_generator import IMAGE_SIZES, NUM_CATEGORIES
from pycocotools import mask as mask_utils
from timing import child_main, run_child

DETS_PER_IMAGE = 300
POOL_PER_SIZE = 3000


def _polygon(rng, x, y, w, h):
    return gen.polygon(rng, x, y, w, h, n=10, r_min=0.65)


def _box(rng, height, width):
    return gen.random_box(rng, height, width, sides=(8, 300), spread=0.4, min_side=4)


def _categories(rng):
    freq = gen.frequencies()
    cats = [{"id": k + 1, "name": f"cat_{k + 1}", "synset": f"cat_{k + 1}.n.01", "frequency": f}
            for k, f in enumerate(freq)]  # fmt: skip
    return cats, gen.category_weights(rng, freq)


def _mask_pool(rng):
    """Per image size: pre-encoded random masks with their boxes (the background detections)."""
    pool = {}
    for h, w in IMAGE_SIZES:
        boxes = [_box(rng, h, w) for _ in range(POOL_PER_SIZE)]
        rles = [gen.polygon_rle(_polygon(rng, *b), h, w) for b in boxes]
        pool[(h, w)] = (boxes, rles)
    return pool


def generate(num_images, seed, gt_path, results_path):
    """Write the split json and the results json; returns (#annotations, #detections)."""
    rng = np.random.default_rng(seed)
    cats, weight = _categories(rng)
    pool = _mask_pool(rng)
    images, anns, results = [], [], []
    for i in range(num_images):
        image_id = 1000 + 7 * i
        h, w = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
        positives = np.unique(rng.choice(NUM_CATEGORIES, 1 + rng.poisson(2.5), p=weight))
        negatives = np.setdiff1d(rng.choice(NUM_CATEGORIES, 1 + rng.poisson(6)), positives)
        not_exhaustive = [int(positives[0]) + 1] if rng.random() < 0.15 else []
        url = f"http://images.cocodataset.org/val2017/{image_id:012d}.jpg"
        images.append(dict(id=image_id, height=h, width=w, coco_url=url,
                           neg_category_ids=(negatives + 1).tolist(),
                           not_exhaustive_category_ids=not_exhaustive))  # fmt: skip
        dets = []
        for k in positives.tolist():
            for _ in range(1 + min(rng.geometric(0.35) - 1, 12)):
                box = _box(rng, h, w)
                poly = _polygon(rng, *box)
                area = float(mask_utils.area(mask_utils.frPyObjects([poly], h, w))[0])
                anns.append(dict(id=len(anns) + 1, image_id=image_id, category_id=k + 1, bbox=box,
                                 area=area, segmentation=[poly]))  # fmt: skip
                for _ in range(int(rng.integers(0, 4))):  # found 0-3 times, maybe misclassified
                    cat = k + 1 if rng.random() < 0.8 else int(rng.choice(positives)) + 1
                    dets.append(_jittered(rng, box, poly, h, w, cat))
        for k in rng.choice(negatives, min(len(negatives), 8)).tolist() if len(negatives) else []:
            dets.append(_pooled(rng, pool, h, w, k + 1, high=0.6))
        # the rest: mostly categories the image says nothing about (ignored by the federated
        # rules), some positive (false positives and duplicates) and negative ones
        bg_cats = rng.choice(NUM_CATEGORIES, DETS_PER_IMAGE, p=weight)
        u = rng.random(DETS_PER_IMAGE)
        bg_cats = np.where(u < 0.2, rng.choice(positives, DETS_PER_IMAGE), bg_cats)
        if len(negatives):
            neg = (u >= 0.2) & (u < 0.3)
            bg_cats = np.where(neg, rng.choice(negatives, DETS_PER_IMAGE), bg_cats)
        for cat in bg_cats[: DETS_PER_IMAGE - len(dets)].tolist():
            dets.append(_pooled(rng, pool, h, w, cat + 1))
        results += [dict(image_id=image_id, category_id=c, score=s, bbox=b, segmentation=m)
                    for c, s, b, m in dets[:DETS_PER_IMAGE]]  # fmt: skip
    dataset = dict(info={}, licenses=[], images=images, categories=cats, annotations=anns)
    for path, obj in ((gt_path, dataset), (results_path, results)):
        with open(path, "w") as f:
            json.dump(obj, f, separators=(",", ":"))
    return len(anns), len(results)


def _jittered(rng, box, poly, h, w, cat):
    new_box = gen.jittered(rng, box, h, w, 0.1)
    score = round(float(rng.uniform(0.2, 1.0)), 4)
    return (
        cat,
        score,
        [round(v, 2) for v in new_box],
        gen.polygon_rle(gen.moved(poly, box, new_box), h, w),
    )  # noqa: E501


def _pooled(rng, pool, h, w, cat, high=0.5):
    boxes, rles = pool[(h, w)]
    j = int(rng.integers(len(boxes)))
    return cat, round(float(rng.uniform(0.0001, high)), 4), boxes[j], rles[j]


# ----------------------------------------------------------------------------- children


def _child_lvis_api(gt_path, results_path, task):
    from lvis import LVIS, LVISEval, LVISResults

    gt = LVIS(gt_path)
    with open(results_path) as f:
        results = json.load(f)
    if task == "segm":  # mask areas for APs/APm/APl, as the fast evaluator uses
        for r in results:
            r.pop("bbox", None)
    lvis_eval = LVISEval(gt, LVISResults(gt, results, max_dets=300), task)
    lvis_eval.run()
    return dict(lvis_eval.get_results())


def _child_fce(gt_path, results_path, task):
    from faster_coco_eval import COCO, COCOeval_faster

    gt = COCO(gt_path)
    with open(results_path) as f:
        results = json.load(f)
    if task == "segm":
        for r in results:
            r.pop("bbox", None)
    dt = gt.loadRes(results)
    ev = COCOeval_faster(gt, dt, task, lvis_style=True, print_function=lambda *a: None)
    ev.params.maxDets = [300]
    ev.run()
    s = ev.stats_as_dict
    names = {"AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small"}
    names.update(APm="AP_medium", APl="AP_large", APr="APr", APc="APc", APf="APf")
    names.update({"AR@300": "AR_all", "ARs@300": "AR_small", "ARm@300": "AR_medium"})
    names["ARl@300"] = "AR_large"
    return {k: s[v] for k, v in names.items()}


def _child_fast(gt_path, results_path, task):
    from lvis_longtail.evaluation import LVISGroundTruth, load_lvis_results, run_lvis_eval
    from lvis_longtail.evaluation.lvis_evaluation import load_split_json

    dataset = load_split_json(gt_path)
    required = ("bbox",) if task == "bbox" else ("segmentation",)
    table = load_lvis_results(results_path, dataset, required=required, as_table=True)
    result = run_lvis_eval(LVISGroundTruth(dataset), table, task, 300, evaluator="fast")
    return dict(result.metrics)


def _image_records(rng, pool, image_id, h, w):
    """One image's 300 records, as the evaluator exports them."""
    boxes, rles = pool[(h, w)]
    picks = rng.integers(len(boxes), size=DETS_PER_IMAGE).tolist()
    cats = (rng.integers(NUM_CATEGORIES, size=DETS_PER_IMAGE) + 1).tolist()
    scores = rng.uniform(0, 1, DETS_PER_IMAGE).tolist()
    return [dict(image_id=image_id, category_id=c, score=s, bbox=boxes[j], segmentation=rles[j])
            for j, c, s in zip(picks, cats, scores)]  # fmt: skip


def _child_export(mode, num_images, workdir):
    """Push ``num_images`` images of 300 records through the store (``streamed``) or a list
    (``in_memory``: the records and their exported copies held, as detectron2's evaluators do)
    and write the validated results file."""
    import lvis_longtail.evaluation as E
    from lvis_longtail.evaluation.results import SplitIndex

    rng = np.random.default_rng(0)
    pool = _mask_pool(rng)
    sizes = [IMAGE_SIZES[i % len(IMAGE_SIZES)] for i in range(int(num_images))]
    split = {
        "images": [{"id": i + 1, "height": h, "width": w} for i, (h, w) in enumerate(sizes)],
        "categories": [{"id": k + 1} for k in range(NUM_CATEGORIES)],
    }
    out = os.path.join(workdir, f"export_{mode}_{num_images}.json")
    shard = os.path.join(workdir, f"export_{num_images}.shard")
    if mode == "streamed":
        with E.DetectionShard(shard) as store:
            for i, (h, w) in enumerate(sizes):
                store.add(i + 1, _image_records(rng, pool, i + 1, h, w))
        table, _ = E.read_shards([shard])
        selected = E.EvalProtocol().apply(table, "file")
        summary = E.write_results_file(selected, out, SplitIndex(split))
        os.remove(shard)
    else:
        records = []
        for i, (h, w) in enumerate(sizes):
            records.extend(_image_records(rng, pool, i + 1, h, w))
        exported = [dict(r) for r in records]  # 300 per image already, the file's fields
        summary = E.validate_lvis_results(exported, split, 300)
        E.write_json_atomic(exported, out)
    os.remove(out)
    return {"num_detections": summary["num_detections"]}


def _child_pseudo_label(num_images, workdir):
    """``tools.pseudo_label.write_pseudo_labels`` over ``num_images`` unannotated images with a
    stand-in model (100 detections with masks per image, half of them above the 0.5 score
    threshold): the streamed path through per-rank shards to the written file."""
    import torch
    from detectron2.data import Metadata
    from detectron2.structures import Boxes, Instances

    from lvis_longtail.tools.pseudo_label import write_pseudo_labels

    n, g = 100, torch.Generator().manual_seed(0)
    records = [{"image_id": i + 1, "height": 480, "width": 640, "file_name": f"{i + 1}.jpg"}
               for i in range(int(num_images))]  # fmt: skip
    meta = Metadata(thing_classes=[f"c{k}" for k in range(NUM_CATEGORIES)],
                    thing_dataset_id_to_contiguous_id={k + 1: k for k in range(NUM_CATEGORIES)},
                    class_frequency=["rcf"[k % 3] for k in range(NUM_CATEGORIES)])  # fmt: skip

    def make():
        inst = Instances((480, 640))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([500.0, 340.0])
        boxes = torch.cat([xy, xy + 20 + 100 * torch.rand(n, 2, generator=g)], 1)
        inst.pred_boxes = Boxes(boxes)
        inst.scores = torch.rand(n, generator=g)
        inst.pred_classes = torch.randint(0, NUM_CATEGORIES, (n,), generator=g)
        ys = torch.arange(480)[None, :, None]
        xs = torch.arange(640)[None, None, :]
        b = boxes.round().long()[:, :, None, None]
        inst.pred_masks = (xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])
        return inst

    pool = [make() for _ in range(2)]  # the stand-in's outputs, cycled (~60 MiB of masks)

    def model(inputs):
        return [{"instances": pool[rec["image_id"] % len(pool)]} for rec in inputs]

    loader = ([r] for r in records)
    out = os.path.join(workdir, f"pseudo_{num_images}.json")
    summary = write_pseudo_labels(model, loader, records, meta, out)
    os.remove(out)
    os.remove(out + ".summary.json")
    return {"pseudo_labels": summary["pseudo_labels"]}


CHILDREN = {
    "lvis_api": _child_lvis_api,
    "fce": _child_fce,
    "fast": _child_fast,
    "export": _child_export,
    "pseudo_label": _child_pseudo_label,
}


def child(children, argv):
    """A ``--child NAME ARGS... OUT`` process (:func:`timing.run_child`): the evaluators'
    imports first, the same in every child, then the timed call of ``children[NAME]``."""
    import faster_coco_eval  # noqa: F401
    import lvis  # noqa: F401

    import lvis_longtail.evaluation  # noqa: F401

    child_main(children[argv[0]], argv[1:-1], argv[-1])


def _percent(v):
    return v * 100 if v >= 0 else -1.0


def max_diff(a, b):
    """Largest |a - b| over lvis-api's metrics, in percent (AP 25.3 = 25.3)."""
    return max(abs(_percent(a[k]) - _percent(b[k])) for k in a)


def print_table(rows):
    print("\n| task | evaluator | time (s) | lvis-api time / its time | peak RSS (MiB) | peak "
          "above post-import RSS (MiB) | max abs metric diff vs lvis-api (AP points) |\n"
          "|---|---|---:|---:|---:|---:|---:|")  # fmt: skip
    for task, runs in rows:
        ref = runs.get("lvis_api")
        for name, (out, rss) in runs.items():
            seconds = out["seconds"]
            ratio = f"{ref[0]['seconds'] / seconds:.2f}x" if ref else "n/a"
            diff = f"{max_diff(ref[0]['result'], out['result']):.1e}" if ref else "n/a"
            print(
                f"| {task} | {name} | {seconds:.1f} | {ratio} | {rss:.0f} "
                f"| {out['growth_mib']:.0f} | {diff} |"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="500 images; export at 250/500/1000")
    parser.add_argument("--tasks", nargs="+", default=["bbox", "segm"])
    parser.add_argument("--skip", nargs="*", default=[], help="evaluators to skip, e.g. fce")
    parser.add_argument("--export-images", type=int, nargs="*", default=None)
    parser.add_argument("--pseudo-label-images", type=int, nargs="*", default=None)
    parser.add_argument("--workdir", default=None, help="keep the generated files here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(CHILDREN, args.child)
    num_images = 500 if args.quick else args.images
    workdir = args.workdir or tempfile.mkdtemp(prefix="lvis_eval_speed_")
    os.makedirs(workdir, exist_ok=True)
    gt_path = os.path.join(workdir, "gt.json")
    results_path = os.path.join(workdir, "results.json")
    start = time.perf_counter()
    num_anns, num_dets = generate(num_images, args.seed, gt_path, results_path)
    print(
        f"Generated {num_images:,} images, {NUM_CATEGORIES} categories, {num_anns:,} annotations, "
        f"{num_dets:,} detections in {time.perf_counter() - start:.0f} s "
        f"(results file {os.path.getsize(results_path) / 2**20:.0f} MiB)."
    )
    rows = []
    for task in args.tasks:
        runs = {}
        for name in ("lvis_api", "fce", "fast"):
            if name in args.skip:
                continue
            out, rss = run_child(__file__, "--child", name, gt_path, results_path, task)
            runs[name] = (out, rss)
            print(
                f"  {task:4s} {name:8s} {out['seconds']:7.1f} s  peak RSS {rss:7.0f} MiB "
                f"(+{out['growth_mib']:.0f} MiB over the post-import {out['baseline_mib']:.0f})",
                flush=True,
            )
        rows.append((task, runs))
    print_table(rows)
    export_images = args.export_images or ([250, 500, 1000] if args.quick else [1000, 2000, 4000])
    print("\n| export | images | detections | time (s) | peak RSS (MiB) | peak above post-import "
          "(MiB) |\n|---|---:|---:|---:|---:|---:|")  # fmt: skip
    for mode in ("in_memory", "streamed"):
        for n in export_images:
            out, rss = run_child(__file__, "--child", "export", mode, n, workdir)
            dets = out["result"]["num_detections"]
            print(
                f"| {mode} | {n:,} | {dets:,} | {out['seconds']:.1f} | {rss:.0f} "
                f"| {out['growth_mib']:.0f} |",
                flush=True,
            )
    print("\n| pseudo_label | images | pseudo labels | time (s) | peak RSS (MiB) | peak above "
          "post-import (MiB) |\n|---|---:|---:|---:|---:|---:|")  # fmt: skip
    for n in args.pseudo_label_images or ([100, 200, 400] if args.quick else [500, 1000, 2000]):
        out, rss = run_child(__file__, "--child", "pseudo_label", n, workdir)
        print(
            f"| streamed | {n:,} | {out['result']['pseudo_labels']:,} | {out['seconds']:.1f} "
            f"| {rss:.0f} | {out['growth_mib']:.0f} |",
            flush=True,
        )
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
