"""``skippipe simulate PLAN.json [CONFIG] [key=value ...] [--json]``: simulate any skippipe.plan.v1 plan.

The plan (also a handwritten one, without node_order) is checked against the path rules
(SkipPipe arXiv 2502.19913 section 4) and run on the topology and cost model of the config.
"""

from __future__ import annotations

import json

from skippipe.config import load_config
from skippipe.errors import PlanError
from skippipe.plan import PathRules, Plan, check_plan


def add_arguments(parser) -> None:
    parser.add_argument("plan", help="a plan file (skippipe.plan.v1 JSON)")
    parser.add_argument("config", nargs="?", default=None, help="config YAML (optional)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from skippipe.schedule import build_cost
    from skippipe.simulate import simulate

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    plan = Plan.load(args.plan)
    cfg = load_config(config, overrides)
    from skippipe.config import stages_visited

    least = stages_visited(plan.num_stages, cfg.schedule.skip_ratio)
    if plan.microbatches and 2 <= plan.stages_visited < least:  # (1 and an empty plan: check_plan says why)
        raise PlanError(f"{args.plan}: stages_visited={plan.stages_visited} < {least}, what "
                        f"schedule.skip_ratio={cfg.schedule.skip_ratio} allows for {plan.num_stages} stages; "
                        "pass the config the plan was made for")
    topology, _, cost = build_cost(cfg)
    missing = [n for n in plan.nodes() if n not in topology]
    if missing:  # before the rules: a node the topology lacks is the first thing wrong
        raise PlanError(f"{args.plan}: node '{missing[0]}' is not in the topology of the config "
                        f"({len(missing)} missing); pass the config the plan was made for")
    check_plan(plan, PathRules.from_config(cfg.schedule))
    if cost.num_stages != plan.num_stages:
        cost.num_stages = plan.num_stages
        from skippipe.cost import split_layers

        cost.layers_per_stage = split_layers(cost.spec.n_layers, plan.num_stages)
    timeline = simulate(plan, cost, cfg.schedule.memory)
    if args.json:
        print(json.dumps({"plan": args.plan, "method": plan.method, **timeline.summary(),
                          "predicted_makespan_s": plan.predicted_makespan_s}, indent=1))
    else:
        print(f"makespan {timeline.makespan_s:.3f} s  ({plan.method}, {len(plan.microbatches)} microbatches, "
              f"{timeline.collisions} collisions, mean idle {timeline.mean_idle_fraction():.2f})")
    return 0
