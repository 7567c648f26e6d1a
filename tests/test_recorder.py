"""Tier 1: the coordinator's bookkeeping without processes: the recorder writes the ledger strictly in
step order and only once a step's state digests are in (remote workers report step s's state with
step s+1), the membership record, and the wire format's round trip."""

import json

import pytest

from skippipe.config import load_config
from skippipe.plan import MicrobatchRoute, Plan
from skippipe.runtime.executor import StepOutcome
from skippipe.runtime.membership import Membership
from skippipe.runtime.recorder import RunRecorder
from skippipe.runtime.wire import TIMING_KEYS, Command, NodeReport

PLAN = Plan("full", 2, 2, [["a", "b"], ["c"]], [MicrobatchRoute(0, "a", ["c"]), MicrobatchRoute(1, "b", ["c"])])


def state(step, tag):
    """A node's state report after committing ``step`` (digests of a parameter and its moment)."""
    return {"step": step, "digests": {"param/w": f"{tag}-w-{step}", "opt/w.exp_avg": f"{tag}-m-{step}"}}


def outcome(step, reports):
    return StepOutcome({0: 1.0 + step, 1: 2.0 + step}, 0.5, reports)


def ledger_steps(out):
    path = out / "ledger" / "steps.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def leaves(out, step):
    return json.loads((out / "ledger" / "leaves" / f"{step}.json").read_text())["leaves"]


@pytest.fixture
def recorder(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["verify.level=states", "checkpoint.every=0"])
    rec = RunRecorder(cfg, tmp_path, {})
    yield rec, tmp_path
    rec.close()


def test_a_step_waits_for_its_state_and_steps_are_written_in_order(recorder):
    rec, out = recorder
    rec.add_step(0, PLAN, outcome(0, {n: NodeReport(ok=True, node=n) for n in "abc"}), deferred_state=True)
    assert ledger_steps(out) == []  # step 0's state comes with step 1's reports
    reports = {n: NodeReport(ok=True, node=n, state=state(0, "s0" if n in "ab" else "s1")) for n in "abc"}
    rec.add_step(1, PLAN, outcome(1, reports), deferred_state=True)
    assert ledger_steps(out) == [0]
    written = leaves(out, 0)
    assert written["param/stage0/a/w"] == written["param/stage0/b/w"] == "s0-w-0"
    assert written["opt/stage1/c/w.exp_avg"] == "s1-m-0"
    rec.add_state({n: NodeReport(ok=True, node=n, stopped=True, state=state(1, n)) for n in "abc"})  # the stop
    rec.flush(1)
    assert ledger_steps(out) == [0, 1] and leaves(out, 1)["param/stage1/c/w"] == "c-w-1"


def test_a_dead_replicas_state_is_its_surviving_replicas(recorder):
    """``b`` died after committing step 0: its digests never arrive, the step is still written, with
    b's leaves taken from its stage's survivor ``a`` (replicas hold the same bits)."""
    rec, out = recorder
    rec.add_step(0, PLAN, outcome(0, {}), deferred_state=True)
    survivors = {n: NodeReport(ok=True, node=n, state=state(0, "x")) for n in "ac"}
    rec.add_step(1, PLAN, outcome(1, survivors), deferred_state=True)
    written = leaves(out, 0)
    assert written["param/stage0/b/w"] == written["param/stage0/a/w"] == "x-w-0"


def test_states_carried_by_a_failed_attempt_count(recorder):
    """Survivors of a failed attempt of step 1 reported step 0's state with their errors; the
    executor hands them over with the successful attempt (``StepOutcome.states``)."""
    rec, out = recorder
    rec.add_step(0, PLAN, outcome(0, {}), deferred_state=True)
    redone = outcome(1, {})
    redone.states = {n: state(0, "carried") for n in "abc"}
    rec.add_step(1, PLAN, redone, deferred_state=True)
    assert ledger_steps(out) == [0] and leaves(out, 0)["param/stage1/c/w"] == "carried-w-0"


