"""Baseline: SkipPipe's model and microbatches trained with ``torch.distributed.pipelining``.

    python bench/baselines/torch_pipe.py --schedule 1f1b --iters 12 --warmup 2 --out r.json \
        model.preset=tiny model.n_layers=4 schedule.num_stages=4 schedule.microbatches_per_originator=8

One process per stage (spawned here, gloo on 127.0.0.1, one thread each). The overrides are
skippipe's, so the stages (``build_stages``), data, AdamW, learning rate and global-norm clipping are
SkipPipe's (see ``common.py`` for the stage placement: embedding + stage 0's blocks on rank 0, final
norm + head + loss on the last rank). Reports the median iteration time after the warm-up (each
iteration bracketed by barriers), the loss per iteration and every rank's peak RSS as JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCHEDULES = ("1f1b", "gpipe")


def run_rank(rank: int, world_size: int, port: int, args) -> None:
    """One pipeline rank: build its piece, run ``args.iters`` iterations, gather results on rank 0."""
    os.environ.update(common.dist_env(rank, world_size, port))
    common.pin_one_thread()
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from skippipe.train.optim import lr_at, make_optimizer

    cfg, spec, data = common.load_setup(args.overrides)
    host_memory = common.set_host_memory(cfg)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    piece = common.build_piece(spec, world_size, cfg.run.seed, rank)
    optimizer = make_optimizer(piece, cfg.train)
    stage = PipelineStage(piece, rank, world_size, torch.device("cpu"))
    schedule_cls = Schedule1F1B if args.schedule == "1f1b" else ScheduleGPipe
    # scale_grads: the mean over microbatches, as SkipPipe (sum of microbatch gradients / M)
    schedule = schedule_cls(stage, common.num_microbatches(cfg), loss_fn=common.lm_loss, scale_grads=True)
    watch, losses_per_iter = common.Stopwatch(), []
    for step in range(args.warmup + args.iters):
        inputs, targets = common.iteration_batch(cfg, spec, data, step)
        watch.start()
        losses = []
        if rank == 0:
            schedule.step(inputs)
        elif rank == world_size - 1:
            schedule.step(target=targets, losses=losses)
        else:
            schedule.step()
        common.clip_by_global_norm(piece, cfg.train.grad_clip)
        common.set_lr(optimizer, lr_at(step, cfg.train))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        watch.stop()
        if losses:
            losses_per_iter.append(float(torch.stack(losses).detach().mean()))
    result = {"rank": rank, "iter_s": watch.iter_s, "cpu_s": watch.cpu_s, "losses": losses_per_iter, "peak_rss_mb": common.peak_rss_mb()}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, result)
    if rank == 0:
        last = gathered[-1]
        common.write_json(args.out, {
            "system": f"torch.distributed.pipelining {args.schedule}", "ranks": world_size, "host_memory_retained": host_memory,
            "microbatches": common.num_microbatches(cfg), "samples_per_microbatch": cfg.train.samples_per_microbatch,
            "warmup": args.warmup, **common.summarize(result["iter_s"], args.warmup), "iter_s": result["iter_s"],
            "cpu_s": common.cpu_per_iteration([r["cpu_s"] for r in gathered], args.warmup),
            "losses": last["losses"], "peak_rss_mb": [r["peak_rss_mb"] for r in gathered],
            "overrides": list(args.overrides)})
    dist.destroy_process_group()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    common.add_run_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    cfg, _, _ = common.load_setup(args.overrides)  # fail fast on a bad override, and warm the data cache
    from skippipe.config import num_stages

    world_size = num_stages(cfg)
    if list(cfg.schedule.partition_sizes) not in ([], [1] * world_size):
        raise SystemExit("torch_pipe: one replica per stage only; drop schedule.partition_sizes or make it all 1")
    if world_size < 2:
        raise SystemExit("torch_pipe: needs schedule.num_stages >= 2")
    return common.launch_and_report(run_rank, world_size, args)

if __name__ == "__main__":
    raise SystemExit(main())
