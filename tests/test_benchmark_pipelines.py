"""benchmarks/pipelines.py: each entry's chain of stages wired as the recipe wires it, on the
long-tail benchmark's data, with the schedule shared so the pipeline trains as long as its
baseline; a chain resumes from its first stage without a record."""

import json
import os
import re

import longtail_rows as lr
import pipelines as pl
import pytest

from lvis_longtail.tools.recipe import CONFIGS


def _opt(opts, key):
    return opts[len(opts) - 1 - opts[::-1].index(key) + 1]  # the last value wins (yacs)


@pytest.fixture
def args(tmp_path):
    return pl.parse_args(["--output", str(tmp_path / "runs"), "--datasets", str(tmp_path / "d"),
                          "--results", str(tmp_path / "results"), "--iters", "250"])  # fmt: skip


@pytest.mark.parametrize("pipeline", list(pl.PIPELINES))
def test_train_stages_share_the_baselines_schedule(args, pipeline):
    base, steps = pl.PIPELINES[pipeline]
    chain = pl.build_chain(pipeline, 0, args, "/init.pth")
    iters = [int(_opt(r.overrides, "SOLVER.MAX_ITER")) for s, r in zip(steps, chain.runs)
             if s.kind == "train"]  # fmt: skip
    baseline = pl.baseline_run(base, 0, args)
    assert sum(iters) == int(_opt(baseline.overrides, "SOLVER.MAX_ITER")) == 1000
    assert lr.methods_by_name()[base].schedule == pl.SCHEDULE
    assert [s.kind for s in steps][-1] == "eval"


def test_first_place_chain_is_wired_like_the_recipe(args):
    chain = pl.build_chain("lvis2020_1st", 1, args, "/init.pth")
    run = {s.name: (r, c) for s, r, c in zip(chain.steps, chain.runs, chain.cmds)}
    final = {n: os.path.join(r.out_dir, "model_final.pth") for n, (r, _) in run.items()}
    quick = CONFIGS[("lvis2020_1st", True)]
    for step, role in (("stage1", "stage1"), ("selftrain", "selftrain"), ("stage2", "stage2"),
                       ("tta", "tta")):  # fmt: skip
        assert os.path.join("configs", run[step][0].config) == quick[role][0]
    assert _opt(run["stage1"][1], "MODEL.WEIGHTS") == "/init.pth"
    assert _opt(run["selftrain"][1], "MODEL.WEIGHTS") == "/init.pth"  # stage 1 again
    assert _opt(run["stage2"][1], "MODEL.WEIGHTS") == final["selftrain"]
    assert _opt(run["tta"][1], "MODEL.WEIGHTS") == final["stage2"]
    assert "--eval-only" in run["tta"][1] and "--eval-only" not in run["stage2"][1]
    for name in ("pseudo_train", "pseudo_extra"):
        cmd = run[name][1]
        assert _opt(cmd, "MODEL.WEIGHTS") == final["stage1"]
        assert "lvis_longtail.tools.pseudo_label" in cmd
    out_train = _opt(run["pseudo_train"][1], "--output")
    out_extra = _opt(run["pseudo_extra"][1], "--output")
    sel = run["selftrain"][1]
    assert json.loads(_opt(sel, "DATASETS.IGNORE_BOXES").replace("'", '"')) == [
        ["lt_bench_train", out_train]
    ]
    registered = {
        d[0]: d[1] for d in json.loads(_opt(sel, "DATASETS.LVIS_FORMAT").replace("'", '"'))
    }
    assert registered[pl.EXTRA_PSEUDO] == out_extra
    assert _opt(sel, "DATASETS.EXTRA_TRAIN") == f"('{pl.EXTRA_PSEUDO}',)"
    for name in ("stage1", "selftrain", "stage2"):
        assert _opt(run[name][1], "DATALOADER.REPEAT_THRESHOLD") == "0.13"
        assert _opt(run[name][1], "SEED") == "1"


def test_mmdet_chain_random_sampler_then_rfs_dual_head_then_tta(args):
    chain = pl.build_chain("lvis2020_mmdet", 2, args, "/init.pth")
    model, dual, tta = chain.cmds
    assert _opt(model, "DATALOADER.SAMPLER_TRAIN") == "TrainingSampler"
    assert _opt(dual, "DATALOADER.REPEAT_THRESHOLD") == "0.13"
    assert _opt(dual, "MODEL.WEIGHTS") == os.path.join(chain.runs[0].out_dir, "model_final.pth")
    assert _opt(tta, "TEST.AUG.ENABLED") == "True" and "--eval-only" in tta
    assert _opt(tta, "MODEL.WEIGHTS") == os.path.join(chain.runs[1].out_dir, "model_final.pth")


