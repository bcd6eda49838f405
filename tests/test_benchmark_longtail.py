"""The long-tail benchmark: interval math, per-class csv report, planning and run reuse (no
training)."""

import importlib.util
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from lvis_longtail.benchmark import methods as M
from lvis_longtail.benchmark import plan, report, stats

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "longtail.py")


@pytest.fixture(scope="module")
def driver():
    spec = importlib.util.spec_from_file_location("benchmark_longtail", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize(
    "df, q975", [(1, 12.706205), (2, 4.302653), (4, 2.776445), (9, 2.262157), (30, 2.042272)]
)
def test_t_quantile_matches_tables(df, q975):
    assert stats.t_quantile(0.975, df) == pytest.approx(q975, abs=2e-5)
    assert stats.t_quantile(0.025, df) == pytest.approx(-q975, abs=2e-5)
    assert stats.t_cdf(0.0, df) == pytest.approx(0.5)


def test_paired_t_ci_by_hand():
    ci = stats.paired_t_ci([1.0, 2.0, 3.0])  # mean 2, sd 1, half 4.302653 / sqrt(3)
    assert (ci.mean, ci.std, ci.n) == (2.0, 1.0, 3)
    assert ci.half_width == pytest.approx(4.302653 / math.sqrt(3), abs=1e-4)
    assert ci.low == pytest.approx(2 - 2.484138, abs=1e-4) and ci.excludes_zero is False
    assert stats.paired_t_ci([5.0, 5.2, 4.8, 5.0]).excludes_zero
    single = stats.paired_t_ci([3.0, float("nan")])
    assert single.n == 1 and single.mean == 3.0 and math.isnan(single.low)
    assert stats.paired_t_ci([]).n == 0


def test_seeds_needed_by_hand():
    # sd 1, half-width 1: t(5) / sqrt(6) = 1.049 > 1, t(6) / sqrt(7) = 0.925 <= 1
    assert stats.seeds_needed(1.0, 1.0) == 7
    assert stats.seeds_needed(0.0, 1.0) == 2
    assert stats.seeds_needed(100.0, 1.0, max_seeds=50) == 51
    with pytest.raises(ValueError, match="half_width"):
        stats.seeds_needed(1.0, 0.0)


def test_bootstrap_constant_and_degenerate():
    base = np.array([[10.0, 20.0, 30.0], [12.0, 22.0, 32.0]])
    assert stats.bootstrap_group_diff(base + 1.5, base) == pytest.approx((1.5, 1.5))
    varied = base + np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])  # class diffs 0, 1, 2
    low, high = stats.bootstrap_group_diff(varied, base)
    assert 0.0 <= low < 1.0 < high <= 2.0
    assert stats.bootstrap_group_diff(varied, base) == (low, high)  # deterministic
    assert stats.bootstrap_group_diff(base[:1], base[:1]) is None
    assert stats.bootstrap_group_diff(base * np.nan, base) is None
    with pytest.raises(ValueError, match="seeds, classes"):
        stats.bootstrap_group_diff(base[0], base[0])


# ----------------------------------------------------------------------------- report
CATEGORIES = [
    {"id": 1, "name": "a", "frequency": "f", "thin": False},
    {"id": 2, "name": "b", "frequency": "r", "thin": True},
    {"id": 3, "name": "c", "frequency": "r", "thin": False},
    {"id": 4, "name": "d", "frequency": "c", "thin": True},
]
CLASSES = report.class_info(CATEGORIES)


