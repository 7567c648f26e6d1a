"""Local search over a complete routing plan, scored by the simulator (SkipPipe TC2, arXiv 2502.19913).

The reference improves paths with a conflict-based search whose candidates it scores with its
simulator. Here a complete, TC1-feasible plan is improved one microbatch at a time: a move changes
one microbatch's path (another cheap path of its originator, another replica of one stage, another
stage, two stages visited in the other order) or its start time, or exchanges a replica, a stage or
the whole path with another microbatch of the same wave (which keeps every TC1 count unchanged).
Each move is simulated (readiness order, event driven) and kept when it lowers a soft maximum of
the microbatch finish times (the makespan plus a term for the microbatches finishing close to it;
the makespan alone is a plateau); ties: a smaller sum of finish times. A move that would overfill
a TC1 count hands the nodes it takes to other microbatches of the wave (``_with_ejections``).
The same moves, scored by static path times instead of the simulator, make ``skippipe_nc``'s
collision-blind repair. Moves are drawn from a generator seeded by (seed, step, method), half of
them on the microbatches that finish last; the number of evaluations is fixed by the problem size
(``problem.search_effort``), so results never depend on machine speed. A deadline is only a safety
cap. Tried and dropped (no gain on geo20): simulated annealing, a backward-first dispatch policy,
a static proxy for same-originator queueing.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from skippipe.errors import PlanError
from skippipe.plan import Plan, path_rule_violation
from skippipe.schedule.problem import beam_path, capacity_for, rules_for
from skippipe.simulate import simulate

_SOFTMAX_S = 0.5  # temperature of the soft maximum over microbatch finish times (seconds)
_MOVES = (("exchange_replica", 3), ("exchange_stage", 2), ("exchange_path", 2), ("reorder", 1),
          ("replica", 2), ("reroute", 2), ("substitute", 1), ("shift", 2))


@dataclass
class SearchResult:
    paths: Dict[int, List[str]]
    starts: Dict[int, float]
    key: Tuple[float, float]
    payload: object  # (plan, timeline) of the best plan when simulated
    capacity: object
    iterations: int
    accepted: int
    capped: bool


class _State:
    """Paths, start times and the TC1 counts of a complete plan."""

    def __init__(self, prob, paths: Dict[int, List[str]], starts: Dict[int, float]):
        self.prob = prob
        self.paths = {k: list(v) for k, v in paths.items()}
        self.starts = {mb: float(starts.get(mb, 0.0)) for mb, _, _ in prob.mbs}
        self.wave = {mb: w for mb, _, w in prob.mbs}
        self.orig = {mb: o for mb, o, _ in prob.mbs}
        self.cap = capacity_for(prob)
        for mb, _, wave in prob.mbs:
            self.cap.add(wave, self.stages(self.paths[mb]), self.paths[mb])
        self.by_wave: Dict[int, List[int]] = {}
        for mb, _, wave in sorted(prob.mbs):
            self.by_wave.setdefault(wave, []).append(mb)

    def stages(self, nodes: Sequence[str]) -> List[int]:
        return [self.prob.stage_of[n] for n in nodes]

    def legal(self, stages: Sequence[int]) -> bool:
        prob = self.prob
        return path_rule_violation(stages, len(prob.live), prob.visited, rules_for(prob)) is None

    def capacity_ok(self, changes: Dict[int, List[str]]) -> bool:
        """Would replacing these paths keep every TC1 count within its limit?"""
        cap = self.cap
        for mb in changes:
            old = self.paths[mb]
            cap.remove(self.wave[mb], self.stages(old), old)
        ok = True
        for mb, new in changes.items():
            wave = self.wave[mb]
            stages = self.stages(new)
            if not cap.fits(wave, stages, new):
                ok = False
            cap.add(wave, stages, new)
        for mb, new in changes.items():
            cap.remove(self.wave[mb], self.stages(new), new)
        for mb in changes:
            old = self.paths[mb]
            cap.add(self.wave[mb], self.stages(old), old)
        return ok

    def apply(self, changes: Dict[int, List[str]], starts: Dict[int, float]) -> None:
        for mb, new in changes.items():
            old = self.paths[mb]
            self.cap.remove(self.wave[mb], self.stages(old), old)
            self.cap.add(self.wave[mb], self.stages(new), new)
            self.paths[mb] = list(new)
        self.starts.update(starts)


def _with_ejections(state: _State, mb: int, new: List[str], rng: random.Random) -> Optional[Dict[int, List[str]]]:
    """``{mb: new}``, plus ejections when that overfills a TC1 count of the wave.

    With capacity exactly used up (the paper's geo20: 3 replicas x memory 3 = 9 visits per stage
    and wave, and 15 microbatches x 3 stages = 45 = 5 x 9), no single path can change alone. Each
    node the new path adds is then taken from another microbatch of the wave, which gets a node the
    old path frees in exchange (same stage first, else another stage, kept legal).
    """
    changes = {mb: list(new)}
    if state.capacity_ok(changes):
        return changes
    stage_of = state.prob.stage_of
    old = state.paths[mb]
    freed = [n for n in old if n not in new]
    for x in [n for n in new if n not in old]:
        sx = stage_of[x]
        options = [y for y in freed if stage_of[y] == sx] or list(freed)
        done = False
        for y in options:
            sy = stage_of[y]
            victims = [m for m in state.by_wave[state.wave[mb]] if m not in changes and x in state.paths[m]
                       and (sy == sx or sy not in state.stages(state.paths[m]))]
            rng.shuffle(victims)
            for m in victims:
                trial = [y if n == x else n for n in state.paths[m]]
                trial = _legalise(state, trial)
                if trial is not None:
                    changes[m] = trial
                    freed.remove(y)
                    done = True
                    break
            if done:
                break
        if not done:
            return None
    return changes if state.capacity_ok(changes) else None


def _pool(prob, width: int) -> Dict[str, List[List[str]]]:
    """Per originator, its cheapest rule-abiding paths by static (collision-free) cost."""
    rules = rules_for(prob)
    out = {}
    for orig in prob.originators:
        def hop(prev, node, stage, t):
            return t + 2 * prob.transfer(prev, node) + prob.compute_s(node, stage, "F") + prob.compute_s(node, stage, "B")
        found = beam_path(prob, None, rules, orig, 0, 0.0, hop, width=width, replicas=max(3, width // 2))
        out[orig] = [nodes for _, _, nodes in found]
    return out


def _simulated(prob, build):
    """Score of a plan: (simulated makespan, sum of microbatch finish times), per-mb finish times."""
    def evaluate(paths, starts):
        plan = build(paths, starts)
        try:
            tl = simulate(plan, prob.cost, prob.memory, prob.slow, use_order=False)
        except PlanError:  # readiness order can deadlock with swaps and tight memory
            return None
        ends: Dict[int, float] = {}
        for _node, mb, _phase, _start, end in tl.events:
            if end > ends.get(mb, 0.0):
                ends[mb] = end
        # a soft maximum: moves that shorten the microbatches finishing near the end count even
        # when the single latest one does not move (the makespan alone is a plateau)
        # (relative to the latest finish, not the makespan: an all-reduce can end far later)
        latest = max(ends.values())
        soft = tl.makespan_s + _SOFTMAX_S * math.log(sum(math.exp((e - latest) / _SOFTMAX_S) for e in ends.values()))
        return (soft, sum(ends.values())), ends, (plan, tl)
    return evaluate


def _static(prob, orig_of):
    """Collision-blind score: (latest estimated originator finish, sum of static path times).

    An originator runs ``memory`` microbatches at a time, so its microbatches form ``memory``
    chains (index mod memory), each started one stage-0 forward after the previous; a chain takes
    the sum of its microbatches' static (collision-free) path times. Only the originator's own
    memory is modelled, never other microbatches on shared nodes: the score is blind to collisions.
    """
    memo: Dict[Tuple[str, Tuple[str, ...]], float] = {}
    chains: Dict[Tuple[str, int], List[int]] = {}
    first = {}
    for mb, orig, _wave in sorted(prob.mbs):
        index = len(first.setdefault(orig, []))
        first[orig].append(mb)
        chains.setdefault((orig, index % prob.memory), []).append(mb)
    offset = {(o, c): c * prob.compute_s(o, 0, "F") for o, c in chains}
    def evaluate(paths, starts):
        costs = {}
        for mb, nodes in paths.items():
            key = (orig_of[mb], tuple(nodes))
            value = memo.get(key)
            if value is None:
                value = memo[key] = prob.static_cost(*key)
            costs[mb] = value
        finish = {}
        for chain, members in chains.items():
            end = offset[chain] + sum(costs[m] for m in members)
            for m in members:
                finish[m] = end
        return (max(finish.values()), sum(costs.values())), finish, None
    return evaluate


def _better(new: Tuple[float, float], old: Tuple[float, float]) -> bool:
    if new[0] < old[0] - 1e-9:
        return True
    return new[0] <= old[0] + 1e-9 and new[1] < old[1] - 1e-9


def improve(prob, paths, starts, rng: random.Random, iterations: int, deadline: float,
            build: Callable[[Dict[int, List[str]], Dict[int, float]], Plan], *, simulated: bool = True,
            pool_width: int = 16, anneal: float = 0.0) -> SearchResult:
    """Improve (paths, starts) for ``iterations`` evaluations (module docstring).

    ``simulated``: score with the simulator (TC2), else with static path times (collision blind,
    no start-time moves). ``anneal`` > 0: simulated annealing on makespan + mean finish time /
    10, from a temperature of ``anneal`` x the first makespan down to 0; the best plan seen wins.
    """
    state = _State(prob, paths, starts)
    pool = _pool(prob, pool_width)
    mbs = [mb for mb, _, _ in prob.mbs]
    evaluate = _simulated(prob, build) if simulated else _static(prob, state.orig)
    current = evaluate(state.paths, state.starts)
    if current is None:
        raise PlanError("skippipe search: the seed plan deadlocks in readiness order")
    key, per_mb, payload = current
    best = (key, dict(state.paths), dict(state.starts), payload)
    temp0 = anneal * key[0]
    ranked = sorted(mbs, key=lambda m: (-per_mb.get(m, 0.0), m))
    moves = [(n, w) for n, w in _MOVES if simulated or n != "shift"]
    names, weights = [n for n, _ in moves], [w for _, w in moves]
    evaluations, attempts, accepted, capped = 0, 0, 0, False
    max_attempts = 6 * iterations
    while evaluations < iterations and attempts < max_attempts:
        attempts += 1
        if attempts % 16 == 0 and time.perf_counter() > deadline:
            capped = True
            break
        mb = _pick(rng, ranked, mbs)
        proposal = _PROPOSERS[rng.choices(names, weights)[0]](state, mb, rng, pool)
        if proposal is None:
            continue
        changes, new_starts = proposal
        if changes and not state.capacity_ok(changes):
            continue
        trial_paths = dict(state.paths)
        trial_paths.update(changes)
        trial_starts = dict(state.starts)
        trial_starts.update(new_starts)
        evaluations += 1
        result = evaluate(trial_paths, trial_starts)
        if result is None:
            continue
        temp = temp0 * (1.0 - evaluations / iterations)
        if not (_better(result[0], key) or _annealed(rng, result[0], key, temp, len(mbs))):
            continue
        state.apply(changes, new_starts)
        key, per_mb, payload = result
        ranked = sorted(mbs, key=lambda m: (-per_mb.get(m, 0.0), m))
        accepted += 1
        if _better(key, best[0]):
            best = (key, dict(state.paths), dict(state.starts), payload)
    state = _State(prob, best[1], best[2])
    return SearchResult(state.paths, state.starts, best[0], best[3], state.cap, evaluations, accepted, capped)


def _pick(rng: random.Random, ranked: List[int], mbs: List[int]) -> int:
    """The microbatch to move: half the time one of the latest finishers (first eighth of ``ranked``), else any."""
    if rng.random() < 0.5:
        return ranked[rng.randrange(max(2, len(ranked) // 8))] if len(ranked) > 1 else ranked[0]
    return mbs[rng.randrange(len(mbs))]


def _annealed(rng: random.Random, new: Tuple[float, float], old: Tuple[float, float], temp: float, count: int) -> bool:
    """Whether annealing keeps a move that is not better: never at temperature <= 0, else with exp(-delta / temp)."""
    delta = _scalar(new, count) - _scalar(old, count)
    return not (temp <= 0 or rng.random() >= math.exp(-delta / temp))


def _scalar(key: Tuple[float, float], count: int) -> float:
    """The annealing energy of a score: makespan + mean finish time / 10 over ``count`` microbatches."""
    return key[0] + key[1] / (10.0 * count)


# ------------------------------------------------------------------------------------------------
# moves: each returns ({mb: new path}, {mb: new start}) or None


def _same_wave_others(state: _State, mb: int) -> List[int]:
    return [m for m in state.by_wave[state.wave[mb]] if m != mb]


def _exchange_replica(state: _State, mb: int, rng, pool):
    path = state.paths[mb]
    i = rng.randrange(len(path))
    node, stage = path[i], state.prob.stage_of[path[i]]
    others = []
    for m in _same_wave_others(state, mb):
        for j, n in enumerate(state.paths[m]):
            if n != node and state.prob.stage_of[n] == stage and n not in path:
                if node not in state.paths[m]:
                    others.append((m, j))
    if not others:
        return None
    m, j = others[rng.randrange(len(others))]
    a, b = list(path), list(state.paths[m])
    a[i], b[j] = b[j], a[i]
    return {mb: a, m: b}, {}


def _exchange_stage(state: _State, mb: int, rng, pool):
    path = state.paths[mb]
    mine = state.stages(path)
    others = _same_wave_others(state, mb)
    rng.shuffle(others)
    for m in others[:6]:
        theirs = state.stages(state.paths[m])
        give = [s for s in mine if s not in theirs]
        take = [t for t in theirs if t not in mine]
        if not give or not take:
            continue
        s, t = rng.choice(give), rng.choice(take)
        i, j = mine.index(s), theirs.index(t)
        a, b = list(path), list(state.paths[m])
        a[i], b[j] = state.paths[m][j], path[i]
        a, b = _legalise(state, a), _legalise(state, b)
        if a is None or b is None:
            continue
        return {mb: a, m: b}, {}
    return None


def _legalise(state: _State, nodes: List[str]) -> Optional[List[str]]:
    """The nodes as given if their stage order is legal, else in ascending stage order, else None."""
    if state.legal(state.stages(nodes)):
        return nodes
    ordered = sorted(nodes, key=lambda n: state.prob.stage_of[n])
    return ordered if state.legal(state.stages(ordered)) else None


def _exchange_path(state: _State, mb: int, rng, pool):
    others = [m for m in _same_wave_others(state, mb) if state.paths[m] != state.paths[mb]]
    if not others:
        return None
    m = others[rng.randrange(len(others))]
    return {mb: list(state.paths[m]), m: list(state.paths[mb])}, {}


def _reorder(state: _State, mb: int, rng, pool):
    path = state.paths[mb]
    if len(path) < 2:
        return None
    i = rng.randrange(len(path) - 1)
    trial = path[:i] + [path[i + 1], path[i]] + path[i + 2:]
    if not state.legal(state.stages(trial)):
        return None
    return {mb: trial}, {}


def _replica(state: _State, mb: int, rng, pool):
    prob = state.prob
    path = state.paths[mb]
    orig = state.orig[mb]
    i = rng.randrange(len(path))
    stage = prob.stage_of[path[i]]
    prev = path[i - 1] if i else orig
    nxt = path[i + 1] if i + 1 < len(path) else orig
    cands = [n for n in prob.live[stage] if n != path[i]]
    if not cands:
        return None
    cands.sort(key=lambda n: (prob.transfer(prev, n) + prob.transfer(n, nxt), n))
    new = list(path)
    new[i] = cands[rng.randrange(min(3, len(cands)))]
    changes = _with_ejections(state, mb, new, rng)
    return None if changes is None else (changes, {})


def _reroute(state: _State, mb: int, rng, pool):
    options = [p for p in pool[state.orig[mb]] if p != state.paths[mb]]
    if not options:
        return None
    changes = _with_ejections(state, mb, list(options[rng.randrange(len(options))]), rng)
    return None if changes is None else (changes, {})


def _substitute(state: _State, mb: int, rng, pool):
    prob = state.prob
    path = state.paths[mb]
    orig = state.orig[mb]
    mine = state.stages(path)
    free = [t for t in prob.live_stages if t not in mine]
    if not free:
        return None
    i = rng.randrange(len(path))
    t = rng.choice(free)
    prev = path[i - 1] if i else orig
    nxt = path[i + 1] if i + 1 < len(path) else orig
    node = min(prob.live[t], key=lambda n: (prob.transfer(prev, n) + prob.transfer(n, nxt), n))
    new = list(path)
    new[i] = node
    new = _legalise(state, new)
    changes = None if new is None else _with_ejections(state, mb, new, rng)
    return None if changes is None else (changes, {})


def _shift(state: _State, mb: int, rng, pool):
    step = rng.choice((-4.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 4.0))
    start = max(0.0, state.starts[mb] + step)
    if start == state.starts[mb]:
        return None
    return {}, {mb: start}


_PROPOSERS = {"exchange_replica": _exchange_replica, "exchange_stage": _exchange_stage,
              "exchange_path": _exchange_path, "reorder": _reorder, "replica": _replica,
              "reroute": _reroute, "substitute": _substitute, "shift": _shift}
