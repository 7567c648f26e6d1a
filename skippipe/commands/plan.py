"""``skippipe plan [CONFIG] [key=value ...] [--json] [--out F] [--gantt F.png]``.

Allocates once with DT-FM's objective for the baselines and by the routed plan for ``skippipe``
(``schedule.coallocate``), routes with all four methods (SkipPipe arXiv 2502.19913 section 5), simulates each
and prints a comparison; ``--out`` writes the plan of ``schedule.method`` (skippipe.plan.v1).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from skippipe.config import METHODS, load_config
from skippipe.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="config YAML (optional)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", help="write the plan of schedule.method here (JSON)")
    parser.add_argument("--gantt", help="draw the timeline of schedule.method here (PNG)")


def _split(args):
    """A first positional with '=' is an override, not a config file."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    return config, overrides


def plan_for_method(method: str, allocation, topology, cost, params):
    """The plan ``skippipe plan`` makes for ``method``: skippipe is judged by its routed plan
    (``schedule.coallocate``, starting from DT-FM's ``allocation``); the baselines keep DT-FM's
    allocation, as in the paper."""
    from skippipe.schedule import route
    from skippipe.schedule.coallocate import allocate_by_plan

    if params.allocator(method) == "plan":
        _, plan, _ = allocate_by_plan(topology, cost, params, dtfm=allocation)
        return plan
    return route(allocation, topology, cost, params, method=method)


def compare_methods(cfg) -> dict:
    """Allocate once, route and simulate every method.

    Returns {method: (plan, timeline, plan_time_s)} where plan_time_s is the shared allocation
    time plus that method's routing time (the time to make that plan from scratch); the routing
    time alone is in ``plan.extra['route_time_s']`` and the allocation time in
    ``plan.extra['allocation_time_s']``.
    """
    from skippipe.schedule import SchedulerParams, allocate, build_cost
    from skippipe.schedule.bound import config_bound
    from skippipe.simulate import simulate

    topology, _, cost = build_cost(cfg)
    params = SchedulerParams.from_config(cfg)
    bound = config_bound(params, topology, cost)
    t0 = time.perf_counter()
    allocation = allocate(topology, cost, params)
    alloc_s = time.perf_counter() - t0
    out = {}
    for method in METHODS:
        t1 = time.perf_counter()
        plan = plan_for_method(method, allocation, topology, cost, params)
        route_s = time.perf_counter() - t1
        plan.extra.update(route_time_s=route_s, allocation_time_s=alloc_s, lower_bound=bound.to_dict())
        timeline = simulate(plan, cost, cfg.schedule.memory)
        out[method] = (plan, timeline, alloc_s + route_s)
    return out


def summary(results: dict) -> dict:
    full_s = results["full"][1].makespan_s
    methods = {}
    for method, (plan, timeline, plan_s) in results.items():
        bound_s = plan.extra.get("lower_bound", {}).get("lower_bound_s")
        methods[method] = {
            "iteration_time_s": timeline.makespan_s,
            "reduction_vs_full": 1.0 - timeline.makespan_s / full_s if full_s > 0 else 0.0,
            "gap_to_bound": timeline.makespan_s / bound_s if bound_s else None,
            "collisions": timeline.collisions,
            "mean_idle_fraction": timeline.mean_idle_fraction(),
            "plan_time_s": plan_s,
            "route_time_s": plan.extra.get("route_time_s", plan_s),
            "allocation_time_s": plan.extra.get("allocation_time_s", 0.0),
            "stages_visited": plan.stages_visited,
            "microbatches": len(plan.microbatches),
        }
    return methods


def run(args) -> int:
    config, overrides = _split(args)
    cfg = load_config(config, overrides)
    if args.gantt and Path(args.gantt).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UserError(f"--gantt {args.gantt}: give a .png, .svg or .pdf path (the format follows the suffix)")
    results = compare_methods(cfg)
    methods = summary(results)
    plan, timeline, _ = results[cfg.schedule.method]
    if args.out:
        plan.save(args.out)
    if args.gantt:
        from skippipe.gantt import draw_gantt

        draw_gantt(timeline, args.gantt, f"{cfg.run.name}: {plan.method}, {timeline.makespan_s:.1f} s", plan=plan)
    if args.json:
        print(json.dumps({"config": config, "method": cfg.schedule.method, "allocation": plan.allocation,
                          "lower_bound_s": plan.extra["lower_bound"]["lower_bound_s"],
                          "lower_bound": plan.extra["lower_bound"], "methods": methods}, indent=1))
        return 0
    print(f"{'method':<12} {'iter time s':>11} {'vs full':>8} {'vs bound':>8} {'collisions':>10} {'idle frac':>9} "
          f"{'plan s':>7} {'route s':>7}")
    for method, row in methods.items():
        print(f"{method:<12} {row['iteration_time_s']:>11.1f} {-100 * row['reduction_vs_full']:>+7.1f}% "
              f"{row['gap_to_bound']:>7.2f}x "
              f"{row['collisions']:>10d} {row['mean_idle_fraction']:>9.2f} {row['plan_time_s']:>7.2f} "
              f"{row['route_time_s']:>7.2f}")
    alloc_s = next(iter(methods.values()))["allocation_time_s"]
    bound = plan.extra["lower_bound"]
    print(f"lower bound {bound['lower_bound_s']:.1f} s (originators {bound['originators_s']:.1f}, "
          f"visits {bound['visits_s']:.1f}, grad sync {bound['grad_sync_s']:.1f}); vs bound = iter time / bound")
    print(f"allocation (shared by all methods): {alloc_s:.2f} s; plan s = allocation + route s")
    if args.out:
        print(f"plan ({cfg.schedule.method}) written to {args.out}")
    return 0
