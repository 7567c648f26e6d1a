"""A lower bound on the iteration time of a routing problem, computed without search.

The physical limit the planner is measured against (``skippipe plan`` prints each method's gap to
it). It holds for every allocation with the given stage sizes and every plan that obeys the path
rules, as the simulator (:mod:`skippipe.simulate`) times them, so it is a true bound: the tests
check it against exhaustive search on small problems. Three relaxations, the largest wins:

1. **Originators** (memory and stage-0 compute). A microbatch holds a memory slot of its
   originator ``o`` from its first forward to its last backward, at least ``cycle(o)``: the
   cheapest closed walk from ``o`` over ``L - 1`` other nodes, with every compute (F + B on each
   node, F + L + B on ``o``) and every link both ways. With ``m`` slots, ``o`` finishes ``k``
   microbatches no sooner than ``ceil(k / m) * cycle(o)``, nor sooner than ``k`` times its stage-0
   work. The ``n0`` stage-0 nodes must finish all ``M``: the bound is the least ``T`` at which the
   ``n0`` most capable nodes can.
2. **Visits of the other stages.** ``M (L - 1)`` visits each need F + B on a non-zero node and hold
   one of its ``m`` slots for at least F + B, a link out and back and the originator's loss; no
   visit can start before a microbatch can arrive (a stage-0 forward and a link) nor end later
   than a link and a stage-0 backward before the end. The ``N - n0`` most capable nodes must hold
   them all.
3. **Gradient reduction** (with ``cost.grad_sync``): stage 0's ring all-reduce starts after the
   last stage-0 backward (bound 1 plus the all-reduce over the best links a group that size can
   have); at least ``L - 1`` other stages are visited, and each all-reduces after its last visit.
   Jointly: the stages' groups are disjoint, so not all of them can sit on the fastest links; a
   packing of region cliques bounds the slowest group's link (:mod:`skippipe.schedule.cliques`).

Walks may revisit nodes (a relaxation of distinct stages), and which nodes hold stage 0 is left
free, so the bound also holds across allocations. Links carry no contention in the simulator
(a transfer is a delay), so a bound on the volume crossing a network cut would not be a bound on
its times and is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

_EPS = 1e-9


@dataclass(frozen=True)
class Bound:
    """The bound (``lower_bound_s``) and the relaxation values it is the maximum of."""

    lower_bound_s: float
    originators_s: float
    visits_s: float
    grad_sync_s: float
    best_cycle_s: float

    def to_dict(self) -> Dict[str, float]:
        return {"lower_bound_s": self.lower_bound_s, "originators_s": self.originators_s,
                "visits_s": self.visits_s, "grad_sync_s": self.grad_sync_s, "best_cycle_s": self.best_cycle_s}


def lower_bound(cost, nodes: Sequence[str], num_stages: int, stage0_nodes: int, stages_visited: int,
                microbatches: int, memory: int, slowdown: Optional[Dict[str, float]] = None,
                stage_sizes: Optional[Sequence[int]] = None) -> Bound:
    """Lower bound on the simulated iteration time (module docstring) of ``microbatches`` over
    ``nodes`` (the live ones), ``stage0_nodes`` of which hold stage 0 (``stage_sizes``: the
    replicas of every stage, for the other stages' all-reduce)."""
    slow = slowdown or {}
    names = list(nodes)
    n = len(names)
    if microbatches <= 0 or n == 0:
        return Bound(0.0, 0.0, 0.0, 0.0, 0.0)
    speed = np.array([slow.get(v, 1.0) for v in names])
    w0 = np.array([sum(cost.compute_s(v, 0, ph) for ph in ("F", "L", "B")) for v in names]) * speed
    f0 = np.array([cost.compute_s(v, 0, "F") for v in names]) * speed
    b0 = np.array([cost.compute_s(v, 0, "B") for v in names]) * speed
    loss = np.array([cost.compute_s(v, 0, "L") for v in names]) * speed
    if num_stages > 1:
        wk = np.array([min(cost.compute_s(v, k, "F") + cost.compute_s(v, k, "B") for k in range(1, num_stages))
                       for v in names]) * speed
    else:
        wk = np.zeros(n)
    one_way = np.array([[cost.transfer_s(a, b) if a != b else np.inf for b in names] for a in names])
    both = one_way + one_way.T
    hops = stages_visited - 1
    cycles = np.array([_cycle(o, w0, wk, both, hops) for o in range(n)])
    originators_s = _capacity_bound(
        [(memory, cycles[o], w0[o]) for o in range(n)], min(stage0_nodes, n), microbatches)
    visits_s = 0.0
    if hops > 0 and n > stage0_nodes:
        out_min = np.min(one_way, axis=1)
        in_min = np.min(one_way, axis=0)
        hold = wk + out_min + in_min + float(np.min(loss))
        head = float(np.min(f0)) + in_min
        tail = out_min + float(np.min(b0))
        visits_s = _capacity_bound([(memory, hold[v], wk[v], head[v] + tail[v]) for v in range(n)],
                                   n - stage0_nodes, microbatches * hops)
    grad_sync_s = 0.0
    if getattr(cost, "grad_sync", False) and n > 1:
        from skippipe.schedule.cliques import RegionView

        view = RegionView(cost.topology, names)
        if stage0_nodes > 1:
            grad_sync_s = originators_s + _allreduce_floor(cost, view, stage0_nodes, 0)
        if hops > 0 and stage_sizes and len(stage_sizes) == num_stages:
            # at least L - 1 distinct other stages are visited, each all-reduces after a visit ends
            # there (at the earliest: stage-0 forward, a link, F, links out and back, loss, B)
            floors = sorted(_allreduce_floor(cost, view, stage_sizes[k], k) if stage_sizes[k] > 1 else 0.0
                            for k in range(1, num_stages))
            link = float(np.min(one_way))
            first_end = float(np.min(f0)) + 3 * link + float(np.min(wk)) + float(np.min(loss))
            grad_sync_s = max(grad_sync_s, first_end + floors[hops - 1] if hops <= len(floors) else 0.0)
            grad_sync_s = max(grad_sync_s, _joint_allreduce(cost, view, stage_sizes, hops, originators_s, first_end))
    best = max(originators_s, visits_s, grad_sync_s)
    return Bound(best, originators_s, visits_s, grad_sync_s, float(np.min(cycles)))


def _cycle(o: int, w0: np.ndarray, wk: np.ndarray, both: np.ndarray, hops: int) -> float:
    """Cheapest closed walk from ``o`` through ``hops`` nodes other than ``o`` (consecutive nodes
    distinct), with every node's compute and every link both ways."""
    if hops <= 0:
        return float(w0[o])
    reach = both[o] + wk  # reach[v]: cheapest walk o -> ... -> v, computes included
    reach[o] = np.inf
    for _ in range(hops - 1):
        step = reach[:, None] + both  # from u to v
        reach = np.min(step, axis=0) + wk
        reach[o] = np.inf
    return float(w0[o] + np.min(reach + both[:, o]))


def _capacity_bound(servers: List[tuple], count: int, demand: int) -> float:
    """Least T at which the ``count`` most capable servers finish ``demand`` jobs.

    A server (slots, hold_s, work_s[, dead_s]) finishes at most ``min(slots * floor(T' / hold_s),
    floor(T' / work_s))`` jobs by T, with ``T' = T - dead_s`` (time in which it cannot finish
    any). The count is a step function of T, so the least T is one of its steps.
    """
    if demand <= 0 or count <= 0:
        return 0.0
    candidates = set()
    for server in servers:
        slots, hold, work = server[:3]
        dead = server[3] if len(server) > 3 else 0.0
        for j in range(1, math.ceil(demand / slots) + 1):
            candidates.add(dead + j * hold)
        for j in range(1, demand + 1):
            candidates.add(dead + j * work)
    values = sorted(c for c in candidates if math.isfinite(c))

    def done_by(t: float) -> int:
        caps = []
        for server in servers:
            slots, hold, work = server[:3]
            span = t - (server[3] if len(server) > 3 else 0.0) + _EPS
            caps.append(0 if span <= 0 else min(slots * math.floor(span / hold), math.floor(span / work)))
        caps.sort(reverse=True)
        return sum(caps[:count])

    lo, hi = 0, len(values) - 1
    if not values or done_by(values[hi]) < demand:
        return values[-1] if values else 0.0
    while lo < hi:
        mid = (lo + hi) // 2
        if done_by(values[mid]) >= demand:
            hi = mid
        else:
            lo = mid + 1
    return float(values[lo])


def _allreduce_floor(cost, view, replicas: int, stage: int = 0) -> float:
    """The ring all-reduce of ``stage`` (``CostModel.allreduce_s``: volume over the slowest link of
    the group, plus latency over the worst) for the best group of ``replicas`` nodes anywhere.

    A group spans a set of regions; its slowest link is at most the slowest link between two of
    those regions (or the region's own link when it is one region), and its worst latency at
    least the worst between two of them. Over every region set with enough nodes
    (:meth:`cliques.RegionView.best_group`), the best of each is a bound; with more regions than
    can be enumerated, the fastest link and the least latency anywhere.
    """
    if view.usable():
        best_bw, least_lat = view.best_group(replicas)
    else:
        names, topo = view.names, cost.topology
        best_bw = max(topo.bandwidth_bytes_per_s(a, b) for a in names for b in names if a != b)
        least_lat = min(topo.latency_s(a, b) for a in names for b in names if a != b)
    volume = 2.0 * (replicas - 1) / replicas * cost.stage_param_bytes(stage)
    return volume / best_bw + 2 * (replicas - 1) * (least_lat + cost.message_overhead_s)


def _joint_allreduce(cost, view, sizes: Sequence[int], hops: int, stage0_start: float,
                     other_start: float) -> float:
    """Gradient reduction of the stages together: their groups are disjoint, so they cannot all
    have the best links (:func:`cliques.packing_threshold`). For every set ``V`` of ``hops``
    other stages that a plan could visit alone, the slowest link of the slowest group of stage 0
    and ``V`` is at most the packing threshold ``B`` of their sizes, and that group's all-reduce
    starts no sooner than its stage's first possible end of work: the least over those stages of
    start + volume / ``B`` + the latency floor, and the least over ``V``, is a bound."""
    import itertools

    from skippipe.schedule.cliques import packing_threshold

    if not view.usable():
        return 0.0
    names, topo = view.names, cost.topology
    least_lat = min(topo.latency_s(a, b) for a in names for b in names if a != b)
    cache: Dict[tuple, Optional[float]] = {}
    best = float("inf")
    for visited in itertools.combinations(range(1, len(sizes)), hops):
        stages = [k for k in (0, *visited) if sizes[k] > 1]
        if not stages:
            return 0.0
        key = tuple(sorted(sizes[k] for k in stages))
        if key not in cache:
            cache[key] = packing_threshold(view, key)
        threshold = cache[key]
        if threshold is None or not math.isfinite(threshold):
            return 0.0
        value = min((stage0_start if k == 0 else other_start)
                    + 2.0 * (sizes[k] - 1) / sizes[k] * cost.stage_param_bytes(k) / threshold
                    + 2 * (sizes[k] - 1) * (least_lat + cost.message_overhead_s) for k in stages)
        best = min(best, value)
    return 0.0 if not math.isfinite(best) else best


def config_bound(params, topology, cost, dead: Sequence[str] = (), slowdown: Optional[Dict[str, float]] = None) -> Bound:
    """The bound of a problem (``params``: a SchedulerParams or a Config): its live nodes, stage
    sizes, skip ratio, microbatches and memory."""
    from skippipe.schedule.allocate import partition_sizes
    from skippipe.schedule.params import as_params

    params = as_params(params)
    names = topology.names()
    sizes = partition_sizes(params, len(names))
    live = [n for n in names if n not in set(dead)]
    microbatches = sizes[0] * params.microbatches_per_originator
    return lower_bound(cost, live, len(sizes), sizes[0], params.stages_visited(len(sizes)), microbatches,
                       params.memory, slowdown, stage_sizes=sizes)
