"""Routing: paths of microbatches through the stages (SkipPipe arXiv 2502.19913 section 4; DESIGN.md 5).

One entry point, ``route``, for the four methods (one plan format): ``full``, ``random_skip`` and
``skippipe_nc`` (``schedule.baselines``) and ``skippipe`` (``schedule.collide``). The pieces:
``schedule.space`` (path rules as a search space, TC1 capacity), ``schedule.problem`` (the
problem of one call and the shared search primitives), ``schedule.search`` (simulator-scored local
search), ``schedule.assemble`` (plan, node order, predicted time), ``schedule.probe`` (traffic on a
link the coordinator asks to measure).
"""

from __future__ import annotations

import random
from typing import List, Optional, Sequence

from skippipe.errors import PlanError
from skippipe.plan import Plan
from skippipe.schedule.assemble import assemble, finalise
from skippipe.schedule.baselines import paths_full, paths_nc, paths_random
from skippipe.schedule.collide import route_skippipe
from skippipe.schedule.params import as_params
from skippipe.schedule.probe import include_links
from skippipe.schedule.problem import LiveState, Problem, build_problem, share_options

__all__ = ["LiveState", "route"]


def route(allocation: List[List[str]], topology, cost, params, state: Optional[LiveState] = None, step: int = 0,
          method: Optional[str] = None, effort_scale: float = 1.0, incumbents: Sequence[Plan] = ()) -> Plan:
    """A plan for one iteration (``params.method`` unless ``method``), deterministic in (seed, step)
    and the ``incumbents``.

    ``params``: a :class:`SchedulerParams` or a Config. ``effort_scale`` scales the ``skippipe``
    search's evaluations (the allocation search ranks its finalists with a fraction).
    ``incumbents``: earlier plans of this allocation; ``skippipe`` returns none slower than those
    that still fit, under today's costs.
    """
    params = as_params(params)
    state = state or LiveState()
    method = method or params.method
    unknown = [n for nodes in allocation for n in nodes if n not in topology]
    if unknown:
        raise PlanError(f"allocation names node '{unknown[0]}' that is not in the topology")
    prob = build_problem(allocation, cost, params, state, method)
    num_stages = len(allocation)
    if method == "skippipe":
        plan, prob = _best_shares(allocation, cost, params, state, prob, step, effort_scale, incumbents)
    else:
        makers = {"full": paths_full, "random_skip": paths_random, "skippipe_nc": paths_nc}
        if method not in makers:
            raise PlanError(f"schedule.method={method!r} is unknown")
        rng = random.Random(f"{params.seed}:{step}:{method}")
        plan, _ = finalise(assemble(prob, method, num_stages, makers[method](prob, rng)), prob)
    if state.probe_links or state.probe_nodes:
        return include_links(plan, prob, state.probe_links, state.probe_nodes)
    return plan


def _best_shares(allocation, cost, params, state: LiveState, prob: Problem, step: int, effort_scale: float,
                 incumbents: Sequence[Plan]):
    """``route_skippipe`` once per microbatch share (``problem.share_options``: the speed-following
    split, the even one, the incumbents'): the fastest plan and its problem (ties: the earlier
    option). Every option searches from the same seed, so the result stays deterministic."""
    options = share_options(prob, incumbents)
    best = None
    for i, counts in enumerate(options):
        trial = prob if i == 0 else build_problem(allocation, cost, params, state, "skippipe", counts)
        rng = random.Random(f"{params.seed}:{step}:skippipe")
        plan = route_skippipe(trial, rng, len(allocation), params.search_budget_s, effort_scale, incumbents)
        if best is None or plan.predicted_makespan_s < best[0].predicted_makespan_s - 1e-12:
            best = (plan, trial, i)
    plan, prob, chosen = best
    if len(options) > 1:
        plan.extra["shares"] = {"options": [list(c) for c in options], "chosen": chosen}
    return plan, prob
