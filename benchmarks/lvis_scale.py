#!/usr/bin/env python
"""LVIS v1 at full scale on one machine: data loading, every LVIS config, evaluation's host path.

(a) **Training loader.** A generated LVIS-v1-sized training json (``--scale 1``: 100,170
    images, 1,270,141 polygon annotations, 1,203 categories with LVIS's r/c/f split;
    :mod:`lvis_generator`), whose records share a small pool of real JPEG files of LVIS's
    sizes. Each loader runs in a fresh subprocess from the same file, with the LVIS v1 base
    config's data settings (repeat-factor sampling at 0.001, 4 workers) and 2 images per
    batch (one GPU's share):

    - ``detectron2``: the dataset registered with ``register_lvis_instances``
      (``load_lvis_json``), ``build_detection_train_loader(cfg)``;
    - ``lvis_longtail``: the dataset registered with ``register_lvis_format``; what the
      trainer does: the class statistics the losses read (``get_class_stats``) and
      ``build_longtail_train_loader(cfg)`` in one ``shared_reads()`` block, with the
      validation of every record and the image check of ``DATASETS.IMAGE_CHECK`` (``all``:
      every header read; ``sample``: existence + 1000 headers).

    Reported: startup (wall and the process's CPU time, from the registration to the built
    loader), memory after it (``gc.collect()`` first) as RSS above the imports, and after
    ``--batches`` batches through 4 forked workers: the PSS of the process and of each worker
    (``/proc/<pid>/smaps_rollup``; PSS splits pages shared after the fork among the processes
    sharing them, so the sum is what the rank costs the machine, where RSS would count every
    shared page once per worker) and the workers' USS (their private pages: what
    copy-on-write has copied). Bars: startup <= 1.5x and retained memory <= 1.2x
    detectron2's.

(b) **Every config under configs/LVISv1/** at its real size (K = 1203, R50/ResNeSt50 trunks,
    the config's own training augmentations and input size): build the model (random init:
    no pretrained weights are downloaded), one training iteration of 2 images from the
    config's own loader, one inference of one image (TTA where the config enables it) and
    the evaluator's ``process()`` of its output. One subprocess per config: its peak RSS is
    that config's. Files a config names that do not exist here (pseudo labels, extra
    images, a stage-1 checkpoint) are replaced by the generated split, which the table says.

(c) **Evaluation's host path**: 300 pasted masks per image at 480x640 and 800x1333: the
    evaluator's ``process()`` (selection, masks encoded from their transitions on their
    device, rows to the shard) against what detectron2's ``LVISEvaluator.process`` does
    (``instances.to("cpu")`` and ``instances_to_coco_json``), interleaved, median per image
    (:mod:`timing`). Bar: >= 2x faster.

    python benchmarks/lvis_scale.py                            # all, full LVIS v1 size
    python benchmarks/lvis_scale.py --parts a --scale 0.1      # 10k images
    python benchmarks/lvis_scale.py --parts b --configs mask_rcnn_R50_FPN_1x_softmax.yaml
    python benchmarks/lvis_scale.py --parts bc --device cuda   # one GPU
"""

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer for detectron2 0.6)

# isort: on
import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lvis_scale_children as children
import timing
from lvis_generator import NUM_ANNOTATIONS, NUM_IMAGES, write_image_pool, write_lvis_json

REPO = Path(__file__).resolve().parents[1]
POOL_PER_SIZE = 4  # image files per LVIS image size shared by all records
BARS = {"startup": 1.5, "memory": 1.2, "eval_speedup": 2.0}


def machine() -> str:
    """One line: CPU model, cores, memory, load, torch and its threads."""
    import torch

    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 2**20
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (
        f"{model}, {os.cpu_count()} cores, {mem_gib:.0f} GiB{gpu}; load average "
        f"{os.getloadavg()[0]:.1f}; Python {platform.python_version()}, torch {torch.__version__}"
    )


