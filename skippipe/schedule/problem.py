"""One routing problem: live nodes, the iteration's microbatches, rules, cached costs; and the
search primitives every method shares (beam search over hops, fallback paths).

Beam searches score a partial path by its finish time plus the link back to the originator: a path
is a loop, and without that term a greedy path can end next to a node whose return link is very
slow (the NL-London link of the GCP table takes 132 s), which is what made ``skippipe`` and
``skippipe_nc`` slower than ``full`` at 200 nodes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from skippipe.cost import CachedCost
from skippipe.errors import PlanError
from skippipe.plan import PathRules, path_rule_violation
from skippipe.schedule.params import SchedulerParams
from skippipe.schedule.space import Capacity, PathState, advance, completable, next_stages


@dataclass
class LiveState:
    """What the coordinator knows now: dead nodes, measured slowness (compute time factor) and the
    iteration's microbatch count (None: stage-0 nodes x ``microbatches_per_originator``; the planner
    fixes it at the start of a run, so nodes that join stage 0 share the same microbatches)."""

    dead: Set[str] = field(default_factory=set)
    slowdown: Dict[str, float] = field(default_factory=dict)
    microbatches: Optional[int] = None
    probe_links: Set[Tuple[str, str]] = field(default_factory=set)  # links a plan must cross (schedule.probe)
    probe_nodes: Set[str] = field(default_factory=set)  # nodes a microbatch must visit (schedule.probe)


class Problem:
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
        self.capacity: Optional[Capacity] = None
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


def microbatch_shares(total: int, live_originators: List[str], memory: int, times: Optional[List[float]] = None,
                      counts: Optional[Sequence[int]] = None):
    """(id, originator, wave) for the iteration's ``total`` microbatches.

    The count is fixed by the allocation (every stage-0 node x ``microbatches_per_originator``), not
    by how many originators are alive: after a failure the same ids are spread over the live
    originators, so each step trains the same microbatches as a run without the failure.

    ``counts``: how many each originator starts; without them, :func:`share_counts` of ``times``.
    Ids stay originator-major (contiguous blocks); the wave is the position in an originator's
    block divided by ``memory``.
    """
    counts = list(counts) if counts is not None else share_counts(total, len(live_originators), times)
    out, start = [], 0
    for orig, count in zip(live_originators, counts):
        out.extend((mb_id, orig, j // memory) for j, mb_id in enumerate(range(start, start + count)))
        start += count
    return out


def share_counts(total: int, n: int, times: Optional[List[float]] = None) -> Tuple[int, ...]:
    """Microbatches per originator, following the originators' speed (``times``: each one's stage-0
    time per microbatch, as measured or modelled): microbatch by microbatch, the next goes to the
    originator that would then finish its share first (``(count + 1) x time``, ties to the earlier
    one). So a 5x slower originator starts about a fifth as many, one slow enough starts none (its
    stage-0 replica still takes part in the stage's gradient reduction), and equal times give the
    even split."""
    if times is None or max(times) <= min(times) * (1 + 1e-9):
        return tuple((i + 1) * total // n - i * total // n for i in range(n))
    counts = [0] * n
    for _ in range(total):
        best = min(range(n), key=lambda i: ((counts[i] + 1) * times[i], i))
        counts[best] += 1
    return tuple(counts)


def share_options(prob: "Problem", incumbents: Sequence = ()) -> List[Tuple[int, ...]]:
    """The shares a ``skippipe`` plan is routed with, best first by assumption: the speed-following
    ones the problem was built with, the even split, and those of ``incumbents`` (earlier plans
    with the same live originators). Stage-0 time alone does not say which is faster: an
    originator also runs every loss and backward of its share at the end of their paths, and
    measured times that are near a tie flip the greedy split (the hetero benchmark's
    re-plan moved a microbatch to the originator that then ran 25% slower)."""
    origs, total = prob.originators, len(prob.mbs)
    options = [tuple(sum(1 for _, o, _ in prob.mbs if o == orig) for orig in origs),
               share_counts(total, len(origs))]
    for plan in incumbents:
        mine = [mb.originator for mb in plan.microbatches]
        if len(mine) == total and set(mine) <= set(origs):
            options.append(tuple(mine.count(o) for o in origs))
    return list(dict.fromkeys(options))


def originator_times(originators: List[str], cost, slow: Dict[str, float]) -> List[float]:
    """Each originator's stage-0 time per microbatch: forward, loss and backward."""
    return [sum(cost.compute_s(o, 0, phase) for phase in ("F", "L", "B")) * slow.get(o, 1.0) for o in originators]


def build_problem(allocation, cost, params: SchedulerParams, state: LiveState, method: str,
                  counts: Optional[Sequence[int]] = None) -> Problem:
    """The problem of one routing call; ``counts``: microbatches per live originator (default:
    :func:`share_counts` of the originators' measured or modelled speed)."""
    dead = set(state.dead)
    live = [[n for n in nodes if n not in dead] for nodes in allocation]
    if not live[0]:
        raise PlanError("every stage-0 node is dead: no originator can start a microbatch")
    num_stages = len(allocation)
    live_nonzero = sum(1 for k in range(1, num_stages) if live[k])
    if method == "full":
        visited = 1 + live_nonzero
    else:
        visited = min(params.stages_visited(num_stages), 1 + live_nonzero)
    total = state.microbatches or len(allocation[0]) * params.microbatches_per_originator
    times = originator_times(live[0], cost, state.slowdown)
    mbs = microbatch_shares(total, live[0], params.memory, times, counts)
    rules = params.rules
    stage_of = {n: k for k, nodes in enumerate(live) for n in nodes}
    return Problem(live, list(live[0]), mbs, visited, rules, params.memory, dict(state.slowdown), cost, stage_of)


def capacity_for(prob: Problem) -> Capacity:
    cap = Capacity(prob.live, prob.memory, wave_sizes(prob), prob.visited - 1)
    prob.capacity = cap
    return cap


def wave_sizes(prob: Problem) -> Dict[int, int]:
    waves: Dict[int, int] = {}
    for _, _, wave in prob.mbs:
        waves[wave] = waves.get(wave, 0) + 1
    return waves


def rules_for(prob: Problem) -> PathRules:
    """The path rules, with max_jump widened only if dead stages leave no legal ascending path."""
    rules = prob.rules
    probe = PathState((), 0, 0)
    if completable(probe, prob.live_stages, prob.visited - 1, rules):
        return rules
    return PathRules(rules.max_swaps, rules.max_swap_distance, len(prob.live))


def stages_with_room(prob: Problem, cap: Capacity, wave: int, rules: PathRules) -> List[int]:
    """Live stages with TC1 room in this wave, or all live stages when they cannot hold a path."""
    room = [s for s in prob.live_stages if cap.stage_ok(wave, s) and any(cap.node_ok(wave, n) for n in prob.live[s])]
    if completable(PathState((), 0, 0), room, prob.visited - 1, rules):
        return room
    cap.overflows += 1
    return prob.live_stages


def beam_path(prob: Problem, cap: Optional[Capacity], rules: PathRules, orig: str, wave: int,
               start_time: float, hop_time, width: int, replicas: int,
               stages: Optional[List[int]] = None) -> List[Tuple[float, PathState, List[str]]]:
    """Beam search over (stage, replica) hops; ``hop_time(prev, node, stage, t) -> finish time``.

    A partial path is scored by its finish time plus the link from its last node back to the
    originator (the loop must close there); the ``replicas`` candidates of a stage are those
    nearest to the previous node and the originator. Returns complete paths as
    (finish time + return link, path state, nodes), best first. With ``cap`` only nodes with TC1
    room are used (all of a stage's nodes if none has room).
    """
    beam = [(start_time, PathState((), 0, 0), [orig])]
    if stages is None:
        stages = stages_with_room(prob, cap, wave, rules) if cap is not None else prob.live_stages
    tr = prob.transfer
    need_total = prob.visited - 1
    for depth in range(need_total):
        need = need_total - depth
        children = []
        for t, ps, nodes in beam:
            prev = nodes[-1]
            for stage in next_stages(ps, stages, need, rules):
                cands = prob.live[stage]
                if cap is not None:
                    cands = [n for n in cands if cap.node_ok(wave, n)] or cands
                if len(cands) > replicas:
                    cands = sorted(cands, key=lambda n: (tr(prev, n) + tr(n, orig), n))[:replicas]
                nxt = advance(ps, stage)
                for node in cands:
                    finish = hop_time(prev, node, stage, t)
                    children.append((finish + tr(node, orig), finish, nxt, nodes + [node]))
        children.sort(key=lambda c: (c[0], c[3]))
        beam = [(finish, ps, nodes) for _, finish, ps, nodes in children[:width]]
    out = [(t + tr(nodes[-1], orig), ps, nodes[1:]) for t, ps, nodes in beam]
    out.sort(key=lambda c: (c[0], c[2]))
    return out


def feasible(cap: Capacity, wave: int, ps: PathState, nodes: Sequence[str]) -> bool:
    return cap.fits(wave, ps.stages, nodes) and cap.feasible_after(wave, ps.stages)


def fallback_path(prob: Problem, cap: Capacity, rules: PathRules, orig: str, wave: int) -> Tuple[List[int], List[str]]:
    """A path that keeps the wave feasible: the stages with most room, ascending, nearest replicas."""
    live_stages = prob.live_stages
    near = {s: min(prob.transfer(orig, n) for n in prob.live[s]) for s in live_stages}
    by_room = sorted(live_stages, key=lambda s: (-cap.stage_room(wave, s), near[s], s))
    stages = sorted(by_room[:prob.visited - 1])
    if path_rule_violation(stages, len(prob.live), prob.visited, rules) is not None or \
            not cap.feasible_after(wave, stages) or not all(cap.stage_ok(wave, s) for s in stages):
        cap.overflows += 1
        ps = PathState((), 0, 0)
        while len(ps.stages) < prob.visited - 1:
            options = next_stages(ps, live_stages, prob.visited - 1 - len(ps.stages), rules)
            ps = advance(ps, max(options, key=lambda s: (cap.stage_room(wave, s), -near[s], -s)))
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


def insertion_order(prob: Problem, rng: random.Random, shuffle_level: int):
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


def search_effort(prob: Problem, scale: float = 1.0) -> Dict[str, float]:
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
        "iterations": int(scale * min(2500, 80 * len(prob.mbs), max(120, 1_500_000 // max(1, actions)))),
        "static": int(min(4000, 140 * len(prob.mbs))),
        "pool": 24 if small else 8,
        "anneal": 0.0,
        "restarts": 4 if small else 1,
        "restart_share": 0.5,
    }
