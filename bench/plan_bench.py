"""Planning benchmark (issue 4): predicted iteration time of the four methods and planning time.

    OMP_NUM_THREADS=1 .venv/bin/python bench/plan_bench.py [--quick]

Rows: the paper's geo20 and geo42 configs, then 20..1000 nodes round robin over the twelve GCP
regions (8 stages up to 200 nodes, 16 beyond; 25% skip). ``--quick`` stops at 200 nodes. Writes
bench/results/plan_bench.json with machine info and the configs. A benchmark, not a test.
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
from skippipe.config import load_config, to_dict  # noqa: E402

SCALE = [(20, 6, 0.33), (50, 8, 0.25), (100, 8, 0.25), (200, 8, 0.25), (500, 16, 0.25), (1000, 16, 0.25)]


def scale_overrides(nodes: int, stages: int, skip: float):
    return [f"topology.generate={{count: {nodes}, placement: round_robin, "
            "regions_file: configs/topology/regions_gcp12.yaml}",
            f"schedule.num_stages={stages}", "schedule.partition_sizes=[]", f"schedule.skip_ratio={skip}"]


def run_case(name, path, overrides):
    cfg = load_config(path, overrides)
    t0 = time.perf_counter()
    methods = summary(compare_methods(cfg))
    wall = time.perf_counter() - t0
    row = {"case": name, "nodes": len(cfg.topology.generate["count"] and range(cfg.topology.generate["count"])), "methods": methods,
           "plan_time_total_s": sum(m["plan_time_s"] for m in methods.values()), "wall_s": wall,
           "config": to_dict(cfg)}
    print(f"{name:<10} " + " ".join(f"{methods[m]['iteration_time_s']:>9.1f}" for m in methods)
          + f" {-100 * methods['skippipe']['reduction_vs_full']:>+8.1f}% {row['plan_time_total_s']:>8.1f}", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="stop the scale table at 200 nodes")
    args = parser.parse_args()
    print(f"{'case':<10} {'full':>9} {'random':>9} {'nc':>9} {'skippipe':>9} {'vs full':>9} {'plan s':>8}")
    rows = [run_case("geo20", "configs/paper_geo20.yaml", []), run_case("geo42", "configs/paper_geo42.yaml", [])]
    for nodes, stages, skip in SCALE:
        if args.quick and nodes > 200:
            break
        rows.append(run_case(f"n{nodes}/s{stages}", "configs/paper_geo20.yaml", scale_overrides(nodes, stages, skip)))
    out = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                       "cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS")},
           "quick": args.quick, "rows": rows}
    path = Path(__file__).resolve().parent / "results" / "plan_bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
