"""Outputs after a killed or failed write: temporary files of killed writes are removed by the
next write of the same output (the json helper, the results export, checkpoints), a full disk
names the file, and duplicate category names of a dataset json are warned with their ids."""

import errno
import json
import logging
import os

import numpy as np
import pytest
from fault_helpers import dead_pid, temp_of

from lvis_longtail.utils import io as io_mod
from lvis_longtail.utils.io import STALE_AFTER_S, atomic_write, write_json_atomic


def test_killed_writers_temp_files_are_removed_by_the_next_write(tmp_path):
    out = str(tmp_path / "metrics.json")
    killed = temp_of(out, dead_pid())
    running = temp_of(out, os.getpid())  # a writer of this process that still runs
    other_host_fresh = temp_of(out, 1, host="elsewhere")
    other_host_old = temp_of(out, 2, host="elsewhere", age_s=STALE_AFTER_S + 60)
    other_output = temp_of(str(tmp_path / "metrics.json.bak"), dead_pid())
    write_json_atomic({"AP": 1.0}, out)
    assert json.loads(open(out).read()) == {"AP": 1.0}
    left = set(os.listdir(tmp_path))
    assert os.path.basename(killed) not in left
    assert os.path.basename(other_host_old) not in left
    for kept in (running, other_host_fresh, other_output):
        assert os.path.basename(kept) in left


def test_full_disk_names_the_file_and_leaves_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "lvis_instances_results.json"
    write_json_atomic([1], str(out))
    real_fsync = os.fsync

    def full(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(io_mod.os, "fsync", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*lvis_instances_results\.json'"):
        write_json_atomic([1, 2], str(out))
    assert json.loads(out.read_text()) == [1]
    assert os.listdir(tmp_path) == [out.name]


def test_results_export_removes_the_temporary_file_of_a_killed_export(tmp_path):
    from lvis_longtail.evaluation.results import SplitIndex, write_results_file
    from lvis_longtail.evaluation.table import DetectionTable

    path = tmp_path / "lvis_instances_results.json"
    killed = temp_of(str(path), dead_pid())
    split = SplitIndex({"images": [{"id": 1, "height": 9, "width": 9}], "categories": [{"id": 4}]})
    table = DetectionTable(
        image_id=np.ones(2, np.int64),
        category_id=np.array([4, 4], np.int64),
        score=np.array([0.9, 0.5]),
        bbox=np.tile([1.0, 2.0, 3.0, 4.0], (2, 1)),
    )
    write_results_file(table, str(path), split, with_masks=False)
    assert len(json.loads(path.read_text())) == 2
    assert not os.path.exists(killed)
    assert os.listdir(tmp_path) == [path.name]


def test_a_write_error_without_a_file_name_gets_the_destination(tmp_path):
    with pytest.raises(PermissionError, match=r"denied: '.*out\.txt'"):
        with atomic_write(str(tmp_path / "out.txt")) as f:
            f.write("a")
            raise PermissionError(errno.EACCES, "Permission denied")
    assert os.listdir(tmp_path) == []


def test_duplicate_category_names_are_warned_with_their_ids(tmp_path, caplog):
    from lvis_longtail.data.lvis_json import validate_lvis_dict

    data = {
        "images": [{"id": 1, "height": 8, "width": 8, "file_name": "a.jpg"}],
        "categories": [
            {"id": 1, "name": "bat"},
            {"id": 2, "name": "ball"},
            {"id": 5, "name": "Bat "},
            {"id": 9, "name": "ball"},
            {"id": 11, "name": "cup"},
        ],
        "annotations": [],
    }
    with caplog.at_level(logging.WARNING, logger="lvis_longtail.data.lvis_json"):
        validate_lvis_dict(data, "cats.json")
    warned = [r.getMessage() for r in caplog.records if "category names" in r.getMessage()]
    assert len(warned) == 1
    assert "cats.json" in warned[0]
    assert "'ball': ids [2, 9]" in warned[0] and "'bat': ids [1, 5]" in warned[0]
    assert "cup" not in warned[0]
