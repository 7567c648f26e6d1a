"""The SkipPipe path rules as a search space, and TC1 capacity (arXiv 2502.19913 section 4; DESIGN.md 5).

A partial path is a ``PathState`` (stages so far, highest stage, swaps); ``next_stages`` lists the
stages that may follow and still leave a rule-abiding completion (rules 1-2). ``Capacity`` counts
a wave's visits per stage and per node (TC1).

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

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from skippipe.plan import PathRules


@dataclass(frozen=True)
class PathState:
    stages: Tuple[int, ...]
    highest: int
    swaps: int


def next_stages(ps: PathState, live_stages: Sequence[int], need: int, rules: PathRules) -> List[int]:
    """Stages that may come next and still leave a rule-abiding completion (rules 1-2)."""
    out = []
    visited = set(ps.stages)
    for s in live_stages:
        if s in visited:
            continue
        if s > ps.highest:
            if s - ps.highest > rules.max_jump:
                continue
            nxt = PathState(ps.stages + (s,), s, ps.swaps)
        else:
            if ps.highest - s > rules.max_swap_distance or ps.swaps >= rules.max_swaps:
                continue
            nxt = PathState(ps.stages + (s,), ps.highest, ps.swaps + 1)
        if completable(nxt, live_stages, need - 1, rules):
            out.append(s)
    return out


def completable(ps: PathState, live_stages: Sequence[int], need: int, rules: PathRules) -> bool:
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


def advance(ps: PathState, stage: int) -> PathState:
    if stage > ps.highest:
        return PathState(ps.stages + (stage,), stage, ps.swaps)
    return PathState(ps.stages + (stage,), ps.highest, ps.swaps + 1)


class Capacity:
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
