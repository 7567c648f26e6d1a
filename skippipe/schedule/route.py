"""Routing: paths of microbatches through the stages (SkipPipe arXiv 2502.19913 section 4; DESIGN.md 5).

Methods (one plan format):

- ``full`` (DT-FM baseline): every microbatch visits every live stage in order. The reference
  idles surplus stage-0 nodes; here every stage-0 node starts its own microbatches and pipeline r
  (originator r) uses replica ``r mod replicas`` of each stage (the allocation aligns replica r of
  consecutive stages by a minimum-cost matching), so all methods train the same microbatches (ids
  are originator-major and do not depend on routing).
- ``random_skip``: random stages and replicas under rules 1-3 (cost agnostic).
- ``skippipe_nc``: cheapest paths by static link + compute cost under rules 1-3, blind to time.
- ``skippipe``: rules 1-4. Instead of the reference's CBS + time-windowed A* (400+ s):
  (1) construction: each microbatch is inserted, in start order, by a beam search over (stage,
  replica) hops that minimises its own finish time against the reservations of the microbatches
  placed before it (``place.Reservations``), under a few fixed insertion orders and weights; the
  ``skippipe_nc`` paths are one more candidate; (2) improvement: a local search
  (``schedule.search``) that changes one microbatch at a time (its path, a replica, its stage set
  or start time, or an exchange with another microbatch of its wave) and keeps a change when the
  simulated iteration gets shorter. Every candidate is scored by the simulator itself.

Beam searches score a partial path by its finish time plus the link back to the originator: a path
is a loop, and without that term a greedy path can end next to a node whose return link is very
slow (the NL-London link of the GCP table takes 132 s), which is what made ``skippipe`` and
``skippipe_nc`` slower than ``full`` at 200 nodes.

Determinism: every search runs a fixed number of attempts that depends only on the problem's size,
and every random choice comes from a generator seeded by (seed, step, method), so a plan is a
function of (config, allocation, live state, seed, step), whatever the machine's speed.
``schedule.search_budget_s`` is only a safety cap on wall-clock time that normal configs never
reach; if it cuts a search short the plan records ``extra['search_capped'] = True``.

TC1 (capacity), as in the reference: microbatches are grouped in waves of ``memory`` per
originator (wave = index within the originator // memory). Per wave, a stage k > 0 gets at most
``replicas_k * memory`` visits and a node at most ``memory``. When the live capacity cannot hold
a wave's visits, both limits are multiplied by the smallest integer factor that can (recorded as
``plan.extra['tc1_relax']``). Paths are chosen so that the rest of the wave always stays feasible
(a Gale-Ryser test on the remaining stage room), so the limits hold exactly
(``plan.extra['tc1_overflows']`` counts the rare cases where the path rules force an excess). The
in-flight memory limit itself is enforced in time by the reservations and the simulator.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from skippipe.config import stages_visited as stages_visited_of
from skippipe.cost import CachedCost
from skippipe.errors import PlanError
from skippipe.plan import MicrobatchRoute, PathRules, Plan, path_rule_violation
from skippipe.schedule.allocate import align as aligned  # noqa: F401  (re-exported for coallocate)
from skippipe.schedule.place import Reservations, place
from skippipe.simulate import simulate

log = logging.getLogger(__name__)


@dataclass
class LiveState:
    """What the coordinator knows now: dead nodes, measured slowness (compute time factor) and the
    iteration's microbatch count (None: stage-0 nodes x ``microbatches_per_originator``; the planner
    fixes it at the start of a run, so nodes that join stage 0 share the same microbatches)."""

    dead: Set[str] = field(default_factory=set)
    slowdown: Dict[str, float] = field(default_factory=dict)
    microbatches: Optional[int] = None


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


def _advance(ps: _PathState, stage: int) -> _PathState:
    if stage > ps.highest:
        return _PathState(ps.stages + (stage,), stage, ps.swaps)
    return _PathState(ps.stages + (stage,), ps.highest, ps.swaps + 1)


# ------------------------------------------------------------------------------------------------
# TC1 capacity


class _Capacity:
    """Per-wave visit counts per stage and per node (TC1; module docstring)."""

    def __init__(self, live: List[List[str]], memory: int, wave_sizes: Dict[int, int], hops: int):
        self.memory = memory
        self.live = live
        self.hops = hops
        self.relax = 1
        self.stages = [k for k in range(1, len(live)) if live[k]]
        for wave_mbs in wave_sizes.values():
            while sum(min(len(live[k]) * memory * self.relax, wave_mbs) for k in self.stages) < wave_mbs * hops:
                self.relax += 1
        self.wave_left = dict(wave_sizes)  # microbatches of each wave not routed yet
        self.stage_count: Dict[Tuple[int, int], int] = {}
        self.node_count: Dict[Tuple[int, str], int] = {}
        self.overflows = 0

    def stage_cap(self, stage: int) -> int:
        return len(self.live[stage]) * self.memory * self.relax

    def node_cap(self) -> int:
        return self.memory * self.relax

    def stage_room(self, wave: int, stage: int) -> int:
        return self.stage_cap(stage) - self.stage_count.get((wave, stage), 0)

    def stage_ok(self, wave: int, stage: int) -> bool:
        return self.stage_room(wave, stage) > 0

    def node_ok(self, wave: int, node: str) -> bool:
        return self.node_count.get((wave, node), 0) < self.node_cap()

    def fits(self, wave: int, stages: Sequence[int], nodes: Sequence[str]) -> bool:
        """Every stage and node of a path has room (the path itself not yet added)."""
        return (all(self.stage_ok(wave, s) for s in stages) and all(self.node_ok(wave, n) for n in nodes))

    def feasible_after(self, wave: int, stages: Sequence[int]) -> bool:
        """Can the rest of the wave still be routed if one microbatch takes ``stages``?

        Each remaining microbatch needs ``hops`` distinct stages and stage k has ``room_k`` visits
        left; with equal demands the Gale-Ryser condition reduces to sum_k min(room_k, left) >=
        left * hops (the slack is concave in ``left``, so checking the full count suffices).
        """
        left = self.wave_left.get(wave, 0) - 1
        if left <= 0:
            return True
        chosen = set(stages)
        total = sum(min(self.stage_room(wave, s) - (s in chosen), left) for s in self.stages)
        return total >= left * self.hops

    def add(self, wave: int, stages: Sequence[int], nodes: Sequence[str]) -> None:
        for s, n in zip(stages, nodes):
            self.stage_count[(wave, s)] = self.stage_count.get((wave, s), 0) + 1
            self.node_count[(wave, n)] = self.node_count.get((wave, n), 0) + 1
        self.wave_left[wave] = self.wave_left.get(wave, 0) - 1

    def remove(self, wave: int, stages: Sequence[int], nodes: Sequence[str]) -> None:
        for s, n in zip(stages, nodes):
            self.stage_count[(wave, s)] -= 1
            self.node_count[(wave, n)] -= 1
        self.wave_left[wave] = self.wave_left.get(wave, 0) + 1


# ------------------------------------------------------------------------------------------------
# the routing problem


class _Problem:
    """Live nodes, microbatches, rules and cached costs of one routing call."""

    def __init__(self, live, originators, mbs, visited, rules, memory, slow, cost, stage_of):
        self.live: List[List[str]] = live  # live nodes per stage
        self.originators: List[str] = originators
        self.mbs: List[Tuple[int, str, int]] = mbs  # (id, originator, wave)
        self.visited = visited
        self.rules: PathRules = rules
        self.memory = memory
        self.slow: Dict[str, float] = slow
        self.cost = CachedCost(cost)  # thousands of simulations of one cost model: memoise lookups
        self.stage_of: Dict[str, int] = stage_of
        self.capacity: Optional[_Capacity] = None
        names = [n for nodes in live for n in nodes]
        self._index = {n: i for i, n in enumerate(names)}
        if hasattr(cost, "transfer_table_s"):
            self._tr = cost.transfer_table_s(names).tolist()
        else:
            self._tr = [[cost.transfer_s(a, b) for b in names] for a in names]
        self._compute: Dict[Tuple[str, int, str], float] = {}

    @property
    def live_stages(self) -> List[int]:
        return [k for k in range(1, len(self.live)) if self.live[k]]

    def transfer(self, a: str, b: str) -> float:
        return self._tr[self._index[a]][self._index[b]]

    def compute_s(self, node: str, stage: int, phase: str = "F") -> float:
        key = (node, stage, phase)
        value = self._compute.get(key)
        if value is None:
            value = self._compute[key] = self.cost.compute_s(node, stage, phase) * self.slow.get(node, 1.0)
        return value

    def static_cost(self, orig: str, nodes: Sequence[str]) -> float:
        """Collision-free time of one microbatch on ``nodes``: compute plus every link both ways."""
        total, prev = self.compute_s(orig, 0, "F") + self.compute_s(orig, 0, "L") + self.compute_s(orig, 0, "B"), orig
        for node in nodes:
            stage = self.stage_of[node]
            total += 2 * self.transfer(prev, node) + self.compute_s(node, stage, "F") + self.compute_s(node, stage, "B")
            prev = node
        return total + 2 * self.transfer(prev, orig)


def _microbatches(total: int, live_originators: List[str], memory: int, times: Optional[List[float]] = None):
    """(id, originator, wave) for the iteration's ``total`` microbatches.

    The count is fixed by the allocation (every stage-0 node x ``microbatches_per_originator``), not
    by how many originators are alive: after a failure the same ids are spread over the live
    originators, so each step trains the same microbatches as a run without the failure.

    The shares follow the originators' speed (``times``: each one's stage-0 time per microbatch, as
    measured or modelled): microbatch by microbatch, the next goes to the originator that would then
    finish its share first (``(count + 1) x time``, ties to the earlier one). So a 5x slower
    originator starts about a fifth as many, one slow enough starts none (its stage-0 replica still
    takes part in the stage's gradient reduction), and equal times give the even split. Ids stay
    originator-major (contiguous blocks); the wave is the position in an originator's block divided
    by ``memory``.
    """
    n = len(live_originators)
    if times is None or max(times) <= min(times) * (1 + 1e-9):
        counts = [(i + 1) * total // n - i * total // n for i in range(n)]
    else:
        counts = [0] * n
        for _ in range(total):
            best = min(range(n), key=lambda i: ((counts[i] + 1) * times[i], i))
            counts[best] += 1
    out, start = [], 0
    for orig, count in zip(live_originators, counts):
        out.extend((mb_id, orig, j // memory) for j, mb_id in enumerate(range(start, start + count)))
        start += count
    return out


def _originator_times(originators: List[str], cost, slow: Dict[str, float]) -> List[float]:
    """Each originator's stage-0 time per microbatch: forward, loss and backward."""
    return [sum(cost.compute_s(o, 0, phase) for phase in ("F", "L", "B")) * slow.get(o, 1.0) for o in originators]


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
    total = state.microbatches or len(allocation[0]) * cfg.schedule.microbatches_per_originator
    times = _originator_times(live[0], cost, state.slowdown)
    mbs = _microbatches(total, live[0], cfg.schedule.memory, times)
    rules = PathRules.from_config(cfg.schedule)
    stage_of = {n: k for k, nodes in enumerate(live) for n in nodes}
    return _Problem(live, list(live[0]), mbs, visited, rules, cfg.schedule.memory, dict(state.slowdown), cost, stage_of)


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


def full_pipelines(prob: _Problem) -> Dict[int, List[str]]:
    """DT-FM pipelines (the ``full`` baseline): microbatch id -> its aligned pipeline.

    Pipeline r is replica ``r mod replicas`` of every live stage (the allocation aligns them by
    successive matchings). Each originator first gets a home pipeline by a minimum-cost assignment
    on the first and closing links (originator -> first stage, last stage -> originator, where the
    loss is); then the microbatches are spread so that no pipeline carries more than
    ceil(M / pipelines) (as the reference's baseline sends the same number through each), a
    microbatch leaving its home pipeline only when the load requires it (a 1 s penalty per
    microbatch in the assignment). Without this a pipeline's closing link is never looked at and
    can be the 132 s NL-London link of the GCP table, and surplus originators overload a few
    pipelines: both would make ``full`` unfairly slow.
    """
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    stages = prob.live_stages
    mbs = sorted(prob.mbs)
    origs = prob.originators
    if not stages:
        return {mb_id: [] for mb_id, _, _ in mbs}
    count = max(len(prob.live[k]) for k in stages)
    pipes = [[prob.live[k][r % len(prob.live[k])] for k in stages] for r in range(count)]
    link = np.array([[prob.transfer(o, p[0]) + prob.transfer(p[-1], o) for p in pipes] for o in origs])
    per_orig = -(-len(origs) // count)
    rows, cols = linear_sum_assignment(np.repeat(link, per_orig, axis=1))
    home = {origs[i]: c // per_orig for i, c in zip(rows, cols)}
    per_pipe = -(-len(mbs) // count)
    index = {o: i for i, o in enumerate(origs)}
    slots = np.arange(count * per_pipe) // per_pipe
    cost = np.array([link[index[orig]][slots] + 1.0 * (slots != home[orig]) + 1e-6 * (np.arange(len(slots)) % per_pipe)
                     for _, orig, _ in mbs])
    rows, cols = linear_sum_assignment(cost)
    return {mbs[i][0]: list(pipes[slots[c]]) for i, c in zip(rows, cols)}


def _paths_full_skipping(prob: _Problem, balanced: bool) -> Optional[Dict[int, List[str]]]:
    """The DT-FM pipelines of ``full``, each with the stages it must skip dropped: a construction
    for ``skippipe`` that inherits the allocation's aligned, region-coherent pipelines.

    The dropped stages are spread evenly along the pipeline; ``balanced`` rotates them with the
    microbatch (so every stage loses the same share of visits), otherwise each microbatch takes the
    legal rotation with the cheapest static path. None when no rotation meets the path rules (the
    max_jump of a stage that died), then the other constructions decide.
    """
    stages = prob.live_stages
    drop = len(stages) - (prob.visited - 1)
    rules = _rules_for(prob)
    pipes = full_pipelines(prob)
    if drop <= 0:
        return pipes
    spaced = [round(i * len(stages) / drop) for i in range(drop)]
    legal = []
    for shift in range(len(stages)):
        dropped = {(shift + d) % len(stages) for d in spaced}
        keep = [i for i in range(len(stages)) if i not in dropped]
        if path_rule_violation([stages[i] for i in keep], len(prob.live), prob.visited, rules) is None:
            legal.append(keep)
    if not legal:
        return None
    paths = {}
    for index, (mb_id, orig, _) in enumerate(sorted(prob.mbs)):
        pipe = pipes[mb_id]
        if balanced:
            keep = legal[index % len(legal)]
        else:
            keep = min(legal, key=lambda k: prob.static_cost(orig, [pipe[i] for i in k]))
        paths[mb_id] = [pipe[i] for i in keep]
    return paths


def _paths_full(prob: _Problem, rng: random.Random) -> Dict[int, List[str]]:
    return full_pipelines(prob)


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
    room = {s: cap.stage_room(wave, s) for s in stages}
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


def _beam_path(prob: _Problem, cap: Optional[_Capacity], rules: PathRules, orig: str, wave: int,
               start_time: float, hop_time, width: int, replicas: int,
               stages: Optional[List[int]] = None) -> List[Tuple[float, _PathState, List[str]]]:
    """Beam search over (stage, replica) hops; ``hop_time(prev, node, stage, t) -> finish time``.

    A partial path is scored by its finish time plus the link from its last node back to the
    originator (the loop must close there); the ``replicas`` candidates of a stage are those
    nearest to the previous node and the originator. Returns complete paths as
    (finish time + return link, path state, nodes), best first. With ``cap`` only nodes with TC1
    room are used (all of a stage's nodes if none has room).
    """
    beam = [(start_time, _PathState((), 0, 0), [orig])]
    if stages is None:
        stages = _stages_with_room(prob, cap, wave, rules) if cap is not None else prob.live_stages
    tr = prob.transfer
    need_total = prob.visited - 1
    for depth in range(need_total):
        need = need_total - depth
        children = []
        for t, ps, nodes in beam:
            prev = nodes[-1]
            for stage in _next_stages(ps, stages, need, rules):
                cands = prob.live[stage]
                if cap is not None:
                    cands = [n for n in cands if cap.node_ok(wave, n)] or cands
                if len(cands) > replicas:
                    cands = sorted(cands, key=lambda n: (tr(prev, n) + tr(n, orig), n))[:replicas]
                nxt = _advance(ps, stage)
                for node in cands:
                    finish = hop_time(prev, node, stage, t)
                    children.append((finish + tr(node, orig), finish, nxt, nodes + [node]))
        children.sort(key=lambda c: (c[0], c[3]))
        beam = [(finish, ps, nodes) for _, finish, ps, nodes in children[:width]]
    out = [(t + tr(nodes[-1], orig), ps, nodes[1:]) for t, ps, nodes in beam]
    out.sort(key=lambda c: (c[0], c[2]))
    return out


def _feasible(cap: _Capacity, wave: int, ps: _PathState, nodes: Sequence[str]) -> bool:
    return cap.fits(wave, ps.stages, nodes) and cap.feasible_after(wave, ps.stages)


def _fallback_path(prob: _Problem, cap: _Capacity, rules: PathRules, orig: str, wave: int) -> Tuple[List[int], List[str]]:
    """A path that keeps the wave feasible: the stages with most room, ascending, nearest replicas."""
    live_stages = prob.live_stages
    near = {s: min(prob.transfer(orig, n) for n in prob.live[s]) for s in live_stages}
    by_room = sorted(live_stages, key=lambda s: (-cap.stage_room(wave, s), near[s], s))
    stages = sorted(by_room[:prob.visited - 1])
    if path_rule_violation(stages, len(prob.live), prob.visited, rules) is not None or \
            not cap.feasible_after(wave, stages) or not all(cap.stage_ok(wave, s) for s in stages):
        cap.overflows += 1
        ps = _PathState((), 0, 0)
        while len(ps.stages) < prob.visited - 1:
            options = _next_stages(ps, live_stages, prob.visited - 1 - len(ps.stages), rules)
            ps = _advance(ps, max(options, key=lambda s: (cap.stage_room(wave, s), -near[s], -s)))
        stages = list(ps.stages)
    nodes, prev = [], orig
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        free = [n for n in prob.live[stage] if cap.node_ok(wave, n)]
        if not free:
            cap.overflows += 1
        node = min(free or prob.live[stage],
                   key=lambda n: (prob.transfer(prev, n) + (prob.transfer(n, orig) if last else 0.0), n))
        nodes.append(node)
        prev = node
    return stages, nodes


def _paths_nc(prob: _Problem, rng: random.Random, static_iterations: Optional[int] = None) -> Dict[int, List[str]]:
    """Cheapest static paths (link + compute), load spread by TC1 counts; blind to collisions.

    Greedy insertion, then a local search on static path times (worst path, then their sum), as
    the reference's collision-blind CBS minimises its agents' static finish times.
    """
    if static_iterations is None:
        static_iterations = search_effort(prob)["static"]
    cap, rules = _capacity(prob), _rules_for(prob)

    load: Dict[str, int] = {}

    def hop_time(prev, node, stage, t):
        # static cost of the hop (forward + backward compute, link), spread by the load so far
        return t + prob.transfer(prev, node) + 2.5 * prob.compute_s(node, stage) * (1 + load.get(node, 0))

    paths: Dict[int, List[str]] = {}
    for mb_id, orig, wave in _insertion_order(prob, rng, 0):
        chosen = None
        for _, ps, nodes in _beam_path(prob, cap, rules, orig, wave, 0.0, hop_time, width=8, replicas=8):
            if _feasible(cap, wave, ps, nodes):
                chosen = (list(ps.stages), nodes)
                break
        stages, nodes = chosen or _fallback_path(prob, cap, rules, orig, wave)
        cap.add(wave, stages, nodes)
        for node in nodes:
            load[node] = load.get(node, 0) + 1
        paths[mb_id] = nodes
    if static_iterations:
        # repair: greedy insertion under exact TC1 can leave the last microbatches of a wave only
        # far-away replicas; exchanges between microbatches (collision blind: static path times)
        from skippipe.schedule.search import improve

        result = improve(prob, paths, {}, random.Random(f"nc:{len(prob.mbs)}"), static_iterations, float("inf"),
                         None, simulated=False, pool_width=search_effort(prob)["pool"])
        log.debug("skippipe_nc static search: %s after %d evaluations (%d accepted)", result.key,
                  result.iterations, result.accepted)
        paths = result.paths
        prob.capacity = result.capacity
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
        ready = t + prob.transfer(prev, node)
        dur = prob.compute_s(node, stage)
        return res.earliest_fit(node, ready, dur) + dur

    for mb_id, orig, wave in order:
        t0 = ready_at.get(orig, 0.0)
        f0 = prob.compute_s(orig, 0)
        first_end = res.earliest_fit(orig, t0, f0) + f0
        cands = [(list(ps.stages), nodes)
                 for _, ps, nodes in _beam_path(prob, cap, rules, orig, wave, first_end, hop_time, width, replicas)
                 if _feasible(cap, wave, ps, nodes)]
        if not cands:
            cands = [_fallback_path(prob, cap, rules, orig, wave)]
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


# ------------------------------------------------------------------------------------------------
# skippipe: construction + local search


def search_effort(prob: _Problem) -> Dict[str, float]:
    """Fixed search effort (attempt counts) for a problem, from its size only (never from time).

    ``actions`` (simulated actions per plan) sets the cost of one simulator call; the number of
    simulator calls shrinks with it so that planning time grows roughly linearly with the problem,
    and small problems (few microbatches, small search space) get proportionally fewer.
    """
    actions = len(prob.mbs) * (2 * prob.visited + 1)
    small = actions < 1200
    return {
        "width": 8 if small else 4,
        "replicas": 6 if small else 4,
        "constructions": 4 if small else 2,
        "iterations": int(min(2500, 80 * len(prob.mbs), max(120, 1_500_000 // max(1, actions)))),
        "static": int(min(4000, 140 * len(prob.mbs))),
        "pool": 24 if small else 8,
        "anneal": 0.0,
        "restarts": 4 if small else 1,
        "restart_share": 0.5,
    }


def _route_skippipe(prob: _Problem, rng: random.Random, num_stages: int, budget_s: float) -> Plan:
    """Collision-aware routing (TC2): greedy constructions, then a simulator-scored local search.

    Constructions: greedy insertion on the reservation table with a few insertion orders and
    weights, the collision-blind cost-aware paths (``skippipe_nc``), and the DT-FM pipelines of
    ``full`` with the skipped stages dropped (at scale, where TC1 pushes the greedy paths onto far
    replicas, these region-coherent pipelines are the better start). The best of them under the
    simulator (readiness order) seeds the local search (``schedule.search.improve``). The result
    is never slower than any construction, the ``skippipe_nc`` paths included.
    """
    from skippipe.schedule.search import improve

    deadline = time.perf_counter() + budget_s
    effort = search_effort(prob)
    weights = (0.0, 0.05, 0.15, 0.3)
    candidates = []  # (makespan, index, paths, starts, node_order or None, tag)
    capped = False

    def build(paths, starts):
        return _make(prob, "skippipe", num_stages, paths, starts)

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
        order = _insertion_order(prob, rng, 0 if attempt < len(weights) else 1 + attempt)
        paths, starts, res = _place_collision_aware(prob, rng, order, int(effort["width"]), int(effort["replicas"]),
                                                    weights[attempt % len(weights)])
        consider(paths, starts, tag=f"greedy{attempt}")
        consider(paths, starts, _order_of(res.actions), tag=f"greedy{attempt}-reserved")
    nc_paths = _paths_nc(prob, random.Random(0))
    consider(nc_paths, {}, tag="nc")
    for balanced in (True, False):  # the full pipelines with skips: never worse than DT-FM's paths
        full_skip = _paths_full_skipping(prob, balanced)
        if full_skip is not None:
            consider(full_skip, {}, tag=f"full-skip{'-balanced' if balanced else ''}")
    log.debug("skippipe constructions: %s", [(c[5], round(c[0], 2)) for c in candidates])
    readiness = [c for c in candidates if c[4] is None]
    seed = min(readiness or candidates, key=lambda c: (c[0], c[1]))
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
    best_plan, best_tl = result.payload
    reserved = [c for c in candidates if c[4] is not None]
    if reserved:  # a reservation order can beat readiness order on the same paths
        makespan, _, paths, starts, order, _ = min(reserved, key=lambda c: (c[0], c[1]))
        if makespan < best_tl.makespan_s - 1e-9:
            best_plan = build(paths, starts)
            best_plan.node_order = order
            best_tl = simulate(best_plan, prob.cost, prob.memory, prob.slow)
    plan = best_plan
    if not plan.node_order:
        plan.node_order = best_tl.order()
    plan.predicted_makespan_s = best_tl.makespan_s
    prob.capacity = result.capacity
    cap = result.capacity  # the counts of the local search's best paths: report real excesses
    excess = (sum(1 for (_, s), c in cap.stage_count.items() if c > cap.stage_cap(s)) +
              sum(1 for c in cap.node_count.values() if c > cap.node_cap()))
    plan.extra.update(tc1_relax=cap.relax, tc1_overflows=excess,
                      collisions=best_tl.collisions, mean_idle_fraction=best_tl.mean_idle_fraction(),
                      search_constructions=len(candidates), search_evaluations=evaluations,
                      search_accepted=accepted, search_seed_s=seed[0], search_capped=capped)
    if capped:
        log.warning("skippipe routing hit schedule.search_budget_s=%.1f s: the plan depends on machine speed",
                    budget_s)
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
