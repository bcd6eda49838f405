"""python -m lvis_longtail.tools.recipe: the plan of each pipeline (commands, paths wired
between stages), skip of complete stages, resume of an interrupted one, a failure naming
its stage, progress; and, marked slow, both --quick pipelines end to end with 2 iterations
per stage on a small synthetic set."""

import json
import os
import shlex
import sys

import pytest
from conftest import REPO
from detectron2.config import get_cfg

from lvis_longtail.config import add_longtail_config
from lvis_longtail.tools import recipe, recipe_runner
from lvis_longtail.tools.recipe import CONFIGS, build_plan, parse_args
from lvis_longtail.tools.recipe_runner import MARKER, RECORD, Stage, StageFailed, run_stages


def _plan(tmp_path, name, *extra):
    args = parse_args([name, "--output", str(tmp_path / "out"), "--data-root",
                       str(tmp_path / "data"), *extra])  # fmt: skip
    return build_plan(name, args)


def _opt(stage: Stage, key: str) -> str:
    return stage.opts[stage.opts.index(key) + 1]


def _by_name(stages):
    return {s.name: s for s in stages}


class FakeRunner:
    """Writes each command's outputs (as the real stage would) and returns ``codes[name]``
    (0 if absent); records the commands it ran."""

    def __init__(self, stages, codes=None, write=True):
        self.by_folder = {s.folder: s for s in stages}
        self.codes, self.write, self.calls = dict(codes or {}), write, []

    def __call__(self, command, env, log_path, on_line):
        stage = self.by_folder[os.path.dirname(log_path)]
        self.calls.append((stage.name, list(command)))
        on_line("[d2] eta: 0:00:01  iter: 0  total_loss: 1.0\n")
        if stage.resumable:  # detectron2 writes its checkpoint pointer while training
            with open(os.path.join(stage.folder, "last_checkpoint"), "w") as f:
                f.write("model_0000001.pth")
        code = self.codes.pop(stage.name, 0)
        if self.write and code == 0:
            for path in stage.outputs:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                content = {"pseudo_labels": 3} if path.endswith("summary.json") else {}
                with open(path, "w") as f:
                    json.dump(content, f)
        return code


def _no_check(stages):
    for s in stages:
        s.check = None
    return stages


