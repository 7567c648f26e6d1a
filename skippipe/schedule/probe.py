"""Probe routes: put one microbatch on a link (or node) the coordinator wants to measure again.

A link that was found slow and then left idle is only learnt about again if traffic crosses it.
Costing it as the topology says (``LinkWatch``'s probe) is not enough when the router has equally
good alternatives (one region, replicas everywhere): it may never pick the link, and a recovered
link would stay unused for good. So a probe asks for the link outright: among the plans that
differ from the routed one in one microbatch's path (any rule-abiding stages that put the link's
two ends next to each other), the one with the shortest simulated step. A slow node on probation
(``FaultMonitor``) is probed the same way: one microbatch is sent through it.
"""

from __future__ import annotations

import heapq
from typing import Iterable, List, Optional, Tuple

from skippipe.errors import PlanError
from skippipe.plan import Plan
from skippipe.schedule.assemble import assemble, finalise
from skippipe.schedule.problem import Problem, rules_for
from skippipe.schedule.space import PathState, advance, next_stages

Link = Tuple[str, str]


def crosses(plan: Plan, a: str, b: str) -> bool:
    """Whether some microbatch of ``plan`` sends over the link a-b (either way)."""
    for mb in plan.microbatches:
        hops = [mb.originator, *mb.path, mb.originator]
        if any({u, v} == {a, b} for u, v in zip(hops, hops[1:])):
            return True
    return False


def stage_sequences(prob: Problem, limit: int = 4096) -> List[Tuple[int, ...]]:
    """The rule-abiding stage sequences of a path (after stage 0), at most ``limit``, in order."""
    rules, need = rules_for(prob), prob.visited - 1
    out: List[Tuple[int, ...]] = []
    stack = [PathState((), 0, 0)]
    while stack and len(out) < limit:
        ps = stack.pop()
        if len(ps.stages) == need:
            out.append(ps.stages)
            continue
        for stage in reversed(next_stages(ps, prob.live_stages, need - len(ps.stages), rules)):
            stack.append(advance(ps, stage))
    return out


def _fill(prob: Problem, orig: str, stages, fixed, had):
    """Nodes for ``stages``: ``fixed`` positions as given, else the microbatch's node of that stage
    (``had``), else the replica nearest the previous node."""
    path, prev = [], orig
    for j, stage in enumerate(stages):
        node = fixed.get(j) or had.get(stage) or min(prob.live[stage], key=lambda n: (prob.transfer(prev, n), n))
        path.append(node)
        prev = node
    return path


def _link_variants(plan: Plan, prob: Problem, a: str, b: str):
    """(static cost increase, microbatch id, path): one microbatch of ``plan`` moved onto a-b, by any
    rule-abiding choice of stages that has the two ends' stages next to each other; the other
    stages keep the microbatch's node, or take the replica nearest the previous node."""
    stage_of = prob.stage_of
    if a not in stage_of or b not in stage_of or stage_of[a] == stage_of[b]:
        return
    sequences = stage_sequences(prob)
    for mb in plan.microbatches:
        orig, had = mb.originator, {stage_of[n]: n for n in mb.path}
        base = prob.static_cost(orig, mb.path)
        for stages in sequences:
            hops = [0, *stages, 0]
            for i in range(len(hops) - 1):
                for x, y in ((a, b), (b, a)):
                    if hops[i] != stage_of[x] or hops[i + 1] != stage_of[y]:
                        continue
                    # the originator holds the microbatch's data and loss: it is an end, never swapped
                    if (i == 0 and orig != x) or (i + 2 == len(hops) and orig != y):
                        continue
                    path = _fill(prob, orig, stages, {i - 1: x, i: y}, had)  # positions of the link's ends
                    if path != mb.path:
                        yield prob.static_cost(orig, path) - base, mb.id, path


def _node_variants(plan: Plan, prob: Problem, node: str):
    """(static cost increase, microbatch id, path): one microbatch of ``plan`` sent through ``node``
    (a stage above 0; stage-0 nodes get work through their share of the microbatches)."""
    stage = prob.stage_of.get(node)
    if not stage:
        return
    sequences = [s for s in stage_sequences(prob) if stage in s]
    for mb in plan.microbatches:
        orig, had = mb.originator, {prob.stage_of[n]: n for n in mb.path}
        base = prob.static_cost(orig, mb.path)
        for stages in sequences:
            path = _fill(prob, orig, stages, {stages.index(stage): node}, had)
            if path != mb.path:
                yield prob.static_cost(orig, path) - base, mb.id, path


def _cheapest(plan: Plan, prob: Problem, variants, limit: int) -> Optional[Plan]:
    """The shortest simulated plan among the ``limit`` variants cheapest by static cost."""
    best: Optional[Plan] = None
    starts = {mb.id: mb.start_s for mb in plan.microbatches}
    paths = {mb.id: list(mb.path) for mb in plan.microbatches}
    for _, mb_id, path in heapq.nsmallest(limit, variants, key=lambda v: (v[0], v[1])):
        candidate = assemble(prob, plan.method, plan.num_stages, {**paths, mb_id: path}, starts, extra=dict(plan.extra))
        try:
            candidate, _ = finalise(candidate, prob)
        except PlanError:
            continue
        if best is None or candidate.predicted_makespan_s < best.predicted_makespan_s:
            best = candidate
    return best


def include_links(plan: Plan, prob: Problem, links: Iterable[Link] = (), nodes: Iterable[str] = (),
                  limit: int = 64) -> Plan:
    """``plan`` with traffic on each of ``links`` and through each of ``nodes`` (those it does not
    use yet) where one microbatch's path can take it; the cheapest such plan by simulation (of the
    ``limit`` cheapest by static cost, per link or node). One no path can take (a link with both
    ends in one stage, a dead end, a stage-0 node or end that originates nothing) is left out."""
    for a, b in sorted(links):
        if crosses(plan, a, b):
            continue
        best = _cheapest(plan, prob, _link_variants(plan, prob, a, b), limit)
        if best is not None:
            best.extra["probe_links"] = sorted({*best.extra.get("probe_links", []), f"{a}-{b}"})
            plan = best
    for node in sorted(nodes):
        if any(node in mb.path or node == mb.originator for mb in plan.microbatches):
            continue
        best = _cheapest(plan, prob, _node_variants(plan, prob, node), limit)
        if best is not None:
            best.extra["probe_nodes"] = sorted({*best.extra.get("probe_nodes", []), node})
            plan = best
    return plan
