"""Planning suite (issue 13): seeded random problems nobody tuned for, plus the reference's geo20.

    OMP_NUM_THREADS=1 .venv/bin/python bench/plan_suite.py [--count 30] [--seed 0] [--quick]
    make bench-plan-suite

Each problem is drawn from a seeded generator (``problem(seed)``): 3-12 regions, either a random
subset of the twelve GCP regions (``configs/topology/regions_gcp12.yaml``) or random links
(latency 5-300 ms, bandwidth 0.05-10 Gbit/s, log-uniform), 12-64 nodes placed unevenly over the
regions with compute speeds 0.5-2x, 4-8 stages, skip ratio 0.25-0.5, memory 2-4, 2-6 microbatches
per originator, and either the fixed-compute cost model (0.1-1 s forward per stage and microbatch
at speed 1) or the FLOP model (0.1-2 s), with or without gradient all-reduce. The reference's own
geo20 problem (``configs/reference_geo20.yaml``; its shipped collision-aware paths are simulated
too) comes first. Per problem: each method's simulated iteration time, the lower bound
(``skippipe.schedule.bound``), the gap (time / bound) and the planning time; then the median and
worst reduction vs full, the median and worst gap, and how often each method is best. Writes
``bench/results/plan_suite.json`` (machine, configs, rows). ``--quick``: 6 small problems (CI smoke).
A benchmark, not a test: nothing here is tuned to a problem, and ``--seed`` draws other ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skippipe.commands.plan import compare_methods, summary  # noqa: E402
from skippipe.config import METHODS, load_config, to_dict  # noqa: E402
from skippipe.plan import MicrobatchRoute, Plan  # noqa: E402
from skippipe.simulate import simulate  # noqa: E402

SHORT = {"full": "full", "random_skip": "random", "skippipe_nc": "nc", "skippipe": "skippipe"}
GCP = yaml.safe_load((ROOT / "configs/topology/regions_gcp12.yaml").read_text())


def _regions(rng: random.Random):
    count = rng.randint(3, 12)
    if rng.random() < 0.5:
        pick = sorted(rng.sample(range(len(GCP["names"])), count))
        return {"names": [GCP["names"][i] for i in pick],
                "latency_ms": [[GCP["latency_ms"][i][j] for j in pick] for i in pick],
                "bandwidth_gbps": [[GCP["bandwidth_gbps"][i][j] for j in pick] for i in pick]}, "gcp"
    lat = [[1.0] * count for _ in range(count)]
    bw = [[10.0] * count for _ in range(count)]
    for i in range(count):
        for j in range(i + 1, count):
            lat[i][j] = lat[j][i] = round(rng.uniform(5, 300), 1)
            bw[i][j] = bw[j][i] = round(math.exp(rng.uniform(math.log(0.05), math.log(10))), 4)
    return {"names": [f"r{i}" for i in range(count)], "latency_ms": lat, "bandwidth_gbps": bw}, "random"


def problem(seed: int) -> dict:
    """One random planning problem as a config mapping (deterministic in ``seed``)."""
    rng = random.Random(f"plan-suite:{seed}")
    regions, kind = _regions(rng)
    stages = rng.randint(4, 8)
    count = rng.randint(max(12, 2 * stages), 64)
    weights = [rng.uniform(0.2, 1.0) for _ in regions["names"]]
    nodes = [{"name": f"n{i}", "region": rng.choices(regions["names"], weights)[0],
              "speed": round(rng.uniform(0.5, 2.0), 3)} for i in range(count)]
    flop = rng.random() < 0.5
    fwd_stage_s = rng.uniform(0.1, 2.0) if flop else rng.uniform(0.1, 1.0)
    layers = 24 / stages  # llama-500m: 24 layers, 8 samples of 1024 tokens per microbatch
    cost = {"message_overhead_s": rng.choice([0.0, 0.05, 0.35]), "grad_sync": rng.random() < 0.3}
    if flop:
        # FLOP model: flops_per_s so that a speed-1 node takes fwd_stage_s per stage
        flops_per_token_layer = 2 * (4 * 1024 * 1024 + 3 * 1024 * 4096) + 4 * 1024 * 1024
        cost["flops_per_s"] = float(f"{layers * 8 * 1024 * flops_per_token_layer / fwd_stage_s:.4g}")
    else:
        cost["fwd_s_per_sample_layer"] = round(fwd_stage_s / (layers * 8), 6)
    return {
        "run": {"name": f"suite{seed}"},
        "model": {"preset": "llama-500m", "seq_len": 1024},
        "train": {"samples_per_microbatch": 8},
        "schedule": {"method": "skippipe", "num_stages": stages, "skip_ratio": round(rng.uniform(0.25, 0.5), 3),
                     "memory": rng.randint(2, 4), "microbatches_per_originator": rng.randint(2, 6)},
        "topology": {"regions": regions, "nodes": nodes},
        "cost": cost,
        "_meta": {"seed": seed, "links": kind, "regions": len(regions["names"]), "nodes": count,
                  "cost_model": "flop" if flop else "fixed", "fwd_stage_s": round(fwd_stage_s, 3)},
    }


def _load(mapping: dict):
    body = {k: v for k, v in mapping.items() if not k.startswith("_")}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{body['run']['name']}.yaml"
        path.write_text(yaml.safe_dump(body))
        return load_config(str(path), [])


def reference_plan(cost, name: str = "ca-paths") -> float:
    """The reference's shipped paths (bench/data/reference_geo20.json) simulated in our simulator:
    each stage-0 node's 6 microbatches use its one coarsened collision-aware path."""
    ref = json.loads((ROOT / "bench/data/reference_geo20.json").read_text())
    allocation = [[f"n{i}" for i in stage] for stage in ref["partitions"]]
    per_orig = ref["ours-sends"]
    mbs = []
    for o_index, orig in enumerate(allocation[0]):
        for j in range(per_orig):
            key = str(o_index) if name == "ca-paths" else str(o_index * 3 + j % 3)
            nxt, node, path = ref[name][key], orig[1:], []
            while node in nxt:
                node = str(nxt[node])
                path.append(f"n{node}")
            mbs.append(MicrobatchRoute(len(mbs), orig, path))
    plan = Plan("reference", len(allocation), 4, allocation, mbs, extra={"memory": ref["memory"]})
    return simulate(plan, cost, ref["memory"]).makespan_s


