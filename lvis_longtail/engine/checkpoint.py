"""Checkpoints that survive a crash: written atomically, verified on load, pruned on request.

:class:`LongTailCheckpointer` is detectron2's ``DetectionCheckpointer`` except for:

- ``save``: the checkpoint goes to a temporary file in ``OUTPUT_DIR``, fsynced, renamed over
  ``<name>.pth`` (:func:`lvis_longtail.utils.io.atomic_write`), and only then is
  ``last_checkpoint`` replaced, itself atomically. A crash at any point leaves
  ``last_checkpoint`` naming a complete file. Temporary files of killed saves are removed by
  the next save. With ``keep > 0`` the oldest periodic checkpoints (``model_XXXXXXX.pth``)
  beyond the newest ``keep`` are deleted after each save (``SOLVER.CHECKPOINT_KEEP``);
  ``model_final.pth`` and the file ``last_checkpoint`` names are never deleted.
- ``_load_file``: a file torch cannot read (truncated, corrupted, not a checkpoint) raises
  :class:`CheckpointReadError` naming it, not torch's ``PytorchStreamReader`` message.
- ``resume_or_load``: with ``resume``, a checkpoint that cannot be read is skipped for the
  newest older one that can, with a warning naming the iterations trained again; a
  ``last_checkpoint`` that names a missing file, or that is not a readable file name at all,
  falls back to the checkpoints in the folder the same way. A bad or missing local
  ``MODEL.WEIGHTS`` file is an error that names the key and the file.
"""

import logging
import os
import re
from typing import List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

from lvis_longtail.utils.io import atomic_write, remove_stale_temps

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"
# detectron2's PeriodicCheckpointer names: model_{iteration:07d}.pth and model_final.pth
PERIODIC = re.compile(r"^model_(\d{7})\.pth$")
FINAL = "model_final.pth"


class CheckpointReadError(RuntimeError):
    """A checkpoint file that cannot be read; the message names the file."""


def checkpoint_iteration(path: str) -> Optional[int]:
    """The iteration in a periodic checkpoint's name (``model_0004999.pth`` -> 4999)."""
    match = PERIODIC.match(os.path.basename(path))
    return int(match.group(1)) if match else None


def _write_error(path: str, error: Exception) -> Exception:
    """torch.save reports a failed write of a file object as a RuntimeError of its zip
    writer; the OSError behind it (ENOSPC, EIO, ...) is its context. Name the file."""
    cause = error.__context__ or error.__cause__
    if isinstance(cause, OSError) and cause.errno is not None:
        return OSError(cause.errno, cause.strerror, path)
    return RuntimeError(f"{path}: writing the checkpoint failed: {error}")


class LongTailCheckpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer``, made crash-safe (see the module docstring).

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        keep: periodic checkpoints kept after each save; 0 keeps all.
    """

    def __init__(self, model, save_dir="", *, save_to_disk=None, keep: int = 0, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        if keep < 0:
            raise ValueError(f"SOLVER.CHECKPOINT_KEEP must be >= 0 (0 keeps all), got {keep}")
        self.keep = int(keep)
        self._swept = False

    @classmethod
    def replacing(cls, checkpointer, keep: int = 0) -> "LongTailCheckpointer":
        """A :class:`LongTailCheckpointer` with ``checkpointer``'s model, folder and
        checkpointables (e.g. the one ``DefaultTrainer.__init__`` made)."""
        return cls(
            checkpointer.model,
            checkpointer.save_dir,
            save_to_disk=checkpointer.save_to_disk,
            keep=keep,
            **checkpointer.checkpointables,
        )

    def save(self, name: str, **kwargs) -> None:
        """``Checkpointer.save``, written atomically, then ``last_checkpoint``, then pruned."""
        if not self.save_dir or not self.save_to_disk:
            return
        if "://" in self.save_dir:  # not a local folder: fvcore's path manager writes it
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        if not self._swept:  # temporary files of saves killed in an earlier run
            remove_stale_temps(self.save_dir, "model_*.pth")
            self._swept = True
        self.logger.info(f"Saving checkpoint to {path}")
        with atomic_write(path, "wb") as f:
            try:
                torch.save(data, f)
            except RuntimeError as e:
                raise _write_error(path, e) from e
        self.tag_last_checkpoint(os.path.basename(path))
        if self.keep:
            self.prune()

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        with atomic_write(os.path.join(self.save_dir, LAST_CHECKPOINT)) as f:
            f.write(last_filename_basename)

    def prune(self) -> List[str]:
        """Delete the periodic checkpoints older than the newest ``keep`` (never
        ``model_final.pth`` nor the one ``last_checkpoint`` names). Returns the deleted."""
        periodic = sorted(f for f in os.listdir(self.save_dir) if PERIODIC.match(f))
        current = os.path.basename(self.get_checkpoint_file())
        deleted = []
        for name in periodic[: max(0, len(periodic) - self.keep)]:
            if name != current:
                os.remove(os.path.join(self.save_dir, name))
                deleted.append(name)
        if deleted:
            self.logger.info(f"SOLVER.CHECKPOINT_KEEP {self.keep}: deleted {deleted}")
        return deleted

    def _load_file(self, filename: str):
        try:
            loaded = super()._load_file(filename)
        except Exception as e:  # torch, pickle and zip errors alike: the file is unusable
            size = os.path.getsize(filename) if os.path.isfile(filename) else None
            detail = f"{size:,} bytes" if size is not None else "missing"
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointReadError(
                f"{filename}: cannot read the checkpoint ({detail}; truncated or corrupted?): "
                f"{type(e).__name__}: {reason}"
            ) from e
        if not isinstance(loaded.get("model"), dict):
            raise CheckpointReadError(f"{filename}: not a checkpoint: no 'model' state dict")
        return loaded

    def get_checkpoint_file(self) -> str:
        """What ``last_checkpoint`` names, or "" when it is absent or not a file name
        (undecodable bytes, e.g. a damaged disk block): then :meth:`_resume` tries the
        checkpoints in the folder."""
        try:
            return super().get_checkpoint_file()
        except (UnicodeDecodeError, ValueError) as e:
            pointer = os.path.join(self.save_dir, LAST_CHECKPOINT)
            logger.warning(
                f"{pointer} is not a readable file name ({type(e).__name__}: {e}); trying the "
                f"checkpoints in {self.save_dir}"
            )
            return ""

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict:
        if resume and self.has_checkpoint():
            return self._resume()
        if path and "://" not in path and not os.path.isfile(path):
            raise CheckpointReadError(
                f"MODEL.WEIGHTS: {path}: checkpoint file not found "
                f"(resolved: {os.path.abspath(path)})"
            )
        try:
            return self.load(path, checkpointables=[])
        except CheckpointReadError as e:
            raise CheckpointReadError(f"MODEL.WEIGHTS: {e}") from e.__cause__

    def _candidates(self, pointed: str) -> List[str]:
        """``pointed`` (what ``last_checkpoint`` names), then the periodic checkpoints older
        than it (all of them when its iteration is unknown), newest first. Without
        ``pointed`` (an unreadable ``last_checkpoint``), ``model_final.pth`` comes first."""
        limit = checkpoint_iteration(pointed)
        names = sorted(os.listdir(self.save_dir), reverse=True)
        older = [
            os.path.join(self.save_dir, f)
            for f in names
            if PERIODIC.match(f) and (limit is None or checkpoint_iteration(f) < limit)
        ]
        if not pointed:
            return ([os.path.join(self.save_dir, FINAL)] if FINAL in names else []) + older
        return [pointed] + [p for p in older if p != pointed]

    def _resume(self) -> dict:
        """Load the newest checkpoint that can be read, starting at ``last_checkpoint``'s."""
        pointed = self.get_checkpoint_file()
        failed = []
        for path in self._candidates(pointed):
            try:
                if not os.path.isfile(path):
                    raise CheckpointReadError(f"{path}: missing (named by {LAST_CHECKPOINT})")
                extra = self.load(path)
            except CheckpointReadError as e:
                logger.warning(f"{e}; trying the previous checkpoint")
                failed.append(str(e))
                continue
            if failed:
                logger.warning(_repeated_message(pointed, path, extra.get("iteration")))
            elif not pointed:
                logger.warning(f"Resuming from {path}, the newest checkpoint in the folder")
            return extra
        if not pointed and not failed:
            failed.append(f"{LAST_CHECKPOINT} is not readable and there is no checkpoint file")
        raise CheckpointReadError(
            f"--resume: no checkpoint in {self.save_dir} can be read:\n  " + "\n  ".join(failed)
        )


def _repeated_message(pointed: str, used: str, iteration: Optional[int]) -> str:
    lost = checkpoint_iteration(pointed)
    start = "?" if iteration is None else iteration + 1
    until = f"{lost}" if lost is not None else "the end of the lost checkpoint"
    pointed = pointed or f"the newest checkpoint ({LAST_CHECKPOINT} unreadable)"
    return (
        f"Resuming from {used} instead of {pointed}, which cannot be read: iterations "
        f"{start} to {until} are trained again."
    )
