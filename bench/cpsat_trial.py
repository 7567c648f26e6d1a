"""Trial (issue 13): does an exact solver improve on the ``skippipe`` routing search?

    pip install --target /tmp/ortlib ortools    # not a dependency of the project
    PYTHONPATH=/tmp/ortlib OMP_NUM_THREADS=1 .venv/bin/python bench/cpsat_trial.py [--limit-s 30] [--count 8]

For each problem (the reference's geo20, the paper's geo20 and the plan suite's problems with at
most ``--max-nodes`` nodes), our planner gives an allocation and a plan. OR-Tools CP-SAT then gets
the same allocation and each microbatch's sequence of stages from that plan, and chooses the
replica of every visit and the start of every action: optional intervals per (visit, replica)
with no overlap per node, transfers as delays between consecutive actions (the replicas chosen on
both ends), each node's memory slots as a cumulative from a visit's forward start to its backward
end, each stage's all-reduce after its last action (``cost.grad_sync``), the makespan minimised.
It starts from our plan (a hint), so it can only improve on it; its proven bound is a lower bound
for that sub-problem (allocation and stage sequences fixed), not for the whole problem. Its
schedule becomes a plan (paths + ``node_order``) and our simulator times it, so both numbers are the
same simulator's. Prints a table and writes bench/results/cpsat_trial.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from skippipe.config import load_config  # noqa: E402
from skippipe.plan import MicrobatchRoute, PathRules, Plan, check_plan  # noqa: E402
from skippipe.schedule import allocate, as_params, build_cost  # noqa: E402
from skippipe.schedule.coallocate import allocate_by_plan  # noqa: E402
from skippipe.simulate import simulate  # noqa: E402

SCALE = 100_000  # CP-SAT works on integers: units of 10 us, every time rounded down (so our plan's
# schedule, the hint, stays feasible: floor(a + b) >= floor(a) + floor(b))


def solve(plan: Plan, cost, memory: int, limit_s: float, workers: int, hinted: bool = True):
    """CP-SAT on ``plan``'s allocation and stage sequences (module docstring); returns (plan, info)."""
    from ortools.sat.python import cp_model

    stage_of = plan.stage_of()
    ms = lambda s: int(math.floor(s * SCALE))  # noqa: E731
    tl = simulate(plan, cost, memory)
    hint = {(node, mb, phase): (start, end) for node, mb, phase, start, end in tl.events}
    horizon = ms(tl.makespan_s) * 3 + 1
    m = cp_model.CpModel()
    hint_var = m.AddHint if hinted else (lambda *_: None)  # without: the solver on its own
    on_node: dict = {}  # node -> intervals
    holds: dict = {}  # node -> (interval, demand) of memory slots
    ends = []
    stage_actions: dict = {}  # stage -> end vars of actions on its nodes (with presence)
    chosen_vars: dict = {}
    acts: list = []  # (node, microbatch, phase, start var, presence literal or None)

    def action(node, mb_id, phase, dur):
        start = m.NewIntVar(0, horizon, f"s{mb_id}{phase}{node}")
        on_node.setdefault(node, []).append(m.NewFixedSizeIntervalVar(start, dur, f"i{mb_id}{phase}{node}"))
        acts.append((node, mb_id, phase, start, None))
        return start

    for mb in plan.microbatches:
        o, stages = mb.originator, [stage_of[n] for n in mb.path]
        cands = [plan.allocation[k] for k in stages]
        x = [{r: m.NewBoolVar(f"x{mb.id}_{p}_{r}") for r in cand} for p, cand in enumerate(cands)]
        for p, row in enumerate(x):
            m.AddExactlyOne(row.values())
            for r, var in row.items():
                hint_var(var, int(r == mb.path[p]))
        chosen_vars[mb.id] = x
        d = lambda n, k, ph: ms(cost.compute_s(n, k, ph))  # noqa: E731
        f0 = action(o, mb.id, "F", d(o, 0, "F"))
        hint_var(f0, ms(hint[(o, mb.id, "F")][0]))
        f0_end = f0 + d(o, 0, "F")
        prev_end, prev = f0_end, {o: None}  # prev: node -> literal of it being the previous node
        fwd_starts, fwd_ends = [], []
        for p, row in enumerate(x):
            k = stages[p]
            start = m.NewIntVar(0, horizon, f"fs{mb.id}_{p}")
            end = m.NewIntVar(0, horizon, f"fe{mb.id}_{p}")
            hint_var(start, ms(hint[(mb.path[p], mb.id, "F")][0]))
            for r, var in row.items():
                interval = m.NewOptionalFixedSizeIntervalVar(start, d(r, k, "F"), var, f"F{mb.id}_{p}_{r}")
                on_node.setdefault(r, []).append(interval)
                acts.append((r, mb.id, "F", start, var))
                m.Add(end == start + d(r, k, "F")).OnlyEnforceIf(var)
                for q, lit in prev.items():
                    lits = [var] + ([lit] if lit is not None else [])
                    m.Add(start >= prev_end + ms(cost.transfer_s(q, r))).OnlyEnforceIf(lits)
            prev_end, prev = end, dict(row)
            fwd_starts.append(start)
            fwd_ends.append(end)
        loss = action(o, mb.id, "L", d(o, 0, "L"))
        hint_var(loss, ms(hint[(o, mb.id, "L")][0]))
        for q, lit in prev.items():
            m.Add(loss >= prev_end + ms(cost.transfer_s(q, o))).OnlyEnforceIf([lit] if lit is not None else [])
        prev_end, prev = loss + d(o, 0, "L"), {o: None}
        bwd_ends = [None] * len(x)
        for p in reversed(range(len(x))):
            k, row = stages[p], x[p]
            start = m.NewIntVar(0, horizon, f"bs{mb.id}_{p}")
            end = m.NewIntVar(0, horizon, f"be{mb.id}_{p}")
            hint_var(start, ms(hint[(mb.path[p], mb.id, "B")][0]))
            for r, var in row.items():
                interval = m.NewOptionalFixedSizeIntervalVar(start, d(r, k, "B"), var, f"B{mb.id}_{p}_{r}")
                on_node.setdefault(r, []).append(interval)
                acts.append((r, mb.id, "B", start, var))
                m.Add(end == start + d(r, k, "B")).OnlyEnforceIf(var)
                for q, lit in prev.items():
                    lits = [var] + ([lit] if lit is not None else [])
                    m.Add(start >= prev_end + ms(cost.transfer_s(q, r))).OnlyEnforceIf(lits)
                size = m.NewIntVar(0, horizon, f"h{mb.id}_{p}_{r}")
                hold = m.NewOptionalIntervalVar(fwd_starts[p], size, end, var, f"H{mb.id}_{p}_{r}")
                holds.setdefault(r, []).append(hold)
                stage_actions.setdefault(k, []).append((end, var))
            prev_end, prev = end, dict(row)
            bwd_ends[p] = end
        b0 = action(o, mb.id, "B", d(o, 0, "B"))
        hint_var(b0, ms(hint[(o, mb.id, "B")][0]))
        for q, lit in prev.items():
            m.Add(b0 >= prev_end + ms(cost.transfer_s(q, o))).OnlyEnforceIf([lit] if lit is not None else [])
        b0_end = b0 + d(o, 0, "B")
        size = m.NewIntVar(0, horizon, f"h0{mb.id}")
        m.Add(size == b0_end - f0)
        holds.setdefault(o, []).append(m.NewIntervalVar(f0, size, b0_end, f"H0{mb.id}"))
        ends.append(b0_end)
        stage_actions.setdefault(0, []).append((b0_end, None))
    for intervals in on_node.values():
        m.AddNoOverlap(intervals)
    for intervals in holds.values():
        m.AddCumulative(intervals, [1] * len(intervals), memory)
    makespan = m.NewIntVar(0, horizon, "makespan")
    for e in ends:
        m.Add(makespan >= e)
    if getattr(cost, "grad_sync", False):
        for k, nodes in enumerate(plan.allocation):
            if len(nodes) > 1:
                reduce_ms = ms(cost.allreduce_s(k, nodes))
                for end, lit in stage_actions.get(k, []):
                    m.Add(makespan >= end + reduce_ms).OnlyEnforceIf([lit] if lit is not None else [])
    m.Minimize(makespan)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = limit_s
    solver.parameters.num_workers = workers
    started = time.perf_counter()
    status = solver.Solve(m)
    info = {"status": solver.StatusName(status), "solve_s": time.perf_counter() - started,
            "cpsat_objective_s": solver.ObjectiveValue() / SCALE if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) else None,
            "cpsat_bound_s": solver.BestObjectiveBound() / SCALE}
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, info
    # the schedule as a plan: chosen replicas, and each node's actions in CP-SAT's start order
    routes = []
    for mb in plan.microbatches:
        path = [next(r for r, var in row.items() if solver.Value(var)) for row in chosen_vars[mb.id]]
        routes.append(MicrobatchRoute(mb.id, mb.originator, path, 0.0))
    order: dict = {}
    for node, mb_id, phase, start, lit in acts:
        if lit is None or solver.BooleanValue(lit):
            order.setdefault(node, []).append((solver.Value(start), mb_id, phase))
    node_order = {n: [(mb, ph) for _, mb, ph in sorted(acts)] for n, acts in order.items()}
    out = Plan("cpsat", plan.num_stages, plan.stages_visited, plan.allocation, routes, node_order=node_order,
               extra={"memory": memory})
    out.predicted_makespan_s = simulate(out, cost, memory).makespan_s
    return out, info


