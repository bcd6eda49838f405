#!/usr/bin/env python
"""Speed of the box classification losses at LVIS scale, against plain softmax CE.

Forward + backward of each loss on (R, L) fp32 logits, R = 8192 RoIs (16 images x 512),
K = 1203 classes, on CPU by default. Synthetic LVIS-like class statistics (long-tailed image
and instance counts over 100k images) are built here; each image holds a few classes drawn by
image count, and ~25% of its RoIs are foreground. Stateful losses (Seesaw, EQLv2) are warmed
up first so their statistics are non-trivial. Each repeat times softmax CE
(``torch.nn.functional.cross_entropy`` on K+1 logits) and the loss back to back; the table
gives the median time and the median of the per-repeat ratios, so load from other processes
affects both sides alike.

    python benchmarks/cls_loss_speed.py [--images 16] [--rois-per-image 512] [--repeats 15]
    python benchmarks/cls_loss_speed.py --threads 2   # pin the number of CPU threads
    python benchmarks/cls_loss_speed.py --losses SoftmaxCE ECMLoss   # a subset
"""

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from lvis_longtail.data.class_stats import ClassStats, frequency_group
from lvis_longtail.modeling.cls_losses import (
    EQL,
    BalancedSoftmax,
    ECMLoss,
    EQLv2,
    FederatedLoss,
    GroupSoftmax,
    LogitAdjustedCE,
    SeesawLoss,
    SigmoidCE,
    SoftmaxCE,
)


def synthetic_stats(num_classes: int, generator: torch.Generator) -> ClassStats:
    """LVIS v1-like statistics: image counts from ~1 to ~60k over 100k images, long-tailed."""
    rank = torch.randperm(num_classes, generator=generator).double() + 1
    image_count = (60000.0 / rank**1.4).clamp(min=1).round()
    instance_count = (
        image_count * (1 + 4 * torch.rand(num_classes, generator=generator, dtype=torch.float64))
    ).round()
    frequency = tuple(frequency_group(int(c)) for c in image_count)
    return ClassStats(image_count, instance_count, frequency, num_images=100170)


def synthetic_labels(num_images, rois_per_image, stats, fg_fraction, generator):
    """(num_images * rois_per_image,) labels of sampled RoIs, image by image: each image holds
    1-8 classes drawn in proportion to their image counts; a fraction ``fg_fraction`` of its
    RoIs are foreground, spread uniformly over its classes; the rest are background."""
    labels = []
    for _ in range(num_images):
        num_present = int(torch.randint(1, 9, (1,), generator=generator))
        present = torch.multinomial(stats.image_count.float(), num_present, generator=generator)
        image_labels = present[torch.randint(num_present, (rois_per_image,), generator=generator)]
        background = torch.rand(rois_per_image, generator=generator) >= fg_fraction
        labels.append(image_labels.masked_fill(background, stats.num_classes))
    return torch.cat(labels)


def build_losses(num_classes: int, stats: ClassStats):
    return {
        "SoftmaxCE": SoftmaxCE(num_classes=num_classes),
        "SigmoidCE": SigmoidCE(num_classes=num_classes),
        "SeesawLoss": SeesawLoss(num_classes=num_classes),
        "EQL": EQL(num_classes=num_classes, image_frequency=stats.image_frequency),
        "EQLv2": EQLv2(num_classes=num_classes),
        "GroupSoftmax": GroupSoftmax(num_classes=num_classes, instance_count=stats.instance_count),
        "FederatedLoss": FederatedLoss(num_classes=num_classes, image_count=stats.image_count),
        "BalancedSoftmax": BalancedSoftmax(num_classes=num_classes, class_counts=stats.image_count),
        "LogitAdjustedCE": LogitAdjustedCE(
            num_classes=num_classes, class_counts=stats.instance_count, tau=1.0
        ),
        "ECMLoss": ECMLoss(num_classes=num_classes, class_counts=stats.image_count),
    }


def time_forward_backward(fn, logits) -> float:
    """Seconds of ``fn(logits)`` plus backward."""
    leaf = logits.detach().requires_grad_(True)
    start = time.perf_counter()
    fn(leaf).backward()
    return time.perf_counter() - start


def measure(fn, logits, reference_fn, reference_logits, repeats: int):
    """Median seconds of ``fn`` and median of its per-repeat ratio to ``reference_fn``, the two
    timed back to back in each repeat (robust to other load on the machine)."""
    time_forward_backward(fn, logits)  # warm-up
    time_forward_backward(reference_fn, reference_logits)
    seconds, ratios = [], []
    for _ in range(repeats):
        reference = time_forward_backward(reference_fn, reference_logits)
        seconds.append(time_forward_backward(fn, logits))
        ratios.append(seconds[-1] / reference)
    return statistics.median(seconds), statistics.median(ratios)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rois-per-image", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1203)
    parser.add_argument("--fg-fraction", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--losses", nargs="+", help="names of the losses to time (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    stats = synthetic_stats(args.classes, generator)
    labels = synthetic_labels(args.images, args.rois_per_image, stats, args.fg_fraction, generator)
    labels = labels.to(args.device)
    num_rois = labels.numel()
    losses = build_losses(args.classes, stats)
    unknown = sorted(set(args.losses or ()) - set(losses))
    if unknown:
        parser.error(f"--losses: unknown {unknown}; valid: {', '.join(losses)}")
    losses = {
        name: loss.to(args.device)
        for name, loss in losses.items()
        if not args.losses or name in args.losses
    }

    def total(loss, logits):
        return sum(loss(logits, labels).values())

    def reference_fn(z):
        return F.cross_entropy(z, labels)

    reference_logits = torch.randn(num_rois, args.classes + 1, generator=generator)
    reference_logits = reference_logits.to(args.device)
    rows = []
    for name, loss in losses.items():
        logits = torch.randn(num_rois, loss.num_logits, generator=generator).to(args.device)
        for _ in range(3):  # warm-up: non-trivial Seesaw / EQLv2 statistics
            total(loss, logits)
        seconds, ratio = measure(
            lambda z, loss=loss: total(loss, z),
            logits,
            reference_fn,
            reference_logits,
            args.repeats,
        )
        rows.append((name, loss.num_logits, seconds, ratio))
    reference, _ = measure(
        reference_fn, reference_logits, reference_fn, reference_logits, args.repeats
    )

    num_fg = int((labels < args.classes).sum())
    print(
        f"{num_rois} RoIs ({num_fg} foreground, {len(labels[labels < args.classes].unique())} "
        f"classes present) x {args.classes} classes, fp32, {args.device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}, forward + backward\n"
    )
    print("| loss | logits | ms | vs softmax CE |")
    print("|---|---:|---:|---:|")
    print(f"| F.cross_entropy (reference) | {args.classes + 1} | {reference * 1e3:.1f} | 1.00x |")
    for name, num_logits, seconds, ratio in rows:
        print(f"| {name} | {num_logits} | {seconds * 1e3:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
