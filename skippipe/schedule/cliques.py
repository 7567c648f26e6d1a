"""Stage groups whose all-reduce avoids slow links: region cliques under a bandwidth threshold.

A stage's ring all-reduce runs over the slowest link between two of its replicas
(``CostModel.allreduce_s``), and link bandwidths are set by regions. So a group of replicas whose
slowest link is at least ``B`` takes its nodes from a *clique* of regions in the graph of region
pairs with bandwidth >= ``B``; it takes more than one node of a region only when that region's own
link is >= ``B``. The disjoint groups of every stage at one threshold are a packing of cliques.

Two uses of the same view:

* :func:`packing_threshold` (for the lower bound, :mod:`skippipe.schedule.bound`): the largest
  threshold at which a relaxation of that packing is feasible: each stage fits in one connected
  component of the graph (in its largest clique), and the stages placed in a component fit in its
  nodes. No allocation of those stages has all of their groups faster than that.
* :func:`compact_groups` (for allocation, :mod:`skippipe.schedule.coallocate`): an allocation that
  is such a packing at the largest threshold a short depth-first search finds, every stage in a
  clique: the candidate for problems whose iteration is bound by gradient reduction.

Region sets are enumerated as bitmasks, so both are limited to :data:`MAX_REGIONS` regions (4096
sets at 12); above it neither applies (``None``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

MAX_REGIONS = 12


class RegionView:
    """The regions of ``names`` (nodes of ``topology``): members, link bandwidth and latency."""

    def __init__(self, topology, names: Sequence[str]):
        self.names = list(names)
        region_of = [topology.node(n).region for n in self.names]
        self.regions = sorted(set(region_of))
        at = {r: i for i, r in enumerate(self.regions)}
        self.members: List[List[int]] = [[] for _ in self.regions]
        for i, r in enumerate(region_of):
            self.members[at[r]].append(i)
        self.count = np.array([len(m) for m in self.members])
        reps = [self.names[m[0]] for m in self.members]
        size = len(self.regions)
        self.bw = np.zeros((size, size))
        self.lat = np.zeros((size, size))
        for x in range(size):
            for y in range(size):
                if x != y:
                    self.bw[x, y] = topology.bandwidth_bytes_per_s(reps[x], reps[y])
                    self.lat[x, y] = topology.latency_s(reps[x], reps[y])
                elif self.count[x] > 1:
                    mate = self.names[self.members[x][1]]
                    self.bw[x, x] = topology.bandwidth_bytes_per_s(reps[x], mate)
                    self.lat[x, x] = topology.latency_s(reps[x], mate)
                else:
                    self.bw[x, x] = np.inf  # one node: its own link is never used
        self._sets: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None

    def usable(self) -> bool:
        return 1 <= len(self.regions) <= MAX_REGIONS

    def sets(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(membership, pair_min, pair_max_lat): every non-empty region set as a row of 0/1 over
        regions, the slowest link and the worst latency between two distinct regions of it (inf and
        0 for one region)."""
        if self._sets is None:
            size = len(self.regions)
            masks = np.arange(1, 1 << size)
            member = ((masks[:, None] >> np.arange(size)[None, :]) & 1).astype(bool)
            pair_min = np.full(1 << size, np.inf)  # indexed by mask
            pair_lat = np.zeros(1 << size)
            for mask in range(1, 1 << size):
                top = mask.bit_length() - 1
                rest = mask & ~(1 << top)
                if rest:
                    others = [r for r in range(top) if rest >> r & 1]
                    pair_min[mask] = min(pair_min[rest], float(self.bw[top, others].min()))
                    pair_lat[mask] = max(pair_lat[rest], float(self.lat[top, others].max()))
            self._sets = (member, pair_min[1:], pair_lat[1:])
        return self._sets

    def best_group(self, replicas: int) -> Tuple[float, float]:
        """(fastest slowest-link, least worst-latency) a group of ``replicas`` nodes can have, each
        over every region set with enough nodes (a set's own links: its slowest and worst pair of
        regions, or the region's own link for one region)."""
        member, pair_min, pair_lat = self.sets()
        single = member.sum(axis=1) == 1
        region = member.argmax(axis=1)
        own_bw = np.where(self.count[region] > 1, np.diag(self.bw)[region], 0.0)
        slowest = np.where(single, own_bw, pair_min)
        worst = np.where(single, np.where(self.count[region] > 1, np.diag(self.lat)[region], np.inf), pair_lat)
        ok = (member @ self.count >= replicas) & (slowest > 0)
        if not ok.any():
            return 0.0, float("inf")
        return float(slowest[ok].max()), float(worst[ok].min())

    def thresholds(self) -> np.ndarray:
        """The distinct finite link bandwidths, fastest first."""
        values = self.bw[np.isfinite(self.bw)]
        return np.unique(values[values > 0])[::-1]

    def capacity(self, threshold: float, limit: Optional[np.ndarray] = None) -> np.ndarray:
        """Nodes a group faster than ``threshold`` can take from each region (of ``limit`` left)."""
        have = self.count if limit is None else limit
        own = np.diag(self.bw) >= threshold
        return np.where(own, have, np.minimum(have, 1))


