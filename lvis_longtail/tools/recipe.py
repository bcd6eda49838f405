"""One command per LVIS 2020 entry: every stage, its inputs wired from the stage before.

    python -m lvis_longtail.tools.recipe lvis2020_1st --quick      # synthetic set, CPU
    python -m lvis_longtail.tools.recipe lvis2020_1st --num-gpus 8  # LVIS v1
    python -m lvis_longtail.tools.recipe lvis2020_mmdet --quick --dry-run

``lvis2020_1st`` (Tan et al., arXiv 2009.01559): stage 1 (EQL, RFS, mosaic, rotation, scale
jitter) -> pseudo labels of the training set and of unannotated extra images -> stage 1
again with ignore regions and the pseudo-labelled images -> stage 2 fine-tune -> TTA
evaluation and test-dev export. ``lvis2020_mmdet`` (Wang et al., arXiv 2008.10032): the
entry's model -> dual-head fine-tune -> TTA evaluation and export. Each stage is a
subprocess with its own folder under ``--output``; a rerun skips complete stages and resumes
an interrupted one (:mod:`lvis_longtail.tools.recipe_runner`). ``--quick`` runs the tiny
configs with short schedules on the synthetic set (generated under ``--data-root`` if
missing). docs/recipes.md describes each stage.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from lvis_longtail.tools.recipe_runner import Stage, StageFailed, run_stages, summary_lines
from lvis_longtail.utils.io import write_json_atomic

REPO = Path(__file__).resolve().parents[2]


def _schedule(iters: int, warmup: int = 50) -> Tuple[str, ...]:
    """KEY VALUE options of a short schedule: LR steps at 75% and 92% of ``iters``."""
    steps = (int(iters * 0.75), int(iters * 0.92))
    return ("SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(steps),
            "SOLVER.WARMUP_ITERS", str(warmup), "SOLVER.CHECKPOINT_PERIOD", str(iters // 2))  # fmt: skip  # noqa: E501


# Each stage's config and extra KEY VALUE options, per (pipeline, quick). --quick shortens
# the stage-1 runs and the entry's model to 200 iterations, the dual-head fine-tune to 100
# (stage 2 keeps its 100) and the entry's TTA to flip x 2 scales (its leaf: 3).
CONFIGS: Dict[Tuple[str, bool], Dict[str, Tuple[str, Tuple[str, ...]]]] = {
    ("lvis2020_1st", False): {
        "stage1": ("configs/LVISv1/mask_rcnn_R50_FPN_1st2020_stage1.yaml", ()),
        "selftrain": ("configs/LVISv1/mask_rcnn_R50_FPN_1st2020_stage1_selftrain.yaml", ()),
        "stage2": ("configs/LVISv1/mask_rcnn_R50_FPN_1st2020_stage2.yaml", ()),
        "tta": ("configs/LVISv1/mask_rcnn_R50_FPN_1st2020_tta.yaml", ()),
    },
    ("lvis2020_1st", True): {
        "stage1": ("configs/tiny/mask_rcnn_R18_FPN_tiny_1st2020_stage1.yaml", _schedule(200)),
        "selftrain": (
            "configs/tiny/mask_rcnn_R18_FPN_tiny_1st2020_stage1_selftrain.yaml",
            _schedule(200),
        ),
        "stage2": ("configs/tiny/mask_rcnn_R18_FPN_tiny_1st2020_stage2.yaml", ()),
        "tta": ("configs/tiny/mask_rcnn_R18_FPN_tiny_1st2020_tta.yaml", ()),
    },
    ("lvis2020_mmdet", False): {
        "model": ("configs/LVISv1/htc_lite_ResNeSt200_DCNv2_FPG_2x_mmdet2020_entry.yaml", ()),
        "dualhead": (
            "configs/LVISv1/htc_lite_ResNeSt200_DCNv2_FPG_2x_mmdet2020_entry_dualhead.yaml",
            (),
        ),
        "tta": ("configs/LVISv1/htc_lite_ResNeSt200_DCNv2_FPG_2x_mmdet2020_entry_tta.yaml", ()),
    },
    ("lvis2020_mmdet", True): {
        "model": ("configs/tiny/htc_lite_R18_FPG_tiny_mmdet2020_entry.yaml", _schedule(200)),
        "dualhead": (
            "configs/tiny/htc_lite_R18_FPG_tiny_mmdet2020_entry_dualhead.yaml",
            _schedule(100, 10),
        ),
        "tta": (
            "configs/tiny/htc_lite_R18_FPG_tiny_mmdet2020_entry_tta.yaml",
            ("TEST.AUG.SCALES", "((128, 192), (160, 240))"),
        ),
    },
}
PIPELINES = ("lvis2020_1st", "lvis2020_mmdet")

# Datasets: (train, val, test-dev, unannotated extra images, images in each for the ETA)
LVIS = {"train": "lvis_v1_train", "val": "lvis_v1_val", "test": "lvis_v1_test_dev",
        "extra": "recipe_extra_images", "sizes": (100170, 19809, 19822, 100000)}  # fmt: skip
SYNTHETIC = {"train": "lt_synthetic_train", "val": "lt_synthetic_val",
             "test": "lt_synthetic_test_dev", "extra": "lt_synthetic_unlabeled",
             "sizes": (800, 150, 50, 200)}  # fmt: skip
NUM_UNLABELED = 200  # synthetic extra images the quick pipeline generates
EXTRA_PSEUDO = "recipe_extra_pseudo"  # the dataset name of the pseudo-labelled extra images

# Seconds per training iteration / per test image on one device (2 CPU cores with --quick,
# one GPU otherwise) of the 1st place's Mask R-CNN ("mask") and the MMDet entry ("entry");
# the ETA rescales them by the speed the finished stages showed.
SPEED = {True: {"mask": 0.5, "entry": 2.6, "infer": 0.15, "tta": 1.0, "tta_entry": 2.5,
                "start": 20.0},
         False: {"mask": 2.4, "entry": 9.0, "infer": 0.15, "tta": 3.0, "tta_entry": 6.0,
                 "start": 60.0}}  # fmt: skip


def _names(*names: str) -> str:
    """A tuple of dataset names as a config value (double quotes: readable on a shell line)."""
    return "(" + ", ".join(json.dumps(n) for n in names) + ("," if len(names) == 1 else "") + ")"


def _drop_solver(opts: Sequence[str]) -> List[str]:
    """``opts`` without the SOLVER.* pairs (inference stages do not train)."""
    pairs = zip(opts[::2], opts[1::2])
    return [x for k, v in pairs if not k.startswith("SOLVER.") for x in (k, v)]


def _config_value(config: str, opts: Sequence[str], key: str, default):
    """``key`` (e.g. "SOLVER.MAX_ITER") of ``config`` with its bases, after ``opts``."""
    given = [v for k, v in zip(opts[::2], opts[1::2]) if k == key]
    if given:
        return type(default)(given[-1])  # yacs applies the options in order: the last wins
    from detectron2.config import CfgNode

    node = CfgNode.load_yaml_with_base(config, allow_unsafe=True)
    for part in key.split("."):
        node = (node or {}).get(part)
    return default if node is None else type(default)(node)


class _Plan:
    """Builds the stages of one pipeline run (paths resolved, wiring between stages)."""

    def __init__(self, name: str, args):
        self.name, self.args, self.quick = name, args, args.quick
        self.configs = CONFIGS[(name, args.quick)]
        self.data = SYNTHETIC if args.quick else LVIS
        self.out = os.path.abspath(args.output or os.path.join(
            "output", "recipes", name + ("_quick" if args.quick else "")))  # fmt: skip
        self.root = os.path.abspath(args.data_root)
        paths = [str(REPO)] + [p for p in os.getenv("PYTHONPATH", "").split(os.pathsep) if p]
        self.env = {"DETECTRON2_DATASETS": self.root,
                    "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}  # fmt: skip
        self.speed = SPEED[self.quick]
        self.stages: List[Stage] = []

    def folder(self, name: str) -> str:
        """``NN_name``: 00 for the data, then the stages' order from 01."""
        n = 0 if name == "data" else 1 + sum(s.name != "data" for s in self.stages)
        return os.path.join(self.out, f"{n:02d}_{name}")

    def config(self, role: str) -> Tuple[str, List[str]]:
        path, opts = self.configs[role]
        return str(REPO / path), list(opts)

    def iters_opts(self) -> List[str]:
        k = self.args.iters
        return [] if not k else ["SOLVER.MAX_ITER", str(k), "SOLVER.STEPS", "()",
                                 "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", str(k)]  # fmt: skip  # noqa: E501

    def gpus(self) -> List[str]:
        return ["--num-gpus", str(self.args.num_gpus)]

    def add(self, stage: Stage) -> Stage:
        stage.env = dict(self.env, **stage.env)
        self.stages.append(stage)
        return stage

    def split_json(self, key: str) -> str:
        """The annotation json of the data's ``key`` split."""
        if self.quick:
            name = self.data[key]
            return os.path.join(self.root, "lt_synthetic", "annotations", f"{name}.json")
        from lvis_longtail.data.builtin import LVIS_V1

        return os.path.join(self.root, LVIS_V1[self.data[key]][1])

    def data_stage(self, with_extra: bool) -> None:
        keys = ("train", "val", "test") + (("extra",) if with_extra else ())
        folder = self.folder("data")
        self.add(Stage(
            "data", "the synthetic dataset (generated if missing)", folder,
            [sys.executable, "-m", "lvis_longtail.data.synthetic", "--out",
             os.path.join(self.root, "lt_synthetic"), "--num-unlabeled", str(NUM_UNLABELED)],
            outputs=[self.split_json(k) for k in keys], done_if_outputs=True,
            consumed={"datasets": [self.data[k] for k in keys]}, estimate_s=15.0,
        ))  # fmt: skip

    def train(self, name, title, role, weights=None, kind="mask", extra_opts=(), inputs=()):
        config, opts = self.config(role)
        folder = self.folder(name)
        opts += list(extra_opts) + ["OUTPUT_DIR", folder, "DATASETS.TEST", _names(self.data["val"])]  # fmt: skip  # noqa: E501
        if weights:
            opts += ["MODEL.WEIGHTS", weights]
        opts += self.iters_opts()
        iters = _config_value(config, opts, "SOLVER.MAX_ITER", 40000)  # detectron2's default
        weights = _config_value(config, opts, "MODEL.WEIGHTS", "")
        estimate = self.speed["start"] + iters * self.speed[kind] / max(self.args.num_gpus, 1) \
            + self.data["sizes"][1] * self.speed["infer"]  # fmt: skip
        return self.add(Stage(
            name, title, folder,
            [sys.executable, str(REPO / "train_net.py"), "--config-file", config, *self.gpus()],
            opts, outputs=[os.path.join(folder, "model_final.pth"), self.metrics(folder)],
            consumed={"config": config, "weights": weights,
                      "datasets": [self.data["train"], self.data["val"]], "inputs": list(inputs)},
            resumable=True, estimate_s=estimate, total=iters,
        ))  # fmt: skip

    def metrics(self, folder: str) -> str:
        return os.path.join(folder, "inference", self.data["val"], "lvis_metrics.json")

    def pseudo(self, name, title, dataset, weights, register=(), images=0, require_labels=False):
        config, opts = self.config("stage1")
        opts = _drop_solver(opts)
        folder = self.folder(name)
        output = os.path.join(folder, f"{dataset}_pseudo.json")
        opts += list(register) + ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", folder]
        thresh = self.args.pseudo_score_thresh

        def check():
            with open(output + ".summary.json") as f:
                count = json.load(f)["pseudo_labels"]
            if require_labels and count == 0:
                raise ValueError(f"{output}: no pseudo label scored >= {thresh}, so the extra "
                                 "images would train nothing; lower --pseudo-score-thresh "
                                 f"and delete {folder}")  # fmt: skip

        return self.add(Stage(
            name, title, folder,
            [sys.executable, "-m", "lvis_longtail.tools.pseudo_label", "--config-file", config,
             "--dataset", dataset, "--output", output, "--score-thresh", str(thresh),
             *(["--as-training-set"] if require_labels else []), *self.gpus()],
            opts, outputs=[output, output + ".summary.json"],
            consumed={"config": config, "weights": weights, "datasets": [dataset],
                      "inputs": [weights]},
            estimate_s=self.speed["start"] + images * self.speed["infer"] / self.args.num_gpus,
            check=check,
        ))  # fmt: skip

    def evaluate(self, weights: str, kind: str = "tta") -> Stage:
        config, opts = self.config("tta")
        opts = _drop_solver(opts)
        folder = self.folder("tta_eval")
        results = os.path.join(folder, "inference", self.data["test"], "lvis_instances_results.json")  # fmt: skip  # noqa: E501
        opts += ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", folder,
                 "DATASETS.TEST", _names(self.data["val"], self.data["test"])]  # fmt: skip
        split = self.split_json("test")
        images = self.data["sizes"][1] + self.data["sizes"][2]

        def check():
            from lvis_longtail.evaluation.results import load_lvis_results
            from lvis_longtail.utils.io import read_json

            load_lvis_results(results, read_json(split), max_dets=300,
                              required=("bbox", "segmentation"))  # fmt: skip

        return self.add(Stage(
            "tta_eval", "test-time augmentation: evaluate on val, export test-dev", folder,
            [sys.executable, str(REPO / "train_net.py"), "--config-file", config, "--eval-only",
             *self.gpus()],
            opts, outputs=[self.metrics(folder), results],
            consumed={"config": config, "weights": weights,
                      "datasets": [self.data["val"], self.data["test"]], "inputs": [weights]},
            estimate_s=self.speed["start"] + images * self.speed[kind] / self.args.num_gpus,
            total=images, check=check,
        ))  # fmt: skip


