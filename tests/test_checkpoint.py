"""Checkpoints: written atomically (a failed save leaves the previous checkpoint and
``last_checkpoint`` as they were), verified on load (an unreadable file is named; --resume
falls back to the newest readable one and says which iterations are trained again; a bad
MODEL.WEIGHTS names the key and the file), pruned by SOLVER.CHECKPOINT_KEEP."""

import errno
import logging
import os

import pytest
import torch
from conftest import TINY_BASE
from fault_helpers import dead_pid, temp_of
from torch import nn

from lvis_longtail.config import ConfigError
from lvis_longtail.engine import checkpoint as ckpt_mod
from lvis_longtail.engine import setup_cfg
from lvis_longtail.engine.checkpoint import CheckpointReadError, LongTailCheckpointer


class Counter:
    """A checkpointable holding an iteration, as the trainer does."""

    def __init__(self):
        self.iteration = -1

    def state_dict(self):
        return {"iteration": self.iteration}

    def load_state_dict(self, state):
        self.iteration = state["iteration"]


def checkpointer(folder, keep=0):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return LongTailCheckpointer(model, str(folder), save_to_disk=True, keep=keep, trainer=Counter())


def save_at(ckpt, iteration, name=None):
    with torch.no_grad():
        ckpt.model.weight.fill_(iteration)
    ckpt.checkpointables["trainer"].iteration = iteration
    ckpt.save(name or f"model_{iteration:07d}", iteration=iteration)


def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def test_a_failed_save_leaves_the_previous_checkpoint_and_last_checkpoint(tmp_path, monkeypatch):
    ckpt = checkpointer(tmp_path)
    save_at(ckpt, 1)
    before = (tmp_path / "model_0000001.pth").read_bytes()
    real_fsync = os.fsync

    def disk_full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match=r"No space left on device: '.*model_0000003\.pth'"):
        save_at(ckpt, 3)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert (tmp_path / "model_0000001.pth").read_bytes() == before


def test_a_torch_write_error_names_the_checkpoint(tmp_path, monkeypatch):
    ckpt = checkpointer(tmp_path)

    def failing_save(obj, f):
        f.write(b"PK\x03\x04")
        try:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        except OSError:  # torch's zip writer reports a failed write as a RuntimeError
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match=r"Input/output error: '.*model_final\.pth'"):
        ckpt.save("model_final")
    assert os.listdir(tmp_path) == []


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, caplog):
    ckpt = checkpointer(tmp_path)
    for it in (1, 3, 5):
        save_at(ckpt, it)
    truncate(tmp_path / "model_0000005.pth")
    (tmp_path / "model_0000003.pth").write_bytes(b"")
    fresh = checkpointer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lvis_longtail.engine.checkpoint"):
        extra = fresh.resume_or_load("", resume=True)
    assert extra["iteration"] == 1 and fresh.checkpointables["trainer"].iteration == 1
    assert torch.equal(fresh.model.weight, torch.full((2, 3), 1.0))
    text = caplog.text
    assert "model_0000005.pth: cannot read the checkpoint" in text
    assert "model_0000003.pth: cannot read the checkpoint (0 bytes" in text
    assert "PytorchStreamReader" in text  # torch's reason, after the file's name
    assert "iterations 2 to 5 are trained again" in text


def test_resume_with_no_readable_checkpoint_names_every_file(tmp_path):
    ckpt = checkpointer(tmp_path)
    save_at(ckpt, 1)
    save_at(ckpt, 3)
    truncate(tmp_path / "model_0000001.pth")
    truncate(tmp_path / "model_0000003.pth", keep=0.9)
    with pytest.raises(CheckpointReadError) as info:
        checkpointer(tmp_path).resume_or_load("", resume=True)
    assert "model_0000003.pth" in str(info.value) and "model_0000001.pth" in str(info.value)


def test_last_checkpoint_naming_a_missing_file_falls_back(tmp_path):
    ckpt = checkpointer(tmp_path)
    save_at(ckpt, 1)
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    fresh = checkpointer(tmp_path)
    assert fresh.resume_or_load("", resume=True)["iteration"] == 1


