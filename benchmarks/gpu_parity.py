"""Device-vs-CPU parity of lvis_longtail's losses and ops (a section of gpu_check.py).

Each case runs forward and backward three times from the same initial state and inputs: on
the CPU in fp32 (the reference), on the device in fp32, and on the device under fp16 autocast
(its backward scaled by :data:`LOSS_SCALE`, as AMP training's GradScaler does).
Outputs and the gradients of a fixed random weighting of them (w.r.t. the float inputs and
every parameter) are compared with the reference: the error is ``max |a - b| / max |b|``.

- losses (every ``CLS_LOSS_REGISTRY`` entry at K = 1203, the mask losses) take fp16 logits
  under autocast, as the predictors give them; their reference gets the same fp16-rounded
  logits, so the fp32-math tolerance holds for the loss (a loss computing in fp16 fails it);
  the gradient, stored in fp16 like its logits, gets :data:`FP16_GRAD_TOL`;
- ops and heads (deformable RoI pooling, CARAFE, DCNv2, the class-gathered mask head) run
  their convolutions in fp16 under autocast: compared with the fp32 reference by relative L2
  error at :data:`AMP_TOL`;
- Soft-NMS: kept indices must be equal, decayed scores within the fp32 tolerance.

Sampling losses (GroupSoftmax's "others", the federated loss's classes) draw from the CPU and
the device RNGs, which differ: their sample sizes are set to take every candidate.
"""

import time
from dataclasses import dataclass
from typing import Callable, List

import torch
from cls_loss_speed import synthetic_labels, synthetic_stats
from detectron2.data import MetadataCatalog
from detectron2.layers import Conv2d, ModulatedDeformConv, ShapeSpec
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage
from torch import nn

from lvis_longtail.engine import setup_cfg
from lvis_longtail.layers.carafe import CARAFE
from lvis_longtail.layers.deform_roi_pool import DeformROIPooler
from lvis_longtail.modeling.cls_losses import CLS_LOSS_REGISTRY, build_cls_loss
from lvis_longtail.modeling.mask_head import DiceBCEMaskHead
from lvis_longtail.modeling.mask_losses import boundary_loss, dice_loss, weighted_bce_loss
from lvis_longtail.modeling.mask_targets import MaskTargets
from lvis_longtail.modeling.postprocessing import SoftNMSParams, batched_soft_nms

FP32_TOL = 1e-4
FP16_GRAD_TOL = 1e-3
LOSS_SCALE = 2.0**10
AMP_TOL = 3e-2  # relative L2 error of fp16 autocast on CUDA (fp32 accumulation)
CPU_AMP_TOL = 0.15  # the dry run's CPU fp16 kernels accumulate in fp16: paths, not figures
K = 1203
STATS_NAME = "gpu_check_lvis_stats"


@dataclass
class Case:
    """``build()`` -> a callable (module or function); ``inputs()`` -> [(tensor, grad?)];
    ``amp``: "inputs" (float inputs fp16 under autocast) or "autocast" (fp32 inputs)."""

    name: str
    build: Callable
    inputs: Callable
    amp: str = "autocast"


def _run(case: Case, device, amp: bool, round_inputs: bool = False):
    torch.manual_seed(0)
    fn = case.build()
    params = list(fn.parameters()) if isinstance(fn, nn.Module) else []
    if isinstance(fn, nn.Module):
        fn = fn.to(device)
        params = list(fn.parameters())
    leaves, args = [], []
    for tensor, grad in case.inputs():
        t = tensor.to(device)
        if t.is_floating_point() and (round_inputs or (amp and case.amp == "inputs")):
            t = t.half() if amp and case.amp == "inputs" else t.half().float()
        if grad:
            t.requires_grad_(True)
            leaves.append(t)
        args.append(t)
    start = time.perf_counter()
    with EventStorage(0), torch.autocast(device.type, torch.float16, enabled=amp):
        out = fn(*args)
    if isinstance(out, dict):
        outs = [out[k] for k in sorted(out)]
    else:
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
    floats = [o for o in outs if o.is_floating_point() and o.requires_grad]
    g = torch.Generator().manual_seed(1)
    total = sum((o.float() * torch.rand(o.shape, generator=g).to(device)).sum() for o in floats)
    wrt = leaves + [p for p in params if p.requires_grad]
    scale = LOSS_SCALE if amp else 1.0  # as AMP training's GradScaler: no fp16 underflow
    grads = torch.autograd.grad(total * scale, wrt, allow_unused=True) if floats else []
    grads = [None if x is None else x.float() / scale for x in grads]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return [o.detach().cpu() for o in outs], [x.cpu() for x in grads if x is not None], seconds


