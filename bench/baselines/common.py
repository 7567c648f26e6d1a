"""What the pipeline baselines share with SkipPipe: model, stage split, data, optimizer, timing.

Every baseline reads the same skippipe ``key=value`` overrides as ``skippipe train``, so the model
(``build_stages``: identical parameters), the microbatches (``TokenData.microbatch(seed, step, id)``),
the optimizer (``make_optimizer``: AdamW, one code path), the learning-rate schedule and the global-norm
clipping are exactly SkipPipe's. Only the executor differs.

Stage placement (a linear pipeline cannot return to rank 0): SkipPipe's stage 0 holds the embedding,
its blocks *and* the final norm + LM head + loss, run at the end of each microbatch's path. A
``torch.distributed.pipelining`` or DeepSpeed pipeline only flows forward, so the baselines put the
embedding + stage 0's blocks on rank 0 and the final norm + head + loss on the last rank, behind that
rank's blocks. Same modules and parameters, same FLOPs per microbatch; one activation transfer fewer
per microbatch in each direction than SkipPipe's ring (S - 1 hops instead of S).
"""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------
# config, model and data (SkipPipe's own)


def load_setup(overrides: Sequence[str]):
    """(cfg, spec, data) from skippipe overrides, exactly as ``skippipe train`` resolves them."""
    from skippipe.config import load_config
    from skippipe.data import load_data
    from skippipe.model.presets import resolve_model_spec

    cfg = load_config(None, list(overrides))
    data = load_data(cfg.data)
    spec = resolve_model_spec(cfg.model, vocab_size=data.vocab_size)
    return cfg, spec, data


def num_microbatches(cfg) -> int:
    """SkipPipe's microbatches per iteration with one stage-0 node: microbatches_per_originator."""
    sizes = list(cfg.schedule.partition_sizes) or [1]
    return cfg.schedule.microbatches_per_originator * sizes[0]


class FirstPiece(nn.Module):
    """Rank 0: token embedding + stage 0's blocks. tokens (b, t) int64 -> hidden (b, t, d)."""

    def __init__(self, spec, num_stages: int, seed: int):
        super().__init__()
        from skippipe.model.transformer import build_stages

        stage0 = build_stages(spec, num_stages, seed, only=[0])[0]
        self.embed, self.blocks = stage0.embed, stage0.blocks

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


class MiddlePiece(nn.Module):
    """Ranks 1..S-2: stage k's blocks. hidden (b, t, d) -> hidden."""

    def __init__(self, spec, num_stages: int, seed: int, stage_id: int):
        super().__init__()
        from skippipe.model.transformer import build_stages

        self.blocks = build_stages(spec, num_stages, seed, only=[stage_id])[stage_id].blocks

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


class LastPiece(nn.Module):
    """Rank S-1: stage S-1's blocks, then stage 0's final norm and LM head. hidden -> logits (b, t, v)."""

    def __init__(self, spec, num_stages: int, seed: int):
        super().__init__()
        from skippipe.model.transformer import build_stages

        stages = build_stages(spec, num_stages, seed, only=[0, num_stages - 1])
        self.blocks = stages[num_stages - 1].blocks
        self.norm, self.head = stages[0].norm, stages[0].head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden))


def build_piece(spec, num_stages: int, seed: int, rank: int) -> nn.Module:
    """The module of pipeline rank ``rank`` (num_stages >= 2)."""
    if rank == 0:
        return FirstPiece(spec, num_stages, seed)
    if rank == num_stages - 1:
        return LastPiece(spec, num_stages, seed)
    return MiddlePiece(spec, num_stages, seed, rank)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SkipPipe's loss (Stage.loss): mean next-token cross entropy over the microbatch."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def iteration_batch(cfg, spec, data, step: int):
    """The iteration's microbatches 0..M-1 stacked along dim 0: (M * samples, seq) inputs, targets."""
    samples = cfg.train.samples_per_microbatch
    mbs = [data.microbatch(cfg.run.seed, step, i, samples, spec.seq_len) for i in range(num_microbatches(cfg))]
    return torch.cat([m.inputs for m in mbs]), torch.cat([m.targets for m in mbs])


def clip_by_global_norm(module: nn.Module, max_norm: float, group=None) -> float:
    """Global gradient norm over every rank (one all-reduce), then scale like SkipPipe's clipping."""
    import torch.distributed as dist

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64)
    for g in grads:
        sq += g.double().pow(2).sum()
    dist.all_reduce(sq, group=group)
    norm = float(sq.sqrt())
    if max_norm > 0:
        scale = min(1.0, max_norm / (norm + 1e-6))
        if scale != 1.0:
            for g in grads:
                g.mul_(scale)
    return norm


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------
# processes and measurements


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(rank: int, world_size: int, port: int) -> Dict[str, str]:
    """The torchrun environment contract for one rank on 127.0.0.1."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pin_one_thread() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def set_host_memory(cfg) -> bool:
    """The host allocator policy SkipPipe's workers use (``runtime.host_memory``, default retain), so
    a comparison measures the pipeline runtimes, not two allocator settings."""
    from skippipe.process import set_host_memory as apply

    return apply(cfg.runtime.host_memory)


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def summarize(iter_s: List[float], warmup: int) -> Dict[str, float]:
    """Median and quartiles of the iteration times after ``warmup`` iterations."""
    timed = iter_s[warmup:]
    if not timed:
        return {"median_s": math.nan, "p25_s": math.nan, "p75_s": math.nan, "n": 0}
    q = statistics.quantiles(timed, n=4) if len(timed) >= 2 else [timed[0]] * 3
    return {"median_s": statistics.median(timed), "p25_s": q[0], "p75_s": q[2], "n": len(timed)}


def cpu_per_iteration(per_rank: List[List[float]], warmup: int) -> float:
    """Median over the timed iterations of the CPU seconds summed over all ranks."""
    totals = [sum(values) for values in zip(*(ranks[warmup:] for ranks in per_rank))]
    return statistics.median(totals) if totals else math.nan


def write_json(path: str, payload: dict) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(target)


class Stopwatch:
    """Per-iteration wall times, each bracketed by barriers so every rank has finished the step."""

    def __init__(self):
        self.iter_s: List[float] = []
        self.cpu_s: List[float] = []  # this rank's process CPU seconds per iteration (every thread)
        self._t0 = self._c0 = 0.0

    def start(self) -> None:
        import torch.distributed as dist

        dist.barrier()
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        import torch.distributed as dist

        dist.barrier()
        self.iter_s.append(time.perf_counter() - self._t0)
        self.cpu_s.append(time.process_time() - self._c0)


def add_run_arguments(parser) -> None:
    """The arguments every baseline takes: timed iterations, warm-up, result file, config overrides."""
    parser.add_argument("--iters", type=int, default=12, help="timed iterations after the warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("overrides", nargs="*", help="skippipe key=value overrides (model, data, train, schedule)")


def launch_and_report(run_rank, world_size: int, args) -> int:
    """Spawn one process per stage running ``run_rank``, then print the result ``args.out`` holds;
    exit status 1 if any loss is not finite."""
    import torch.multiprocessing as mp

    mp.start_processes(run_rank, args=(world_size, free_port(), args), nprocs=world_size, start_method="spawn")
    result = json.loads(Path(args.out).read_text())
    print(f"{result['system']}: median {result['median_s']:.4f} s/iter over {result['n']} iterations, "
          f"last loss {result['losses'][-1]:.4f}, peak RSS per rank {[round(m) for m in result['peak_rss_mb']]} MB")
    return 0 if all(math.isfinite(v) for v in result["losses"]) else 1
