"""The validation pass of setup_cfg: each message names the key and what would be valid."""

import re

import pytest
from conftest import REPO, TINY_BASE, tiny_cfg
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import META_ARCH_REGISTRY, ROI_KEYPOINT_HEAD_REGISTRY

from lvis_longtail import config_check
from lvis_longtail.config import ConfigError, add_longtail_config
from lvis_longtail.config_check import ENUMS, REGISTRY_KEYS, RENAMED, all_keys, get_key
from lvis_longtail.data.augmentations.single import SCALE_JITTER_PRESETS
from lvis_longtail.engine import setup_cfg
from lvis_longtail.modeling.ignore_regions import LongTailRCNN

SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def error_of(opts, config_file=TINY_BASE, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        setup_cfg(str(config_file), opts, **kwargs)
    return str(e.value)


@pytest.mark.parametrize(
    "key, bad",
    [
        ("MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT", "area-ratio"),
        ("MODEL.ROI_MASK_HEAD.TEST_AREA_RATIO", "twopass"),
        ("MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE", "Normed"),
        ("MODEL.ROI_BOX_HEAD.PREDICTOR_TYPE", "Cosine"),
        ("TEST.EVAL_PROTOCOL", "fixd"),
        ("TEST.LVIS_EVALUATOR", "lvis"),
        ("MODEL.ROI_HEADS.NMS_TYPE", "soft"),
        ("MODEL.ROI_MASK_HEAD.POOLER_TYPE", "DeformROIAlign"),
    ],
)
def test_enum_errors_list_the_valid_values(key, bad):
    msg = error_of([key, bad])
    assert f"{key} is '{bad}'; valid values: {list(ENUMS[key])}" in msg


def test_every_enum_default_is_valid_and_each_value_set_declared_once():
    cfg = add_longtail_config(get_cfg())
    assert [k for k, v in ENUMS.items() if get_key(cfg, k) not in v] == []
    # one declaration for the keys that share a set (e.g. both poolers)
    assert ENUMS["MODEL.ROI_BOX_HEAD.POOLER_TYPE"] is ENUMS["MODEL.ROI_MASK_HEAD.POOLER_TYPE"]
    assert "DeformROIAlignV2" in ENUMS["MODEL.ROI_MASK_HEAD.POOLER_TYPE"]
    assert ENUMS["MODEL.ROI_HEADS.NMS_TYPE"] is ENUMS["TEST.AUG.MERGE_NMS_TYPE"]
    # the builder's presets are the enum's values (besides "custom": the keys themselves)
    assert {"custom", *SCALE_JITTER_PRESETS} == set(ENUMS["INPUT.SCALE_JITTER.PRESET"])


def test_detectron2_enum_keys_are_checked_too():
    msg = error_of(["DATALOADER.SAMPLER_TRAIN", "RepeatFactorSampler"])
    assert "DATALOADER.SAMPLER_TRAIN is 'RepeatFactorSampler'; valid values: [" in msg
    assert "(closest: 'RepeatFactorTrainingSampler')" in msg


@pytest.mark.parametrize(
    "key, bad, near, registered",
    [
        ("MODEL.ROI_HEADS.NAME", "LongTailROIHead", "LongTailROIHeads", "StandardROIHeads"),
        ("MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "Seesaw", "SeesawLoss", "EQLv2"),
        ("MODEL.ROI_MASK_HEAD.NAME", "DiceBCEMask", "DiceBCEMaskHead", "MaskRCNNConvUpsampleHead"),
        (
            "MODEL.BACKBONE.NAME",
            "build_resnet_fpn",
            "build_resnet_fpn_backbone",
            "build_resnet_backbone",
        ),
        ("MODEL.META_ARCHITECTURE", "GeneralizedRCN", "GeneralizedRCNN", "RetinaNet"),
    ],
)
def test_registry_misses_list_the_names_and_the_closest(key, bad, near, registered):
    msg = error_of([key, bad])
    assert f"{key} is '{bad}', which is not registered; closest: '{near}'" in msg
    assert f"'{registered}'" in msg


def test_augmentation_names_are_checked_when_the_config_is_loaded():
    msg = error_of(["INPUT.AUGMENTATIONS", "['ResizeShortestEdge', 'Mozaic']"])
    assert "INPUT.AUGMENTATIONS[1] is 'Mozaic', which is not registered; closest: 'Mosaic'" in msg
    assert "'CopyPaste'" in msg and "INPUT.AUGMENTATIONS[0]" not in msg


def test_all_problems_are_reported_at_once():
    msg = error_of(["TEST.EVAL_PROTOCOL", "x", "MODEL.ROI_HEADS.NAME", "y"])
    assert "TEST.EVAL_PROTOCOL" in msg and "MODEL.ROI_HEADS.NAME" in msg


def test_unknown_keys_get_the_closest_known_key(tmp_path):
    msg = error_of(["MODEL.ROI_BOX_HEAD.CLS_LOSS_NAMES", "EQL"])
    assert "Non-existent key: MODEL.ROI_BOX_HEAD.CLS_LOSS_NAMES" in msg
    assert "did you mean MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME" in msg
    yaml_file = tmp_path / "typo.yaml"
    yaml_file.write_text(f'_BASE_: "{TINY_BASE}"\nTEST:\n  EVAL_PROTOCLO: fixed\n')
    with pytest.raises(ConfigError, match=r"typo.yaml: .*did you mean TEST.EVAL_PROTOCOL"):
        setup_cfg(str(yaml_file))


@pytest.mark.parametrize("old, new", sorted(RENAMED.items()))
def test_renamed_options_name_the_new_key(old, new):
    defaults = add_longtail_config(get_cfg())
    assert old not in all_keys(defaults) and new in all_keys(defaults)
    msg = error_of(["SOLVER.MAX_ITER", "10", old, str(get_key(defaults, new))])
    assert msg == f"command-line options: {old} was renamed to {new}"


def test_renamed_keys_of_a_file_are_all_named(tmp_path):
    yaml_file = tmp_path / "old.yaml"
    yaml_file.write_text(
        f'_BASE_: "{TINY_BASE}"\nMODEL:\n  CPU_THREADS: 2\n  ROI_MASK_HEAD:\n'
        "    MASK_SCORING: True\n    MASK_SCORING_LOSS_WEIGHT: 0.5\n"
    )
    msg = error_of([], yaml_file)
    assert msg.startswith(f"{yaml_file}: ")
    for old in ("MODEL.CPU_THREADS", "MODEL.ROI_MASK_HEAD.MASK_SCORING"):
        assert f"{old} was renamed to {RENAMED[old]}" in msg
    assert "MASK_SCORING_LOSS_WEIGHT was renamed to MODEL.ROI_MASKIOU_HEAD.LOSS_WEIGHT" in msg


def test_flags_after_key_value_pairs_are_named():
    msg = error_of(["SOLVER.MAX_ITER", "10", "--eval-only"])
    assert "--eval-only came after the KEY VALUE options" in msg
    assert "put flags first" in msg
    assert "SOLVER.BASE_LR" not in msg
    setup_cfg(str(TINY_BASE), ["TEST.DETECTIONS_PER_IMAGE", "-1"])  # a negative value


def test_missing_lvis_format_json_names_entry_and_resolved_path(tmp_path):
    json_file = "nowhere/lt_synthetic/annotations/lt_synthetic_train.json"
    opts = ["DATASETS.LVIS_FORMAT", f"[['mine', '{json_file}', 'img']]"]
    setup_cfg(str(TINY_BASE), opts)  # loading a config needs no data
    msg = error_of(opts, check_files=True)
    assert f"DATASETS.LVIS_FORMAT[0] ('mine'): json file '{json_file}' not found" in msg
    assert re.search(r"resolved: /\S*/nowhere/lt_synthetic/annotations", msg)
    assert "python -m lvis_longtail.data.synthetic --out DIR" in msg
    other = error_of(["DATASETS.LVIS_FORMAT", "[['mine', 'ann/my.json', 'img']]"], check_files=True)
    line = next(x for x in other.splitlines() if "DATASETS.LVIS_FORMAT[0]" in x)
    assert "lvis_longtail.data.synthetic" not in line  # (the tiny base's own train set may lack)


def test_registered_dataset_files_are_checked_when_asked(tmp_path, monkeypatch):
    from lvis_longtail.data.builtin import register_synthetic

    register_synthetic(str(tmp_path / "absent"), prefix="lt_check")
    opts = ["DATASETS.TRAIN", "('lt_check_train',)", "DATASETS.TEST", "('lt_check_val',)"]
    setup_cfg(str(TINY_BASE), opts)  # loading a config needs no data
    msg = error_of(opts, check_files=True)
    assert "DATASETS.TRAIN: dataset 'lt_check_train' json file" in msg
    assert "DATASETS.TEST: dataset 'lt_check_val' json file" in msg
    assert "make data" in msg
    (tmp_path / "model.pth").write_bytes(b"")  # --eval-only needs MODEL.WEIGHTS
    weights = ["MODEL.WEIGHTS", str(tmp_path / "model.pth")]
    msg = error_of(opts + weights, check_files=True, eval_only=True)
    assert "DATASETS.TRAIN" not in msg and "lt_check_val" in msg
    msg = error_of(["DATASETS.TEST", "('lt_synthetic_vall',)"])
    assert "dataset 'lt_synthetic_vall' is not registered; closest: 'lt_synthetic_val'" in msg


@pytest.mark.parametrize("name", ["LongTailCascadeROIHeads", "LongTailHTCLiteROIHeads"])
def test_cascade_heads_need_class_agnostic_box_regression(name):
    msg = error_of(["MODEL.ROI_HEADS.NAME", name])
    assert "set MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True" in msg
    setup_cfg(str(TINY_BASE), ["MODEL.ROI_HEADS.NAME", "LongTailROIHeads"])
    agnostic = ["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"]
    setup_cfg(str(TINY_BASE), ["MODEL.ROI_HEADS.NAME", "LongTailCascadeROIHeads", *agnostic])


@pytest.mark.parametrize(
    "opts, message",
    [
        (
            ["MODEL.ROI_MASK_HEAD.TEST_AREA_RATIO", "two_pass"],
            'TEST_AREA_RATIO "two_pass" needs LEVEL_ASSIGNMENT "area_ratio" (got \'box\')',
        ),
        (
            ["MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE", "NormedConv"],
            "MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE 'NormedConv': only a mask head that reads them "
            "does (NAME 'DiceBCEMaskHead'), not NAME 'MaskRCNNConvUpsampleHead'",
        ),
        (["MODEL.ROI_MASK_HEAD.BOUNDARY_LOSS_WEIGHT", "1.0"], "BOUNDARY_LOSS_WEIGHT 1.0: only"),
        (
            ["MODEL.ROI_MASK_HEAD.POOLER_TYPE", "DeformROIAlignV2",
             "MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT", "area_ratio"],
            '"DeformROIAlignV2" and LEVEL_ASSIGNMENT "area_ratio" each replace the mask pooler',
        ),
        (
            ["MODEL.ROI_HEADS.HTC_LITE.MASK_TRAIN_STAGE", "3"],
            "MASK_TRAIN_STAGE 3 is not a stage of the 3-stage cascade",
        ),
        (
            ["TEST.AUG.SCALES", "[[100, 200], [120, 240]]", "TEST.AUG.VALID_RANGES", "[[0, 10]]"],
            "TEST.AUG.VALID_RANGES has 1 ranges for 2 scales",
        ),
        (["TEST.AUG.MASK_RULE", "select"], 'MASK_RULE "select" needs TEST.AUG.VALID_RANGES'),
        (
            ["TEST.AUG.ENABLED", "True", "MODEL.KEYPOINT_ON", "True"],
            "TEST.AUG.ENABLED does not support MODEL.KEYPOINT_ON",
        ),
        (
            ["DATASETS.EXTRA_TRAIN", "('lt_synthetic_val',)", "MODEL.META_ARCHITECTURE",
             "LongTailRCNN", "DATALOADER.SAMPLER_TRAIN", "RandomSubsetTrainingSampler"],
            "DATASETS.EXTRA_TRAIN works with DATALOADER.SAMPLER_TRAIN TrainingSampler or "
            "RepeatFactorTrainingSampler, not 'RandomSubsetTrainingSampler'",
        ),
    ],
)  # fmt: skip
def test_cross_key_rules_name_the_keys(opts, message):
    assert message in error_of(opts)


def test_cross_key_rules_accept_the_consistent_settings():
    cfg = setup_cfg(str(TINY_BASE), ["MODEL.ROI_MASK_HEAD.NAME", "DiceBCEMaskHead",
                               "MODEL.ROI_MASK_HEAD.PREDICTOR_TYPE", "NormedConv",
                               "MODEL.ROI_MASK_HEAD.BOUNDARY_LOSS_WEIGHT", "1.0",
                               "MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT", "area_ratio",
                               "MODEL.ROI_MASK_HEAD.TEST_AREA_RATIO", "two_pass",
                               "MODEL.ROI_HEADS.HTC_LITE.MASK_TRAIN_STAGE", "-3",
                               "TEST.AUG.SCALES", "[[100, 200], [120, 240]]",
                               "TEST.AUG.VALID_RANGES", "[[0, 10], [5, -1]]",
                               "TEST.AUG.MASK_RULE", "select"])  # fmt: skip
    head = cfg.MODEL.ROI_MASK_HEAD
    assert (head.NAME, head.PREDICTOR_TYPE, head.BOUNDARY_LOSS_WEIGHT) == (
        "DiceBCEMaskHead", "NormedConv", 1.0)  # fmt: skip
    assert (head.LEVEL_ASSIGNMENT, head.TEST_AREA_RATIO) == ("area_ratio", "two_pass")
    assert cfg.MODEL.ROI_HEADS.HTC_LITE.MASK_TRAIN_STAGE == -3
    assert [list(s) for s in cfg.TEST.AUG.SCALES] == [[100, 200], [120, 240]]
    assert [list(r) for r in cfg.TEST.AUG.VALID_RANGES] == [[0, 10], [5, -1]]
    assert cfg.TEST.AUG.MASK_RULE == "select" and cfg.is_frozen()


def test_rules_read_what_a_registered_class_declares(monkeypatch):
    """A subclass of LongTailRCNN inherits ``supports_loss_weight``; detectron2's
    GeneralizedRCNN does not declare it."""

    class MyRCNN(LongTailRCNN):
        pass

    monkeypatch.setitem(META_ARCH_REGISTRY._obj_map, "MyRCNN", MyRCNN)
    extra = ["DATASETS.EXTRA_TRAIN", "('lt_synthetic_val',)"]
    setup_cfg(str(TINY_BASE), extra + ["MODEL.META_ARCHITECTURE", "MyRCNN"])
    msg = error_of(extra + ["MODEL.META_ARCHITECTURE", "GeneralizedRCNN"])
    assert "DATASETS.EXTRA_TRAIN needs MODEL.META_ARCHITECTURE 'LongTailRCNN'" in msg


def test_new_keys_are_checked_just_by_declaring_them(monkeypatch):
    monkeypatch.setitem(ENUMS, "MODEL.ROI_HEADS.NMS_THRESH_TEST", (0.5, 0.7))
    monkeypatch.setitem(
        REGISTRY_KEYS, "MODEL.ROI_KEYPOINT_HEAD.NAME", (ROI_KEYPOINT_HEAD_REGISTRY, ())
    )
    msg = error_of(["MODEL.ROI_HEADS.NMS_THRESH_TEST", "0.6", "MODEL.ROI_KEYPOINT_HEAD.NAME", "K"])
    assert "MODEL.ROI_HEADS.NMS_THRESH_TEST is 0.6; valid values: [0.5, 0.7]" in msg
    assert "MODEL.ROI_KEYPOINT_HEAD.NAME is 'K', which is not registered" in msg
    monkeypatch.setattr(config_check.rules, "RULES", list(config_check.rules.RULES))
    config_check.rule(
        lambda cfg: "SOLVER.MAX_ITER must be even" if cfg.SOLVER.MAX_ITER % 2 else None
    )
    assert "SOLVER.MAX_ITER must be even" in error_of(["SOLVER.MAX_ITER", "7"])


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _set_by_file(path) -> dict:
    """Every key a YAML sets (with its _BASE_ chain), dotted -> value."""
    loaded = CfgNode.load_yaml_with_base(str(path), allow_unsafe=True)
    return {k: get_key(loaded, k) for k in all_keys(loaded) if k != "_BASE_"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_passes_and_round_trips(path, tmp_path):
    cfg = setup_cfg(str(path))
    assert cfg.is_frozen()
    known = set(all_keys(cfg))
    set_by_file = _set_by_file(path)
    assert set(set_by_file) <= known and not set(set_by_file) & set(RENAMED)
    for key, value in set_by_file.items():  # what the file says is what the config holds
        value = CfgNode._decode_cfg_value(value)  # as yacs reads it: "(a,)" is a tuple
        assert _plain(get_key(cfg, key)) == _plain(value), key
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(cfg.dump())
    again = setup_cfg(str(dumped))  # yacs keeps the inner sequences of a tuple as lists
    assert {k: _plain(get_key(again, k)) for k in known} == {
        k: _plain(get_key(cfg, k)) for k in known
    }
    assert set(all_keys(again)) == known


def _train_net():
    """train_net.py (a script at the repository's root) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_only_needs_model_weights(tmp_path):
    train_net = _train_net()
    out = ["OUTPUT_DIR", str(tmp_path)]
    argv = ["--eval-only", "--config-file", str(TINY_BASE), *out]
    args = train_net.default_argument_parser().parse_args(argv)
    with pytest.raises(ConfigError) as e:
        train_net.main(args)  # before any model is built: nothing in OUTPUT_DIR
    assert str(e.value).startswith(
        f"--eval-only needs MODEL.WEIGHTS (the checkpoint to evaluate); it is '' in {TINY_BASE}"
    )
    assert "or add --resume" in str(e.value) and list(tmp_path.iterdir()) == []
    msg = error_of(["MODEL.WEIGHTS", "", *out], eval_only=True, resume=True)
    assert "it is '' in the command-line options" in msg
    assert f"--resume found no last_checkpoint in OUTPUT_DIR '{tmp_path}'" in msg
    (tmp_path / "last_checkpoint").write_text("model_final.pth")  # --resume evaluates that
    assert setup_cfg(str(TINY_BASE), out, eval_only=True, resume=True).MODEL.WEIGHTS == ""
    setup_cfg(str(TINY_BASE), out)  # training from scratch is fine


def test_missing_model_weights_file_is_named_when_files_are_checked(tmp_path):
    missing = str(tmp_path / "nope.pth")
    no_data = ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out")]
    opts = [*no_data, "MODEL.WEIGHTS", missing]
    setup_cfg(str(TINY_BASE), opts)  # loading a config needs no files
    msg = error_of(opts, check_files=True)
    assert msg == (
        f"invalid config:\n  MODEL.WEIGHTS: checkpoint file '{missing}' not found "
        f"(resolved: {missing})"
    )
    assert msg == error_of(opts, check_files=True, resume=True)  # no last_checkpoint
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "last_checkpoint").write_text("model_0000009.pth")
    setup_cfg(str(TINY_BASE), opts, check_files=True, resume=True)  # --resume loads that
    (tmp_path / "w.pth").write_bytes(b"")  # a file: whether it loads is the checkpointer's
    for weights in ["detectron2://ImageNetPretrained/MSRA/R-50.pkl", str(tmp_path / "w.pth")]:
        setup_cfg(str(TINY_BASE), [*no_data, "MODEL.WEIGHTS", weights], check_files=True)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "{f}: empty config file"),
        ("# only a comment\n", "{f}: empty config file"),
        ("- a\n- b\n",
         "{f}: a config file is a mapping of KEY: value at its top level, not a list"),
        ("SOLVER:\n  MAX_ITER: 10\n   BASE_LR: 1\n", "{f}: not a valid YAML file: "),
        ('_BASE_: "nope.yaml"\n', "{d}/nope.yaml: _BASE_ file not found (the _BASE_ of {f})"),
        ('_BASE_: "{base}"\nSOLVER: 5\n',
         "{f}: SOLVER is a section of keys (like SOLVER.LR_SCHEDULER_NAME), not a value, got 5"),
        ('_BASE_: "{base}"\nSOLVER:\n  MAX_ITER: abc\n',
         "{f}: SOLVER.MAX_ITER must be an integer (like 40000), got 'abc'"),
        ('_BASE_: "{base}"\nSOLVER:\n  BASE_LR: 1\n',
         "{f}: SOLVER.BASE_LR must be a float (like 0.001), got 1; write 1.0"),
        ('_BASE_: "{base}"\nDATASETS:\n  TRAIN: lt_synthetic_train\n',
         "{f}: DATASETS.TRAIN must be a list, got 'lt_synthetic_train'; write "
         "[lt_synthetic_train] for a list of one"),
    ],
)  # fmt: skip
def test_broken_config_files_are_named(tmp_path, text, message):
    path = tmp_path / "broken.yaml"
    path.write_text(text.format(base=TINY_BASE))
    msg = error_of([], path)
    assert msg.startswith(message.format(f=path, d=tmp_path)), msg
    assert len(msg) < 300 and "\n" not in msg  # not yacs' dump of the whole node
    child = tmp_path / "child.yaml"  # a broken _BASE_ is named, with the file including it
    child.write_text('_BASE_: "broken.yaml"\n')
    msg = error_of([], child)
    assert str(path) in msg
    if "{base}" in text:  # a wrong type: the file that sets the key, and the one loaded
        assert msg.startswith(f"{path} (a _BASE_ of {child}): {message[5:]}")


def test_missing_config_file_is_named():
    assert error_of([], "no/such.yaml") == "no/such.yaml: config file (--config-file) not found"


@pytest.mark.parametrize(
    "opts, message",
    [
        (["SOLVER", "5"],
         "SOLVER is a section of keys (like SOLVER.LR_SCHEDULER_NAME), not a value, got 5"),
        (["SOLVER.MAX_ITER", "abc"], "SOLVER.MAX_ITER must be an integer (like 300), got 'abc'"),
        (["SOLVER.BASE_LR", "1"], "SOLVER.BASE_LR must be a float (like 0.02), got 1; write 1.0"),
        (["MODEL.MASK_ON", "yes"], "MODEL.MASK_ON must be True or False (like True), got 'yes'"),
        (["DATASETS.TEST", "lt_synthetic_val"],
         "DATASETS.TEST must be a list (like ['lt_synthetic_val', 'lt_synthetic_test_dev']), "
         "got 'lt_synthetic_val'; write [lt_synthetic_val] for a list of one"),
    ],
)  # fmt: skip
def test_wrong_typed_options_name_the_key_and_the_type(opts, message):
    assert error_of(opts) == f"command-line options: {message}"


@pytest.mark.parametrize(
    "key, bad, message",
    [
        ("SOLVER.MAX_ITER", "0", "SOLVER.MAX_ITER must be an integer >= 1, got 0"),
        ("SOLVER.MAX_ITER", "-1", "SOLVER.MAX_ITER must be an integer >= 1, got -1"),
        ("SOLVER.IMS_PER_BATCH", "0", "SOLVER.IMS_PER_BATCH must be an integer >= 1, got 0"),
        ("SOLVER.BASE_LR", "-0.1", "SOLVER.BASE_LR must be a number > 0, got -0.1"),
        ("SOLVER.BASE_LR", "0.0", "SOLVER.BASE_LR must be a number > 0, got 0.0"),
        ("SOLVER.BASE_LR", "1e400", "SOLVER.BASE_LR must be a number > 0, got inf"),
        ("DATALOADER.NUM_WORKERS", "-1", "DATALOADER.NUM_WORKERS must be an integer >= 0, got -1"),
        ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "5.0",
         "MODEL.ROI_HEADS.SCORE_THRESH_TEST must be in [0, 1], got 5.0"),
        ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "-0.1",
         "MODEL.ROI_HEADS.SCORE_THRESH_TEST must be in [0, 1], got -0.1"),
        ("TEST.DETECTIONS_PER_IMAGE", "0",
         "TEST.DETECTIONS_PER_IMAGE must be >= 1, or -1 for no cap, got 0"),
        ("TEST.DETECTIONS_PER_IMAGE", "-2",
         "TEST.DETECTIONS_PER_IMAGE must be >= 1, or -1 for no cap, got -2"),
        ("MODEL.DEVICE", "gpu", "MODEL.DEVICE must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        ("MODEL.DEVICE", "cuda:x", "MODEL.DEVICE must be 'cpu', 'cuda' or 'cuda:N', got 'cuda:x'"),
    ],
)  # fmt: skip
def test_out_of_range_values_are_named(key, bad, message):
    msg = error_of([key, bad])
    assert msg == f"invalid config:\n  {message}"


def test_range_limits_are_accepted_and_a_file_is_not_an_output_dir(tmp_path):
    cfg = setup_cfg(str(TINY_BASE), ["SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "1",
                                     "SOLVER.BASE_LR", "1e-9", "DATALOADER.NUM_WORKERS", "0",
                                     "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                                     "TEST.DETECTIONS_PER_IMAGE", "1", "MODEL.DEVICE", "cuda:1",
                                     "OUTPUT_DIR", str(tmp_path)])  # fmt: skip
    assert (cfg.SOLVER.MAX_ITER, cfg.MODEL.DEVICE) == (1, "cuda:1")
    setup_cfg(str(TINY_BASE), ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0", "MODEL.DEVICE", "cpu",
                               "OUTPUT_DIR", str(tmp_path / "not" / "yet")])  # fmt: skip
    (tmp_path / "afile").write_text("")
    msg = error_of(["OUTPUT_DIR", str(tmp_path / "afile")])
    assert msg == f"invalid config:\n  OUTPUT_DIR '{tmp_path / 'afile'}' exists and is not a folder"


def test_a_nan_learning_rate_in_a_file_is_named(tmp_path):
    path = tmp_path / "nan.yaml"
    path.write_text(f'_BASE_: "{TINY_BASE}"\nSOLVER:\n  BASE_LR: .nan\n')
    assert error_of([], path) == "invalid config:\n  SOLVER.BASE_LR must be a number > 0, got nan"


@pytest.mark.parametrize("heads", ["StandardROIHeads", "CascadeROIHeads"])
@pytest.mark.parametrize("key, value", [
    ("MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME", "SeesawLoss"),
    ("MODEL.ROI_MASKIOU_HEAD.ENABLED", "True"),
    ("MODEL.ROI_HEADS.NMS_TYPE", "soft_linear"),
])  # fmt: skip
def test_keys_detectron2_heads_would_ignore_are_named(heads, key, value):
    """detectron2's own ROI heads would silently ignore lvis_longtail's head keys; at their
    defaults the same heads pass, and lvis_longtail's heads take the key."""
    base = ["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"]
    cfg = tiny_cfg(opts=[*base, "MODEL.ROI_HEADS.NAME", heads, key, value])
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: read by lvis_longtail's ROI heads"):
        config_check.check_config(cfg)
    config_check.check_config(tiny_cfg(opts=[*base, "MODEL.ROI_HEADS.NAME", heads]))
    config_check.check_config(tiny_cfg(opts=[*base, key, value]))
