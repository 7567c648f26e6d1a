"""Precision and activation-checkpointing benchmark (issue 17, parts 1 and 2).

    OMP_NUM_THREADS=1 .venv/bin/python bench/precision_bench.py [--quick] [--seeds 0,1,2] [--only quality|wire|memory]
    make bench-precision

A. Quality: ``configs/tiny.yaml`` (in-process, the same routes and data) trained its own 120 steps
   (``--steps`` to change) in fp32, bf16 and fp16 for every seed; validation loss at equal steps
   (and every 20 steps, ``train.eval_every``; fp16 too with ``--fp16``). Target: bf16 within 2% of fp32 (median and worst over
   seeds reported, signed: + is worse than fp32). Next to it the floor of that comparison: fp32 again
   with the learning rate 1e-6 larger (``fp32~``), a change far below bf16's rounding, whose gap
   says how far this config's loss at a given step moves under any perturbation.
B. Wire: ``configs/tiny.yaml`` with ``launcher=local`` (6 worker processes), fp32 vs bf16: payload
   bytes per message as the workers' transports count them (``net/bytes_per_message``). Target: halved.
C. Memory: the ``small`` preset, 4 stages x 1 replica, ``launcher=local``, 8 microbatches
   per iteration, ``schedule.memory=4``, with ``train.activation_checkpointing`` none, every_2 and full.
   Peak RSS per worker (the largest worker); the same above each worker's RSS before its first step
   (what training adds); and that plus the stage's parameters, the tensor memory that
   ``torch.cuda.max_memory_allocated`` counts on a GPU (parameters, gradients, optimizer state,
   activations; not the process's Python, torch and gloo runtime).
D. Recompute (one process, malloc as the workers run it: ``--host-memory``, default retain): per
   repeat, the backward CPU time per microbatch minus that of ``none`` run just before it; the median
   over repeats against the cost model's ``recomputed_fraction x forward``. torch's non-reentrant
   checkpoint stops recomputing once a block's saved tensors are back (the down projection and the
   residual add are not rerun): measured 0.89x the forward on ``small``, 1.01x on ``tiny``
   (1.06x / 1.12x with ``set_checkpoint_early_stop(False)``), so the whole forward is the model's charge.
Targets: peak memory (RSS, or tensor memory as the issue allows) reduced >= 40% with ``full``;
recompute predicted within 15%.

Writes bench/results/precision_bench.json (machine, config, every run). A benchmark, not a test: it
never fails on a number; the table says which targets hold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.runtime_bench import machine_info  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "precision_bench.json"
QUIET = ["tracking.wandb.mode=disabled", "tracking.progress=false", "fault.slow_threshold=1000000",
         "verify.level='off'", "runtime.timeout_s=120", "run.overwrite=true"]
MEMORY_SHAPE = ["model.preset=small", "schedule.num_stages=4", "schedule.partition_sizes=[1,1,1,1]",
                "schedule.method=full", "schedule.microbatches_per_originator=8", "schedule.memory=4",
                "topology.generate={count: 4, placement: single}", "cost.emulate_links=false",
                "train.eval_batches=1", "launcher=local"]


def train(run: Path, overrides: List[str], config: Optional[str] = "configs/tiny.yaml") -> List[dict]:
    """``skippipe train`` in a fresh process; the run's metrics lines."""
    cmd = [sys.executable, "-m", "skippipe", "train", *([config] if config else []), *QUIET, *overrides,
           f"run.dir={run}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


QUALITY_RUNS = {"fp32": ["train.precision=fp32"], "fp32~": ["train.precision=fp32", "train.lr=3.000003e-3"],
                "bf16": ["train.precision=bf16"]}
FP16_RUN = {"fp16": ["train.precision=fp16"]}  # --fp16: CPU autocast in fp16 is ~7x slower than fp32


def quality(args, workdir: Path) -> dict:
    runs: Dict[str, Dict[str, dict]] = {}
    steps = [f"train.steps={args.steps}"] if args.steps else []
    kinds = {**QUALITY_RUNS, **(FP16_RUN if args.fp16 else {})}
    for seed in args.seeds:
        for name, overrides in kinds.items():
            t0 = time.perf_counter()
            lines = train(workdir / f"q{seed}_{name}", ["launcher=inprocess", f"run.seed={seed}", *steps,
                                                        "train.eval_every=20", *overrides])
            val = [(m["step"], m["loss/val"]) for m in lines if "loss/val" in m]
            runs.setdefault(str(seed), {})[name] = {"loss/val": val[-1][1], "val_curve": val,
                                                    "wall_s": time.perf_counter() - t0}
            print(f"  seed {seed} {name}: val {val[-1][1]:.4f} at step {val[-1][0]}", flush=True)
    return {"steps": lines[-1]["step"], "seeds": args.seeds, "runs": runs, **quality_summary(runs)}


def quality_summary(runs: Dict[str, Dict[str, dict]]) -> dict:
    """Per kind against fp32: the per-seed relative gaps (median, worst either way, most above) and
    the gap of the mean over seeds; the wall-time ratio."""
    compared = [k for k in next(iter(runs.values())) if k != "fp32"]
    rel = {p: [runs[s][p]["loss/val"] / runs[s]["fp32"]["loss/val"] - 1.0 for s in runs] for p in compared}
    mean = {p: statistics.mean(runs[s][p]["loss/val"] for s in runs) for p in ["fp32", *compared]}
    return {"relative": {p: {"median": statistics.median(v), "worst": max(v, key=abs), "worse_most": max(v),
                             "mean_over_seeds": mean[p] / mean["fp32"] - 1.0, "all": v} for p, v in rel.items()},
            "mean_val": mean,
            "wall_ratio": {p: statistics.median(runs[s][p]["wall_s"] / runs[s]["fp32"]["wall_s"] for s in runs)
                           for p in compared if p != "fp32~"}}


def wire(args, workdir: Path) -> dict:
    out = {}
    for precision in ("fp32", "bf16"):
        lines = train(workdir / f"w_{precision}", ["launcher=local", "train.steps=3", f"train.precision={precision}",
                                                   "model.n_layers=4", "train.eval_batches=1"])
        per_step = [r["net/bytes_per_message"] for r in lines if "net/bytes_per_message" in r]
        out[precision] = {"bytes_per_message": statistics.median(per_step), "steps": per_step}
    out["ratio"] = out["bf16"]["bytes_per_message"] / out["fp32"]["bytes_per_message"]
    return out


def _phase_cpu_per_mb(run: Path, warmup: int) -> Dict[int, Dict[str, float]]:
    """Stage -> {F, B}: median over steps after ``warmup`` of each phase's thread CPU per microbatch."""
    stage_of, samples = {}, {}
    for line in (run / "routes.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "timings" not in record or record["step"] < warmup:
            continue
        for s, nodes in enumerate(record["plan"]["allocation"]):
            stage_of.update({n: s for n in nodes})
        for node, t in record["timings"].items():
            for phase in ("F", "B"):
                if t["compute_n"][phase]:
                    samples.setdefault((stage_of[node], phase), []).append(t["compute_cpu_s"][phase] / t["compute_n"][phase])
    out: Dict[int, Dict[str, float]] = {}
    for (stage, phase), values in samples.items():
        out.setdefault(stage, {})[phase] = statistics.median(values)
    return out


def memory(args, workdir: Path) -> dict:
    out: Dict[str, dict] = {}
    steps = 3 if args.quick else 5
    param_mb = stage_param_mb(MEMORY_SHAPE)
    for mode in ("none", "every_2", "full"):
        run = workdir / f"m_{mode}"
        lines = train(run, [*MEMORY_SHAPE, f"train.steps={steps}", f"train.activation_checkpointing={mode}"], None)
        per_step = [r for r in lines if "time/iter_s" in r]
        out[mode] = {"peak_rss_mb": max(r["memory/peak_rss_mb"] for r in per_step),
                     "train_rss_mb": max(r["memory/train_rss_mb"] for r in per_step),
                     "tensor_mb": tensor_memory_mb(run, param_mb),
                     "iter_s": statistics.median(r["time/iter_s"] for r in per_step[1:]),
                     "cpu_per_mb": _phase_cpu_per_mb(run, 1)}
        print(f"  {mode}: peak {out[mode]['peak_rss_mb']:.0f} MB, training {out[mode]['train_rss_mb']:.0f} MB", flush=True)
    base = out["none"]
    for mode in ("every_2", "full"):
        out[mode]["peak_reduction"] = 1.0 - out[mode]["peak_rss_mb"] / base["peak_rss_mb"]
        out[mode]["train_reduction"] = 1.0 - out[mode]["train_rss_mb"] / base["train_rss_mb"]
        out[mode]["tensor_reduction"] = 1.0 - out[mode]["tensor_mb"] / base["tensor_mb"]
    out["stage_param_mb"] = {str(k): v for k, v in param_mb.items()}
    return out


def stage_param_mb(overrides: List[str]) -> Dict[int, float]:
    """Stage -> MB of its parameters (fp32 master weights), counted on the built stages."""
    from skippipe.config import load_config, num_stages
    from skippipe.model.transformer import build_stages
    from skippipe.schedule import build_cost

    cfg = load_config(None, list(overrides))
    _, spec, _ = build_cost(cfg)  # the model spec the workers build (its vocabulary rule)
    out = {}
    for stage_id in range(num_stages(cfg)):
        stage = build_stages(spec, num_stages(cfg), cfg.run.seed, only=[stage_id])[stage_id]
        out[stage_id] = sum(p.numel() * p.element_size() for p in stage.parameters()) / 2**20
        del stage
    return out


def tensor_memory_mb(run: Path, param_mb: Dict[int, float]) -> float:
    """The largest worker's tensor memory at its peak: what ``torch.cuda.max_memory_allocated`` counts
    on a GPU (parameters, gradients, optimizer state, activations), without the process's own runtime
    (Python, torch, gloo). On CPU: the peak RSS above the RSS before the first step (which already
    held the stage's parameters) plus the parameters themselves. Per node, from routes.jsonl."""
    from skippipe.plan import Plan

    best = 0.0
    for line in (run / "routes.jsonl").read_text().splitlines():
        entry = json.loads(line)
        stage_of = Plan.from_dict(entry["plan"]).stage_of()
        for node, t in (entry.get("timings") or {}).items():
            if t.get("base_rss_mb") is not None and node in stage_of:
                best = max(best, t["peak_rss_mb"] - t["base_rss_mb"] + param_mb[stage_of[node]])
    return best


def recompute(args, workdir: Path) -> dict:
    """Side by side in one process, one thread: each stage's forward and backward thread-CPU time per
    microbatch with every checkpointing mode, interleaved repeats, medians. Measured recompute is the
    median over repeats of B(mode) - B(none) of the same repeat; the cost model predicts
    ``recomputed_fraction x F(none)``."""
    import torch

    from skippipe.config import load_config
    from skippipe.cost import CostModel
    from skippipe.model.presets import resolve_model_spec
    from skippipe.model.transformer import build_stages
    from skippipe.process import set_host_memory
    from skippipe.topology import load_topology
    from skippipe.train import compute

    torch.set_num_threads(1)
    set_host_memory(args.host_memory)  # as the workers run (runtime.host_memory)
    repeats = 5 if args.quick else 25
    cases = []
    for preset, stages, layers, seed in (("small", 4, 8, 0), ("tiny", 4, 8, 1), ("small", 3, 6, 2), ("tiny", 2, 6, 3)):
        common = [f"model.preset={preset}", f"schedule.num_stages={stages}", "schedule.partition_sizes=[]",
                  f"model.n_layers={layers}", f"run.seed={seed}", "schedule.skip_ratio=0"]
        spec = resolve_model_spec(load_config(None, common).model, 256)
        built = build_stages(spec, stages, seed)
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, spec.vocab_size, (4, spec.seq_len), generator=gen)
        hidden = torch.randn(4, spec.seq_len, spec.dim, generator=gen)
        for stage_id in (0, stages - 1):
            times = {mode: {"F": [], "B": []} for mode in ("none", "every_2", "full")}
            for _ in range(repeats):
                for mode in times:
                    m = compute.Mode(checkpoint_every=compute.checkpoint_interval(mode))
                    t0 = time.thread_time()
                    out, saved = compute.forward(built[stage_id], tokens if stage_id == 0 else hidden, m)
                    t1 = time.thread_time()
                    compute.backward(built[stage_id], saved, torch.ones_like(out))
                    times[mode]["F"].append(t1 - t0)
                    times[mode]["B"].append(time.thread_time() - t1)
            med = {mode: {ph: statistics.median(v) for ph, v in phases.items()} for mode, phases in times.items()}
            for mode in ("every_2", "full"):
                cfg = load_config(None, [*common, f"train.activation_checkpointing={mode}"])
                cost = CostModel.from_config(cfg, spec, load_topology(cfg))
                predicted = cost.recomputed_fraction(stage_id) * med["none"]["F"]
                # paired: each repeat's B(mode) - B(none), run back to back (drift and load cancel)
                measured = statistics.median(b - b0 for b, b0 in zip(times[mode]["B"], times["none"]["B"]))
                cases.append({"preset": preset, "stages": stages, "layers": layers, "stage": stage_id, "mode": mode,
                              "F_s": med["none"]["F"], "B_none_s": med["none"]["B"], "B_s": med[mode]["B"],
                              "predicted_s": predicted, "measured_s": measured,
                              "error": abs(predicted - measured) / max(measured, 1e-9)})
                print(f"  {preset} {stages}x stage {stage_id} {mode}: recompute {measured * 1e3:.1f} ms, "
                      f"predicted {predicted * 1e3:.1f} ms", flush=True)
    errors = [c["error"] for c in cases]
    return {"repeats": repeats, "cases": cases, "error_median": statistics.median(errors), "error_worst": max(errors)}


def targets(report: dict) -> Dict[str, tuple]:
    t: Dict[str, tuple] = {}
    if "quality" in report:
        bf16 = report["quality"]["relative"]["bf16"]
        t["bf16 val loss within 2% of fp32 (worst seed, either way)"] = (abs(bf16["worst"]) <= 0.02, bf16["worst"])
        t["bf16 val loss at most 2% above fp32 (worst seed)"] = (bf16["worse_most"] <= 0.02, bf16["worse_most"])
        floor = report["quality"]["relative"].get("fp32~")
        if floor:  # not a target: how far fp32 itself moves at equal steps under a 1e-6 change of lr
            t["(floor) fp32 with lr 1e-6 larger within 2% of fp32 (worst seed)"] = (abs(floor["worst"]) <= 0.02,
                                                                                 floor["worst"])
        t["bf16 mean val loss over seeds within 2% of fp32's"] = (abs(bf16["mean_over_seeds"]) <= 0.02,
                                                                  bf16["mean_over_seeds"])
    if "wire" in report:
        t["bf16 bytes per transfer halved"] = (abs(report["wire"]["ratio"] - 0.5) < 1e-9, report["wire"]["ratio"])
    if "memory" in report:
        full = report["memory"]["full"]
        t["full checkpointing: tensor memory -40% (as cuda max_memory_allocated)"] = (
            full["tensor_reduction"] >= 0.40, full["tensor_reduction"])
        t["full checkpointing: training memory -40%"] = (full["train_reduction"] >= 0.40, full["train_reduction"])
        t["full checkpointing: peak RSS -40%"] = (full["peak_reduction"] >= 0.40, full["peak_reduction"])
    if "recompute" in report:
        t["recompute predicted within 15% (worst case)"] = (report["recompute"]["error_worst"] <= 0.15,
                                                            report["recompute"]["error_worst"])
    return t


def print_table(report: dict) -> None:
    if "quality" in report:
        q = report["quality"]
        print(f"\nA. validation loss after {q['steps']} steps (seeds {q['seeds']})")
        kinds = list(next(iter(q["runs"].values())))
        print("seed | " + " | ".join(kinds))
        for seed, runs in q["runs"].items():
            print(f"{seed} | " + " | ".join(f"{runs[p]['loss/val']:.4f}" for p in kinds))
        for p, r in q["relative"].items():
            wall = f"; wall {q['wall_ratio'][p]:.2f}x" if p in q["wall_ratio"] else " (the floor: lr 1e-6 larger)"
            print(f"{p} vs fp32: median {r['median']:+.2%}, worst {r['worst']:+.2%}, most above fp32 "
                  f"{r['worse_most']:+.2%}, mean over seeds {r['mean_over_seeds']:+.2%}{wall}")
    if "wire" in report:
        w = report["wire"]
        print(f"\nB. payload bytes per message: fp32 {w['fp32']['bytes_per_message']:.0f}, "
              f"bf16 {w['bf16']['bytes_per_message']:.0f} ({w['ratio']:.3f}x)")
    if "memory" in report:
        m = report["memory"]
        print("\nC. small preset, 4 stages x 1, memory 4: per worker (largest)")
        print("checkpointing | peak RSS MB | training MB (above the RSS before step 1) | tensor MB (+ parameters) | s/iter")
        for mode in ("none", "every_2", "full"):
            r = m[mode]
            print(f"{mode} | {r['peak_rss_mb']:.0f} | {r['train_rss_mb']:.0f} | {r['tensor_mb']:.0f} | {r['iter_s']:.3f}")
    if "recompute" in report:
        r = report["recompute"]
        print(f"\nD. recompute per microbatch, thread CPU, median of {r['repeats']} interleaved repeats")
        print("preset | stages | stage | mode | F ms | B none ms | B ms | recompute ms | predicted ms | error")
        for c in r["cases"]:
            print(f"{c['preset']} | {c['stages']}x{c['layers']}L | {c['stage']} | {c['mode']} | {c['F_s'] * 1e3:.1f} | "
                  f"{c['B_none_s'] * 1e3:.1f} | {c['B_s'] * 1e3:.1f} | {c['measured_s'] * 1e3:.1f} | "
                  f"{c['predicted_s'] * 1e3:.1f} | {c['error']:.1%}")
        print(f"error: median {r['error_median']:.1%}, worst {r['error_worst']:.1%}")
    print("\ntargets")
    for name, (ok, value) in targets(report).items():
        print(f"  [{'ok' if ok else 'MISSED'}] {name}: {value:+.4f}")


def save(report: dict, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {**report, "targets": {k: {"ok": ok, "value": v} for k, (ok, v) in targets(report).items()}}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: one seed, few steps")
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--steps", type=int, default=None, help="training steps per quality run (default: the config's)")
    parser.add_argument("--only", choices=("quality", "wire", "memory", "recompute"))
    parser.add_argument("--fp16", action="store_true", help="quality: also train in fp16 (slow on CPU)")
    parser.add_argument("--host-memory", choices=("retain", "system"), default="retain",
                        help="the recompute probe's malloc policy (runtime.host_memory; the workers' default)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 4
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="skippipe-precision-bench-"))
    report = {"machine": machine_info(), "loadavg_start": os.getloadavg(), "quick": args.quick,
              "command": " ".join(["bench/precision_bench.py", *(argv or sys.argv[1:])]), "workdir": str(workdir)}
    started = time.time()
    for name, experiment in (("quality", quality), ("wire", wire), ("memory", memory), ("recompute", recompute)):
        if args.only in (None, name):
            print(f"{name}", flush=True)
            report[name] = experiment(args, workdir)
            save(report, args.out)
    report["wall_s"] = time.time() - started
    report["loadavg_end"] = os.getloadavg()
    save(report, args.out)
    print_table(report)
    print(f"\nwrote {args.out} (runs in {workdir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