def test_quick_plans_wire_each_stage_to_the_one_before(tmp_path):
    out, stages = _plan(tmp_path, "lvis2020_1st", "--quick")
    s = _by_name(stages)
    assert out == str(tmp_path / "out")
    assert list(s) == ["data", "stage1", "pseudo_train", "pseudo_extra", "stage1_selftrain",
                       "stage2", "tta_eval"]  # fmt: skip
    folders = [st.folder for st in stages]
    assert len(set(folders)) == 7 and all(f.startswith(out + os.sep) for f in folders)
    assert os.path.basename(s["data"].folder) == "00_data"
    assert os.path.basename(s["tta_eval"].folder) == "06_tta_eval"
    final = {n: os.path.join(s[n].folder, "model_final.pth") for n in s}
    for n in ("stage1", "stage1_selftrain", "stage2"):
        assert _opt(s[n], "OUTPUT_DIR") == s[n].folder and final[n] in s[n].outputs
    assert _opt(s["pseudo_train"], "MODEL.WEIGHTS") == final["stage1"]
    assert _opt(s["pseudo_extra"], "MODEL.WEIGHTS") == final["stage1"]
    assert "MODEL.WEIGHTS" not in s["stage1_selftrain"].opts  # the config's initialisation
    assert _opt(s["stage2"], "MODEL.WEIGHTS") == final["stage1_selftrain"]
    assert _opt(s["tta_eval"], "MODEL.WEIGHTS") == final["stage2"]
    pseudo_train, pseudo_extra = s["pseudo_train"].outputs[0], s["pseudo_extra"].outputs[0]
    assert s["pseudo_train"].argv[s["pseudo_train"].argv.index("--output") + 1] == pseudo_train
    # the extra images' labels are trained on: pseudo_label refuses a model without masks
    assert "--as-training-set" in s["pseudo_extra"].argv
    assert "--as-training-set" not in s["pseudo_train"].argv  # ignore boxes: boxes suffice
    selftrain = s["stage1_selftrain"]
    assert json.loads(_opt(selftrain, "DATASETS.IGNORE_BOXES")) == [["lt_synthetic_train", pseudo_train]]  # fmt: skip  # noqa: E501
    fmt = json.loads(_opt(selftrain, "DATASETS.LVIS_FORMAT"))
    assert fmt == [["recipe_extra_pseudo", pseudo_extra,
                    str(tmp_path / "data" / "lt_synthetic" / "images")]]  # fmt: skip
    assert _opt(selftrain, "DATASETS.EXTRA_TRAIN") == '("recipe_extra_pseudo",)'
    assert selftrain.consumed["inputs"] == [pseudo_train, pseudo_extra]
    assert "--eval-only" in s["tta_eval"].argv
    assert _opt(s["tta_eval"], "DATASETS.TEST") == '("lt_synthetic_val", "lt_synthetic_test_dev")'
    results = s["tta_eval"].outputs[1]
    assert results.endswith("inference/lt_synthetic_test_dev/lvis_instances_results.json")
    for st in stages:  # every stage sees the data root and the configs of this checkout
        assert st.env["DETECTRON2_DATASETS"] == str(tmp_path / "data")
    assert s["stage1"].argv[2:4] == ["--config-file", str(REPO / CONFIGS[("lvis2020_1st", True)]["stage1"][0])]  # fmt: skip  # noqa: E501
    assert _opt(s["stage1"], "SOLVER.MAX_ITER") == "200" and s["stage1"].total == 200
    assert "SOLVER.MAX_ITER" not in s["stage2"].opts and s["stage2"].total == 100  # the config's

    _, mmdet = _plan(tmp_path, "lvis2020_mmdet", "--quick", "--iters", "2")
    m = _by_name(mmdet)
    assert list(m) == ["data", "model", "dualhead", "tta_eval"]
    assert _opt(m["dualhead"], "MODEL.WEIGHTS") == os.path.join(m["model"].folder, "model_final.pth")  # fmt: skip  # noqa: E501
    assert _opt(m["tta_eval"], "MODEL.WEIGHTS") == os.path.join(m["dualhead"].folder, "model_final.pth")  # fmt: skip  # noqa: E501
    tta_config = CONFIGS[("lvis2020_mmdet", True)]["tta"][0]
    assert m["tta_eval"].argv[2:4] == ["--config-file", str(REPO / tta_config)]
    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file(str(REPO / tta_config))
    assert cfg.TEST.AUG.ENABLED and cfg.MODEL.ROI_BOX_HEAD.TSD.ENABLED
    # --iters: the last SOLVER.MAX_ITER wins (yacs applies options in order)
    opts = m["model"].opts
    assert opts[len(opts) - 1 - opts[::-1].index("SOLVER.MAX_ITER") + 1] == "2"
    assert m["model"].total == 2


def test_lvis_plan_uses_the_lvis_configs_gpus_and_extra_images(tmp_path):
    _, stages = _plan(tmp_path, "lvis2020_1st", "--num-gpus", "8", "--extra-json", "x/e.json",
                      "--extra-root", "x/img")  # fmt: skip
    s = _by_name(stages)
    assert "data" not in s
    assert [os.path.basename(st.folder) for st in stages] == [
        "01_stage1", "02_pseudo_train", "03_pseudo_extra", "04_stage1_selftrain", "05_stage2",
        "06_tta_eval"]  # fmt: skip
    assert s["stage1"].consumed["weights"] == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    for st in stages:
        assert st.argv[st.argv.index("--num-gpus") + 1] == "8"
        assert "/configs/LVISv1/" in st.argv[st.argv.index("--config-file") + 1]
        assert "DETECTRON2_DATASETS" in st.env
    reg = json.loads(_opt(s["pseudo_extra"], "DATASETS.LVIS_FORMAT"))
    assert reg == [["recipe_extra_images", os.path.abspath("x/e.json"), os.path.abspath("x/img")]]
    assert s["pseudo_extra"].argv[s["pseudo_extra"].argv.index("--dataset") + 1] == "recipe_extra_images"  # fmt: skip  # noqa: E501
    assert json.loads(_opt(s["stage1_selftrain"], "DATASETS.LVIS_FORMAT"))[0][2] == os.path.abspath("x/img")  # fmt: skip  # noqa: E501
    assert _opt(s["tta_eval"], "DATASETS.TEST") == '("lvis_v1_val", "lvis_v1_test_dev")'
    assert "SOLVER.MAX_ITER" not in s["stage1"].opts and s["stage1"].total == 180000


