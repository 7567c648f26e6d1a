"""Chaos bench (issue 14): a local run under a seeded schedule of faults stays correct and verifiable.

One local run (configs/tiny.yaml, small model) with ``fault.replace=true`` and a fault every
``--every`` steps, drawn with ``--seed`` from: ``kill -9`` of a worker, ``SIGSTOP`` for 5-30 s (longer
than the heartbeat limit: dropped and replaced; shorter: a stall), plus ``fault.slow_nodes`` on one node
for the first part of the run. Replacements join and copy their stage from a live replica. Victims
are replicas of stages that have two, one at a time, so no stage loses its last replica. Then:

- ``skippipe verify RUN`` (chain, checkpoints, full replay) must pass;
- every step appears once in ``routes.jsonl`` and its microbatch ids are 0..M-1, each exactly once;
- the final validation loss is compared with an undisturbed run of the same seed (the faults change
  routes and membership, so the numbers differ within noise; the margin measured is reported).

A corrupted message (``fault.corrupt``: one activation element perturbed, the sender hashing what it
computed) is a separate run here: verify must *detect* it (exit 1 at that step), which is the point of
the ledger, so it cannot share the run that must verify.

Prints a table (faults injected, detected, median / worst time to recover, steps lost) and writes
bench/results/chaos.json with machine info.

    python bench/chaos.py                  # 60 steps, a fault every ~10 steps (make bench-chaos)
    python bench/chaos.py --quick --out F  # the CI version (tests/test_chaos.py)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import machine_info  # noqa: E402
from skippipe.cli import main  # noqa: E402
from skippipe.config import load_config  # noqa: E402

SMALL = ["model.dim=64", "model.n_heads=2", "model.ffn_dim=128", "model.seq_len=32", "train.samples_per_microbatch=2",
         "data.max_corpus_mb=1", "train.eval_batches=4", "tracking.wandb.mode=disabled", "tracking.progress=false",
         "runtime.timeout_s=30", "cost.emulate_links=false", "launcher=local", "fault.heartbeat_s=0.2",
         "checkpoint.every=10"]
VICTIMS = ["n2", "n5", "n1", "n4"]  # stage-1 and stage-0 replicas in turn (configs/tiny.yaml allocation)
SLOW_NODE = "n3"


def schedule(steps: int, every: int, seed: int, quick: bool) -> List[Dict[str, Any]]:
    """One fault per ``every`` steps (jittered), kinds and SIGSTOP lengths drawn from ``seed``."""
    rng = random.Random(seed)
    faults, step, i = [], every // 2, 0
    while step < steps - 3:
        kind = ["kill9", "sigstop"][i % 2] if quick else rng.choice(["kill9", "sigstop"])
        fault = {"step": step, "kind": kind, "node": VICTIMS[i % len(VICTIMS)]}
        if kind == "sigstop":
            fault["stop_s"] = 12.0 if quick else round(rng.uniform(5.0, 30.0), 1)
        faults.append(fault)
        step += every + (0 if quick else rng.randint(-2, 2))
        i += 1
    return faults


def run_with_faults(run: Path, overrides: List[str], faults: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Train in a thread; inject each fault once the step before it is logged."""
    from skippipe.runtime.launch_local import train_local

    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [*SMALL, *overrides, f"run.dir={run}"])
    errors, done = [], threading.Event()

    def train():
        try:
            train_local(cfg)
        except BaseException as err:  # reported below
            errors.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=train)
    thread.start()
    pending, resumes = list(faults), []
    metrics = run / "metrics.jsonl"
    while not done.is_set():
        logged = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        if pending and logged >= pending[0]["step"]:
            fault = pending.pop(0)
            pid = train_local.last_launcher.pid(fault["node"])
            fault["injected_at"] = time.time()
            if fault["kind"] == "kill9":
                os.kill(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGSTOP)
                resumes.append((time.time() + fault["stop_s"], pid))
        for due, pid in [r for r in resumes if r[0] <= time.time()]:
            resumes.remove((due, pid))
            try:
                os.kill(pid, signal.SIGCONT)  # a stall shorter than the heartbeat limit: it carries on
            except ProcessLookupError:  # dropped and killed by the coordinator already
                pass
        time.sleep(0.02)
    thread.join()
    if errors:
        raise SystemExit(f"chaos run failed: {errors[0]}")
    return {"faults": faults}