def run_problem(name: str, cfg, meta: dict) -> dict:
    started = time.perf_counter()
    results = compare_methods(cfg)
    methods = summary(results)
    bound = results["skippipe"][0].extra.get("lower_bound", {})
    row = {"problem": name, "meta": meta, "lower_bound_s": bound.get("lower_bound_s"), "bound": bound,
           "methods": methods, "wall_s": time.perf_counter() - started, "config": to_dict(cfg)}
    if name == "reference_geo20":
        from skippipe.schedule import build_cost

        _, _, cost = build_cost(cfg)
        row["reference_ca_paths_s"] = reference_plan(cost, "ca-paths")
        row["reference_non_ca_paths_s"] = reference_plan(cost, "non-ca-paths")
    times = {m: methods[m]["iteration_time_s"] for m in METHODS}
    best = min(times.values())
    row["best"] = [m for m in METHODS if times[m] <= best * (1 + 1e-9)]
    print(f"{name:<16} {meta.get('nodes', 20):>3} {meta.get('stages', len(results['full'][0].allocation)):>2} "
          + " ".join(f"{times[m]:>8.2f}" for m in METHODS)
          + f" {row['lower_bound_s']:>8.2f} {times['skippipe'] / row['lower_bound_s']:>5.2f}x"
          + f" {-100 * methods['skippipe']['reduction_vs_full']:>+7.1f}%"
          + f" {methods['skippipe']['plan_time_s']:>7.1f}"
          + (f"  reference {row['reference_ca_paths_s']:.2f}" if "reference_ca_paths_s" in row else ""), flush=True)
    return row


def summarise(rows: list) -> dict:
    def stats(values):
        return {"median": statistics.median(values), "worst": max(values)} if values else {}
    out = {"problems": len(rows)}
    for m in METHODS:
        red = [r["methods"][m]["reduction_vs_full"] for r in rows]
        gap = [r["methods"][m]["iteration_time_s"] / r["lower_bound_s"] for r in rows]
        out[m] = {"reduction_vs_full": {"median": statistics.median(red), "worst": min(red)},
                  "gap_to_bound": stats(gap),
                  "best_count": sum(1 for r in rows if m in r["best"]),
                  "plan_time_s": stats([r["methods"][m]["plan_time_s"] for r in rows])}
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=30, help="random problems (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="first problem seed (problems seed..seed+count-1)")
    parser.add_argument("--quick", action="store_true", help="6 problems of at most 24 nodes (CI smoke)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/plan_suite.json"))
    args = parser.parse_args()
    print(f"{'problem':<16} {'N':>3} {'S':>2} " + " ".join(f"{SHORT[m]:>8}" for m in METHODS)
          + f" {'bound':>8} {'gap':>6} {'vs full':>8} {'plan s':>7}")
    started = time.perf_counter()
    rows = []
    if not args.quick:
        rows.append(run_problem("reference_geo20", load_config(str(ROOT / "configs/reference_geo20.yaml"), []),
                                {"nodes": 20, "stages": 6, "links": "reference", "cost_model": "fixed"}))
    seed, drawn = args.seed, 0
    while drawn < (6 if args.quick else args.count):
        mapping = problem(seed)
        seed += 1
        if args.quick and mapping["_meta"]["nodes"] > 24:
            continue
        meta = dict(mapping["_meta"], stages=mapping["schedule"]["num_stages"])
        rows.append(run_problem(f"p{meta['seed']:03d}", _load(mapping), meta))
        drawn += 1
    random_rows = [r for r in rows if r["problem"] != "reference_geo20"]
    result = {"summary": summarise(random_rows), "summary_all": summarise(rows)}
    s = result["summary"]["skippipe"]
    print(f"\n{len(random_rows)} random problems: skippipe vs full median {-100 * s['reduction_vs_full']['median']:+.1f}%"
          f", worst {-100 * s['reduction_vs_full']['worst']:+.1f}%; gap to bound median "
          f"{s['gap_to_bound']['median']:.2f}x, worst {s['gap_to_bound']['worst']:.2f}x; best on "
          f"{s['best_count']}/{len(random_rows)}; planning median {s['plan_time_s']['median']:.1f} s, "
          f"worst {s['plan_time_s']['worst']:.1f} s")
    for m in METHODS:
        print(f"  {m:<12} best on {result['summary'][m]['best_count']:>2}, gap median "
              f"{result['summary'][m]['gap_to_bound']['median']:.2f}x worst {result['summary'][m]['gap_to_bound']['worst']:.2f}x")
    out = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                       "processor": platform.processor(), "cpus": os.cpu_count(),
                       "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                       "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
           "args": vars(args), "wall_s": time.perf_counter() - started, **result, "rows": rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
