"""Box-branch speed of TSD against the plain box branch, side by side in one run.

One training step of the box branch alone (``roi_heads._forward_box``: pooling, box head(s),
predictor(s), losses, then backward into the FPN features) on fixed random FPN features and
sampled RoIs (a quarter of them positives with a jittered GT box), for the plain Seesaw box
branch and for the same branch with ``MODEL.ROI_BOX_HEAD.TSD.ENABLED`` (the sibling head, the
offset MLPs, the two re-samplings, the two TSD towers and predictor, both progressive
constraints). The two are interleaved, median over ``--iters`` after ``--warmup``; printed as
a ratio TSD / plain. Bar: <= 2.5x.

    .venv/bin/python benchmarks/tsd_speed.py                      # tiny heads, K = 24
    .venv/bin/python benchmarks/tsd_speed.py --preset lvis        # R50-FPN heads, K = 1203
    .venv/bin/python benchmarks/tsd_speed.py --preset lvis --device cuda
"""

import argparse
import os

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer for detectron2 0.6)

# isort: on
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from timing import median_times

from lvis_longtail.engine import setup_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    # name: (config, image (h, w), RoIs per image, extra options)
    "tiny": ("configs/tiny/mask_rcnn_R18_FPN_tiny_seesaw.yaml", (128, 160), 128, []),
    "lvis": ("configs/LVISv1/mask_rcnn_R50_FPN_2x_seesaw.yaml", (800, 1088), 512, []),
}


def _roi_heads(config: str, tsd: bool, device: str, opts):
    o = ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "MODEL.ROI_BOX_HEAD.TSD.ENABLED", str(tsd)]
    cfg = setup_cfg(os.path.join(REPO, config), o + list(opts))
    torch.manual_seed(0)
    return build_model(cfg).roi_heads.train(), cfg


def _inputs(cfg, size, rois_per_image, images, device, seed=0):
    """FPN features (p2-p5, requiring grad) and sampled proposals with their GT fields."""
    g = torch.Generator().manual_seed(seed)
    channels = cfg.MODEL.FPN.OUT_CHANNELS
    h, w = size
    feats = {
        f"p{k}": torch.randn(images, channels, h // 2**k, w // 2**k, generator=g)
        .to(device)
        .requires_grad_()
        for k in (2, 3, 4, 5)
    }
    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    proposals = []
    for _ in range(images):
        xy = torch.rand(rois_per_image, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = 8 + torch.rand(rois_per_image, 2, generator=g) * torch.tensor([w / 3, h / 3])
        boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], 1)
        jitter = torch.randn(rois_per_image, 4, generator=g) * 0.1 * wh.repeat(1, 2)
        classes = torch.randint(0, k, (rois_per_image,), generator=g)
        classes[rois_per_image // 4 :] = k  # 1/4 positives
        inst = Instances((h, w))
        inst.proposal_boxes = Boxes(boxes.to(device))
        inst.gt_boxes = Boxes((boxes + jitter).to(device))
        inst.gt_classes = classes.to(device)
        proposals.append(inst)
    return feats, proposals


def _step(heads, feats, proposals) -> None:
    """One forward + backward of the box branch alone."""
    for f in feats.values():
        f.grad = None
    heads.zero_grad(set_to_none=True)
    losses = heads._forward_box(feats, proposals)
    sum(losses.values()).backward()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config, size, rois, opts = PRESETS[args.preset]
    models = {
        name: _roi_heads(config, name == "TSD", args.device, opts) for name in ("plain", "TSD")
    }
    cfg = models["plain"][1]
    feats, proposals = _inputs(cfg, size, rois, args.images, args.device)
    fns = {name: (lambda h=m[0]: _step(h, feats, proposals)) for name, m in models.items()}
    with EventStorage(0):
        for _ in range(max(args.warmup - 1, 0)):  # median_times warms up once more
            for fn in fns.values():
                fn()
        med = {name: t * 1000 for name, t in median_times(fns, args.iters, args.device).items()}
    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    threads = torch.get_num_threads()
    print(f"box branch forward + backward, {args.preset} ({config}), K = {k}, "
          f"{args.images} x {rois} RoIs, {args.device}, {threads} threads")  # fmt: skip
    print("| box branch | step (median) | vs plain |")
    print("|---|---:|---:|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.1f} ms | {ms / med['plain']:.2f}x |")
    ratio = med["TSD"] / med["plain"]
    print(f"TSD / plain = {ratio:.2f}x (bar <= 2.5x: {'met' if ratio <= 2.5 else 'NOT met'})")
    return ratio


if __name__ == "__main__":
    main()
