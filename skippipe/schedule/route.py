"""Routing: paths of microbatches through the stages (SkipPipe arXiv 2502.19913 section 4; DESIGN.md 5).

Methods (one plan format):

- ``full`` (DT-FM baseline): every microbatch visits every live stage in order. The reference
  idles surplus stage-0 nodes; here every stage-0 node starts its own microbatches and pipeline r
  (originator r) uses replica ``r mod replicas`` of each stage, so all methods train the same
  microbatches (ids are originator-major and do not depend on routing).
- ``random_skip``: random stages and replicas under rules 1-3.
- ``skippipe_nc``: cheapest paths by static link + compute cost under rules 1-3, blind to time.
- ``skippipe``: rules 1-4. Instead of the reference's CBS + time-windowed A* (400+ s) each
  microbatch is inserted, in start order, by a beam search over (stage, replica) hops that
  minimises its own finish time against the reservations of the microbatches placed before it
  (``place.Reservations``); a few re-insertions with perturbed orders under
  ``schedule.search_budget_s`` keep the plan with the best simulated makespan. The number of
  attempts is fixed, so plans are deterministic in (seed, step) unless the budget cuts the search.

TC1 (capacity), as in the reference: microbatches are grouped in waves of ``memory`` per
originator (wave = index within the originator // memory). Per wave, a stage k > 0 gets at most
``replicas_k * memory`` visits and a node at most ``memory``. When the live capacity cannot hold
a wave's visits, both limits are multiplied by the smallest integer factor that can (recorded as
``plan.extra['tc1_relax']``). The in-flight memory limit itself is enforced in time by the
reservations and the simulator.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from skippipe.config import stages_visited as stages_visited_of
from skippipe.errors import PlanError
from skippipe.plan import MicrobatchRoute, PathRules, Plan, path_rule_violation
from skippipe.schedule.place import Reservations, place
from skippipe.simulate import simulate


@dataclass
class LiveState:
    """What the coordinator knows now: dead nodes and measured slowness (compute time factor)."""

    dead: Set[str] = field(default_factory=set)
    slowdown: Dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# path rules as a search space


@dataclass(frozen=True)
class _PathState:
    stages: Tuple[int, ...]
    highest: int
    swaps: int


def _next_stages(ps: _PathState, live_stages: Sequence[int], need: int, rules: PathRules) -> List[int]:
    """Stages that may come next and still leave a rule-abiding completion (rules 1-2)."""
    out = []
    visited = set(ps.stages)
    for s in live_stages:
        if s in visited:
            continue
        if s > ps.highest:
            if s - ps.highest > rules.max_jump:
                continue
            nxt = _PathState(ps.stages + (s,), s, ps.swaps)
        else:
            if ps.highest - s > rules.max_swap_distance or ps.swaps >= rules.max_swaps:
                continue
            nxt = _PathState(ps.stages + (s,), ps.highest, ps.swaps + 1)
        if _completable(nxt, live_stages, need - 1, rules):
            out.append(s)
    return out


def _completable(ps: _PathState, live_stages: Sequence[int], need: int, rules: PathRules) -> bool:
    """A sufficient test: swaps inside the current window, then an ascending chain of live stages."""
    if need <= 0:
        return True
    visited = set(ps.stages)
    chain, last = 0, ps.highest
    for s in live_stages:
        if s > ps.highest and s - last <= rules.max_jump:
            chain, last = chain + 1, s
    window = sum(1 for s in live_stages if s not in visited and
                 ps.highest - rules.max_swap_distance <= s < ps.highest)
    return chain + min(rules.max_swaps - ps.swaps, window) >= need


# ------------------------------------------------------------------------------------------------
# TC1 capacity


class _Capacity:
    """Per-wave visit counts per stage and per node (TC1; module docstring)."""

    def __init__(self, live: List[List[str]], memory: int, wave_sizes: Dict[int, int], hops: int):
        self.memory = memory
        self.live = live
        self.relax = 1
        stages = [k for k in range(1, len(live)) if live[k]]
        for wave_mbs in wave_sizes.values():
            while sum(min(len(live[k]) * memory * self.relax, wave_mbs) for k in stages) < wave_mbs * hops:
                self.relax += 1
        self.stage_count: Dict[Tuple[int, int], int] = {}
        self.node_count: Dict[Tuple[int, str], int] = {}
        self.overflows = 0

    def stage_ok(self, wave: int, stage: int) -> bool:
        cap = len(self.live[stage]) * self.memory * self.relax
        return self.stage_count.get((wave, stage), 0) < cap

    def node_ok(self, wave: int, node: str) -> bool:
        return self.node_count.get((wave, node), 0) < self.memory * self.relax

    def add(self, wave: int, stages: Sequence[int], nodes: Sequence[str]) -> None:
        for s, n in zip(stages, nodes):
            self.stage_count[(wave, s)] = self.stage_count.get((wave, s), 0) + 1
            self.node_count[(wave, n)] = self.node_count.get((wave, n), 0) + 1


# ------------------------------------------------------------------------------------------------
# the routing problem


@dataclass
class _Problem:
    live: List[List[str]]  # live nodes per stage
    originators: List[str]
    mbs: List[Tuple[int, str, int]]  # (id, originator, wave)
    visited: int
    rules: PathRules
    memory: int
    slow: Dict[str, float]
    cost: object
    stage_of: Dict[str, int]
    capacity: Optional["_Capacity"] = None

    @property
    def live_stages(self) -> List[int]:
        return [k for k in range(1, len(self.live)) if self.live[k]]

    def compute_s(self, node: str, stage: int, phase: str = "F") -> float:
        return self.cost.compute_s(node, stage, phase) * self.slow.get(node, 1.0)


def _problem(allocation, cost, cfg, state: LiveState, method: str) -> _Problem:
    dead = set(state.dead)
    live = [[n for n in nodes if n not in dead] for nodes in allocation]
    if not live[0]:
        raise PlanError("every stage-0 node is dead: no originator can start a microbatch")
    num_stages = len(allocation)
    live_nonzero = sum(1 for k in range(1, num_stages) if live[k])
    if method == "full":
        visited = 1 + live_nonzero
    else:
        visited = min(stages_visited_of(num_stages, cfg.schedule.skip_ratio), 1 + live_nonzero)
    mpo, memory = cfg.schedule.microbatches_per_originator, cfg.schedule.memory
    mbs = [(i * mpo + j, orig, j // memory) for i, orig in enumerate(live[0]) for j in range(mpo)]
    rules = PathRules.from_config(cfg.schedule)
    stage_of = {n: k for k, nodes in enumerate(live) for n in nodes}
    return _Problem(live, list(live[0]), mbs, visited, rules, memory, dict(state.slowdown), cost, stage_of)


def _capacity(prob: _Problem) -> _Capacity:
    waves: Dict[int, int] = {}
    for _, _, wave in prob.mbs:
        waves[wave] = waves.get(wave, 0) + 1
    cap = _Capacity(prob.live, prob.memory, waves, prob.visited - 1)
    prob.capacity = cap
    return cap


def _rules_for(prob: _Problem) -> PathRules:
    """The path rules, with max_jump widened only if dead stages leave no legal ascending path."""
    rules = prob.rules
    probe = _PathState((), 0, 0)
    if _completable(probe, prob.live_stages, prob.visited - 1, rules):
        return rules
    return PathRules(rules.max_swaps, rules.max_swap_distance, len(prob.live))


# ------------------------------------------------------------------------------------------------
# methods: paths


def _paths_full(prob: _Problem, rng: random.Random) -> Dict[int, List[str]]:
    paths = {}
    for mb_id, orig, _ in prob.mbs:
        r = prob.originators.index(orig)
        paths[mb_id] = [prob.live[k][r % len(prob.live[k])] for k in prob.live_stages]
    return paths


def _stages_with_room(prob: _Problem, cap: _Capacity, wave: int, rules: PathRules) -> List[int]:
    """Live stages with TC1 room in this wave, or all live stages when they cannot hold a path."""
    room = [s for s in prob.live_stages if cap.stage_ok(wave, s) and any(cap.node_ok(wave, n) for n in prob.live[s])]
    if _completable(_PathState((), 0, 0), room, prob.visited - 1, rules):
        return room
    cap.overflows += 1
    return prob.live_stages


def _random_stage_walk(prob: _Problem, cap: _Capacity, wave: int, rules: PathRules, rng: random.Random):
    """The stages with most TC1 room (random ties), in ascending order with random legal swaps."""
    stages = _stages_with_room(prob, cap, wave, rules)
    room = {s: len(prob.live[s]) * cap.memory * cap.relax - cap.stage_count.get((wave, s), 0) for s in stages}
    chosen = sorted(sorted(stages, key=lambda s: (-room[s], rng.random()))[:prob.visited - 1])
    if path_rule_violation(chosen, len(prob.live), prob.visited, rules) is not None:
        chosen = None
    if chosen is None:  # fall back to a random walk over the stages with room
        ps = _PathState((), 0, 0)
        while len(ps.stages) < prob.visited - 1:
            ps = _advance(ps, rng.choice(_next_stages(ps, stages, prob.visited - 1 - len(ps.stages), rules)))
        return list(ps.stages)
    for _ in range(rules.max_swaps):
        i = rng.randrange(len(chosen))
        if i + 1 < len(chosen) and rng.random() < 0.5:
            trial = chosen[:i] + [chosen[i + 1], chosen[i]] + chosen[i + 2:]
            if path_rule_violation(trial, len(prob.live), prob.visited, rules) is None:
                chosen = trial
    return chosen


def _paths_random(prob: _Problem, rng: random.Random) -> Dict[int, List[str]]:
    """DT-FM skip baseline: cost-agnostic random paths under rules 1-3."""
    cap, rules = _capacity(prob), _rules_for(prob)
    paths = {}
    for mb_id, _orig, wave in prob.mbs:
        stages = _random_stage_walk(prob, cap, wave, rules, rng)
        nodes = []
        for stage in stages:
            free = [n for n in prob.live[stage] if cap.node_ok(wave, n)]
            if not free:
                cap.overflows += 1
            nodes.append(rng.choice(free or prob.live[stage]))
        cap.add(wave, stages, nodes)
        paths[mb_id] = nodes
    return paths


def _advance(ps: _PathState, stage: int) -> _PathState:
    if stage > ps.highest:
        return _PathState(ps.stages + (stage,), stage, ps.swaps)
    return _PathState(ps.stages + (stage,), ps.highest, ps.swaps + 1)


def _beam_path(prob: _Problem, cap: _Capacity, rules: PathRules, orig: str, wave: int, start_time: float,
               hop_time, width: int, replicas: int) -> List[Tuple[float, _PathState, List[str]]]:
    """Beam search over (stage, replica) hops; ``hop_time(prev, node, stage, t) -> finish time``."""
    beam = [(start_time, _PathState((), 0, 0), [orig])]
    stages = _stages_with_room(prob, cap, wave, rules)
    need_total = prob.visited - 1
    for depth in range(need_total):
        need = need_total - depth
        children = []
        for t, ps, nodes in beam:
            for stage in _next_stages(ps, stages, need, rules):
                cands = [n for n in prob.live[stage] if cap.node_ok(wave, n)] or prob.live[stage]
                if len(cands) > replicas:
                    prev = nodes[-1]
                    cands = sorted(cands, key=lambda n: prob.cost.transfer_s(prev, n))[:replicas]
                for node in cands:
                    finish = hop_time(nodes[-1], node, stage, t)
                    score = finish + (prob.cost.transfer_s(node, orig) if need == 1 else 0.0)
                    children.append((score, finish, _advance(ps, stage), nodes + [node]))
        children.sort(key=lambda c: (c[0], c[3]))
        beam = [(finish, ps, nodes) for _, finish, ps, nodes in children[:width]]
    return [(t, ps, nodes[1:]) for t, ps, nodes in beam]


def _paths_nc(prob: _Problem, rng: random.Random) -> Dict[int, List[str]]:
    """Cheapest static paths (link + compute), load spread by TC1 counts; blind to collisions."""
    cap, rules = _capacity(prob), _rules_for(prob)

    load: Dict[str, int] = {}

    def hop_time(prev, node, stage, t):
        # static cost of the hop (forward + backward compute, link), spread by the load so far
        return t + prob.cost.transfer_s(prev, node) + 2.5 * prob.compute_s(node, stage) * (1 + load.get(node, 0))

    paths = {}
    for mb_id, orig, wave in _insertion_order(prob, rng, 0):
        best = _beam_path(prob, cap, rules, orig, wave, 0.0, hop_time, width=8, replicas=8)
        _, ps, nodes = min(best, key=lambda c: (c[0] + prob.cost.transfer_s(c[2][-1], orig) if c[2] else c[0],
                                                 c[2]))
        cap.add(wave, ps.stages, nodes)
        for node in nodes:
            load[node] = load.get(node, 0) + 1
        paths[mb_id] = nodes
    return paths


def _insertion_order(prob: _Problem, rng: random.Random, shuffle_level: int):
    """Microbatches in planned start order: round robin over originators, by index."""
    mpo = max(1, len(prob.mbs) // max(1, len(prob.originators)))
    order = sorted(prob.mbs, key=lambda m: (m[0] % mpo, prob.originators.index(m[1])))
    if shuffle_level:
        order = list(order)
        for _ in range(shuffle_level):
            i = rng.randrange(max(1, len(order) - 1))
            j = min(len(order) - 1, i + rng.randint(1, 3))
            order[i], order[j] = order[j], order[i]
    return order


def _place_collision_aware(prob: _Problem, rng: random.Random, order, width: int, replicas: int,
                           busy_weight: float = 0.0):
    """One greedy insertion pass (TC2): each microbatch takes the path that finishes it earliest."""
    cap, rules = _capacity(prob), _rules_for(prob)
    res = Reservations(prob.memory)
    cost, slow = prob.cost, prob.slow
    ready_at: Dict[str, float] = {}
    paths, starts = {}, {}

    def hop_time(prev, node, stage, t):
        ready = t + cost.transfer_s(prev, node)
        dur = prob.compute_s(node, stage)
        return res.earliest_fit(node, ready, dur) + dur

    for mb_id, orig, wave in order:
        t0 = ready_at.get(orig, 0.0)
        f0 = prob.compute_s(orig, 0)
        first_end = res.earliest_fit(orig, t0, f0) + f0
        cands = _beam_path(prob, cap, rules, orig, wave, first_end, hop_time, width, replicas)
        best = None
        for _, ps, nodes in cands:
            end, actions, windows = place(res, cost, mb_id, orig, nodes, list(ps.stages), t0, slow)
            busy_s = sum(a[4] - a[3] for a in actions)
            key = (end + busy_weight * (busy_s + actions[-1][4] - actions[0][3]), busy_s)
            if best is None or key < best[0]:
                best = (key, ps, nodes, actions, windows)
        _, ps, nodes, actions, windows = best
        res.commit(actions, windows)
        cap.add(wave, ps.stages, nodes)
        paths[mb_id] = nodes
        starts[mb_id] = actions[0][3]
        ready_at[orig] = actions[0][4]
    return paths, starts, res


# ------------------------------------------------------------------------------------------------
# plan assembly


def _make(prob: _Problem, method: str, num_stages: int, paths, starts=None, extra=None) -> Plan:
    mbs = [MicrobatchRoute(mb_id, orig, list(paths[mb_id]), float((starts or {}).get(mb_id, 0.0)))
           for mb_id, orig, _ in sorted(prob.mbs)]
    plan = Plan(method, num_stages, prob.visited, [list(n) for n in prob.live], mbs)
    plan.extra = {"memory": prob.memory, **(extra or {})}
    if prob.capacity is not None:
        plan.extra.update(tc1_relax=prob.capacity.relax, tc1_overflows=prob.capacity.overflows)
    return plan


def _finalise(plan: Plan, prob: _Problem, order_hint: Optional[Dict] = None):
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
            order_hint = _reserve_order(plan, prob)
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


def _reserve_order(plan: Plan, prob: _Problem) -> Dict[str, List[Tuple[int, str]]]:
    """A deadlock-free order for fixed paths: time them on the reservation table."""
    res = Reservations(prob.memory)
    stage_of = plan.stage_of()
    ready_at: Dict[str, float] = {}
    mb_by_id = {mb.id: mb for mb in plan.microbatches}
    for mb_id, orig, _ in _insertion_order(prob, random.Random(0), 0):
        mb = mb_by_id[mb_id]
        _, actions, windows = place(res, prob.cost, mb_id, orig, mb.path, [stage_of[n] for n in mb.path],
                                    ready_at.get(orig, 0.0), prob.slow)
        res.commit(actions, windows)
        ready_at[orig] = actions[0][4]
    return _order_of(res.actions)


def _order_of(actions) -> Dict[str, List[Tuple[int, str]]]:
    out: Dict[str, List[Tuple[int, str]]] = {}
    for node, mb, phase, _, _ in sorted(actions, key=lambda a: (a[3], a[4], a[1])):
        out.setdefault(node, []).append((mb, phase))
    return out


def _route_skippipe(prob: _Problem, rng: random.Random, num_stages: int, budget_s: float) -> Plan:
    """Greedy collision-aware insertion, repeated with perturbed orders and weights (TC2).

    Attempt 0 is the plain greedy; later attempts swap a few neighbours in the insertion order and
    weigh each candidate's busy and in-flight time against its finish time. The collision-blind
    cost-aware paths (``skippipe_nc``), timed on the reservation table, are one more candidate, so
    the collision-aware plan is never slower than them. Every candidate is scored by the simulator.
    """
    n_mbs = len(prob.mbs)
    small = n_mbs * prob.visited < 2000
    width, replicas = (8, 6) if small else (3, 4)
    deadline = time.perf_counter() + budget_s
    best = [None, float("inf")]

    def consider(plan):
        try:
            timeline = simulate(plan, prob.cost, prob.memory, prob.slow)
        except PlanError:  # readiness order of fixed paths can deadlock; the plan is dropped
            return
        if timeline.makespan_s < best[1] - 1e-9:
            plan.node_order = timeline.order()
            plan.predicted_makespan_s = timeline.makespan_s
            plan.extra.update(collisions=timeline.collisions, mean_idle_fraction=timeline.mean_idle_fraction())
            best[:] = [plan, timeline.makespan_s]

    weights = (0.0, 0.05, 0.15, 0.3)
    # a fixed number of attempts keeps the plan a function of (seed, step); the budget only guards
    max_attempts = 24 if small else 6
    attempt = 0
    while attempt == 0 or time.perf_counter() < deadline:
        order = _insertion_order(prob, rng, 0 if attempt < len(weights) else 1 + attempt % max(2, n_mbs // 2))
        paths, starts, res = _place_collision_aware(prob, rng, order, width, replicas, weights[attempt % len(weights)])
        plan = _make(prob, "skippipe", num_stages, paths, starts)
        plan.node_order = _order_of(res.actions)
        consider(plan)
        if attempt == 0:
            nc_paths = _paths_nc(prob, random.Random(0))
            consider(_make(prob, "skippipe", num_stages, nc_paths))
            nc_plan = _make(prob, "skippipe", num_stages, nc_paths)
            nc_plan.node_order = _reserve_order(nc_plan, prob)
            consider(nc_plan)
        attempt += 1
        if attempt >= max_attempts:
            break
    plan = best[0]
    plan.extra["search_attempts"] = attempt
    return plan


def route(allocation: List[List[str]], topology, cost, cfg, state: Optional[LiveState] = None, step: int = 0,
          method: Optional[str] = None) -> Plan:
    """A plan for one iteration (``cfg.schedule.method`` unless ``method``), deterministic in (seed, step)."""
    state = state or LiveState()
    method = method or cfg.schedule.method
    unknown = [n for nodes in allocation for n in nodes if n not in topology]
    if unknown:
        raise PlanError(f"allocation names node '{unknown[0]}' that is not in the topology")
    seed = cfg.schedule.seed if cfg.schedule.seed is not None else cfg.run.seed
    rng = random.Random(f"{seed}:{step}:{method}")
    prob = _problem(allocation, cost, cfg, state, method)
    num_stages = len(allocation)
    if method == "skippipe":
        return _route_skippipe(prob, rng, num_stages, cfg.schedule.search_budget_s)
    makers = {"full": _paths_full, "random_skip": _paths_random, "skippipe_nc": _paths_nc}
    if method not in makers:
        raise PlanError(f"schedule.method={method!r} is unknown")
    plan = _make(prob, method, num_stages, makers[method](prob, rng))
    plan, _ = _finalise(plan, prob)
    return plan
