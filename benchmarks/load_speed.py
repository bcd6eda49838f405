#!/usr/bin/env python
"""Loading an LVIS-v1-sized json: this project's validating loader against detectron2's.

Generates an LVIS-format training json of LVIS v1's size (``--scale 1``: 100,170 images,
1,270,141 annotations, 1,203 categories with LVIS's r/c/f fields;
:func:`lvis_generator.write_lvis_json`). Then, each in a fresh subprocess from the same file,
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
import os
import shutil
import sys
import tempfile
import time

from lvis_generator import NUM_ANNOTATIONS, NUM_IMAGES, write_lvis_json
from timing import child_main, run_child


def _child_detectron2(path):
    from detectron2.data.datasets.lvis import load_lvis_json

    return len(load_lvis_json(path, "/nonexistent/"))


def _child_lvis_longtail(path):
    from lvis_longtail.data.lvis_format import load_lvis_format_json

    return len(load_lvis_format_json(path, "/nonexistent/", check_files=False))


CHILDREN = {"detectron2": _child_detectron2, "lvis_longtail": _child_lvis_longtail}


def child(name, path, out):
    import detectron2.data.datasets.lvis  # noqa: F401  (the same imports for both)

    import lvis_longtail.data.lvis_format  # noqa: F401

    child_main(CHILDREN[name], [path], out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of LVIS v1's size")
    parser.add_argument("--quick", action="store_true", help="--scale 0.02")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each loader (best time)")
    parser.add_argument("--workdir", default=None, help="keep the generated json here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)
    scale = 0.02 if args.quick else args.scale
    workdir = args.workdir or tempfile.mkdtemp(prefix="lvis_load_speed_")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"lvis_like_{scale:g}.json")
    start = time.perf_counter()
    if not os.path.exists(path):
        num_images, num_anns = write_lvis_json(path, scale)
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
            out, rss = run_child(__file__, "--child", name, path)
            seconds, cpu, n = out["seconds"], out["cpu_seconds"], out["result"]
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