def _write_csv(path, bbox, segm):
    lines = ["category_id,name,frequency,bbox_AP,bbox_AP50,segm_AP"]
    for c in CATEGORIES:
        b, s = bbox.get(c["id"], ""), segm.get(c["id"], "")
        lines.append(f"{c['id']},{c['name']},{c['frequency']},{b},,{s}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_read_per_class_and_metrics(tmp_path):
    path = _write_csv(tmp_path / "pc.csv", {1: 40.0, 2: 10.0, 3: 20.0}, {1: 30.0, 2: 0.0, 3: 6.0})
    pc = report.read_per_class(path)
    assert pc["bbox"] == {1: 40.0, 2: 10.0, 3: 20.0}  # class 4: blank (no ground truth)
    m = report.run_metrics(pc, CLASSES)
    assert m["bbox/AP"] == pytest.approx(70 / 3) and m["bbox/APr"] == 15.0
    assert m["bbox/APf"] == 40.0 and math.isnan(m["bbox/APc"])
    assert m["segm/thin"] == 0.0 and m["segm/filled"] == 18.0  # thin: class 2 only
    bad = report.check_against_metrics(m, {"bbox": {"AP": 70 / 3, "APr": 15.0, "APf": 41.0}})
    assert bad == [("bbox/APf", 40.0, 41.0)]


def test_read_per_class_errors_name_file_line_column(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("category_id,frequency,bbox_AP\n1,f,30\n2,r,high\n")
    with pytest.raises(ValueError, match=r"bad.csv: line 3: bbox_AP 'high'"):
        report.read_per_class(str(bad))
    missing = tmp_path / "missing.csv"
    missing.write_text("category_id,bbox_AP\n1,3\n")
    with pytest.raises(ValueError, match=r"missing.csv: .*frequency"):
        report.read_per_class(str(missing))


def test_paired_difference_and_delta_table():
    def pc(ap1, ap2, ap3):
        return {"bbox": {1: ap1, 2: ap2, 3: ap3}, "segm": {1: ap1, 2: ap2, 3: ap3}}

    ref = {0: pc(40, 10, 20), 1: pc(42, 12, 22), 2: pc(41, 11, 21)}
    new = {0: pc(40, 12, 24), 1: pc(42, 14, 28), 2: pc(41, 12, 27)}  # APr diffs 3, 4, 3.5
    res = report.paired(new, ref, CLASSES, "bbox/APr")
    ci = res["ci"]
    assert res["seeds"] == [0, 1, 2] and ci.mean == pytest.approx(3.5)
    assert ci.std == pytest.approx(0.5) and ci.half_width == pytest.approx(1.242069, abs=1e-4)
    low, high = res["boot"]
    assert 1.0 <= low <= 3.5 <= high <= 6.0  # the (seed, class) cells range over 1-6
    table = report.delta_table(
        [("new", "New", "ref", "Ref")], {"new": new, "ref": ref}, CLASSES, ("bbox/APr",), target=1
    )
    row = table.splitlines()[2]
    assert row.startswith("| New | Ref | +3.5 [+2.3, +4.7]* {")
    assert row.endswith("| 4 |")  # sd 0.5: t(2) * 0.5 / sqrt(3) = 1.24 > 1, t(3) / 4 = 0.80
    summary = report.summary_table([("ref", "Ref")], {"ref": ref}, CLASSES, ("bbox/APf",))
    assert "| Ref | 41.0 ± 1.0 | 3 |" in summary


# ----------------------------------------------------------------------------- planning
def _settings(tmp_path, **kw):
    opts = dict(
        iters=300,
        pretrain_iters=600,
        device="cpu",
        repeat_threshold=0.13,
        output=str(tmp_path),
        datasets={k: (f"{k}.json", "img") for k in ("pretrain", "train", "val")},
        dataset_key="gen-v1",
        root=_REPO,
    )
    opts.update(kw)
    return plan.Settings(**opts)


def _opt(cmd, key):
    return cmd[cmd.index(key) + 1]


def test_plan_order_dependencies_and_commands(tmp_path):
    runs = plan.plan_runs(["bags", "eqlv2"], [0, 1], _settings(tmp_path))
    keys = [r.key for r in runs]
    assert keys[0] == "pretrain/seed0"
    assert keys[1:5] == ["softmax/seed0", "softmax_rfs/seed0", "bags/seed0", "eqlv2/seed0"]
    by_key = {r.key: r for r in runs}
    bags1 = by_key["bags/seed1"]
    assert [d.key for d in bags1.deps] == ["softmax_rfs/seed1"]
    assert _opt(bags1.cmd, "MODEL.WEIGHTS").endswith(os.path.join("seed1", "model_final.pth"))
    assert _opt(bags1.cmd, "SOLVER.MAX_ITER") == "100"  # a third of 300
    eqlv2 = by_key["eqlv2/seed1"]
    assert _opt(eqlv2.cmd, "MODEL.WEIGHTS").endswith(plan.INIT_FILE)
    assert _opt(eqlv2.cmd, "SEED") == "1" and "DATALOADER.REPEAT_THRESHOLD" not in eqlv2.cmd
    assert _opt(eqlv2.cmd, "DATASETS.TEST") == "('lt_bench_val',)"
    pre = runs[0].cmd
    assert _opt(pre, "DATASETS.TRAIN") == "('lt_bench_pretrain',)"
    assert _opt(pre, "SOLVER.STEPS") == "(420, 540)" and _opt(pre, "DATASETS.TEST") == "()"
    scratch = plan.plan_runs(["softmax"], [0], _settings(tmp_path, pretrain_iters=0))
    assert [r.key for r in scratch] == ["softmax/seed0"]
    assert _opt(scratch[0].cmd, "MODEL.WEIGHTS") == ""


def test_eval_only_row_and_reference_rules(tmp_path):
    tta = M.Method("tta_opts", "TTA", M.SOFTMAX, ("TEST.AUG.ENABLED", "True"), base="softmax_rfs",
                   eval_only=True)  # fmt: skip
    table = M.METHODS + (tta,)
    runs = plan.plan_runs(["tta_opts"], [0], _settings(tmp_path), methods=table)
    run = runs[-1]
    assert run.cmd[4] == "--eval-only" and "SOLVER.MAX_ITER" not in run.cmd
    assert _opt(run.cmd, "TEST.AUG.ENABLED") == "True"
    assert _opt(run.cmd, "MODEL.WEIGHTS").endswith(
        os.path.join("softmax_rfs", "seed0", "model_final.pth")
    )
    by = M.methods_by_name(table)
    assert by["tta_opts"].reference == "softmax_rfs" and by["eqlv2"].reference == "softmax"
    assert by["dicebce"].reference == "softmax_rfs" and by["softmax"].reference is None
    assert by["softmax_rfs"].reference == "softmax"
    assert "bags_long" not in M.default_methods()
    # every row's config exists, and the rows of the newer capabilities plan their runs
    for m in M.METHODS:
        assert os.path.isfile(os.path.join(_REPO, "configs", m.config)), m.config
    assert by["htc_lite"].reference == "cascade" and by["norcal"].kind == "eval"
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        M.methods_by_name(M.METHODS + (M.Method("x", "X", M.SOFTMAX, base="nope"),))
    with pytest.raises(ValueError, match="KEY VALUE"):
        M.Method("x", "X", M.SOFTMAX, ("ONLY.KEY",))
    with pytest.raises(ValueError, match="unknown benchmark methods"):
        plan.plan_runs(["nope"], [0], _settings(tmp_path))


def test_schedule_multiplier_scales_a_training_row(tmp_path):
    by = {r.key: r for r in plan.plan_runs(["recipe_mmdet2020"], [0], _settings(tmp_path))}
    # the recipe and its plain reference at 4x (1200 iterations, steps at 70 % / 90 %) and
    # the reference's own reference at 1x
    for key in ("recipe_mmdet2020/seed0", "seesaw_4x/seed0"):
        assert _opt(by[key].cmd, "SOLVER.MAX_ITER") == "1200"
        assert _opt(by[key].cmd, "SOLVER.STEPS") == "(840, 1080)"
    assert _opt(by["seesaw/seed0"].cmd, "SOLVER.MAX_ITER") == "300"
    assert by["seesaw_4x/seed0"].fingerprint != by["seesaw/seed0"].fingerprint
    assert M.methods_by_name()["recipe_mmdet2020"].reference == "seesaw_4x"
    with pytest.raises(ValueError, match="schedule"):
        M.Method("x", "X", M.SOFTMAX, base="softmax", schedule=2.0)
    with pytest.raises(ValueError, match="schedule"):
        M.Method("x", "X", M.SOFTMAX, schedule=0.0)


def test_fingerprint_follows_upstream_changes(tmp_path):
    a = {r.key: r for r in plan.plan_runs(["bags"], [0], _settings(tmp_path))}
    b = {r.key: r for r in plan.plan_runs(["bags"], [0], _settings(tmp_path, pretrain_iters=500))}
    c = {r.key: r for r in plan.plan_runs(["bags"], [0], _settings(tmp_path, dataset_key="v2"))}
    same = {r.key: r for r in plan.plan_runs(["bags"], [0], _settings(tmp_path))}
    for key in a:
        assert a[key].fingerprint == same[key].fingerprint
        assert a[key].fingerprint != b[key].fingerprint  # the pre-training changed
        assert a[key].fingerprint != c[key].fingerprint  # the data changed
    assert schedule_pairs(plan.schedule_opts(1000, False)) == {
        "SOLVER.MAX_ITER": "1000",
        "SOLVER.WARMUP_ITERS": "100",
        "SOLVER.STEPS": "(700, 900)",
        "SOLVER.CHECKPOINT_PERIOD": "10000",
    }


def test_fingerprint_follows_the_config_content(tmp_path):
    """Editing what a config sets (or its base) retrains its runs; editing comments does not."""
    configs = tmp_path / "configs"
    shutil.copytree(os.path.join(_REPO, "configs"), configs)
    s = _settings(tmp_path, configs=str(configs), root="")

    def prints():
        return {r.key: r.fingerprint for r in plan.plan_runs(["htc_lite", "bags"], [0], s)}

    before = prints()
    keys = [r.config_key for r in plan.plan_runs(["htc_lite", "bags"], [0], s)]
    here = plan.plan_runs(["htc_lite", "bags"], [0], _settings(tmp_path))
    assert keys == [r.config_key for r in here]  # the copy has the repository's content
    leaf = configs / "tiny" / "htc_lite_R18_FPN_tiny_seesaw.yaml"
    leaf.write_text("# a new comment\n" + leaf.read_text())
    assert prints() == before
    leaf.write_text(leaf.read_text().replace("CONV_DIM: 64", "CONV_DIM: 32"))
    after = prints()
    assert after["htc_lite/seed0"] != before["htc_lite/seed0"]
    assert {k: v for k, v in after.items() if k != "htc_lite/seed0"} == {
        k: v for k, v in before.items() if k != "htc_lite/seed0"
    }
    base = configs / "tiny" / "Base-MaskRCNN-Tiny.yaml"  # every row and the pre-training
    base.write_text(base.read_text().replace("\nSEED: 0\n", "\nSEED: 5\n"))
    assert all(after[k] != v for k, v in prints().items())
    content = plan.config_content(str(leaf))
    assert content["MODEL"]["ROI_CONTEXT_HEAD"]["CONV_DIM"] == 32  # the leaf's value
    assert content["MODEL"]["ROI_HEADS"]["NAME"] == "LongTailHTCLiteROIHeads"
    assert "_BASE_" not in content and "OUTPUT_DIR" not in content
    assert content["SEED"] == 5 and content["VERSION"] == 2  # from the base, node by node


def schedule_pairs(opts):
    return dict(zip(opts[::2], opts[1::2]))


def test_execute_reuses_finished_runs(tmp_path, driver):
    counter = tmp_path / "count.txt"
    script = f"open({str(counter)!r}, 'a').write('x')"
    runs = plan.plan_runs(["softmax", "softmax_rfs"], [0], _settings(tmp_path, pretrain_iters=0))
    for run in runs:
        run.cmd = [sys.executable, "-c", script]
    driver.execute(runs, jobs=2, threads=1, force=False, poll_s=0.05)
    assert counter.read_text() == "xx" and all(r.done() for r in runs)
    rec = runs[0].record()
    assert rec["rc"] == 0 and rec["fingerprint"] == runs[0].fingerprint and rec["wall_s"] >= 0
    assert rec["init"] == "scratch"  # no pre-training: nothing shared to descend from
    driver.execute(runs, jobs=2, threads=1, force=False, poll_s=0.05)  # nothing to do
    assert counter.read_text() == "xx"
    runs[1].cmd = runs[1].cmd + ["changed"]  # a changed command is stale: rerun only it
    assert not runs[1].done()
    driver.execute(runs, jobs=2, threads=1, force=False, poll_s=0.05)
    assert counter.read_text() == "xxx"
    failing = plan.plan_runs(["bags"], [0], _settings(tmp_path / "f", pretrain_iters=0))
    assert [r.name for r in failing] == ["softmax", "softmax_rfs", "bags"]
    for run in failing:
        run.cmd = [sys.executable, "-c", script]
    failing[1].cmd = [sys.executable, "-c", "raise SystemExit(3)"]
    driver.execute(failing, jobs=1, threads=1, force=False, poll_s=0.05)
    assert failing[1].record()["rc"] == 3 and not failing[1].done()
    assert failing[2].record() is None  # its base failed: skipped
    assert counter.read_text() == "xxxx"  # softmax ran


def test_driver_modes(driver, tmp_path):
    cpu = driver.parse_args(["--output", str(tmp_path)])
    assert (cpu.mode, cpu.seeds, cpu.iters, cpu.pretrain_iters, cpu.jobs) == (
        "cpu", [0, 1, 2], 250, 1000, 2,
    )  # fmt: skip
    quick = driver.parse_args(["--quick"])
    assert (quick.mode, quick.seeds, quick.iters) == ("quick", [0], 60)
    gpu = driver.parse_args(["--device", "cuda", "--pretrain-iters", "0"])
    assert (gpu.mode, len(gpu.seeds), gpu.iters, gpu.pretrain_iters) == ("cuda", 5, 1000, 0)
    assert cpu.methods == list(M.CPU_ROWS) and quick.methods == list(M.CPU_ROWS)
    assert gpu.methods == list(M.default_methods()) and "bags_long" not in gpu.methods
    assert driver.parse_args(["--methods", "all"]).methods == list(M.default_methods())
    assert set(M.CPU_ROWS) <= set(M.default_methods())
    with open(os.devnull, "w"):
        assert json.loads(json.dumps(driver.DATASETS))  # generator options are plain json


def test_page_from_finished_runs(tmp_path, driver):
    """The results page from constructed run folders: tables, intervals, csv/json check."""
    from lvis_longtail.benchmark import page

    val_json = tmp_path / "val.json"
    val_json.write_text(json.dumps({"images": [{"id": 1}], "categories": CATEGORIES}))
    args = driver.parse_args(["--seeds", "0", "1", "--output", str(tmp_path / "runs")])
    args.results = str(tmp_path / "results")
    runs = plan.plan_runs(["softmax_rfs", "dicebce"], [0, 1], _settings(tmp_path / "runs"))
    ap = {"softmax": 30.0, "softmax_rfs": 31.0, "dicebce": 33.0}
    for run in runs[1:]:  # not the pre-training run: the page reads the rows
        out = os.path.join(run.out_dir, "inference", plan.DATASET_NAMES["val"])
        os.makedirs(out)
        v = ap[run.name] + run.seed
        _write_csv(tmp_path / "pc.csv", {1: v, 2: v - 20, 3: v - 10}, {1: v, 2: v - 25, 3: 0.0})
        os.replace(tmp_path / "pc.csv", os.path.join(out, page.CSV_FILE))
        lvis = {"bbox": {"AP": v - 10, "APr": v - 15, "APc": -1, "APf": v + 1}}  # APf off by 1
        with open(os.path.join(out, page.METRICS_FILE), "w") as f:
            json.dump(lvis, f)
        with open(os.path.join(run.out_dir, plan.RUN_FILE), "w") as f:
            json.dump({"rc": 0, "fingerprint": run.fingerprint, "wall_s": 60.0}, f)
    missing = next(r for r in runs if r.key == "softmax/seed1")
    os.remove(os.path.join(missing.out_dir, "inference", plan.DATASET_NAMES["val"], page.CSV_FILE))
    path = page.write(args, runs, driver.DATASETS, str(val_json))
    text = open(path).read()
    assert path.endswith("longtail.md")
    assert "| SoftmaxCE + RFS | 21.5 ± 0.7 |" in text  # bbox AP: v - 10, v = 31 + seed
    assert "| DiceBCEMaskHead + RFS | SoftmaxCE + RFS | +2.0 |" not in text  # 2 seeds: intervals
    assert "+2.0 [+2.0, +2.0]*" in text  # dicebce - softmax_rfs = 2 on every seed and class
    assert "bbox AP 20.0 on val (target ≥ 30: NOT met)" in text  # seed 0: mean(30, 10, 20)
    assert "bbox/APf: csv" in text  # the constructed json disagrees on APf
    assert "softmax/seed1 per-class csv missing" in text
    assert f"- *DiceBCEMaskHead + RFS*: {M.NOTES['dicebce']}" in text
    summary = json.load(open(path[:-3] + ".json"))
    assert summary["per_run"]["dicebce"]["1"]["bbox/APr"] == pytest.approx(34 - 15)
    assert "5 runs shown: 5 finished in this checkout's runs folder, 0 from the archive" in text
    # the same runs reported again are not reproductions of themselves
    assert "Reproduction" not in open(page.write(args, runs, driver.DATASETS, str(val_json))).read()

    # the archive alone rebuilds the page in a checkout without the run folders
    archive_file = page.archive_path(args.results, "cpu")
    archive = page.read_archive(archive_file)
    # softmax/seed1 has no csv; the pre-training run has no record here (not finished)
    assert sorted(archive["runs"]) == sorted(r.key for r in runs[1:] if r.key != "softmax/seed1")
    shutil.rmtree(tmp_path / "runs")
    assert not any(r.done() for r in runs)
    again = open(page.write(args, runs, driver.DATASETS, str(val_json))).read()
    assert "5 runs shown: 0 finished in this checkout's runs folder, 5 from the archive" in again
    for line in ("| SoftmaxCE + RFS | 21.5 ± 0.7 |", "+2.0 [+2.0, +2.0]*"):
        assert line in again
    assert page.archived_plan(archive) == (["softmax", "softmax_rfs", "dicebce"], [0, 1])
    # a changed row (another fingerprint) does not take archived results
    changed = _settings(tmp_path / "runs", iters=9)
    stale = plan.plan_runs(["softmax_rfs", "dicebce"], [0, 1], changed)
    assert not any(page.archived(r, archive, None) for r in stale[1:])
    text3 = open(page.write(args, stale, driver.DATASETS, str(val_json))).read()
    assert "0 runs shown" in text3 and "Archived runs not shown" in text3
    assert "dicebce/seed0" in text3.split("Archived runs not shown")[1]
    assert len(page.read_archive(archive_file)["runs"]) == 5  # kept, not deleted

    # a run trained again next to its archived result is a reproduction: the page says how far
    run = next(r for r in runs if r.key == "dicebce/seed0")
    out = os.path.join(run.out_dir, "inference", plan.DATASET_NAMES["val"])
    os.makedirs(out)
    _write_csv(tmp_path / "pc.csv", {1: 33.0, 2: 14.0, 3: 23.0}, {1: 33.0, 2: 8.0, 3: 0.0})
    os.replace(tmp_path / "pc.csv", os.path.join(out, page.CSV_FILE))
    with open(os.path.join(run.out_dir, plan.RUN_FILE), "w") as f:
        json.dump({"rc": 0, "fingerprint": run.fingerprint, "wall_s": 61.0}, f)
    text4 = open(page.write(args, runs, driver.DATASETS, str(val_json))).read()
    # bbox AP: mean(33, 14, 23) = 23.33 here vs mean(33, 13, 23) = 23.0 archived
    assert "Reproduction: 1 archived runs were run again here; largest |difference| " in text4
    assert "|difference| bbox/AP 0.33, bbox/APr 0.50, segm/AP 0.00 AP points" in text4
    assert "dicebce/seed0 bbox/AP 23.3 vs 23.0" in text4
    updated = page.read_archive(archive_file)["runs"]["dicebce/seed0"]
    assert updated["per_class"]["bbox"]["2"] == 14.0


def test_archive_errors_name_file_and_run(tmp_path):
    from lvis_longtail.benchmark import page

    path = tmp_path / "longtail_runs.json"
    path.write_text("{")
    with pytest.raises(ValueError, match="longtail_runs.json: not json"):
        page.read_archive(str(path))
    path.write_text(json.dumps({"runs": {}}))
    with pytest.raises(ValueError, match="not a version 1 run archive"):
        page.read_archive(str(path))
    entry = {"fingerprint": "ab", "record": {}, "per_class": {"bbox": {"x": 1.0}}}
    path.write_text(json.dumps({"version": 1, "runs": {"eql/seed0": entry}}))
    with pytest.raises(ValueError, match=r"run 'eql/seed0': per_class\['bbox'\] must map"):
        page.read_archive(str(path))
    entry.update(per_class=None, fingerprint=3)
    path.write_text(json.dumps({"version": 1, "runs": {"eql/seed0": entry}}))
    with pytest.raises(ValueError, match="run 'eql/seed0': 'fingerprint' missing"):
        page.read_archive(str(path))
    assert page.read_archive(str(tmp_path / "absent.json"))["runs"] == {}


def test_extract_init_keeps_backbone(tmp_path):
    import torch

    src, dst = str(tmp_path / "model_final.pth"), str(tmp_path / plan.INIT_FILE)
    state = {
        "backbone.bottom_up.w": torch.ones(2),
        "backbone.fpn_lateral2.b": torch.zeros(1),
        "roi_heads.mask_head.mask_fcn1.weight": torch.ones(1),
        "roi_heads.mask_head.deconv.bias": torch.ones(1),
    }
    fresh = {  # class-specific or not pre-trained here
        "roi_heads.box_predictor.w": torch.ones(3),
        "roi_heads.mask_head.predictor.weight": torch.ones(2),
        "proposal_generator.rpn_head.conv.weight": torch.ones(1),
    }
    torch.save({"model": {**state, **fresh}, "iteration": 9}, src)
    assert plan.extract_init(src, dst) == 4
    loaded = torch.load(dst, weights_only=False)["model"]
    assert sorted(loaded) == sorted(state) and torch.equal(
        loaded["backbone.bottom_up.w"], state["backbone.bottom_up.w"]
    )
    with pytest.raises(ValueError, match="no weights start with"):
        plan.extract_init(src, dst, prefixes=("nope.",))


def test_fingerprints_do_not_depend_on_folders(tmp_path):
    def plan_in(root):
        s = _settings(
            root / "runs",
            datasets={k: (str(root / "data" / f"{k}.json"), str(root / "data")) for k in
                      ("pretrain", "train", "val")},
            anchors={str(root / "runs"): "<runs>", str(root / "data"): "<data>"},
        )  # fmt: skip
        return {r.key: r.fingerprint for r in plan.plan_runs(["bags"], [0], s)}

    assert plan_in(tmp_path / "a") == plan_in(tmp_path / "b")
    unanchored = {r.key: r.fingerprint for r in plan.plan_runs(["bags"], [0], _settings(tmp_path))}
    assert unanchored != plan_in(tmp_path / "a")  # without anchors the folder is part of it


def test_runs_descend_from_one_pretraining_realisation(tmp_path, driver):
    import torch

    runs = plan.plan_runs(["bags"], [0], _settings(tmp_path))
    by = {r.key: r for r in runs}
    pre, rfs, bags = by["pretrain/seed0"], by["softmax_rfs/seed0"], by["bags/seed0"]
    os.makedirs(pre.out_dir)
    weights = {"backbone.a": torch.arange(4.0), "backbone.b": torch.ones(2, dtype=torch.int64)}
    torch.save({"model": weights}, os.path.join(pre.out_dir, plan.INIT_FILE))
    digest = plan.weights_digest(os.path.join(pre.out_dir, plan.INIT_FILE))
    assert digest == plan.init_of(pre) and len(digest) == 16
    reordered = {"model": dict(reversed(list(weights.items())))}
    torch.save(reordered, str(tmp_path / "r.pth"))
    assert plan.weights_digest(str(tmp_path / "r.pth")) == digest  # names, not dict order
    weights["backbone.a"][3] += 1e-6  # one value in the last bits: another realisation
    torch.save({"model": weights}, str(tmp_path / "w.pth"))
    assert plan.weights_digest(str(tmp_path / "w.pth")) != digest

    def finish(run, init):
        os.makedirs(run.out_dir, exist_ok=True)
        rec = {"rc": 0, "fingerprint": run.fingerprint, "init": init}
        with open(os.path.join(run.out_dir, plan.RUN_FILE), "w") as f:
            json.dump(rec, f)

    finish(pre, digest)
    assert plan.init_of(rfs) == digest  # inherited from the pre-training ...
    finish(rfs, plan.init_of(rfs))
    assert plan.init_of(bags) == digest  # ... through a fine-tune's base
    finish(bags, plan.init_of(bags))
    assert all(r.done() for r in (pre, rfs, bags)) and bags.init() == digest
    finish(pre, "retrained")  # the pre-training trained again, other weights
    assert pre.done() and not rfs.done()  # what started from the old ones is stale
    assert not plan.plan_runs(["softmax"], [0], _settings(tmp_path, pretrain_iters=0))[0].deps
    scratch = plan.plan_runs(["softmax"], [0], _settings(tmp_path / "s", pretrain_iters=0))[0]
    assert plan.init_of(scratch) == "scratch"


def test_runs_to_train_keeps_what_training_runs_start_from(tmp_path):
    runs = plan.plan_runs(["bags", "eqlv2"], [0], _settings(tmp_path))
    keys = lambda rs: [r.key for r in rs]  # noqa: E731
    everything = {r.key for r in runs}
    assert keys(plan.runs_to_train(runs, set())) == keys(runs)
    assert keys(plan.runs_to_train(runs, everything)) == []
    # bags fine-tunes softmax_rfs: its archived results do not hold its weights
    archived = everything - {"bags/seed0"}
    assert keys(plan.runs_to_train(runs, archived)) == [
        "pretrain/seed0", "softmax_rfs/seed0", "bags/seed0",
    ]  # fmt: skip
    assert keys(plan.runs_to_train(runs, everything - {"eqlv2/seed0"})) == [
        "pretrain/seed0", "eqlv2/seed0",
    ]  # fmt: skip


def test_init_prefixes_name_layers_every_row_loads():
    """The pre-trained tensors that rows start from exist, with the same shapes, in the model
    of every row that trains from the initialisation (so none is silently skipped)."""
    from conftest import tiny_cfg
    from detectron2.modeling import build_model

    def shapes(config):
        cfg = tiny_cfg(config_file=os.path.join(_REPO, "configs", config))
        return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}

    pre = shapes(plan.PRETRAIN_CONFIG)
    kept = {k: v for k, v in pre.items() if k.startswith(plan.INIT_PREFIXES)}
    for prefix in plan.INIT_PREFIXES:
        assert any(k.startswith(prefix) for k in kept), prefix
    assert not any("predictor" in k for k in kept)  # class-specific layers start fresh
    for config in sorted({m.config for m in M.METHODS if not m.base}):
        row = shapes(config)
        wrong = {k: (v, row.get(k)) for k, v in kept.items() if row.get(k) != v}
        assert not wrong, f"{config}: {wrong}"


def test_driver_report_only_adds_archived_rows(tmp_path, driver, monkeypatch):
    """``--report-only`` end to end: the page shows this invocation's rows and the archived
    ones; the exit status counts archived runs as present."""
    from lvis_longtail.benchmark import page

    monkeypatch.setattr(driver, "ensure_dataset", lambda root, options: None)
    val = tmp_path / "data" / "lt_bench" / "annotations" / "lt_synthetic_val.json"
    val.parent.mkdir(parents=True)
    val.write_text(json.dumps({"images": [{"id": 1}], "categories": CATEGORIES}))
    argv = ["--output", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    argv += ["--datasets", str(tmp_path / "data"), "--seeds", "0", "--report-only"]

    def finish(names, init=None, ap=40.0):
        args = driver.parse_args(argv + ["--methods", *names])
        for run in plan.plan_runs(args.methods, args.seeds, driver.settings(args)):
            out = os.path.join(run.out_dir, "inference", plan.DATASET_NAMES["val"])
            os.makedirs(out, exist_ok=True)
            if run.method is not None:
                _write_csv(Path(out) / page.CSV_FILE, {1: ap, 2: 20.0}, {1: 30.0})
            rec = {"rc": 0, "fingerprint": run.fingerprint, "wall_s": 1.0, "init": init}
            with open(os.path.join(run.out_dir, plan.RUN_FILE), "w") as f:
                json.dump(rec, f)

    finish(["eqlv2"])  # and its reference, softmax
    assert driver.main(argv + ["--methods", "eqlv2"]) == 0
    shutil.rmtree(tmp_path / "runs")  # another checkout: only the results folder
    finish(["softmax_rfs"])
    assert driver.main(argv + ["--methods", "softmax_rfs"]) == 0
    text = (tmp_path / "results" / "longtail.md").read_text()
    for label in ("| SoftmaxCE (no RFS) |", "| SoftmaxCE + RFS |", "| EQLv2 (no RFS) |"):
        assert label in text
    assert "3 runs shown: 2 finished in this checkout's runs folder, 1 from the archive" in text
    assert driver.main(argv + ["--methods", "fedloss"]) == 1  # never run: missing

    # the pre-training trained again with other weights (another CPU): the archived runs of
    # the first realisation are neither shown nor paired with the new ones, and the page says
    # how far the same commands moved
    shutil.rmtree(tmp_path / "runs")
    finish(["softmax_rfs"], init="other", ap=46.0)
    assert driver.main(argv + ["--methods", "softmax_rfs"]) == 0
    text = (tmp_path / "results" / "longtail.md").read_text()
    assert "| EQLv2 (no RFS) |" not in text
    assert "2 runs shown: 2 finished in this checkout's runs folder, 0 from the archive" in text
    # bbox AP mean(46, 20) = 33 against mean(40, 20) = 30 for both rows
    assert "2 archived runs of it were replaced here, not paired; largest |difference| " in text
    assert "bbox/AP 3.00" in text and "Reproduction: " not in text
    assert "from another pre-training realisation): eqlv2/seed0." in text
    assert driver.main(argv + ["--methods", "eqlv2"]) == 1  # eqlv2: only the first realisation

    archive = page.read_archive(page.archive_path(str(tmp_path / "results"), "cpu"))
    assert archive["runs"]["softmax/seed0"]["record"]["init"] == "other"
    assert archive["runs"]["eqlv2/seed0"]["record"]["init"] is None  # kept, not deleted

    # --reuse-archive trains the pre-training first; its weights decide what is reusable
    calls = []

    def fake_execute(runs, jobs, threads, force, poll_s=1.0):
        calls.append([r.key for r in runs])
        for run in runs:
            init = pre_init if run.method is None else plan.init_of(run)
            out = os.path.join(run.out_dir, "inference", plan.DATASET_NAMES["val"])
            os.makedirs(out, exist_ok=True)
            if run.method is not None:
                _write_csv(Path(out) / page.CSV_FILE, {1: 40.0, 2: 20.0}, {1: 30.0})
            with open(os.path.join(run.out_dir, plan.RUN_FILE), "w") as f:
                json.dump({"rc": 0, "fingerprint": run.fingerprint, "wall_s": 1.0, "init": init}, f)
        return len(runs)

    monkeypatch.setattr(driver, "execute", fake_execute)
    train = [a for a in argv if a != "--report-only"] + ["--reuse-archive", "--methods"]
    shutil.rmtree(tmp_path / "runs")
    pre_init = "other"  # the archived softmax rows' realisation: reused, eqlv2 trained
    assert driver.main(train + ["eqlv2"]) == 0
    assert calls == [["pretrain/seed0"], ["eqlv2/seed0"]]
    shutil.rmtree(tmp_path / "runs")
    calls.clear()
    assert driver.main(train + ["softmax_rfs"]) == 0  # all archived: nothing trains
    assert not any(calls)
    pre_init = "third"  # a new row trains; nothing archived descends from this pre-training
    calls.clear()
    assert driver.main(train + ["fedloss"]) == 0
    assert calls == [["pretrain/seed0"], ["softmax/seed0", "softmax_rfs/seed0", "fedloss/seed0"]]