def _final(stage: Stage) -> str:
    return os.path.join(stage.folder, "model_final.pth")


def plan_1st(p: _Plan) -> List[Stage]:
    if p.quick:
        p.data_stage(with_extra=True)
    s1 = p.train("stage1", "stage 1: EQL + RFS + mosaic, rotation, scale jitter", "stage1")
    w1 = _final(s1)
    sizes = p.data["sizes"]
    pt = p.pseudo("pseudo_train", "pseudo labels of the training set (stage 1's model)",
                  p.data["train"], w1, images=sizes[0])  # fmt: skip
    register = []
    if not p.quick:
        register = ["DATASETS.LVIS_FORMAT", json.dumps([[p.data["extra"], os.path.abspath(p.args.extra_json), os.path.abspath(p.args.extra_root)]])]  # fmt: skip  # noqa: E501
    pe = p.pseudo("pseudo_extra", "pseudo labels of the unannotated extra images",
                  p.data["extra"], w1, register, images=sizes[3], require_labels=True)  # fmt: skip
    image_root = os.path.join(p.root, "lt_synthetic", "images") if p.quick else os.path.abspath(p.args.extra_root)  # fmt: skip  # noqa: E501
    selftrain_opts = [
        "DATASETS.IGNORE_BOXES", json.dumps([[p.data["train"], pt.outputs[0]]]),
        "DATASETS.LVIS_FORMAT", json.dumps([[EXTRA_PSEUDO, pe.outputs[0], image_root]]),
        "DATASETS.EXTRA_TRAIN", _names(EXTRA_PSEUDO),
    ]  # fmt: skip
    st = p.train("stage1_selftrain", "stage 1 again: ignore regions + pseudo-labelled extra images",
                 "selftrain", extra_opts=selftrain_opts, inputs=[pt.outputs[0], pe.outputs[0]])  # fmt: skip  # noqa: E501
    s2 = p.train("stage2", "stage 2: frozen backbone/neck/RPN, BAGS, heavy mask head", "stage2",
                 weights=_final(st), inputs=[_final(st)])  # fmt: skip
    p.evaluate(_final(s2))
    return p.stages


