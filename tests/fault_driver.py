"""``train_net.py`` with faults injected at known points (for tests/test_preemption.py).

Same command line as train_net.py; the faults come from the environment (spawned ranks
inherit it):

- ``FAULT_SIGNAL="<iteration>:<SIGNAME>[:<rank>]"``: after that iteration (after every other
  hook) the process of that rank (default 0) sends itself the signal.
- ``FAULT_BLOCK_SAVE="<name>"`` with ``FAULT_MARKER=<path>``: the save of ``<name>.pth``
  blocks in its fsync, after the whole file was written, and touches the marker, so a test
  can kill the process in the middle of the checkpoint write.
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer, registries, datasets)

# isort: on
from detectron2.engine import HookBase, default_argument_parser
from detectron2.utils import comm

import train_net
from lvis_longtail.engine import Trainer, launch, setup_cfg


class SendSignal(HookBase):
    def __init__(self, spec: str):
        iteration, name, *rank = spec.split(":")
        self.iteration, self.signum = int(iteration), getattr(signal, name)
        self.rank = int(rank[0]) if rank else 0

    def after_step(self):
        if self.trainer.iter == self.iteration and comm.get_rank() == self.rank:
            os.kill(os.getpid(), self.signum)


def block_save(name: str, marker: str) -> None:
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}.pth."):
            Path(marker).touch()
            time.sleep(600)
        return real_fsync(fd)

    os.fsync = fsync


def main(args):
    if "FAULT_SIGNAL" in os.environ:
        build_hooks = Trainer.build_hooks
        spec = os.environ["FAULT_SIGNAL"]
        Trainer.build_hooks = lambda self: build_hooks(self) + [SendSignal(spec)]
    if "FAULT_BLOCK_SAVE" in os.environ:
        block_save(os.environ["FAULT_BLOCK_SAVE"], os.environ["FAULT_MARKER"])
    return train_net.main(args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    cfg = setup_cfg(args.config_file, args.opts, check_files=True)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        backend="gloo" if cfg.MODEL.DEVICE == "cpu" else "nccl",
    )
