"""Runtime benchmark (issue 5): SkipPipe's distributed runtime against torch.distributed.pipelining
and DeepSpeed, and against its own simulator.

    OMP_NUM_THREADS=1 .venv/bin/python bench/runtime_bench.py [--quick] [--repeats 3] [--no-deepspeed]
    make bench-runtime

Every system trains the same model, split into the same stages (``build_stages``), on the same
microbatches (``TokenData.microbatch(seed, step, id)``) with the same AdamW, learning rate and
global-norm clipping, one process per stage on this machine (gloo on 127.0.0.1, one thread each).
Systems run side by side, interleaved in rotating order, ``--repeats`` rounds; each round reports a
median over the timed iterations after the warm-up, and the table shows the median over rounds.

A. Overhead: SkipPipe (``launcher=local``, ``method=full``, no link emulation, 4 stages x 1 replica on
   a single-cluster topology) vs torch pipelining 1F1B and GPipe vs DeepSpeed's 1F1B pipeline engine.
   Targets (issue 20): wall time and CPU seconds per iteration (summed over all processes) <= 1.00x torch
   1F1B, wall time <= DeepSpeed. The stage's forward+backward per microbatch
   (single process, measured first) must be >= 20 ms.
B. Prediction: the emulated two-region topology of ``configs/topology/geo2.yaml`` (50 ms, 0.1 Gbit/s
   between regions) with the 6-node layout of ``configs/tiny.yaml``; the cost model is calibrated here
   (forward per sample per layer, backward/forward and head+loss/forward ratios, timed in one process
   with the worker's own ``skippipe.train.compute`` functions). Target: measured ``time/iter_s`` within
   15% of ``time/predicted_iter_s`` for ``full`` and ``skippipe``.
C. Skipping pays: ``skippipe`` at 25% skip >= 30% below ``full`` (measured).
D. Peak RSS per worker (rank) for every system.
E. Bytes on the wire (issue 17): the overhead shape trained in fp32 and in bf16 (``train.precision``),
   the bytes per message and per iteration the workers sent (their step reports). Target: bf16
   halves the bytes per transfer.

Writes bench/results/runtime_bench.json (machine, load, configs, every round). A benchmark, not a
test: it never fails on a number; the table says which targets hold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.machine import machine_info  # noqa: E402  (network_bench and precision_bench import it from here)

RESULTS = ROOT / "bench" / "results" / "runtime_bench.json"

# A: 4 stages x 2 layers of the tiny shape; 8 microbatches of 8 x 128 tokens per iteration
OVERHEAD_MODEL = ["model.preset=tiny", "model.n_layers=8", "train.samples_per_microbatch=8",
                  "schedule.num_stages=4", "schedule.microbatches_per_originator=8", "run.seed=0"]
OVERHEAD_SKIPPIPE = ["launcher=local", "schedule.method=full", "cost.emulate_links=false",
                     "topology.generate={count: 4, placement: single}", "schedule.partition_sizes=[1,1,1,1]",
                     "schedule.memory=4"]
# B, C: configs/tiny.yaml's layout (6 nodes, stages 0 and 1 with 2 replicas, 25% skip) on a two-region
# topology: geo2's links between regions (50 ms, 0.1 Gbit/s), but 20 ms and 1 Gbit/s inside a region
# (geo2 has 1 ms): six emulated nodes share this box's cores, so a plan whose paths stay inside a region
# must still be bound by its links, not by the CPU, for the simulator (one device per node) to apply.
# A small model (the tiny shape at dim 64, one layer per stage, 2 x 128 tokens per microbatch) keeps the
# compute a small fraction of the link time.
GEO_TOPOLOGY = {"regions": {"names": ["eu", "us"], "latency_ms": [[20, 50], [50, 20]],
                            "bandwidth_gbps": [[1.0, 0.1], [0.1, 1.0]]},
                "nodes": [{"name": f"n{i}", "region": ("eu", "us")[i % 2]} for i in range(6)]}
GEO_MODEL = ["model.preset=tiny", "model.n_layers=4", "model.dim=64", "model.n_heads=2", "model.ffn_dim=176",
             "train.samples_per_microbatch=2", "run.seed=0"]
GEO_SKIPPIPE = ["launcher=local", "schedule.partition_sizes=[2,2,1,1]", "schedule.skip_ratio=0.25",
                "schedule.memory=2", "schedule.microbatches_per_originator=8", "cost.emulate_links=true"]
# quiet, no re-planning away from "slow" nodes (the box is shared), no hashing (baselines do not hash)
COMMON_SKIPPIPE = ["tracking.wandb.mode=disabled", "tracking.progress=false", "train.eval_batches=1",
                   "fault.slow_threshold=1000000", "verify.level='off'", "runtime.timeout_s=120"]


# ---------------------------------------------------------------------------------------------
# measurements


class RssSampler:
    """Peak RSS of every descendant of a process, sampled (for SkipPipe's worker processes)."""

    def __init__(self, pid: int, interval_s: float = 0.25):
        import psutil

        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_mb: Dict[int, float] = {}
        self.cmd: Dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.interval_s):
            try:
                procs = self.root.children(recursive=True)
            except psutil.Error:
                return
            for proc in procs:
                try:
                    rss = proc.memory_info().rss / 2**20
                    self.cmd.setdefault(proc.pid, " ".join(proc.cmdline()[-2:]))
                except psutil.Error:
                    continue
                self.peak_mb[proc.pid] = max(self.peak_mb.get(proc.pid, 0.0), rss)

    def stop(self) -> List[float]:
        self._stop.set()
        self._thread.join()
        return sorted((mb for pid, mb in self.peak_mb.items() if "skippipe.runtime.worker" in self.cmd.get(pid, "")),
                      reverse=True)


