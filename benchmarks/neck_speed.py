"""Speed of the FPG neck against detectron2's FPN, forward + backward, side by side in one run
(median of ``--repeats``, calls interleaved so drifting load hits all alike), on ResNet-50's
C2..C5 for one image: FPN (256 channels, no norm, as the LVIS base config), FPG 9@256 and
FPG 9@128 (BN, as mmdetection's configs/fpg), and with ``--enhanced`` FPG 9@128 with DCNv2
after upsampling and content-aware downsampling. Also prints each neck's parameters and
multiply-accumulates (fvcore's count of one forward; it counts no deformable convolution or
reassembly, so the enhanced grid's is a lower bound). Runs on CPU, and on CUDA when available.

    .venv/bin/python benchmarks/neck_speed.py                  # 512x512, 5 repeats
    .venv/bin/python benchmarks/neck_speed.py --size 800 1216 --repeats 3
    .venv/bin/python benchmarks/neck_speed.py --json out.json
"""

import argparse
import os

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer, DCN through torchvision)

# isort: on
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from fvcore.nn import FlopCountAnalysis
from timing import median_times

from lvis_longtail.modeling.fpg import FPG
from lvis_longtail.utils.io import write_json_atomic

CHANNELS = (256, 512, 1024, 2048)  # ResNet-50's res2..res5
FEATURES = ["res2", "res3", "res4", "res5"]


class Features(Backbone):
    """A bottom-up stand-in returning fixed C2..C5, so only the neck is timed."""

    def __init__(self, feats):
        super().__init__()
        self.feats = feats

    def output_shape(self):
        return {f: ShapeSpec(channels=c, stride=2 ** (i + 2))
                for i, (f, c) in enumerate(zip(FEATURES, CHANNELS))}  # fmt: skip

    def forward(self, x):
        return dict(zip(FEATURES, self.feats))


def necks(feats, enhanced: bool) -> dict:
    out = {
        "FPN 256": FPN(Features(feats), FEATURES, 256, norm="", top_block=LastLevelMaxPool()),
        "FPG 9@256": FPG(Features(feats), FEATURES, 256, 256, 9, "BN"),
        "FPG 9@128": FPG(Features(feats), FEATURES, 128, 128, 9, "BN"),
    }
    if enhanced:
        out["FPG 9@128 enhanced"] = FPG(Features(feats), FEATURES, 128, 128, 9, "BN",
                                        deform_upsample=True, carafe_down=(64, 3, 3))  # fmt: skip
    return out


def fwd_bwd(neck, image):
    def run():
        neck.zero_grad(set_to_none=True)
        sum(o.square().mean() for o in neck(image).values()).backward()

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=(512, 512), help="image height width")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--enhanced", action="store_true", help="also FPG with DCNv2 and CARAFE down")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {}
    for device in devices:
        torch.manual_seed(0)
        h, w = args.size
        feats = [torch.randn(1, c, h // 2 ** (i + 2), w // 2 ** (i + 2), device=device)
                 for i, c in enumerate(CHANNELS)]  # fmt: skip
        image = torch.zeros(1, 3, h, w, device=device)
        models = {k: m.to(device).train() for k, m in necks(feats, args.enhanced).items()}
        times = median_times(
            {k: fwd_bwd(m, image) for k, m in models.items()}, args.repeats, device
        )
        base = times["FPN 256"]
        print(f"{device}, 1 image {h}x{w}, torch threads {torch.get_num_threads()}, "
              f"median of {args.repeats}:")  # fmt: skip
        for name, model in models.items():
            with torch.no_grad():
                macs = FlopCountAnalysis(model.eval(), image).unsupported_ops_warnings(False)
                macs = macs.uncalled_modules_warnings(False).total() / 1e9
            params = sum(p.numel() for n, p in model.named_parameters()) / 1e6
            results[f"{device}/{name}"] = {
                "ms": 1e3 * times[name],
                "gmacs": macs,
                "mparams": params,
            }
            print(f"  {name:20s} fwd+bwd {1e3 * times[name]:8.1f} ms  x{times[name] / base:5.2f}"
                  f"   {macs:6.1f} GMACs  {params:5.1f} M params")  # fmt: skip
    if args.json:
        write_json_atomic(results, os.path.abspath(args.json))


if __name__ == "__main__":
    main()
