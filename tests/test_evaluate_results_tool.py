"""python -m lvis_longtail.tools.evaluate_results: a results file evaluated under each protocol
gives the numbers of the evaluator's functions on the same records."""

import json
import logging

import pytest
from lvis_random_split import random_results, random_split

from lvis_longtail.evaluation import evaluate_lvis_results
from lvis_longtail.evaluation.lvis_evaluation import METRICS_FILE
from lvis_longtail.tools.evaluate_results import evaluate_results_file, main


@pytest.fixture
def files(tmp_path):
    dataset = random_split(3, num_images=6)
    records = random_results(dataset, 3, false_positives=15)
    gt, res = tmp_path / "gt.json", tmp_path / "results.json"
    gt.write_text(json.dumps(dataset))
    res.write_text(json.dumps(records))
    return str(gt), str(res), dataset, records


def test_standard_protocol_equals_the_evaluator_on_the_records(files):
    gt, res, dataset, records = files
    out = evaluate_results_file(res, gt)
    assert sorted(out) == ["bbox", "segm"]
    for task in ("bbox", "segm"):
        assert out[task] == evaluate_lvis_results(dataset, records, task, 300)


def test_challenge2021_is_fixed_ap_with_boundary(files):
    gt, res, dataset, records = files
    out = evaluate_results_file(res, gt, "challenge2021", dets_per_class=7)
    assert sorted(out) == ["bbox", "boundary", "segm"]
    for task in ("bbox", "segm", "boundary"):
        assert out[task] == evaluate_lvis_results(
            dataset, records, task, max_dets=-1, dets_per_class=7
        )
    assert out["boundary"]["AP"] <= out["segm"]["AP"] + 1e-9  # min(mask, boundary) IoU


def test_cli_prints_and_writes_the_metrics(files, tmp_path, capsys):
    gt, res, _, _ = files
    assert main([res, "--gt", gt, "--protocol", "fixed", "--output", str(tmp_path / "o")]) == 0
    saved = json.loads((tmp_path / "o" / METRICS_FILE).read_text())
    assert (
        saved["protocol"] == "fixed"
        and saved["bbox"] == evaluate_results_file(res, gt, "fixed")["bbox"]
    )
    assert "APr" in capsys.readouterr().out


def test_mask_task_without_masks_is_named(files, tmp_path):
    gt, _, dataset, _ = files
    boxes_only = tmp_path / "boxes.json"
    boxes_only.write_text(json.dumps(random_results(dataset, 3, masks=False)))
    assert sorted(evaluate_results_file(str(boxes_only), gt)) == ["bbox"]
    with pytest.raises(ValueError, match=r"boxes.json: its records have no 'segmentation'"):
        evaluate_results_file(str(boxes_only), gt, "challenge2021")


def test_empty_results_file_is_logged(files, tmp_path, caplog):
    gt, _, _, _ = files
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with caplog.at_level(logging.WARNING, logger="lvis_longtail.tools.evaluate_results"):
        out = evaluate_results_file(str(empty), gt)
    assert out["bbox"]["AP"] == 0.0
    assert f"{empty}: holds no detections (an empty list): every AP is 0" in caplog.text
