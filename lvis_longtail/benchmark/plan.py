"""Which runs the long-tail benchmark needs, their ``train_net.py`` command lines, and when a
finished run can be reused.

A run is reused when its folder holds a ``benchmark_run.json`` with return code 0 and the
same *fingerprint* as planned: a hash of its command line (config, overrides, schedule,
dataset paths, seed, device), of its config's content (the YAML chain through ``_BASE_``, parsed:
comments do not count), of its dependencies' fingerprints (the pre-training run, the base of a
fine-tune) and of the generated datasets' options. Changing anything upstream
therefore retrains exactly what it affects, and an interrupted benchmark continues where it
stopped. A finished run also records which realisation of the pre-training it descends from
(``init``, :func:`weights_digest`): the same fingerprint trained on another CPU gives other
weights, and runs are only paired, reused or reported within one realisation. Fingerprints do
not depend on where the runs and datasets live (``Settings.anchors``), so the results folder's
archive of finished runs (``lvis_longtail.benchmark.page``) stays valid in another checkout.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Set

from lvis_longtail.benchmark.methods import Method, methods_by_name

RUN_FILE = "benchmark_run.json"
PRETRAIN_CONFIG = "tiny/mask_rcnn_R18_FPN_tiny_softmax.yaml"
PRETRAIN_SEED = 0
INIT_FILE = "init_backbone.pth"
# What a row takes from the pre-training: backbone + FPN and the class-agnostic layers of the
# mask head (its convolutions and deconvolution: thin walls need more than a row's schedule to
# be learnt from scratch); the RPN, the box head and the class-specific mask predictor start
# fresh (the pre-training split's class ids are another assignment).
INIT_PREFIXES = ("backbone.", "roi_heads.mask_head.mask_fcn", "roi_heads.mask_head.deconv")
DATASET_NAMES = {"pretrain": "lt_bench_pretrain", "train": "lt_bench_train", "val": "lt_bench_val"}


@dataclass
class Settings:
    """What every run of one benchmark invocation shares.

    Attributes:
        iters: training iterations of a row (``Method.schedule`` x it; fine-tunes:
            ``Method.length`` of it).
        pretrain_iters: iterations of the shared pre-training (0: every row from scratch).
        device: ``MODEL.DEVICE``.
        repeat_threshold: ``DATALOADER.REPEAT_THRESHOLD`` of the rows with RFS.
        output: runs folder.
        datasets: ``{"pretrain" | "train" | "val": (json file, image root)}``.
        dataset_key: hash of the generator options of the datasets (part of fingerprints).
        python: interpreter of the runs.
        configs: the ``configs/`` folder, as the command lines name it.
        root: the folder ``configs`` is relative to (the runs' working directory), to read the
            configs' content for the fingerprints.
        anchors: ``{folder: token}``; each folder in a command line is replaced by its token in
            the fingerprint (the runs and datasets folders), so fingerprints are location-free.
    """

    iters: int
    pretrain_iters: int
    device: str
    repeat_threshold: float
    output: str
    datasets: Mapping[str, tuple]
    dataset_key: str = ""
    python: str = "python"
    configs: str = "configs"
    root: str = ""
    anchors: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Run:
    """One training (or evaluation) of the benchmark."""

    name: str
    seed: int
    out_dir: str
    method: Optional[Method] = None  # None: the pre-training run
    deps: List["Run"] = field(default_factory=list)
    cmd: List[str] = field(default_factory=list)
    salt: str = ""  # the datasets' generator options
    config_key: str = ""  # the config's content (:func:`config_key`)
    anchors: Sequence[tuple] = ()  # (folder, token), longest folder first

    @property
    def key(self) -> str:
        return f"{self.name}/seed{self.seed}"

    @property
    def fingerprint(self) -> str:
        parts = []
        for part in self.cmd[1:]:  # not the interpreter
            for folder, token in self.anchors:
                part = part.replace(folder, token)
            parts.append(part)
        parts += [self.salt, self.config_key] + [d.fingerprint for d in self.deps]
        return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:16]

    def record(self) -> Optional[dict]:
        path = os.path.join(self.out_dir, RUN_FILE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def done(self) -> bool:
        """Finished with the planned fingerprint, from the initialisation its dependency now
        holds (a pre-training trained again, e.g. on a CPU with other floating-point kernels,
        gives other weights: what started from the old ones is stale)."""
        rec = self.record()
        if not rec or rec.get("rc") != 0 or rec.get("fingerprint") != self.fingerprint:
            return False
        dep = self.deps[0].record() if self.deps else None
        return dep is None or dep.get("init") == rec.get("init")

    def init(self) -> Optional[str]:
        """The initialisation a finished run descends from (:func:`weights_digest` of the
        pre-training's ``INIT_FILE``, inherited through bases; "scratch" without one)."""
        rec = self.record()
        return rec.get("init") if rec else None


def config_content(path: str) -> dict:
    """The keys a YAML config sets, its ``_BASE_`` chain merged in (fvcore's
    ``load_yaml_with_base``, as detectron2 reads configs); ``OUTPUT_DIR`` left out (the
    benchmark sets it)."""
    from detectron2.config import CfgNode

    node = CfgNode.load_yaml_with_base(path)
    node.pop("OUTPUT_DIR", None)
    return node


def config_key(path: str) -> str:
    """Hash of :func:`config_content`: editing what a config sets (here or in a base) changes
    the fingerprint of every run of it; editing its comments does not."""
    text = json.dumps(config_content(path), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def schedule_opts(iters: int, finetune: bool, length: float = 1 / 3) -> List[str]:
    """Solver overrides of ``iters`` iterations, in the tiny base schedule's proportions
    (1000 iterations: warmup 100, LR steps at 70 % and 90 %); a fine-tune runs
    ``length * iters`` with warmup 10 %."""
    if finetune:
        iters = max(10, round(iters * length))
    warmup = round(0.1 * iters)
    steps = (round(0.7 * iters), round(0.9 * iters))
    return [
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.WARMUP_ITERS", str(max(1, warmup)),
        "SOLVER.STEPS", f"({steps[0]}, {steps[1]})",
        "SOLVER.CHECKPOINT_PERIOD", str(10 * iters),
    ]  # fmt: skip


def _dataset_opts(s: Settings, train: str, test: Optional[str]) -> List[str]:
    entries = [[DATASET_NAMES[k], *map(str, s.datasets[k])] for k in sorted(s.datasets)]
    return [
        "DATASETS.LVIS_FORMAT", repr(entries),
        "DATASETS.TRAIN", f"('{DATASET_NAMES[train]}',)",
        "DATASETS.TEST", f"('{DATASET_NAMES[test]}',)" if test else "()",
    ]  # fmt: skip


def pretrain_command(run: Run, s: Settings) -> List[str]:
    """Class-balanced pre-training of the whole detector on the pre-training split."""
    opts = ["DATALOADER.SAMPLER_TRAIN", "TrainingSampler"]
    opts += schedule_opts(s.pretrain_iters, False)
    opts += _dataset_opts(s, "pretrain", None)
    opts += ["OUTPUT_DIR", run.out_dir, "SEED", str(run.seed), "MODEL.DEVICE", s.device]
    config = os.path.join(s.configs, PRETRAIN_CONFIG)
    return [s.python, "train_net.py", "--config-file", config] + opts


def method_command(run: Run, s: Settings) -> List[str]:
    """The ``train_net.py`` command line of one row x seed."""
    m = run.method
    opts = list(m.opts)
    if m.kind != "eval":
        iters = s.iters if m.kind == "finetune" else max(1, round(s.iters * m.schedule))
        opts += schedule_opts(iters, m.kind == "finetune", m.length)
    opts += _dataset_opts(s, "train", "val")
    opts += ["OUTPUT_DIR", run.out_dir, "SEED", str(run.seed), "MODEL.DEVICE", s.device]
    opts += ["TEST.EVAL_PERIOD", "0"]
    if m.rfs:
        opts += ["DATALOADER.REPEAT_THRESHOLD", str(s.repeat_threshold)]
    elif "DATALOADER.SAMPLER_TRAIN" not in m.opts[::2]:
        opts += ["DATALOADER.SAMPLER_TRAIN", "TrainingSampler"]
    if m.base:
        opts += ["MODEL.WEIGHTS", os.path.join(run.deps[0].out_dir, "model_final.pth")]
    elif run.deps:  # the pre-trained backbone
        opts += ["MODEL.WEIGHTS", os.path.join(run.deps[0].out_dir, INIT_FILE)]
    else:
        opts += ["MODEL.WEIGHTS", ""]
    head = [s.python, "train_net.py", "--config-file", os.path.join(s.configs, m.config)]
    return head + (["--eval-only"] if m.kind == "eval" else []) + opts


def plan_runs(names: Sequence[str], seeds: Sequence[int], s: Settings, methods=None) -> List[Run]:
    """All runs for rows ``names`` x ``seeds``, bases added, in execution order.

    Order: the pre-training run, then seed by seed (an interrupted benchmark leaves whole
    seeds), rows before the rows that start from them.
    """
    table = methods_by_name(methods) if methods is not None else methods_by_name()
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown benchmark methods {unknown}; known: {sorted(table)}")
    wanted: List[str] = []

    def add(name: str) -> None:
        m = table[name]
        for dep in (m.base, m.reference):
            if dep and dep not in wanted:
                add(dep)
        if name not in wanted:
            wanted.append(name)

    for name in names:
        add(name)
    anchors = tuple(sorted(s.anchors.items(), key=lambda kv: -len(kv[0])))
    pre = None
    if s.pretrain_iters > 0:
        pre = Run("pretrain", PRETRAIN_SEED, os.path.join(s.output, "pretrain"), anchors=anchors)
        pre.cmd, pre.salt = pretrain_command(pre, s), s.dataset_key
        pre.config_key = config_key(os.path.join(s.root, s.configs, PRETRAIN_CONFIG))
    runs: Dict[str, Run] = {}
    keys = {n: config_key(os.path.join(s.root, s.configs, table[n].config)) for n in wanted}
    ordered = [pre] if pre else []
    for seed in seeds:
        for name in wanted:
            m = table[name]
            out_dir = os.path.join(s.output, name, f"seed{seed}")
            run = Run(name, seed, out_dir, method=m, anchors=anchors)
            salt = s.dataset_key
            if m.base:
                run.deps = [runs[f"{m.base}/seed{seed}"]]
            elif pre:
                run.deps = [pre]
                salt += "\0init:" + ",".join(INIT_PREFIXES)
            run.cmd, run.salt = method_command(run, s), salt
            run.config_key = keys[name]
            runs[run.key] = run
            ordered.append(run)
    return ordered


def runs_to_train(runs: Sequence[Run], reusable: Set[str]) -> List[Run]:
    """The runs of ``runs`` (in order) that must train here: all but those in ``reusable``
    (keys whose results are archived) that no kept run starts from (an archive holds no
    weights: a fine-tune's base and the pre-training of a row that trains are kept)."""
    kept: List[Run] = []
    for run in reversed(runs):
        if run.key in reusable and not any(run in k.deps for k in kept):
            continue
        kept.append(run)
    return kept[::-1]


def weights_digest(path: str) -> str:
    """Hash of a checkpoint's weights (names, dtypes, shapes and bytes): which realisation of
    the pre-training a run starts from. Runs are paired only within one realisation: the same
    command on a CPU with other floating-point kernels trains other weights."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    h = hashlib.sha1()
    for name in sorted(state):
        t = torch.as_tensor(state[name]).detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def init_of(run: Run) -> Optional[str]:
    """The ``init`` a run that just finished records: the pre-training's digest of its
    ``INIT_FILE``, else its dependency's ``init`` ("scratch" for a row without one)."""
    if run.method is None:
        return weights_digest(os.path.join(run.out_dir, INIT_FILE))
    if not run.deps:
        return "scratch"
    return (run.deps[0].record() or {}).get("init")


def extract_init(model_final: str, out_path: str, prefixes: Sequence[str] = INIT_PREFIXES):
    """Keep the ``prefixes`` weights of a checkpoint (:data:`INIT_PREFIXES`: the pre-trained
    backbone + FPN and mask-head layers) in a new checkpoint ``{"model": {...}}``.

    Returns:
        the number of tensors kept.
    """
    import torch

    from lvis_longtail.utils.io import atomic_write

    state = torch.load(model_final, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    kept = {k: v for k, v in state.items() if k.startswith(tuple(prefixes))}
    if not kept:
        raise ValueError(f"{model_final}: no weights start with {list(prefixes)}")
    with atomic_write(out_path, "wb") as f:
        torch.save({"model": kept, "__author__": "lvis_longtail benchmark"}, f)
    return len(kept)