def run_child(args) -> tuple:
    """Run ``children.main(args)`` in a fresh process: (its json result, its peak RSS MiB)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return timing.run_child(children.__file__, *args, "--out", env=env, check=False)


def verdict(ratio: float, bar: float, lower_is_better: bool = True) -> str:
    met = ratio <= bar if lower_is_better else ratio >= bar
    sign = "<=" if lower_is_better else ">="
    return f"{ratio:.2f}x (bar {sign} {bar}x: {'met' if met else 'NOT met'})"


# ----------------------------------------------------------------------------- (a)


def prepare_data(workdir: str, scale: float) -> tuple:
    """The generated json of ``scale`` and its image pool (kept in ``workdir``)."""
    image_root = os.path.join(workdir, "images")
    write_image_pool(image_root, POOL_PER_SIZE)
    path = os.path.join(workdir, f"lvis_v1_like_{scale:g}.json")
    start = time.perf_counter()
    if not os.path.exists(path):
        counts = write_lvis_json(path, scale, pool_per_size=POOL_PER_SIZE)
    else:
        counts = max(1, round(NUM_IMAGES * scale)), max(1, round(NUM_ANNOTATIONS * scale))
    print(
        f"json: {counts[0]:,} images, {counts[1]:,} annotations, "
        f"{os.path.getsize(path) / 2**20:.0f} MiB ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return path, image_root


def part_a(path, image_root, args) -> list:
    runs = [("detectron2", "all"), ("lvis_longtail", "all"), ("lvis_longtail", "sample")]
    rows = {}
    for loader, check in runs:
        label = loader if loader == "detectron2" else f"{loader}, IMAGE_CHECK {check}"
        print(f"(a) {label} ...", flush=True)
        result, peak = run_child(
            ["loader", loader, path, image_root, "--image-check", check, "--batches", args.batches]
        )
        if "error" in result:
            raise RuntimeError(f"(a) {label}: {result['error']}")
        rows[label] = dict(result, peak=peak)
    ref = rows["detectron2"]
    lines = [
        "| loader | startup wall (s) | startup CPU (s) | RSS above imports after the build "
        "(MiB) | PSS after batches: process + 4 workers = rank (MiB) | workers' USS, mean "
        "(MiB) | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows.items():
        workers = r["workers"]
        rank_pss = r["forked"]["pss"] + sum(w["pss"] for w in workers)
        uss = sum(w["uss"] for w in workers) / max(len(workers), 1)
        r["rank_pss"] = rank_pss
        lines.append(
            f"| {label} | {r['startup_s']:.1f} | {r['startup_cpu_s']:.1f} | "
            f"{r['retained_mib']:.0f} | {r['forked']['pss']:.0f} + "
            f"{sum(w['pss'] for w in workers):.0f} = {rank_pss:.0f} | {uss:.0f} | "
            f"{r['peak']:.0f} |"
        )
    lines.append("")
    for label, r in rows.items():
        if label == "detectron2":
            continue
        lines.append(f"{label} / detectron2:")
        lines.append(
            f"- startup (wall): {verdict(r['startup_s'] / ref['startup_s'], BARS['startup'])}; "
            f"CPU: {r['startup_cpu_s'] / ref['startup_cpu_s']:.2f}x"
        )
        lines.append(
            f"- RSS above imports after the build: "
            f"{verdict(r['retained_mib'] / ref['retained_mib'], BARS['memory'])}"
        )
        lines.append(
            f"- rank PSS with 4 workers: {verdict(r['rank_pss'] / ref['rank_pss'], BARS['memory'])}"
        )
    return lines


# ----------------------------------------------------------------------------- (b)


def lvis_configs(selected) -> list:
    folder = REPO / "configs" / "LVISv1"
    names = sorted(p.name for p in folder.glob("*.yaml") if not p.name.startswith("Base-"))
    if selected:
        unknown = sorted(set(selected) - set(names))
        if unknown:
            raise SystemExit(f"--configs: not in configs/LVISv1/: {unknown}")
        names = [n for n in names if n in selected]
    return names


def part_b(path, image_root, args) -> list:
    lines = [
        "| config | build (s) | inference (s) | evaluator process (s) | detections | data (s) "
        "| train iteration (s) | peak RSS (MiB) | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in lvis_configs(args.configs):
        print(f"(b) {name} ...", flush=True)
        cmd = ["config", name, path, image_root, "--device", args.device]
        result, peak = run_child(cmd + ["--threads", args.threads])
        if "error" in result:
            lines.append(f"| {name} | | | | | | | {peak:.0f} | failed: {result['error']} |")
        else:
            s = result["seconds"]
            lines.append(
                f"| {name} | {s['build']:.1f} | {s['inference']:.1f} | {s['process']:.2f} | "
                f"{result['detections']} | {s['data']:.2f} | {s['train']:.1f} | {peak:.0f} "
                f"| {'; '.join(result['notes'])} |"
            )
        print(lines[-1], flush=True)
    return lines


# ----------------------------------------------------------------------------- (c)


def part_c(args) -> list:
    result, _ = run_child(["eval", "--device", args.device, "--repeats", args.repeats])
    if "error" in result:
        raise RuntimeError(f"(c): {result['error']}")
    lines = [
        f"| image size | masks per image | detectron2 `to(cpu)` + `instances_to_coco_json` (ms) "
        f"| lvis_longtail `process()` on {args.device} (ms) | speed-up |",
        "|---|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        speedup = row["detectron2"] / row["lvis_longtail"]
        lines.append(
            f"| {row['height']}x{row['width']} | {row['masks']} | {1000 * row['detectron2']:.1f} "
            f"| {1000 * row['lvis_longtail']:.1f} | "
            f"{verdict(speedup, BARS['eval_speedup'], lower_is_better=False)} |"
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="abc", help="which of a, b, c to run")
    parser.add_argument("--scale", type=float, default=1.0, help="(a): fraction of LVIS v1")
    parser.add_argument("--batches", type=int, default=20, help="(a): batches through workers")
    parser.add_argument("--configs", nargs="*", help="(b): file names under configs/LVISv1/")
    parser.add_argument("--device", default="cpu", help="(b), (c): cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="(b): torch threads on CPU")
    parser.add_argument("--repeats", type=int, default=5, help="(c): timed rounds")
    parser.add_argument("--workdir", default=None, help="keep the generated data here")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="lvis_scale_")
    os.makedirs(workdir, exist_ok=True)
    tables = {}
    try:
        if "a" in args.parts:
            tables["a"] = part_a(*prepare_data(workdir, args.scale), args)
        if "b" in args.parts:
            tables["b"] = part_b(*prepare_data(workdir, 0.001), args)
        if "c" in args.parts:
            tables["c"] = part_c(args)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    titles = {
        "a": f"(a) training loader, LVIS v1 x {args.scale:g}",
        "b": f"(b) configs/LVISv1 at real size on {args.device} ({args.threads} thread(s))",
        "c": f"(c) evaluation host path on {args.device}",
    }
    for part, lines in tables.items():
        print(f"\n{titles[part]}\n")
        print("\n".join(lines))
    print(f"\n(load average after: {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
