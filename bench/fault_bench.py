"""Fault-tolerance benchmark (issue: Ray launcher and live fault tolerance).

Runs the tiny config (parts 1 and 2 on the local launcher, 3 on a local Ray cluster) and measures,
side by side in one invocation:

1. Recovery: a worker is killed (``fault.kill``: its process exits at the start of a step, like
   ``kill -9``): time to detect, time to rebuild (new generation + plan), and time from the failed
   step's start to the redone step's completion; and "no loss": same step count and the same set of
   microbatch ids per step as a run without the failure, with the final losses of both.
2. Slow node: one node 5x slower (``fault.slow_nodes``), a stage-1 replica and then an originator
   (stage 0); median iteration time with rerouting against a static plan that keeps using it
   (``fault.slow_threshold`` set out of reach).
3. Join: on a local Ray cluster, a node that is not in the topology is added to the running job
   (``skippipe join``'s code path): time to be accepted and to join, and the work it then takes.
4. Machines (``--only machine`` alone): on a head and two raylets, a whole machine is lost and
   another joins (``examples/ray_multinode/demo.py``); per seed, the failed step's start to the
   redone step's end, and the joining machine to its first microbatch.

Prints a table and writes bench/results/fault_bench.json (machine, configs, numbers).

    python bench/fault_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from skippipe.cli import main  # noqa: E402
from skippipe.config import load_config  # noqa: E402
from skippipe.model.presets import resolve_model_spec  # noqa: E402
from skippipe.planner import Planner  # noqa: E402

COMMON = ["tracking.progress=false", "tracking.wandb.mode=disabled", "launcher=local", "verify.level=off"]


def lines(run: Path, name: str):
    return [json.loads(x) for x in (run / name).read_text().splitlines() if x.strip()]


def train(run: Path, overrides):
    code = main(["train", str(REPO / "configs" / "tiny.yaml"), *COMMON, *overrides, f"run.dir={run}"])
    if code != 0:
        raise SystemExit(f"training failed ({code}) for {run}")
    return lines(run, "metrics.jsonl"), lines(run, "routes.jsonl")


def stage_node(overrides, stage: int) -> str:
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [*COMMON, *overrides])
    return Planner(cfg, resolve_model_spec(cfg.model, vocab_size=256)).allocation[stage][0]


def recovery(tmp: Path, steps: int, kill_step: int) -> dict:
    base = [f"train.steps={steps}"]
    victim = stage_node(base, 1)
    clean_m, clean_r = train(tmp / "clean", base)
    kill_m, kill_r = train(tmp / "kill", [*base, f"fault.kill.step={kill_step}", f"fault.kill.node={victim}"])
    failed = next(m for m in kill_m if m.get("step") == kill_step and "fault/detect_s" in m)
    ids = lambda routes: [sorted(mb["id"] for mb in r["plan"]["microbatches"]) for r in routes]  # noqa: E731
    steps_of = lambda metrics: [m["step"] for m in metrics if "loss/val" not in m]  # noqa: E731
    return {"victim": victim, "kill_step": kill_step,
            "detect_s": failed["fault/detect_s"], "rebuild_s": failed["fault/rebuild_s"],
            "first_step_done_s": failed["fault/recovered_s"],
            "same_steps": steps_of(clean_m) == steps_of(kill_m), "same_microbatch_ids": ids(clean_r) == ids(kill_r),
            "final_train_loss_clean": last_train_loss(clean_m), "final_train_loss_kill": last_train_loss(kill_m),
            "val_loss_clean": clean_m[-1]["loss/val"], "val_loss_kill": kill_m[-1]["loss/val"],
            "generations": kill_m[-2]["cluster/generation"]}


def slow_node(tmp: Path, steps: int, warmup: int, factor: float, stage: int) -> dict:
    """One node of ``stage`` ``factor`` times slower; with stage 0 it is an originator, and its
    share of the microbatches it starts is what rerouting lowers."""
    # one cluster without link emulation (compute, not links, decides), memory 4: TC1 leaves room
    base = [f"train.steps={steps}", "schedule.memory=4", "topology.file=null", "topology.generate.count=6",
            "topology.generate.placement=single", "cost.emulate_links=false"]
    slow = stage_node(base, stage)
    results = {}
    for name, extra in (("rerouting", []), ("static", ["fault.slow_threshold=1000000"])):
        metrics, routes = train(tmp / f"slow{stage}-{name}", [*base, f"fault.slow_nodes.{slow}={factor}", *extra])
        iters = [m["time/iter_s"] for m in metrics if "time/iter_s" in m][warmup:]
        if stage == 0:
            visits = [sum(mb["originator"] == slow for mb in r["plan"]["microbatches"]) for r in routes]
        else:
            visits = [sum(slow in mb["path"] for mb in r["plan"]["microbatches"]) for r in routes]
        results[name] = {"median_iter_s": statistics.median(iters), "visits_first": visits[0], "visits_last": visits[-1]}
    results["slow_node"], results["stage"], results["factor"] = slow, stage, factor
    results["reduction"] = 1 - results["rerouting"]["median_iter_s"] / results["static"]["median_iter_s"]
    return results


def join(tmp: Path, steps: int) -> dict:
    """A node that is not in the topology joins a running Ray job (``skippipe join``'s code path)
    after step 1: seconds from the request to its acceptance and to its first step, the step it
    joined at, that step's iteration time against the median, and the microbatches it then carried."""
    import threading
    import time

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from skippipe.runtime.join import node_spec, submit_join, wait_join
    from skippipe.runtime.launch_ray import train_ray

    run = tmp / "join"
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"),
                      [*COMMON, "launcher=ray", "ray.num_cpus_per_worker=0.25", f"train.steps={steps}",
                       "run.name=bench_join", f"run.dir={run}", "topology.file=null", "topology.generate.count=6",
                       "topology.generate.placement=single", "cost.emulate_links=false"])
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    errors = []
    thread = threading.Thread(target=lambda: _run_or_record(train_ray, cfg, errors))
    thread.start()
    try:
        while thread.is_alive() and not ((run / "metrics.jsonl").is_file() and len(lines(run, "metrics.jsonl")) >= 2):
            time.sleep(0.05)
        asked = time.time()
        request = submit_join("bench_join", node_spec("n6", "local"))
        accepted = wait_join(request, "accepted")
        accepted_s = time.time() - asked
        status = wait_join(request, "joined")
        joined_s = time.time() - asked
    finally:
        thread.join()
        ray.shutdown()
    if errors:
        raise SystemExit(f"the Ray run failed: {errors[0]}")
    metrics = [m for m in lines(run, "metrics.jsonl") if "time/iter_s" in m]
    routes = lines(run, "routes.jsonl")
    at = status["step"]
    after = [r for r in routes if r["step"] >= at]
    return {"asked_after_step": accepted["step"], "joined_at_step": at, "stage": status["stage"],
            "request_to_accepted_s": accepted_s, "request_to_joined_s": joined_s,
            "join_step_iter_s": metrics[at]["time/iter_s"],
            "median_iter_s": statistics.median(m["time/iter_s"] for m in metrics[1:]),
            "microbatches_through_new_node": sum("n6" in mb["path"] or mb["originator"] == "n6"
                                                 for r in after for mb in r["plan"]["microbatches"]),
            "steps_after_join": len(after)}


