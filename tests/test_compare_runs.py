"""compare_runs refuses runs on different datasets and diffs two csv files without torch."""

import csv
import subprocess
import sys

from conftest import REPO

from lvis_longtail.tools import compare_runs


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category_id", "name", "frequency", "train_image_count", "segm_AP"])
        w.writerows(rows)
    return path


ROWS = [[1, "apple", "f", 300, 40.0], [2, "yak", "r", 3, 5.0]]


def test_runs_on_different_datasets_are_refused(tmp_path, capsys):
    a = write_csv(tmp_path / "A" / "inference" / "lvis_v1_val" / "lvis_per_class.csv", ROWS)
    b = write_csv(tmp_path / "B" / "inference" / "lt_synthetic_val" / "lvis_per_class.csv", ROWS)
    assert compare_runs.main([str(a), str(b)]) == 2
    assert "A is an evaluation of 'lvis_v1_val', B of 'lt_synthetic_val'" in capsys.readouterr().err
    other = write_csv(tmp_path / "c.csv", [[1, "apple", "f", 300, 41.0], [2, "bus", "c", 30, 1.0]])
    assert compare_runs.main([str(a), str(other)]) == 2
    assert "category 2 is 'yak' in A, 'bus' in B" in capsys.readouterr().err
    fewer = write_csv(tmp_path / "d.csv", ROWS[:1])
    assert compare_runs.main([str(a), str(fewer)]) == 2
    assert "category ids in one run only: [2]" in capsys.readouterr().err
    same = write_csv(tmp_path / "C" / "inference" / "lvis_v1_val" / "lvis_per_class.csv", ROWS)
    assert compare_runs.main([str(a), str(same)]) == 0


def test_two_csv_files_are_compared_without_torch(tmp_path):
    a = write_csv(tmp_path / "a.csv", ROWS)
    b = write_csv(tmp_path / "b.csv", [[1, "apple", "f", 300, 42.0], [2, "yak", "r", 3, 9.5]])
    blocker = (
        "import sys, runpy\n"
        "for m in ('torch', 'detectron2', 'torchvision'):\n"
        "    sys.modules[m] = None  # any import of them raises ImportError\n"
        f"sys.argv = ['compare_runs', {str(a)!r}, {str(b)!r}]\n"
        "runpy.run_module('lvis_longtail.tools.compare_runs', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mean change B - A: +3.25" in proc.stdout
    assert "yak" in proc.stdout and "+4.5" in proc.stdout
