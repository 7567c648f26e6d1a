"""Region cliques under a bandwidth threshold (skippipe.schedule.cliques): the packing relaxation
bounds every allocation's slowest stage group, and the compact allocation is a real packing."""

import itertools
import random

import pytest

from skippipe.schedule.cliques import RegionView, compact_groups, packing_threshold
from skippipe.topology import Node, Topology


def _topology(seed: int, regions: int, nodes: int) -> Topology:
    rng = random.Random(f"cliques:{seed}")
    names = [f"r{i}" for i in range(regions)]
    lat = [[1.0] * regions for _ in range(regions)]
    bw = [[rng.choice([1.0, 10.0]) if i == j else 0.0 for j in range(regions)] for i in range(regions)]
    for i in range(regions):
        for j in range(i + 1, regions):
            lat[i][j] = lat[j][i] = rng.uniform(5, 300)
            bw[i][j] = bw[j][i] = round(rng.uniform(0.05, 5.0), 3)
    members = [Node(f"n{i}", rng.choice(names), speed=rng.uniform(0.5, 2.0)) for i in range(nodes)]
    return Topology(names, lat, bw, members)


def _slowest(topo: Topology, group) -> float:
    return min((topo.bandwidth_bytes_per_s(a, b) for a in group for b in group if a != b), default=float("inf"))


@pytest.mark.parametrize("seed,regions,sizes", [
    (0, 3, [3, 2, 2]), (1, 4, [2, 2, 2]), (2, 4, [3, 2, 1, 1]), (3, 5, [2, 2, 2, 1]), (4, 3, [4, 3]),
    (5, 5, [3, 3, 2]),
])
def test_packing_threshold_bounds_every_allocation(seed, regions, sizes):
    topo = _topology(seed, regions, sum(sizes))
    names = topo.names()
    view = RegionView(topo, names)
    threshold = packing_threshold(view, sizes)
    best = 0.0
    for perm in itertools.permutations(names):
        groups, i = [], 0
        for size in sizes:
            groups.append(perm[i:i + size])
            i += size
        best = max(best, min(_slowest(topo, g) for g in groups if len(g) > 1))
    assert threshold is not None
    assert best <= threshold + 1e-6
    found = compact_groups(view, sizes, [topo.node(n).speed for n in names])
    assert found is not None
    value, groups = found
    assert value <= best + 1e-6  # a real allocation: never better than the best one
    assert sorted(len(g) for g in groups) == sorted(sizes) and [len(g) for g in groups] == list(sizes)
    assert sorted(i for g in groups for i in g) == list(range(len(names)))
    for g in groups:
        assert _slowest(topo, [names[i] for i in g]) >= value - 1e-6


def test_compact_groups_keep_a_slow_pair_apart():
    # two regions joined by a very slow link, each with enough nodes for one stage
    topo = Topology(["a", "b"], [[1.0, 50.0], [50.0, 1.0]], [[10.0, 0.002], [0.002, 10.0]],
                    [Node(f"n{i}", "a" if i < 4 else "b") for i in range(8)])
    view = RegionView(topo, topo.names())
    value, groups = compact_groups(view, [4, 4], [1.0] * 8)
    assert value == pytest.approx(10.0e9 / 8)
    assert {frozenset(g) for g in groups} == {frozenset(range(4)), frozenset(range(4, 8))}
    assert packing_threshold(view, [4, 4]) == pytest.approx(10.0e9 / 8)
    assert packing_threshold(view, [5, 3]) == pytest.approx(0.002e9 / 8)


def test_too_many_regions_are_not_enumerated():
    base = _topology(9, 14, 1)
    topo = Topology(base.region_names, base.latency_ms, base.bandwidth_gbps, [Node(f"n{i}", f"r{i % 14}") for i in range(20)])
    view = RegionView(topo, topo.names())
    assert not view.usable()
    assert packing_threshold(view, [10, 10]) is None
    assert compact_groups(view, [10, 10], [1.0] * 20) is None