def lines(path: Path) -> List[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def check_routes(run: Path, steps: int) -> Dict[str, Any]:
    routes = lines(run / "routes.jsonl")
    seen = [r["step"] for r in routes]
    exact = all(sorted(mb["id"] for mb in r["plan"]["microbatches"]) == list(range(len(r["plan"]["microbatches"])))
                for r in routes)
    return {"steps_logged": len(set(seen)), "steps_once": seen == list(range(steps)),
            "microbatch_ids_once": exact, "steps_lost": steps - len(set(seen))}


def recoveries(run: Path, faults: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Time to recover per detected failure: injection to the redone step's completion (the step's
    metrics line carries fault/recovered_s, from the failed attempt's start)."""
    steps = [m for m in lines(run / "metrics.jsonl") if "loss/val" not in m]
    recovered = [m["fault/recovered_s"] for m in steps if "fault/recovered_s" in m]
    generations = steps[-1]["cluster/generation"] if steps else 0
    return {"recover_s": recovered, "detected": len(recovered), "generations": generations,
            "median_recover_s": statistics.median(recovered) if recovered else None,
            "worst_recover_s": max(recovered) if recovered else None,
            "val_loss": lines(run / "metrics.jsonl")[-1]["loss/val"]}


def bench(steps: int, every: int, seed: int, quick: bool, tmp: Path) -> Dict[str, Any]:
    base = [f"train.steps={steps}", f"run.seed={seed}"]
    slow = [f"fault.slow_nodes.{SLOW_NODE}=4.0", f"fault.slow_until={steps // 3}", "fault.replace=true"]
    faults = schedule(steps, every, seed, quick)
    t0 = time.monotonic()
    run_with_faults(tmp / "chaos", [*base, *slow], faults)
    chaos_s = time.monotonic() - t0
    verify_code = main(["verify", str(tmp / "chaos")])
    clean = tmp / "clean"
    assert main(["train", str(REPO / "configs" / "tiny.yaml"), *SMALL, *base, f"run.dir={clean}"]) == 0
    rec, ref = recoveries(tmp / "chaos", faults), lines(clean / "metrics.jsonl")[-1]["loss/val"]
    result = {"steps": steps, "every": every, "seed": seed, "quick": quick, "chaos_run_s": chaos_s,
              "faults": [{k: v for k, v in f.items() if k != "injected_at"} for f in faults],
              "slow_nodes": {SLOW_NODE: 4.0, "until": steps // 3},
              "verify_exit": verify_code, **check_routes(tmp / "chaos", steps), **rec,
              "val_loss_clean": ref, "val_loss_gap": abs(rec["val_loss"] - ref)}
    result["corrupt"] = corrupt_is_detected(tmp, base)
    return result


def corrupt_is_detected(tmp: Path, base: List[str]) -> Dict[str, Any]:
    """One corrupted activation: the ledger of an honest-looking sender must not verify."""
    run = tmp / "corrupt"
    assert main(["train", str(REPO / "configs" / "tiny.yaml"), *SMALL, "train.steps=4", f"run.seed={base[1][9:]}",
                 "verify.level=full", "fault.corrupt.step=2", "fault.corrupt.node=n2", "fault.corrupt.tensor=act",
                 f"run.dir={run}"]) == 0
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["verify", str(run), "--json"])
    report = json.loads(out.getvalue())
    return {"verify_exit": code, "first_divergent_step": report.get("first_divergent_step"), "injected_step": 2}


def table(r: Dict[str, Any]) -> str:
    detected_stops = sum(1 for f in r["faults"] if f["kind"] == "kill9" or f.get("stop_s", 0) > 10.0)
    rows = [
        ("faults injected (kill -9 / SIGSTOP / slow / corrupt)",
         f"{sum(f['kind'] == 'kill9' for f in r['faults'])} / {sum(f['kind'] == 'sigstop' for f in r['faults'])}"
         f" / 1 / 1"),
        ("failures detected (expected: kills + stops > 10 s)", f"{r['detected']} ({detected_stops})"),
        ("median / worst time to recover", f"{r['median_recover_s'] or 0:.2f} / {r['worst_recover_s'] or 0:.2f} s"),
        ("steps lost", str(r["steps_lost"])),
        ("every step once, microbatch ids exactly once", f"{r['steps_once']} / {r['microbatch_ids_once']}"),
        ("skippipe verify (full replay)", "OK" if r["verify_exit"] == 0 else f"FAILED ({r['verify_exit']})"),
        ("val loss chaos / clean (gap)", f"{r['val_loss']:.4f} / {r['val_loss_clean']:.4f} ({r['val_loss_gap']:.4f})"),
        ("corrupted message found by verify at step", f"{r['corrupt']['first_divergent_step']} "
         f"(injected {r['corrupt']['injected_step']}, exit {r['corrupt']['verify_exit']})"),
    ]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def main_bench(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI version: 12 steps, 2 faults")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "chaos.json")
    args = parser.parse_args(argv)
    steps = args.steps or (12 if args.quick else 60)
    every = 5 if args.quick else args.every
    with tempfile.TemporaryDirectory() as tmp:
        result = bench(steps, every, args.seed, args.quick, Path(tmp))
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_info(), "config": {"file": "configs/tiny.yaml", "overrides": SMALL},
                                    "result": result}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main_bench()
