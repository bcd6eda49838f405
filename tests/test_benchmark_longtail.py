"""The long-tail benchmark (benchmarks/): paired statistics against closed forms, the plan of
rows and its reuse of records, and the committed page regenerated from the committed records."""

import math
import os
import shutil

import longtail
import numpy as np
import paired_stats as ps
import pytest
from conftest import REPO, tiny_cfg
from longtail_rows import METHODS

CATEGORIES = [
    {"id": 1, "name": "a", "frequency": "f", "thin": False, "image_count": 300},
    {"id": 2, "name": "b", "frequency": "r", "thin": True, "image_count": 5},
    {"id": 3, "name": "c", "frequency": "r", "thin": False, "image_count": 8},
    {"id": 4, "name": "d", "frequency": "c", "thin": True, "image_count": 40},
]
CLASSES = ps.class_info(CATEGORIES)
RESULTS = os.path.join(REPO, "benchmarks", "results")


def test_t_quantile_interval_and_seeds_needed_by_hand():
    printed = [12.7062, 4.3027, 2.2622, 2.0423]  # t_0.975 for df 1, 2, 9, 30 (printed tables)
    assert [ps.t975(df) for df in (1, 2, 9, 30)] == pytest.approx(printed, abs=5e-5)
    ci = ps.paired_t_ci([1.0, 2.0, 3.0])  # mean 2, sd 1, half 4.302653 / sqrt(3) = 2.484138
    assert (ci.mean, ci.std, ci.n) == (2.0, 1.0, 3) and not ci.excludes_zero
    assert (ci.low, ci.high) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6)
    assert ps.paired_t_ci([5.0, 5.2, 4.8, 5.0]).excludes_zero
    single = ps.paired_t_ci([3.0, float("nan")])
    assert (single.n, single.mean) == (1, 3.0) and math.isnan(single.low)
    # sd 1, half-width 1: t(5) / sqrt(6) = 1.049 > 1, t(6) / sqrt(7) = 0.925 <= 1
    assert ps.seeds_needed(1.0, 1.0) == 7 and ps.seeds_needed(0.0, 1.0) == 2
    assert ps.seeds_needed(100.0, 1.0, max_seeds=50) == 51
    assert ps.seeds_needed(float("nan"), 1.0) == 101


def test_bootstrap_by_hand_and_deterministic():
    base = np.array([[10.0, 20.0, 30.0], [12.0, 22.0, 32.0]])
    assert ps.bootstrap_group_diff(base + 1.5, base) == (1.5, 1.5)  # every cell differs by 1.5
    # class differences 0, 1, 2: a sample draws all-class-0 (mean 0) with p = 1/27 > 2.5 %
    # and all-class-2 likewise, so the 95 % interval is [0, 2]
    assert ps.bootstrap_group_diff(base + np.array([0.0, 1.0, 2.0]), base) == (0.0, 2.0)
    cells = np.random.default_rng(5).normal(size=(3, 10))
    low, high = ps.bootstrap_group_diff(cells, 0 * cells)
    assert cells.min() < low < cells.mean() < high < cells.max()
    assert ps.bootstrap_group_diff(cells, 0 * cells) == (low, high)  # seeded: deterministic
    assert ps.bootstrap_group_diff(cells, 0 * cells, seed=1) != (low, high)
    assert ps.bootstrap_group_diff(base[:1], base[:1]) is None  # one seed: no interval


def test_per_class_csv_and_group_metrics(tmp_path):
    csv = tmp_path / "pc.csv"
    csv.write_text("category_id,name,frequency,bbox_AP,segm_AP\n1,a,f,40,30\n2,b,r,10,0\n"
                   "3,c,r,20,6\n4,d,c,,\n")  # fmt: skip
    pc = ps.read_per_class(str(csv))
    assert pc["bbox"] == {1: 40.0, 2: 10.0, 3: 20.0}  # class 4: blank (no ground truth)
    m = ps.run_metrics(pc, CLASSES)
    assert m["bbox/AP"] == pytest.approx(70 / 3) and m["bbox/APr"] == 15.0
    assert math.isnan(m["bbox/APc"]) and (m["segm/thin"], m["segm/filled"]) == (0.0, 18.0)


def _pc(ap1, ap2, ap3):
    return {"bbox": {1: ap1, 2: ap2, 3: ap3}, "segm": {1: ap1, 2: ap2, 3: ap3}}


REF = {0: _pc(40, 10, 20), 1: _pc(42, 12, 22), 2: _pc(41, 11, 21)}
NEW = {0: _pc(40, 12, 24), 1: _pc(42, 14, 28), 2: _pc(41, 12, 27)}  # APr diffs 3, 4, 3.5


