"""The central scheduler (SkipPipe arXiv 2502.19913; DESIGN.md sections 4-5): pure functions.

``allocation_for`` puts nodes on stages: DT-FM's objective (``allocate``) for the baselines, and
for ``skippipe`` the allocation whose routed plan is shortest (``coallocate.allocate_by_plan``);
``route`` gives every microbatch its path, start time and every node its action order;
``lower_bound`` (``bound``) is the limit plans are measured against; ``make_plan`` chains
topology -> model spec -> cost model -> allocation -> routing for a config. Every function takes a
:class:`SchedulerParams` (plain frozen data) or a Config.
"""

from __future__ import annotations

from typing import Optional

from skippipe.schedule.allocate import allocate, allocation_score, partition_sizes
from skippipe.schedule.bound import config_bound, lower_bound
from skippipe.schedule.coallocate import allocate_by_plan
from skippipe.schedule.params import SchedulerParams, as_params
from skippipe.schedule.route import LiveState, route

__all__ = ["allocate", "allocate_by_plan", "allocation_for", "allocation_score", "partition_sizes", "LiveState",
           "route", "make_plan", "build_cost", "SchedulerParams", "as_params", "lower_bound", "config_bound"]


def allocation_for(topology, cost, params, method: Optional[str] = None):
    """The allocation ``method`` (default ``params.method``) plans on: ``schedule.allocation``
    (``auto``: judged by the routed plan for ``skippipe``, DT-FM's for the baselines)."""
    params = as_params(params)
    if params.allocator(method or params.method) == "plan":
        return allocate_by_plan(topology, cost, params)[0]
    return allocate(topology, cost, params)


def build_cost(cfg):
    """(topology, model spec, cost model) for a config."""
    from skippipe.cost import CostModel, resolve_memory
    from skippipe.data import vocab_size_of
    from skippipe.model.presets import resolve_model_spec
    from skippipe.topology import load_topology

    topology = load_topology(cfg)
    # the vocabulary the workers build the model with (the head's cost and memory depend on it)
    spec = resolve_model_spec(cfg.model, vocab_size=cfg.model.vocab_size or vocab_size_of(cfg.data))
    cost = CostModel.from_config(cfg, spec, topology)
    resolve_memory(cfg, cost)
    return topology, spec, cost


def make_plan(cfg, state: Optional[LiveState] = None, step: int = 0, method: Optional[str] = None):
    """Plan one iteration of ``cfg`` (allocation + routing) with the live ``state``."""
    topology, _, cost = build_cost(cfg)
    allocation = allocation_for(topology, cost, cfg, method)
    return route(allocation, topology, cost, cfg, state=state, step=step, method=method)