def problems(count: int, max_nodes: int):
    from plan_suite import _load, problem

    yield "reference_geo20", load_config(str(ROOT / "configs/reference_geo20.yaml"), [])
    yield "paper_geo20", load_config(str(ROOT / "configs/paper_geo20.yaml"), [])
    seed, taken = 0, 0
    while taken < count and seed < 200:
        body = problem(seed)
        if body["_meta"]["nodes"] <= max_nodes:
            taken += 1
            yield f"p{seed:03d}", _load(body)
        seed += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-s", type=float, default=30.0, help="CP-SAT time limit per problem")
    parser.add_argument("--workers", type=int, default=1, help="CP-SAT search workers")
    parser.add_argument("--count", type=int, default=6, help="plan-suite problems (the first with few nodes)")
    parser.add_argument("--max-nodes", type=int, default=24, help="largest plan-suite problem taken")
    args = parser.parse_args()
    rows = []
    print(f"{'problem':<16} {'nodes':>5} {'mbs':>4} {'ours s':>8} {'plan s':>7} {'alone s':>8} {'cp-sat s':>9} "
          f"{'change':>8} {'cp obj':>8} {'cp bound':>9} {'status':>9} {'solve s':>8}")
    for name, cfg in problems(args.count, args.max_nodes):
        topology, _, cost = build_cost(cfg)
        params = as_params(cfg)
        started = time.perf_counter()
        allocation, plan, _ = allocate_by_plan(topology, cost, params, dtfm=allocate(topology, cost, params))
        plan_s = time.perf_counter() - started
        memory = plan.extra.get("memory") if isinstance(plan.extra.get("memory"), int) else params.memory
        ours = simulate(plan, cost, memory).makespan_s
        alone, alone_info = solve(plan, cost, memory, args.limit_s, args.workers, hinted=False)
        better, info = solve(plan, cost, memory, args.limit_s, args.workers)
        for candidate in (alone, better):
            if candidate is not None:
                check_plan(candidate, PathRules.from_config(cfg.schedule))
        theirs = better.predicted_makespan_s if better is not None else None
        row = {"problem": name, "nodes": len(topology.names()), "microbatches": len(plan.microbatches),
               "ours_s": ours, "plan_s": plan_s, "cpsat_s": theirs,
               "change": None if theirs is None else theirs / ours - 1.0, **info,
               "alone_s": alone.predicted_makespan_s if alone is not None else None,
               "alone_change": None if alone is None else alone.predicted_makespan_s / ours - 1.0,
               "alone_status": alone_info["status"]}
        rows.append(row)
        change = "-" if theirs is None else f"{100 * row['change']:+.1f}%"
        alone_s = row["alone_s"] if row["alone_s"] is not None else float("nan")
        print(f"{name:<16} {row['nodes']:>5} {row['microbatches']:>4} {ours:>8.2f} {plan_s:>7.1f} {alone_s:>8.2f} "
              f"{theirs if theirs is not None else float('nan'):>9.2f} {change:>8} "
              f"{info['cpsat_objective_s'] if info['cpsat_objective_s'] is not None else float('nan'):>8.2f} "
              f"{info['cpsat_bound_s']:>9.2f} "
              f"{info['status']:>9} {info['solve_s']:>8.1f}", flush=True)
    changes = [r["change"] for r in rows if r["change"] is not None]
    alone = [r["alone_change"] for r in rows if r["alone_change"] is not None]
    summary = {"alone_median_change": statistics.median(alone) if alone else None,
               "alone_solved": len(alone), "median_change": statistics.median(changes) if changes else None,
               "best_change": min(changes) if changes else None, "solved": len(changes), "problems": len(rows)}
    print(f"CP-SAT ({args.limit_s:.0f} s, {args.workers} worker(s), from our plan): median change "
          f"{100 * summary['median_change']:+.1f}%, best {100 * summary['best_change']:+.1f}% "
          f"on {summary['solved']}/{summary['problems']} problems; on its own (no hint): median change "
          + (f"{100 * summary['alone_median_change']:+.1f}%" if alone else "-")
          + f", a solution on {summary['alone_solved']}/{summary['problems']}")
    out = ROOT / "bench" / "results" / "cpsat_trial.json"
    out.write_text(json.dumps({"machine": {"python": platform.python_version(), "platform": platform.platform(),
                                           "cpus": os.cpu_count(), "load_average": os.getloadavg()},
                               "args": vars(args), "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