def _error(ours: List[torch.Tensor], ref: List[torch.Tensor], l2: bool = False) -> float:
    """The worst relative error over the tensors: ``max |a - b| / max |b|``, or with ``l2``
    ``||a - b|| / ||b||`` (fp16 autocast: many small roundings, a few large); integer
    tensors must be equal (error 1 otherwise)."""
    worst = 0.0
    if len(ours) != len(ref):
        return float("inf")
    for a, b in zip(ours, ref):
        if a.shape != b.shape:
            return float("inf")
        if not b.is_floating_point():
            worst = max(worst, float(not torch.equal(a, b)))
            continue
        if b.numel() == 0:
            continue
        a, b = a.double(), b.double()
        diff = (a - b).norm() / max(b.norm(), 1e-12) if l2 else (a - b).abs().max() / max(
            b.abs().max(), 1e-12)  # fmt: skip
        worst = max(worst, float(diff))
    return worst


def check(case: Case, device: torch.device) -> List[dict]:
    """The case's rows: device fp32 and device fp16 autocast, against the CPU in fp32."""
    cpu = torch.device("cpu")
    ref_out, ref_grad, _ = _run(case, cpu, amp=False)
    rows = []
    for amp in (False, True):
        out, grad, seconds = _run(case, device, amp)
        if amp and case.amp == "inputs":  # same fp16-rounded logits, fp32 math expected
            ref_out, ref_grad, _ = _run(case, cpu, amp=False, round_inputs=True)
        fp16_math = amp and case.amp == "autocast"
        tol = (AMP_TOL if device.type == "cuda" else CPU_AMP_TOL) if fp16_math else FP32_TOL
        # fp16 logits get fp16 gradients: their rounding (2^-11 relative) is allowed
        grad_tol = FP16_GRAD_TOL if amp and case.amp == "inputs" else tol
        err_out, err_grad = _error(out, ref_out, fp16_math), _error(grad, ref_grad, fp16_math)
        rows.append({
            "case": case.name, "mode": f"{device.type} {'fp16 autocast' if amp else 'fp32'}",
            "output_error": err_out, "grad_error": err_grad, "tolerance": tol,
            "grad_tolerance": grad_tol, "seconds": round(seconds, 4),
            "ok": bool(err_out <= tol and err_grad <= grad_tol),
        })  # fmt: skip
    return rows