def test_in_process_steps_are_written_at_once(recorder):
    rec, out = recorder
    for step in range(3):
        rec.add_step(step, PLAN, outcome(step, {}), deferred_state=False)
        assert ledger_steps(out) == list(range(step + 1))


def test_membership_is_the_one_record_of_who_is_in_the_run():
    m = Membership(["a", "b", "c"])
    assert m.unroutable() == set() and m.generation == 0
    m.lose({"b"})
    assert m.members == ["a", "c"] and m.unroutable() == {"b"} and m.generation == 1
    m.joins("b", 1)  # its replacement started: still not routed to
    m.add("d")
    m.joins("d", 0)
    assert m.unroutable() == {"b", "d"} and m.generation == 1
    m.admit(["d"])
    assert m.members == ["a", "c", "d"] and m.joining == {"b": 1} and m.generation == 2
    m.abandon("b")  # the replacement died before it joined
    m.admit([])
    assert m.members == ["a", "c", "d"] and m.unroutable() == {"b"} and m.joining == {}


def test_the_wire_format_round_trips_and_a_recorded_report_replays():
    command = Command(members=["a", "b"], step=3, generation=2, lr=1e-3, plan=PLAN.to_dict(), commit_step=2,
                      sync={"1": "a"}, checkpoint={"step": 2, "dir": "/run/ckpt/.tmp-2"})
    assert Command.from_wire(json.loads(json.dumps(command.to_wire()))) == command
    assert command.paths() == ["/run/ckpt/.tmp-2"]
    report = NodeReport(ok=True, node="a", losses={"0": 1.5}, compute_s={"F": 0.1}, compute_n={"F": 2}, step_s=0.4,
                        links={"b": {"latency_s": 0.01, "bytes_per_s": 1e9, "n": 2}})
    assert NodeReport.from_wire(json.loads(json.dumps(report.to_wire()))) == report
    timings = report.timings()
    assert set(timings) == set(TIMING_KEYS)
    replayed = NodeReport.from_timings(json.loads(json.dumps(timings)))
    assert replayed.ok and replayed.measured and replayed.compute_n == {"F": 2} and replayed.links == report.links
    forged = NodeReport.from_wire({"message": "forged", "bad_peer": "n4", "extra": 1})
    assert not forged.ok and forged.bad_peer == "n4"  # without ``ok`` a report is a failure


def test_resume_truncation_keeps_the_steps_and_periodic_validations_up_to_the_checkpoint(tmp_path):
    """run.resume after checkpoint step 3: metrics.jsonl keeps steps 0-3 and the train.eval_every
    line after 2 steps, and drops what came later and the finished run's summary."""
    from skippipe.runtime.recorder import truncate_jsonl

    lines = [{"step": s, "loss/train": 1.0, "time/iter_s": 0.1} for s in range(6)]
    lines.insert(3, {"step": 2, "loss/val": 2.5, "ppl/val": 12.2})
    lines.insert(6, {"step": 4, "loss/val": 2.4, "ppl/val": 11.0})
    lines.append({"step": 6, "loss/val": 2.3, "ppl/val": 10.0, "time/wall_s": 9.0, "tokens": 100})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in lines))
    truncate_jsonl(path, 3)
    kept = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(m["step"], "loss/val" in m) for m in kept] == [(0, False), (1, False), (2, False), (2, True), (3, False)]


def test_jsonl_readers_drop_a_torn_last_line_and_name_a_damaged_one(tmp_path):
    """A crash mid-line leaves a torn last line: readers and the resume truncation skip it. A damaged
    line before the last is a one-line error naming the file and the line, not silently skipped."""
    from skippipe.errors import UserError
    from skippipe.runfiles import read_jsonl
    from skippipe.runtime.recorder import truncate_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "lo')
    assert read_jsonl(path) == [{"step": 0}, {"step": 1}]
    truncate_jsonl(path, 5)
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'
    path.write_text('{"step": 0}\ngarbage\n{"step": 2}\n')
    with pytest.raises(UserError, match="metrics.jsonl' line 2 is not JSON"):
        read_jsonl(path)
