"""The central scheduler (SkipPipe arXiv 2502.19913; DESIGN.md sections 4-5): pure functions.

``allocate`` puts nodes on stages (DT-FM objective), ``route`` gives every microbatch its path,
start time and every node its action order, ``make_plan`` chains topology -> model spec -> cost
model -> allocation -> routing for a config.
"""

from __future__ import annotations

from typing import Optional

from skippipe.schedule.allocate import allocate, allocation_score, partition_sizes
from skippipe.schedule.route import LiveState, route

__all__ = ["allocate", "allocation_score", "partition_sizes", "LiveState", "route", "make_plan", "build_cost"]


def build_cost(cfg):
    """(topology, model spec, cost model) for a config."""
    from skippipe.cost import CostModel
    from skippipe.model.presets import resolve_model_spec
    from skippipe.topology import load_topology

    topology = load_topology(cfg)
    spec = resolve_model_spec(cfg.model, vocab_size=cfg.model.vocab_size or 256)
    return topology, spec, CostModel.from_config(cfg, spec, topology)


def make_plan(cfg, state: Optional[LiveState] = None, step: int = 0, method: Optional[str] = None):
    """Plan one iteration of ``cfg`` (allocation + routing) with the live ``state``."""
    topology, _, cost = build_cost(cfg)
    allocation = allocate(topology, cost, cfg)
    return route(allocation, topology, cost, cfg, state=state, step=step, method=method)
