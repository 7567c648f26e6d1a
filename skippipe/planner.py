"""The online planner: topology + cost model + allocation, and the plan for each step.

Wraps the pure scheduler (:mod:`skippipe.schedule`) with the live state the coordinator knows
(dead nodes, measured slowness). The plan is recomputed only when that state changes or every
``schedule.replan_every`` steps; with ``schedule.routes_from`` it replays a recorded route log.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from skippipe.errors import UserError
from skippipe.plan import PathRules, Plan, check_plan
from skippipe.routelog import read_routes

log = logging.getLogger(__name__)


class Planner:
    def __init__(self, cfg, spec):
        from skippipe.cost import CostModel
        from skippipe.schedule import LiveState, allocate
        from skippipe.topology import load_topology

        self.cfg = cfg
        self.topology = load_topology(cfg)
        self.cost = CostModel.from_config(cfg, spec, self.topology)
        self.allocation = allocate(self.topology, self.cost, cfg)
        self.state = LiveState()
        self.rules = PathRules.from_config(cfg.schedule)
        self.replay = read_routes(cfg.schedule.routes_from) if cfg.schedule.routes_from else None
        self._plan: Optional[Plan] = None
        self._planned_step = -1
        self.last_plan_s = 0.0

    def invalidate(self) -> None:
        self._plan = None

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
            self._plan = route(self.allocation, self.topology, self.cost, self.cfg, state=self.state, step=step)
            self.last_plan_s = time.perf_counter() - start
            check_plan(self._plan, self.rules, dead=sorted(self.state.dead))
            self._planned_step = step
        return self._plan