@pytest.mark.parametrize("value", ["5", "-0.1", "nan"])
def test_pseudo_score_thresh_must_be_in_0_1(value, capsys):
    with pytest.raises(SystemExit):
        parse_args(["lvis2020_1st", "--dry-run", "--pseudo-score-thresh", value])
    assert f"--pseudo-score-thresh must be in [0, 1], got {float(value)}" in capsys.readouterr().err
    assert parse_args(["lvis2020_1st", "--pseudo-score-thresh", "0"]).pseudo_score_thresh == 0.0


def test_every_config_of_the_table_exists():
    for (name, quick), stages in CONFIGS.items():
        assert name in recipe.PIPELINES
        for config, opts in stages.values():
            assert (REPO / config).is_file(), config
            assert ("/tiny/" in config) == quick and len(opts) % 2 == 0


def test_dry_run_prints_every_command_and_writes_nothing(tmp_path, capsys):
    assert recipe.main(["lvis2020_1st", "--quick", "--dry-run", "--output", str(tmp_path / "o"),
                        "--data-root", str(tmp_path / "d")]) == 0  # fmt: skip
    text = capsys.readouterr().out
    _, stages = _plan(tmp_path, "lvis2020_1st", "--quick", "--output", str(tmp_path / "o"),
                      "--data-root", str(tmp_path / "d"))  # fmt: skip
    for st in stages:
        assert f"{st.name} (run): {st.title}" in text
        assert shlex.join(st.command()) in text
        assert ", ".join(st.outputs) in text
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_a_rerun_skips_complete_stages_and_reruns_one_whose_output_is_gone(tmp_path):
    _, stages = _plan(tmp_path, "lvis2020_mmdet", "--quick")
    runner = FakeRunner(stages)
    run_stages("p", _no_check(stages), runner=runner, out=lambda s: None)
    assert [c[0] for c in runner.calls] == ["data", "model", "dualhead", "tta_eval"]
    for st in stages:
        done = json.loads(open(os.path.join(st.folder, MARKER)).read())
        assert done["stage"] == st.name and done["outputs"] == st.outputs
        record = json.loads(open(os.path.join(st.folder, RECORD)).read())
        assert record["datasets"] == st.consumed["datasets"]
    lines = []
    runner.calls.clear()
    seconds = run_stages("p", stages, runner=runner, out=lines.append)
    assert runner.calls == [] and sum("complete, skipped" in x for x in lines) == 4
    assert seconds == {s.name: json.loads(open(os.path.join(s.folder, MARKER)).read())["seconds"]
                       for s in stages}  # fmt: skip
    os.remove(stages[2].outputs[0])  # dualhead's model_final.pth
    run_stages("p", stages, runner=runner, out=lambda s: None)
    assert [c[0] for c in runner.calls] == ["dualhead"]


def test_an_interrupted_stage_fails_by_name_then_resumes(tmp_path, monkeypatch, capsys):
    argv = ["lvis2020_1st", "--quick", "--output", str(tmp_path / "o"), "--data-root",
            str(tmp_path / "d")]  # fmt: skip
    _, stages = _plan(tmp_path, *argv)
    runner = FakeRunner(stages, codes={"stage1_selftrain": 75})
    monkeypatch.setattr(recipe_runner, "run_subprocess", runner)
    monkeypatch.setattr(recipe, "check_synthetic", lambda folder: None)
    for st in stages:
        st.check = None
    monkeypatch.setattr(recipe, "build_plan", lambda name, args: (str(tmp_path / "o"), stages))
    assert recipe.main(argv) == 75  # the stage's exit status (75: preempted)
    err = capsys.readouterr().err
    assert "stage 'stage1_selftrain' failed: exit status 75" in err
    assert [c[0] for c in runner.calls][-1] == "stage1_selftrain"
    assert "stage2" not in [c[0] for c in runner.calls]
    first = [c for c in runner.calls if c[0] == "stage1_selftrain"][0][1]
    assert "--resume" not in first
    runner.calls.clear()
    assert recipe.main(argv) == 0
    assert [c[0] for c in runner.calls] == ["stage1_selftrain", "stage2", "tta_eval"]
    resumed = runner.calls[0][1]
    assert resumed[resumed.index("--resume") + 1] == stages[4].opts[0]  # before KEY VALUE opts
    assert "--resume" not in runner.calls[1][1]  # stage2 had no checkpoint
    summary = json.loads((tmp_path / "o" / "recipe_summary.json").read_text())
    assert set(summary["seconds"]) == {s.name for s in stages}


