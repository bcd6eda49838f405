#!/usr/bin/env python
"""Train, evaluate and export with lvis_longtail.

    python train_net.py --config-file configs/tiny/mask_rcnn_R18_FPN_tiny_softmax.yaml
    python train_net.py --config-file F --eval-only MODEL.WEIGHTS output/.../model_final.pth
    python train_net.py --config-file F --num-gpus 8
    python train_net.py --config-file F --num-gpus 2 MODEL.DEVICE cpu   # 2 CPU processes (gloo)

Evaluating a split with annotations prints and saves LVIS AP, APr/APc/APf; a split without
annotations (LVIS test-dev) is exported to OUTPUT_DIR/inference/<dataset>/
lvis_instances_results.json for the evaluation server. The run ends with a short summary of
both. On CPU, each process's thread counts follow CPU_THREADS (docs/config_keys.md).
SIGTERM or SIGUSR1 during training saves a checkpoint and exits with status 75; --resume
continues from it (docs/fault_tolerance.md).
"""

# isort: off
import lvis_longtail  # noqa: F401  (first: compat layer, registries, datasets)

# isort: on
import time

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from lvis_longtail.engine import Trainer, launch, setup_cfg
from lvis_longtail.engine.checkpoint import LongTailCheckpointer
from lvis_longtail.engine.launch import configure_cpu_threads
from lvis_longtail.engine.summary import format_summary


def load_config(args):
    """The checked config of the command line (files, weights and datasets included)."""
    return setup_cfg(
        args.config_file,
        args.opts,
        check_files=True,
        eval_only=args.eval_only,
        resume=args.resume,
    )


def setup(args):
    cfg = load_config(args)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="lvis_longtail")
    configure_cpu_threads(cfg, args.num_gpus)
    return cfg


def main(args):
    start = time.perf_counter()
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        LongTailCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        # detectron2 returns the last evaluation only when TEST.EXPECTED_RESULTS is set
        results = getattr(trainer, "_last_eval_results", None)
    if comm.is_main_process():
        print(format_summary(cfg, results or {}, time.perf_counter() - start), flush=True)
    return results


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    # the whole config is checked here, before any process starts or data is loaded
    cfg = load_config(args)
    device = cfg.MODEL.DEVICE
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        backend="gloo" if device == "cpu" else "nccl",
    )
