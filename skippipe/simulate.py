"""Event-driven simulator of one iteration of a plan (DESIGN.md section 2, "Simulator").

Each microbatch runs, as a chain of actions: ``F`` on its originator (embedding + stage 0 block),
``F`` on every node of its path, ``L`` (head + loss) on the originator, ``B`` on the path in reverse,
``B`` on the originator. Between two nodes the chain waits ``cost.transfer_s``. Every node is a
single non-preemptive server with ``memory`` slots: a forward needs a free slot, which is freed when
that microbatch's backward on that node ends (SkipPipe's memory limit, TC1). After a stage's last
backward its replicas all-reduce gradients (``cost.allreduce_s``).

Node order: with ``plan.node_order`` every node runs its actions in exactly that order (what the
runtime does with blocking receives); otherwise a node runs ready work in order of readiness, ties by
microbatch id, skipping forwards while it has no free slot. A plan whose order cannot finish raises
PlanError (deadlock). Time is continuous (a heap of events), not bucketed as in the reference.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from skippipe.errors import PlanError
from skippipe.plan import Plan

_EPS = 1e-9
_PHASE_RANK = {"B": 0, "L": 1, "F": 2}
_RANK_PHASE = {rank: phase for phase, rank in _PHASE_RANK.items()}


@dataclass
class Timeline:
    makespan_s: float
    events: List[Tuple[str, int, str, float, float]]  # (node, microbatch_id, phase, start_s, end_s)
    busy_s: Dict[str, float]
    idle_s: Dict[str, float]
    collisions: int
    collision_list: List[dict] = field(default_factory=list)
    allreduce: List[Tuple[int, float, float]] = field(default_factory=list)  # (stage, start_s, end_s)
    compute_end_s: float = 0.0

    def order(self) -> Dict[str, List[Tuple[int, str]]]:
        """Per node, its actions (microbatch_id, phase) sorted by simulated start time."""
        out: Dict[str, List[Tuple[int, str]]] = {}
        for node, mb, phase, _start, _ in sorted(self.events, key=lambda e: (e[3], e[4], e[1])):
            out.setdefault(node, []).append((mb, phase))
        return out

    def mean_idle_fraction(self) -> float:
        if not self.idle_s or self.makespan_s <= 0:
            return 0.0
        return sum(self.idle_s.values()) / (len(self.idle_s) * self.makespan_s)

    def summary(self) -> dict:
        return {"makespan_s": self.makespan_s, "compute_end_s": self.compute_end_s,
                "collisions": self.collisions, "mean_idle_fraction": self.mean_idle_fraction(),
                "busy_s": dict(self.busy_s), "idle_s": dict(self.idle_s),
                "allreduce": [list(a) for a in self.allreduce]}


def action_chain(plan: Plan, mb, stage_of: Dict[str, int]) -> List[Tuple[str, str, int]]:
    """The actions of one microbatch as (node, phase, stage), in execution order."""
    fwd = [(mb.originator, "F", 0)] + [(n, "F", stage_of[n]) for n in mb.path]
    loss = [(mb.originator, "L", 0)]
    bwd = [(n, "B", stage_of[n]) for n in reversed(mb.path)] + [(mb.originator, "B", 0)]
    return fwd + loss + bwd


class _NodeState:
    __slots__ = ("busy", "slots", "ready_f", "ready_other", "order", "ptr", "ready_keys", "busy_s")

    def __init__(self):
        self.busy = False
        self.slots = 0
        self.ready_f: list = []
        self.ready_other: list = []
        self.order: Optional[List[Tuple[int, str]]] = None
        self.ptr = 0
        self.ready_keys: Dict[Tuple[int, str], tuple] = {}
        self.busy_s = 0.0


def simulate(plan: Plan, cost, memory: Optional[int] = None, slowdown: Optional[Dict[str, float]] = None,
             use_order: bool = True) -> Timeline:
    """Run ``plan`` on ``cost``; ``memory`` slots per node (None: plan.extra['memory'] or unlimited).

    ``Timeline.order()`` replayed as ``plan.node_order`` reproduces the timeline exactly.
    """
    if memory is None:
        memory = plan.extra.get("memory") if isinstance(plan.extra.get("memory"), int) else None
    cap = memory if memory is not None else 1 << 30
    slowdown = slowdown or {}
    stage_of = plan.stage_of()
    chains = {mb.id: action_chain(plan, mb, stage_of) for mb in plan.microbatches}
    durations = {mb_id: [cost.compute_s(n, k, ph) * slowdown.get(n, 1.0) for n, ph, k in chain]
                 for mb_id, chain in chains.items()}
    nodes: Dict[str, _NodeState] = {}
    for chain in chains.values():
        for node, _, _ in chain:
            nodes.setdefault(node, _NodeState())
    ordered = use_order and bool(plan.node_order)
    if ordered:
        _attach_order(plan, chains, nodes)

    heap: list = []
    seq = 0
    events: List[Tuple[str, int, str, float, float]] = []
    collisions: List[dict] = []

    def push(time_s, kind, payload):
        nonlocal seq
        heapq.heappush(heap, (time_s, seq, kind, payload))
        seq += 1

    for mb in plan.microbatches:
        push(mb.start_s, "ready", (mb.id, 0))
    done_actions = 0
    total_actions = sum(len(c) for c in chains.values())
    while heap:
        now, _, kind, payload = heapq.heappop(heap)
        if kind == "ready":
            mb_id, j = payload
            node, phase, _ = chains[mb_id][j]
            _make_ready(nodes[node], mb_id, j, phase, now)
        else:
            node, mb_id, j = payload
            state = nodes[node]
            state.busy = False
            done_actions += 1
            if chains[mb_id][j][1] == "B":
                state.slots -= 1
            chain = chains[mb_id]
            if j + 1 < len(chain):
                push(now + cost.transfer_s(node, chain[j + 1][0]), "ready", (mb_id, j + 1))
        _try_start(nodes, node, now, cap, ordered, durations, events, collisions, push)
    if done_actions != total_actions:
        stuck = sorted(n for n, s in nodes.items() if (s.ready_f or s.ready_other or
                                                      (s.order is not None and s.ptr < len(s.order))))
        raise PlanError(f"simulation deadlock: {total_actions - done_actions} actions never ran; "
                        f"nodes waiting: {', '.join(stuck[:6])} (memory={memory}); the node order or "
                        "the paths need a different order")
    return _finish(plan, cost, events, collisions, nodes)


def _attach_order(plan: Plan, chains, nodes: Dict[str, _NodeState]) -> None:
    needed: Dict[str, set] = {}
    for mb_id, chain in chains.items():
        for node, phase, _ in chain:
            needed.setdefault(node, set()).add((mb_id, phase))
    for node, acts in needed.items():
        order = [tuple(a) for a in plan.node_order.get(node, [])]
        if set(order) != acts or len(order) != len(acts):
            raise PlanError(f"plan: node_order of '{node}' does not list exactly its {len(acts)} actions")
        nodes[node].order = order


def _make_ready(state: _NodeState, mb_id: int, j: int, phase: str, now: float) -> None:
    key = (now, mb_id, _PHASE_RANK[phase], j)
    if state.order is not None:
        state.ready_keys[(mb_id, phase)] = key
    elif phase == "F":
        heapq.heappush(state.ready_f, key)
    else:
        heapq.heappush(state.ready_other, key)


def _pick(state: _NodeState, cap: int, ordered: bool):
    if ordered:
        if state.ptr >= len(state.order):
            return None
        mb_id, phase = state.order[state.ptr]
        key = state.ready_keys.get((mb_id, phase))
        if key is None or (phase == "F" and state.slots >= cap):
            return None
        state.ptr += 1
        del state.ready_keys[(mb_id, phase)]
        return key
    other = state.ready_other[0] if state.ready_other else None
    fwd = state.ready_f[0] if state.ready_f and state.slots < cap else None
    if fwd is not None and (other is None or fwd < other):
        return heapq.heappop(state.ready_f)
    if other is not None:
        return heapq.heappop(state.ready_other)
    return None


def _try_start(nodes, node, now, cap, ordered, durations, events, collisions, push) -> None:
    state = nodes[node]
    if state.busy:
        return
    key = _pick(state, cap, ordered)
    if key is None:
        return
    ready_s, mb_id, rank, j = key
    phase = _RANK_PHASE[rank]
    if phase == "F":
        state.slots += 1
    if now > ready_s + _EPS:
        collisions.append({"node": node, "microbatch": mb_id, "phase": phase, "ready_s": ready_s,
                           "start_s": now, "wait_s": now - ready_s})
    end = now + durations[mb_id][j]
    state.busy = True
    state.busy_s += end - now
    events.append((node, mb_id, phase, now, end))
    push(end, "done", (node, mb_id, j))


def _finish(plan: Plan, cost, events, collisions, nodes) -> Timeline:
    last_end: Dict[str, float] = {}
    for node, _, _, _, end in events:
        last_end[node] = max(last_end.get(node, 0.0), end)
    compute_end = max(last_end.values(), default=0.0)
    allreduce = []
    for stage, stage_nodes in enumerate(plan.allocation):
        worked = [n for n in stage_nodes if n in last_end]
        if len(stage_nodes) < 2 or not worked:
            continue
        start = max(last_end[n] for n in worked)
        allreduce.append((stage, start, start + cost.allreduce_s(stage, stage_nodes)))
    makespan = max([compute_end] + [end for _, _, end in allreduce])
    all_nodes = [n for stage_nodes in plan.allocation for n in stage_nodes]
    busy = {n: (nodes[n].busy_s if n in nodes else 0.0) for n in all_nodes}
    idle = {n: makespan - b for n, b in busy.items()}
    return Timeline(makespan, events, busy, idle, len(collisions), collisions, allreduce, compute_end)
