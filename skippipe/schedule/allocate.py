"""Allocation of nodes to stages (DT-FM arXiv 2206.01288 section 3; DESIGN.md section 4).

Objective (to minimise), as the SkipPipe reference's GCMA: ``dp_cost + 2 * pp_cost`` where
``dp_cost`` is the worst link inside any stage (its replicas all-reduce) and ``pp_cost`` is the
shortest closed tour from stage 0 over a stage-level matrix whose entry (i, j) is the bottleneck
matching between the groups of stages i and j, edges ``transfer(a, b) + fwd(a)``.

Search: instead of the reference's genetic algorithm (hours at scale) we build 12 greedy
"nearest group" seeds and improve the best by a fixed number of random node swaps between stages
(``allocation_moves``), scored incrementally with numpy (bottleneck matchings of small groups by
enumeration); the result is a function of the inputs and the seed, never of machine speed, and
``schedule.allocation_budget_s`` is only a safety cap. Memory: a node whose memory
cannot hold a stage (parameters, gradients, AdamW moments and ``memory`` microbatches of
activations) is penalised out of it.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from typing import List, Optional, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from skippipe.errors import ConfigError, TopologyError
from skippipe.schedule.params import as_params
from skippipe.schedule.tsp import best_tour

log = logging.getLogger(__name__)

_MISFIT_PENALTY_S = 1e6
_EXACT_MATCHING_MAX = 400  # n_i * n_j up to which the bottleneck matching is solved exactly


def partition_sizes(params, num_nodes: int) -> List[int]:
    """Replicas per stage: ``schedule.partition_sizes`` or an even split with extras on stage 0.

    ``params``: a :class:`SchedulerParams` or a Config."""
    params = as_params(params)
    sizes = list(params.partition_sizes)
    if sizes:
        if sum(sizes) != num_nodes:
            raise ConfigError(f"schedule.partition_sizes={sizes} sums to {sum(sizes)} but the topology has "
                              f"{num_nodes} nodes; make them equal or set schedule.partition_sizes=[]")
        return sizes
    stages = params.num_stages
    if num_nodes < stages:
        raise ConfigError(f"{num_nodes} nodes < {stages} stages: every stage needs a node; "
                          "lower schedule.num_stages or add nodes")
    base = num_nodes // stages
    return [base + num_nodes - base * stages] + [base] * (stages - 1)


_ENUMERATE_MAX = 3000  # injective assignments up to which the bottleneck is found by enumeration
_PERMS: dict = {}


def _injections(rows: int, cols: int) -> Optional[np.ndarray]:
    """All injective maps rows -> cols as an (P, rows) index array, or None when P is too large."""
    key = (rows, cols)
    if key not in _PERMS:
        count = 1
        for i in range(rows):
            count *= cols - i
        _PERMS[key] = (np.array(list(itertools.permutations(range(cols), rows)), dtype=np.int64).reshape(-1, rows)
                       if count <= _ENUMERATE_MAX else None)
    return _PERMS[key]


def bottleneck_matching(edge: np.ndarray) -> float:
    """Smallest t such that a matching saturating the smaller side uses only edges <= t.

    Exact by enumeration for small groups, exact by bisection over matchings up to
    ``_EXACT_MATCHING_MAX`` cells, else the row bound (tight when nodes cluster in regions).
    """
    rows, cols = edge.shape
    if rows > cols:
        edge, rows, cols = edge.T, cols, rows
    perms = _injections(rows, cols)
    if perms is not None:
        return float(edge[np.arange(rows), perms].max(axis=1).min())
    if rows * cols > _EXACT_MATCHING_MAX:
        lower = _class_bound(edge)
        return max(lower, _class_bound(edge.T)) if rows == cols else lower
    lower = float(edge.min(axis=1).max())
    if rows == cols:
        lower = max(lower, float(edge.min(axis=0).max()))
    if _saturates(edge <= lower, rows):
        return lower
    values = np.unique(edge[edge > lower])
    lo, hi = 0, len(values) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _saturates(edge <= values[mid], rows):
            hi = mid
        else:
            lo = mid + 1
    return float(values[lo])


def _class_bound(edge: np.ndarray) -> float:
    """Hall's condition for each class of identical rows (all rows must be matched).

    ``a`` identical rows need ``a`` distinct columns, so the bottleneck is at least the a-th
    smallest entry of that row. Nodes of one region (and speed) have identical rows, so this catches
    what the plain row bound misses: 15 NL nodes facing a group of 25 with 11 London nodes must use
    an NL-London link (132 s in the GCP table) however they are matched.
    """
    unique, counts = np.unique(edge, axis=0, return_counts=True)
    kth = np.minimum(counts, edge.shape[1]) - 1
    return float(np.sort(unique, axis=1)[np.arange(len(unique)), kth].max())


def _saturates(allowed: np.ndarray, rows: int) -> bool:
    """Does the bipartite graph ``allowed`` (rows x cols) have a matching covering every row?"""
    r, c = np.nonzero(allowed)
    indptr = np.zeros(allowed.shape[0] + 1, dtype=np.int32)
    np.cumsum(np.bincount(r, minlength=allowed.shape[0]), out=indptr[1:])
    graph = csr_matrix((np.ones(len(c), dtype=np.int8), c.astype(np.int32), indptr), shape=allowed.shape)
    return int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum()) == rows


class _Scorer:
    """Incremental DT-FM score of a labelling (node -> stage)."""

    def __init__(self, cost_s: np.ndarray, weight_s: np.ndarray, misfit: np.ndarray, num_stages: int,
                 classes: np.ndarray):
        self.cost_s = cost_s
        self.edge = cost_s + weight_s[:, None]
        # symmetric edges (symmetric links, equal compute): one matching per pair of stages
        self.symmetric = bool(np.allclose(self.edge, self.edge.T, rtol=0, atol=0))
        # classes of interchangeable nodes (one region and speed: identical edges to every other
        # node), for the Hall bound of large groups (``_class_bound``). They come from the nodes,
        # not from comparing matrix rows: each row's zero diagonal makes every row unique, which
        # silently reduced the bound to the plain row minimum (a 132 s NL-London matching scored
        # 2.7 s at 200 nodes).
        self.row_class = self.col_class = np.asarray(classes).ravel()
        self.misfit = misfit
        self.num_stages = num_stages

    def groups(self, labels: np.ndarray) -> List[np.ndarray]:
        return [np.flatnonzero(labels == k) for k in range(self.num_stages)]

    def diameter(self, group: np.ndarray) -> float:
        return float(self.cost_s[np.ix_(group, group)].max()) if len(group) > 1 else 0.0

    def _large(self, a: np.ndarray, b: np.ndarray) -> float:
        """bottleneck_matching's bound for large groups (class Hall bound), from the node classes."""
        rows, cols = (a, b) if len(a) <= len(b) else (b, a)
        transpose = len(a) > len(b)
        value = self._hall(rows, cols, transpose)
        if len(a) == len(b):
            value = max(value, self._hall(cols, rows, not transpose))
        return value

    def _hall(self, rows: np.ndarray, cols: np.ndarray, transpose: bool) -> float:
        classes = self.col_class if transpose else self.row_class
        labels, first, counts = np.unique(classes[rows], return_index=True, return_counts=True)
        reps = rows[first]
        sub = self.edge[np.ix_(cols, reps)].T if transpose else self.edge[np.ix_(reps, cols)]
        kth = np.minimum(counts, len(cols)) - 1
        return float(np.sort(sub, axis=1)[np.arange(len(reps)), kth].max())

    def pair(self, a: np.ndarray, b: np.ndarray) -> float:
        if len(a) * len(b) > _EXACT_MATCHING_MAX:
            ab = self._large(a, b)
            return ab if self.symmetric else max(ab, self._large(b, a))
        ab = bottleneck_matching(self.edge[np.ix_(a, b)])
        if self.symmetric:
            return ab
        ba = bottleneck_matching(self.edge[np.ix_(b, a)])
        return max(ab, ba)

    def full(self, labels: np.ndarray):
        groups = self.groups(labels)
        diam = np.array([self.diameter(g) for g in groups])
        stage = np.zeros((self.num_stages, self.num_stages))
        for i in range(self.num_stages):
            for j in range(i + 1, self.num_stages):
                stage[i, j] = stage[j, i] = self.pair(groups[i], groups[j])
        return groups, diam, stage

    def score(self, labels: np.ndarray, diam: np.ndarray, stage: np.ndarray, exact_max: int = 8) -> float:
        pp_cost, _ = best_tour(stage, exact_max)
        misfits = float(self.misfit[np.arange(len(labels)), labels].sum())
        # small sum terms break the plateaus of the max-based objective
        return float(diam.max() + 2 * pp_cost + 1e-3 * diam.sum() + _MISFIT_PENALTY_S * misfits)


