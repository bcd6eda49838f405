"""Per-iteration cost of the preemption agreement, side by side with what detectron2 0.6
already does every iteration: ``any_rank`` (one all-reduce of a CPU int over the gloo group,
lvis_longtail/engine/faults.py) against ``comm.gather`` of a metrics dict to rank 0
(``SimpleTrainer._write_metrics``), in ``--procs`` CPU processes; medians over ``--iters``
interleaved calls, microseconds and the ratio.

    .venv/bin/python benchmarks/preemption_flag.py --procs 2 --iters 2000
"""

import argparse

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer for detectron2 0.6)

# isort: on
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm
from timing import median_times

from lvis_longtail.engine.faults import any_rank

# the scalars SimpleTrainer._write_metrics gathers for a Mask R-CNN step
METRICS = {
    k: 0.5
    for k in ("loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc", "data_time")
}


def worker(rank, world, url, iters, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=url, world_size=world, rank=rank)
    fns = {
        "preemption flag (any_rank)": lambda: any_rank(False),
        "detectron2 metrics gather": lambda: comm.gather(METRICS),
    }
    times = median_times(fns, iters, "cpu")
    if rank == 0:
        out.put(times)
    dist.barrier()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2000)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.start_processes(worker, (args.procs, url, args.iters, out), args.procs, start_method="spawn")
    times = out.get()
    ref = times["detectron2 metrics gather"]
    print(f"{args.procs} gloo processes on CPU, median of {args.iters} interleaved calls")
    print("| per iteration | median (us) | vs detectron2's gather |")
    print("|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {1e6 * t:.0f} | {t / ref:.2f}x |")


if __name__ == "__main__":
    main()
