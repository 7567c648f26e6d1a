"""Measured links: fold the workers' link estimates into the cost model, notice when a link
changes, and probe a slow link that the plan stopped using.

Each worker reports, per step, the latency and bandwidth of the links into it
(:func:`skippipe.runtime.transport.link_estimates`). :class:`LinkWatch` compares each with what the
cost model holds for the link (the topology's values until measured): a measurement within
``fault.slow_threshold`` of it is folded in (EWMA); one further off is held back as a possible
outlier, and when ``CONFIRM_STEPS`` steps in a row agree the link has changed (by more than half a
typical forward too: software overhead on real local links varies by large ratios of tiny times).
The cost model then takes the new values as they are (no averaging with the old level), and if
they make the running plan's simulated step more than ``REPLAN_GAIN`` longer, the coordinator
re-plans, giving the reason. A link that measured ``fault.slow_threshold`` times (and half a
forward) slower than the topology says and then got no traffic for ``fault.probe_after`` steps is
costed as the topology says again and the next plan is made to cross it (a probe,
``schedule.probe``: with equally good alternatives the router alone may never pick it); its
timings decide. Unlike slow nodes, the wait does not grow after a failed probe: a link that
recovers is used again within ``fault.probe_after`` steps.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from skippipe.runtime.wire import NodeReport

CONFIRM_STEPS = 2  # steps in a row a link must measure off its modelled time before it counts as changed
REPLAN_GAIN = 0.1  # a changed link re-plans when it makes the running plan's predicted step this much longer

Link = Tuple[str, str]


def links_used(plan) -> Dict[Link, int]:
    """``(a, b) -> messages`` (a <= b) that a plan's microbatches send over each link, both ways
    (a :class:`~skippipe.plan.Plan`; tests and benchmarks read it off recorded routes)."""
    counts: Dict[Link, int] = {}
    for mb in plan.microbatches:
        nodes = [mb.originator, *mb.path, mb.originator]
        for a, b in zip(nodes, nodes[1:]):
            if a != b:
                key = (a, b) if a <= b else (b, a)
                counts[key] = counts.get(key, 0) + 1
    return counts


def step_links(reports: Dict[str, NodeReport]) -> Dict[Link, Tuple[float, float]]:
    """``(a, b) -> (latency_s, bytes_per_s)`` (a <= b) of one step's worker reports; both
    directions of a link are one link: the faster measurement of the two (the fastest sample)."""
    out: Dict[Link, Tuple[float, float]] = {}
    for dst, report in reports.items():
        for src, est in report.links.items():
            key = (src, dst) if src <= dst else (dst, src)
            lat, bw = float(est["latency_s"]), float(est["bytes_per_s"])
            if key in out:
                lat, bw = min(lat, out[key][0]), max(bw, out[key][1])
            out[key] = (lat, bw)
    return out


def _predicted_s(plan, cost):
    if plan is None:
        return None
    from skippipe.simulate import simulate

    return simulate(plan, cost).makespan_s


def typical_forward_s(cost, plan) -> float:
    """The median forward time of a microbatch over the plan's (node, stage) pairs."""
    import statistics

    times = [cost.fwd_s(n, k) for n, k in plan.stage_of().items()]
    return statistics.median(times) if times else 0.0


class LinkWatch:
    def __init__(self, threshold: float, probe_after: int):
        self.threshold = threshold
        self.probe_after = probe_after
        self.slow: Dict[Link, float] = {}  # links measured slower than the topology: -> that ratio
        self._streak: Dict[Link, int] = {}
        self._idle: Dict[Link, int] = {}
        self.probing: set = set()  # links probed: the next plans must cross them until measured
        self.probes = 0
        self.last: Dict[Link, Tuple[float, float]] = {}  # this step's measurements

    def observe(self, cost, reports: Dict[str, NodeReport], plan=None, warm: bool = True) -> List[str]:
        """Fold a step's link measurements into ``cost``; the reasons to re-plan (empty: none)."""
        if not warm:
            self.last = {}
            return []
        measured = self.last = step_links(reports)
        floor_s = typical_forward_s(cost, plan) / 2 if plan is not None else 0.0
        nbytes, changed, reasons = cost.activation_bytes, [], []
        for (a, b), (lat, bw) in sorted(measured.items()):
            now = lat + nbytes / bw
            held_lat, held_bw = cost.link(a, b)
            held = held_lat + nbytes / held_bw
            topo = cost.topology.latency_s(a, b) + nbytes / cost.topology.bandwidth_bytes_per_s(a, b)
            key = (a, b)
            self._idle.pop(key, None)
            if max(now / held, held / now) <= self.threshold or abs(now - held) <= floor_s:
                self._streak.pop(key, None)
                self.probing.discard(key)  # a probe that found the link as the topology says: recovered
                cost.observe_link_estimate(a, b, lat, bw)
            elif key in self.probing:  # a probe that found the link slow still: one step decides
                self.probing.discard(key)
                changed.append((key, lat, bw, held, now, topo))
            else:
                self._streak[key] = self._streak.get(key, 0) + 1  # an outlier, or the link changed
                if self._streak[key] >= CONFIRM_STEPS:
                    self._streak.pop(key)
                    changed.append((key, lat, bw, held, now, topo))
        if changed:
            before = _predicted_s(plan, cost)
            for key, lat, bw, _, now, topo in changed:
                cost.observe_link_estimate(*key, lat, bw, reset=True)  # taken as it is: the link changed
                if now / topo > self.threshold and now - topo > floor_s:
                    self.slow[key] = now / topo
                else:
                    self.slow.pop(key, None)
            after = _predicted_s(plan, cost)
            # re-plan when a link got faster (the plan may use it more), or slower in a way that
            # matters to the plan being run (always without a plan to judge)
            faster = any(now < held for _, _, _, held, now, _ in changed)
            if before is None or faster or after > (1 + REPLAN_GAIN) * before:
                effect = "" if before is None else f"; the plan's predicted step {before:.3f} s -> {after:.3f} s"
                for (a, b), _, _, held, now, topo in changed:
                    reasons.append(f"link {a}-{b} measured {now * 1e3:.1f} ms per activation, planned with "
                                   f"{held * 1e3:.1f} ms (the topology says {topo * 1e3:.1f} ms){effect}")
        for key in sorted(set(self.slow) - set(measured)):
            self._idle[key] = self._idle.get(key, 0) + 1
            if 0 < self.probe_after <= self._idle[key]:
                self._idle.pop(key)
                self.slow.pop(key)
                self.probing.add(key)
                cost.forget_link(*key)
                self.probes += 1
                reasons.append(f"probing link {key[0]}-{key[1]}: no traffic for {self.probe_after} steps "
                               "since it was found slow; costed as the topology says and routed over again")
        return reasons

    def metrics(self, cost) -> Dict[str, float]:
        """``link/<a>-<b>/latency_ms`` and ``/gbps`` (the cost model's, as measured) of the links this
        step used; ``link/probes`` once a slow link was tried again."""
        out: Dict[str, float] = {}
        for a, b in sorted(self.last):
            lat, bw = cost.link(a, b)
            out[f"link/{a}-{b}/latency_ms"] = round(lat * 1e3, 3)
            out[f"link/{a}-{b}/gbps"] = round(bw * 8 / 1e9, 4)
        if self.probes:
            out["link/probes"] = self.probes
        return out
