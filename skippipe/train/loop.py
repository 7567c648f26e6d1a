"""The training run with ``launcher=inprocess``: plan, execute with the reference executor, log.

Lifecycle: prepare the run directory (resolved config) -> data and model spec -> planner ->
executor -> for each step: plan, build microbatches from (seed, step, id), step, log metrics and
routes -> validation -> summary.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict

import torch

from skippipe.config import Config, run_dir, to_yaml
from skippipe.plan import Plan, write_text_atomic

log = logging.getLogger(__name__)


def pin_threads(threads: int) -> None:
    """One thread per rank by default: oversubscription is ~10x slower, and bitwise determinism
    holds only at a fixed thread count."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def prepare_run_dir(cfg: Config) -> Path:
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", to_yaml(cfg))
    return out


def route_stats(plan: Plan) -> Dict[str, float]:
    """Achieved skip ratio and swap count of a plan (STYLE.md metric names)."""
    stage_of = plan.stage_of()
    num_stages = plan.num_stages
    visited, swaps = 0, 0
    coverage = [0] * num_stages
    for mb in plan.microbatches:
        stages = [stage_of[n] for n in mb.path]
        visited += 1 + len(stages)
        coverage[0] += 1
        highest = 0
        for s in stages:
            coverage[s] += 1
            if s < highest:
                swaps += 1
            highest = max(highest, s)
    count = max(1, len(plan.microbatches))
    stats = {"route/skip_ratio": 1.0 - visited / (count * num_stages), "route/swaps": swaps}
    for s in range(num_stages):
        stats[f"stage/{s}/coverage"] = coverage[s] / count
    return stats


def train_inprocess(cfg: Config) -> Dict[str, Any]:
    """Train with every stage in this process. Returns the final summary (also the last metrics line)."""
    from tqdm import tqdm

    from skippipe.data import load_data
    from skippipe.metrics import MetricsLogger
    from skippipe.model.presets import resolve_model_spec
    from skippipe.planner import Planner
    from skippipe.routelog import RouteLog
    from skippipe.train.optim import lr_at
    from skippipe.train.reference import ReferenceExecutor

    pin_threads(cfg.run.threads)
    out = prepare_run_dir(cfg)
    data = load_data(cfg.data)
    spec = resolve_model_spec(cfg.model, vocab_size=data.vocab_size)
    planner = Planner(cfg, spec)
    device = resolve_device(cfg.train.device)
    executor = ReferenceExecutor(spec, len(planner.allocation), cfg.run.seed, cfg.train, device=device)
    metrics = MetricsLogger(out, cfg)
    routes = RouteLog(out)
    log.info("run %s: %s, %d stages, model %s (%.2fM params), data %s (%d train tokens), device %s",
             cfg.run.name, cfg.schedule.method, len(planner.allocation), cfg.model.preset, spec.params() / 1e6,
             data.description, len(data.train), device)
    samples, seq_len = cfg.train.samples_per_microbatch, spec.seq_len
    tokens_per_step = 0
    start = time.perf_counter()
    bar = tqdm(range(cfg.train.steps), disable=not cfg.tracking.progress, desc="train", unit="step")
    record: Dict[str, Any] = {}
    try:
        for step in bar:
            t0 = time.perf_counter()
            plan = planner.plan(step)
            mbs = [data.microbatch(cfg.run.seed, step, r.id, samples, seq_len) for r in plan.microbatches]
            lr = lr_at(step, cfg.train)
            result = executor.step(plan, mbs, lr)
            iter_s = time.perf_counter() - t0
            tokens_per_step = len(mbs) * samples * seq_len
            record = {"step": step, "loss/train": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                      "time/iter_s": iter_s, "time/predicted_iter_s": plan.predicted_makespan_s,
                      "time/plan_s": planner.last_plan_s, "throughput/tokens_per_s": tokens_per_step / iter_s,
                      **route_stats(plan)}
            metrics.log(record)
            routes.record(step, plan)
            bar.set_postfix(loss=f"{result.loss:.3f}", skip=f"{record['route/skip_ratio']:.2f}")
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.steps:
                val = executor.evaluate(data.val_batches(cfg.train.eval_batches, samples, seq_len))
                metrics.log({"step": step, "loss/val": val, "ppl/val": math.exp(val)})
        val = executor.evaluate(data.val_batches(cfg.train.eval_batches, samples, seq_len))
        summary = {"step": cfg.train.steps, "loss/val": val, "ppl/val": math.exp(val),
                   "loss/train": record.get("loss/train"), "time/wall_s": time.perf_counter() - start,
                   "tokens": tokens_per_step * cfg.train.steps}
        metrics.log(summary)
        metrics.summary(summary)
    finally:
        bar.close()
        routes.close()
        metrics.close()
    _save_final_model(out, executor)
    log.info("done: %d steps in %.1f s, train loss %s, val loss %.4f, val ppl %.2f -> %s", cfg.train.steps,
             summary["time/wall_s"], _fmt(summary["loss/train"]), val, math.exp(val), out)
    return summary


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _save_final_model(out: Path, executor) -> None:
    """The trained stages, for ``skippipe eval`` (tensors only: loadable with weights_only=True)."""
    target = out / "final"
    target.mkdir(parents=True, exist_ok=True)
    for k, stage in executor.stages.items():
        tmp = target / f".stage{k}.pt.tmp"
        torch.save({name: t.detach().cpu() for name, t in stage.state_dict().items()}, tmp)
        tmp.replace(target / f"stage{k}.pt")
