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
from skippipe.schedule.problem import LiveState, build_problem

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
    seed = params.seed
    rng = random.Random(f"{seed}:{step}:{method}")
    prob = build_problem(allocation, cost, params, state, method)
    num_stages = len(allocation)
    if method == "skippipe":
        plan = route_skippipe(prob, rng, num_stages, params.search_budget_s, effort_scale, incumbents)
    else:
        makers = {"full": paths_full, "random_skip": paths_random, "skippipe_nc": paths_nc}
        if method not in makers:
            raise PlanError(f"schedule.method={method!r} is unknown")
        plan, _ = finalise(assemble(prob, method, num_stages, makers[method](prob, rng)), prob)
    if state.probe_links or state.probe_nodes:
        return include_links(plan, prob, state.probe_links, state.probe_nodes)
    return plan
