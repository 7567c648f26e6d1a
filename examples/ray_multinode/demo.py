"""Three machines on one box: a Ray head and two raylets (regions eu and us) on 127.0.0.1, the run's
nodes pinned to them by label and resource (examples/ray_multinode/topology.yaml); the us machine is
lost at step 4 (its raylet and every process on it; the us machine unless it holds every stage-0
node) and a new machine of that region joins after step 17 (``ray.autojoin``), once the lost
machine's replacements are in.

    .venv/bin/python examples/ray_multinode/demo.py [RUN_DIR] [key=value ...]

On real machines the same happens with ``ray start --labels/--resources`` on each machine and
``ray job submit`` (README: "A Ray cluster across machines"); here ``ray.cluster_utils.Cluster``
stands in for them, as in tests/test_ray_multinode.py.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def scenario(run: Path, overrides=(), lose_after: int = 3, join_after: int = 17) -> dict:
    """Start the cluster, train, lose a machine after step ``lose_after`` and add one after step
    ``join_after``; returns what happened and how long it took (also for bench/fault_bench.py)."""
    import psutil
    import ray
    from ray.cluster_utils import Cluster

    from skippipe.config import load_config
    from skippipe.model.presets import resolve_model_spec
    from skippipe.planner import Planner
    from skippipe.runtime.background import BackgroundRun, first_step_using, read_jsonl
    from skippipe.runtime.launch_ray import train_ray

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False, "labels": {"region": "head"}})
    machines = {r: cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", resources={f"region_{r}": 8},
                                    labels={"region": r}) for r in ("eu", "us")}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        for region, node in machines.items():
            print(f"machine {region}: Ray node {node.node_id[:8]}")
        cfg = load_config("configs/tiny.yaml", [
            "launcher=ray", f"topology.file={ROOT / 'examples/ray_multinode/topology.yaml'}", "train.steps=30",
            "ray.num_cpus_per_worker=0.25", "fault.replace=true", "fault.rebuild=checkpoint", "checkpoint.every=2",
            "ray.autojoin=true", "tracking.wandb.mode=disabled", "tracking.progress=false", f"run.dir={run}",
            "run.overwrite=true", *overrides])
        planner = Planner(cfg, resolve_model_spec(cfg.model, vocab_size=256))
        allocation, region_of = planner.allocation, {n.name: n.region for n in planner.topology.nodes}
        # lose the machine that leaves a stage-0 node (the originators) alive
        lose = "us" if any(region_of[n] == "eu" for n in allocation[0]) else "eu"
        print(f"allocation {allocation}")
        job = BackgroundRun(train_ray, cfg)
        job.wait_for_step(lose_after)
        raylet = psutil.Process(machines[lose].all_processes["raylet"][0].process.pid)
        workers = raylet.children(recursive=True)
        lost_after = job.last_step()
        cluster.remove_node(machines[lose], allow_graceful=False)
        for proc in workers:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        print(f"lost machine {lose} ({len(workers)} processes) after step {lost_after}")
        job.wait_for_step(join_after)
        joined = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", labels={"region": lose})
        added_at, name = time.monotonic(), f"ray-{joined.node_id[:6]}"
        joined_after = job.last_step()  # its raylet has registered: the machine is in the cluster
        print(f"machine {joined.node_id[:8]} (region {lose}) joined the cluster after step {joined_after}")
        # routes are written while the next step runs: the time a plan first uses the new node
        used = job.wait_until(lambda: first_step_using(run, name) is not None, timeout_s=600)
        first_use_s = time.monotonic() - added_at if used else None
        job.result()
    finally:
        ray.shutdown()
        cluster.shutdown()
    routes = read_jsonl(run / "routes.jsonl")
    metrics = read_jsonl(run / "metrics.jsonl")
    recovery = [m for m in metrics if "fault/recovered_s" in m]
    start = next((m[f"join/{name}/start_s"] for m in metrics if f"join/{name}/start_s" in m), None)
    first = first_step_using(run, name)
    return {"lost": lose, "processes": len(workers), "allocation": allocation, "steps": len(routes),
            "generations": sorted({r["generation"] for r in routes}), "lost_after_step": lost_after,
            "recovery": [{k: m[k] for k in ("step", "fault/detect_s", "fault/recovered_s")} for m in recovery],
            "joined_node": name, "joined_after_step": joined_after, "first_step_on_a_path": first,
            "join_steps": None if first is None else first - joined_after,
            "join_to_first_microbatch_s": first_use_s, "worker_start_to_admitted_s": start,
            "median_step_s": statistics.median(m["time/iter_s"] for m in metrics if "time/iter_s" in m)}


def main(argv) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("skippipe").setLevel(logging.INFO)
    run = Path(argv[0] if argv and "=" not in argv[0] else "/tmp/ray_multinode")
    out = scenario(run, [a for a in argv if "=" in a])
    for m in out["recovery"]:
        print(f"step {m['step']}: failure detected {m['fault/detect_s']:.1f} s after the step started, "
              f"the redone step done {m['fault/recovered_s']:.1f} s after it started")
    start = out["worker_start_to_admitted_s"]
    admitted = "never admitted" if start is None else f"its worker: {start:.1f} s from start to admitted"
    used = ("never on a path (the plans did not need it)" if out["first_step_on_a_path"] is None else
            f"first on a path at step {out['first_step_on_a_path']}, {out['join_to_first_microbatch_s']:.1f} s "
            "after its machine joined")
    print(f"{out['steps']} steps, generations {out['generations']}; {out['joined_node']} joined after step "
          f"{out['joined_after_step']}, {used} ({admitted})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
