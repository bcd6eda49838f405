"""The validation pass of setup_cfg: each message names the key and what would be valid."""

import re

import pytest
from conftest import TINY_BASE

from lvis_longtail import config_check
from lvis_longtail.config import ENUM_KEYS, REGISTRY_KEYS, ConfigError, setup_cfg


def error_of(opts, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        setup_cfg(str(TINY_BASE), opts, **kwargs)
    return str(e.value)


@pytest.mark.parametrize(
    "key, bad",
    [
        ("MODEL.ROI_MASK_HEAD.LEVEL_ASSIGNMENT", "area-ratio"),
        ("MODEL.ROI_MASK_HEAD.TEST_AREA_RATIO", "twopass"),
        ("MODEL.ROI_MASK_HEAD.PREDICTOR", "Normed"),
        ("TEST.EVAL_PROTOCOL", "fixd"),
        ("TEST.LVIS_EVALUATOR", "lvis"),
    ],
)
def test_enum_errors_list_the_valid_values(key, bad):
    msg = error_of([key, bad])
    assert f"{key} is '{bad}'; valid values: {list(ENUM_KEYS[key])}" in msg


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


def test_all_problems_are_reported_at_once():
    msg = error_of(["TEST.EVAL_PROTOCOL", "x", "MODEL.ROI_HEADS.NAME", "y"])
    assert "TEST.EVAL_PROTOCOL" in msg and "MODEL.ROI_HEADS.NAME" in msg


def test_unknown_keys_get_the_closest_known_key(tmp_path):
    msg = error_of(["MODEL.ROI_BOX_HEAD.CLS_LOSS_NAMES", "EQL"])
    assert "Non-existent key: MODEL.ROI_BOX_HEAD.CLS_LOSS_NAMES" in msg
    assert "did you mean MODEL.ROI_BOX_HEAD.CLS_LOSS_NAME" in msg
    yaml = tmp_path / "typo.yaml"
    yaml.write_text(f'_BASE_: "{TINY_BASE}"\nTEST:\n  EVAL_PROTOCLO: fixed\n')
    with pytest.raises(ConfigError, match=r"typo.yaml: .*did you mean TEST.EVAL_PROTOCOL"):
        setup_cfg(str(yaml))


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
    msg = error_of(opts, check_files=True, eval_only=True)
    assert "DATASETS.TRAIN" not in msg and "lt_check_val" in msg
    msg = error_of(["DATASETS.TEST", "('lt_synthetic_vall',)"])
    assert "dataset 'lt_synthetic_vall' is not registered; closest: 'lt_synthetic_val'" in msg


@pytest.mark.parametrize("name", ["LongTailCascadeROIHeads", "LongTailHTCLiteROIHeads"])
def test_cascade_heads_need_class_agnostic_box_regression(name):
    msg = error_of(["MODEL.ROI_HEADS.NAME", name])
    assert "set MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True" in msg
    setup_cfg(str(TINY_BASE), ["MODEL.ROI_HEADS.NAME", "LongTailROIHeads"])
    setup_cfg(
        str(TINY_BASE),
        [
            "MODEL.ROI_HEADS.NAME",
            "LongTailCascadeROIHeads",
            "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
            "True",
        ],
    )


def test_new_keys_are_checked_just_by_declaring_them(monkeypatch):
    monkeypatch.setitem(ENUM_KEYS, "MODEL.ROI_HEADS.NMS_THRESH_TEST", (0.5, 0.7))
    monkeypatch.setitem(
        REGISTRY_KEYS,
        "MODEL.ROI_KEYPOINT_HEAD.NAME",
        ("detectron2.modeling.roi_heads.keypoint_head:ROI_KEYPOINT_HEAD_REGISTRY", ()),
    )
    msg = error_of(["MODEL.ROI_HEADS.NMS_THRESH_TEST", "0.6", "MODEL.ROI_KEYPOINT_HEAD.NAME", "K"])
    assert "MODEL.ROI_HEADS.NMS_THRESH_TEST is 0.6; valid values: [0.5, 0.7]" in msg
    assert "MODEL.ROI_KEYPOINT_HEAD.NAME is 'K', which is not registered" in msg
    rules = list(config_check.RULES)
    monkeypatch.setattr(config_check, "RULES", rules)
    config_check.rule(
        lambda cfg: "SOLVER.MAX_ITER must be even" if cfg.SOLVER.MAX_ITER % 2 else None
    )
    assert "SOLVER.MAX_ITER must be even" in error_of(["SOLVER.MAX_ITER", "7"])


def test_every_shipped_config_passes():
    from conftest import REPO

    for path in sorted((REPO / "configs").rglob("*.yaml")):
        setup_cfg(str(path))
