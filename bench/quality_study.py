"""Quality study (issues 9 and 19): convergence with skipping and reordering over several seeds, on a
shallow and a deeper model, and robustness to missing stages.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quality_study.py [--seeds 0,1,2] [--settings shallow,deep]
        [--jobs 2] [--quick] [--steps N] [--fresh]
    make bench-quality

Two settings, each a model trained in-process (``launcher=inprocess``, one thread per run) on the
default corpus (Python's own sources), byte tokenizer, with the same seed, data order and token
budget under several schedules:

    shallow   the ``tiny`` preset (dim 128, 8 layers): 8 stages x 1 layer, stage 0 with 4 replicas
              (11 nodes); runs full, skippipe_25/33/50, skippipe_nc_33, random_skip_33,
              skippipe_noswap_33 (``schedule.max_swaps=0``) and skippipe_swap1_33 (``max_swaps=1``)
    deep      ``tiny`` with 12 layers: 6 stages x 2 layers, stage 0 with 4 replicas (9 nodes);
              runs full, skippipe_33, skippipe_50 and skippipe_noswap_33 (on 6 stages 25% and 33%
              both skip 2 stages)

Every run: 2 microbatches per stage-0 node (8 microbatches of 8 x 128 tokens per iteration), one
plan per run (``schedule.replan_every=0``, as in the paper). A seed (``run.seed``) fixes the
initial weights, the data order and the evaluation subsets, so the runs of one seed are paired:
each is compared with the same seed's ``full`` run.

Per run: the full model's validation loss every ``steps/20`` steps and at the end, the training
loss per step, the routes' shape (how often a path visits a stage right after a later one) and
``skippipe eval``'s robustness numbers (keep 75% / 50% of the non-zero stages, seeded random
subsets). Simulated wall-clock time is ``steps x`` the simulator's iteration time of the same
method on the paper's geo20 setting (``configs/paper_geo20.yaml``, 6 stages).

Every run is its own process (``--jobs`` at a time) and leaves ``result.json`` in its run directory
(runs/quality_study[_quick]/<setting>/s<seed>/<run>); a rerun reuses a result whose configuration is
the same (``--fresh`` retrains). Writes bench/results/quality.json, quality.md and quality_*.png
(``--quick``: runs/quality_study_quick/report). ``--report-only`` rewrites the report from
quality.json. A benchmark, not a test: it never fails on a number; the report says which targets
hold, with their intervals.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from bench import quality_report  # noqa: E402
from bench.machine import machine_info  # noqa: E402
from skippipe.config import load_config  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GEO20 = ROOT / "configs" / "paper_geo20.yaml"

# name -> (method, skip_ratio, extra overrides)
RUNS: Dict[str, Tuple[str, float, List[str]]] = {
    "full": ("full", 0.0, []),
    "skippipe_25": ("skippipe", 0.25, []),
    "skippipe_33": ("skippipe", 0.33, []),
    "skippipe_50": ("skippipe", 0.50, []),
    "skippipe_nc_33": ("skippipe_nc", 0.33, []),
    "random_skip_33": ("random_skip", 0.33, []),
    "skippipe_noswap_33": ("skippipe", 0.33, ["schedule.max_swaps=0"]),
    "skippipe_swap1_33": ("skippipe", 0.33, ["schedule.max_swaps=1"]),
}


@dataclass(frozen=True)
class Setting:
    name: str
    n_layers: int
    partition: Tuple[int, ...]
    runs: Tuple[str, ...]

    @property
    def num_stages(self) -> int:
        return len(self.partition)

    def overrides(self) -> List[str]:
        return [f"model.n_layers={self.n_layers}",
                f"schedule.partition_sizes=[{','.join(map(str, self.partition))}]",
                f"topology.generate={{count: {sum(self.partition)}, placement: single}}"]


SETTINGS: Dict[str, Setting] = {
    "shallow": Setting("shallow", 8, (4, 1, 1, 1, 1, 1, 1, 1), tuple(RUNS)),
    "deep": Setting("deep", 12, (4, 1, 1, 1, 1, 1), ("full", "skippipe_33", "skippipe_50", "skippipe_noswap_33")),
}

COMMON = [
    "launcher=inprocess", "model.preset=tiny", "run.threads=1",
    "train.lr=3.0e-3", "train.samples_per_microbatch=8", "schedule.microbatches_per_originator=2",
    "schedule.memory=2", "schedule.replan_every=0",
    "tracking.wandb.mode=disabled", "tracking.progress=false", "verify.level='off'",
    "run.overwrite=true",  # a rerun of the study replaces its runs
]
KEEP_FRACTIONS = (0.75, 0.5)


@dataclass(frozen=True)
class Job:
    setting: str
    seed: int
    name: str
    steps: int
    quick: bool
    samples: int

    @property
    def label(self) -> str:
        return f"{self.setting}:{self.seed}:{self.name}"

    @property
    def every(self) -> int:
        return 1 if self.quick else max(1, self.steps // 20)

    def overrides(self, run_dir: Path) -> List[str]:
        method, skip, extra = RUNS[self.name]
        return [*COMMON, *SETTINGS[self.setting].overrides(), f"run.seed={self.seed}",
                f"schedule.method={method}", f"schedule.skip_ratio={skip}", *extra,
                f"train.steps={self.steps}", f"train.warmup_steps={1 if self.quick else 10}",
                f"train.eval_batches={2 if self.quick else 16}", f"run.name={self.name}", f"run.dir={run_dir}"]

    def run_dir(self, base_dir: Path) -> Path:
        return base_dir / self.setting / f"s{self.seed}" / self.name

    def log(self, base_dir: Path) -> Path:
        return self.run_dir(base_dir).with_suffix(".log")

    def key(self) -> Dict[str, Any]:
        """What the result depends on: a stored result with another key is retrained."""
        return {"job": self.label, "steps": self.steps, "quick": self.quick, "samples": self.samples,
                "keep_fractions": list(KEEP_FRACTIONS), "overrides": self.overrides(Path("RUN"))}


# ---------------------------------------------------------------------------------------------
# geo20 iteration times


def geo20_times(names: Sequence[str]) -> Dict[str, Any]:
    """Simulated iteration time on configs/paper_geo20.yaml for the runs ``names``: the plan that
    ``skippipe plan configs/paper_geo20.yaml schedule.skip_ratio=.. [max_swaps=..]`` makes for the
    run's method (``plan_for_method``: skippipe co-allocated by its routed plan, the baselines on
    DT-FM's allocation), simulated. Pure: depends on the config and the code, not on training."""
    from skippipe.commands.plan import plan_for_method
    from skippipe.schedule import SchedulerParams, allocate, build_cost
    from skippipe.simulate import simulate

    out: Dict[str, Any] = {"config": str(GEO20.relative_to(ROOT)), "cases": {}}
    t0 = time.perf_counter()
    allocations: Dict[Tuple[str, ...], Any] = {}
    for name in names:
        method, skip, extra = RUNS[name]
        overrides = (f"schedule.skip_ratio={skip}", *extra) if method != "full" else ()
        cfg = load_config(str(GEO20), list(overrides))
        topology, _, cost = build_cost(cfg)
        params = SchedulerParams.from_config(cfg)
        if overrides not in allocations:
            allocations[overrides] = allocate(topology, cost, params)
        plan = plan_for_method(method, allocations[overrides], topology, cost, params)
        out["cases"][name] = {"method": method, "skip_ratio": skip, "overrides": extra,
                              "iteration_time_s": simulate(plan, cost, cfg.schedule.memory).makespan_s,
                              "stages_visited_of_6": plan.stages_visited}
    out["plan_time_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------
# one run (its own process)


def path_stats(plan) -> Dict[str, Any]:
    """The routes' shape: for every stage visit after stage 0, did its input come from the stage right
    before it (in order), from an earlier one (a skip) or from a later one (a swap put it first)."""
    inputs = {"in_order": 0, "after_skip": 0, "after_later_stage": 0}
    paths_with_swap, backward_steps, visits = 0, 0, [0] * plan.num_stages
    for mb in plan.microbatches:
        stages = [0, *plan.stages_of(mb)]
        back = 0
        for prev, stage in zip(stages, stages[1:]):
            visits[stage] += 1
            kind = "in_order" if prev == stage - 1 else ("after_skip" if prev < stage else "after_later_stage")
            inputs[kind] += 1
            back += kind == "after_later_stage"
        backward_steps += back
        paths_with_swap += back > 0
    total = max(1, sum(inputs.values()))
    count = max(1, len(plan.microbatches))
    return {"microbatches": len(plan.microbatches), "paths": [plan.stages_of(mb) for mb in plan.microbatches],
            "paths_with_swap": paths_with_swap / count, "backward_steps_per_path": backward_steps / count,
            "input_shares": {k: v / total for k, v in inputs.items()}, "visits": visits}


def train_job(job: Job, run_dir: Path) -> Dict[str, Any]:
    """Train one run with the full model's validation curve; returns its record (no robustness yet)."""
    from skippipe.process import pin_threads, resolve_device
    from skippipe.runtime.coordinator import Coordinator, InProcessExecutor

    cfg = load_config(None, job.overrides(run_dir))
    curve: List[Tuple[int, float]] = []
    seen: Dict[str, Any] = {"eval_s": 0.0, "plan": None}

    class CurveExecutor(InProcessExecutor):
        """The reference in-process executor, plus the full model's validation loss every ``every``
        steps (no_grad, no dropout: training is unchanged)."""

        batches = None

        def _val(self, data) -> float:
            t = time.perf_counter()
            if self.batches is None:
                self.batches = data.val_batches(cfg.train.eval_batches, cfg.train.samples_per_microbatch,
                                                self.reference.spec.seq_len)
            loss = self.reference.evaluate(self.batches)
            seen["eval_s"] += time.perf_counter() - t
            return loss

        def step(self, plan, step, lr, data, checkpoint=None, **kwargs):
            if step == 0:
                curve.append((0, self._val(data)))
                seen["plan"] = plan
            outcome = super().step(plan, step, lr, data, checkpoint, **kwargs)
            if (step + 1) % job.every == 0 and step + 1 < cfg.train.steps:
                curve.append((step + 1, self._val(data)))
            return outcome

    pin_threads(cfg.run.threads)
    device = resolve_device(cfg.train.device)
    t0 = time.perf_counter()
    summary = Coordinator(cfg, lambda spec, n: CurveExecutor(cfg, spec, n, device)).run()
    wall = time.perf_counter() - t0
    curve.append((job.steps, summary["loss/val"]))  # the coordinator's final validation (same batches)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_step = [r for r in records if "time/iter_s" in r]
    return {"val_loss": summary["loss/val"], "ppl": summary["ppl/val"], "tokens": summary["tokens"],
            "final_train_loss": summary["loss/train"], "curve": curve,
            "train_loss": [r["loss/train"] for r in per_step],
            "achieved_skip_ratio": sum(r.get("route/skip_ratio", 0.0) for r in per_step) / max(1, len(per_step)),
            "swaps_per_iter": per_step[-1].get("route/swaps", 0) if per_step else 0,
            "coverage": [per_step[-1].get(f"stage/{s}/coverage", 0.0) for s in range(SETTINGS[job.setting].num_stages)]
            if per_step else [], "routes": path_stats(seen["plan"]),
            "train_s": wall, "curve_eval_s": seen["eval_s"]}


def run_job(job: Job, base_dir: Path) -> Dict[str, Any]:
    """Train, evaluate robustness, write ``result.json`` (temp file, then rename) and return it."""
    import torch

    from skippipe.commands.eval import run_eval
    from skippipe.fileio import write_text_atomic

    torch.set_num_threads(1)
    logging_setup()
    run_dir = job.run_dir(base_dir)
    record = {"key": job.key(), "setting": job.setting, "seed": job.seed, "name": job.name, "steps": job.steps,
              **train_job(job, run_dir)}
    t = time.perf_counter()
    report = run_eval(str(run_dir), keep_fractions=list(KEEP_FRACTIONS), samples=job.samples)
    record["robust_eval_s"] = time.perf_counter() - t
    record["eval_full_loss_check"] = report["full"]["loss"]
    for row in report["results"]:
        f = row["keep_fraction"]
        record[f"loss_keep_{f}"], record[f"ppl_keep_{f}"] = row["loss"], row["ppl"]
        record[f"stages_kept_{f}"] = row["stages_kept"]
        record[f"subsets_keep_{f}"] = row["subsets"]
    record["run_dir"] = str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir)
    record["own_paths_loss"] = own_paths_loss(run_dir, record["routes"]["paths"])
    write_text_atomic(run_dir / "result.json", json.dumps(record, indent=1))
    return record


