"""The rows of the long-tail benchmark: one :class:`Method` per line of :data:`METHODS`.

Adding a row is one line: a short name, a label, a config file under ``configs/`` and, if
needed, ``KEY VALUE`` overrides (and a line in :data:`NOTES` saying what its difference shows).
A row trains its config from the shared pre-trained initialisation (``longtail.py``), unless
it names a ``base``: then it fine-tunes that row's ``model_final.pth`` of the same seed
(``length`` x the schedule), or with ``eval_only`` only evaluates it with its own overrides
(test-time methods). A row without a base can run a longer schedule (``schedule`` x the mode's
iterations, e.g. the augmentation recipes, which only pay off after several epochs). Each row
is compared with its ``reference``: by default its base, else the SoftmaxCE row with the same
sampler (RFS or not), so the paired difference isolates what the row changes.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

BASELINE = "softmax"
SOFTMAX = "tiny/mask_rcnn_R18_FPN_tiny_softmax.yaml"
NO_RFS = ("DATALOADER.SAMPLER_TRAIN", "TrainingSampler")


@dataclass(frozen=True)
class Method:
    """One benchmark row (see the module docstring).

    ``rfs``: the row uses repeat-factor sampling (it gets ``--repeat-threshold``); False also
    selects detectron2's ``TrainingSampler`` unless ``opts`` sets a sampler. ``length``: a
    fine-tune's length as a fraction of the schedule. ``group``: "cls", "mask" or "test" (which
    table of the page). ``diagnostic``: run only when named in ``--methods``. ``fresh``:
    prefixes of the shared initialisation that the row's model does not have (another neck
    than the pre-trained FPN): those layers start from scratch, the rest loads as usual.
    """

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

    def __post_init__(self):
        if len(self.opts) % 2:
            raise ValueError(f"method {self.name!r}: opts must be KEY VALUE pairs: {self.opts}")
        if self.eval_only and not self.base:
            raise ValueError(f"method {self.name!r}: eval_only needs a base row")
        if self.schedule != 1.0 and (self.base or self.schedule <= 0):
            raise ValueError(
                f"method {self.name!r}: schedule must be > 0 and only on rows without a base"
            )

    @property
    def reference(self) -> Optional[str]:
        if self.ref is not None:
            return self.ref
        if self.base:
            return self.base
        default = "softmax_rfs" if self.rfs else BASELINE
        return None if default == self.name else default

    @property
    def kind(self) -> str:
        return "eval" if self.eval_only else ("finetune" if self.base else "train")


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
    # diagnostics (only when named in --methods)
    Method("bags_long", "GroupSoftmax, fine-tune as long as the training", _tiny("bags"),
           base="softmax_rfs", length=1.0, diagnostic=True),
)
# fmt: on

# What each row's paired difference shows, and what it cannot show (the results page lists
# these under the tables; a new row may add one line here).
NOTES = {
    "softmax": "the reference level: how far a plain softmax detector is from its frequent "
    "classes on its rare ones (APf - APr).",
    "softmax_rfs": "what repeat-factor sampling alone does at this schedule; not what it does "
    "at LVIS scale, where t = 0.001 targets a different share of the images.",
    "sigmoid": "the effect of independent sigmoid logits over softmax, with the same sampler; "
    "the prior-initialised bias also changes early convergence, which a short schedule shows "
    "as a gain on every group.",
    "seesaw": "Seesaw + the normalised classifier together against softmax + RFS; cannot "
    "separate the two.",
    "eql": "EQL's rare-class gradient suppression (λ 0.13 tuned to this split's frequency), "
    "with RFS; not its LVIS λ.",
    "eqlv2": "EQLv2 without RFS against softmax without RFS (the authors' recipe).",
    "fedloss": "the federated loss's sampled negatives, with RFS.",
    "bags": "a decoupled group-softmax classifier fine-tuned on frozen SoftmaxCE + RFS "
    "features of the same seed; it cannot fix those features.",
    "dicebce": "the balanced (Dice + BCE) mask loss against the stock mask head: segm and "
    "segm thin; box changes come only through the shared backbone.",
    "dicebce_arealevel": "adds area-ratio RoI level assignment to the balanced mask loss; "
    "compare it with the DiceBCE row for the assignment alone.",
    "heavymask": "the LVIS 2020 1st place's mask recipe as a whole (balanced loss, area-ratio "
    "levels, boundary supervision, 7 convs); not which part helps, nor deformable pooling.",
    "maskscoring": "mask-IoU rescoring of masks: segm only (boxes keep their scores).",
    "bags_long": "BAGS with a fine-tune as long as the training (diagnostic of the schedule).",
    "cascade": "the 3-stage cascade against single-stage Mask R-CNN, both Seesaw + RFS.",
    "htc_lite": "HTC-Lite (context encoding, one last-stage mask head) against the cascade.",
    "htc_lite_noctx": "HTC-Lite without its context branch against HTC-Lite: the context alone.",
    "balanced_softmax": "the log-prior offset of Balanced Softmax against softmax, no RFS.",
    "logit_adjustment": "logit-adjusted CE against softmax, no RFS.",
    "ecm": "the effective class-margin loss with the reference's cosine classifier (scale 20) "
    "and gradient clip, with RFS, at a schedule far shorter than the reference's "
    "10,000-iteration warm-up; not the loss alone (the classifier differs from the reference "
    "row's).",
    "norcal": "post-hoc NorCal (default gamma) on the SoftmaxCE model of the same seed; gamma "
    "is not tuned here (use norcal_sweep).",
    "tta": "the 1st-place test-time augmentation on the SoftmaxCE + RFS model of the same seed.",
    "seesaw_4x": "what 4x the schedule does to plain Seesaw: whether the 1x rows are still "
    "learning (the recipes below are compared at 4x).",
    "recipe_mmdet2020": "the MMDet entry's augmentation recipe against plain Seesaw, both at 4x "
    "the schedule (5 epochs here against the entry's 45 on LVIS): not its InstaBoost package "
    "(the project's InstaBoost-style step), not SyncBN or the other network changes.",
    "eql_4x": "what 4x the schedule does to plain EQL.",
    "recipe_1st2020": "the 1st place's stage-1 augmentation recipe against plain EQL, both at 4x "
    "the schedule.",
    "softmax_rfs_4x": "what 4x the schedule does to SoftmaxCE + RFS.",
    "copypaste_lsj": "copy-paste + LSJ against SoftmaxCE + RFS, both at 4x the schedule.",
    "dualhead": "a second classification branch (copied FC tower, softmax CE) fine-tuned with "
    "RFS for as long as the training on the frozen Seesaw model of the same seed, scores "
    "averaged with the trained branch's; its base trained with RFS already (the entry's "
    "trained without), so it shows what the extra branch adds, not the sampler switch.",
    "fpg128": "FPG's grid (9 bottom-up pathways, 128 channels, outputs at the heads' 64) in "
    "place of the FPN; the grid starts from scratch while the FPN row's neck starts from the "
    "pre-training, so at this schedule the difference mixes the neck with its initialisation.",
}


def methods_by_name(methods: Sequence[Method] = METHODS) -> dict:
    """``{name: Method}``; rejects duplicate names and unknown bases or references."""
    out = {}
    for m in methods:
        if m.name in out:
            raise ValueError(f"duplicate benchmark method name {m.name!r}")
        out[m.name] = m
    for m in methods:
        for dep in (m.base, m.reference):
            if dep and dep not in out:
                raise ValueError(f"method {m.name!r} refers to unknown method {dep!r}")
    return out


def default_methods(methods: Sequence[Method] = METHODS) -> Tuple[str, ...]:
    """Every row but the diagnostics: the GPU mode's default and ``--methods all``."""
    return tuple(m.name for m in methods if not m.diagnostic)


# The CPU and quick modes' default rows: what 3 seeds fit in the CPU mode's 60 minutes on 2
# cores (benchmarks/results/longtail_calibration.md): the two reference rows every other row is
# paired against (SoftmaxCE without and with RFS) and Seesaw.
CPU_ROWS: Tuple[str, ...] = ("softmax", "softmax_rfs", "seesaw")


def schedule_opts(iters: int, finetune: bool = False, length: float = 1 / 3) -> List[str]:
    """Solver overrides of ``iters`` iterations in the tiny base schedule's proportions (warmup
    10 %, LR steps at 70 % and 90 %); a fine-tune runs ``length * iters`` (at least 10)."""
    if finetune:
        iters = max(10, round(iters * length))
    steps = (round(0.7 * iters), round(0.9 * iters))
    return [
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.WARMUP_ITERS", str(max(1, round(0.1 * iters))),
        "SOLVER.STEPS", f"({steps[0]}, {steps[1]})",
        "SOLVER.CHECKPOINT_PERIOD", str(10 * iters),
    ]  # fmt: skip
