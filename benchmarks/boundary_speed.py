#!/usr/bin/env python
"""Boundary AP at LVIS scale: its cost against this project's segm evaluation, and against
lvis-api's ``lvis_challenge_2021`` branch (the reference implementation).

The split and results are ``eval_speed.py``'s (1,203 categories, ~12 polygon annotations and
exactly 300 detections with masks per image, negative and not-exhaustive categories). Each
evaluation runs in a fresh subprocess from the two json files to the metrics (json reading
and checks included), with its wall time, CPU time (pool workers included) and peak RSS;
``eval_speed.py`` explains the columns.

- ``segm``: this project's segm evaluation (``load_lvis_results`` + ``run_lvis_eval``, fast);
- ``boundary``: the same for Boundary AP under the standard protocol (300 per image);
- ``challenge2021``: Boundary AP under the challenge protocol (Fixed AP, 10,000 per class);
- ``steps``: the evaluation step alone, segm and boundary alternately ``--repeats`` times in
  one process on the tables loaded once (each with fresh ground truth, so the ground-truth
  boundaries are computed every time), medians: the comparison least affected by other load;
- ``reference``: the ``lvis_challenge_2021`` branch (``LVISResults`` + ``LVISEval(iou_type=
  "boundary")``, 300 per image, segm records without ``bbox`` as this project evaluates
  masks, its boundary pool on every core), run on ``--reference-images`` images only: it
  decodes every detection to a full-image mask and keeps all of them (16 minutes for 500
  images on a loaded 2-core machine, hours at 5,000); ``boundary`` runs again on the same
  subset, side by side.

Printed: boundary / segm time on ``--images``, end to end and for the evaluation step (bar:
<= 2), reference / boundary time on the subset (bar: >= 5) and the largest metric difference
between the two (AP points).

    python benchmarks/boundary_speed.py --lvis-api /path/to/lvis-api@lvis_challenge_2021
    python benchmarks/boundary_speed.py --images 500 --reference-images 100 --lvis-api ...
"""

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer incl. lvis-api's np.float)

# isort: on
import argparse
import os
import shutil
import sys
import tempfile
import time

from eval_speed import child, generate, max_diff
from timing import run_child


def _child_fast(gt_path, results_path, task):
    from lvis_longtail.evaluation import LVISGroundTruth, load_lvis_results, run_lvis_eval
    from lvis_longtail.evaluation.lvis_evaluation import load_split_json

    dataset = load_split_json(gt_path)
    table = load_lvis_results(results_path, dataset, required=("segmentation",), as_table=True)
    iou_type, max_dets, per_class = {
        "segm": ("segm", 300, -1),
        "boundary": ("boundary", 300, -1),
        "challenge2021": ("boundary", -1, 10000),
    }[task]
    result = run_lvis_eval(
        LVISGroundTruth(dataset), table, iou_type, max_dets, dets_per_class=per_class
    )
    return dict(result.metrics)


def _child_reference(gt_path, results_path, lvis_api):
    import json
    import logging

    sys.path.insert(0, lvis_api)
    for name in [m for m in sys.modules if m == "lvis" or m.startswith("lvis.")]:
        del sys.modules[name]  # lvis_longtail imported lvis-api 0.5.3 under the same name
    import lvis

    if not os.path.abspath(lvis.__file__).startswith(os.path.abspath(lvis_api)):
        raise RuntimeError(f"imported {lvis.__file__}, not the branch under {lvis_api}")
    logging.getLogger("lvis").setLevel(logging.ERROR)
    gt = lvis.LVIS(gt_path)
    with open(results_path) as f:
        results = json.load(f)
    for r in results:
        r.pop("bbox", None)  # mask areas, as for segm
    dt = lvis.LVISResults(gt, results, max_dets_per_im=300)
    ev = lvis.LVISEval(gt, dt, iou_type="boundary")
    ev.run()
    return {k: float(v) for k, v in ev.get_results().items()}