@pytest.mark.parametrize("pointer", [b"\xff\xfe\x00garbage", b"model_\xe9\x00.pth"])
def test_an_undecodable_last_checkpoint_falls_back_with_a_warning(tmp_path, caplog, pointer):
    ckpt = checkpointer(tmp_path)
    save_at(ckpt, 1)
    save_at(ckpt, 3)
    (tmp_path / "last_checkpoint").write_bytes(pointer)
    fresh = checkpointer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lvis_longtail.engine.checkpoint"):
        assert fresh.resume_or_load("", resume=True)["iteration"] == 3
    assert f"{tmp_path / 'last_checkpoint'} is not a readable file name (UnicodeDecodeError" in (
        caplog.text
    )
    assert f"Resuming from {tmp_path / 'model_0000003.pth'}, the newest checkpoint" in caplog.text
    # model_final.pth (written last by training) first; then the periodic ones
    save_at(ckpt, 5, name="model_final")
    (tmp_path / "last_checkpoint").write_bytes(pointer)
    assert checkpointer(tmp_path).resume_or_load("", resume=True)["iteration"] == 5
    truncate(tmp_path / "model_final.pth")
    with caplog.at_level(logging.WARNING, logger="lvis_longtail.engine.checkpoint"):
        assert checkpointer(tmp_path).resume_or_load("", resume=True)["iteration"] == 3
    assert "model_final.pth: cannot read the checkpoint" in caplog.text
    assert "instead of the newest checkpoint (last_checkpoint unreadable)" in caplog.text


def test_an_undecodable_last_checkpoint_and_no_checkpoint_is_an_error(tmp_path):
    (tmp_path / "last_checkpoint").write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointReadError, match="last_checkpoint is not readable and there is"):
        checkpointer(tmp_path).resume_or_load("", resume=True)


def test_missing_model_weights_names_the_key_and_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointReadError) as info:
        checkpointer(tmp_path).resume_or_load(str(missing), resume=False)
    assert str(info.value).startswith(f"MODEL.WEIGHTS: {missing}: checkpoint file not found")
    assert checkpointer(tmp_path).resume_or_load("", resume=False) == {}  # "": from scratch


def test_bad_model_weights_names_the_key_and_the_file(tmp_path):
    ckpt = checkpointer(tmp_path)
    ckpt.save("model_final")
    truncate(tmp_path / "model_final.pth")
    weights = str(tmp_path / "model_final.pth")
    with pytest.raises(CheckpointReadError, match=r"^MODEL.WEIGHTS: .*model_final\.pth: cannot"):
        checkpointer(tmp_path / "other").resume_or_load(weights, resume=False)
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointReadError, match=r"notes\.pth: cannot read the checkpoint"):
        checkpointer(tmp_path / "other").resume_or_load(str(tmp_path / "notes.pth"), resume=False)


def test_checkpoint_keep_prunes_old_periodic_checkpoints_only(tmp_path):
    ckpt = checkpointer(tmp_path, keep=2)
    for it in (1, 3, 5, 7):
        save_at(ckpt, it)
    save_at(ckpt, 7, name="model_final")
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_0000005.pth",
        "model_0000007.pth",
        "model_final.pth",
    ]
    # the checkpoint last_checkpoint names is never deleted, even when it is not the newest
    ckpt.keep = 0
    save_at(ckpt, 9)
    (tmp_path / "last_checkpoint").write_text("model_0000005.pth")
    ckpt.keep = 1
    assert ckpt.prune() == ["model_0000007.pth"]
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("model_0")) == [
        "model_0000005.pth",
        "model_0000009.pth",
    ]


def test_default_keeps_every_checkpoint_and_negative_keep_is_a_config_error(tmp_path):
    ckpt = checkpointer(tmp_path)
    for it in range(5):
        save_at(ckpt, it)
    assert len([f for f in os.listdir(tmp_path) if f.startswith("model_")]) == 5
    with pytest.raises(ConfigError, match=r"SOLVER.CHECKPOINT_KEEP must be >= 0"):
        setup_cfg(str(TINY_BASE), ["SOLVER.CHECKPOINT_KEEP", "-1"])


def test_a_killed_saves_temporary_file_is_removed_by_the_next_save(tmp_path):
    ckpt = checkpointer(tmp_path)
    killed = temp_of(str(tmp_path / "model_0000003.pth"), dead_pid())
    save_at(ckpt, 5)  # another name: the first save of a run sweeps every checkpoint's
    assert not os.path.exists(killed)