def test_paired_difference_and_tables_by_hand():
    res = ps.paired(NEW, REF, CLASSES, "bbox/APr")
    assert res["seeds"] == [0, 1, 2] and (res["ci"].mean, res["ci"].std) == (3.5, 0.5)
    assert 1.0 <= res["boot"][0] <= 3.5 <= res["boot"][1] <= 6.0  # cell differences are 1-6
    rows = [("new", "New", "ref", "Ref")]
    table = ps.delta_table(rows, {"new": NEW, "ref": REF}, CLASSES, ("bbox/APr",))
    row = table.splitlines()[2]  # t(2) * 0.5 / sqrt(3) = 1.242: [+2.26, +4.74]
    assert row.startswith("| New | Ref | +3.5 [+2.3, +4.7]* {")
    assert row.endswith("| 4 |")  # t(2) * 0.5 / sqrt(3) = 1.24 > 1, t(3) * 0.5 / 2 = 0.80
    summary = ps.summary_table([("ref", "Ref")], {"ref": REF}, CLASSES, ("bbox/APf",))
    assert "| Ref | 41.0 ± 1.0 | 3 |" in summary


def _args(tmp_path, *extra):
    return longtail.parse_args(["--results", str(tmp_path), "--output", str(tmp_path / "runs"),
                                "--datasets", str(tmp_path / "data"), *extra])  # fmt: skip


def _opt(cmd, key):
    return cmd[cmd.index(key) + 1]


def test_plan_commands(tmp_path):
    args = _args(tmp_path, "--methods", "bags", "eqlv2", "tta", "copypaste_lsj")
    pre, runs = longtail.plan(args)
    keys = [r.key for r in runs]
    assert keys[:4] == ["softmax_seed0", "softmax_rfs_seed0", "bags_seed0", "eqlv2_seed0"]
    assert len(keys) == 3 * 7  # with the references softmax, softmax_rfs and softmax_rfs_4x
    by = {r.key: r for r in runs}
    bags = longtail.command(by["bags_seed1"], args, pre)
    assert _opt(bags, "MODEL.WEIGHTS") == by["softmax_rfs_seed1"].final
    assert _opt(bags, "SOLVER.MAX_ITER") == "83" and _opt(bags, "SEED") == "1"  # a third of 250
    eqlv2 = longtail.command(by["eqlv2_seed0"], args, pre)
    assert _opt(eqlv2, "MODEL.WEIGHTS") == os.path.join(pre.out_dir, longtail.INIT_FILE)
    assert _opt(eqlv2, "DATALOADER.SAMPLER_TRAIN") == "TrainingSampler"
    assert "DATALOADER.REPEAT_THRESHOLD" not in eqlv2
    tta = longtail.command(by["tta_seed2"], args, pre)
    assert tta[4] == "--eval-only" and "SOLVER.MAX_ITER" not in tta
    lsj = longtail.command(by["copypaste_lsj_seed0"], args, pre)  # 4x the schedule, with RFS
    assert _opt(lsj, "SOLVER.STEPS") == "(700, 900)" and "DATALOADER.REPEAT_THRESHOLD" in lsj
    pre_cmd = longtail.command(pre, args, None)
    assert (
        _opt(pre_cmd, "DATASETS.TRAIN") == "('lt_bench_pretrain',)" and pre_cmd[-1] == pre.out_dir
    )
    with pytest.raises(SystemExit, match="unknown benchmark row 'nope'"):
        longtail.plan(_args(tmp_path, "--methods", "nope"))


def _record(folder, run, pc=None, s_per_iter=0.5):
    return longtail.write_record(str(folder), run, (0, 10.0, s_per_iter), pc or REF[0], CLASSES)


