"""Seesaw and EQLv2 statistics under torch.distributed: two CPU processes (gloo, loopback)
must end with identical statistics, equal to one process that sees both batches at once."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

import lvis_longtail.modeling  # noqa: F401
from lvis_longtail.modeling.cls_losses import EQLv2, SeesawLoss

K, ROIS_PER_RANK, ITERATIONS, WORLD_SIZE = 6, 10, 3, 2


def make_batches():
    """Per iteration and rank: (Seesaw logits (R, K+2), EQLv2 logits (R, K+1), labels (R,))."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(ITERATIONS):
        per_rank = []
        for _ in range(WORLD_SIZE):
            labels = torch.randint(0, K + 1, (ROIS_PER_RANK,), generator=g)
            per_rank.append(
                (
                    torch.randn(ROIS_PER_RANK, K + 2, generator=g),
                    torch.randn(ROIS_PER_RANK, K + 1, generator=g),
                    labels,
                )
            )
        batches.append(per_rank)
    return batches


def run_losses(batches_for_this_process):
    """Train-mode Seesaw and EQLv2 over the given iterations; returns their statistics."""
    seesaw, eqlv2 = SeesawLoss(num_classes=K), EQLv2(num_classes=K)
    for seesaw_logits, eqlv2_logits, labels in batches_for_this_process:
        seesaw(seesaw_logits, labels)
        eqlv2(eqlv2_logits, labels)
    return {"seesaw": seesaw.state_dict(), "eqlv2": eqlv2.state_dict()}


def _worker(rank, port, batches, result_path):
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        stats = run_losses([per_rank[rank] for per_rank in batches])
        torch.save(stats, f"{result_path}.rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_statistics_are_all_reduced_across_processes(tmp_path):
    batches = make_batches()
    result_path = str(tmp_path / "stats")
    mp.spawn(_worker, args=(free_port(), batches, result_path), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(f"{result_path}.rank{r}") for r in range(WORLD_SIZE)]

    concatenated = [
        tuple(torch.cat([per_rank[r][i] for r in range(WORLD_SIZE)]) for i in range(3))
        for per_rank in batches
    ]
    single = run_losses(concatenated)
    for loss in ("seesaw", "eqlv2"):
        for name, value in single[loss].items():
            assert torch.equal(ranks[0][loss][name], ranks[1][loss][name]), (loss, name)
            assert torch.allclose(ranks[0][loss][name], value, rtol=1e-6), (loss, name)
    # and differ from what one rank alone would have accumulated
    alone = run_losses([per_rank[0] for per_rank in batches])
    assert not torch.allclose(alone["seesaw"]["cum_samples"], single["seesaw"]["cum_samples"])
    assert not torch.allclose(alone["eqlv2"]["pos_neg"], single["eqlv2"]["pos_neg"])
