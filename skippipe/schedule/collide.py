"""``skippipe``: cost- and collision-aware routing, rules 1-4 (SkipPipe arXiv 2502.19913; DESIGN.md 5).

Instead of the reference's CBS + time-windowed A* (400+ s):
(1) construction: each microbatch is inserted, in start order, by a beam search over (stage,
replica) hops that minimises its own finish time against the reservations of the microbatches
placed before it (``place.Reservations``), under a few fixed insertion orders and weights; the
``skippipe_nc`` paths, dedicated paths (one cycle per originator, as the reference's coarsened
schedule) and the DT-FM pipelines with skips are more candidates; (2) improvement: a local search
(``schedule.search``) that changes one microbatch at a time (its path, a replica, its stage set
or start time, or an exchange with another microbatch of its wave) and keeps a change when the
simulated iteration gets shorter. Every candidate is scored by the simulator itself.

Determinism: every search runs a fixed number of attempts that depends only on the problem's size,
and every random choice comes from a generator seeded by (seed, step, method), so a plan is a
function of (config, allocation, live state, seed, step), whatever the machine's speed.
``schedule.search_budget_s`` is only a safety cap on wall-clock time that normal configs never
reach; if it cuts a search short the plan records ``extra['search_capped'] = True``.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Dict, List, Optional, Sequence

from skippipe.errors import PlanError
from skippipe.plan import Plan, path_rule_violation
from skippipe.schedule.assemble import assemble, order_of
from skippipe.schedule.baselines import paths_full_skipping, paths_nc
from skippipe.schedule.place import Reservations, place
from skippipe.schedule.problem import (
    Problem,
    beam_path,
    capacity_for,
    fallback_path,
    feasible,
    insertion_order,
    rules_for,
    search_effort,
    wave_sizes,
)
from skippipe.schedule.search import improve
from skippipe.schedule.space import Capacity
from skippipe.simulate import simulate

log = logging.getLogger(__name__)




def place_collision_aware(prob: Problem, rng: random.Random, order, width: int, replicas: int,
                           busy_weight: float = 0.0):
    """One greedy insertion pass (TC2): each microbatch takes the path that finishes it earliest."""
    cap, rules = capacity_for(prob), rules_for(prob)
    res = Reservations(prob.memory)
    cost, slow = prob.cost, prob.slow
    ready_at: Dict[str, float] = {}
    paths, starts = {}, {}

    def hop_time(prev, node, stage, t):
        ready = t + prob.transfer(prev, node)
        dur = prob.compute_s(node, stage)
        return res.earliest_fit(node, ready, dur) + dur

    for mb_id, orig, wave in order:
        t0 = ready_at.get(orig, 0.0)
        f0 = prob.compute_s(orig, 0)
        first_end = res.earliest_fit(orig, t0, f0) + f0
        cands = [(list(ps.stages), nodes)
                 for _, ps, nodes in beam_path(prob, cap, rules, orig, wave, first_end, hop_time, width, replicas)
                 if feasible(cap, wave, ps, nodes)]
        if not cands:
            cands = [fallback_path(prob, cap, rules, orig, wave)]
        best = None
        for stages, nodes in cands:
            end, actions, windows = place(res, cost, mb_id, orig, nodes, stages, t0, slow)
            busy_s = sum(a[4] - a[3] for a in actions)
            key = (end + busy_weight * (busy_s + actions[-1][4] - actions[0][3]), busy_s)
            if best is None or key < best[0]:
                best = (key, stages, nodes, actions, windows)
        _, stages, nodes, actions, windows = best
        res.commit(actions, windows)
        cap.add(wave, stages, nodes)
        paths[mb_id] = nodes
        starts[mb_id] = actions[0][3]
        ready_at[orig] = actions[0][4]
    return paths, starts, res


def paths_dedicated(prob: Problem, order: str) -> Optional[Dict[int, List[str]]]:
    """One path per originator, used by all its microbatches, nodes shared only when unavoidable.

    The reference's coarsened collision-aware schedule does this: when the other stages have
    enough nodes, each originator gets a cycle of its own and its microbatches never meet another
    originator's. Originators choose in turn (``order``: ``worst`` - the one whose cheapest cycle
    is dearest first, ``best`` - the reverse, ``index``) by a static beam search in which a node
    another originator already uses costs ``_SHARED_NODE_S`` per microbatch it carries. None when
    the result breaks a TC1 count (then the other constructions decide).
    """
    rules = rules_for(prob)
    counts: Dict[str, int] = {}
    for _, orig, _ in prob.mbs:
        counts[orig] = counts.get(orig, 0) + 1
    carried: Dict[str, int] = {}

    def hop(prev, node, stage, t):
        work = prob.compute_s(node, stage, "F") + prob.compute_s(node, stage, "B")
        return t + 2 * prob.transfer(prev, node) + work + _SHARED_NODE_S * carried.get(node, 0)

    def cheapest(orig, left: int = 0):
        """The cheapest path that leaves ``left`` more originators enough unused nodes of distinct
        stages (sum_k min(free_k, left) >= left * hops), else the cheapest."""
        found = beam_path(prob, None, rules, orig, 0, 0.0, hop, width=16, replicas=6)
        for cand in found:
            free = {k: sum(1 for n in prob.live[k] if not carried.get(n) and n not in cand[2])
                    for k in prob.live_stages}
            if sum(min(f, left) for f in free.values()) >= left * (prob.visited - 1):
                return cand
        return found[0] if found else None

    origs = sorted(counts, key=lambda o: prob.originators.index(o))
    if order != "index":
        alone = {o: (cheapest(o) or (float("inf"),))[0] for o in origs}
        origs.sort(key=lambda o: (-alone[o] if order == "worst" else alone[o], prob.originators.index(o)))
    chosen: Dict[str, List[str]] = {}
    for i, orig in enumerate(origs):
        found = cheapest(orig, len(origs) - 1 - i)
        if found is None:
            return None
        chosen[orig] = found[2]
        for node in chosen[orig]:
            carried[node] = carried.get(node, 0) + counts[orig]
    paths = {mb: list(chosen[orig]) for mb, orig, _ in prob.mbs}
    cap = Capacity(prob.live, prob.memory, wave_sizes(prob), prob.visited - 1)
    for mb, _, wave in prob.mbs:
        stages = [prob.stage_of[n] for n in paths[mb]]
        if not cap.fits(wave, stages, paths[mb]):
            return None
        cap.add(wave, stages, paths[mb])
    return paths


_SHARED_NODE_S = 1e3  # dedicated paths: cost of one microbatch already on a node (avoid sharing)




def route_skippipe(prob: Problem, rng: random.Random, num_stages: int, budget_s: float,
                    effort_scale: float = 1.0, incumbents: Sequence[Plan] = ()) -> Plan:
    """Collision-aware routing (TC2): greedy constructions, then a simulator-scored local search.

    Constructions: greedy insertion on the reservation table with a few insertion orders and
    weights, the collision-blind cost-aware paths (``skippipe_nc``), and the DT-FM pipelines of
    ``full`` with the skipped stages dropped (at scale, where TC1 pushes the greedy paths onto far
    replicas, these region-coherent pipelines are the better start). The best of them under the
    simulator (readiness order) seeds the local search (``schedule.search.improve``). The result
    is never slower than any construction, the ``skippipe_nc`` paths included, nor than the paths
    of an ``incumbent`` (an earlier plan of this allocation that still fits the problem), costed
    anew: a re-plan from another seed may not undo what an earlier search found.
    """

    deadline = time.perf_counter() + budget_s
    effort = search_effort(prob, effort_scale)

    def build(paths, starts):
        return assemble(prob, "skippipe", num_stages, paths, starts)

    candidates, capped = _constructions(prob, rng, effort, deadline, build, incumbents)
    log.debug("skippipe constructions: %s", [(c[5], round(c[0], 2)) for c in candidates])
    readiness = [c for c in candidates if c[4] is None]
    seed = min(readiness or candidates, key=lambda c: (c[0], c[1]))
    result, evaluations, accepted, search_capped = _search_from(prob, rng, seed, effort, deadline, build)
    capped = capped or search_capped
    plan, best_tl = _with_reserved_order(prob, result.payload, candidates, build)
    if not plan.node_order:
        plan.node_order = best_tl.order()
    plan.predicted_makespan_s = best_tl.makespan_s
    prob.capacity = result.capacity
    cap = result.capacity  # the counts of the local search's best paths: report real excesses
    excess = _tc1_excess(cap)
    plan.extra.update(tc1_relax=cap.relax, tc1_overflows=excess,
                      collisions=best_tl.collisions, mean_idle_fraction=best_tl.mean_idle_fraction(),
                      search_constructions=len(candidates), search_evaluations=evaluations,
                      search_accepted=accepted, search_seed_s=seed[0], search_capped=capped)
    if capped:
        log.warning("skippipe routing hit schedule.search_budget_s=%.1f s: the plan depends on machine speed",
                    budget_s)
    return plan


_GREEDY_WEIGHTS = (0.0, 0.05, 0.15, 0.3)  # busy-time weights of the greedy insertions, in turn


def _constructions(prob: Problem, rng: random.Random, effort, deadline: float, build, incumbents=()):
    """The simulated constructions that may seed the search, and whether the deadline cut them short."""
    weights = _GREEDY_WEIGHTS
    candidates = []  # (makespan, index, paths, starts, node_order or None, tag)
    capped = False

    def consider(paths, starts, order=None, tag=""):
        plan = build(paths, starts)
        plan.node_order = order or {}
        try:
            tl = simulate(plan, prob.cost, prob.memory, prob.slow, use_order=order is not None)
        except PlanError:
            return
        candidates.append((tl.makespan_s, len(candidates), paths, starts, order, tag))

    for attempt in range(int(effort["constructions"])):
        if attempt and time.perf_counter() > deadline:
            capped = True
            break
        order = insertion_order(prob, rng, 0 if attempt < len(weights) else 1 + attempt)
        paths, starts, res = place_collision_aware(prob, rng, order, int(effort["width"]), int(effort["replicas"]),
                                                    weights[attempt % len(weights)])
        consider(paths, starts, tag=f"greedy{attempt}")
        consider(paths, starts, order_of(res.actions), tag=f"greedy{attempt}-reserved")
    nc_paths = paths_nc(prob, random.Random(0))
    consider(nc_paths, {}, tag="nc")
    for order in ("worst", "best", "index"):
        dedicated = paths_dedicated(prob, order)
        if dedicated is not None:
            consider(dedicated, {}, tag=f"dedicated-{order}")
    for balanced in (True, False):  # the full pipelines with skips: never worse than DT-FM's paths
        full_skip = paths_full_skipping(prob, balanced)
        if full_skip is not None:
            consider(full_skip, {}, tag=f"full-skip{'-balanced' if balanced else ''}")
    for i, plan in enumerate(incumbents):
        paths = incumbent_paths(prob, plan)
        if paths is not None:
            consider(paths, {}, tag=f"incumbent{i}")
            if plan.node_order:
                consider(paths, {}, plan.node_order, tag=f"incumbent{i}-ordered")
    return candidates, capped


def incumbent_paths(prob: Problem, plan: Plan) -> Optional[Dict[int, List[str]]]:
    """An earlier plan's paths by microbatch id, if they fit this problem: the same microbatches
    and originators, every node live and the path rules kept (``path_rule_violation``); else None."""
    mine = {mb_id: orig for mb_id, orig, _ in prob.mbs}
    if {mb.id: mb.originator for mb in plan.microbatches} != mine:
        return None
    live = {n for nodes in prob.live for n in nodes}
    if any(n not in live for mb in plan.microbatches for n in mb.path):
        return None
    paths = {mb.id: list(mb.path) for mb in plan.microbatches}
    stage_of = prob.stage_of
    if any(path_rule_violation([stage_of[n] for n in path], len(prob.live), prob.visited, prob.rules)
           for path in paths.values()):
        return None
    return paths


def _search_from(prob: Problem, rng: random.Random, seed, effort, deadline: float, build):
    """The best local search from the seed (restarts, then the rest from the best), its counts, and capped."""
    capped = False
    evaluations = accepted = 0
    restarts = max(1, int(effort["restarts"]))
    share = int(effort["iterations"] * effort["restart_share"]) // restarts
    result = None
    for r in range(restarts):
        trial = improve(prob, seed[2], seed[3], random.Random(f"{rng.random()}:{r}"), share, deadline, build,
                        pool_width=int(effort["pool"]), anneal=effort["anneal"])
        capped = capped or trial.capped
        evaluations, accepted = evaluations + trial.iterations, accepted + trial.accepted
        if result is None or trial.payload[1].makespan_s < result.payload[1].makespan_s - 1e-9:
            result = trial
    rest = int(effort["iterations"]) - share * restarts
    if rest > 0:
        trial = improve(prob, result.paths, result.starts, rng, rest, deadline, build,
                        pool_width=int(effort["pool"]), anneal=effort["anneal"])
        capped = capped or trial.capped
        evaluations, accepted = evaluations + trial.iterations, accepted + trial.accepted
        if trial.payload[1].makespan_s < result.payload[1].makespan_s - 1e-9:
            result = trial
    return result, evaluations, accepted, capped


def _with_reserved_order(prob: Problem, payload, candidates, build):
    """The search's (plan, timeline), or the best reservation-ordered construction when that is faster."""
    best_plan, best_tl = payload
    reserved = [c for c in candidates if c[4] is not None]
    if reserved:  # a reservation order can beat readiness order on the same paths
        makespan, _, paths, starts, order, _ = min(reserved, key=lambda c: (c[0], c[1]))
        if makespan < best_tl.makespan_s - 1e-9:
            best_plan = build(paths, starts)
            best_plan.node_order = order
            best_tl = simulate(best_plan, prob.cost, prob.memory, prob.slow)
    return best_plan, best_tl


def _tc1_excess(cap: Capacity) -> int:
    """How many TC1 counts (per wave and stage, per wave and node) the final paths overfill."""
    return (sum(1 for (_, s), c in cap.stage_count.items() if c > cap.stage_cap(s)) +
            sum(1 for c in cap.node_count.values() if c > cap.node_cap()))
