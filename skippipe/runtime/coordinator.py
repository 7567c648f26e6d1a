"""The coordinator: owns the training loop for every launcher.

Each iteration it asks the planner for the plan (the same ``route`` the simulator uses), hands it to
an executor, gathers the outcome (losses, measured compute and transfer times), feeds the measured
times back into the cost model, logs metrics and the executed route. Two executors share this loop:

- :class:`InProcessExecutor` (``launcher=inprocess``): the reference executor, every stage here;
- :class:`RemoteExecutor` (``local``, torchrun, ``ray``): worker processes over the control channel.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from skippipe.config import Config, run_dir, to_yaml
from skippipe.fileio import write_text_atomic
from skippipe.plan import Plan
from skippipe.runtime import node_state
from skippipe.runtime.executor import Admission, Executor, Finished, StepOutcome
from skippipe.runtime.faults import FaultMonitor
from skippipe.runtime.membership import Membership
from skippipe.runtime.predict import Predictor, step_timings
from skippipe.runtime.recorder import RunRecorder
from skippipe.runtime.remote import NodeFailure, RemoteExecutor, WorkerFailed  # noqa: F401 (re-exported)

log = logging.getLogger("skippipe")


# ---------------------------------------------------------------------------------------------
# executors


class InProcessExecutor:
    """Every stage in this process (the reference executor of DESIGN.md section 6): an
    :class:`~skippipe.runtime.executor.Executor` whose members never fail and that nobody joins."""

    def __init__(self, cfg: Config, spec, num_stages: int, device: str):
        from skippipe.train.reference import ReferenceExecutor

        self.cfg = cfg
        self.reference = ReferenceExecutor(spec, num_stages, cfg.run.seed, cfg.train, device=device)
        self.membership = Membership([])
        self.plan: Optional[Plan] = None

    deferred_state = False  # state digests of a step are known right after it

    def start(self, nodes: List[str], vocab_size: int) -> None:
        self.membership = Membership(nodes)

    def resume(self, directory: Path) -> None:
        from skippipe.verify.checkpoint import load_stage_file
        from skippipe.verify.leaves import load_state_tensors

        for k, stage in self.reference.stages.items():
            load_state_tensors(stage, self.reference.optimizers[k], load_stage_file(directory / f"stage{k}.pt"))

    def _checkpoint(self, request: Optional[dict]) -> List[dict]:
        """Write the state as it is now (after the last step) as the checkpoint ``request`` asks."""
        if not request or self.plan is None:
            return []
        from skippipe.verify.checkpoint import save_tensors_atomic, tensor_digests
        from skippipe.verify.leaves import state_tensors

        directory = Path(request["dir"])
        directory.mkdir(parents=True, exist_ok=True)
        entries = []
        for k, nodes in enumerate(self.plan.allocation):
            if not nodes:
                continue
            tensors = dict(state_tensors(self.reference.stages[k], self.reference.optimizers[k]))
            tensors["meta/step"] = torch.tensor(request["step"], dtype=torch.int64)
            save_tensors_atomic(directory / f"stage{k}.pt", tensors)
            entries.append({"file": f"stage{k}.pt", "node": nodes[0], "tensors": tensor_digests(tensors)})
        return entries

    def step(self, plan: Plan, step: int, lr: float, data, checkpoint: Optional[dict] = None,
             meanwhile: Optional[Callable[[Plan], None]] = None, loss_scale: float = 1.0,
             snapshot: Optional[str] = None) -> StepOutcome:
        cfg = self.cfg
        if meanwhile is not None:
            meanwhile(plan)
        written = self._checkpoint(checkpoint)
        if snapshot:
            node_state.save_final(self.reference.stages, Path(snapshot))
        mbs = [data.microbatch(cfg.run.seed, step, r.id, cfg.train.samples_per_microbatch,
                               self.reference.spec.seq_len) for r in plan.microbatches]
        result = self.reference.step(plan, mbs, lr, level=cfg.verify.level, loss_scale=loss_scale)
        self.plan = plan
        return StepOutcome(result.losses, result.grad_norm, leaves=result.leaves, checkpoint=written)

    def finish(self, out: Path, checkpoint: Optional[dict] = None) -> Finished:
        written = self._checkpoint(checkpoint)
        node_state.save_final(self.reference.stages, out / "final")
        return Finished(self.reference.stages, {}, written)

    def close(self) -> None:
        pass

    def rejected(self) -> Optional[int]:
        return None  # no control channel

    # membership: no process to fail, replace or add
    def new_generation(self, dead) -> None:
        raise AssertionError("the in-process executor has no nodes to lose")

    def start_replacement(self, node: str, away_from_last: bool = False) -> None:
        raise AssertionError("the in-process executor has no nodes to replace")

    def join_requests(self) -> List[Dict[str, Any]]:
        return []

    def answer_join(self, request_id: int, status: str, **info) -> None:
        raise AssertionError("the in-process executor takes no join requests")

    def add_node(self, node: str, spec: Dict[str, Any]) -> None:
        raise AssertionError("the in-process executor takes no join requests")

    def admit(self, allocation: List[List[str]], rebuild: str) -> Admission:
        return Admission()


# ---------------------------------------------------------------------------------------------
# metrics


def route_stats(plan: Plan) -> Dict[str, float]:
    """Achieved skip ratio, swaps and per-stage coverage of a plan (STYLE.md metric names)."""
    stage_of = plan.stage_of()
    visited, swaps = 0, 0
    coverage = [0] * plan.num_stages
    for mb in plan.microbatches:
        stages = [stage_of[n] for n in mb.path]
        visited += 1 + len(stages)
        coverage[0] += 1
        highest = 0
        for s in stages:
            coverage[s] += 1
            swaps += s < highest
            highest = max(highest, s)
    count = max(1, len(plan.microbatches))
    stats: Dict[str, float] = {"route/skip_ratio": 1.0 - visited / (count * plan.num_stages), "route/swaps": swaps}
    for s in range(plan.num_stages):
        stats[f"stage/{s}/coverage"] = coverage[s] / count
    return stats


def measured_stats(outcome: StepOutcome, plan: Plan, iter_s: float) -> Dict[str, float]:
    """Busy fraction per stage from the workers' measured compute times."""
    if not outcome.node_reports:
        return {}
    stage_of = plan.stage_of()
    busy: Dict[int, List[float]] = {}
    for node, report in outcome.node_reports.items():
        if node in stage_of:
            busy.setdefault(stage_of[node], []).append(sum(report.compute_s.values()) / max(iter_s, 1e-9))
    stats = {f"stage/{s}/busy_frac": sum(v) / len(v) for s, v in sorted(busy.items())}
    reports = outcome.node_reports.values()
    stats["time/recv_wait_s"] = max(r.recv_wait_s for r in reports)
    stats["memory/peak_rss_mb"] = max(r.peak_rss_mb for r in reports)
    stats["memory/train_rss_mb"] = max(r.peak_rss_mb - (r.base_rss_mb or r.peak_rss_mb) for r in reports)
    messages = sum(r.sent_messages for r in reports)
    if messages:
        stats["net/bytes_per_message"] = sum(r.sent_bytes for r in reports) / messages
    return stats


