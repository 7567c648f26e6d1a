"""Plan assembly: paths and start times -> a ``Plan`` with its node order and predicted time."""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Tuple

from skippipe.errors import PlanError
from skippipe.plan import MicrobatchRoute, Plan
from skippipe.schedule.place import Reservations, place
from skippipe.schedule.problem import Problem, insertion_order
from skippipe.simulate import simulate


def assemble(prob: Problem, method: str, num_stages: int, paths, starts=None, extra=None) -> Plan:
    mbs = [MicrobatchRoute(mb_id, orig, list(paths[mb_id]), float((starts or {}).get(mb_id, 0.0)))
           for mb_id, orig, _ in sorted(prob.mbs)]
    plan = Plan(method, num_stages, prob.visited, [list(n) for n in prob.live], mbs)
    plan.extra = {"memory": prob.memory, **(extra or {})}
    if prob.capacity is not None:
        plan.extra.update(tc1_relax=prob.capacity.relax, tc1_overflows=prob.capacity.overflows)
    return plan


def finalise(plan: Plan, prob: Problem, order_hint: Optional[Dict] = None):
    """Simulate, then fill node_order and the predicted makespan from the simulated timeline.

    Readiness order first (what a greedy runtime would do); if it deadlocks (possible with swaps and
    tight memory) or is slower than ``order_hint`` (the reservation order, deadlock free by
    construction), the hint wins.
    """
    timeline = None
    try:
        timeline = simulate(plan, prob.cost, prob.memory, prob.slow, use_order=False)
    except PlanError:
        if order_hint is None:
            order_hint = reserve_order(plan, prob)
    if order_hint is not None:
        plan.node_order = order_hint
        hinted = simulate(plan, prob.cost, prob.memory, prob.slow)
        if timeline is None or hinted.makespan_s <= timeline.makespan_s:
            timeline = hinted
    plan.node_order = timeline.order()
    plan.predicted_makespan_s = timeline.makespan_s
    plan.extra["collisions"] = timeline.collisions
    plan.extra["mean_idle_fraction"] = timeline.mean_idle_fraction()
    return plan, timeline


def reserve_order(plan: Plan, prob: Problem) -> Dict[str, List[Tuple[int, str]]]:
    """A deadlock-free order for fixed paths: time them on the reservation table."""
    res = Reservations(prob.memory)
    stage_of = plan.stage_of()
    ready_at: Dict[str, float] = {}
    mb_by_id = {mb.id: mb for mb in plan.microbatches}
    for mb_id, orig, _ in insertion_order(prob, random.Random(0), 0):
        mb = mb_by_id[mb_id]
        _, actions, windows = place(res, prob.cost, mb_id, orig, mb.path, [stage_of[n] for n in mb.path],
                                    ready_at.get(orig, 0.0), prob.slow)
        res.commit(actions, windows)
        ready_at[orig] = actions[0][4]
    return order_of(res.actions)


def order_of(actions) -> Dict[str, List[Tuple[int, str]]]:
    out: Dict[str, List[Tuple[int, str]]] = {}
    for node, mb, phase, _, _ in sorted(actions, key=lambda a: (a[3], a[4], a[1])):
        out.setdefault(node, []).append((mb, phase))
    return out
