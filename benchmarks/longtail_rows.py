"""The rows of the long-tail benchmark (``longtail.py``): one :class:`Method` per line of
:data:`METHODS` (and a line of ``longtail_page.md`` saying what its paired difference shows).

A row trains its config (``configs/``, with ``KEY VALUE`` overrides) from the shared
initialisation for ``schedule`` x the mode's iterations, or fine-tunes its ``base`` row's model
of the same seed for ``length`` x them, or (``eval_only``) evaluates that model with its own
overrides. ``rfs``: repeat-factor sampling, else detectron2's ``TrainingSampler`` unless ``opts``
set one. ``group``: the page's table. ``diagnostic``: run only when named. ``fresh``: prefixes of
the initialisation its model lacks. ``reference``: its base, else SoftmaxCE with its sampler.
``pretrain``: a config (with ``pretrain_opts``) pre-trained for this row alone, by the shared
pre-training's protocol, for a model that cannot start from the shared backbone + FPN.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

BASELINE = "softmax"
SOFTMAX = "tiny/mask_rcnn_R18_FPN_tiny_softmax.yaml"
NO_RFS = ("DATALOADER.SAMPLER_TRAIN", "TrainingSampler")
ENTRY = "tiny/htc_lite_R18_FPG_tiny_mmdet2020_entry.yaml"


@dataclass(frozen=True)
class Method:
    """One benchmark row (see the module docstring)."""

    name: str
    label: str
    config: str
    opts: Sequence[str] = ()
    rfs: bool = True
    base: Optional[str] = None
    eval_only: bool = False
    length: float = 1 / 3
    schedule: float = 1.0
    group: str = "cls"
    ref: Optional[str] = None
    diagnostic: bool = False
    fresh: Tuple[str, ...] = ()
    pretrain: Optional[str] = None
    pretrain_opts: Sequence[str] = ()

    def __post_init__(self):
        if len(self.opts) % 2 or len(self.pretrain_opts) % 2 or (self.eval_only and not self.base):
            raise ValueError(f"row {self.name!r}: opts are KEY VALUE pairs; eval_only needs a base")
        if self.pretrain and self.base:
            raise ValueError(f"row {self.name!r}: a fine-tune starts from its base model")
        if self.schedule != 1.0 and (self.base or self.schedule <= 0):
            raise ValueError(f"row {self.name!r}: schedule > 0 only on rows without a base")

    @property
    def reference(self) -> Optional[str]:
        default = self.base or ("softmax_rfs" if self.rfs else BASELINE)
        return self.ref or (None if default == self.name else default)


def _tiny(leaf: str) -> str:
    return f"tiny/mask_rcnn_R18_FPN_tiny_{leaf}.yaml"


# fmt: off
METHODS: Tuple[Method, ...] = (
    Method("softmax", "SoftmaxCE (no RFS)", SOFTMAX, NO_RFS, rfs=False),
    Method("softmax_rfs", "SoftmaxCE + RFS", SOFTMAX, ref=BASELINE),
    Method("sigmoid", "SigmoidCE + RFS", _tiny("sigmoid")),
    Method("seesaw", "Seesaw + NormedLinear + RFS", _tiny("seesaw")),
    Method("eql", "EQL (λ 0.13) + RFS", _tiny("eql")),
    Method("eqlv2", "EQLv2 (no RFS)", _tiny("eqlv2"), NO_RFS, rfs=False),
    Method("fedloss", "FederatedLoss + RFS", _tiny("fedloss")),
    Method("bags", "GroupSoftmax (fine-tune of SoftmaxCE + RFS)", _tiny("bags"), base="softmax_rfs"),  # noqa: E501
    Method("dicebce", "DiceBCEMaskHead + RFS", _tiny("dicebce"), group="mask"),
    Method("dicebce_arealevel", "DiceBCE + area_ratio levels + RFS", _tiny("dicebce_arealevel"), group="mask"),  # noqa: E501
    Method("heavymask", "Heavy mask head + RFS", _tiny("heavymask"), group="mask"),
    Method("maskscoring", "Mask scoring + RFS", _tiny("maskscoring"), group="mask"),
    # Rows outside CPU_ROWS: the GPU mode's default; on CPU, name them (or "all") in --methods.
    Method("cascade", "Cascade + Seesaw + RFS", "tiny/cascade_mask_rcnn_R18_FPN_tiny_seesaw.yaml",
           ref="seesaw", group="mask"),
    Method("htc_lite", "HTC-Lite + Seesaw + RFS", "tiny/htc_lite_R18_FPN_tiny_seesaw.yaml",
           ref="cascade", group="mask"),
    Method("htc_lite_noctx", "HTC-Lite without context + Seesaw + RFS",
           "tiny/htc_lite_R18_FPN_tiny_seesaw_noctx.yaml", ref="htc_lite", group="mask"),
    Method("balanced_softmax", "Balanced Softmax (no RFS)", _tiny("balanced_softmax"), NO_RFS,
           rfs=False),
    Method("logit_adjustment", "Logit-adjusted CE (no RFS)", _tiny("logit_adjustment"), NO_RFS,
           rfs=False),
    Method("ecm", "ECM loss + RFS", _tiny("ecm")),
    Method("norcal", "NorCal on SoftmaxCE (no RFS), post-hoc", _tiny("softmax_norcal"), NO_RFS,
           rfs=False, base="softmax", eval_only=True, group="test"),
    Method("tta", "SoftmaxCE + RFS with the 1st-place TTA", _tiny("tta"), base="softmax_rfs",
           eval_only=True, group="test"),
    # The augmentation recipes at 4x the schedule (CPU: 1000 iterations, 5 epochs of the
    # 800-image split), each against its recipe's plain row at the same schedule.
    Method("seesaw_4x", "Seesaw + NormedLinear + RFS, 4× schedule", _tiny("seesaw"),
           schedule=4.0, ref="seesaw"),
    Method("recipe_mmdet2020", "MMDet 2020 recipe (Seesaw, jitter + crop, InstaBoost-style), 4×",
           _tiny("mmdet2020"), schedule=4.0, ref="seesaw_4x"),
    Method("eql_4x", "EQL (λ 0.13) + RFS, 4× schedule", _tiny("eql"), schedule=4.0, ref="eql"),
    Method("recipe_1st2020", "1st place stage 1 (EQL, mosaic, rotation, jitter), 4×",
           _tiny("1st2020_stage1"), schedule=4.0, ref="eql_4x"),
    Method("softmax_rfs_4x", "SoftmaxCE + RFS, 4× schedule", SOFTMAX, schedule=4.0,
           ref="softmax_rfs"),
    Method("copypaste_lsj", "Copy-paste + LSJ + RFS, 4×", _tiny("copypaste_lsj"), schedule=4.0,
           ref="softmax_rfs_4x"),
    # The MMDet entry's parts on the tiny Seesaw model.
    Method("dualhead", "Dual head fine-tune of Seesaw + RFS (1x)", _tiny("seesaw_dualhead"),
           base="seesaw", length=1.0),
    Method("fpg128", "FPG, 9 pathways × 128 ch + Seesaw + RFS",
           "tiny/mask_rcnn_R18_FPG128_tiny_seesaw.yaml", ref="seesaw", group="mask",
           fresh=("backbone.fpn_",)),
    Method("tsd", "TSD (no classification constraint) + Seesaw + RFS", _tiny("seesaw"),
           ("MODEL.ROI_BOX_HEAD.TSD.ENABLED", "True", "MODEL.ROI_BOX_HEAD.TSD.PC_CLS", "False"),
           ref="seesaw"),
    # The whole tiny entry (timm ResNet-18 + DCNv2, FPG, HTC-Lite, TSD, Mask Scoring, the 2020
    # augmentation, Seesaw; random sampler) from its own pre-training: its backbone and neck have
    # no counterpart in the shared one. Pre-trained like the shared initialisation: SoftmaxCE with
    # a linear classifier and the plain input pipeline on the balanced split.
    Method("mmdet2020_entry", "Tiny MMDet 2020 entry (own pre-training)", ENTRY, NO_RFS,
           rfs=False, ref="seesaw", group="mask", pretrain=ENTRY, pretrain_opts=(
               "MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "SoftmaxCE",
               "MODEL.ROI_BOX_HEAD.PREDICTOR_TYPE", "Linear",
               "INPUT.AUGMENTATIONS", "['ResizeShortestEdge', 'RandomFlip']")),
    # diagnostics (only when named in --methods)
    Method("bags_long", "GroupSoftmax, fine-tune as long as the training", _tiny("bags"),
           base="softmax_rfs", length=1.0, diagnostic=True),
)
# fmt: on


def methods_by_name(methods: Sequence[Method] = METHODS) -> dict:
    """``{name: Method}``; rejects duplicate names and unknown bases or references."""
    out = {m.name: m for m in methods}
    for m in methods:
        if len(out) < len(methods) or {m.base, m.reference} - {None} - set(out):
            raise ValueError(f"row {m.name!r}: a name twice, or an unknown base or reference")
    return out


def default_methods(methods: Sequence[Method] = METHODS) -> Tuple[str, ...]:
    """Every row but the diagnostics: the GPU mode's default and ``--methods all``."""
    return tuple(m.name for m in methods if not m.diagnostic)


# The CPU and quick modes' rows: the two references and Seesaw (results/longtail_calibration.md)
CPU_ROWS: Tuple[str, ...] = ("softmax", "softmax_rfs", "seesaw")


def schedule_opts(iters: int, finetune: bool = False, length: float = 1 / 3) -> List[str]:
    """Solver overrides of ``iters`` iterations in the tiny base schedule's proportions (warmup
    10 %, LR steps at 70 % and 90 %); a fine-tune runs ``length * iters`` (at least 10)."""
    if finetune:
        iters = max(10, round(iters * length))
    return [
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.WARMUP_ITERS", str(max(1, round(0.1 * iters))),
        "SOLVER.STEPS", f"({round(0.7 * iters)}, {round(0.9 * iters)})",
        "SOLVER.CHECKPOINT_PERIOD", str(10 * iters),
    ]  # fmt: skip