def plan_mmdet(p: _Plan) -> List[Stage]:
    if p.quick:
        p.data_stage(with_extra=False)
    model = p.train("model", "the entry's model", "model", kind="entry")
    dual = p.train("dualhead", "dual-head classification fine-tune (RFS)", "dualhead",
                   weights=_final(model), kind="entry", inputs=[_final(model)])  # fmt: skip
    p.evaluate(_final(dual), kind="tta_entry")
    return p.stages


PLANS = {"lvis2020_1st": plan_1st, "lvis2020_mmdet": plan_mmdet}


def build_plan(name: str, args) -> Tuple[str, List[Stage]]:
    """The output folder and the stages of pipeline ``name`` for the command-line ``args``."""
    plan = _Plan(name, args)
    return plan.out, PLANS[name](plan)


def check_synthetic(folder: str) -> None:
    """The data stage regenerates the synthetic set with an unannotated split: allowed only
    when the files there are those of the generator's default options (which it writes again
    byte for byte), so a set made with other options is never overwritten."""
    train = os.path.join(folder, "annotations", "lt_synthetic_train.json")
    if not os.path.isfile(train):
        return
    import tempfile

    from lvis_longtail.data.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        made = generate(tmp, write_images=False, progress=False)["train"]
        with open(made, "rb") as a, open(train, "rb") as b:
            same = a.read() == b.read()
    if not same:
        raise StageFailed("data", f"{folder} was generated with other options and has no "
                          "unannotated split: add it with python -m lvis_longtail.data.synthetic "
                          f"--out {folder} --num-unlabeled {NUM_UNLABELED} plus the options it "
                          "was made with, or use another --data-root")  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="docs/recipes.md: the stages, outputs and resume.")  # fmt: skip  # noqa: E501
    parser.add_argument("name", choices=PIPELINES)
    parser.add_argument("--quick", action="store_true",
                        help="synthetic set, tiny configs, short schedules (CPU)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per stage")
    parser.add_argument("--output", help="pipeline folder (default output/recipes/NAME[_quick])")
    parser.add_argument("--data-root", default=os.getenv("DETECTRON2_DATASETS", "datasets"),
                        help="datasets folder ($DETECTRON2_DATASETS, default ./datasets)")  # fmt: skip  # noqa: E501
    parser.add_argument("--iters", type=int, default=0,
                        help="train every stage this many iterations (a smoke test)")  # fmt: skip
    parser.add_argument("--pseudo-score-thresh", type=float, default=0.5,
                        help="pseudo_label --score-thresh (lvis2020_1st)")  # fmt: skip
    parser.add_argument("--extra-json", help="image-info json of the unannotated extra images "
                        "(lvis2020_1st on LVIS; default DATA_ROOT/extra_images/extra_images.json)")  # fmt: skip  # noqa: E501
    parser.add_argument("--extra-root", help="their image folder (default DATA_ROOT/extra_images)")
    parser.add_argument("--progress-interval", type=float, default=30.0, help="seconds")
    parser.add_argument("--verbose", action="store_true", help="also print the stages' logs")
    args = parser.parse_args(argv)
    args.extra_root = args.extra_root or os.path.join(args.data_root, "extra_images")
    args.extra_json = args.extra_json or os.path.join(args.extra_root, "extra_images.json")
    if args.num_gpus < 1 or args.iters < 0:
        parser.error("--num-gpus must be >= 1 and --iters >= 0")
    if not 0.0 <= args.pseudo_score_thresh <= 1.0:  # NaN too
        parser.error(f"--pseudo-score-thresh must be in [0, 1], got {args.pseudo_score_thresh}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out, stages = build_plan(args.name, args)
    mode = "quick (synthetic set, CPU)" if args.quick else f"LVIS v1, {args.num_gpus} GPU(s)"
    print(f"recipe {args.name}: {len(stages)} stages, {mode}, output {out}", flush=True)
    try:
        if args.quick and stages[0].name == "data" and not stages[0].is_complete():
            check_synthetic(os.path.join(os.path.abspath(args.data_root), "lt_synthetic"))
        if not args.dry_run:
            write_json_atomic([s.record() for s in stages], os.path.join(out, "recipe_plan.json"))
        times = run_stages(args.name, stages, dry_run=args.dry_run, interval=args.progress_interval,
                           out=lambda s: print(s, flush=True), verbose=args.verbose)  # fmt: skip
    except StageFailed as e:
        print(f"recipe {args.name}: {e}", file=sys.stderr, flush=True)
        return e.returncode
    except KeyboardInterrupt:
        print(f"recipe {args.name}: interrupted; run the same command to resume",
              file=sys.stderr, flush=True)  # fmt: skip
        return 130
    if not args.dry_run:
        total = sum(times.values())
        lines = summary_lines(stages)
        print(f"recipe {args.name}: finished ({total / 60:.1f} min in the stages)")
        print("\n".join(lines), flush=True)
        write_json_atomic({"seconds": times, "summary": lines},
                          os.path.join(out, "recipe_summary.json"))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