def node_classes(topology) -> np.ndarray:
    """Class index per node: nodes of one region with one speed are interchangeable in the score."""
    _, classes = np.unique([f"{n.region}\0{n.speed!r}" for n in topology.nodes], return_inverse=True)
    return classes.ravel()


def _greedy_seed(cost_s: np.ndarray, sizes: List[int], start: int, order: List[int]) -> np.ndarray:
    """Fill stages one by one with the nodes closest (max link) to the group so far."""
    n = len(cost_s)
    labels = np.full(n, -1)
    free = np.ones(n, dtype=bool)
    seed = start
    for stage in order:
        if not free[seed]:
            seed = int(np.flatnonzero(free)[0])
        group = [seed]
        free[seed] = False
        worst = cost_s[seed].copy()
        while len(group) < sizes[stage]:
            cand = np.where(free, worst, np.inf)
            pick = int(np.argmin(cand))
            group.append(pick)
            free[pick] = False
            worst = np.maximum(worst, cost_s[pick])
        labels[group] = stage
        if free.any():
            seed = int(np.flatnonzero(free)[np.argmin(cost_s[group][:, free].min(axis=0))])
    return labels


def allocation_moves(num_nodes: int, num_stages: int) -> int:
    """Swap attempts of the allocation's local search: fixed by the problem size, never by time."""
    return 0 if num_stages < 2 else int(min(2000 if num_nodes > 300 else 3000, max(1500, 3 * num_nodes),
                                            100 * num_nodes))


