"""Speed of DiceBCEMaskHead against detectron2's MaskRCNNConvUpsampleHead, and of two-pass
area-ratio mask inference against one pass.

Training: forward + backward of ``head(x, instances)`` (the full training path: mask targets
from LVIS-style polygons, loss, logging) for both heads with the same convs, in the same run,
median of ``--repeats`` after a warm-up. Inference: mask pooling + mask head + pasting of the
class masks into the instances, on FPN features p2-p5 of one image with ``--detections``
boxes of random sizes, ``TEST_AREA_RATIO`` "one" vs "two_pass".

    .venv/bin/python benchmarks/mask_head_speed.py                      # LVIS-size head, CPU
    .venv/bin/python benchmarks/mask_head_speed.py --rois 64 --repeats 3  # quicker on 2 cores
"""

import argparse

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer for detectron2 0.6)

# isort: on
import numpy as np
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead, mask_rcnn_inference
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage
from timing import median_times

from lvis_longtail.modeling.mask_head import DiceBCEMaskHead
from lvis_longtail.modeling.mask_levels import AreaRatioROIPooler, two_pass_mask_logits


def _random_boxes(n, image_size, g, min_side=16):
    xy = torch.rand(n, 2, generator=g) * (image_size - min_side)
    wh = min_side + torch.rand(n, 2, generator=g) * (image_size - min_side - xy)
    return torch.cat([xy, xy + wh], dim=1)


def _proposals(num_rois, num_classes, image_size, device, g):
    """One image with ``num_rois`` positive proposals, each with an ellipse-like polygon GT
    inside a box near the proposal."""
    boxes = _random_boxes(num_rois, image_size, g)
    t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    polygons = []
    for x0, y0, x1, y1 in boxes.tolist():
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        polygons.append([np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).ravel()])
    inst = Instances((image_size, image_size))
    jitter = torch.randn(num_rois, 4, generator=g) * 4
    inst.proposal_boxes = Boxes((boxes + jitter).clamp(0, image_size).to(device))
    inst.gt_classes = torch.randint(0, num_classes, (num_rois,), generator=g).to(device)
    inst.gt_masks = PolygonMasks(polygons)
    return [inst]


def bench_training(args, device):
    shape = ShapeSpec(channels=args.channels, height=14, width=14)
    common = dict(num_classes=args.classes, conv_dims=[args.channels] * (args.num_conv + 1))
    torch.manual_seed(0)
    heads = {
        "detectron2": MaskRCNNConvUpsampleHead(shape, **common),
        "dicebce": DiceBCEMaskHead(shape, **common),
        "dicebce+boundary": DiceBCEMaskHead(shape, boundary_weight=1.0, **common),
    }
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rois, args.channels, 14, 14, generator=g).to(device)
    proposals = _proposals(args.rois, args.classes, 800, device, g)

    def step(head):
        losses = head(x, proposals)
        sum(losses.values()).backward()

    for head in heads.values():
        head.to(device).train()
    with EventStorage(0):
        fns = {name: (lambda head=head: step(head)) for name, head in heads.items()}
        return median_times(fns, args.repeats, device)


def bench_two_pass(args, device):
    torch.manual_seed(0)
    shape = ShapeSpec(channels=args.channels, height=14, width=14)
    conv_dims = [args.channels] * (args.num_conv + 1)
    head = DiceBCEMaskHead(shape, num_classes=args.classes, conv_dims=conv_dims).to(device)
    head.eval()
    pooler = AreaRatioROIPooler(14, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 0, "ROIAlignV2")
    h, w = 800, 1216
    feats = [torch.randn(1, args.channels, h // s, w // s, device=device) for s in (4, 8, 16, 32)]
    g = torch.Generator().manual_seed(1)
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(_random_boxes(args.detections, 800, g).to(device))
    inst.pred_classes = torch.randint(0, args.classes, (args.detections,), generator=g).to(device)
    changed_fraction = []

    @torch.no_grad()
    def one_pass():
        logits = head.predict_masks(pooler(feats, [inst.pred_boxes]), inst.pred_classes)
        mask_rcnn_inference(logits, [inst])

    @torch.no_grad()
    def two_pass():
        _, logits, changed = two_pass_mask_logits(
            pooler, feats, [inst.pred_boxes], inst.pred_classes, head.predict_masks
        )
        mask_rcnn_inference(logits, [inst])
        changed_fraction.append(changed.float().mean().item())

    times = median_times({"one": one_pass, "two_pass": two_pass}, args.repeats, device)
    return times["one"], times["two_pass"], changed_fraction[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rois", type=int, default=256, help="positive RoIs (training)")
    parser.add_argument("--classes", type=int, default=1203, help="K, class-specific masks")
    parser.add_argument("--channels", type=int, default=256, help="RoI feature / conv width")
    parser.add_argument("--num-conv", type=int, default=4)
    parser.add_argument("--detections", type=int, default=100, help="boxes (inference)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"device={device} threads={torch.get_num_threads()} rois={args.rois} K={args.classes} "
        f"C={args.channels} num_conv={args.num_conv} repeats={args.repeats} (median)"
    )
    train = bench_training(args, device)
    base = train["detectron2"]
    for name, seconds in train.items():
        print(f"train fwd+bwd {name:18s} {seconds * 1000:9.1f} ms  ratio {seconds / base:.3f}")
    one, two, changed = bench_two_pass(args, device)
    print(f"inference one pass   {one * 1000:9.1f} ms  ({args.detections} detections)")
    print(
        f"inference two_pass   {two * 1000:9.1f} ms  ratio {two / one:.3f} "
        f"({changed:.0%} of RoIs re-pooled)"
    )


if __name__ == "__main__":
    main()