def test_missing_output_and_failed_check_name_the_stage(tmp_path):
    _, stages = _plan(tmp_path, "lvis2020_1st", "--quick")
    stages[0].done_if_outputs = False
    with pytest.raises(StageFailed, match="stage 'data' failed: finished without writing") as e:
        run_stages("p", stages, runner=FakeRunner(stages, write=False), out=lambda s: None)
    assert e.value.returncode == 1

    class NoLabels(FakeRunner):
        def __call__(self, command, env, log_path, on_line):
            code = super().__call__(command, env, log_path, on_line)
            stage = self.by_folder[os.path.dirname(log_path)]
            if stage.name == "pseudo_extra":
                with open(stage.outputs[1], "w") as f:
                    json.dump({"pseudo_labels": 0}, f)
            return code

    with pytest.raises(StageFailed, match="stage 'pseudo_extra' failed: .*no pseudo label"):
        run_stages("p", stages, runner=NoLabels(stages), out=lambda s: None)
    assert not os.path.exists(os.path.join(stages[3].folder, MARKER))
    assert os.path.exists(os.path.join(stages[2].folder, MARKER))


def test_progress_shows_the_stage_and_its_eta(tmp_path):
    now = [0.0]
    stage = Stage("train", "a stage", str(tmp_path / "a"), ["true"],
                  outputs=[str(tmp_path / "a" / "x")], resumable=True, estimate_s=100.0,
                  total=100)  # fmt: skip
    after = Stage("later", "next", str(tmp_path / "b"), ["true"], estimate_s=300.0)

    def runner(command, env, log, on_line):
        if os.path.dirname(log) == stage.folder:
            now[0] = 60.0
            on_line("eta: 0:01:00  iter: 49  total_loss: 1.0\n")  # 50 of 100 after 60 s
            open(stage.outputs[0], "w").close()
            now[0] = 120.0
        return 0

    lines = []
    run_stages("p", [stage, after], runner=runner, out=lines.append, clock=lambda: now[0],
               interval=0)  # fmt: skip
    text = "\n".join(lines)
    assert "[p 1/2] train: a stage (estimate 1.7 min; pipeline ~6.7 min left)" in text
    # 50/100 after 1 min: 1 more minute; the next stage's 5 min at the speed seen (no stage
    # finished yet: 1x)
    assert "[p 1/2] train: 50/100, 1.0 min elapsed, stage ~1.0 min left, pipeline ~6.0 min left" in text  # fmt: skip  # noqa: E501
    assert "[p 1/2] train: done in 2.0 min (estimate was 1.7 min)" in text
    # the finished stage took 1.2x its estimate: the next one is expected to as well
    assert "[p 2/2] later: next (estimate 6.0 min; pipeline ~6.0 min left)" in text


def test_run_subprocess_logs_the_output_and_returns_the_status(tmp_path):
    log, seen = tmp_path / "log.txt", []
    code = "import os, sys; print('one'); print(os.environ['RECIPE_T']); sys.exit(3)"
    rc = recipe_runner.run_subprocess([sys.executable, "-c", code], {"RECIPE_T": "two"},
                                      str(log), seen.append)  # fmt: skip
    assert rc == 3 and seen == ["one\n", "two\n"]
    assert log.read_text().endswith("one\ntwo\n")


def test_a_synthetic_set_made_with_other_options_is_not_overwritten(tmp_path):
    folder = tmp_path / "lt_synthetic"
    recipe.check_synthetic(str(folder))  # nothing there: the data stage generates it
    (folder / "annotations").mkdir(parents=True)
    (folder / "annotations" / "lt_synthetic_train.json").write_text("{}")
    with pytest.raises(StageFailed, match="stage 'data' failed: .* generated with other options"):
        recipe.check_synthetic(str(folder))
    from lvis_longtail.data.synthetic import generate

    generate(str(folder), write_images=False, progress=False)  # the defaults: rewritten as is
    recipe.check_synthetic(str(folder))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lvis2020_1st", "lvis2020_mmdet"])
