"""Slow nodes: which nodes are persistently slower than their peers, and when to try one again.

A node's speed is its measured compute time (CPU time on CPU: immune to other processes sharing the
cores) over the cost model's time for the same work, relative to the median node. Slow means above
``fault.slow_threshold`` for SLOW_STEPS steps in a row, so one noisy step is not enough; the plans
then route fewer microbatches through it. A slow node that gets no work is never measured again:
after ``fault.probe_after`` steps without work it is costed as typical and re-planned (probation);
found slow again, one step is enough to route around it and it waits twice as long before the next
try; found fast, it stays in use.
"""

from __future__ import annotations

import logging
import statistics
from typing import Dict, List, Set

from skippipe.plan import Plan
from skippipe.runtime.wire import NodeReport

log = logging.getLogger("skippipe")

SLOW_STEPS = 3


class SlowNodes:
    def __init__(self, threshold: float, probe_after: int):
        self.threshold = threshold
        self.probe_after = probe_after
        self.slow: Dict[str, float] = {}  # node -> how much slower than the median node
        self.relative: Dict[str, float] = {}  # last measured speed ratio against the median node
        self.probing: Set[str] = set()  # on probation: the next plans send it work
        self.probes = 0
        self._streak: Dict[str, int] = {}
        self._idle: Dict[str, int] = {}
        self._probe_after: Dict[str, int] = {}

    def observe(self, cost, reports: Dict[str, NodeReport], plan: Plan, unroutable: Set[str]) -> List[str]:
        """Fold one step's reports in; the nodes whose slow status changed (re-plan when any).
        ``unroutable``: nodes out of the run (never put on probation)."""
        ratios = speed_ratios(cost, reports, plan)
        if len(ratios) < 2:
            return []
        median = statistics.median(ratios.values())
        self.relative.update({n: r / median for n, r in ratios.items()})  # unmeasured nodes keep their last value
        above = {n: r / median for n, r in ratios.items() if r / median > self.threshold}
        self._streak = {n: self._streak.get(n, 0) + 1 for n in above}
        # a node on probation was slow before: one slow step is enough to route around it again
        slow = {n: f for n, f in above.items() if self._streak[n] >= SLOW_STEPS or n in self.slow or n in self.probing}
        for node in sorted(self.probing & set(ratios)):
            if node in slow:
                self._probe_after[node] = 2 * self._probe_wait(node)  # still slow: wait longer next time
            self.probing.discard(node)
        slow.update({n: f for n, f in self.slow.items() if n not in ratios})  # not measured: keep
        self._idle = {n: self._idle.get(n, 0) + 1 for n in slow if n not in ratios and n not in unroutable}
        for node in sorted(n for n, idle in self._idle.items() if 0 < self._probe_wait(n) <= idle):
            log.warning("node %s got no work for %d steps since it was found slow; trying it again", node,
                        self._idle[node])
            slow.pop(node)
            self._idle.pop(node)
            self._streak.pop(node, None)
            self.probing.add(node)
            cost.forget(node)
            self.probes += 1
        for node in sorted(set(slow) - set(self.slow)):
            log.warning("node %s is %.1fx slower than its peers; routing around it", node, slow[node])
        changed = sorted(set(slow) ^ set(self.slow))  # also when a node goes on probation
        self.slow = slow
        return changed

    def _probe_wait(self, node: str) -> int:
        return self._probe_after.get(node, self.probe_after)


def speed_ratios(cost, reports: Dict[str, NodeReport], plan: Plan) -> Dict[str, float]:
    """node -> measured compute CPU time over the cost model's time for the same work (topology
    speeds only), for the nodes that computed this step."""
    stage_of = plan.stage_of()
    ratios = {}
    for node, report in reports.items():
        if node not in stage_of or not report.compute_cpu_s:
            continue
        measured = sum(report.compute_cpu_s.values())
        modelled = sum(cost.modelled_s(node, stage_of[node], phase) * n for phase, n in report.compute_n.items())
        if modelled > 0 and measured > 0:
            ratios[node] = measured / modelled
    return ratios