def _cls_loss_cases(rois: int) -> List[Case]:
    g = torch.Generator().manual_seed(0)
    stats = synthetic_stats(K, g)
    MetadataCatalog.remove(STATS_NAME) if STATS_NAME in MetadataCatalog.list() else None
    MetadataCatalog.get(STATS_NAME).set(
        thing_classes=[f"c{k}" for k in range(K)],
        class_image_count=stats.image_count.tolist(),
        class_instance_count=stats.instance_count.tolist(),
        class_frequency=list(stats.frequency),
        num_annotated_images=stats.num_images,
    )
    labels = synthetic_labels(max(rois // 512, 1), min(rois, 512), stats, 0.25, g)
    cases = []
    for name, _ in sorted(CLS_LOSS_REGISTRY):
        cfg = setup_cfg(
            "configs/tiny/Base-MaskRCNN-Tiny.yaml",
            ["MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", name, "DATASETS.TRAIN", f"('{STATS_NAME}',)",
             "MODEL.ROI_HEADS.NUM_CLASSES", str(K), "MODEL.ROI_BOX_HEAD.FED_LOSS.NUM_CLASSES",
             str(K), "MODEL.ROI_BOX_HEAD.GROUP_SOFTMAX.OTHERS_SAMPLE_RATIO", "1e9"],
        )  # fmt: skip
        num_logits = build_cls_loss(cfg, K).num_logits
        logits = torch.randn(len(labels), num_logits, generator=g) * 2

        def build(cfg=cfg):
            return build_cls_loss(cfg, K).train()

        cases.append(Case(f"{name} (K={K})", build,
                          lambda x=logits: [(x, True), (labels, False)], amp="inputs"))  # fmt: skip
    return cases


def _mask_cases(rois: int, channels: int) -> List[Case]:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(rois, 28, 28, generator=g) * 3
    targets = torch.rand(rois, 28, 28, generator=g) > 0.6
    cases = [
        Case(name, lambda f=fn: f, lambda: [(logits, True), (targets, False)], amp="inputs")
        for name, fn in [
            ("dice_loss", dice_loss),
            ("weighted_bce_loss", lambda x, y: weighted_bce_loss(x, y, 10.0)),
            ("boundary_loss", boundary_loss),
        ]
    ]
    x = torch.randn(rois, channels, 14, 14, generator=g)
    classes = torch.randint(0, K, (rois,), generator=g)

    class GatheredHead(nn.Module):  # the mask branch's training path at K = 1203
        def __init__(self):
            super().__init__()
            self.head = DiceBCEMaskHead(
                ShapeSpec(channels=channels, height=14, width=14), num_classes=K,
                conv_dims=[channels] * 5, conv_norm="GN", boundary_weight=1.0,
            )  # fmt: skip
            nn.init.normal_(self.head.predictor.weight, std=0.1)  # gradients that matter

        def forward(self, feats, cls):
            outputs = self.head.train_outputs(feats, cls)
            return self.head.mask_losses(outputs, MaskTargets(targets, cls))

    cases.append(Case(f"DiceBCEMaskHead gathered (K={K})", GatheredHead,
                      lambda: [(x, True), (classes, False)]))  # fmt: skip
    return cases


def _op_cases(size: int, channels: int, rois: int) -> List[Case]:
    g = torch.Generator().manual_seed(3)
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    maps = [torch.randn(2, channels, int(size * s), int(size * s), generator=g) for s in scales]
    xy = torch.rand(rois, 2, generator=g) * size * 0.7
    boxes = torch.cat([xy, xy + 8 + torch.rand(rois, 2, generator=g) * size * 0.3], 1)

    class Pooler(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = DeformROIPooler(7, scales, 0, in_channels=channels, fc_dim=64)
            nn.init.normal_(self.pool.offset_fc[2].weight, std=0.05)

        def forward(self, b, *feats):
            half = b.shape[0] // 2
            return (self.pool(list(feats), [Boxes(b[:half]), Boxes(b[half:])]),)

    class DCNv2(nn.Module):  # detectron2's DeformBottleneckBlock conv2: offsets and mask
        def __init__(self):
            super().__init__()
            self.offset = Conv2d(channels, 27, 3, padding=1)
            nn.init.normal_(self.offset.weight, std=0.05)
            self.conv = ModulatedDeformConv(channels, channels, 3, padding=1, bias=False)

        def forward(self, x):
            o1, o2, mask = torch.chunk(self.offset(x), 3, dim=1)
            return (self.conv(x, torch.cat((o1, o2), dim=1), mask.sigmoid()),)

    def carafe():
        module = CARAFE(channels, 2, 64, 3, 5)
        nn.init.normal_(module.encoder.weight, std=0.1)
        return module

    feats = [(m, True) for m in maps]
    scores = torch.rand(rois * 8, generator=g)
    idxs = torch.randint(0, 20, (rois * 8,), generator=g)
    many = torch.cat([boxes] * 8) + torch.randn(rois * 8, 4, generator=g)

    def soft_nms(method):
        params = SoftNMSParams(method)
        return lambda b, s, i: batched_soft_nms(b, s, i, params)

    return [
        Case("DeformROIPooler", Pooler, lambda: [(boxes, False)] + feats),
        Case("CARAFE", carafe, lambda: [(maps[1], True)]),
        Case("DCNv2 (ModulatedDeformConv)", DCNv2, lambda: [(maps[1], True)]),
    ] + [
        Case(
            f"Soft-NMS {m}",
            lambda m=m: soft_nms(m),
            lambda: [(many, False), (scores, False), (idxs, False)],
        )  # fmt: skip
        for m in ("linear", "gaussian")
    ]


def cases(dry_run: bool) -> List[Case]:
    """Every case, at LVIS sizes (dry run: tiny sizes, same code)."""
    if dry_run:
        return _cls_loss_cases(64) + _mask_cases(4, 32) + _op_cases(64, 8, 6)
    return _cls_loss_cases(4096) + _mask_cases(128, 256) + _op_cases(800, 256, 512)


def describe(row: dict) -> str:
    if "error" in row:
        return f"{row['error']}  FAIL"
    text = f"out {row['output_error']:.1e} grad {row['grad_error']:.1e} "
    text += f"tol {row['tolerance']:.2g}/{row['grad_tolerance']:.2g}"
    return text + ("" if row["ok"] else "  FAIL")


def run(device: torch.device, dry_run: bool, log) -> List[dict]:
    rows = []
    for case in cases(dry_run):
        try:
            case_rows = check(case, device)
        except Exception as e:  # a broken case is a result, not the end of the check
            case_rows = [{"case": case.name, "mode": device.type, "ok": False,
                          "error": f"{type(e).__name__}: {e}"}]  # fmt: skip
        for r in case_rows:
            log(f"parity {r['case']:<40} {r['mode']:<18} {describe(r)}")
        rows += case_rows
    return rows
