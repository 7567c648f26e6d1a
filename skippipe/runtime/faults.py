"""Fault tolerance in the coordinator: redo a failed step in a new generation, route around slow
nodes and slow links, start replacements, count what happened. Nodes entering the run (replacements
and nodes added to the running job) are :mod:`skippipe.runtime.newcomers`' part; who is a member,
:mod:`skippipe.runtime.membership`'s.

SkipPipe's point (arXiv 2502.19913, DESIGN.md section 5): skipping is already legal, so a dead node is
simply not routed to, a slow node is routed to less, and a stage that has lost every replica is
skipped by every path until a replacement holds it again. Nothing restarts: the in-flight step is
discarded (its optimizer update was never committed) and redone with a new plan, so every
microbatch of the step is trained exactly once.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Tuple

from skippipe.errors import RunFailed
from skippipe.plan import Plan
from skippipe.runtime.executor import Executor
from skippipe.runtime.links import LinkWatch
from skippipe.runtime.membership import Membership
from skippipe.runtime.newcomers import Newcomers
from skippipe.runtime.remote import NodeFailure
from skippipe.runtime.slow_nodes import SlowNodes

log = logging.getLogger("skippipe")

MAX_REDOS_PER_STEP = 5


class FaultMonitor:
    """``membership``: the executor's record of who is in the run (:mod:`skippipe.runtime.membership`);
    the planner routes around the nodes it holds out (:meth:`_route_around`)."""

    def __init__(self, cfg, membership: Membership, topology_path=None):
        self.cfg = cfg
        self.membership = membership
        self.newcomers = Newcomers(cfg, membership, self._route_around, topology_path)
        self.reroutes = 0
        self.last_recovery: Dict[str, float] = {}  # times of the last step's recovery, for metrics
        self.slow_nodes = SlowNodes(cfg.fault.slow_threshold, cfg.fault.probe_after)
        self.links = LinkWatch(cfg.fault.slow_threshold, cfg.fault.probe_after)
        self.replans = 0  # every re-plan after the first plan, whatever its reason (logged)
        self.link_metrics: Dict[str, float] = {}

    @property
    def generation(self) -> int:
        return self.membership.generation

    @property
    def slow(self) -> Dict[str, float]:
        return self.slow_nodes.slow

    @property
    def probes(self) -> int:
        return self.slow_nodes.probes

    def _route_around(self, planner) -> None:
        """The planner's view of the run: the nodes out of it, the links and nodes on probation."""
        planner.state.dead = self.membership.unroutable()
        planner.state.probe_links = set(self.links.probing)
        planner.state.probe_nodes = self.slow_nodes.probing - planner.state.dead

    def replan(self, planner, step: int, reason: str, quiet: bool = False) -> None:
        """Re-plan before the next step, saying why (``route/replans``; ``quiet``: already said)."""
        if not quiet:
            log.warning("step %d: re-planning: %s", step, reason)
        planner.invalidate()
        self.replans += 1

    def execute(self, planner, executor: Executor, step: int, lr: float, data, checkpoint=None,
                meanwhile=None, loss_scale: float = 1.0, snapshot=None) -> Tuple[Plan, Any]:
        """Run ``step``; on a node failure re-plan without the failed nodes and redo it. ``meanwhile``
        (plan) runs on each attempt while the workers compute (``executor.step``); ``loss_scale``:
        the fp16 loss scale of the step (1 otherwise); ``snapshot``: a directory for the parameters
        before the step (``train.eval_every``)."""
        self.last_recovery: Dict[str, float] = {}
        self.newcomers.last_join = {}
        for attempt in range(MAX_REDOS_PER_STEP + 1):
            self.before_step(planner, executor, step)
            plan = planner.plan(step)
            started = time.time()
            try:
                outcome = executor.step(plan, step, lr, data, checkpoint, meanwhile=meanwhile, loss_scale=loss_scale,
                                        snapshot=snapshot)
            except NodeFailure as failure:
                if attempt == MAX_REDOS_PER_STEP:
                    raise RunFailed(f"step {step} failed {attempt + 1} times; last: {failure}") from None
                detected = time.time()
                self._recover(planner, executor, step, failure)
                # faults strike while the step runs; the step's start bounds the failure time from below
                self.last_recovery = {"fault/detect_s": detected - started, "fault/rebuild_s": time.time() - detected,
                                      "failed_at": started}
                continue
            if self.last_recovery:
                self.last_recovery["fault/recovered_s"] = time.time() - self.last_recovery.pop("failed_at")
            return plan, outcome
        raise AssertionError("unreachable")

    def _recover(self, planner, executor, step: int, failure: NodeFailure) -> None:
        for node, reason in sorted(failure.reasons.items()):
            log.warning("step %d: node %s failed (%s); re-planning without it", step, node, reason)
        executor.new_generation(failure.dead)
        self._route_around(planner)
        self.replan(planner, step, f"{', '.join(sorted(failure.dead))} failed", quiet=True)
        self.reroutes += 1
        if self.cfg.fault.replace:
            for node in sorted(failure.dead):
                executor.start_replacement(node)
                log.warning("step %d: started a replacement for %s; it joins when ready", step, node)

    def before_step(self, planner, executor, step: int) -> None:
        """Take requests for new nodes, admit the ready ones (:class:`Newcomers`); those admitted
        re-enter (or enter) the plan in a new generation."""
        joined = self.newcomers.before_step(planner, executor, step)
        if joined:
            self.replan(planner, step, f"{', '.join(joined)} joined", quiet=True)
            self.reroutes += 1

    def after_step(self, planner, outcome, plan: Plan, step: int = 0, warm: bool = True) -> None:
        """Fold the step's measured links in and re-plan when one changed (:class:`LinkWatch`);
        re-plan when the slow nodes changed (:class:`~skippipe.runtime.slow_nodes.SlowNodes`), so
        fewer microbatches go through the slow ones."""
        for reason in self.links.observe(planner.cost, outcome.node_reports, plan, warm):
            self.replan(planner, step, reason)
        self.link_metrics = self.links.metrics(planner.cost)
        changed = self.slow_nodes.observe(planner.cost, outcome.node_reports, plan, self.membership.unroutable())
        if changed:
            self.replan(planner, step, f"slow nodes changed ({', '.join(changed)})", quiet=True)
            self.reroutes += 1
        self._route_around(planner)

    def metrics(self) -> Dict[str, float]:
        """``node/<name>/slowdown``: measured compute time relative to the median node (1.0 = typical);
        after a recovery, ``fault/detect_s`` (step start to detection), ``fault/rebuild_s`` (new
        generation and plan) and ``fault/recovered_s`` (step start to the redone step's completion);
        on the step a node joins (a replacement or a new node), ``join/<name>/start_s`` (its worker
        started to admitted, on the coordinator's clock) and ``join/<name>/process_s`` (its process
        or actor start to ready, on its own); ``route/replans`` and the measured links
        (:meth:`LinkWatch.metrics`)."""
        relative, out_of_run = self.slow_nodes.relative, self.membership.unroutable()
        out = {f"node/{n}/slowdown": round(relative.get(n, 1.0), 3) for n in self.membership.nodes if n not in out_of_run}
        out.update(self.last_recovery)
        out.update(self.newcomers.last_join)
        out["route/replans"] = self.replans
        out.update(self.link_metrics)
        if self.probes:
            out["fault/probes"] = self.probes  # slow nodes tried again after fault.probe_after idle steps
        return out
