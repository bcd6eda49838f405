#!/usr/bin/env python
"""Loading an LVIS-v1-sized json: this project's validating loader against detectron2's.

Generates an LVIS-format training json of LVIS v1's size (``--scale 1``: 100,170 images,
1,270,141 annotations, 1,203 categories with LVIS's r/c/f fields; each annotation one polygon
of 8-40 vertices with 2-decimal coordinates, its box, area and ``iscrowd``; images with
``coco_url``, ``neg_category_ids`` and ``not_exhaustive_category_ids``), written as text
directly (no json.dumps of a 1 GB object). Then, each in a fresh subprocess from the same file,
timed after the same imports, with the child's peak RSS from ``os.wait4``:

- ``detectron2``: ``detectron2.data.datasets.lvis.load_lvis_json(json, root)`` (lvis-api's
  ``LVIS`` index, asserts only);
- ``lvis_longtail``: ``load_lvis_format_json(json, root, check_files=False)``: parse,
  validate every record (:mod:`lvis_longtail.data.lvis_json`) and build the same dataset
  dicts (no image files exist here, and detectron2's loader does not look at them either).

The bars (issue 10): this project's time <= 1.0x detectron2's, its peak RSS <= detectron2's.
Times are the best of ``--repeat`` runs, wall and CPU (the child's own process time, which
other load on a shared machine disturbs far less than wall time); compare within one run.

    python benchmarks/load_speed.py               # full LVIS v1 size (needs ~20 GB RAM)
    python benchmarks/load_speed.py --scale 0.1   # 10k images, 127k annotations
    python benchmarks/load_speed.py --quick       # --scale 0.02
"""

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer)

# isort: on
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

NUM_IMAGES, NUM_ANNOTATIONS = 100_170, 1_270_141  # LVIS v1 train
GROUP_SIZES = (("r", 337), ("c", 461), ("f", 405))
IMAGE_SIZES = ((480, 640), (640, 480), (427, 640), (640, 427), (512, 512))


def _polygon_text(rng, x, y, w, h):
    n = int(rng.integers(8, 41))
    a = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = rng.uniform(0.6, 1.0, n)
    px = x + w / 2 + r * np.cos(a) * w / 2
    py = y + h / 2 + r * np.sin(a) * h / 2
    return "[[" + ",".join(f"{v:.2f}" for v in np.stack([px, py], 1).ravel()) + "]]"


def generate(path: str, scale: float, seed: int = 0) -> tuple:
    """Write the json; returns (#images, #annotations)."""
    rng = np.random.default_rng(seed)
    num_images = max(1, round(NUM_IMAGES * scale))
    num_anns = max(1, round(NUM_ANNOTATIONS * scale))
    freq = [f for f, n in GROUP_SIZES for _ in range(n)]
    weight = np.array([{"r": 0.02, "c": 0.3, "f": 4.0}[f] for f in freq])
    weight = weight * rng.uniform(0.2, 1.0, len(freq)) ** 2
    weight /= weight.sum()
    per_image = rng.multinomial(num_anns, np.full(num_images, 1 / num_images))
    cats = rng.choice(len(freq), num_anns, p=weight) + 1
    sizes = rng.integers(len(IMAGE_SIZES), size=num_images)
    with open(path, "w") as f:
        f.write('{"info":{"year":2020},"licenses":[],"categories":[')
        f.write(
            ",".join(
                json.dumps(
                    {
                        "id": k + 1,
                        "name": f"cat_{k + 1}",
                        "synset": f"cat_{k + 1}.n.01",
                        "frequency": g,
                        "image_count": 1,
                        "instance_count": 1,
                    }  # fmt: skip
                )
                for k, g in enumerate(freq)
            )
        )
        f.write('],"images":[')
        for i in range(num_images):
            h, w = IMAGE_SIZES[sizes[i]]
            neg = (rng.integers(1, len(freq) + 1, int(rng.integers(0, 8)))).tolist()
            f.write(
                ("," if i else "") + f'{{"id":{i + 1},"height":{h},"width":{w},"license":1,'
                f'"coco_url":"http://images.cocodataset.org/train2017/{i + 1:012d}.jpg",'
                f'"neg_category_ids":{neg},"not_exhaustive_category_ids":[]}}'
            )
        f.write('],"annotations":[')
        k = 0
        for i in range(num_images):
            h, w = IMAGE_SIZES[sizes[i]]
            for _ in range(int(per_image[i])):
                bw, bh = float(rng.uniform(4, w / 2)), float(rng.uniform(4, h / 2))
                x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
                f.write(
                    ("," if k else "")
                    + f'{{"id":{k + 1},"image_id":{i + 1},"category_id":{int(cats[k])},'
                    f'"bbox":[{x:.2f},{y:.2f},{bw:.2f},{bh:.2f}],"area":{0.7 * bw * bh:.2f},'
                    f'"iscrowd":0,"segmentation":{_polygon_text(rng, x, y, bw, bh)}}}'
                )
                k += 1
        f.write("]}")
    return num_images, num_anns


