"""Silent workers: a heartbeat that stopped changing while the coordinator watched.

Each worker beats from a thread of its own (a separate store connection, so a worker stuck in
compute or a receive still beats). The coordinator looks while it waits for a step's reports.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

# a worker's silence is counted on the coordinator's monotonic clock, and one check adds at most
# this much to it: a coordinator (or a whole machine) that did not run for a while, or a wall clock
# stepped by NTP, is not the workers' silence (a CI run once dropped all six workers of a healthy
# run at once for "no heartbeat for 10 s")
MAX_SILENCE_PER_CHECK_S = 1.0
# heartbeats are read at most this often (a beat changes every fault.heartbeat_s, 2 s by default;
# reading every worker's beat at each of the coordinator's 50 ms checks cost it ~10 ms of CPU per step)
READ_EVERY_S = 0.5


class HeartbeatWatch:
    def __init__(self, control, heartbeat_s: float):
        self.control = control
        self.limit_s = max(5.0 * heartbeat_s, 10.0)
        self.last_beat: Dict[str, float] = {}  # node -> value of its last authentic heartbeat
        self.silence: Dict[str, float] = {}  # node -> seconds watched since its heartbeat last changed
        self._last_check: Optional[float] = None  # monotonic time of the last silence check

    def start_watching(self) -> None:
        """The time since the last check was not spent watching (e.g. between steps)."""
        self._last_check = None

    def silent(self, nodes) -> List[str]:
        """Nodes whose heartbeat has not changed for ``limit_s`` of watching (a forged or replayed
        one is ignored). Only the time spent watching counts, each check adding at most
        MAX_SILENCE_PER_CHECK_S, so a stall on this side is never blamed on the workers (the beats are
        read at most every READ_EVERY_S; calls in between return nothing); the beat's
        value (the worker's clock) is compared for change only, never with this clock."""
        now = time.monotonic()
        if self._last_check is not None and now - self._last_check < READ_EVERY_S:
            return []
        watched = 0.0 if self._last_check is None else min(now - self._last_check, MAX_SILENCE_PER_CHECK_S)
        self._last_check = now
        silent = []
        for node in nodes:
            beat = self.control.read(f"hb/{node}")
            if beat is None and node not in self.last_beat:
                continue  # never beat yet (starting): the launcher and the report timeout watch it
            if beat is not None and beat != self.last_beat.get(node):
                self.last_beat[node], self.silence[node] = beat, 0.0
            else:
                self.silence[node] = self.silence.get(node, 0.0) + watched
            if self.silence[node] > self.limit_s:
                silent.append(node)
        return silent
