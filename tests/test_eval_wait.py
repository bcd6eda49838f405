"""The other processes wait for the main one's evaluation on a group of their own: a main
process that exports and scores for longer than the process group's timeout (2 s here) does
not make the barrier that follows an evaluation (detectron2's EvalHook) fail on the others,
and a failed evaluation stops them with an error instead of leaving them to train alone."""

import json
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm
from test_evaluation import CAT_IDS, H, W, instances, perfect_dets, split_json

from lvis_longtail.evaluation import LVISLongTailEvaluator

WORLD_SIZE = 2
GROUP_TIMEOUT = timedelta(seconds=2)
EVAL_SECONDS = 6  # the main process's evaluation: three times the group's timeout


def _evaluate(rank, name, out_dir, fail):
    """One evaluation; the main process's scoring takes EVAL_SECONDS (and fails if asked)."""
    evaluator = LVISLongTailEvaluator(name, out_dir, wait_timeout=timedelta(seconds=60))
    if rank == 0:
        scoring = evaluator._evaluate

        def slow(paths):  # a long export and scoring (6M detections on LVIS v1 val)
            time.sleep(EVAL_SECONDS)
            if fail:
                raise ValueError("scoring failed")
            return scoring(paths)

        evaluator._evaluate = slow
    evaluator.reset()
    for k, (image_id, dets) in enumerate(sorted(perfect_dets().items())):
        if k % WORLD_SIZE == rank:  # each process infers its share of the images
            inputs = [{"image_id": image_id, "height": H, "width": W}]
            evaluator.process(inputs, [{"instances": instances(dets)}])
    try:
        return evaluator.evaluate()
    except (RuntimeError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _worker(rank, port, json_file, out_dir, result_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=GROUP_TIMEOUT)  # fmt: skip
    try:
        name = "lt_eval_wait"
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(
            json_file=json_file,
            thing_classes=[f"cat{c}" for c in CAT_IDS],
            thing_dataset_id_to_contiguous_id={c: k for k, c in enumerate(CAT_IDS)},
        )
        start = time.perf_counter()
        results = [_evaluate(rank, name, out_dir, fail=False)]
        comm.synchronize()  # detectron2's EvalHook: the barrier after an evaluation
        results.append(time.perf_counter() - start)
        results.append(_evaluate(rank, name, out_dir, fail=True))
        with open(f"{result_path}.rank{rank}", "w") as f:
            f.write(repr(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_others_wait_for_a_long_main_process_evaluation_and_learn_its_outcome(tmp_path):
    json_file = tmp_path / "split.json"
    json_file.write_text(json.dumps(split_json()))
    path = str(tmp_path / "result")
    args = (free_port(), str(json_file), str(tmp_path / "out"), path)
    mp.spawn(_worker, args=args, nprocs=WORLD_SIZE, join=True)
    main, other = [eval(open(f"{path}.rank{r}").read()) for r in range(WORLD_SIZE)]
    # a successful evaluation three times longer than the group's timeout: both go on
    assert main[0]["bbox"]["AP"] == pytest.approx(100.0) and other[0] == {}
    assert main[1] > EVAL_SECONDS and other[1] > EVAL_SECONDS
    # a failed one: the main process raises its error, the others a RuntimeError
    assert main[2] == {"error": "ValueError: scoring failed"}
    assert other[2] == {
        "error": "RuntimeError: the main process failed in its evaluation; see its log"
    }