def test_a_chain_resumes_at_its_first_stage_without_a_record(args):
    chain = pl.build_chain("lvis2020_1st", 0, args, "/init.pth")
    records = {}
    assert pl.first_todo(chain, records) == 0
    s1 = chain.runs[0]
    records[s1.key] = {"config": s1.config, "overrides": s1.overrides}
    assert pl.first_todo(chain, records) == 1  # the pseudo labels have no summary yet
    for step, run in zip(chain.steps[1:3], chain.runs[1:3]):
        os.makedirs(run.out_dir)
        open(os.path.join(run.out_dir, f"{step.dataset}_pseudo.json.summary.json"), "w").close()
    assert pl.first_todo(chain, records) == 3
    assert pl.first_todo(chain, records, force=True) == 0
    records[s1.key] = {"config": s1.config, "overrides": s1.overrides + ["X", "1"]}  # stale
    assert pl.first_todo(chain, records) == 0


def test_self_training_report_only_without_runs_keeps_the_page(tmp_path, capsys):
    import self_training

    page = tmp_path / "results" / "self_training.md"
    page.parent.mkdir()
    page.write_text("committed")
    argv = ["--report-only", "--output", str(tmp_path / "o"), "--results", str(page.parent)]
    assert self_training.main(argv) == 1
    assert page.read_text() == "committed" and "left as it is" in capsys.readouterr().err


def test_page_pairs_each_stage_with_the_one_before_and_the_baseline(args):
    from lvis_longtail.utils.io import write_json_atomic

    cats = [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "r"}]
    os.makedirs(args.records)
    write_json_atomic(cats, os.path.join(args.records, "classes.json"))
    ap = {"lvis2020_mmdet_model": 40.0, "lvis2020_mmdet_dualhead": 41.0,
          "lvis2020_mmdet_tta": 44.0, "seesaw_4x": 43.0}  # fmt: skip
    records = {}
    for row, value in ap.items():
        for seed in (0, 1):  # the same per-class AP on both classes and seeds: zero-width intervals
            pc = {t: {1: value + seed, 2: value + seed} for t in ("bbox", "segm")}
            records[f"{row}_seed{seed}"] = {"row": row, "seed": seed, "per_class": pc}
    text = open(pl.write_page(args, records, "abc")).read()
    assert "| lvis2020_mmdet: tta | 44.5 ± 0.7 | 44.5 ± 0.7 |" in text  # AP, APr over seeds 44, 45
    assert "| lvis2020_mmdet: dualhead | lvis2020_mmdet: model | +1.0 [+1.0, +1.0]*" in text
    assert "| lvis2020_mmdet: tta | lvis2020_mmdet: dualhead | +3.0 [+3.0, +3.0]*" in text
    assert (
        "| lvis2020_mmdet: tta | Seesaw + NormedLinear + RFS, 4× schedule | +1.0 [+1.0, +1.0]*"
        in text
    )
    assert (
        "| lvis2020_mmdet: model | Seesaw + NormedLinear + RFS, 4× schedule | -3.0 [-3.0, -3.0]*"
        in text
    )
    assert "sha256 abc" in text


def test_committed_page_regenerates_from_committed_records(tmp_path):
    import shutil

    results = os.path.join(pl.lt.REPO, "benchmarks", "results")
    shutil.copytree(os.path.join(results, "pipelines"), tmp_path / "pipelines")
    shutil.copy(os.path.join(results, "pipelines_notes.md"), tmp_path)
    committed = open(os.path.join(results, "pipelines.md")).read()
    digest = re.search(r"sha256 (\w+)…", committed).group(1)
    args = pl.parse_args(["--results", str(tmp_path), "--output", str(tmp_path / "runs")])
    records = {
        k: r for k, r in pl.lt.read_records(args.records).items() if not k.startswith("pretrain")
    }
    assert len(records) == 3 * (4 + 3 + 2)  # 3 seeds: the evaluated stages and the baselines
    assert open(pl.write_page(args, records, digest)).read() == committed


def test_main_runs_each_chain_until_a_stage_fails_and_every_baseline(tmp_path, monkeypatch):
    from lvis_longtail.utils.io import write_json_atomic

    runs, records = tmp_path / "runs", tmp_path / "results" / "pipelines"
    init = runs / "pretrain_1000" / "init.pth"
    init.parent.mkdir(parents=True)
    init.write_bytes(b"weights")
    cats = [{"id": 1, "name": "a", "frequency": "f"}]

    def prepare(args, datasets):
        assert datasets[pl.EXTRA] == pl.EXTRA_DATA and "lt_bench" in datasets
        write_json_atomic(cats, os.path.join(args.records, "classes.json"))
        return cats

    started = []
    monkeypatch.setattr(pl.lt, "prepare_data", prepare)
    monkeypatch.setattr(
        pl.lt, "train_run", lambda run, cmd, threads: started.append(run.key) or (1, 0.0, 0.0)
    )
    argv = [
        "--output",
        str(runs),
        "--datasets",
        str(tmp_path / "d"),
        "--results",
        str(records.parent),
    ]
    os.makedirs(records)
    assert pl.main(argv) == 0
    # every chain stops at its failed first stage; every baseline runs once
    expected = {
        f"{p}_{first}_seed{s}"
        for p, first in (("lvis2020_1st", "stage1"), ("lvis2020_mmdet", "model"))
        for s in range(3)
    }
    expected |= {f"{b}_seed{s}" for b in ("eql_4x", "seesaw_4x") for s in range(3)}
    assert sorted(started) == sorted(expected)
    assert (records.parent / "pipelines.md").is_file()