def run_skippipe(overrides: List[str], steps: int, warmup: int, workdir: Path, name: str) -> dict:
    """``skippipe train`` in a subprocess; iteration times from its metrics.jsonl."""
    run = workdir / name
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "skippipe", "train", *overrides, f"train.steps={steps}", f"run.dir={run}"]
    log = (workdir / f"{name}.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    sampler = RssSampler(proc.pid)
    code = proc.wait(timeout=1800)
    worker_rss = sampler.stop()
    if code != 0:
        tail = (workdir / f"{name}.log").read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"skippipe train ({name}) exited with {code}: {' | '.join(tail)}")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_ = [d for d in lines if "time/iter_s" in d]
    timed = steps_[warmup:]
    iter_s = [d["time/iter_s"] for d in timed]
    predicted = [d["time/predicted_iter_s"] for d in timed if d.get("time/predicted_iter_s") is not None]
    return {"median_s": statistics.median(iter_s), "iter_s": [d["time/iter_s"] for d in steps_],
            "outside_worker_s": outside_worker_steps(run, warmup), "cpu_s": cpu_per_step(run, warmup),
            "predicted_s": statistics.median(predicted) if predicted else None, "n": len(iter_s),
            "losses": [d["loss/train"] for d in steps_], "peak_rss_mb": worker_rss,
            "metrics_peak_rss_mb": max((d.get("memory/peak_rss_mb", 0.0) for d in steps_), default=None),
            "skip_ratio": statistics.median(d.get("route/skip_ratio", 0.0) for d in timed),
            "run_dir": str(run)}


def cpu_per_step(run: Path, warmup: int) -> Optional[float]:
    """Median over the timed steps of the CPU seconds of every process of the run: the workers'
    (``cpu_s``: each process, every thread, since its previous report) and the coordinator's."""
    totals = []
    for line in (run / "routes.jsonl").read_text().splitlines():
        entry = json.loads(line)
        timings = entry.get("timings") or {}
        if entry["step"] >= warmup and timings and all("cpu_s" in t for t in timings.values()):
            totals.append(sum(t["cpu_s"] for t in timings.values()) + entry.get("coordinator_cpu_s", 0.0))
    return statistics.median(totals) if totals else None


def outside_worker_steps(run: Path, warmup: int) -> Optional[float]:
    """Median of (iteration time - the longest worker step): the coordinator round trip (command,
    reports, logging) that a worker does not see. From routes.jsonl timings and metrics.jsonl."""
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    iter_by_step = {d["step"]: d["time/iter_s"] for d in metrics if "time/iter_s" in d}
    gaps = []
    for line in (run / "routes.jsonl").read_text().splitlines():
        entry = json.loads(line)
        timings = entry.get("timings") or {}
        if entry["step"] >= warmup and timings and entry["step"] in iter_by_step:
            gaps.append(iter_by_step[entry["step"]] - max(t["step_s"] for t in timings.values()))
    return statistics.median(gaps) if gaps else None