def test_records_reuse_and_page(tmp_path):
    args = _args(tmp_path, "--methods", "bags")
    for run in longtail.plan(args)[1]:  # softmax: REF, softmax_rfs: NEW, bags; seeds 0-2
        _record(args.records, run, pc=(REF if run.name == "softmax" else NEW)[run.seed])
    longtail.write_json_atomic(CATEGORIES, os.path.join(args.records, "classes.json"))
    _record(args.records, longtail.Run("softmax", 7, "x.yaml", [], ""), s_per_iter=float("nan"))
    records = longtail.read_records(args.records)
    assert records["bags_seed2"]["per_class"] == NEW[2]  # category ids read back as int
    assert records["softmax_seed7"]["s_per_iter"] is None  # NaN is written as null
    assert longtail.main(["--results", str(tmp_path), "--methods", "bags", "--report-only"]) == 0
    text = (tmp_path / "longtail.md").read_text()
    assert "| SoftmaxCE + RFS | SoftmaxCE (no RFS) | +3.5 [+2.3, +4.7]* {" in text
    assert "| SoftmaxCE (no RFS) | 24.3 ± 1.0 | 16.0 ± 1.0 |" in text  # AP (40 + 10 + 20) / 3, ...
    assert "Records not shown (other overrides or pre-training): softmax_seed7." in text
    runs = longtail.plan(_args(tmp_path, "--methods", "bags", "--seeds", "0"))[1]
    keys = lambda: [r.key for r in longtail.to_train(runs, records, False)]  # noqa: E731
    assert keys() == [] and longtail.to_train(runs, {}, True) == runs
    records["softmax_seed0"]["overrides"] = ["SEED", "9"]
    assert keys() == ["softmax_seed0"]
    del records["bags_seed0"]  # bags must train, and its base too: its model is not here
    assert keys() == ["softmax_seed0", "softmax_rfs_seed0", "bags_seed0"]


def test_records_of_another_pre_training_are_retrained_and_not_shown(tmp_path):
    args = _args(tmp_path, "--methods", "softmax_rfs", "--seeds", "0")
    pre, runs = longtail.plan(args)
    for run in runs:
        _record(args.records, run)
    longtail.write_json_atomic(CATEGORIES, os.path.join(args.records, "classes.json"))
    longtail.write_record(args.records, pre, (0, 1.0, 0.1), {}, {}, init="b" * 16)
    old = longtail.write_record(args.records, runs[1], (0, 1.0, 0.1), REF[0], CLASSES, "a" * 16)
    assert old["init_sha256"] == "a" * 16
    records = longtail.read_records(args.records)
    keys = lambda init: [r.key for r in longtail.to_train(runs, records, False, init)]  # noqa: E731
    assert keys(None) == keys("a" * 16) == [] and keys("b" * 16) == ["softmax_rfs_seed0"]
    assert (
        longtail.main(
            [
                "--results",
                str(tmp_path),
                "--methods",
                "softmax_rfs",
                "--seeds",
                "0",
                "--report-only",
            ]
        )
        == 1
    )  # fmt: skip  (its one run is missing)
    text = (tmp_path / "longtail.md").read_text()
    assert "Records not shown (other overrides or pre-training): softmax_rfs_seed0." in text
    init = tmp_path / "init.pth"
    init.write_bytes(b"weights")
    assert longtail.init_digest(str(init)) == "9a129038d9a00aed"  # printf weights | sha256sum
    assert longtail.init_digest(str(tmp_path / "none.pth")) is None


def test_a_row_with_its_own_pre_training(tmp_path):
    """The entry row trains from its own pre-training (the shared protocol on its own config),
    its records are checked against that pre-training's digest and a new one retrains only it."""
    args = _args(tmp_path, "--methods", "mmdet2020_entry", "--seeds", "0", "1")
    pre, runs = longtail.plan(args)
    by = {r.key: r for r in runs}
    entry, seesaw = by["mmdet2020_entry_seed1"], by["seesaw_seed1"]
    own = entry.pre
    assert own is by["mmdet2020_entry_seed0"].pre and seesaw.pre is None
    assert (own.key, own.config) == ("pretrain_mmdet2020_entry_seed0", entry.method.pretrain)
    assert own.overrides[: len(entry.method.pretrain_opts)] == list(entry.method.pretrain_opts)
    assert own.overrides[len(entry.method.pretrain_opts) :] == pre.overrides  # same protocol
    assert longtail.own_pretrainings(runs) == [own]
    cmd = longtail.command(entry, args, pre)
    assert _opt(cmd, "MODEL.WEIGHTS") == os.path.join(own.out_dir, longtail.INIT_FILE)
    assert _opt(cmd, "DATALOADER.SAMPLER_TRAIN") == "TrainingSampler"  # the entry's sampler
    assert _opt(longtail.command(seesaw, args, pre), "MODEL.WEIGHTS") == os.path.join(
        pre.out_dir, longtail.INIT_FILE
    )
    os.makedirs(own.out_dir)
    (tmp_path / "runs" / os.path.basename(own.out_dir) / longtail.INIT_FILE).write_bytes(b"weights")
    mine = "9a129038d9a00aed"  # printf weights | sha256sum
    for run in runs:
        _record(args.records, run)
        longtail.write_record(args.records, run, (0, 1.0, 0.1), REF[0], CLASSES,
                              mine if run.pre else "a" * 16)  # fmt: skip
    longtail.write_record(args.records, pre, (0, 1.0, 0.1), {}, {}, init="a" * 16)
    longtail.write_record(args.records, own, (0, 1.0, 0.1), {}, {}, init=mine)
    longtail.write_json_atomic(CATEGORIES, os.path.join(args.records, "classes.json"))
    records = longtail.read_records(args.records)
    keys = lambda init: [r.key for r in longtail.to_train(runs, records, False, init)]  # noqa: E731
    assert keys("a" * 16) == []
    assert keys("b" * 16) == [r.key for r in runs if not r.pre]  # a new shared pre-training
    seed0 = by["mmdet2020_entry_seed0"]
    other = longtail.write_record(args.records, seed0, (0, 1.0, 0.1), REF[0], CLASSES, "c" * 16)
    records[seed0.key] = other  # from another own pre-training
    assert keys("a" * 16) == ["mmdet2020_entry_seed0"]
    argv = ["--results", str(tmp_path), "--methods", "mmdet2020_entry", "--seeds", "0", "1"]
    assert longtail.main([*argv, "--report-only"]) == 1  # a record is missing: seed 0's
    text = (tmp_path / "longtail.md").read_text()
    assert "Records not shown (other overrides or pre-training): mmdet2020_entry_seed0." in text
    assert "| Tiny MMDet 2020 entry (own pre-training) | Seesaw + NormedLinear + RFS |" in text
    assert "pre-training 0.0 min; mmdet2020_entry's own pre-training 0.0 min." in text


