"""Nodes entering a running job, on the coordinator's side: requests to add a node (``skippipe
join``, ``ray.autojoin``) are placed in the topology and the allocation and their worker started;
replacements (``fault.replace``) and added nodes are admitted once ready, and a replacement whose
worker died before it could join is started again (at most :data:`MAX_REPLACE_TRIES` times).

:class:`~skippipe.runtime.faults.FaultMonitor` calls :meth:`Newcomers.before_step`; the executor's
:class:`~skippipe.runtime.membership.Membership` records who is a member.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List

from skippipe.errors import UserError
from skippipe.runtime.executor import Admission, Executor
from skippipe.runtime.membership import Membership
from skippipe.topology import Node

log = logging.getLogger("skippipe")

MAX_REPLACE_TRIES = 3  # further starts of a replacement whose worker died before it could join


class Newcomers:
    """``route_around(planner)``: refresh the planner's view of who is routable (a node added or
    admitted changes it, and :meth:`Planner.add_node` picks a stage by the live replicas)."""

    def __init__(self, cfg, membership: Membership, route_around: Callable[[Any], None], topology_path=None):
        self.cfg = cfg
        self.membership = membership
        self.route_around = route_around
        self.topology_path = topology_path  # the run's topology.yaml, rewritten when a node joins
        self.requests: Dict[str, int] = {}  # node asked to join -> its request id, until it joins
        self.last_join: Dict[str, float] = {}  # start-up times of the nodes the last step admitted
        self._replace_tries: Dict[str, int] = {}  # node -> replacements started again after failing to join

    def before_step(self, planner, executor: Executor, step: int) -> List[str]:
        """Take requests for new nodes, then admit replacements and new nodes that are ready; returns
        the nodes admitted (they enter the plan in a new generation)."""
        for request in executor.join_requests():
            self._add_node(planner, executor, step, request)
        admission = executor.admit(planner.allocation, self.cfg.fault.rebuild)
        self._retry_failed_joins(executor, step, admission)
        if admission.joined:
            self._joined(planner, executor, step, admission)
        return list(admission.joined)

    def _retry_failed_joins(self, executor: Executor, step: int, admission: Admission) -> None:
        """A new node whose worker ended before joining is rejected; a replacement is started again."""
        for node, reason in sorted(admission.failed.items()):
            if node in self.requests:
                executor.answer_join(self.requests.pop(node), "rejected", reason=reason)
            elif self.cfg.fault.replace and self._replace_tries.get(node, 0) < MAX_REPLACE_TRIES:
                # e.g. placed on a machine that was lost but not yet known to be (Ray marks a node
                # dead only after missed health checks): try again, away from where it died
                self._replace_tries[node] = self._replace_tries.get(node, 0) + 1
                log.warning("step %d: the replacement for %s failed before joining (%s); starting another "
                            "(try %d of %d)", step, node, reason, self._replace_tries[node] + 1, MAX_REPLACE_TRIES + 1)
                executor.start_replacement(node, away_from_last=True)

    def _joined(self, planner, executor: Executor, step: int, admission: Admission) -> None:
        joined, startup = admission.joined, admission.startup
        for node in joined:
            self._replace_tries.pop(node, None)
        self.route_around(planner)
        took = "; ".join(f"{n}: started {startup[n]['admitted_s']:.1f} s ago" +
                         (f", its process up in {startup[n]['process_s']:.1f} s" if startup[n].get("process_s") else "")
                         for n in joined if n in startup)
        log.warning("step %d: %s joined (generation %d%s)", step, ", ".join(joined), self.membership.generation,
                    f"; {took}" if took else "")
        for node in joined:
            if node in startup:
                self.last_join[f"join/{node}/start_s"] = startup[node]["admitted_s"]
                if startup[node].get("process_s") is not None:
                    self.last_join[f"join/{node}/process_s"] = startup[node]["process_s"]
            if node in self.requests:
                executor.answer_join(self.requests.pop(node), "joined", step=step,
                                     generation=self.membership.generation)

    def _add_node(self, planner, executor: Executor, step: int, request: Dict[str, Any]) -> None:
        """A node asked to join the running job (``skippipe join``): place it, start its worker."""
        spec = request["spec"]
        try:
            if spec["name"] in planner.topology:
                raise UserError(f"a node named '{spec['name']}' is already in the run; give the new node another name")
            placed = {"placed_on": {"node_id": spec["ray_node_id"], "node_ip": spec.get("node_ip") or ""}} \
                if spec.get("ray_node_id") else {}  # ray.autojoin: the Ray node it came with
            node = Node(spec["name"], spec["region"], spec["speed"], spec["memory_gb"], placed)
            stage = planner.add_node(node, spec.get("stage"))
        except UserError as err:
            log.warning("step %d: rejected a request to add node %s: %s", step, spec.get("name"), err)
            executor.answer_join(request["id"], "rejected", reason=str(err))
            return
        if self.topology_path is not None:
            planner.topology.save(self.topology_path)
        executor.add_node(node.name, spec)  # not routed to until its worker is ready and admitted
        self.route_around(planner)
        self.requests[node.name] = request["id"]
        executor.answer_join(request["id"], "accepted", stage=stage, step=step)
        log.warning("step %d: node %s (region %s) asked to join; it will hold stage %d", step, node.name,
                    node.region, stage)
