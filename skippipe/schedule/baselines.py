"""The baselines' paths (SkipPipe arXiv 2502.19913 section 5; DESIGN.md 5).

- ``full`` (DT-FM baseline): every microbatch visits every live stage in order. The reference
  idles surplus stage-0 nodes; here every stage-0 node starts its own microbatches and pipeline r
  (originator r) uses replica ``r mod replicas`` of each stage (the allocation aligns replica r of
  consecutive stages by a minimum-cost matching), so all methods train the same microbatches (ids
  are originator-major and do not depend on routing).
- ``random_skip``: random stages and replicas under rules 1-3 (cost agnostic).
- ``skippipe_nc``: cheapest paths by static link + compute cost under rules 1-3, blind to time.
"""

from __future__ import annotations

import logging
import random
from typing import Dict, List, Optional

from skippipe.plan import PathRules, path_rule_violation
from skippipe.schedule.problem import (
    Problem,
    beam_path,
    capacity_for,
    fallback_path,
    feasible,
    insertion_order,
    rules_for,
    search_effort,
    stages_with_room,
)
from skippipe.schedule.space import Capacity, PathState, advance, next_stages

log = logging.getLogger(__name__)


def full_pipelines(prob: Problem) -> Dict[int, List[str]]:
    """DT-FM pipelines (the ``full`` baseline): microbatch id -> its aligned pipeline.

    Pipeline r is replica ``r mod replicas`` of every live stage (the allocation aligns them by
    successive matchings). Each originator first gets a home pipeline by a minimum-cost assignment
    on the first and closing links (originator -> first stage, last stage -> originator, where the
    loss is); then the microbatches are spread so that no pipeline carries more than
    ceil(M / pipelines) (as the reference's baseline sends the same number through each), a
    microbatch leaving its home pipeline only when the load requires it (a 1 s penalty per
    microbatch in the assignment). Without this a pipeline's closing link is never looked at and
    can be the 132 s NL-London link of the GCP table, and surplus originators overload a few
    pipelines: both would make ``full`` unfairly slow.
    """
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    stages = prob.live_stages
    mbs = sorted(prob.mbs)
    origs = prob.originators
    if not stages:
        return {mb_id: [] for mb_id, _, _ in mbs}
    count = max(len(prob.live[k]) for k in stages)
    pipes = [[prob.live[k][r % len(prob.live[k])] for k in stages] for r in range(count)]
    link = np.array([[prob.transfer(o, p[0]) + prob.transfer(p[-1], o) for p in pipes] for o in origs])
    per_orig = -(-len(origs) // count)
    rows, cols = linear_sum_assignment(np.repeat(link, per_orig, axis=1))
    home = {origs[i]: c // per_orig for i, c in zip(rows, cols)}
    per_pipe = -(-len(mbs) // count)
    index = {o: i for i, o in enumerate(origs)}
    slots = np.arange(count * per_pipe) // per_pipe
    cost = np.array([link[index[orig]][slots] + 1.0 * (slots != home[orig]) + 1e-6 * (np.arange(len(slots)) % per_pipe)
                     for _, orig, _ in mbs])
    rows, cols = linear_sum_assignment(cost)
    return {mbs[i][0]: list(pipes[slots[c]]) for i, c in zip(rows, cols)}


def paths_full_skipping(prob: Problem, balanced: bool) -> Optional[Dict[int, List[str]]]:
    """The DT-FM pipelines of ``full``, each with the stages it must skip dropped: a construction
    for ``skippipe`` that inherits the allocation's aligned, region-coherent pipelines.

    The dropped stages are spread evenly along the pipeline; ``balanced`` rotates them with the
    microbatch (so every stage loses the same share of visits), otherwise each microbatch takes the
    legal rotation with the cheapest static path. None when no rotation meets the path rules (the
    max_jump of a stage that died), then the other constructions decide.
    """
    stages = prob.live_stages
    drop = len(stages) - (prob.visited - 1)
    rules = rules_for(prob)
    pipes = full_pipelines(prob)
    if drop <= 0:
        return pipes
    spaced = [round(i * len(stages) / drop) for i in range(drop)]
    legal = []
    for shift in range(len(stages)):
        dropped = {(shift + d) % len(stages) for d in spaced}
        keep = [i for i in range(len(stages)) if i not in dropped]
        if path_rule_violation([stages[i] for i in keep], len(prob.live), prob.visited, rules) is None:
            legal.append(keep)
    if not legal:
        return None
    paths = {}
    for index, (mb_id, orig, _) in enumerate(sorted(prob.mbs)):
        pipe = pipes[mb_id]
        if balanced:
            keep = legal[index % len(legal)]
        else:
            keep = min(legal, key=lambda k: prob.static_cost(orig, [pipe[i] for i in k]))
        paths[mb_id] = [pipe[i] for i in keep]
    return paths


def paths_full(prob: Problem, rng: random.Random) -> Dict[int, List[str]]:
    return full_pipelines(prob)


def random_stage_walk(prob: Problem, cap: Capacity, wave: int, rules: PathRules, rng: random.Random):
    """The stages with most TC1 room (random ties), in ascending order with random legal swaps."""
    stages = stages_with_room(prob, cap, wave, rules)
    room = {s: cap.stage_room(wave, s) for s in stages}
    chosen = sorted(sorted(stages, key=lambda s: (-room[s], rng.random()))[:prob.visited - 1])
    if path_rule_violation(chosen, len(prob.live), prob.visited, rules) is not None:
        chosen = None
    if chosen is None:  # fall back to a random walk over the stages with room
        ps = PathState((), 0, 0)
        while len(ps.stages) < prob.visited - 1:
            ps = advance(ps, rng.choice(next_stages(ps, stages, prob.visited - 1 - len(ps.stages), rules)))
        return list(ps.stages)
    for _ in range(rules.max_swaps):
        i = rng.randrange(len(chosen))
        if i + 1 < len(chosen) and rng.random() < 0.5:
            trial = chosen[:i] + [chosen[i + 1], chosen[i]] + chosen[i + 2:]
            if path_rule_violation(trial, len(prob.live), prob.visited, rules) is None:
                chosen = trial
    return chosen


def paths_random(prob: Problem, rng: random.Random) -> Dict[int, List[str]]:
    """DT-FM skip baseline: cost-agnostic random paths under rules 1-3."""
    cap, rules = capacity_for(prob), rules_for(prob)
    paths = {}
    for mb_id, _orig, wave in prob.mbs:
        stages = random_stage_walk(prob, cap, wave, rules, rng)
        nodes = []
        for stage in stages:
            free = [n for n in prob.live[stage] if cap.node_ok(wave, n)]
            if not free:
                cap.overflows += 1
            nodes.append(rng.choice(free or prob.live[stage]))
        cap.add(wave, stages, nodes)
        paths[mb_id] = nodes
    return paths


def paths_nc(prob: Problem, rng: random.Random, static_iterations: Optional[int] = None) -> Dict[int, List[str]]:
    """Cheapest static paths (link + compute), load spread by TC1 counts; blind to collisions.

    Greedy insertion, then a local search on static path times (worst path, then their sum), as
    the reference's collision-blind CBS minimises its agents' static finish times.
    """
    if static_iterations is None:
        static_iterations = search_effort(prob)["static"]
    cap, rules = capacity_for(prob), rules_for(prob)

    load: Dict[str, int] = {}

    def hop_time(prev, node, stage, t):
        # static cost of the hop (forward + backward compute, link), spread by the load so far
        return t + prob.transfer(prev, node) + 2.5 * prob.compute_s(node, stage) * (1 + load.get(node, 0))

    paths: Dict[int, List[str]] = {}
    for mb_id, orig, wave in insertion_order(prob, rng, 0):
        chosen = None
        for _, ps, nodes in beam_path(prob, cap, rules, orig, wave, 0.0, hop_time, width=8, replicas=8):
            if feasible(cap, wave, ps, nodes):
                chosen = (list(ps.stages), nodes)
                break
        stages, nodes = chosen or fallback_path(prob, cap, rules, orig, wave)
        cap.add(wave, stages, nodes)
        for node in nodes:
            load[node] = load.get(node, 0) + 1
        paths[mb_id] = nodes
    if static_iterations:
        # repair: greedy insertion under exact TC1 can leave the last microbatches of a wave only
        # far-away replicas; exchanges between microbatches (collision blind: static path times)
        from skippipe.schedule.search import improve

        result = improve(prob, paths, {}, random.Random(f"nc:{len(prob.mbs)}"), static_iterations, float("inf"),
                         None, simulated=False, pool_width=search_effort(prob)["pool"])
        log.debug("skippipe_nc static search: %s after %d evaluations (%d accepted)", result.key,
                  result.iterations, result.accepted)
        paths = result.paths
        prob.capacity = result.capacity
    return paths