def own_paths_loss(run_dir: Path, paths: Sequence[Sequence[int]]) -> float:
    """The trained model's validation loss along the plan's own paths, in their visit order (each
    distinct path evaluated once, weighted by the microbatches that take it): the function the run
    trained, where the validation loss runs every stage in order."""
    from collections import Counter

    from skippipe.commands.eval import load_run
    from skippipe.runfiles import read_run_config
    from skippipe.train.evaluate import evaluate

    stages, batches = load_run(run_dir, read_run_config(run_dir))
    counts = Counter(tuple(p) for p in paths)
    device = stages[0].embed.weight.device
    return sum(n * evaluate(stages, batches, list(p), device=device) for p, n in counts.items()) / sum(counts.values())


def completed(job: Job, record: Dict[str, Any], base_dir: Path) -> Dict[str, Any]:
    """A stored record with the fields added since it was trained (``own_paths_loss``)."""
    if "own_paths_loss" not in record:
        from skippipe.fileio import write_text_atomic

        run_dir = job.run_dir(base_dir)
        record["own_paths_loss"] = own_paths_loss(run_dir, record["routes"]["paths"])
        write_text_atomic(run_dir / "result.json", json.dumps(record, indent=1))
    return record


# ---------------------------------------------------------------------------------------------
# the jobs


