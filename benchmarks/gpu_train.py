"""Training and evaluating the tiny configs for gpu_check.py, counting host-device syncs,
checking the wheel set against what was imported, and the summary page."""

import importlib.metadata as metadata
import json
import math
import shutil
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.engine import hooks
from detectron2.utils.events import CommonMetricPrinter, JSONWriter
from packaging.requirements import Requirement

from lvis_longtail.config import add_longtail_config
from lvis_longtail.data.builtin import register_synthetic
from lvis_longtail.data.synthetic import generate
from lvis_longtail.engine import Trainer, setup_cfg
from lvis_longtail.engine.launch import configure_cpu_threads

REPO = Path(__file__).resolve().parents[1]
PREFIX = "gpu_check"
SYNC_STEPS = 5
# the machine's OpenCV is the headless build; the development venv may have the full one
SAME_DISTRIBUTION = {"opencv-python": "opencv-python-headless"}


class CheckTrainer(Trainer):
    """The project's Trainer; its writers leave out TensorBoard (not on the GPU machine) and
    the checkpointer only saves at the end."""

    def build_writers(self):
        return [CommonMetricPrinter(self.max_iter),
                JSONWriter(str(Path(self.cfg.OUTPUT_DIR) / "metrics.json"))]  # fmt: skip

    def build_hooks(self):
        return [h for h in super().build_hooks() if not isinstance(h, hooks.PeriodicCheckpointer)]


def make_data(root: Path, dry: bool) -> dict:
    """The synthetic long-tailed dataset, registered as ``gpu_check_{train,val,test_dev}``."""
    classes = 8 if dry else 24
    sizes = dict(num_train=8, num_val=2, num_test=1) if dry else dict(num_train=240, num_val=32,
                                                                       num_test=8)  # fmt: skip
    paths = generate(str(root), seed=0, num_classes=classes, progress=False, **sizes)
    register_synthetic(str(root), prefix=PREFIX)
    return {"num_classes": classes, "train_json": paths["train"], "images": str(root / "images")}