def run_baseline(script: str, extra: List[str], overrides: List[str], iters: int, warmup: int,
                 workdir: Path, name: str) -> dict:
    out = workdir / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "bench" / "baselines" / script), *extra, f"--iters={iters}",
           f"--warmup={warmup}", f"--out={out}", *overrides]
    with (workdir / f"{name}.log").open("w") as log:
        code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=1800).returncode
    if code != 0 or not out.is_file():
        tail = (workdir / f"{name}.log").read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"{script} exited with {code}: {' | '.join(tail)}")
    return json.loads(out.read_text())


def calibrate(model_overrides: List[str], num_stages: int, reps: int = 20) -> dict:
    """Time the worker's compute functions on one stage in this process (one thread): forward per
    sample per layer, backward / forward, and head + loss / forward of stage 0 (cost.* of the model)."""
    import torch

    from bench.baselines.common import load_setup
    from skippipe.model.transformer import build_stages
    from skippipe.train import compute

    torch.set_num_threads(1)
    cfg, spec, _ = load_setup(model_overrides + [f"schedule.num_stages={num_stages}"])
    stages = build_stages(spec, num_stages, cfg.run.seed, only=[0, 1])
    samples = cfg.train.samples_per_microbatch
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(samples, spec.seq_len, spec.dim, generator=gen)
    targets = torch.randint(0, spec.vocab_size, (samples, spec.seq_len), generator=gen)
    fwd, bwd, loss = [], [], []
    for _ in range(reps + 3):
        t0 = time.perf_counter()
        out, saved = compute.forward(stages[1], hidden)
        t1 = time.perf_counter()
        compute.backward(stages[1], saved, torch.ones_like(out))
        t2 = time.perf_counter()
        compute.loss_and_head_grads(stages[0], out, targets)
        t3 = time.perf_counter()
        fwd.append(t1 - t0), bwd.append(t2 - t1), loss.append(t3 - t2)
    f, b, lo = (statistics.median(x[3:]) for x in (fwd, bwd, loss))
    layers = len(stages[1].layer_ids)
    return {"stage_layers": layers, "samples": samples, "seq_len": spec.seq_len, "dim": spec.dim, "reps": reps,
            "stage_fwd_ms": 1e3 * f, "stage_bwd_ms": 1e3 * b,
            "head_loss_ms": 1e3 * lo, "stage_fwd_bwd_ms": 1e3 * (f + b),
            "fwd_s_per_sample_layer": f / (layers * samples), "bwd_factor": b / f, "loss_factor": lo / f}


# ---------------------------------------------------------------------------------------------
# the three experiments


