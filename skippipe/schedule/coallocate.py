"""Allocation judged by the plan it enables (SkipPipe arXiv 2502.19913 section 4; issue 13).

DT-FM's objective (``allocate``) keeps each stage's replicas close together (its ``dp_cost``) and
the stage groups in a cheap tour: right for full pipelines, wrong for partial ones. A SkipPipe
microbatch visits only ``L - 1`` of the other stages, so what makes an iteration short is that
every originator finds ``L - 1`` *different* stages near it: each region should hold a mix of
stages, not one stage. This module searches allocations for that, scoring each candidate by the
iteration time of a plan routed on it:

1. **Candidates.** The DT-FM allocation, and *locality labellings*: the nodes in a locality order
   (a nearest-neighbour chain over the link times, from several seeded starts, and one region by
   region) get their stages from a weighted round robin (stage k appears ``size_k`` times, evenly
   spread), so any run of consecutive, nearby nodes holds distinct stages and stage 0 is spread
   over the regions. With gradient all-reduce in the cost, also the *compact* allocation
   (:func:`cliques.compact_groups`): each stage inside a clique of fast links, since a stage spread
   over the regions all-reduces over its slowest link. It is always among the finalists of step 4
   (the proxy, built for the pipeline, misjudges it).
2. **Proxy score.** The shorter of two constructions: one greedy collision-aware insertion
   (``collide.place_collision_aware``, narrow beam) on the reservation table, and dedicated paths
   (``collide.paths_dedicated``, one cycle per originator, simulated); milliseconds each.
3. **Local search** on the best candidate: swaps of two nodes' stages (among a node's nearest
   nodes, so that a region's mix changes) and rotations of the stages of one whole region, kept
   when the proxy improves. The number of proxy evaluations is fixed by the problem size.
4. The few best by proxy are routed with the full search by the caller; the shortest plan wins.

Deterministic in (topology, cost model, config, seed); no clocks decide anything.
"""

from __future__ import annotations

import logging
import random
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from skippipe.errors import PlanError
from skippipe.schedule.allocate import align, allocate, memory_misfit, partition_sizes
from skippipe.schedule.assemble import assemble
from skippipe.schedule.cliques import RegionView, compact_groups
from skippipe.schedule.collide import paths_dedicated, place_collision_aware
from skippipe.schedule.params import as_params
from skippipe.schedule.problem import LiveState, build_problem, insertion_order
from skippipe.simulate import simulate

log = logging.getLogger(__name__)

Allocation = List[List[str]]
_RANK_EFFORT = 0.3  # share of the routing search spent on ranking each finalist allocation


def round_robin_labels(sizes: Sequence[int], count: int, offset: int = 0) -> List[int]:
    """A label sequence of length ``count`` where stage k appears ``sizes[k]`` times, evenly spread.

    Occurrence j of stage k sits at (j + 0.5) * count / sizes[k]; sorted by that position (ties by
    stage), rotated by ``offset``.
    """
    slots = sorted(((j + 0.5) * count / size, k) for k, size in enumerate(sizes) for j in range(size))
    labels = [k for _, k in slots]
    offset %= max(1, count)
    return labels[offset:] + labels[:offset]


def locality_order(link_s: np.ndarray, start: int) -> List[int]:
    """Nodes as a nearest-neighbour chain over the link times, from ``start``."""
    n = len(link_s)
    seen = np.zeros(n, dtype=bool)
    order, cur = [start], start
    seen[start] = True
    for _ in range(n - 1):
        row = np.where(seen, np.inf, link_s[cur])
        cur = int(np.argmin(row))
        seen[cur] = True
        order.append(cur)
    return order


def region_order(topology, link_s: np.ndarray, speeds: np.ndarray) -> List[int]:
    """Nodes region by region (regions in a nearest-neighbour chain), fastest first in a region."""
    regions = [n.region for n in topology.nodes]
    names = sorted(set(regions))
    members = {r: [i for i, x in enumerate(regions) if x == r] for r in names}
    dist = np.array([[link_s[np.ix_(members[a], members[b])].min() for b in names] for a in names])
    np.fill_diagonal(dist, np.inf)
    start = max(range(len(names)), key=lambda i: (len(members[names[i]]), -i))
    chain = locality_order(np.where(np.isinf(dist), 0.0, dist) + np.eye(len(names)) * 1e18, start) \
        if len(names) > 1 else [0]
    return [i for r in chain for i in sorted(members[names[r]], key=lambda i: (-speeds[i], i))]


