"""The long-tail benchmark's planning, aggregation and table code (no training)."""

import importlib.util
import math
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "longtail.py")


@pytest.fixture(scope="module")
def lt():
    spec = importlib.util.spec_from_file_location("benchmark_longtail", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metrics(ap, apr, apc, apf):
    task = {"AP": ap, "APr": apr, "APc": apc, "APf": apf}
    return {"bbox": dict(task), "segm": {k: v / 2 for k, v in task.items()}}


CLASSES = {
    1: {"name": "a", "frequency": "f", "thin": False, "train_instances": 500},
    2: {"name": "b", "frequency": "r", "thin": True, "train_instances": 3},
    3: {"name": "c", "frequency": "c", "thin": True, "train_instances": 40},
}


def test_mean_std(lt):
    assert lt.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std
    assert lt.mean_std([4.0]) == (4.0, 0.0)
    assert lt.mean_std([float("nan"), 2.0]) == (2.0, 0.0)
    assert all(math.isnan(v) for v in lt.mean_std([]))


def test_run_metrics_thin_average(lt):
    per_class = {"bbox": {"1": 30.0, "2": 0.0, "3": 10.0}, "segm": {"1": 20.0, "2": 2.0, "3": 4.0}}
    m = lt.run_metrics(_metrics(10, 1, 5, 20), per_class, CLASSES)
    assert m["bbox/APr"] == 1 and m["segm/APf"] == 10
    assert m["segm/thin"] == pytest.approx(3.0)  # classes 2 and 3
    assert m["bbox/thin"] == pytest.approx(5.0)
    assert m["segm/filled"] == pytest.approx(20.0)
    assert "segm/thin" not in lt.run_metrics(_metrics(10, 1, 5, 20), None, CLASSES)


def test_aggregate_and_paired_delta(lt):
    per_run = {
        "softmax": {0: {"bbox/APr": 1.0, "wall_s": 100.0}, 1: {"bbox/APr": 3.0, "wall_s": 120.0}},
        "seesaw": {0: {"bbox/APr": 4.0, "wall_s": 110.0}, 1: {"bbox/APr": 5.0, "wall_s": 130.0}},
    }
    agg = lt.aggregate(per_run)
    assert agg["softmax"]["bbox/APr"] == (2.0, pytest.approx(math.sqrt(2)), 2)
    assert agg["seesaw"]["d_bbox/APr"][:2] == (2.5, pytest.approx(math.sqrt(0.5)))
    assert "d_wall_s" not in agg["seesaw"]  # only AP metrics get deltas
    table = lt.markdown_table(agg, lt.METHODS)
    rows = table.splitlines()
    assert len(rows) == 4 and rows[0].startswith("| Method |")
    assert "| SoftmaxCE (no RFS) |" in rows[2] and "2.0 ± 1.4" in rows[2] and "110 ± 14" in table
    assert "+2.5 ± 0.7" in lt.delta_table(agg, lt.METHODS)


def test_schedule_scales_base(lt):
    opts = dict(zip(*[iter(lt.schedule_opts(1500, finetune=False))] * 2))
    assert opts["SOLVER.STEPS"] == "(1100, 1400)" and opts["SOLVER.WARMUP_ITERS"] == "100"
    ft = dict(zip(*[iter(lt.schedule_opts(1500, finetune=True))] * 2))
    assert ft["SOLVER.MAX_ITER"] == "500" and ft["SOLVER.STEPS"] == "(350, 450)"


def test_plan_runs_finetune_depends_on_its_seed(lt, tmp_path):
    args = lt.parse_args(["--seeds", "0", "1", "--methods", "bags", "--output", str(tmp_path)])
    runs = lt.plan_runs(args)
    keys = [r.key for r in runs]
    assert keys == ["softmax_rfs/seed0", "bags/seed0", "softmax_rfs/seed1", "bags/seed1"]
    bags = [r for r in runs if r.method.name == "bags"]
    assert [r.deps[0].key for r in bags] == ["softmax_rfs/seed0", "softmax_rfs/seed1"]
    cmd = lt.run_command(bags[1], args)
    assert cmd[cmd.index("MODEL.WEIGHTS") + 1].endswith(os.path.join("seed1", "model_final.pth"))
    assert cmd[cmd.index("SEED") + 1] == "1"
    assert "DATALOADER.REPEAT_THRESHOLD" in cmd
    noRFS = lt.run_command(lt.Run(lt.METHODS_BY_NAME["softmax"], 0, "x"), args)
    assert "DATALOADER.REPEAT_THRESHOLD" not in noRFS and "TrainingSampler" in noRFS


def test_wall_span_of_overlapping_invocations(lt):
    runs = [{"start_ts": 0.0, "wall_s": 100.0}, {"start_ts": 50.0, "wall_s": 100.0}]
    assert lt.wall_span(runs) == 150.0
    assert lt.wall_span([{"wall_s": 10.0}, {"wall_s": 5.0}]) == 15.0