def stored(job: Job, base_dir: Path) -> Optional[Dict[str, Any]]:
    """A finished result of exactly this job, or None."""
    path = job.run_dir(base_dir) / "result.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == job.key() else None


def run_all(jobs: Sequence[Job], base_dir: Path, parallel: int, fresh: bool, start: float) -> Dict[str, Dict]:
    """Every job's record: stored ones reused (unless ``fresh``), the others run ``parallel`` at a time,
    each in its own process (log beside its run directory). A job that fails is reported, not fatal."""
    results: Dict[str, Dict] = {}
    pending = []
    for job in jobs:
        record = None if fresh else stored(job, base_dir)
        if record is not None:
            results[job.label] = completed(job, record, base_dir)
        else:
            pending.append(job)
    print(f"{len(jobs)} runs: {len(results)} reused, {len(pending)} to train, {parallel} at a time", flush=True)
    running: List[Tuple[Job, subprocess.Popen, float]] = []
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            log = job.log(base_dir)
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--job", job.label, "--steps", str(job.steps),
                   "--samples", str(job.samples), "--runs-dir", str(base_dir)] + (["--quick"] if job.quick else [])
            with open(log, "w") as handle:
                proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
            running.append((job, proc, time.perf_counter()))
            print(f"[{(time.perf_counter() - start) / 60:5.1f} min] started {job.label}", flush=True)
        time.sleep(1.0)
        for item in list(running):
            job, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            record = stored(job, base_dir)
            took = time.perf_counter() - t0
            if proc.returncode != 0 or record is None:
                print(f"    FAILED {job.label} (exit {proc.returncode}); see {job.log(base_dir)}", flush=True)
                continue
            results[job.label] = record
            print(f"    {job.label}: val loss {record['val_loss']:.4f}, keep 0.5 ppl {record['ppl_keep_0.5']:.3f}; "
                  f"{took:.0f} s", flush=True)
    return results


