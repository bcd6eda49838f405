"""SyncBN on CPU: two gloo processes with different inputs end with identical statistics,
equal to one process that sees the concatenated batch; a tiny detector with NORM "SyncBN"
trains a DDP step across the two processes."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, make_batch, tiny_cfg
from detectron2.engine.defaults import create_ddp_model
from detectron2.layers import NaiveSyncBatchNorm, get_norm
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from lvis_longtail.layers.sync_bn import LongTailSyncBatchNorm

WORLD_SIZE, C = 2, 3


def inputs():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(2, C, 4, 5, generator=g, dtype=torch.float64) * (r + 1) + r
         for r in range(WORLD_SIZE)]  # fmt: skip
    w = [torch.randn(2, C, 4, 5, generator=g, dtype=torch.float64) for _ in range(WORLD_SIZE)]
    return x, w


def run_norm(norm, x, w):
    """Two training steps; returns running stats, output and input gradient."""
    torch.manual_seed(1)
    bn = get_norm(norm, C).double()
    torch.nn.init.normal_(bn.weight)
    for _ in range(2):
        x = x.detach().requires_grad_(True)
        y = bn(x)
        (y * w).sum().backward()
    return {"mean": bn.running_mean, "var": bn.running_var, "y": y.detach(), "grad": x.grad,
            "wgrad": bn.weight.grad}  # fmt: skip


def _worker(rank, port, result_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=timedelta(seconds=120))  # fmt: skip
    try:
        x, w = inputs()
        result = {n: run_norm(n, x[rank], w[rank]) for n in ("SyncBN", "naiveSyncBN")}
        cfg = tiny_cfg(opts=["MODEL.RESNETS.NORM", "SyncBN", "MODEL.FPN.NORM", "SyncBN",
                             "MODEL.RESNETS.STEM_OUT_CHANNELS", "32"])  # fmt: skip
        torch.manual_seed(0)
        model = create_ddp_model(build_model(cfg))
        with EventStorage(0):
            losses = model(make_batch(num_images=1, size=(64, 64), seed=rank))
            sum(losses.values()).backward()
        bn = model.module.backbone.bottom_up.stem.conv1.norm
        result["model"] = {
            "type": type(bn).__name__,
            "mean": bn.running_mean.clone(),
            "grad": model.module.backbone.bottom_up.stem.conv1.weight.grad,
        }
        torch.save(result, f"{result_path}.rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_statistics_are_synchronised_across_cpu_processes(tmp_path):
    path = str(tmp_path / "bn")
    mp.spawn(_worker, args=(free_port(), path), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(f"{path}.rank{r}") for r in range(WORLD_SIZE)]
    x, w = inputs()
    single = run_norm("BN", torch.cat(x), torch.cat(w))  # one process, concatenated batch

    sync = [r["SyncBN"] for r in ranks]
    for key in ("mean", "var"):
        torch.testing.assert_close(sync[0][key], sync[1][key], rtol=0, atol=0)
        torch.testing.assert_close(sync[0][key], single[key], rtol=1e-9, atol=1e-9)
    # parameter gradients are per process (DDP averages them): they add up to one process's
    torch.testing.assert_close(sync[0]["wgrad"] + sync[1]["wgrad"], single["wgrad"])
    for r in range(WORLD_SIZE):  # each rank's outputs and input gradients are its slice
        torch.testing.assert_close(sync[r]["y"], single["y"][2 * r : 2 * r + 2])
        torch.testing.assert_close(sync[r]["grad"], single["grad"][2 * r : 2 * r + 2])

    # detectron2's NaiveSyncBatchNorm: same mean; its running variance is the biased one
    naive = [r["naiveSyncBN"] for r in ranks]
    n = torch.cat(x).numel() / C
    torch.testing.assert_close(naive[0]["mean"], naive[1]["mean"], rtol=0, atol=0)
    torch.testing.assert_close(naive[0]["mean"], single["mean"])
    # two steps of momentum 0.1 from 1 on the same batch: 0.81 + 0.19 v, v biased or not
    biased = 0.81 + (single["var"] - 0.81) * (n - 1) / n
    torch.testing.assert_close(naive[0]["var"], biased)
    torch.testing.assert_close(naive[0]["y"], sync[0]["y"])

    # the detector: SyncBN layers, identical statistics and gradients on both processes
    model = [r["model"] for r in ranks]
    assert model[0]["type"] == "LongTailSyncBatchNorm"
    torch.testing.assert_close(model[0]["mean"], model[1]["mean"], rtol=0, atol=0)
    torch.testing.assert_close(model[0]["grad"], model[1]["grad"])
    assert model[0]["mean"].abs().sum() > 0


def test_single_process_and_eval_are_batchnorm():
    torch.manual_seed(0)
    sync, bn = LongTailSyncBatchNorm(4), torch.nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(sync(x), bn(x))
    torch.testing.assert_close(sync.running_var, bn.running_var)
    sync.eval(), bn.eval()
    torch.testing.assert_close(sync(x), bn(x))
    assert isinstance(get_norm("naiveSyncBN", 4), NaiveSyncBatchNorm)