def config_opts(name: str, device, data: dict, output_dir: Path, iters: int, amp: bool):
    """The options that point a tiny config at the check's data and schedule. Data files a
    config names (pseudo-label ignore boxes, pseudo-labelled extra images) are replaced by
    the synthetic training json, so their code paths still run."""
    raw = get_cfg()
    add_longtail_config(raw)
    raw.merge_from_file(str(REPO / "configs" / "tiny" / name))
    k = data["num_classes"]
    opts = [
        "DATASETS.TRAIN", f"('{PREFIX}_train',)", "DATASETS.TEST", f"('{PREFIX}_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(k), "MODEL.DEVICE", device.type, "MODEL.WEIGHTS", "",
        "MODEL.ROI_BOX_HEAD.FED_LOSS.NUM_CLASSES", str(max(2, k // 2)),
        "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", str(min(10, iters)), "SOLVER.AMP.ENABLED", str(amp),
        "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "2" if device.type == "cuda" else "0",
        "OUTPUT_DIR", str(output_dir), "DATASETS.LVIS_FORMAT", "[]",
    ]  # fmt: skip
    if raw.DATASETS.IGNORE_BOXES:
        opts += ["DATASETS.IGNORE_BOXES", str([[f"{PREFIX}_train", data["train_json"]]])]
    if raw.DATASETS.EXTRA_TRAIN:
        extra = [[f"{PREFIX}_extra", data["train_json"], data["images"]]]
        opts += ["DATASETS.LVIS_FORMAT", str(extra), "DATASETS.EXTRA_TRAIN", f"('{PREFIX}_extra',)"]
    return opts


class SyncCounter(hooks.HookBase):
    """Counts host-device synchronisations in the last ``steps`` training steps (the first
    step, with its one-time work, excluded) with ``torch.cuda.set_sync_debug_mode("warn")``;
    ``result`` then holds the count per step and the source lines that cause most of them
    (CPU: nothing counted). Counted inside training: the training loader's workers are shut
    down when training ends."""

    def __init__(self, steps: int):
        self.steps = steps
        self.result = {"per_step": None, "sites": []}
        self._caught = None
        self._counted = 0

    def before_step(self):
        first = max(1, self.trainer.max_iter - self.steps)
        if self.trainer.iter == first and torch.cuda.is_available() and self._caught is None:
            self._catch = warnings.catch_warnings(record=True)
            self._caught = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def after_step(self):
        self._counted += self._caught is not None

    def after_train(self):
        if self._caught is None:
            return
        torch.cuda.set_sync_debug_mode(0)
        self._catch.__exit__(None, None, None)
        messages = [w for w in self._caught if "synchroniz" in str(w.message)]
        sites = Counter(f"{w.filename}:{w.lineno}" for w in messages)
        per_step = sum(sites.values()) / self._counted if self._counted else None
        self.result = {"per_step": per_step, "sites": sites.most_common(12)}
        self._caught = None


def train_config(name, device, data, runs: Path, iters: int, amp: bool, count_syncs_too: bool):
    """Train and evaluate one config; the row of the summary (``ok`` False with the error)."""
    output_dir = runs / (name[: -len(".yaml")] + ("_amp" if amp else ""))
    row = {"config": name, "amp": amp, "iters": iters}
    start = time.perf_counter()
    try:
        cfg = setup_cfg(str(REPO / "configs" / "tiny" / name),
                        config_opts(name, device, data, output_dir, iters, amp))  # fmt: skip
        output_dir.mkdir(parents=True, exist_ok=True)  # as default_setup does
        configure_cpu_threads(cfg)  # as train_net.py: OpenCV threads of the data workers
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer = CheckTrainer(cfg)
        counter = SyncCounter(SYNC_STEPS)
        if count_syncs_too and device.type == "cuda":
            trainer.register_hooks([counter])
        trainer.resume_or_load(resume=False)
        trainer.train()
        row["seconds"] = round(time.perf_counter() - start, 1)
        row.update(_metrics(output_dir, getattr(trainer, "_last_eval_results", None) or {}))
        if count_syncs_too:
            row["syncs"] = counter.result
        if device.type == "cuda":
            row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        row["ok"] = row["finite_losses"] and "bbox_AP" in row
    except Exception as e:
        row.update(ok=False, error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - start)
        row["traceback"] = traceback.format_exc(limit=-4)
    return row


def _metrics(output_dir: Path, results: dict) -> dict:
    lines = (output_dir / "metrics.json").read_text().splitlines()
    steps = [json.loads(x) for x in lines if "total_loss" in x]
    times = [s["time"] for s in steps if "time" in s]
    out = {"finite_losses": bool(steps) and all(math.isfinite(s["total_loss"]) for s in steps)}
    if times:
        out["s_per_iter"] = round(sorted(times)[len(times) // 2], 4)
    for task in ("bbox", "segm"):
        if task in results:
            out[f"{task}_AP"] = round(results[task]["AP"], 2)
    return out


def keep_outputs(runs: Path, dest: Path, name: str, amp: bool) -> None:
    """Copy a run's small outputs (metrics, LVIS metrics, per-class csv) into ``dest``."""
    run = runs / (name[: -len(".yaml")] + ("_amp" if amp else ""))
    target = dest / run.name
    target.mkdir(parents=True, exist_ok=True)
    for pattern in ("metrics.json", "inference/*/lvis_metrics.json", "inference/*/*.csv"):
        for path in run.glob(pattern):
            shutil.copy(path, target / path.name)


def describe(row: dict) -> str:
    if "error" in row:
        return f"config {row['config']}{' AMP' if row['amp'] else ''}: {row['error']}"
    syncs = row.get("syncs", {}).get("per_step")
    return (
        f"config {row['config']}{' AMP' if row['amp'] else ''}: {row['seconds']} s, "
        f"{row.get('s_per_iter', '-')} s/iter, bbox AP {row.get('bbox_AP')}, segm AP "
        f"{row.get('segm_AP')}, peak {row.get('peak_mib', '-')} MiB"
        + (f", {syncs:.1f} syncs/step" if syncs is not None else "")
    )


def _closure(names) -> set:
    """The names and every distribution they require, transitively (installed metadata)."""
    from gpu_wheels import normalise

    seen, todo = set(), [normalise(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalise(req.name))
    return seen


def import_check(baseline: set, wheels) -> dict:
    """Distributions of the modules imported since ``baseline`` that neither ``.whl/``
    (``wheels.shipped()``) nor the GPU machine's packages (``wheels.PREINSTALLED`` and what
    they require) provide."""
    owners = metadata.packages_distributions()
    tops = {m.split(".")[0] for m in set(__import__("sys").modules) - baseline}
    used = {wheels.normalise(d) for t in tops for d in owners.get(t, [])}
    used = {SAME_DISTRIBUTION.get(d, d) for d in used} - {"lvis-longtail"}
    machine = _closure(wheels.PREINSTALLED) | {SAME_DISTRIBUTION.get(d, d) for d in _closure(
        [k for k, v in SAME_DISTRIBUTION.items() if v in wheels.PREINSTALLED])}  # fmt: skip
    folder = REPO / ".whl"
    built = {wheels.normalise(p.name.split("-")[0]) for p in folder.glob("*.whl")}
    return {
        "imported": sorted(used),
        "from_wheels": sorted(used & wheels.shipped()),
        "missing_from_wheels": sorted(used - wheels.shipped() - machine),
        # .whl/ as built by `make gpu-wheels` (None: not built here)
        "missing_files": sorted(wheels.shipped() - built) if folder.is_dir() else None,
    }


def _table(header, rows) -> list:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]


def _number(value, fmt="{:.2g}"):
    return "-" if value is None else fmt.format(value)


def write_summary(path: Path, record: dict) -> None:
    """summary.md: environment, parity, configs, benchmarks, failures."""
    parity = [
        (r["case"], r["mode"], _number(r.get("output_error")), _number(r.get("grad_error")),
         r.get("tolerance", "-"), r.get("grad_tolerance", "-"), r.get("error", r["ok"]))
        for r in record.get("parity", [])
    ]  # fmt: skip
    configs = [
        (r["config"], r["amp"], r.get("seconds", "-"), r.get("s_per_iter", "-"),
         r.get("bbox_AP", "-"), r.get("segm_AP", "-"), r.get("peak_mib", "-"),
         _number((r.get("syncs") or {}).get("per_step"), "{:.1f}"),
         r.get("error", r.get("ok", r.get("skipped"))))
        for r in record.get("configs", [])
    ]  # fmt: skip
    benchmarks = [
        (r["benchmark"], r.get("rc", r.get("skipped")), r.get("seconds", "-"))
        for r in record.get("benchmarks", [])
    ]
    lines = ["# GPU check", "", f"Environment: {record.get('environment')}", "",
             f"Total: {record.get('seconds')} s", "", "## Parity", ""]  # fmt: skip
    header = ("case", "mode", "output error", "grad error", "tolerance", "grad tolerance", "ok")
    lines += _table(header, parity)
    lines += ["", "## Configs", ""]
    header = ("config", "AMP", "s", "s/iter", "bbox AP", "segm AP", "peak MiB", "syncs/step")
    lines += _table(header + ("ok",), configs)
    lines += ["", "## Benchmarks", ""] + _table(("benchmark", "rc", "s"), benchmarks)
    lines += ["", "## Failures", ""] + [f"- {f}" for f in record.get("failures", [])] + [""]
    path.write_text("\n".join(lines))