def rounds(systems: Dict[str, callable], repeats: int) -> Dict[str, List[dict]]:
    """Run every system once per round, in an order rotated each round (fair to drifting load)."""
    names = list(systems)
    out: Dict[str, List[dict]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0, load0 = time.perf_counter(), os.getloadavg()[0]
            out[name].append({**systems[name](r), "wall_s": time.perf_counter() - t0,
                              "loadavg_before": load0, "loadavg_after": os.getloadavg()[0]})
            print(f"  round {r + 1}/{repeats} {name:<24} median {out[name][-1]['median_s']:.3f} s/iter "
                  f"({time.perf_counter() - t0:.0f} s wall, load {os.getloadavg()[0]:.1f})", flush=True)
    return out


def overhead(args, workdir: Path) -> dict:
    shared = OVERHEAD_MODEL + [f"train.steps={args.warmup + args.iters}", f"runtime.host_memory={args.host_memory}"]
    systems = {
        "skippipe full": lambda r: run_skippipe(shared + OVERHEAD_SKIPPIPE + COMMON_SKIPPIPE,
                                                args.warmup + args.iters, args.warmup, workdir, f"a_skippipe_{r}"),
        "torch 1F1B": lambda r: run_baseline("torch_pipe.py", ["--schedule=1f1b"], shared, args.iters,
                                             args.warmup, workdir, f"a_torch1f1b_{r}"),
        "torch GPipe": lambda r: run_baseline("torch_pipe.py", ["--schedule=gpipe"], shared, args.iters,
                                              args.warmup, workdir, f"a_torchgpipe_{r}"),
    }
    if args.deepspeed:
        systems["deepspeed 1F1B"] = lambda r: run_baseline("deepspeed_pipe.py", [], shared, args.iters,
                                                           args.warmup, workdir, f"a_deepspeed_{r}")
    results = rounds(systems, args.repeats)
    sp = results["skippipe full"]
    ratios = {other: [s["median_s"] / o["median_s"] for s, o in zip(sp, results[other])]
              for other in results if other != "skippipe full"}
    cpu_ratios = {other: [s["cpu_s"] / o["cpu_s"] for s, o in zip(sp, results[other]) if s.get("cpu_s") and o.get("cpu_s")]
                  for other in results if other != "skippipe full"}
    cpu = {k: [r["cpu_s"] for r in v if r.get("cpu_s")] for k, v in results.items()}
    return {"overrides": shared, "skippipe_overrides": OVERHEAD_SKIPPIPE + COMMON_SKIPPIPE,
            "runs": results, "median_s": {k: statistics.median(r["median_s"] for r in v) for k, v in results.items()},
            "ratio_skippipe_over": {k: statistics.median(v) for k, v in ratios.items()}, "ratio_rounds": ratios,
            "cpu_s": {k: statistics.median(v) if v else None for k, v in cpu.items()},
            "cpu_ratio_skippipe_over": {k: statistics.median(v) if v else None for k, v in cpu_ratios.items()}}


def geo(args, workdir: Path, cal: dict) -> dict:
    cost = [f"cost.fwd_s_per_sample_layer={cal['fwd_s_per_sample_layer']:.6g}",
            f"cost.bwd_factor={cal['bwd_factor']:.4g}", f"cost.loss_factor={cal['loss_factor']:.4g}",
            f"cost.grad_sync={str(args.grad_sync).lower()}"]
    topology = workdir / "geo_bench_topology.yaml"
    topology.write_text(json.dumps(GEO_TOPOLOGY))  # JSON is YAML
    overrides = GEO_MODEL + GEO_SKIPPIPE + COMMON_SKIPPIPE + cost + [f"topology.file={topology}"]
    steps = args.warmup + args.geo_iters
    systems = {m: (lambda r, m=m: run_skippipe(overrides + [f"schedule.method={m}"], steps, args.warmup, workdir,
                                                f"b_{m}_{r}")) for m in ("full", "skippipe")}
    results = rounds(systems, args.repeats)
    out = {"overrides": overrides, "topology": GEO_TOPOLOGY, "runs": results}
    for m, runs in results.items():
        measured = statistics.median(r["median_s"] for r in runs)
        predicted = statistics.median(r["predicted_s"] for r in runs)
        out[m] = {"measured_s": measured, "predicted_s": predicted, "measured_over_predicted": measured / predicted,
                  "predicted_with_grad_sync_s": predicted_with_grad_sync(runs[-1]["run_dir"], overrides, m),
                  "predicted_with_measured_compute_s": statistics.median(
                      v for v in (predicted_with_measured_compute(r["run_dir"], overrides, m, args.warmup)
                                  for r in runs) if v is not None)}
    out["skippipe_vs_full"] = 1.0 - out["skippipe"]["measured_s"] / out["full"]["measured_s"]
    return out


def predicted_with_measured_compute(run_dir: str, overrides: List[str], method: str, warmup: int) -> Optional[float]:
    """The simulator's makespan of the executed plan with each node's compute per phase replaced by
    what that node measured in the run (wall time: it includes this box's CPU contention, which the
    single-process calibration cannot see). Splits the prediction error into compute vs the rest."""
    from skippipe.config import load_config
    from skippipe.plan import Plan
    from skippipe.schedule import build_cost
    from skippipe.simulate import simulate

    entries = [json.loads(line) for line in (Path(run_dir) / "routes.jsonl").read_text().splitlines()]
    entries = [e for e in entries if e["step"] >= warmup and e.get("timings")]
    if not entries:
        return None
    plan = Plan.from_dict(entries[-1]["plan"])
    cfg = load_config(None, overrides + [f"schedule.method={method}"])
    _, _, cost = build_cost(cfg)
    stage_of = plan.stage_of()
    for node, acts in plan.node_order.items():
        for phase in ("F", "L", "B"):
            count = sum(1 for _, ph in acts if ph == phase)
            per_step = [e["timings"][node]["compute_s"][phase] / count for e in entries
                        if count and node in e["timings"]]
            if per_step:
                cost.measured_ewma = 1.0  # take the median as is
                cost.observe_compute(node, stage_of[node], phase, statistics.median(per_step))
    try:
        return simulate(plan, cost, cfg.schedule.memory).makespan_s
    except Exception as err:  # a diagnostic column only
        print(f"  (prediction with measured compute failed: {type(err).__name__}: {err})")
        return None


def predicted_with_grad_sync(run_dir: str, overrides: List[str], method: str) -> Optional[float]:
    """The simulator's makespan of the executed plan when the replicas' gradient all-reduce over the
    geo links is modelled too (the runtime's link emulator does not delay collectives)."""
    from skippipe.config import load_config
    from skippipe.plan import Plan
    from skippipe.schedule import build_cost
    from skippipe.simulate import simulate

    lines = (Path(run_dir) / "routes.jsonl").read_text().splitlines()
    if not lines:
        return None
    plan = Plan.from_dict(json.loads(lines[-1])["plan"])
    cfg = load_config(None, [o for o in overrides if not o.startswith("cost.grad_sync")]
                      + ["cost.grad_sync=true", f"schedule.method={method}"])
    _, _, cost = build_cost(cfg)
    try:
        return simulate(plan, cost, cfg.schedule.memory).makespan_s
    except Exception as err:  # a diagnostic column only; never lose the measurements for it
        print(f"  (prediction with the all-reduce failed: {type(err).__name__}: {err})")
        return None


# ---------------------------------------------------------------------------------------------
# report


def microbatches(overrides: List[str]) -> int:
    """Microbatches per iteration: microbatches_per_originator x stage-0 replicas."""
    from skippipe.config import load_config

    cfg = load_config(None, [o for o in overrides if not o.startswith("launcher")])
    return cfg.schedule.microbatches_per_originator * (list(cfg.schedule.partition_sizes) or [1])[0]


def fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def rss_text(values) -> str:
    return "/".join(f"{v:.0f}" for v in values) if values else "n/a"


def calibration_text(cal: dict) -> str:
    return (f"stage of {cal['stage_layers']} layer(s), {cal['samples']} x {cal['seq_len']} tokens, dim {cal['dim']}, 1 process, 1 thread: "
            f"fwd {cal['stage_fwd_ms']:.1f} ms, bwd {cal['stage_bwd_ms']:.1f} ms, head+loss {cal['head_loss_ms']:.1f} ms"
            f" -> cost.fwd_s_per_sample_layer={cal['fwd_s_per_sample_layer']:.3g} cost.bwd_factor={cal['bwd_factor']:.2f}"
            f" cost.loss_factor={cal['loss_factor']:.2f}")


def wire_bytes(args, workdir: Path) -> dict:
    """E: what the workers sent per message and per iteration, fp32 against bf16 (same shape)."""
    steps = args.warmup + 2
    out = {}
    for precision in ("fp32", "bf16"):
        run = run_skippipe(OVERHEAD_MODEL + OVERHEAD_SKIPPIPE + COMMON_SKIPPIPE + [f"train.precision={precision}"],
                           steps, args.warmup, workdir, f"e_bytes_{precision}")
        routes = [json.loads(line) for line in (Path(run["run_dir"]) / "routes.jsonl").read_text().splitlines()]
        per_iter = [sum(t["sent_bytes"] for t in r["timings"].values()) for r in routes if r.get("timings")]
        messages = [sum(t["sent_messages"] for t in r["timings"].values()) for r in routes if r.get("timings")]
        out[precision] = {"bytes_per_message": statistics.median(b / m for b, m in zip(per_iter, messages)),
                          "bytes_per_iter": statistics.median(per_iter), "messages_per_iter": statistics.median(messages)}
    out["ratio_bf16_over_fp32"] = out["bf16"]["bytes_per_message"] / out["fp32"]["bytes_per_message"]
    return out


def print_table(report: dict) -> None:
    a, b, e = report.get("overhead"), report.get("geo"), report.get("bytes")
    if e:
        print("\nE. bytes on the wire (overhead shape; the workers' step reports)")
        print(f"{'precision':<10} {'bytes/message':>14} {'messages/iter':>14} {'bytes/iter':>12}")
        for precision in ("fp32", "bf16"):
            row = e[precision]
            print(f"{precision:<10} {row['bytes_per_message']:>14.0f} {row['messages_per_iter']:>14.0f} "
                  f"{row['bytes_per_iter']:>12.0f}")
        print(f"bf16 / fp32 bytes per message: {e['ratio_bf16_over_fp32']:.3f}")
    if a:
        print(f"\nA. overhead: 4 stages x 1 replica, {a['microbatches']} microbatches/iter, no link emulation; "
              f"median of {report['repeats']} round(s)\n   calibration: {calibration_text(a['calibration'])}")
        print(f"{'system':<16} {'s/iter':>7} {'skippipe/x':>10} {'CPU s/iter':>10} {'skippipe/x':>10} "
              f"{'last loss':>9} {'peak RSS MB per rank':>24}")
        for name, median in a["median_s"].items():
            ratio = a["ratio_skippipe_over"].get(name)
            cpu, cpu_ratio = a.get("cpu_s", {}).get(name), a.get("cpu_ratio_skippipe_over", {}).get(name)
            run = a["runs"][name][-1]
            print(f"{name:<16} {median:>7.3f} {('%.3f' % ratio) if ratio else '':>10} {fmt(cpu):>10} "
                  f"{('%.3f' % cpu_ratio) if cpu_ratio else '':>10} {run['losses'][-1]:>9.4f} "
                  f"{rss_text(run['peak_rss_mb']):>24}")
        gaps = [r["outside_worker_s"] for r in a["runs"]["skippipe full"] if r.get("outside_worker_s") is not None]
        if gaps:
            print(f"skippipe: iteration time outside the workers' steps (coordinator round trip): "
                  f"{1e3 * statistics.median(gaps):.0f} ms per iteration")
    if b:
        print(f"\nB/C. emulated two regions (20 ms / 1 Gbit/s inside, 50 ms / 0.1 Gbit/s between), 6 nodes "
              f"[2,2,1,1], {report['geo_microbatches']} microbatches/iter; median of {report['repeats']} round(s)"
              f"\n   calibration: {calibration_text(report['calibration'])}")
        print(f"{'method':<9} {'measured s':>10} {'predicted s':>11} {'meas/pred':>9} {'pred, measured compute':>22} "
              f"{'pred+allreduce s':>16} {'skip':>5} {'peak RSS MB per worker':>24}")
        for m in ("full", "skippipe"):
            row, run = b[m], b["runs"][m][-1]
            print(f"{m:<9} {row['measured_s']:>10.3f} {row['predicted_s']:>11.3f} {row['measured_over_predicted']:>9.3f} "
                  f"{fmt(row.get('predicted_with_measured_compute_s')):>22} {fmt(row['predicted_with_grad_sync_s']):>16} "
                  f"{run['skip_ratio']:>5.2f} {rss_text(run['peak_rss_mb']):>24}")
        gaps = [r["outside_worker_s"] for m in ("full", "skippipe") for r in b["runs"][m]
                if r.get("outside_worker_s") is not None]
        if gaps:
            print(f"iteration time outside the workers' steps (coordinator round trip): "
                  f"{1e3 * statistics.median(gaps):.0f} ms per iteration")
        print(f"skippipe vs full (measured): {-100 * b['skippipe_vs_full']:+.1f}%")
    print("\ntargets:")
    for name, (ok, text) in report["targets"].items():
        print(f"  [{'ok' if ok else 'MISSED'}] {name}: {text}")


def targets(report: dict) -> dict:
    out = {}
    a, b, e = report.get("overhead"), report.get("geo"), report.get("bytes")
    if e:
        r = e["ratio_bf16_over_fp32"]
        out["bf16 bytes per transfer <= 0.50x fp32"] = (r <= 0.5, f"{r:.3f}x")
    if a:
        stage_ms = a["calibration"]["stage_fwd_bwd_ms"]
        out["stage fwd+bwd >= 20 ms"] = (stage_ms >= 20.0, f"{stage_ms:.1f} ms per microbatch")
        r = a["ratio_skippipe_over"]["torch 1F1B"]
        out["wall time vs torch 1F1B <= 1.00x"] = (r <= 1.0, f"{r:.3f}x")
        r = (a.get("cpu_ratio_skippipe_over") or {}).get("torch 1F1B")
        if r is not None:
            out["CPU time vs torch 1F1B <= 1.00x"] = (r <= 1.0, f"{r:.3f}x")
        if "deepspeed 1F1B" in a["ratio_skippipe_over"]:
            r = a["ratio_skippipe_over"]["deepspeed 1F1B"]
            out["overhead vs DeepSpeed <= 1.00x"] = (r <= 1.0, f"{r:.3f}x")
    if b:
        for m in ("full", "skippipe"):
            r = b[m]["measured_over_predicted"]
            out[f"prediction {m} within 15%"] = (abs(r - 1) <= 0.15, f"measured/predicted {r:.3f}")
        red = b["skippipe_vs_full"]
        out["skippipe >= 30% below full"] = (red >= 0.30, f"{100 * red:.1f}% below")
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, 3 timed iterations")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of side-by-side runs")
    parser.add_argument("--iters", type=int, default=12, help="timed iterations per run (overhead)")
    parser.add_argument("--geo-iters", type=int, default=10, help="timed iterations per run (geo)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-deepspeed", dest="deepspeed", action="store_false")
    parser.add_argument("--grad-sync", action="store_true",
                        help="predict with the replicas' gradient all-reduce over the geo links (cost.grad_sync); "
                             "off by default because the runtime's link emulator does not delay collectives")
    parser.add_argument("--only", choices=("overhead", "geo", "bytes"), help="run one experiment")
    parser.add_argument("--host-memory", choices=("retain", "system"), default="retain",
                        help="runtime.host_memory for every system of the overhead comparison (the baselines "
                             "apply the same allocator policy, so the comparison is of the runtimes)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.iters, args.geo_iters, args.warmup = 1, 3, 3, 1
    if args.deepspeed:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            print("deepspeed is not installed (DS_BUILD_OPS=0 pip install -e '.[deepspeed]'): skipping it")
            args.deepspeed = False
    return args


def save(report: dict, path: str) -> None:
    """Write the report (after each experiment, so a late failure loses nothing)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {**report, "targets": {k: {"ok": ok, "value": v} for k, (ok, v) in targets(report).items()}}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="skippipe-runtime-bench-"))
    report = {"machine": machine_info(), "loadavg_start": os.getloadavg(), "quick": args.quick,
              "repeats": args.repeats, "warmup": args.warmup, "iters": args.iters, "geo_iters": args.geo_iters,
              "workdir": str(workdir), "command": " ".join(["bench/runtime_bench.py", *(argv or sys.argv[1:])])}
    if args.only in (None, "overhead"):
        print("A. overhead", flush=True)
        cal = calibrate(OVERHEAD_MODEL, 4)
        report["overhead"] = {**overhead(args, workdir), "calibration": cal,
                              "microbatches": microbatches(OVERHEAD_MODEL + OVERHEAD_SKIPPIPE)}
        save(report, args.out)
    if args.only in (None, "geo"):
        print("B/C. emulated geo topology", flush=True)
        report["calibration"] = calibrate(GEO_MODEL, 4)
        report["geo"] = geo(args, workdir, report["calibration"])
        report["geo_microbatches"] = microbatches(GEO_MODEL + GEO_SKIPPIPE)
    if args.only in (None, "bytes"):
        print("E. bytes on the wire", flush=True)
        report["bytes"] = wire_bytes(args, workdir)
        save(report, args.out)
    report["loadavg_end"] = os.getloadavg()
    report["wall_s"] = time.time() - started
    save(report, args.out)
    report["targets"] = targets(report)
    print_table(report)
    print(f"\nwrote {args.out} (run logs in {workdir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