def candidate_labellings(topology, link_s: np.ndarray, sizes: Sequence[int], rng: random.Random,
                         starts: int) -> List[Tuple[str, np.ndarray]]:
    """Locality labellings (module docstring, step 1): (tag, labels) pairs."""
    n = len(link_s)
    speeds = np.array([node.speed for node in topology.nodes])
    orders = [("regions", region_order(topology, link_s, speeds))]
    picks = list(range(n))
    rng.shuffle(picks)
    for s in picks[:starts]:
        orders.append((f"chain{s}", locality_order(link_s, s)))
    out = []
    for tag, order in orders:
        for offset in (0, len(sizes) // 2):
            labels = np.empty(n, dtype=np.int64)
            labels[order] = round_robin_labels(sizes, n, offset)
            out.append((f"{tag}+{offset}", labels))
    return out


def compact_labellings(topology, names: Sequence[str], sizes: Sequence[int]) -> List[Tuple[str, np.ndarray]]:
    """The compact labelling (:func:`cliques.compact_groups`): every stage in a clique of regions
    with fast links, for iterations bound by gradient reduction; none when it cannot be built."""
    found = compact_groups(RegionView(topology, names), sizes, [topology.node(n).speed for n in names])
    if found is None:
        return []
    labels = np.empty(len(names), dtype=np.int64)
    for k, group in enumerate(found[1]):
        labels[group] = k
    return [("compact", labels)]


def to_allocation(labels: np.ndarray, names: Sequence[str], num_stages: int) -> Allocation:
    return [[names[i] for i in np.flatnonzero(labels == k)] for k in range(num_stages)]


def to_labels(allocation: Allocation, names: Sequence[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    labels = np.empty(len(names), dtype=np.int64)
    for k, nodes in enumerate(allocation):
        for node in nodes:
            labels[index[node]] = k
    return labels


def search(topology, link_s: np.ndarray, seeds: List[Tuple[str, np.ndarray]],
           proxy: Callable[[np.ndarray], float], misfit: np.ndarray, rng: random.Random,
           evaluations: int, keep: int = 2, always: Sequence[str] = ()) -> List[Tuple[float, str, np.ndarray]]:
    """Rank ``seeds`` by ``proxy``, improve the best by local search; the ``keep`` best, best first,
    then the seeds tagged in ``always`` that are not among them (a family the proxy misjudges)."""
    scored = []
    seen = set()
    for tag, labels in seeds:
        key = labels.tobytes()
        if key in seen or misfit[np.arange(len(labels)), labels].any():
            continue
        seen.add(key)
        try:
            scored.append((proxy(labels), tag, labels))
        except PlanError:
            continue
    if not scored:
        raise PlanError("no candidate allocation can be routed")
    scored.sort(key=lambda c: (c[0], c[1]))
    best_score, best_tag, best = scored[0]
    improved = _local_search(topology, link_s, best.copy(), best_score, proxy, misfit, rng, evaluations)
    if improved[0] < best_score - 1e-9:
        scored.insert(0, (improved[0], best_tag + "+search", improved[1]))
    log.debug("allocation candidates: %s", [(t, round(s, 2)) for s, t, _ in scored[:8]])
    top = scored[:keep]
    kept = {tag.split("+")[0] for _, tag, _ in top}
    return top + [c for c in scored[keep:] if c[1] in always and c[1] not in kept]


def _local_search(topology, link_s, labels, score, proxy, misfit, rng, evaluations):
    n = len(labels)
    near = np.argsort(link_s + np.eye(n) * 1e18, axis=1)[:, :min(n - 1, 8)]
    regions = [node.region for node in topology.nodes]
    members = {}
    for i, r in enumerate(regions):
        members.setdefault(r, []).append(i)
    region_names = sorted(members)
    for _ in range(evaluations):
        trial = labels.copy()
        if rng.random() < 0.8:
            a = rng.randrange(n)
            b = int(near[a][rng.randrange(near.shape[1])]) if rng.random() < 0.7 else rng.randrange(n)
            if trial[a] == trial[b]:
                continue
            trial[a], trial[b] = trial[b], trial[a]
        else:  # rotate the stages held in one region among its nodes (a group move)
            group = members[region_names[rng.randrange(len(region_names))]]
            if len(group) < 2:
                continue
            shift = rng.randrange(1, len(group))
            trial[group] = np.roll(trial[group], shift)
            if np.array_equal(trial, labels):
                continue
        if misfit[np.arange(n), trial].any():
            continue
        try:
            value = proxy(trial)
        except PlanError:
            continue
        if value < score - 1e-9:
            labels, score = trial, value
    return score, labels


def _with_grad_sync(actions, prob) -> float:
    """Makespan of reserved actions with each stage's all-reduce after its last action, as the
    simulator adds it (a spread-out stage all-reduces over slow links: the proxy must see it)."""
    last: dict = {}
    for node, _, _, _, end in actions:
        last[node] = max(last.get(node, 0.0), end)
    makespan = max(last.values())
    for stage, nodes in enumerate(prob.live):
        worked = [last[n] for n in nodes if n in last]
        if len(nodes) > 1 and worked:
            makespan = max(makespan, max(worked) + prob.cost.allreduce_s(stage, nodes))
    return makespan


def proxy_evaluations(num_nodes: int, microbatches: int, hops: int) -> int:
    """Local-search proxy evaluations, fixed by size: about 3e5 placed hops in all, 8..150."""
    return int(max(8, min(150, 300_000 // max(1, microbatches * hops * max(1, num_nodes // 8)))))


def seeded(value: Optional[int]) -> random.Random:
    return random.Random(f"coallocate:{value}")


def allocate_by_plan(topology, cost, params, dtfm: Optional[Allocation] = None):
    """The allocation whose routed ``skippipe`` plan is shortest (module docstring).

    ``params``: a :class:`SchedulerParams` or a Config. Returns (allocation, plan, info): the plan
    is that allocation's full ``skippipe`` routing at step 0 with no live state (what ``route``
    returns for it), ``info`` the candidates' scores.
    """
    from skippipe.schedule.route import route

    params = as_params(params)
    names = topology.names()
    sizes = partition_sizes(params, len(names))
    dtfm = dtfm if dtfm is not None else allocate(topology, cost, params)
    if len(sizes) < 2:
        return dtfm, route(dtfm, topology, cost, params, method="skippipe"), {}
    link_s = cost.transfer_matrix_s(names)
    link_s = (link_s + link_s.T) / 2
    misfit = memory_misfit(topology, cost, params.memory, sizes)
    rng = seeded(params.seed)
    state = LiveState()

    def proxy(labels: np.ndarray) -> float:
        prob = build_problem(to_allocation(labels, names, len(sizes)), cost, params, state, "skippipe")
        _, _, res = place_collision_aware(prob, random.Random(0), insertion_order(prob, rng, 0), 4, 3)
        value = _with_grad_sync(res.actions, prob)
        dedicated = paths_dedicated(prob, "worst")
        if dedicated is not None:
            value = min(value, simulate(assemble(prob, "skippipe", len(sizes), dedicated), prob.cost,
                                        prob.memory, prob.slow, use_order=False).makespan_s)
        return value

    hops = max(1, params.stages_visited(len(sizes)) - 1)
    microbatches = sizes[0] * params.microbatches_per_originator
    starts = 6 if microbatches * hops <= 2000 else 1  # at scale each proxy call is a large placement
    seeds = [("dtfm", to_labels(dtfm, names))] + candidate_labellings(topology, link_s, sizes, rng, starts)
    if getattr(cost, "grad_sync", False):
        seeds += compact_labellings(topology, names, sizes)
    top = search(topology, link_s, seeds, proxy, misfit, rng,
                 proxy_evaluations(len(names), microbatches, hops), keep=2, always=("compact",))
    tried = [("dtfm", dtfm)] + [(tag, to_allocation(labels, names, len(sizes))) for _, tag, labels in top
                                if tag != "dtfm"]
    best = None
    info = {"proxy": {tag: round(score, 4) for score, tag, _ in top}, "routed": {}}
    for tag, allocation in tried:  # a shorter search ranks them; the winner gets the full one
        allocation = align(allocation, cost)
        plan = route(allocation, topology, cost, params, method="skippipe", effort_scale=_RANK_EFFORT)
        info["routed"][tag] = plan.predicted_makespan_s
        if best is None or plan.predicted_makespan_s < best[2].predicted_makespan_s - 1e-9:
            best = (tag, allocation, plan)
    info["chosen"] = best[0]
    plan = route(best[1], topology, cost, params, method="skippipe")
    if plan.predicted_makespan_s > best[2].predicted_makespan_s:  # the full search starts alike; keep the better
        plan = best[2]
    plan.extra["allocation"] = info
    return best[1], plan, info
