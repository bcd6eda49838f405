"""SyncBatchNorm that also synchronises CPU processes (gloo).

``torch.nn.SyncBatchNorm`` raises "expected input tensor to be on GPU" on CPU whenever a
process group exists, so detectron2's ``NORM: "SyncBN"`` cannot train with CPU processes.
:class:`LongTailSyncBatchNorm` is ``nn.SyncBatchNorm`` on accelerators and, on CPU,
all-reduces (differentiably) each channel's sum, sum of squares and element count across
the process group: every process normalises with the statistics of the whole global batch,
and the running statistics (unbiased variance, as in BatchNorm) are those of one process that
saw the concatenated batch. :mod:`lvis_longtail.compat` makes detectron2's
``get_norm("SyncBN")`` build it.

It is a ``BatchNorm2d`` subclass, not an ``nn.SyncBatchNorm`` one: DDP refuses to wrap CPU
modules that contain ``nn.SyncBatchNorm`` layers. On accelerators its forward is
``nn.SyncBatchNorm``'s.
"""

import torch
import torch.distributed as dist
from fvcore.nn.distributed import differentiable_all_reduce
from torch import nn
from torch.nn import functional as F

__all__ = ["LongTailSyncBatchNorm"]


class LongTailSyncBatchNorm(nn.BatchNorm2d):
    """Synchronised BatchNorm over (N, C, H, W) inputs (``nn.SyncBatchNorm``'s arguments and
    state) that also works on CPU process groups. Output: same shape as the input."""

    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def __init__(self, num_features: int, *args, process_group=None, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (
            input.device.type == "cpu"
            and self.training
            and dist.is_available()
            and dist.is_initialized()
        ):
            return nn.SyncBatchNorm.forward(self, input)
        self._check_input_dim(input)
        group = self.process_group or dist.group.WORLD
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / self.num_batches_tracked.item()
        if dist.get_world_size(group) == 1:
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias,
                True, momentum, self.eps,
            )  # fmt: skip
        c = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        count = x.new_full((1,), input.numel() / max(c, 1))
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        if group is dist.group.WORLD:
            stats = differentiable_all_reduce(stats)
        else:
            raise ValueError("LongTailSyncBatchNorm on CPU supports the default process group")
        total = stats[-1].detach()
        mean = stats[:c] / total.clamp(min=1)
        var = (stats[c : 2 * c] / total.clamp(min=1) - mean * mean).clamp(min=0)
        if self.track_running_stats and total > 1:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * (total / (total - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = [1, c] + [1] * (input.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)
