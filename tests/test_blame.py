"""Tier 1: who is blamed when a step fails (the coordinator's rules over the workers' reports), and
the plan statistics every step logs. No processes."""

import pytest

from skippipe.plan import Plan
from skippipe.runtime.coordinator import route_stats
from skippipe.runtime.remote import NodeFailure, WorkerFailed, raise_on_failure
from skippipe.runtime.wire import NodeReport

OK = NodeReport(ok=True)


def error(message, time, secondary=False, peer=None, bad_peer=None):
    return NodeReport(ok=False, message=message, time=time, secondary=secondary, peer=peer, bad_peer=bad_peer)


def test_a_step_everyone_reported_ok_blames_nobody():
    assert raise_on_failure({"n0": OK, "n1": OK}, {}) is None


def test_a_workers_own_error_fails_the_run_naming_the_earliest():
    reports = {"n0": OK, "n2": error("RuntimeError: later", 5.0),
               "n1": error("RuntimeError: boom", 2.0),
               "n3": error("TransportError: receiving from n1 failed", 1.0, secondary=True, peer="n1")}
    with pytest.raises(WorkerFailed, match="worker n1 failed: RuntimeError: boom") as info:
        raise_on_failure(reports, {})
    assert info.value.node == "n1"  # not n3: its error (earlier) was caused by a peer


def test_dead_nodes_are_excluded_and_the_step_redone():
    reports = {"n0": error("TransportError: peer gone", 1.0, secondary=True, peer="n4"),
               "n1": error("RuntimeError: own error", 0.5)}
    with pytest.raises(NodeFailure) as info:
        raise_on_failure(reports, {"n4": "process exited with code -9"})
    # someone died: the step is redone without them, even though another worker also raised
    assert info.value.dead == {"n4"} and info.value.reasons == {"n4": "process exited with code -9"}


def test_the_sender_of_a_bad_message_is_excluded_not_the_receiver():
    reports = {"n2": error("TransportError: bad message for the activation ...; node n3 is excluded", 1.0,
                           peer="n3", bad_peer="n3"), "n3": OK}
    with pytest.raises(NodeFailure) as info:
        raise_on_failure(reports, {})
    assert info.value.dead == {"n3"}
    assert info.value.reasons["n3"].startswith("sent a bad message to n2: TransportError: bad message")


def test_errors_that_only_blame_peers_while_nobody_died_name_the_earliest():
    reports = {"n1": error("Aborted: step abandoned", 3.0, secondary=True),
               "n2": error("TransportError: receiving from n1 failed", 1.5, secondary=True, peer="n1")}
    with pytest.raises(WorkerFailed, match="worker n2 failed: TransportError") as info:
        raise_on_failure(reports, {})
    assert info.value.node == "n2"


def plan_of(paths):
    return Plan.from_dict({"format": "skippipe.plan.v1", "method": "handmade", "num_stages": 4, "stages_visited": 4,
                           "allocation": [["n0"], ["n1"], ["n2"], ["n3"]],
                           "microbatches": [{"id": i, "originator": "n0", "path": p, "start_s": 0.0}
                                            for i, p in enumerate(paths)]})


def test_route_stats_count_skips_swaps_and_coverage():
    stats = route_stats(plan_of([["n1", "n2", "n3"], ["n2", "n1"]]))  # the second skips stage 3, swaps 1 and 2
    assert stats["route/skip_ratio"] == pytest.approx(1 - 7 / 8)  # 4 + 3 of 2 x 4 stage visits
    assert stats["route/swaps"] == 1
    assert [stats[f"stage/{k}/coverage"] for k in range(4)] == [1.0, 1.0, 1.0, 0.5]
    full = route_stats(plan_of([["n1", "n2", "n3"]] * 3))
    assert full["route/skip_ratio"] == 0.0 and full["route/swaps"] == 0
