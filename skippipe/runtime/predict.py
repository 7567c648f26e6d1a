"""The runtime's prediction of each iteration (``time/predicted_iter_s``) and what feeds it.

The coordinator judges nodes and re-plans on the cost model, so the model has to match what the
workers measure. Per step, :class:`Predictor` simulates the step's plan on the cost model as
measured *before* the step and adds the per-step cost the simulator does not model (the
coordinator's command round trip and the workers' start skew); then it folds the step's
measurements in (:func:`observe_measurements`).

Every step's worker reports are kept in ``routes.jsonl`` (``timings``, with the coordinator's
``iter_s``), so :func:`replay_predictions` recomputes the predictions of a finished run offline,
without processes: the unit tests and the prediction benchmark use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from skippipe.plan import Plan
from skippipe.runtime.wire import NodeReport


def step_timings(outcome) -> Dict[str, Dict[str, Any]]:
    """``node -> {TIMING_KEYS}`` of a step's worker reports (empty in-process)."""
    return {n: r.timings() for n, r in outcome.node_reports.items()}


class Predictor:
    """``time/predicted_iter_s``: the simulated time of the plan on the cost model as measured
    before the step, plus the measured per-step cost outside the workers' steps (EWMA)."""

    def __init__(self, weight: float = 0.3):
        self.overhead_s: Optional[float] = None
        self.weight = weight

    def predict(self, cost, plan: Plan) -> Optional[float]:
        if self.overhead_s is None:
            return plan.predicted_makespan_s
        from skippipe.simulate import simulate

        return simulate(plan, cost).makespan_s + self.overhead_s

    def observe(self, cost, reports: Dict[str, NodeReport], plan: Plan, iter_s: float, warm: bool = True) -> None:
        if not warm:  # setup and cold caches would bias the smoothed costs for many steps
            return
        observe_measurements(cost, reports, plan)
        measured = [r for r in reports.values() if r.measured]
        if not measured:
            return
        # the simulator covers the workers' steps; with cost.grad_sync also their gradient reduction
        inside = cost.grad_sync
        longest = max(r.step_s - (0.0 if inside else r.reduce_s) for r in measured)
        overhead = max(0.0, iter_s - longest)
        w = self.weight
        self.overhead_s = overhead if self.overhead_s is None else (1 - w) * self.overhead_s + w * overhead


def observe_measurements(cost, reports: Dict[str, NodeReport], plan: Plan) -> None:
    """Fold measured per-phase compute times into the cost model (EWMA), so re-plans follow reality."""
    stage_of = plan.stage_of()
    for node, report in reports.items():
        if node not in stage_of:
            continue
        for phase, total in report.compute_s.items():
            count = report.compute_n[phase]
            if count:
                cost.observe_compute(node, stage_of[node], phase, total / count)


def replay_predictions(run_dir, predictor: Optional[Predictor] = None) -> List[Dict[str, float]]:
    """Per recorded step of a finished run: ``{step, iter_s, predicted_s, simulated_s}``, with
    the run's cost model rebuilt from its config and topology and the predictor fed the recorded
    reports in order (as the coordinator did). Steps without recorded timings are skipped."""
    import json

    from skippipe.cost import CostModel
    from skippipe.data import load_data
    from skippipe.model.presets import resolve_model_spec
    from skippipe.runtime.links import LinkWatch
    from skippipe.simulate import simulate
    from skippipe.topology import Topology
    from skippipe.verify.replay import load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    spec = resolve_model_spec(cfg.model, vocab_size=load_data(cfg.data).vocab_size)
    topology = Topology.from_yaml(run_dir / "topology.yaml")
    cost = CostModel.from_config(cfg, spec, topology)
    predictor = predictor or Predictor()
    links = LinkWatch(cfg.fault.slow_threshold, cfg.fault.probe_after)  # as the coordinator's monitor
    out = []
    for text in (run_dir / "routes.jsonl").read_text().splitlines():
        line = json.loads(text)
        if "iter_s" not in line or not line.get("timings"):
            continue
        plan = Plan.from_dict(line["plan"])
        reports = {n: NodeReport.from_timings(t) for n, t in line["timings"].items()}
        predicted = predictor.predict(cost, plan)
        out.append({"step": line["step"], "iter_s": line["iter_s"], "predicted_s": predicted,
                    "simulated_s": simulate(plan, cost).makespan_s})
        predictor.observe(cost, reports, plan, line["iter_s"], line.get("warm", True))
        links.observe(cost, reports, plan, line.get("warm", True))
    return out
