"""The stages of a recipe (:mod:`lvis_longtail.tools.recipe`) and how they run.

A :class:`Stage` is one subprocess (``train_net.py``, ``pseudo_label``, the synthetic data
generator) with its own folder. :func:`run_stages` runs the stages in order:

* a stage whose folder holds ``recipe_done.json`` (the completeness marker, written
  atomically after the stage's process exited 0, its outputs exist and its check passed)
  and whose outputs still exist is skipped;
* otherwise ``recipe_stage.json`` (what the stage consumes: config, weights, datasets, input
  files, the command) is written first, then the command runs with its output appended to
  ``log.txt``; a training stage whose folder already holds a checkpoint (``last_checkpoint``,
  an interrupted earlier run) gets detectron2's ``--resume``;
* a stage that exits non-zero, lacks an output or fails its check stops the pipeline:
  :class:`StageFailed` names it (the exit status is kept, so 75, "preempted, resume me",
  reaches the caller).

Progress: before each stage, its number, name, estimate and the pipeline's remaining time;
while it runs, at most every ``interval`` seconds, the iteration (or inference image) reached,
the stage's elapsed time and both remaining times. Estimates are rescaled by the speed the
finished stages showed against theirs.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from lvis_longtail.utils.io import write_json_atomic

__all__ = ["MARKER", "RECORD", "LOG", "Stage", "StageFailed", "run_stages", "run_subprocess",
           "summary_lines"]  # fmt: skip

MARKER = "recipe_done.json"
RECORD = "recipe_stage.json"
LOG = "log.txt"
CHECKPOINT_POINTER = "last_checkpoint"  # detectron2's Checkpointer writes it in OUTPUT_DIR

_ITER = re.compile(r"\biter: (\d+)\b")
_INFERENCE = re.compile(r"Inference done (\d+)/(\d+)")
_START = re.compile(r"Starting training from iteration (\d+)")  # detectron2, after --resume


class StageFailed(RuntimeError):
    """A stage failed; ``stage`` is its name, ``returncode`` the exit status to report."""

    def __init__(self, stage: str, message: str, returncode: int = 1):
        super().__init__(f"stage '{stage}' failed: {message}")
        self.stage = stage
        self.returncode = returncode if returncode else 1


@dataclass
class Stage:
    """One step of a pipeline.

    Args:
        name: short name (also the folder's suffix).
        title: what the stage does, one line.
        folder: its own output folder.
        argv: the command up to its ``KEY VALUE`` options.
        opts: the ``KEY VALUE`` config options (after ``--resume`` when resuming).
        outputs: files that must exist when the stage is complete.
        consumed: what it reads: ``config``, ``weights``, ``datasets``, ``inputs`` (paths).
        resumable: detectron2 training (``--resume`` when a checkpoint is in ``folder``).
        estimate_s: expected seconds (for the ETA).
        total: iterations (training) or images (inference) for in-stage progress, or 0.
        check: called after a successful run; raises ``ValueError`` (or ``OSError``) when an
            output is wrong.
        env: environment variables set for the command.
        done_if_outputs: complete when the outputs exist, marker or not (shared inputs made
            outside the recipe, e.g. the synthetic dataset).
    """

    name: str
    title: str
    folder: str
    argv: List[str]
    opts: List[str] = field(default_factory=list)
    outputs: List[str] = field(default_factory=list)
    consumed: Dict = field(default_factory=dict)
    resumable: bool = False
    estimate_s: float = 60.0
    total: int = 0
    check: Optional[Callable[[], None]] = None
    env: Dict[str, str] = field(default_factory=dict)
    done_if_outputs: bool = False

    def missing_outputs(self) -> List[str]:
        return [p for p in self.outputs if not os.path.exists(p)]

    def is_complete(self) -> bool:
        has_marker = os.path.isfile(os.path.join(self.folder, MARKER))
        return (has_marker or self.done_if_outputs) and not self.missing_outputs()

    def resumes(self) -> bool:
        return self.resumable and os.path.isfile(os.path.join(self.folder, CHECKPOINT_POINTER))

    def command(self) -> List[str]:
        return list(self.argv) + (["--resume"] if self.resumes() else []) + list(self.opts)

    def record(self) -> Dict:
        return {"stage": self.name, "title": self.title, "folder": self.folder,
                "command": shlex.join(self.command()), "env": self.env,
                "outputs": self.outputs, **self.consumed}  # fmt: skip


def run_subprocess(command: Sequence[str], env: Dict[str, str], log_path: str,
                   on_line: Callable[[str], None]) -> int:  # fmt: skip
    """Run ``command`` with ``env`` added to this process's environment, its stdout and
    stderr appended to ``log_path`` and passed line by line to ``on_line``; its exit status.

    SIGTERM and SIGUSR1 sent to this process are passed on to the command (``train_net.py``
    then saves a checkpoint and exits 75, which the caller reports); Ctrl-C stops it (it gets
    SIGINT from the terminal too) and re-raises."""
    with open(log_path, "a", buffering=1) as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        proc = subprocess.Popen(
            list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **env}, bufsize=1, errors="replace",
        )  # fmt: skip
        previous = _forward_signals(proc)
        try:
            for line in proc.stdout:
                log.write(line)
                on_line(line)
            return proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _forward_signals(proc) -> Dict:
    """Handlers passing SIGTERM / SIGUSR1 on to ``proc``; the handlers they replace (none
    outside the main thread, where Python cannot install any)."""
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
        except ValueError:  # not the main thread
            break
    return previous


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


class _Progress:
    """Prints where the pipeline is and its ETA (module docstring)."""

    def __init__(self, pipeline: str, stages: Sequence[Stage], out, clock, interval: float):
        self.pipeline, self.stages, self.out, self.clock = pipeline, stages, out, clock
        self.interval = interval
        self.spent = self.estimated = 0.0  # seconds of finished runs, and their estimates

    def speed(self) -> float:
        """Actual over estimated seconds of the stages run so far (1 before any)."""
        return self.spent / self.estimated if self.estimated > 0 else 1.0

    def left_after(self, index: int) -> float:
        todo = [s for s in self.stages[index + 1 :] if not s.is_complete()]
        return sum(s.estimate_s for s in todo) * self.speed()

    def start(self, index: int) -> None:
        stage = self.stages[index]
        self.index, self.begin, self.last = index, self.clock(), self.clock()
        self.done = self.offset = self.set_size = self.first = 0  # first: a resumed run's start
        est = stage.estimate_s * self.speed()
        total = est + self.left_after(index)
        self.out(f"[{self.pipeline} {index + 1}/{len(self.stages)}] {stage.name}: {stage.title}"
                 f" (estimate {_minutes(est)}; pipeline ~{_minutes(total)} left)")  # fmt: skip
        self.out(f"    folder {stage.folder}, log {os.path.join(stage.folder, LOG)}")

    def line(self, text: str) -> None:
        stage = self.stages[self.index]
        m = _START.search(text)
        if m:
            self.first = self.done = int(m.group(1))
        m = _ITER.search(text)
        if m:
            self.done = int(m.group(1)) + 1  # detectron2 logs the 0-based iteration
        m = _INFERENCE.search(text)
        if m and not stage.resumable:  # one count per test set: add up the sets seen
            done, size = int(m.group(1)), int(m.group(2))
            if self.set_size and size != self.set_size:
                self.offset += self.set_size
            self.set_size = size
            self.done = self.offset + done
            stage.total = max(stage.total, self.offset + size)
        now = self.clock()
        if now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.begin
        if stage.total and self.done > self.first:
            frac = min((self.done - self.first) / (stage.total - self.first), 1.0)
            stage_left = elapsed / frac - elapsed
            where = f"{self.done}/{stage.total}"
        else:
            stage_left = max(stage.estimate_s * self.speed() - elapsed, 0.0)
            where = "running"
        left = stage_left + self.left_after(self.index)
        self.out(f"[{self.pipeline} {self.index + 1}/{len(self.stages)}] {stage.name}: {where}, "
                 f"{_minutes(elapsed)} elapsed, stage ~{_minutes(stage_left)} left, "
                 f"pipeline ~{_minutes(left)} left")  # fmt: skip

    def finish(self) -> float:
        stage = self.stages[self.index]
        elapsed = self.clock() - self.begin
        self.spent += elapsed
        self.estimated += stage.estimate_s
        self.out(f"[{self.pipeline} {self.index + 1}/{len(self.stages)}] {stage.name}: done in "
                 f"{_minutes(elapsed)} (estimate was {_minutes(stage.estimate_s)})")  # fmt: skip
        return elapsed


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def run_stages(
    pipeline: str,
    stages: Sequence[Stage],
    *,
    dry_run: bool = False,
    runner: Optional[Callable] = None,
    out: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    interval: float = 30.0,
    verbose: bool = False,
) -> Dict[str, float]:
    """Run (or, with ``dry_run``, print) ``stages`` in order (module docstring).

    Args:
        runner: ``(command, env, log_path, on_line) -> exit status``; default
            :func:`run_subprocess`.

    Returns:
        ``{stage name: seconds}``: of this run, or as recorded by a skipped stage's marker.

    Raises:
        StageFailed: the first stage that failed, by name.
    """
    runner = runner or run_subprocess
    progress = _Progress(pipeline, stages, out, clock, interval)
    times = {}
    for i, stage in enumerate(stages):
        head = f"[{pipeline} {i + 1}/{len(stages)}] {stage.name}"
        if stage.is_complete():
            out(f"{head}: complete, skipped ({stage.folder})")
            times[stage.name] = _warn_if_changed(stage, out, head)
            continue
        if dry_run:
            state = "resume" if stage.resumes() else "run"
            out(f"{head} ({state}): {stage.title}")
            out(f"    {shlex.join(stage.command())}")
            if stage.env:
                out(f"    env: {' '.join(f'{k}={v}' for k, v in stage.env.items())}")
            out(f"    writes: {', '.join(stage.outputs)}")
            continue
        os.makedirs(stage.folder, exist_ok=True)
        if stage.resumes():
            out(f"{head}: an interrupted run left a checkpoint; continuing it with --resume")
        write_json_atomic(dict(stage.record(), started=time.time()),
                          os.path.join(stage.folder, RECORD))  # fmt: skip
        progress.start(i)
        log = os.path.join(stage.folder, LOG)

        def on_line(text, echo=verbose):
            if echo:
                sys.stdout.write(text)
            progress.line(text)

        rc = runner(stage.command(), stage.env, log, on_line)
        if rc != 0:
            out(_tail(log))
            raise StageFailed(stage.name, f"exit status {rc}; log: {log}. Run the same command "
                              "again to resume it.", rc)  # fmt: skip
        missing = stage.missing_outputs()
        if missing:
            raise StageFailed(stage.name, f"finished without writing {', '.join(missing)}; "
                              f"log: {log}")  # fmt: skip
        if stage.check is not None:
            try:
                stage.check()
            except (ValueError, OSError) as e:
                raise StageFailed(stage.name, str(e)) from None
        elapsed = progress.finish()
        times[stage.name] = elapsed
        write_json_atomic(dict(stage.record(), seconds=elapsed, finished=time.time()),
                          os.path.join(stage.folder, MARKER))  # fmt: skip
    return times


def _warn_if_changed(stage: Stage, out, head: str) -> float:
    """A skipped stage that recorded another command than the plan's: say so (its folder
    must be removed to run it again with the new inputs). Returns the seconds its marker
    recorded (0 without one)."""
    try:
        with open(os.path.join(stage.folder, MARKER)) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return 0.0
    recorded = done.get("command")
    plain = shlex.join(list(stage.argv) + list(stage.opts))
    if recorded is not None and recorded.replace(" --resume", "") != plain:
        out(f"{head}: note: it was completed with another command than the plan's; delete "
            f"{stage.folder} to run it again with the plan's inputs")  # fmt: skip
    return float(done.get("seconds", 0.0))


def summary_lines(stages: Sequence[Stage]) -> List[str]:
    """Each evaluated stage's val AP (segm, bbox) and the test-dev results file."""
    lines = []
    for stage in stages:
        for path in stage.outputs:
            if path.endswith("lvis_metrics.json") and os.path.isfile(path):
                with open(path) as f:
                    m = json.load(f)
                parts = [f"{t} AP {m[t]['AP']:.1f} (" + ", ".join(
                    f"{c} {m[t][c]:.1f}" for c in ("APr", "APc", "APf")) + ")"
                    for t in ("segm", "bbox") if t in m]  # fmt: skip
                lines.append(f"  {stage.name}: val {'; '.join(parts)}")
            elif path.endswith("lvis_instances_results.json") and os.path.isfile(path):
                lines.append(f"  test-dev results file (validated): {path}")
    return lines