def _child_steps(gt_path, results_path, repeats):
    """Median wall and CPU seconds of the segm and boundary evaluation steps, alternated."""
    import statistics

    from lvis_longtail.evaluation import LVISGroundTruth, load_lvis_results, run_lvis_eval
    from lvis_longtail.evaluation.lvis_evaluation import load_split_json

    dataset = load_split_json(gt_path)
    table = load_lvis_results(results_path, dataset, required=("segmentation",), as_table=True)
    times = {task: ([], []) for task in ("segm", "boundary")}
    for _ in range(int(repeats)):
        for task, (wall, cpu) in times.items():
            gt = LVISGroundTruth(dataset)
            start, start_cpu = time.perf_counter(), time.process_time()
            run_lvis_eval(gt, table, task, 300)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {t: [statistics.median(w), statistics.median(c)] for t, (w, c) in times.items()}


CHILDREN = {"fast": _child_fast, "reference": _child_reference, "steps": _child_steps}


def _run(name, *args):
    out, rss = run_child(__file__, "--child", name, *args)
    print(
        f"  {name:9s} {args[-1] if name == 'fast' else 'reference':13s} {out['seconds']:7.1f} s "
        f"(CPU {out['cpu_seconds']:.1f} s)  peak RSS {rss:6.0f} MiB (+{out['growth_mib']:.0f} "
        "over the post-import RSS)",
        flush=True,
    )
    return out, rss


def _generate(folder, images, seed):
    os.makedirs(folder, exist_ok=True)
    gt, results = os.path.join(folder, "gt.json"), os.path.join(folder, "results.json")
    start = time.perf_counter()
    num_anns, num_dets = generate(images, seed, gt, results)
    print(
        f"Generated {images:,} images, {num_anns:,} annotations, {num_dets:,} detections in "
        f"{time.perf_counter() - start:.0f} s.",
        flush=True,
    )
    return gt, results


def _row(label, images, out, rss, ratio=""):
    return (
        f"| {label} | {images:,} | {out['seconds']:.1f} | {out['cpu_seconds']:.1f} | {rss:.0f} "
        f"| {out['growth_mib']:.0f} | {ratio} |"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--reference-images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="of the evaluation steps")
    parser.add_argument("--lvis-api", help="a checkout of lvis-api's lvis_challenge_2021 branch")
    parser.add_argument("--workdir", default=None, help="keep the generated files here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(CHILDREN, args.child)
    workdir = args.workdir or tempfile.mkdtemp(prefix="lvis_boundary_speed_")
    rows = []
    gt, results = _generate(os.path.join(workdir, "full"), args.images, args.seed)
    segm = _run("fast", gt, results, "segm")
    boundary = _run("fast", gt, results, "boundary")
    challenge = _run("fast", gt, results, "challenge2021")
    ratio = boundary[0]["seconds"] / segm[0]["seconds"]
    rows.append(_row("segm (fast)", args.images, *segm))
    rows.append(_row("boundary (fast)", args.images, *boundary, f"{ratio:.2f}x segm"))
    rows.append(_row("boundary, challenge2021 (fast)", args.images, *challenge))
    out, _ = run_child(__file__, "--child", "steps", gt, results, args.repeats)
    steps = out["result"]
    for task, (wall, cpu) in steps.items():
        print(f"  step      {task:13s} {wall:7.1f} s (CPU {cpu:.1f} s), median of {args.repeats}")
    (segm_wall, segm_cpu), (wall, cpu) = steps["segm"], steps["boundary"]
    step_ratio = f"{wall / segm_wall:.2f}x segm (CPU {cpu / segm_cpu:.2f}x)"
    if args.lvis_api:
        n = args.reference_images
        gt, results = _generate(os.path.join(workdir, "subset"), n, args.seed)
        ours = _run("fast", gt, results, "boundary")
        ref = _run("reference", gt, results, os.path.abspath(args.lvis_api))
        speedup = ref[0]["seconds"] / ours[0]["seconds"]
        diff = max_diff(ref[0]["result"], ours[0]["result"])
        rows.append(_row("boundary (fast)", n, *ours))
        rows.append(_row("boundary (lvis_challenge_2021)", n, *ref, f"{speedup:.1f}x fast"))
        print(f"max |metric difference| fast vs reference: {diff:.1e} AP points")
    print()
    print("| evaluation | images | time (s) | CPU (s) | peak RSS (MiB) | above post-import (MiB) "
          "| ratio |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    print()
    print(f"Evaluation step only ({args.images:,} images, tables loaded once, median of "
          f"{args.repeats}): segm {segm_wall:.1f} s (CPU {segm_cpu:.1f} s), boundary {wall:.1f} s "
          f"(CPU {cpu:.1f} s): {step_ratio}")  # fmt: skip
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
