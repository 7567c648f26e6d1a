"""The online planner: topology + cost model + allocation, and the plan for each step.

Wraps the pure scheduler (:mod:`skippipe.schedule`) with the live state the coordinator knows
(dead nodes, measured slowness). The plan is recomputed only when that state changes or every
``schedule.replan_every`` steps; with ``schedule.routes_from`` it replays a recorded route log.
"""

from __future__ import annotations

import logging
import time
from typing import List, Optional

from skippipe.errors import UserError
from skippipe.plan import PathRules, Plan, check_plan
from skippipe.routelog import read_routes

log = logging.getLogger(__name__)
INCUMBENTS = 4  # earlier plans a re-plan starts from (Planner._remember)


class Planner:
    def __init__(self, cfg, spec):
        from skippipe.cost import CostModel, resolve_memory
        from skippipe.schedule import LiveState, allocate, allocate_by_plan, as_params
        from skippipe.topology import load_topology

        self.cfg = cfg
        self.topology = load_topology(cfg)
        self.cost = CostModel.from_config(cfg, spec, self.topology)
        resolve_memory(cfg, self.cost)
        params = as_params(cfg)
        # the allocation judged by its routed plan comes with that plan (step 0, no live state):
        # the first step uses it instead of routing the same problem again
        self._first: Optional[Plan] = None
        if params.allocator(params.method) == "plan":
            self.allocation, self._first, _ = allocate_by_plan(self.topology, self.cost, params)
        else:
            self.allocation = allocate(self.topology, self.cost, params)
        # the batch is fixed at the start: nodes that join stage 0 later share the same microbatches
        self.state = LiveState(microbatches=len(self.allocation[0]) * cfg.schedule.microbatches_per_originator)
        self.rules = PathRules.from_config(cfg.schedule)
        self.replay = read_routes(cfg.schedule.routes_from) if cfg.schedule.routes_from else None
        self._plan: Optional[Plan] = None
        self._recent: List[Plan] = []  # the last plans routed without probes, newest last
        self._planned_step = -1
        self.last_plan_s = 0.0

    def add_node(self, node, stage: Optional[int] = None) -> int:
        """Put a new node (a :class:`~skippipe.topology.Node` not in the topology) into the topology,
        the cost model and the allocation; returns its stage. Without ``stage`` it takes the stage
        with the fewest live replicas among those whose state fits its memory (ties: the lowest
        stage above 0, then stage 0), so it first fills the holes that failures left. The caller
        keeps it out of the plan (``state.dead``) until its worker is ready."""
        grown = self.topology.with_node(node)
        num_stages = len(self.allocation)
        memory = self.cfg.schedule.memory
        fits = [k for k in range(num_stages)
                if self.cost.stage_memory_bytes(k, memory) <= node.memory_gb * 2**30]  # GiB, as allocate()
        if stage is None:
            if not fits:
                raise UserError(f"node '{node.name}': memory_gb={node.memory_gb} holds no stage; give it more memory")
            live = lambda k: sum(1 for n in self.allocation[k] if n not in self.state.dead)  # noqa: E731
            stage = min(fits, key=lambda k: (live(k), k == 0, k))
        elif not 0 <= stage < num_stages:
            raise UserError(f"node '{node.name}': stage {stage} does not exist; this run has stages 0..{num_stages - 1}")
        elif stage not in fits:
            raise UserError(f"node '{node.name}': stage {stage} needs more than memory_gb={node.memory_gb}")
        self.topology = grown
        self.cost.topology = grown  # keeps what was measured so far
        self.allocation[stage].append(node.name)
        self.invalidate()
        return stage

    def _remember(self, plan: Plan) -> None:
        """Keep the last :data:`INCUMBENTS` plans routed without probes: a re-plan starts from the
        best of them under the costs of its time (``route``'s incumbents), so a later search from
        another seed cannot lose a plan an earlier one found."""
        if plan.extra.get("probe_links") or plan.extra.get("probe_nodes"):
            return
        self._recent = [p for p in self._recent if p.microbatches != plan.microbatches][-(INCUMBENTS - 1):] + [plan]

    def invalidate(self) -> None:
        self._plan = None
        self._first = None  # planned for another allocation or topology

    def _pristine(self) -> bool:
        """Whether the live state is what the allocation's own plan assumed (nothing dead, slow or
        to be probed)."""
        s = self.state
        return not (s.dead or s.slowdown or s.probe_links or s.probe_nodes)

    def plan(self, step: int) -> Plan:
        if self.replay is not None:
            if step not in self.replay:
                raise UserError(f"schedule.routes_from: the route log has no step {step}; "
                                f"it holds steps {min(self.replay)}..{max(self.replay)}")
            return self.replay[step]
        every = self.cfg.schedule.replan_every
        if self._plan is None or (every > 0 and step - self._planned_step >= every):
            from skippipe.schedule import route

            start = time.perf_counter()
            first, self._first = self._first, None
            if first is not None and step == 0 and self._pristine():
                self._plan = first
                self._remember(first)
            else:
                self._plan = route(self.allocation, self.topology, self.cost, self.cfg, state=self.state, step=step,
                                   incumbents=self._recent)
                self._remember(self._plan)
            self.last_plan_s = time.perf_counter() - start
            check_plan(self._plan, self.rules, dead=sorted(self.state.dead))
            self._planned_step = step
        return self._plan
