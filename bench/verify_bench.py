"""Verification benchmark (issue 7): hashing cost, ``verify --against`` on a 1,000-step ledger, replay.

    OMP_NUM_THREADS=1 .venv/bin/python bench/verify_bench.py [--steps 1000] [--run RUNS/NAME]

A. Digest throughput (sha256 over raw tensor bytes) at a few tensor sizes.
B. Hashing per step on the tiny model's real shapes (4 stages): ``states`` (params + AdamW state, data,
   route) and ``full`` (+ every activation and gradient sent, samples_per_microbatch x seq_len x dim
   fp32 per hop), plus Merkle roots, chain and ledger write; as a fraction of one in-process tiny
   iteration (forward+backward of every microbatch along the full path and the AdamW step, timed
   here). Target: ``states`` under 5 %. The executor's own per-step numbers supersede this estimate.
C. ``skippipe verify A --against B`` on two 1,000-step ledgers that diverge at a random step (lookups
   only: read both ledgers, check the chain links, bisect, diff one step's leaves). Target: under 1 s.
D. With ``--run``: replay cost per step (``skippipe.verify.replay``) against the run's ``time/iter_s``.
E. With ``--executor-steps N``: the tiny config trained in-process at verify.level off/states/full
   (interleaved, two rounds), median iteration time: the executor's real hashing overhead.

Writes bench/results/verify_bench.json. A benchmark, not a test: it never fails on a number.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from skippipe.cli import main as cli_main  # noqa: E402
from skippipe.config import Config  # noqa: E402
from skippipe.verify.digest import hash_fields, json_digest, tensor_digest  # noqa: E402
from skippipe.verify.ledger import LedgerWriter, checkpoint_leaves, make_header, step_record  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "verify_bench.json"
NUM_STAGES, MICROBATCHES = 4, 12


def _best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def digest_throughput() -> List[dict]:
    rows = []
    for mb in (0.25, 4, 32):
        t = torch.randn(int(mb * 2**20 / 4))
        s = _best_of(lambda t=t: tensor_digest("x", t))
        rows.append({"tensor_mb": mb, "ms": s * 1e3, "gb_per_s": mb / 1024 / s})
    return rows


def _tiny_stages():
    from skippipe.model.presets import PRESETS
    from skippipe.model.transformer import build_stages

    spec = PRESETS["tiny"]
    return spec, build_stages(spec, NUM_STAGES, seed=0)


def _stage_state(stages, optimizers) -> Dict[int, Dict[str, torch.Tensor]]:
    out = {}
    for k, stage in stages.items():
        flat = {}
        state = optimizers[k].state
        for name, p in stage.named_parameters():
            flat[f"param/{name}"] = p.detach()
            for slot in ("exp_avg", "exp_avg_sq", "step"):
                if slot in state.get(p, {}):
                    flat[f"opt/{name}/{slot}"] = state[p][slot]
        out[k] = flat
    return out


def tiny_iteration(spec, stages, samples: int):
    """One in-process iteration: every microbatch along the full path, then AdamW; returns (s, optimizers)."""
    from skippipe.model.transformer import forward_path

    optimizers = {k: torch.optim.AdamW(s.parameters(), lr=1e-3, foreach=False) for k, s in stages.items()}
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (MICROBATCHES, samples, spec.seq_len + 1), generator=gen)

    def iteration():
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        for mb in range(MICROBATCHES):
            loss = forward_path(stages, tokens[mb, :, :-1], tokens[mb, :, 1:], list(range(1, NUM_STAGES)))
            (loss / MICROBATCHES).backward()
        for opt in optimizers.values():
            opt.step()

    iteration()  # warm-up; also creates the optimizer state that states-level hashing covers
    return _best_of(iteration, repeats=2), optimizers


def hashing_per_step(tmp: Path, samples: int) -> dict:
    spec, stages = _tiny_stages()
    iter_s, optimizers = tiny_iteration(spec, stages, samples)
    state = _stage_state(stages, optimizers)
    act = torch.randn(samples, spec.seq_len, spec.dim)
    tokens = torch.randint(0, spec.vocab_size, (samples, spec.seq_len + 1))

    def leaves(level: str) -> Dict[str, str]:
        out = {f"data/mb{mb}": tensor_digest("data", tokens) for mb in range(MICROBATCHES)}
        out["route"] = json_digest("route", {"paths": [[0, 1, 2, 3]] * MICROBATCHES})
        for k, flat in state.items():
            out.update(checkpoint_leaves(k, f"n{k}", flat))
        for mb in range(MICROBATCHES):
            out[f"loss/mb{mb}"] = tensor_digest("loss", torch.tensor(1.0))
        if level == "full":
            for mb in range(MICROBATCHES):
                for hop in range(NUM_STAGES):  # forward hops out and back to stage 0, same backward
                    out[f"act/mb{mb}/hop{hop}/stage{hop}"] = tensor_digest("act", act)
                    out[f"grad/mb{mb}/hop{hop}/stage{(hop + 1) % NUM_STAGES}"] = tensor_digest("grad", act)
        return out

    rows = {}
    for level in ("states", "full"):
        writer = LedgerWriter(tmp / level, {"scheme": "skippipe.ledger.v1", "level": level})
        step = [0]

        def one_step(level=level, writer=writer, step=step):
            writer.record(step[0], leaves(level))
            step[0] += 1

        s = _best_of(one_step)
        writer.close()
        n = len(leaves(level))
        rows[level] = {"leaves": n, "hash_and_write_ms": s * 1e3, "fraction_of_iteration": s / iter_s}
    return {"iteration_s": iter_s, "samples_per_microbatch": samples, "microbatches": MICROBATCHES,
            "stages": NUM_STAGES, "levels": rows}


def _synthetic_leaves(step: int, diverge_at, stage_tensors: int = 75) -> Dict[str, str]:
    """A tiny-config-sized leaf map (data, route, acts, grads, losses, 4 x 75 tensors x param+3 opt)."""
    bad = diverge_at is not None and step >= diverge_at
    out = {}
    for mb in range(MICROBATCHES):
        out[f"data/mb{mb}"] = hash_fields("d", str(step), str(mb))
        out[f"loss/mb{mb}"] = hash_fields("l", str(step), str(mb), str(bad))
        for hop in range(3):
            out[f"act/mb{mb}/hop{hop}/stage{hop}"] = hash_fields("a", str(step), str(mb), str(hop), str(bad))
            out[f"grad/mb{mb}/hop{hop}/stage{hop + 1}"] = hash_fields("g", str(step), str(mb), str(hop), str(bad))
    out["route"] = hash_fields("r", str(step))
    for k in range(NUM_STAGES):
        for i in range(stage_tensors // NUM_STAGES + 1):
            out[f"param/stage{k}/n{k}/t{i}"] = hash_fields("p", str(step), str(k), str(i), str(bad))
            for slot in ("exp_avg", "exp_avg_sq", "step"):
                out[f"opt/stage{k}/n{k}/t{i}/{slot}"] = hash_fields("o", str(step), str(k), str(i), slot, str(bad))
    return out


def against_1000(tmp: Path, steps: int, repeats: int) -> dict:
    diverge_at = random.Random(7).randrange(steps)
    header = make_header(Config())
    t0 = time.perf_counter()
    for name, at in (("a", None), ("b", diverge_at)):
        with LedgerWriter(tmp / name, header) as writer:
            for s in range(steps):
                writer.record(s, _synthetic_leaves(s, at))
    write_s = time.perf_counter() - t0
    times, result = [], None
    for _ in range(repeats):
        out = io.StringIO()
        t1 = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = cli_main(["verify", str(tmp / "a"), "--against", str(tmp / "b"), "--json"])
        times.append(time.perf_counter() - t1)
        result = json.loads(out.getvalue())
    assert code == 1 and result["first_divergent_step"] == diverge_at, result
    return {"steps": steps, "diverge_at": diverge_at, "leaves_per_step": len(_synthetic_leaves(0, None)),
            "lookups": result["lookups"], "lookup_bound": math.ceil(math.log2(steps)) + 1,
            "leaf": result["leaf"], "verify_against_s": statistics.median(times), "runs_s": times,
            "write_ledgers_s": write_s, "target_s": 1.0}


def replay_cost(run_dir: Path) -> dict:
    try:
        from skippipe.verify.replay import replay
    except ModuleNotFoundError:
        return {"available": False, "reason": "skippipe.verify.replay is not installed"}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    iters = [m["time/iter_s"] for m in metrics if "time/iter_s" in m]
    steps = min(5, len(iters))
    t0 = time.perf_counter()
    replayed = replay(run_dir, 0, steps - 1)
    s = (time.perf_counter() - t0) / steps
    ledger_roots = [json.loads(x)["root"] for x in (run_dir / "ledger/steps.jsonl").read_text().splitlines()[:steps]]
    match = all(step_record(i, replayed[i])["root"] == ledger_roots[i] for i in range(steps))
    return {"available": True, "steps": steps, "replay_s_per_step": s,
            "train_s_per_step": statistics.median(iters), "ratio": s / statistics.median(iters), "roots_match": match}


def executor_overhead(tmp: Path, steps: int) -> dict:
    """E. Hashing cost inside the real executor: the tiny config trained in-process at each
    ``verify.level``, runs interleaved, median ``time/iter_s`` after two warm-up steps."""
    from skippipe.cli import main as cli

    iters: Dict[str, List[float]] = {"off": [], "states": [], "full": []}
    for rnd in range(2):
        for level in ("off", "states", "full"):
            run = tmp / f"{level}{rnd}"
            code = cli(["train", str(ROOT / "configs" / "tiny.yaml"), "launcher=inprocess", f"train.steps={steps}",
                        f"verify.level={level}", "tracking.progress=false", "tracking.wandb.mode=disabled",
                        f"run.dir={run}"])
            assert code == 0, f"training failed for level {level}"
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            iters[level] += [m["time/iter_s"] for m in lines if "time/iter_s" in m][2:]
    med = {level: statistics.median(v) for level, v in iters.items()}
    return {"steps": steps, "median_iter_s": med,
            "overhead": {level: med[level] / med["off"] - 1 for level in ("states", "full")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor-steps", type=int, default=0,
                        help="E: also train the tiny config in-process at each verify.level for this many steps")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8, help="samples per microbatch (tiny config)")
    parser.add_argument("--run", type=Path, help="a finished run directory for the replay cost (D)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="verify_bench_") as tmp:
        tmp = Path(tmp)
        throughput = digest_throughput()
        hashing = hashing_per_step(tmp / "hash", args.samples)
        against = against_1000(tmp / "against", args.steps, args.repeats)
        executor = executor_overhead(tmp / "exec", args.executor_steps) if args.executor_steps else None
    replay = replay_cost(args.run) if args.run else {"available": False, "reason": "no --run given"}

    print("A. digest throughput")
    for row in throughput:
        print(f"   {row['tensor_mb']:>6} MB  {row['ms']:8.2f} ms  {row['gb_per_s']:5.2f} GB/s")
    print(f"B. hashing per step, tiny model, {NUM_STAGES} stages, {MICROBATCHES} microbatches "
          f"(in-process iteration {hashing['iteration_s'] * 1e3:.0f} ms)")
    for level, row in hashing["levels"].items():
        target = "  (target < 5%)" if level == "states" else ""
        print(f"   {level:<7} {row['leaves']:>5} leaves  {row['hash_and_write_ms']:8.2f} ms  "
              f"{100 * row['fraction_of_iteration']:5.2f}% of an iteration{target}")
    print(f"C. verify --against, {against['steps']} steps x {against['leaves_per_step']} leaves, diverging at "
          f"{against['diverge_at']}: {against['verify_against_s']:.3f} s, {against['lookups']} lookups "
          f"(bound {against['lookup_bound']}), leaf {against['leaf']}  (target < 1 s: "
          f"{'met' if against['verify_against_s'] < 1.0 else 'NOT met'})")
    if replay["available"]:
        print(f"D. replay {replay['replay_s_per_step']:.3f} s/step vs training {replay['train_s_per_step']:.3f} "
              f"s/step (x{replay['ratio']:.2f}), roots match: {replay['roots_match']}")
    else:
        print(f"D. replay cost: n/a ({replay['reason']})")
    if executor:
        med, over = executor["median_iter_s"], executor["overhead"]
        print(f"E. executor, tiny config in-process, median iteration: off {med['off']:.3f} s, states "
              f"{med['states']:.3f} s ({100 * over['states']:+.1f}%, target < 5%), full {med['full']:.3f} s "
              f"({100 * over['full']:+.1f}%)")
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load": os.getloadavg()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "digest_throughput": throughput, "hashing": hashing,
                                   "verify_against": against, "replay": replay,
                                   "executor": executor}, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