def order_jobs(settings: Sequence[str], seeds: Sequence[int], runs: Optional[Sequence[str]], steps: int,
               quick: bool, samples: int) -> List[Job]:
    """Seed by seed, so that a study cut short still has whole paired seeds."""
    jobs = []
    for seed in seeds:
        for setting in settings:
            for name in SETTINGS[setting].runs:
                if runs is None or name in runs:
                    jobs.append(Job(setting, seed, name, steps, quick, samples))
    return jobs


# ---------------------------------------------------------------------------------------------
# main


def parse_list(text: str, valid: Sequence[str], flag: str) -> List[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in valid]
    if bad or not items:
        raise SystemExit(f"{flag} {text!r}: choose among {', '.join(valid)} (comma-separated)")
    return items


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per run (smoke test, minutes)")
    parser.add_argument("--seeds", default=None, help="comma-separated run seeds (default 0,1,2; --quick 0,1)")
    parser.add_argument("--settings", default="shallow,deep", help="comma-separated: shallow, deep")
    parser.add_argument("--runs", default=None, help="only these runs (comma-separated names; default all)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 200; --quick 4)")
    parser.add_argument("--samples", type=int, default=None,
                        help="random stage subsets per keep fraction (default 16; --quick 2)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time (default 2)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that have a stored result")
    parser.add_argument("--out", default=None, help="report directory (default bench/results; with --quick "
                        "runs/quality_study_quick/report, so a smoke run never overwrites the study)")
    parser.add_argument("--runs-dir", default=None, help="where the runs go (default runs/quality_study[_quick])")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite quality.md and the plots from an existing quality.json (no training)")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)  # setting:seed:run, one run (internal)
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        raise SystemExit(f"--steps {args.steps}: give at least 2 steps")
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: give at least 1")
    try:
        args.seed_list = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2")).split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not args.seed_list:
        raise SystemExit("--seeds is empty: give comma-separated integers, e.g. 0,1,2")
    args.setting_list = parse_list(args.settings, list(SETTINGS), "--settings")
    args.run_list = None if args.runs is None else parse_list(args.runs, list(RUNS), "--runs")
    if args.run_list is not None and "full" not in args.run_list:
        raise SystemExit("--runs must include full: every run is compared with its seed's full run")
    args.steps = args.steps or (4 if args.quick else 200)
    args.samples = args.samples or (2 if args.quick else 16)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    base_dir = Path(args.runs_dir) if args.runs_dir else ROOT / "runs" / (
        "quality_study_quick" if args.quick else "quality_study")
    if args.job:
        setting, seed, name = args.job.split(":")
        run_job(Job(setting, int(seed), name, args.steps, args.quick, args.samples), base_dir)
        return 0
    out_dir = Path(args.out) if args.out else (ROOT / "runs" / "quality_study_quick" / "report" if args.quick
                                               else RESULTS)
    if args.report_only:
        return quality_report.report_only(out_dir, geo20_times)

    start = time.perf_counter()
    machine = machine_info()
    jobs = order_jobs(args.setting_list, args.seed_list, args.run_list, args.steps, args.quick, args.samples)
    print(f"quality study: {len(jobs)} runs ({', '.join(args.setting_list)}; seeds {args.seed_list}) x "
          f"{args.steps} steps; {machine['summary']}", flush=True)
    t = time.perf_counter()
    geo = geo20_times(sorted({j.name for j in jobs}, key=list(RUNS).index))
    print(f"geo20 iteration times ({time.perf_counter() - t:.0f} s): "
          + ", ".join(f"{n} {c['iteration_time_s']:.1f}" for n, c in geo["cases"].items()), flush=True)
    records = run_all(jobs, base_dir, args.jobs, args.fresh, start)

    command = "OMP_NUM_THREADS=1 .venv/bin/python bench/quality_study.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    result: Dict[str, Any] = {
        "machine": machine,
        "config": {"command": command, "quick": args.quick, "steps": args.steps, "seeds": args.seed_list,
                   "settings": {s: {"n_layers": SETTINGS[s].n_layers, "partition": list(SETTINGS[s].partition),
                                    "runs": [n for n in SETTINGS[s].runs if args.run_list is None or n in args.run_list],
                                    "params": model_params(SETTINGS[s])} for s in args.setting_list},
                   "overrides": COMMON, "runs": RUNS, "microbatches_per_step": 8,
                   "warmup_steps": 1 if args.quick else 10, "eval_batches": 2 if args.quick else 16,
                   "curve_every": jobs[0].every, "robust_samples": args.samples,
                   "keep_fractions": list(KEEP_FRACTIONS), "parallel_runs": args.jobs},
        "geo20": geo,
        "records": [records[j.label] for j in jobs if j.label in records],
        "missing": [j.label for j in jobs if j.label not in records],
    }
    result["total_runtime_s"] = time.perf_counter() - start
    result["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    quality_report.write_all(result, out_dir)
    return 0 if not result["missing"] else 1


def model_params(setting: Setting) -> int:
    from dataclasses import replace

    from skippipe.model.presets import PRESETS

    return replace(PRESETS["tiny"], n_layers=setting.n_layers).params()


def logging_setup() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("skippipe").setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
