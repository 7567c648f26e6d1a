"""Planning benchmark (issue 4): predicted iteration time of the four methods and planning time.

    OMP_NUM_THREADS=1 .venv/bin/python bench/plan_bench.py [--quick]

Rows: the paper's geo20 and geo42 configs, then 20..1000 nodes round robin over the twelve GCP
regions (8 stages up to 200 nodes, 16 beyond; 25% skip). ``--quick`` stops at 200 nodes. The
allocation is computed once per row and shared by the four methods: the table shows its time
(``alloc s``) and each method's routing time separately; ``plan s`` is allocation + all four
routings (what ``skippipe plan`` spends). Writes bench/results/plan_bench.json with machine info
and the configs. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skippipe.commands.plan import compare_methods, summary  # noqa: E402
from skippipe.config import METHODS, load_config, to_dict  # noqa: E402

SCALE = [(20, 6, 0.33), (50, 8, 0.25), (100, 8, 0.25), (200, 8, 0.25), (500, 16, 0.25), (1000, 16, 0.25)]
SHORT = {"full": "full", "random_skip": "random", "skippipe_nc": "nc", "skippipe": "skippipe"}


def scale_overrides(nodes: int, stages: int, skip: float):
    return [f"topology.generate={{count: {nodes}, placement: round_robin, "
            "regions_file: configs/topology/regions_gcp12.yaml}",
            f"schedule.num_stages={stages}", "schedule.partition_sizes=[]", f"schedule.skip_ratio={skip}"]


def run_case(name, path, overrides):
    """One row: the same allocation + routing + simulation as `skippipe plan --json`."""
    cfg = load_config(path, overrides)
    results = compare_methods(cfg)
    methods = summary(results)
    for method, (plan, _, _) in results.items():
        methods[method]["extra"] = {k: v for k, v in plan.extra.items() if isinstance(v, (int, float, bool))}
    alloc_s = methods["full"]["allocation_time_s"]
    allocation = results["full"][0].allocation
    plan_s = alloc_s + sum(m["route_time_s"] for m in methods.values())
    row = {"case": name, "nodes": sum(len(nodes) for nodes in allocation), "stages": len(allocation),
           "microbatches": methods["skippipe"]["microbatches"], "allocation_time_s": alloc_s,
           "plan_time_total_s": plan_s, "methods": methods, "config": to_dict(cfg)}
    print(f"{name:<10} {row['nodes']:>5} " + " ".join(f"{methods[m]['iteration_time_s']:>9.1f}" for m in METHODS)
          + f" {-100 * methods['skippipe']['reduction_vs_full']:>+8.1f}% {alloc_s:>7.1f} "
          + " ".join(f"{methods[m]['route_time_s']:>7.1f}" for m in METHODS) + f" {plan_s:>7.1f}", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="stop the scale table at 200 nodes")
    args = parser.parse_args()
    print(f"{'':<16} {'predicted iteration time (s)':^39} {'':>9} {'planning time (s): alloc, route per method, total':>55}")
    print(f"{'case':<10} {'nodes':>5} " + " ".join(f"{SHORT[m]:>9}" for m in METHODS) + f" {'vs full':>9} "
          f"{'alloc':>7} " + " ".join(f"{SHORT[m][:7]:>7}" for m in METHODS) + f" {'plan s':>7}")
    started = time.perf_counter()
    rows = [run_case("geo20", "configs/paper_geo20.yaml", []), run_case("geo42", "configs/paper_geo42.yaml", [])]
    for nodes, stages, skip in SCALE:
        if args.quick and nodes > 200:
            break
        rows.append(run_case(f"n{nodes}/s{stages}", "configs/paper_geo20.yaml", scale_overrides(nodes, stages, skip)))
    out = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                       "processor": platform.processor(), "cpus": os.cpu_count(),
                       "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                       "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
           "quick": args.quick, "wall_s": time.perf_counter() - started, "rows": rows}
    path = Path(__file__).resolve().parent / "results" / "plan_bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