def last_train_loss(metrics: list) -> float:
    return [m for m in metrics if "loss/train" in m and "loss/val" not in m][-1]["loss/train"]


def machine(tmp: Path, seeds) -> dict:
    """Ray across machines (examples/ray_multinode): a head and two raylets on 127.0.0.1; the machine
    whose loss leaves an originator is lost after step 3 (its raylet and every process on it) and a
    new machine of its region joins after step 17 (``ray.autojoin``). Per seed (``run.seed``: other
    data, model and allocation): seconds from the failed step's start to the redone step's end, and
    from the machine joining to its first microbatch. Median and worst over the seeds."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ray_multinode_demo", REPO / "examples/ray_multinode/demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    runs = [demo.scenario(tmp / f"machine{seed}", [f"run.seed={seed}"]) for seed in seeds]
    recovered = [max(m["fault/recovered_s"] for m in r["recovery"]) for r in runs if r["recovery"]]
    joined = [r["join_to_first_microbatch_s"] for r in runs if r["join_to_first_microbatch_s"] is not None]
    join_steps = [r["join_steps"] for r in runs if r["join_steps"] is not None]
    started = [r["worker_start_to_admitted_s"] for r in runs if r["worker_start_to_admitted_s"] is not None]
    step_s = [r["median_step_s"] for r in runs]
    return {"seeds": list(seeds), "runs": runs,
            "recovered_s": {"median": statistics.median(recovered), "worst": max(recovered)} if recovered else None,
            "join_to_first_microbatch_s": {"median": statistics.median(joined), "worst": max(joined),
                                           "joined": len(joined)} if joined else None,
            "join_steps": {"median": statistics.median(join_steps), "worst": max(join_steps)} if join_steps else None,
            "median_step_s": statistics.median(step_s),
            "worker_start_to_admitted_s": {"median": statistics.median(started), "worst": max(started)} if started else None,
            "all_steps": all(r["steps"] == 30 for r in runs)}


def machine_rows(result: dict) -> list:
    rec, join_ = result["recovered_s"], result["join_to_first_microbatch_s"]
    n = len(result["runs"])
    return [("machine lost (Ray): failed step -> redone step done",
             f"{rec['median']:.1f} / {rec['worst']:.1f} s" if rec else "none", "< 15 s (median / worst)"),
            ("machine joins (Ray): -> its first microbatch",
             f"{join_['median']:.1f} / {join_['worst']:.1f} s" if join_ else "never", f"{n}/{n} joined"
             if join_ and join_["joined"] == n else "-"),
            ("machine joins (Ray): its worker, start -> admitted",
             "{median:.1f} / {worst:.1f} s".format(**result["worker_start_to_admitted_s"])
             if result.get("worker_start_to_admitted_s") else "-", "-"),
            ("machine joins (Ray): steps from joining to its first microbatch",
             f"{result['join_steps']['median']} / {result['join_steps']['worst']} "
             f"(step {result['median_step_s']:.2f} s)" if result.get("join_steps") else "never", "<= 4"),
            ("machine runs: every step once", str(result["all_steps"]), "True")]


def _run_or_record(fn, cfg, errors) -> None:
    try:
        fn(cfg)
    except BaseException as err:  # reported by the caller
        errors.append(err)


def slow_rows(label: str, counted: str, result: dict) -> list:
    """The table rows of one slow-node experiment."""
    reroute, static = result["rerouting"], result["static"]
    return [(f"{label}: median iter static plan", f"{static['median_iter_s']:.3f} s", "-"),
            (f"{label}: median iter rerouting", f"{reroute['median_iter_s']:.3f} s", "-"),
            (f"{label}: reduction from rerouting", f"{100 * result['reduction']:.1f}%", ">= 30%"),
            (f"{label}: {counted} first -> last plan", f"{reroute['visits_first']} -> {reroute['visits_last']}", "fewer")]


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--only", choices=("machine",), help="run one part; the JSON keeps the others")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds of the machine part")
    args = parser.parse_args()
    steps = 8 if args.quick else 30
    out = REPO / "bench" / "results" / "fault_bench.json"
    if args.only == "machine":
        with tempfile.TemporaryDirectory() as tmp:
            result = machine(Path(tmp), args.seeds[:1] if args.quick else args.seeds)
        for name, value, target in machine_rows(result):
            print(f"{name:<52}  {value:>16}  {target}")
        report = json.loads(out.read_text()) if out.is_file() else {}
        report["machines"] = result
        out.write_text(json.dumps(report, indent=1))
        print(f"wrote {out}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        rec = recovery(Path(tmp), steps, kill_step=3 if args.quick else 10)
        slow = slow_node(Path(tmp), steps, warmup=4 if args.quick else 8, factor=5.0, stage=1)
        slow0 = slow_node(Path(tmp), steps, warmup=4 if args.quick else 8, factor=5.0, stage=0)
        joined = join(Path(tmp), steps=30 if args.quick else 60)
        lost = machine(Path(tmp), args.seeds[:1] if args.quick else args.seeds)
    rows = [
        ("time to detect the killed worker", f"{rec['detect_s']:.2f} s", "-"),
        ("time to rebuild (generation + plan)", f"{rec['rebuild_s']:.2f} s", "-"),
        ("failed step start -> redone step done", f"{rec['first_step_done_s']:.2f} s", "< 10 s"),
        ("same steps / microbatch ids as clean run", f"{rec['same_steps']} / {rec['same_microbatch_ids']}", "True / True"),
        ("final train loss clean / with kill", f"{rec['final_train_loss_clean']:.4f} / {rec['final_train_loss_kill']:.4f}", "-"),
        ("val loss clean / with kill", f"{rec['val_loss_clean']:.4f} / {rec['val_loss_kill']:.4f}", "-"),
        *slow_rows("slow node", "visits", slow),
        *slow_rows("slow originator", "started", slow0),
        ("join (Ray): request -> accepted / joined", f"{joined['request_to_accepted_s']:.2f} / "
         f"{joined['request_to_joined_s']:.2f} s", "-"),
        ("join (Ray): asked after step -> joined at", f"{joined['asked_after_step']} -> {joined['joined_at_step']}", "-"),
        ("join (Ray): join step iter / median iter", f"{joined['join_step_iter_s']:.2f} / {joined['median_iter_s']:.2f} s", "-"),
        ("join (Ray): microbatches via new node", f"{joined['microbatches_through_new_node']} in "
         f"{joined['steps_after_join']} steps", "> 0"),
        *machine_rows(lost),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>22}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>22}  {target}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"python": platform.python_version(), "platform": platform.platform(),
                                           "cpus": os.cpu_count()},
                               "config": {"file": "configs/tiny.yaml", "steps": steps, "launcher": "local",
                                          "quick": args.quick},
                               "recovery": rec, "slow_node": slow, "slow_originator": slow0,
                               "join": joined, "machines": lost}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main_bench()
