"""Speed of the architecture ops against what they replace, forward + backward, side by side
in one run (median of ``--repeats``, calls interleaved so drifting load hits both alike):

* a ResNet stage (detectron2 bottleneck blocks) with DCNv2 in every block vs plain 3x3 convs;
* deformable RoI pooling (``DeformROIPooler``: ROIAlignV2 + offset FC + shifted bins) vs
  detectron2's ROIAlignV2 ``ROIPooler`` (torchvision ``roi_align``), on 4 FPN levels;
* CARAFE vs nearest 2x upsampling of one FPN level.

Bar: deformable RoI pooling <= 3x ROIAlignV2. Runs on CPU, and on CUDA when available.

    .venv/bin/python benchmarks/ops_speed.py            # 800x1216 images, 2 per batch
    .venv/bin/python benchmarks/ops_speed.py --quick    # smaller inputs (a few seconds)
    .venv/bin/python benchmarks/ops_speed.py --json out.json
"""

import argparse
import os

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer, DCN through torchvision)

# isort: on
import torch
from detectron2.modeling.backbone.resnet import BottleneckBlock, DeformBottleneckBlock, ResNet
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from timing import median_times
from torch.nn import functional as F

from lvis_longtail.layers.carafe import CARAFE
from lvis_longtail.layers.deform_roi_pool import DeformROIPooler
from lvis_longtail.utils.io import write_json_atomic


def fwd_bwd(module, *inputs):
    def run():
        for t in inputs:
            t.grad = None
        module.zero_grad(set_to_none=True)
        out = module(*inputs)
        out.square().mean().backward()

    return run


def stage_pair(args, device):
    """res4-like stage: 6 bottleneck blocks 512 -> 1024 (256 bottleneck), stride 16 input."""
    h, w = args.height // 16, args.width // 16
    kw = dict(in_channels=512, bottleneck_channels=256, out_channels=1024, norm="BN")
    plain = torch.nn.Sequential(*ResNet.make_stage(BottleneckBlock, args.blocks, **kw))
    deform = torch.nn.Sequential(
        *ResNet.make_stage(DeformBottleneckBlock, args.blocks, deform_modulated=True, **kw)
    )
    x = torch.randn(args.images, 512, h, w, device=device, requires_grad=True)
    return {"ResNet stage, plain 3x3 conv": fwd_bwd(plain.to(device), x),
            "ResNet stage, DCNv2": fwd_bwd(deform.to(device), x)}  # fmt: skip


def pooler_pair(args, device):
    g = torch.Generator().manual_seed(0)
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    feats = [torch.randn(args.images, 256, int(args.height * s), int(args.width * s),
                         generator=g).to(device).requires_grad_() for s in scales]  # fmt: skip
    boxes = []
    for _ in range(args.images):
        xy = torch.rand(args.rois, 2, generator=g) * torch.tensor([args.width, args.height]) * 0.8
        wh = torch.rand(args.rois, 2, generator=g) ** 2 * torch.tensor([args.width, args.height])
        boxes.append(Boxes(torch.cat([xy, xy + wh * 0.5 + 8], 1).to(device)))
    common = dict(output_size=7, scales=scales, sampling_ratio=0)
    plain = ROIPooler(pooler_type="ROIAlignV2", **common).to(device)
    deform = DeformROIPooler(in_channels=256, fc_dim=1024, **common).to(device)
    torch.nn.init.normal_(deform.offset_fc[2].weight, std=1e-3)  # deformed bins, as trained

    def run(pooler):
        def fn():
            for f in feats:
                f.grad = None
            pooler.zero_grad(set_to_none=True)
            pooler(feats, boxes).square().mean().backward()

        return fn

    return {"roi_align (ROIAlignV2 pooler)": run(plain),
            "deformable RoI pooling": run(deform)}  # fmt: skip


def upsample_pair(args, device):
    x = torch.randn(args.images, 256, args.height // 8, args.width // 8, device=device,
                    requires_grad=True)  # fmt: skip
    carafe = CARAFE(256).to(device)

    class Nearest(torch.nn.Module):
        def forward(self, t):
            return F.interpolate(t, scale_factor=2.0, mode="nearest")

    return {"nearest 2x upsampling": fwd_bwd(Nearest(), x),
            "CARAFE 2x upsampling": fwd_bwd(carafe, x)}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--rois", type=int, default=512, help="RoIs per image")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.height, args.width, args.rois, args.blocks, args.repeats = 256, 384, 128, 2, 3
    results = {}
    for name in args.devices.split(","):
        if name == "cuda" and not torch.cuda.is_available():
            continue
        device = torch.device(name)
        label = torch.cuda.get_device_name() if name == "cuda" else f"CPU ({os.cpu_count()} cores)"
        print(f"\n## {label}, torch {torch.__version__}, {args.images} images "
              f"{args.height}x{args.width}, {args.rois} RoIs/image, fp32, forward + backward, "
              f"median of {args.repeats}")  # fmt: skip
        if name == "cpu":
            print(f"load average before: {os.getloadavg()}")
        print("| op | ms | ratio |\n|---|---:|---:|")
        rows = {}
        for pair in (stage_pair, pooler_pair, upsample_pair):
            times = {
                k: v * 1e3
                for k, v in median_times(pair(args, device), args.repeats, device).items()
            }
            (ref, t_ref), (ours, t_ours) = times.items()
            print(f"| {ref} | {t_ref:.1f} | 1.00x |\n| {ours} | {t_ours:.1f} | "
                  f"{t_ours / t_ref:.2f}x |")  # fmt: skip
            rows[ours] = {"ms": t_ours, "reference": ref, "reference_ms": t_ref,
                          "ratio": t_ours / t_ref}  # fmt: skip
        ratio = rows["deformable RoI pooling"]["ratio"]
        print(f"bar deformable RoI pooling <= 3x roi_align: {'PASS' if ratio <= 3 else 'FAIL'} "
              f"({ratio:.2f}x)")  # fmt: skip
        if name == "cpu":
            print(f"load average after: {os.getloadavg()}")
        results[label] = rows
    if args.json:
        write_json_atomic(results, args.json)


if __name__ == "__main__":
    main()
