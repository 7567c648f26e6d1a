"""Baseline: SkipPipe's model and microbatches trained with DeepSpeed's pipeline engine (1F1B).

    python bench/baselines/deepspeed_pipe.py --iters 12 --warmup 2 --out r.json \
        model.preset=tiny model.n_layers=4 schedule.num_stages=4 schedule.microbatches_per_originator=8

Needs the ``deepspeed`` extra (``DS_BUILD_OPS=0 pip install -e '.[deepspeed]'``). One process per
stage, CPU accelerator with gloo (DeepSpeed's CPU accelerator falls back to gloo without oneCCL), one
thread each. ``PipelineModule`` gets one ``LayerSpec`` per stage (``partition_method="uniform"``:
exactly one per rank), built from SkipPipe's ``build_stages`` with the placement of ``common.py``;
the engine runs its ``TrainSchedule`` (1F1B) with ``gradient_accumulation_steps`` = SkipPipe's
microbatches per iteration, the client AdamW from ``make_optimizer``, SkipPipe's learning rate per
step and ``gradient_clipping`` = ``train.grad_clip``. Reports the same JSON as ``torch_pipe.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def microbatch_stream(cfg, spec, data, steps: int):
    """(inputs, targets) of every microbatch of every step, in SkipPipe's order."""
    samples = cfg.train.samples_per_microbatch
    for step in range(steps):
        for mb_id in range(common.num_microbatches(cfg)):
            mb = data.microbatch(cfg.run.seed, step, mb_id, samples, spec.seq_len)
            yield mb.inputs, mb.targets


def ds_config(cfg) -> dict:
    samples, micro = cfg.train.samples_per_microbatch, common.num_microbatches(cfg)
    return {"train_batch_size": samples * micro, "train_micro_batch_size_per_gpu": samples,
            "gradient_accumulation_steps": micro, "gradient_clipping": cfg.train.grad_clip,
            "steps_per_print": 10**9, "zero_optimization": {"stage": 0}, "wall_clock_breakdown": False}


def run_rank(rank: int, world_size: int, port: int, args) -> None:
    os.environ.update(common.dist_env(rank, world_size, port))
    common.pin_one_thread()
    import deepspeed
    import torch.distributed as dist
    from deepspeed.pipe import LayerSpec, PipelineModule

    from skippipe.train.optim import lr_at, make_optimizer

    deepspeed.utils.logging.logger.setLevel(logging.WARNING)
    cfg, spec, data = common.load_setup(args.overrides)
    host_memory = common.set_host_memory(cfg)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    seed = cfg.run.seed
    layers = [LayerSpec(common.FirstPiece, spec, world_size, seed),
              *[LayerSpec(common.MiddlePiece, spec, world_size, seed, k) for k in range(1, world_size - 1)],
              LayerSpec(common.LastPiece, spec, world_size, seed)]
    module = PipelineModule(layers=layers, num_stages=world_size, loss_fn=common.lm_loss,
                            partition_method="uniform")
    # DeepSpeed's fp32 clipping sums squared norms over its model-parallel group (all pipeline stages
    # here) but counts a parameter on ranks other than 0 only if it is marked model-parallel; unmarked,
    # the "global" norm would be stage 0's alone. Marking every parameter gives SkipPipe's global norm.
    for param in module.parameters():
        param.model_parallel = True
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=make_optimizer(module, cfg.train),
                                           config=ds_config(cfg))
    stream = microbatch_stream(cfg, spec, data, args.warmup + args.iters)
    watch, losses = common.Stopwatch(), []
    for step in range(args.warmup + args.iters):
        common.set_lr(engine.optimizer, lr_at(step, cfg.train))
        watch.start()
        loss = engine.train_batch(data_iter=stream)
        watch.stop()
        losses.append(float(loss))
    result = {"rank": rank, "iter_s": watch.iter_s, "cpu_s": watch.cpu_s, "losses": losses, "peak_rss_mb": common.peak_rss_mb()}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, result)
    if rank == 0:
        common.write_json(args.out, {
            "system": "deepspeed pipeline 1f1b", "deepspeed": deepspeed.__version__, "ranks": world_size, "host_memory_retained": host_memory,
            "microbatches": common.num_microbatches(cfg), "samples_per_microbatch": cfg.train.samples_per_microbatch,
            "warmup": args.warmup, **common.summarize(result["iter_s"], args.warmup), "iter_s": result["iter_s"],
            "cpu_s": common.cpu_per_iteration([r["cpu_s"] for r in gathered], args.warmup),
            "losses": gathered[-1]["losses"], "peak_rss_mb": [r["peak_rss_mb"] for r in gathered],
            "overrides": list(args.overrides)})
    dist.destroy_process_group()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_run_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise SystemExit("deepspeed_pipe: DeepSpeed is not installed; DS_BUILD_OPS=0 pip install -e '.[deepspeed]'") from None

    from skippipe.config import num_stages

    cfg, _, _ = common.load_setup(args.overrides)
    world_size = num_stages(cfg)
    if list(cfg.schedule.partition_sizes) not in ([], [1] * world_size) or world_size < 2:
        raise SystemExit("deepspeed_pipe: needs >= 2 stages with one replica each")
    return common.launch_and_report(run_rank, world_size, args)

if __name__ == "__main__":
    raise SystemExit(main())
