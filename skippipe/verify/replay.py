"""Replay a recorded run with the in-process reference executor (the referee's computation).

Routes are an input of the computation (DESIGN.md section 5): the replay executes exactly the plans in
the run's ``routes.jsonl``, starting from a verified checkpoint (or from the seeded initialisation),
and returns every step's ledger leaves, which must equal the run's if the run computed honestly.
Fault injection (``fault.*``) is never replayed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from skippipe.errors import UserError


def load_run_config(run_dir: Path):
    """The run's resolved config, with faults and tracking off (a replay is quiet and honest)."""
    from skippipe.config import from_dict
    from skippipe.runfiles import read_config_data

    data = read_config_data(run_dir)
    data["fault"] = {}
    data.setdefault("tracking", {})["wandb"] = {"mode": "disabled"}
    data["schedule"]["routes_from"] = None
    return from_dict(data)


def executor_at(run_dir: Path, step: int) -> Tuple[object, object, object, Dict]:
    """(config, data, executor holding the state at the *start* of ``step``, plans) — from the newest
    checkpoint before ``step`` (verified against its manifest), replaying the steps in between."""
    from skippipe.data import load_data
    from skippipe.model.presets import resolve_model_spec
    from skippipe.process import pin_threads
    from skippipe.routelog import read_routes
    from skippipe.train.reference import ReferenceExecutor
    from skippipe.verify.checkpoint import list_checkpoints, load_stage_file, verify_checkpoint
    from skippipe.verify.leaves import load_state_tensors

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    pin_threads(cfg.run.threads)
    data = load_data(cfg.data)
    spec = resolve_model_spec(cfg.model, vocab_size=data.vocab_size)
    plans = read_routes(run_dir)
    num_stages = next(iter(plans.values())).num_stages if plans else len(cfg.schedule.partition_sizes)
    executor = ReferenceExecutor(spec, num_stages, cfg.run.seed, cfg.train)
    start = 0
    usable = [s for s in list_checkpoints(run_dir) if s < step]
    if usable:
        ckpt = run_dir / "ckpt" / str(usable[-1])
        problem = verify_checkpoint(ckpt)
        if problem:
            raise UserError(f"replay: {problem}")
        held = plans[usable[-1]].allocation if usable[-1] in plans else None
        for k, stage in executor.stages.items():
            if held is not None and not held[k] and not (ckpt / f"stage{k}.pt").is_file():
                continue  # lost every replica before the checkpoint: nobody held it, nothing to load
            load_state_tensors(stage, executor.optimizers[k], load_stage_file(ckpt / f"stage{k}.pt"))
        start = usable[-1] + 1
    for s in range(start, step):
        _step(cfg, data, executor, plans, s, run_dir)
    return cfg, data, executor, plans


def _step(cfg, data, executor, plans, step: int, run_dir: Path):
    from skippipe.train.optim import lr_at

    if step not in plans:
        raise UserError(f"replay: routes.jsonl has no step {step}")
    plan = plans[step]
    restart_stages(cfg, executor, plan, run_dir)
    mbs = [data.microbatch(cfg.run.seed, step, r.id, cfg.train.samples_per_microbatch, executor.spec.seq_len)
           for r in plan.microbatches]
    return executor.step(plan, mbs, lr_at(step, cfg.train), level=cfg.verify.level,
                         loss_scale=plan.extra.get("loss_scale", 1.0))


def replay(run_dir, from_step: int, to_step: int) -> Dict[int, Dict[str, str]]:
    """Ledger leaves of steps ``from_step..to_step`` recomputed from the state after ``from_step-1``."""
    cfg, data, executor, plans = executor_at(Path(run_dir), from_step)
    out = {}
    for s in range(from_step, to_step + 1):
        leaves = _step(cfg, data, executor, plans, s, Path(run_dir)).leaves
        for stage in lost_state(plans, s):
            leaves = {k: v for k, v in leaves.items() if not k.startswith((f"param/stage{stage}/", f"opt/stage{stage}/"))}
        out[s] = leaves
    return out


def restart_stages(cfg, executor, plan, run_dir: Path) -> None:
    """Do what the run did to a stage that lost every replica before this step (the plan's
    ``extra.rebuilt``, written by the remote executor): its new replicas start from the seeded
    initial parameters (``init``), from a verified checkpoint (``checkpoint``), or from the
    average of the neighbouring stages' blocks (``checkfree``), with a fresh optimizer. The same
    operations in the same order as the workers, so the digests match bit for bit."""
    from skippipe.model.transformer import build_stages
    from skippipe.train.compute import flat_blocks, load_block_average
    from skippipe.train.optim import make_optimizer
    from skippipe.verify.checkpoint import load_stage_file, verify_checkpoint
    from skippipe.verify.leaves import load_state_tensors

    for key, origin in sorted((plan.extra.get("rebuilt") or {}).items(), key=lambda kv: int(kv[0])):
        k = int(key)
        stage = build_stages(executor.spec, plan.num_stages, cfg.run.seed, only=[k])[k].to(executor.device)
        optimizer = make_optimizer(stage, cfg.train)
        kind = origin.get("from")
        if kind == "checkpoint":
            ckpt = run_dir / "ckpt" / str(origin["step"])
            problem = verify_checkpoint(ckpt)
            if problem:
                raise UserError(f"replay: stage {k} restarted from checkpoint {origin['step']}: {problem}")
            load_state_tensors(stage, optimizer, load_stage_file(ckpt / f"stage{k}.pt"))
        elif kind == "checkfree":
            load_block_average(stage, [flat_blocks(executor.stages[j]) for j in origin.get("stages", [])])
        elif kind != "init":
            raise UserError(f"replay: step's plan says stage {k} restarted from '{kind}'; "
                            "expected init, checkpoint or checkfree (routes.jsonl is damaged)")
        executor.stages[k], executor.optimizers[k] = stage, optimizer


def lost_state(plans, step: int) -> List[int]:
    """Stages whose state after ``step`` died with all their replicas: no node that held the stage
    at ``step`` holds it in the executed plan of ``step + 1``. Their digests rode on the command that
    failed, nobody is left to report them, and nothing later depends on them (the stage is skipped,
    or restarts from elsewhere), so the ledger leaves them out (:class:`~skippipe.runtime.recorder.RunRecorder`)."""
    if step + 1 not in plans:
        return []
    now, after = plans[step].allocation, plans[step + 1].allocation
    return [k for k, nodes in enumerate(now) if nodes and k < len(after) and not set(nodes) & set(after[k])]