# ---------------------------------------------------------------------------------------------
# the loop


class Coordinator:
    def __init__(self, cfg: Config, make_executor: Callable[..., Executor],
                 placement: Optional[Dict[str, Dict[str, str]]] = None):
        """``placement``: the machine each node runs on (``launcher=ray``: node -> Ray node id and IP),
        recorded in the run's topology.yaml as ``ray.placed_on``."""
        self.cfg = cfg
        self.make_executor = make_executor
        self.placement = placement or {}

    def run(self) -> Dict[str, Any]:
        """Train ``train.steps`` steps; returns the final summary (also the last metrics line)."""
        from skippipe.data import load_data
        from skippipe.metrics import MetricsLogger, summary_table
        from skippipe.model.presets import resolve_model_spec
        from skippipe.planner import Planner
        from skippipe.routelog import RouteLog
        from skippipe.runtime import rundir

        cfg = self.cfg
        out = run_dir(cfg)
        # validate first (run dir, resume point, ledger, config, plan), write after: a refused
        # command leaves the run directory byte-identical
        resume_step = rundir.prepare(cfg, self._header_extra())
        data = load_data(cfg.data)
        spec = resolve_model_spec(cfg.model, vocab_size=data.vocab_size)
        planner = Planner(cfg, spec)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", to_yaml(cfg))
        for node in planner.topology.nodes:
            if node.name in self.placement:
                node.ray = {**node.ray, "placed_on": dict(self.placement[node.name])}
        planner.topology.save(out / "topology.yaml")  # the run's own copy; nodes that join are added
        executor = self.make_executor(spec, len(planner.allocation))
        executor.start([n.name for n in planner.topology.nodes], data.vocab_size)
        self.first_step = self._resume(out, executor, resume_step)
        self.scaler = scaler_at(cfg, out, self.first_step)
        appending = self.first_step > 0
        metrics, routes = MetricsLogger(out, cfg, append=appending), RouteLog(out, append=appending)
        self.recorder = RunRecorder(cfg, out, self._header_extra(),
                                    resume_from_step=self.first_step - 1 if appending else None)
        log.info("run %s: launcher %s, method %s, %d nodes, %d stages, model %s (%.2fM params), data %s",
                 cfg.run.name, cfg.launcher, cfg.schedule.method, len(planner.topology.nodes),
                 len(planner.allocation), cfg.model.preset, spec.params() / 1e6, data.description)
        try:
            summary = self._loop(planner, executor, data, spec, metrics, routes, out)
        finally:
            routes.close()
            metrics.close()
            self.recorder.close()
            executor.close()
        log.info("%s", summary_table(summary, out))
        return summary

    def _header_extra(self) -> Dict[str, Any]:
        """What the workers actually use (the ledger header records it; comparisons check it)."""
        from skippipe.process import resolve_device

        train = self.cfg.train
        return {"threads": self.cfg.run.threads, "device": resolve_device(train.device),
                "precision": train.precision, "activation_checkpointing": train.activation_checkpointing}

    def _resume(self, out: Path, executor, step: Optional[int]) -> int:
        """``run.resume``: continue after the newest verified checkpoint ``step`` (checked by
        :func:`skippipe.runtime.rundir.prepare`; 0: start fresh)."""
        if not self.cfg.run.resume:
            return 0
        from skippipe.runtime.recorder import truncate_jsonl

        if step is None:
            log.warning("run.resume: no checkpoint under %s; starting from step 0", out / "ckpt")
            return 0
        executor.resume(out / "ckpt" / str(step))
        for name in ("metrics.jsonl", "routes.jsonl"):
            truncate_jsonl(out / name, step)
        log.info("resuming after step %d from %s", step, out / "ckpt" / str(step))
        return step + 1

    def _loop(self, planner, executor, data, spec, metrics, routes, out: Path) -> Dict[str, Any]:
        """The steps (each redone on failure), their records written while the next one runs; then :meth:`_finish`."""
        from skippipe.metrics import Progress
        from skippipe.train.optim import lr_at

        cfg = self.cfg
        samples = cfg.train.samples_per_microbatch
        start = time.perf_counter()
        record: Dict[str, Any] = {}
        tokens = self.first_step * planner.state.microbatches * samples * spec.seq_len  # steps before a resume
        bar = Progress(cfg.train.steps, cfg.tracking.progress, cfg.tracking.log_every)
        monitor = self.monitor = FaultMonitor(cfg, executor.membership, topology_path=out / "topology.yaml")
        self.predictor = Predictor()
        generation, checkpoint = 0, None  # checkpoint: of the last step's state, written with the next command
        self._cpu_mark = time.process_time()  # this process's CPU per step goes to routes.jsonl (benchmarks)
        pending: List[Callable[[], None]] = []  # the last step's logging, done while the next step runs
        predicted: Dict[str, Optional[float]] = {}

        def meanwhile(running: Plan) -> None:
            """Called once the step's command is out (each attempt): the coordinator would only wait,
            so it writes the last step's metrics and routes now, and predicts this step from what was
            measured before it (off the critical path between a step's reports and the next command)."""
            while pending:
                pending.pop(0)()
            predicted["s"] = self.predictor.predict(planner.cost, running)

        try:
            for step in range(self.first_step, cfg.train.steps):
                t0 = time.perf_counter()
                lr = lr_at(step, cfg.train)
                loss_scale = self.scaler.scale
                snapshot = snapshot_dir(cfg, out, step)  # train.eval_every: the parameters before this step
                plan, outcome = monitor.execute(planner, executor, step, lr, data, checkpoint,  # redone on failure
                                                meanwhile=meanwhile, loss_scale=loss_scale, snapshot=snapshot)
                self.scaler.update(outcome.grad_norm)
                self._record(step, plan, outcome, executor, checkpoint)
                checkpoint = ({"step": step, "dir": str(self.recorder.temp_dir(step))}
                              if self.recorder.checkpoint_due(step) else None)
                iter_s = time.perf_counter() - t0
                step_tokens = len(plan.microbatches) * samples * spec.seq_len
                tokens += step_tokens
                # the first step of a run or generation also pays process-group setup and cold caches
                warm = step > self.first_step and monitor.generation == generation
                generation = monitor.generation
                self.predictor.observe(planner.cost, outcome.node_reports, plan, iter_s, warm)
                monitor.after_step(planner, outcome, plan, step, warm)
                record = self._step_record(planner, executor, step, lr, plan, outcome, iter_s,
                                           predicted.pop("s", None), step_tokens)
                plan = self._as_recorded(plan, outcome, loss_scale)
                pending.append(partial(self._log_step, metrics, routes, bar, record, plan, outcome,
                                       monitor.generation, warm))
                if snapshot:  # validated after the step's line, while the next step runs
                    pending.append(partial(validate_snapshot, cfg, metrics, data, spec, planner, snapshot, step))
        finally:  # the last step's line (also when a step failed for good)
            while pending:
                pending.pop(0)()
        bar.close()
        return self._finish(planner, executor, data, spec, metrics, out, checkpoint,
                            {"loss/train": record.get("loss/train"), "time/wall_s": time.perf_counter() - start,
                             "tokens": tokens})

    def _as_recorded(self, plan: Plan, outcome: StepOutcome, loss_scale: float) -> Plan:
        """The plan as routes.jsonl records it: with what the replay must redo (stages restarted, the
        fp16 loss scale)."""
        if outcome.rebuilt:
            plan = replace(plan, extra={**plan.extra, "rebuilt": outcome.rebuilt})
        if self.scaler.enabled:
            plan = replace(plan, extra={**plan.extra, "loss_scale": loss_scale})
        return plan

    def _step_record(self, planner, executor, step: int, lr: float, plan: Plan, outcome: StepOutcome,
                     iter_s: float, predicted_s: Optional[float], step_tokens: int) -> Dict[str, Any]:
        """One step's metrics line."""
        from skippipe.metrics import cluster_stats

        monitor = self.monitor
        return {"step": step, "loss/train": outcome.loss, "lr": lr, "grad_norm": outcome.grad_norm,
                "time/iter_s": iter_s, "time/predicted_iter_s": predicted_s,
                "time/planned_iter_s": plan.predicted_makespan_s,
                "time/plan_s": planner.last_plan_s, "throughput/tokens_per_s": step_tokens / iter_s,
                **route_stats(plan), **measured_stats(outcome, plan, iter_s),
                **cluster_stats(planner, plan, monitor.generation, monitor.reroutes, chain=self.recorder.chain),
                **monitor.metrics(),
                **({"control/rejected": executor.rejected()} if executor.rejected() is not None else {})}

    def _finish(self, planner, executor, data, spec, metrics, out: Path, checkpoint: Optional[dict],
                totals: Dict[str, Any]) -> Dict[str, Any]:
        """After the last step: the final model and state, validation loss, the summary line."""
        from skippipe.train.evaluate import evaluate, load_stages

        cfg, recorder, monitor = self.cfg, self.recorder, self.monitor
        samples = cfg.train.samples_per_microbatch
        finished = executor.finish(out, checkpoint)
        recorder.add_state(finished.reports)
        recorder.flush(cfg.train.steps - 1)
        if checkpoint:
            recorder.add_checkpoint_entries(checkpoint["step"], finished.checkpoint)
        stages = finished.stages
        if stages is None:
            stages = load_stages(out / "final", spec, len(planner.allocation), cfg.run.seed, allow_missing=True)
            lost = sorted(set(range(len(planner.allocation))) - set(stages))
            if lost:
                log.warning("stages %s lost every replica and were not replaced; validation skips them", lost)
        val = evaluate(stages, data.val_batches(cfg.train.eval_batches, samples, spec.seq_len),
                       device=next(iter(stages.values())).embed.weight.device if 0 in stages else "cpu")
        summary = {"step": cfg.train.steps, "loss/val": val, "ppl/val": math.exp(val), **totals,
                   "route/reroutes": monitor.reroutes,
                   "route/replans": monitor.replans,
                   **({"verify/chain": recorder.chain[:12]} if recorder.chain else {})}
        if executor.rejected() is not None:
            summary["control/rejected"] = executor.rejected()
            if summary["control/rejected"]:
                log.warning("control: %d forged or replayed control values were ignored (control/rejected)",
                            summary["control/rejected"])
        # the final line holds what this step-less summary adds; the last step's train loss is only
        # in the summary (logged again at step train.steps it was a point of a step that never trained)
        metrics.log({k: v for k, v in summary.items() if k != "loss/train"})
        metrics.summary(summary)
        metrics.log_run_outputs(out, step=cfg.train.steps)  # plots/*.png, checkpoint manifests (wandb)
        return summary


    def _log_step(self, metrics, routes, bar, record: Dict[str, Any], plan: Plan, outcome: StepOutcome,
                  generation: int, warm: bool) -> None:
        """One step's metrics line, route log entry (with this process's CPU since the last) and progress."""
        metrics.log(record)
        cpu_now = time.process_time()
        routes.record(record["step"], plan, generation=generation, timings=step_timings(outcome) or None,
                      iter_s=record["time/iter_s"], warm=warm, coordinator_cpu_s=cpu_now - self._cpu_mark)
        self._cpu_mark = cpu_now
        bar.update(record)

    def _record(self, step: int, plan: Plan, outcome: StepOutcome, executor, checkpoint: Optional[dict]) -> None:
        """Ledger leaves of this step (and the deferred state of the last), and the checkpoint the
        command carried."""
        recorder = self.recorder
        recorder.add_step(step, plan, outcome, executor.deferred_state)
        if checkpoint:
            entries = outcome.checkpoint + [r.ckpt for r in outcome.node_reports.values() if r.ckpt]
            recorder.add_checkpoint_entries(checkpoint["step"], entries)


