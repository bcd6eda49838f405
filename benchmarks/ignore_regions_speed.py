"""Training step time with ignore regions vs without, side by side in one run.

One model (``LongTailRCNN`` + ``LongTailRPN``, the given ROI heads), one batch of
``--batch`` random images with 1-4 rectangular instances each; the step (forward, backward,
SGD update) alternates between the batch without ``ignore_boxes`` and the same batch with
``--ignore`` random ignore boxes per image (which goes first swaps every step), so machine
load affects both alike. Prints the
median step times and their ratio. Bar: <= 1.03x.

    .venv/bin/python benchmarks/ignore_regions_speed.py --quick     # tiny, 2 cores
    .venv/bin/python benchmarks/ignore_regions_speed.py --config-file \
        configs/tiny/cascade_mask_rcnn_R18_FPN_tiny_seesaw.yaml
"""

import argparse
import os
import statistics
import time

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer for detectron2 0.6)

# isort: on
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage
from synthetic_batch import make_batch

from lvis_longtail.engine import setup_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "tiny", "Base-MaskRCNN-Tiny.yaml")


def random_boxes(g: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    """(n, 4) random XYXY boxes inside an (h, w) image."""
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = 8 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
    return torch.cat([xy, xy + wh], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=128, help="image side (px)")
    parser.add_argument("--ignore", type=int, default=8, help="ignore boxes per image")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="8 steps each after 2 warm-up")
    args = parser.parse_args()
    if args.quick:
        args.iters, args.warmup = 8, 2
    opts = ["MODEL.META_ARCHITECTURE", "LongTailRCNN", "MODEL.PROPOSAL_GENERATOR.NAME"]
    opts += ["LongTailRPN", "MODEL.DEVICE", args.device]
    cfg = setup_cfg(args.config_file, opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    num_classes, size = cfg.MODEL.ROI_HEADS.NUM_CLASSES, (args.size, args.size)
    plain = make_batch(args.batch, num_classes, size, max_instances=4, boxes=random_boxes)
    g = torch.Generator().manual_seed(1)
    ignored = [
        {**x, "ignore_boxes": Boxes(random_boxes(g, args.ignore, args.size, args.size))}
        for x in plain
    ]
    times = {"without": [], "with": []}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with EventStorage(0):
        for step in range(args.warmup + args.iters):
            pair = (("without", plain), ("with", ignored))
            for name, batch in pair if step % 2 == 0 else pair[::-1]:  # ABBA: no order bias
                sync()
                start = time.perf_counter()
                loss = sum(model(batch).values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                sync()
                if step >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    without, with_ = (statistics.median(times[k]) for k in ("without", "with"))
    print(
        f"config {os.path.relpath(args.config_file, REPO)}, batch {args.batch}x{args.size}px, "
        f"{args.ignore} ignore boxes/image, {args.iters} steps each, device {args.device}"
    )
    print(f"step without ignore regions: {without * 1e3:.1f} ms")
    print(f"step with ignore regions:    {with_ * 1e3:.1f} ms")
    print(f"ratio with/without: {with_ / without:.3f}x (bar <= 1.03x)")


if __name__ == "__main__":
    main()