def _local_search(scorer: _Scorer, labels: np.ndarray, rng: random.Random, moves: int,
                  deadline: float) -> Tuple[np.ndarray, bool]:
    """Random swaps of two nodes between stages, kept when the score does not get worse."""
    groups, diam, stage = scorer.full(labels)
    best = scorer.score(labels, diam, stage)
    n, stages = len(labels), scorer.num_stages
    for move in range(moves):
        if move % 64 == 63 and time.perf_counter() > deadline:
            return labels, True
        a, b = rng.randrange(n), rng.randrange(n)
        sa, sb = int(labels[a]), int(labels[b])
        if sa == sb:
            continue
        labels[a], labels[b] = sb, sa
        new_groups = list(groups)
        new_groups[sa], new_groups[sb] = np.flatnonzero(labels == sa), np.flatnonzero(labels == sb)
        new_diam = diam.copy()
        new_diam[sa], new_diam[sb] = scorer.diameter(new_groups[sa]), scorer.diameter(new_groups[sb])
        new_stage = stage.copy()
        for k in (sa, sb):
            for j in range(stages):
                if j != k and not (k == sb and j == sa):
                    new_stage[k, j] = new_stage[j, k] = scorer.pair(new_groups[k], new_groups[j])
        score = scorer.score(labels, new_diam, new_stage)
        if score <= best:
            best, groups, diam, stage = score, new_groups, new_diam, new_stage
        else:
            labels[a], labels[b] = sa, sb
    return labels, False


def _order_stages(scorer: _Scorer, labels: np.ndarray, sizes: List[int]) -> List[int]:
    """Stage relabelling along the best closed tour (kept when non-zero stages differ in size)."""
    _, _, stage = scorer.full(labels)
    _, tour = best_tour(stage)
    if len(set(sizes[1:])) > 1:
        return list(range(len(sizes)))
    return tour  # tour[0] == 0: stage 0 keeps its group


def _align_replicas(cost_s: np.ndarray, groups: List[List[int]]) -> List[List[int]]:
    """Order each stage's nodes so that ``groups[s][r]`` forms pipeline r (successive matchings)."""
    out = [sorted(groups[0])]
    for group in groups[1:]:
        prev = out[-1]
        rows, cols = linear_sum_assignment(cost_s[np.ix_(prev, group)])
        matched = [group[c] for _, c in sorted(zip(rows, cols))]
        out.append(matched + sorted(set(group) - set(matched)))
    return out


