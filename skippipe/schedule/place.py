"""Reservation table for timing microbatches on nodes (SkipPipe TC2, arXiv 2502.19913 section 4).

Each node is a single server: a list of busy intervals. Each node also has ``memory`` slots: a
microbatch holds one on a node from the start of its forward there to the end of its backward
there. ``place`` times one microbatch (forward along the path, loss at the originator, backward
along the reverse path) at the earliest times that fit both, without overlapping anything placed
before. A schedule built this way respects the memory limit at every instant, so running every
node's actions in the order of their reserved start times cannot deadlock, and finishes no later.
"""

from __future__ import annotations

import bisect
from typing import Dict, List, Optional, Tuple

Action = Tuple[str, int, str, float, float]  # (node, microbatch_id, phase, start_s, end_s)


class Reservations:
    def __init__(self, memory: int):
        self.memory = memory
        self.busy: Dict[str, List[Tuple[float, float]]] = {}
        self.windows: Dict[str, List[Tuple[float, float]]] = {}
        self.actions: List[Action] = []

    def earliest_fit(self, node: str, ready_s: float, dur_s: float) -> float:
        """Earliest start >= ready_s at which [start, start + dur) is free on ``node``."""
        intervals = self.busy.get(node)
        if not intervals:
            return ready_s
        t = ready_s
        i = max(0, bisect.bisect_left(intervals, (t, t)) - 1)
        for start, end in intervals[i:]:
            if end <= t:
                continue
            if start >= t + dur_s - 1e-12:
                return t
            t = max(t, end)
        return t

    def slot_free_from(self, node: str, start_s: float, end_s: float) -> Optional[float]:
        """None if a slot is free over [start, end); else the earliest later start to try."""
        windows = self.windows.get(node)
        if not windows:
            return None
        overlapping = [(s, e) for s, e in windows if s < end_s and e > start_s]
        if len(overlapping) < self.memory:
            return None
        # the count is only too high where memory windows overlap at once; check the peak
        points = sorted({start_s} | {s for s, _ in overlapping if s > start_s})
        for p in points:
            active = [e for s, e in overlapping if s <= p < e]
            if len(active) >= self.memory:
                active.sort()
                return active[len(active) - self.memory]
        return None

    def commit(self, actions: List[Action], windows: Dict[str, Tuple[float, float]]) -> None:
        for node, mb, phase, start, end in actions:
            bisect.insort(self.busy.setdefault(node, []), (start, end))
            self.actions.append((node, mb, phase, start, end))
        for node, window in windows.items():
            self.windows.setdefault(node, []).append(window)


def place(res: Reservations, cost, mb_id: int, originator: str, path: List[str], stages: List[int],
          t0_s: float, slow: Dict[str, float], max_tries: int = 30):
    """Time one microbatch; returns (end_s, actions, windows) without committing them."""
    not_before: Dict[str, float] = {}
    for _ in range(max_tries):
        actions, windows = _try_place(res, cost, mb_id, originator, path, stages, t0_s, slow, not_before)
        retry = False
        for node, (start, end) in windows.items():
            later = res.slot_free_from(node, start, end)
            if later is not None:
                not_before[node] = max(not_before.get(node, 0.0), later)
                retry = True
                break
        if not retry:
            return actions[-1][4], actions, windows
    return actions[-1][4], actions, windows  # memory may be exceeded: the simulator enforces it


def _try_place(res, cost, mb_id, originator, path, stages, t0_s, slow, not_before):
    nodes = [originator] + list(path)
    stage_list = [0] + list(stages)
    actions: List[Action] = []
    f_start: Dict[str, float] = {}
    t, prev = t0_s, None
    for node, stage in zip(nodes, stage_list):
        ready = t if prev is None else t + cost.transfer_s(prev, node)
        dur = cost.fwd_s(node, stage) * slow.get(node, 1.0)
        start = res.earliest_fit(node, max(ready, not_before.get(node, 0.0)), dur)
        actions.append((node, mb_id, "F", start, start + dur))
        f_start[node] = start
        t, prev = start + dur, node
    ready = t + cost.transfer_s(prev, originator)
    dur = cost.loss_s(originator) * slow.get(originator, 1.0)
    start = res.earliest_fit(originator, ready, dur)
    actions.append((originator, mb_id, "L", start, start + dur))
    t, prev = start + dur, originator
    windows: Dict[str, Tuple[float, float]] = {}
    for node, stage in reversed(list(zip(nodes, stage_list))):
        ready = t + cost.transfer_s(prev, node)
        dur = cost.bwd_s(node, stage) * slow.get(node, 1.0)
        start = res.earliest_fit(node, ready, dur)
        actions.append((node, mb_id, "B", start, start + dur))
        windows[node] = (f_start[node], start + dur)
        t, prev = start + dur, node
    return actions, windows