def snapshot_dir(cfg: Config, out: Path, step: int) -> Optional[str]:
    """``train.eval_every``: where the nodes write the parameters as they are before ``step`` (after
    ``step`` steps), validated while the next step runs; None when not due (the final validation
    covers the last step)."""
    every = cfg.train.eval_every
    return str(out / "eval" / f"step{step}") if every > 0 and step > 0 and step % every == 0 else None


def validate_snapshot(cfg: Config, metrics, data, spec, planner, snapshot: str, step: int) -> None:
    """The validation loss of a snapshot: ``loss/val`` and ``ppl/val`` at ``step`` (after that many
    steps, as the final line's is after ``train.steps``); the snapshot is removed after."""
    import shutil

    from skippipe.train.evaluate import evaluate, load_stages

    stages = load_stages(Path(snapshot), spec, len(planner.allocation), cfg.run.seed, allow_missing=True)
    val = evaluate(stages, data.val_batches(cfg.train.eval_batches, cfg.train.samples_per_microbatch, spec.seq_len))
    metrics.log({"step": step, "loss/val": val, "ppl/val": math.exp(val)})
    shutil.rmtree(snapshot, ignore_errors=True)
    with contextlib.suppress(OSError):  # the last snapshot leaves no empty directory behind
        Path(snapshot).parent.rmdir()


def train_inprocess(cfg: Config) -> Dict[str, Any]:
    from skippipe.process import pin_threads, resolve_device, set_host_memory

    pin_threads(cfg.run.threads)
    set_host_memory(cfg.runtime.host_memory)
    device = resolve_device(cfg.train.device)
    return Coordinator(cfg, lambda spec, num_stages: InProcessExecutor(cfg, spec, num_stages, device)).run()


def scaler_at(cfg, out: Path, first_step: int):
    """The fp16 loss scaler at the start of ``first_step``: its rule run over the recorded global
    gradient norms of the steps before (a resumed run continues at the scale it stopped at)."""
    from skippipe.train.optim import LossScaler

    scaler = LossScaler(cfg.train)
    if scaler.enabled and first_step > 0 and (out / "metrics.jsonl").is_file():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if "time/iter_s" in record and record.get("step", first_step) < first_step:
                scaler.update(float(record["grad_norm"]))
    return scaler
