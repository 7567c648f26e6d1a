"""Operator pinning (Verde's second bisection, arXiv 2502.19405): inside the disputed step, re-run the
disputed stage and microbatch for each run while hashing every operator's inputs and outputs, and
name the first operator whose inputs agree and whose output differs.

Both runs agree on the state at the start of the step (the chains agree up to it), so the state is
rebuilt once by an honest replay. Each run's own computation of the step is then re-executed as that
run's trainer would: with its config, including any injected fault (``fault.corrupt.tensor=op``),
hashing the forward operators (the leaf modules) of the stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from skippipe.errors import UserError


def perturb_output_hook(module, inputs, output):
    """``fault.corrupt.tensor=op``: one element of the operator's output is off by 1e-3."""
    output = output.clone()
    output.view(-1)[0] += 1e-3
    return output


def _digest(tensors) -> str:
    from skippipe.verify.digest import tensor_digest

    parts = [tensor_digest("op", t) for t in tensors if torch.is_tensor(t)]
    return "-".join(p[:16] for p in parts)


def op_trace(stages, stage_id: int, route, microbatch, stage_of: Dict[str, int],
             faulty_op: Optional[str] = None) -> List[Tuple[str, str, str]]:
    """(operator, input digest, output digest) of every leaf module of ``stage_id``, in execution
    order, for one microbatch's forward along its path."""
    trace: List[Tuple[str, str, str]] = []
    stage = stages[stage_id]
    hooks = []
    for name, module in stage.named_modules():
        if list(module.children()):
            continue
        if name == faulty_op:
            hooks.append(module.register_forward_hook(perturb_output_hook))

        def record(mod, inputs, output, name=name):
            trace.append((name, _digest(inputs), _digest([output])))

        hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            first = stages[0]
            hidden = first(first.embed_tokens(microbatch.inputs))
            for node in route.path:
                hidden = stages[stage_of[node]](hidden)
            first.loss(hidden, microbatch.targets)
    finally:
        for hook in hooks:
            hook.remove()
    return trace


def _faulty_op(cfg, step: int, stage_id: int, route, stage_of) -> Optional[str]:
    corrupt = cfg.fault.corrupt
    if corrupt.tensor != "op" or corrupt.step != step or corrupt.node is None:
        return None
    holder = corrupt.node
    on_path = holder == route.originator if stage_id == 0 else holder in route.path
    return corrupt.op if on_path and stage_of.get(holder) == stage_id else None


def pin_operator(run_a: Path, run_b: Path, step: int, leaf: str) -> dict:
    """The first operator of the disputed stage whose inputs agree and output differs between the
    two runs' re-executions of ``step`` (or ``{"operator": None}`` when all agree)."""
    from skippipe.config import from_dict
    from skippipe.runfiles import read_config_data
    from skippipe.verify.compare import describe_leaf
    from skippipe.verify.replay import executor_at

    info = describe_leaf(leaf)
    stage_id = info.get("stage")
    if stage_id is None:
        raise UserError(f"--ops: leaf {leaf} belongs to no stage; nothing to pin")
    cfg, data, executor, plans = executor_at(Path(run_a), step)
    plan = plans[step]
    stage_of = plan.stage_of()
    routes = sorted(plan.microbatches, key=lambda r: r.id)
    mb_id = info.get("microbatch")
    visiting = [r for r in routes if (stage_id == 0 or any(stage_of[n] == stage_id for n in r.path))]
    route = next((r for r in visiting if r.id == mb_id), visiting[0] if visiting else None)
    if route is None:
        raise UserError(f"--ops: no microbatch visits stage {stage_id} at step {step}")
    mb = data.microbatch(cfg.run.seed, step, route.id, cfg.train.samples_per_microbatch, executor.spec.seq_len)
    traces = []
    for run in (run_a, run_b):
        own = from_dict(read_config_data(run))
        traces.append(op_trace(executor.stages, stage_id, route, mb, stage_of, _faulty_op(own, step, stage_id,
                                                                                            route, stage_of)))
    for (name, in_a, out_a), (_, in_b, out_b) in zip(*traces):
        if in_a == in_b and out_a != out_b:
            return {"operator": name, "stage": stage_id, "microbatch": route.id, "inputs": in_a[:16],
                    "output_a": out_a[:16], "output_b": out_b[:16], "ops_compared": len(traces[0])}
    return {"operator": None, "stage": stage_id, "microbatch": route.id, "ops_compared": len(traces[0])}