def _components(view: RegionView, threshold: float) -> List[List[int]]:
    size = len(view.regions)
    parent = list(range(size))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x in range(size):
        for y in range(x + 1, size):
            if view.bw[x, y] >= threshold:
                parent[find(x)] = find(y)
    groups: Dict[int, List[int]] = {}
    for x in range(size):
        groups.setdefault(find(x), []).append(x)
    return list(groups.values())


def _fits(items: List[int], room: List[int], largest: List[int]) -> bool:
    """Bin packing by depth-first search: every item (a size) in one bin whose largest clique
    holds it and whose room is left (few items and bins: the stages and components)."""
    if not items:
        return True
    item, rest = items[0], items[1:]
    tried = set()
    for b in range(len(room)):
        key = (room[b], largest[b])
        if key in tried or largest[b] < item or room[b] < item:
            continue
        tried.add(key)
        room[b] -= item
        ok = _fits(rest, room, largest)
        room[b] += item
        if ok:
            return True
    return False


def packing_threshold(view: RegionView, sizes: Sequence[int]) -> Optional[float]:
    """The largest threshold at which groups of ``sizes`` (each > 1) pass the packing relaxation
    (module docstring): an upper bound on the slowest link of the slowest of those groups in any
    allocation. ``None`` when the regions are too many to enumerate."""
    sizes = sorted((s for s in sizes if s > 1), reverse=True)
    if not view.usable():
        return None
    if not sizes:
        return float("inf")
    member, pair_min, _ = view.sets()

    def feasible(threshold: float) -> bool:
        cap = member @ view.capacity(threshold)
        room, largest = [], []
        for comp in _components(view, threshold):
            inside = ~member[:, [r for r in range(len(view.regions)) if r not in comp]].any(axis=1)
            ok = inside & (pair_min >= threshold)
            room.append(int(view.count[comp].sum()))
            largest.append(int(cap[ok].max()) if ok.any() else 0)
        return _fits(list(sizes), room, largest)

    # a lower threshold only adds links: feasibility is monotone, so bisect the fastest-first list
    values = view.thresholds()
    lo, hi = 0, len(values)
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(values[mid]):
            hi = mid
        else:
            lo = mid + 1
    return float(values[lo]) if lo < len(values) else None


def compact_groups(view: RegionView, sizes: Sequence[int], speeds: Sequence[float],
                   budget: int = 4000) -> Optional[Tuple[float, List[List[int]]]]:
    """(threshold, groups of node indices, one per stage of ``sizes``): a packing of region
    cliques at the largest threshold a depth-first search of ``budget`` steps finds (module
    docstring); ``None`` if none is found or the regions are too many."""
    if not view.usable():
        return None
    member, pair_min, _ = view.sets()
    order = sorted(range(len(sizes)), key=lambda k: (-sizes[k], k))
    for threshold in view.thresholds():
        clique = np.flatnonzero(pair_min >= threshold)
        found = _assign(view, member[clique], threshold, sizes, order, [budget])
        if found is not None:
            return float(threshold), _to_nodes(view, found, speeds)
    return None


def _assign(view, member, threshold, sizes, order, budget):
    """Depth-first: each stage (largest first) takes a clique with room for it, best fit first;
    its takes are (stage, {region: count})."""
    left = view.count.copy()
    takes: Dict[int, Dict[int, int]] = {}

    def visit(depth: int) -> bool:
        if depth == len(order):
            return True
        budget[0] -= 1
        if budget[0] < 0:
            return False
        k = order[depth]
        cap = view.capacity(threshold, left)
        room = member @ cap
        fit = np.flatnonzero(room >= sizes[k])
        if not len(fit):
            return False
        ranked = sorted(fit, key=lambda c: (room[c] - sizes[k], int(member[c].sum()), int(c)))[:4]
        for c in ranked:
            regions = sorted(np.flatnonzero(member[c]), key=lambda r: (cap[r], r))
            need, take = sizes[k], {}
            for r in regions:  # small remainders first, so that the other regions stay whole
                t = int(min(cap[r], need))
                if t:
                    take[int(r)] = t
                    need -= t
            for r, t in take.items():
                left[r] -= t
            takes[k] = take
            if visit(depth + 1):
                return True
            for r, t in take.items():
                left[r] += t
            del takes[k]
        return False

    return dict(takes) if visit(0) else None


def _to_nodes(view: RegionView, takes: Dict[int, Dict[int, int]], speeds) -> List[List[int]]:
    """Node indices per stage: each region's nodes dealt out fastest first, stage by stage."""
    pools = [sorted(m, key=lambda i: (-speeds[i], i)) for m in view.members]
    groups = []
    for k in range(len(takes)):
        nodes = []
        for r, t in sorted(takes[k].items()):
            nodes += pools[r][:t]
            pools[r] = pools[r][t:]
        groups.append(nodes)
    return groups