def allocate(topology, cost, params, budget_s: Optional[float] = None) -> List[List[str]]:
    """Node names per stage, stage 0 first, minimising the DT-FM score (DESIGN.md section 4).

    Deterministic in (topology, cost, config, seed): 12 greedy seeds, then a fixed number of swap
    attempts (``allocation_moves``). ``schedule.allocation_budget_s`` (or ``budget_s``) is only a
    safety cap on wall-clock time; hitting it logs a warning, as the result then depends on speed.
    ``params``: a :class:`SchedulerParams` or a Config.
    """
    params = as_params(params)
    names = topology.names()
    sizes = partition_sizes(params, len(names))
    stages = len(sizes)
    cost_s = cost.transfer_matrix_s(names)
    weight_s = np.array([cost.fwd_s(n, min(1, stages - 1)) for n in names])
    misfit = memory_misfit(topology, cost, params.memory, sizes)
    scorer = _Scorer(cost_s, weight_s, misfit, stages, node_classes(topology))
    rng = random.Random(params.seed)
    if budget_s is None:
        budget_s = params.allocation_budget_s
    deadline = time.perf_counter() + budget_s
    labels = _best_seed(scorer, cost_s, sizes, rng)
    labels, capped = _local_search(scorer, labels, rng, allocation_moves(len(names), stages), deadline)
    if capped:
        log.warning("allocation hit schedule.allocation_budget_s=%.1f s: the result depends on machine speed",
                    budget_s)
    bad = np.flatnonzero(misfit[np.arange(len(names)), labels])
    if len(bad):
        node = names[bad[0]]
        raise TopologyError(f"node '{node}' ({topology.node(node).memory_gb:g} GiB) cannot hold stage "
                            f"{labels[bad[0]]}; add memory, more stages, or lower schedule.memory")
    relabel = _order_stages(scorer, labels, sizes)
    groups = [list(np.flatnonzero(labels == k)) for k in relabel]
    return [[names[i] for i in group] for group in _align_replicas(cost_s, groups)]


def _best_seed(scorer: _Scorer, cost_s: np.ndarray, sizes: List[int], rng: random.Random) -> np.ndarray:
    n = len(cost_s)
    starts = list(range(n))
    rng.shuffle(starts)
    order_fwd = list(range(len(sizes)))
    best, best_score = None, np.inf
    for i, start in enumerate(starts[:12]):
        order = order_fwd if i % 2 == 0 else order_fwd[::-1]
        labels = _greedy_seed(cost_s, sizes, start, order)
        _, diam, stage = scorer.full(labels)
        score = scorer.score(labels, diam, stage)
        if score < best_score:
            best, best_score = labels, score
    return best.copy()


def memory_misfit(topology, cost, memory: int, sizes: List[int]) -> np.ndarray:
    """(node x stage) 1.0 where the node's memory cannot hold the stage (see module docstring)."""
    need_bytes = np.array([cost.stage_memory_bytes(k, memory) for k in range(len(sizes))])
    have_bytes = np.array([n.memory_gb * 2**30 for n in topology.nodes])
    return (have_bytes[:, None] < need_bytes[None, :]).astype(np.float64)


def align(allocation: List[List[str]], cost) -> List[List[str]]:
    """The same stages with replicas ordered into DT-FM pipelines (``_align_replicas``)."""
    names = [n for nodes in allocation for n in nodes]
    index = {n: i for i, n in enumerate(names)}
    cost_s = cost.transfer_matrix_s(names)
    groups = [[index[n] for n in nodes] for nodes in allocation]
    return [[names[i] for i in group] for group in _align_replicas(cost_s, groups)]


def allocation_score(topology, cost, allocation: List[List[str]]) -> float:
    """The DT-FM score ``dp_cost + 2 * pp_cost`` of an allocation (for reports and tests)."""
    names = topology.names()
    labels = np.zeros(len(names), dtype=np.int64)
    index = {n: i for i, n in enumerate(names)}
    for k, nodes in enumerate(allocation):
        for node in nodes:
            labels[index[node]] = k
    cost_s = cost.transfer_matrix_s(names)
    weight_s = np.array([cost.fwd_s(n, min(1, len(allocation) - 1)) for n in names])
    scorer = _Scorer(cost_s, weight_s, np.zeros((len(names), len(allocation))), len(allocation),
                     node_classes(topology))
    _, diam, stage = scorer.full(labels)
    pp_cost, _ = best_tour(stage)
    return float(diam.max() + 2 * pp_cost)