@pytest.mark.parametrize("mode", ["", "_quick"])
def test_committed_page_regenerates_from_committed_records(tmp_path, mode):
    shutil.copytree(os.path.join(RESULTS, f"longtail{mode}"), tmp_path / f"longtail{mode}")
    shutil.copy(os.path.join(RESULTS, f"longtail{mode}_notes.md"), tmp_path)
    argv = ["--results", str(tmp_path), "--report-only"] + (["--quick"] if mode else [])
    assert longtail.main(argv) == 0
    with open(os.path.join(RESULTS, f"longtail{mode}.md")) as f:
        assert (tmp_path / f"longtail{mode}.md").read_text() == f.read()


def test_dry_run_plans_without_training(tmp_path, capsys):
    argv = ["--results", str(tmp_path), "--output", str(tmp_path / "runs"), "--dry-run"]
    assert longtail.main([*argv, "--quick"]) == 0
    out = capsys.readouterr().out
    assert out.count("train_net.py") == 4 and "3 of 3 runs to train" in out
    assert os.listdir(tmp_path) == []
    assert longtail.main(["--results", RESULTS, *argv[2:]]) == 0  # every CPU row has its record
    assert "0 of 9 runs to train" in capsys.readouterr().out


def test_init_prefixes_name_layers_every_row_loads():
    """The pre-trained tensors that rows start from exist, with the same shapes, in the model
    of every row that trains from the initialisation (so none is silently skipped)."""
    from detectron2.modeling import build_model

    def shapes(config):
        cfg = tiny_cfg(config_file=os.path.join(REPO, "configs", config))
        return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}

    prefixes = longtail.INIT_PREFIXES
    kept = {k: v for k, v in shapes(longtail.PRETRAIN_CONFIG).items() if k.startswith(prefixes)}
    assert all(any(k.startswith(p) for k in kept) for p in prefixes)  # each names some layers
    assert not any("predictor" in k for k in kept)  # class-specific layers start fresh
    for config, fresh in sorted({(m.config, m.fresh) for m in METHODS if not m.base}):
        row = shapes(config)
        if any(m.pretrain for m in METHODS if m.config == config):
            continue  # below: against its own pre-training
        missing = {k for k, v in kept.items() if row.get(k) != v and not k.startswith(fresh)}
        assert not missing, (config, sorted(missing)[:5])
        assert not (fresh and any(k.startswith(fresh) for k in row)), config  # truly absent
    for m in (m for m in METHODS if m.pretrain):  # pre-trained with its opts: the same layers
        cfg = tiny_cfg(config_file=os.path.join(REPO, "configs", m.pretrain), opts=m.pretrain_opts)
        own = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
        own = {k: v for k, v in own.items() if k.startswith(prefixes)}
        assert all(any(k.startswith(p) for k in own) for p in prefixes), m.name
        row = shapes(m.config)
        assert {k: row.get(k) for k in own} == own, m.name