def test_quick_pipeline_end_to_end_with_two_iterations(tmp_path, name, capsys):
    from lvis_longtail.data.synthetic import generate
    from lvis_longtail.evaluation.results import load_lvis_results
    from lvis_longtail.utils.io import read_json

    data = tmp_path / "data"
    generate(str(data / "lt_synthetic"), num_train=48, num_val=6, num_test=3, num_unlabeled=4,
             progress=False)  # fmt: skip
    argv = [name, "--quick", "--iters", "2", "--pseudo-score-thresh", "0", "--data-root",
            str(data), "--output", str(tmp_path / "out")]  # fmt: skip
    assert recipe.main(argv) == 0
    _, stages = build_plan(name, parse_args(argv))
    results = stages[-1].outputs[1]
    split = read_json(str(data / "lt_synthetic" / "annotations" / "lt_synthetic_test_dev.json"))
    records = load_lvis_results(results, split, max_dets=300, required=("bbox", "segmentation"))
    assert {r["image_id"] for r in records} <= {i["id"] for i in split["images"]}
    if name == "lvis2020_1st":  # EQL's sigmoid scores start at its prior 0.001, above the test
        assert records  # threshold 1e-4; Seesaw's may all be below it after 2 iterations
    out = capsys.readouterr().out
    assert "test-dev results file (validated)" in out and "tta_eval: val segm AP" in out
    assert recipe.main(argv) == 0  # everything complete: skipped
    assert capsys.readouterr().out.count("complete, skipped") == len(stages)


def test_progress_adds_up_the_inference_of_several_test_sets(tmp_path):
    now = [0.0]
    stage = Stage("eval", "two sets", str(tmp_path / "e"), ["true"], estimate_s=60.0, total=200)

    def runner(command, env, log, on_line):
        for t, text in ((30.0, "Inference done 150/150. Total"), (40.0, "Inference done 25/50.")):
            now[0] = t
            on_line(f"[d2] {text}\n")
        return 0

    lines = []
    run_stages("p", [stage], runner=runner, out=lines.append, clock=lambda: now[0], interval=0)
    assert "[p 1/1] eval: 150/200, 0.5 min elapsed, stage ~0.2 min left" in lines[2]
    # 175 of 200 images in 40 s: 40 / 175 * 25 s more
    assert f"[p 1/1] eval: 175/200, 0.7 min elapsed, stage ~{40 / 175 * 25 / 60:.1f} min left" in lines[3]  # fmt: skip  # noqa: E501


def test_summary_lines_give_each_stage_val_ap_and_the_results_file(tmp_path):
    metrics = tmp_path / "a" / "lvis_metrics.json"
    metrics.parent.mkdir()
    task = {"AP": 12.34, "APr": 1.0, "APc": 2.06, "APf": 30.0}
    metrics.write_text(json.dumps({"segm": task, "bbox": dict(task, AP=20.0)}))
    results = tmp_path / "lvis_instances_results.json"
    results.write_text("[]")
    stage = Stage("s2", "t", str(tmp_path), ["true"], outputs=[str(metrics), str(results)])
    assert recipe_runner.summary_lines([stage]) == [
        "  s2: val segm AP 12.3 (APr 1.0, APc 2.1, APf 30.0); bbox AP 20.0 (APr 1.0, APc 2.1, "
        "APf 30.0)",
        f"  test-dev results file (validated): {results}",
    ]


def test_sigterm_reaches_the_stage_which_exits_75(tmp_path):
    """A scheduler's SIGTERM to the recipe reaches the running stage (train_net.py saves a
    checkpoint and exits 75 on it); its status comes back and the handler is restored."""
    import signal

    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
            "print('ready', flush=True)\n"
            "time.sleep(30)\n")  # fmt: skip
    before = signal.getsignal(signal.SIGTERM)

    def on_line(text):
        if text == "ready\n":
            os.kill(os.getpid(), signal.SIGTERM)

    command = [sys.executable, "-c", code]
    rc = recipe_runner.run_subprocess(command, {}, str(tmp_path / "log.txt"), on_line)
    assert rc == 75 and signal.getsignal(signal.SIGTERM) is before


def test_progress_of_a_resumed_stage_counts_from_its_first_iteration(tmp_path):
    now = [0.0]
    stage = Stage("train", "t", str(tmp_path / "a"), ["true"], resumable=True, total=100)

    def runner(command, env, log, on_line):
        on_line("[d2] Starting training from iteration 60\n")
        now[0] = 30.0
        on_line("eta: 0:00:30  iter: 79  total_loss: 1.0\n")  # 20 of the 40 left in 30 s
        return 0

    lines = []
    run_stages("p", [stage], runner=runner, out=lines.append, clock=lambda: now[0], interval=0)
    assert "[p 1/1] train: 80/100, 0.5 min elapsed, stage ~0.5 min left" in "\n".join(lines)