def _child_detectron2(path):
    from detectron2.data.datasets.lvis import load_lvis_json

    return len(load_lvis_json(path, "/nonexistent/"))


def _child_lvis_longtail(path):
    from lvis_longtail.data.lvis_format import load_lvis_format_json

    return len(load_lvis_format_json(path, "/nonexistent/", check_files=False))


CHILDREN = {"detectron2": _child_detectron2, "lvis_longtail": _child_lvis_longtail}


def child_main(name, path, out):
    import detectron2.data.datasets.lvis  # noqa: F401  (the same imports for both)

    import lvis_longtail.data.lvis_format  # noqa: F401

    start, cpu = time.perf_counter(), time.process_time()
    n = CHILDREN[name](path)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "cpu_seconds": cpu, "num_dicts": n}, f)


def run_child(name, path):
    """(wall seconds, CPU seconds, peak RSS MiB of the whole child, #dicts)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, path, out]
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"child {name} failed with status {status}")
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    return result["seconds"], result["cpu_seconds"], usage.ru_maxrss / 1024, result["num_dicts"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of LVIS v1's size")
    parser.add_argument("--quick", action="store_true", help="--scale 0.02")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each loader (best time)")
    parser.add_argument("--workdir", default=None, help="keep the generated json here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(*args.child)
    scale = 0.02 if args.quick else args.scale
    workdir = args.workdir or tempfile.mkdtemp(prefix="lvis_load_speed_")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"lvis_like_{scale:g}.json")
    start = time.perf_counter()
    if not os.path.exists(path):
        num_images, num_anns = generate(path, scale)
    else:
        num_images, num_anns = round(NUM_IMAGES * scale), round(NUM_ANNOTATIONS * scale)
    print(
        f"json: {num_images:,} images, {num_anns:,} annotations, "
        f"{os.path.getsize(path) / 2**20:.0f} MiB ({time.perf_counter() - start:.0f} s); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    rows = {}
    for _ in range(args.repeat):
        for name in CHILDREN:
            seconds, cpu, rss, n = run_child(name, path)
            assert n == num_images, (name, n)
            best = rows.get(name, (float("inf"), float("inf"), 0.0))
            rows[name] = (min(seconds, best[0]), min(cpu, best[1]), max(rss, best[2]))
            print(f"  {name:14s} {seconds:7.1f} s ({cpu:.1f} s CPU)  peak RSS {rss:7.0f} MiB")
    ref_s, ref_cpu, ref_rss = rows["detectron2"]
    print()
    print(
        "| loader | wall time (s) | CPU time (s) | CPU time / detectron2's | peak RSS (MiB) "
        "| RSS / detectron2's |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, (seconds, cpu, rss) in rows.items():
        print(
            f"| {name} | {seconds:.1f} | {cpu:.1f} | {cpu / ref_cpu:.2f}x | {rss:.0f} "
            f"| {rss / ref_rss:.2f}x |"
        )
    print(f"(load average after: {os.getloadavg()[0]:.1f})")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
