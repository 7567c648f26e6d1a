"""Tier 1: watching a run in a background thread (skippipe.runtime.background), which the Ray tests,
the multi-machine example and the fault benchmark use to act at a given step."""

import json
import os
import time

import pytest

from skippipe.runtime.background import BackgroundRun, first_step_using, logged_steps, read_jsonl


def test_a_line_being_written_and_an_earlier_runs_file_are_not_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "lo')  # the last line is half written
    assert read_jsonl(path) == [{"step": 0}, {"step": 1}]
    old = time.time() - 3600
    os.utime(path, (old, old))  # the file of the run this one overwrites
    assert read_jsonl(path, since=time.time() - 1) == []
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_steps_and_first_use_come_from_the_run_directory(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in [
        {"step": 0}, {"step": 1}, {"step": 1, "loss/val": 3.0}, {"step": 2}]) + "\n")
    assert logged_steps(tmp_path) == [0, 1, 2]
    plan = lambda *paths: {"microbatches": [{"path": list(p)} for p in paths]}  # noqa: E731
    (tmp_path / "routes.jsonl").write_text("\n".join(json.dumps({"step": s, "plan": p}) for s, p in [
        (0, plan(["a", "b"])), (1, plan(["a"], ["c", "b"])), (2, plan(["c"]))]) + "\n")
    assert first_step_using(tmp_path, "c") == 1
    assert first_step_using(tmp_path, "z") is None


class _Cfg:
    class run:  # noqa: N801 - the shape of Config.run
        dir = None


def test_waits_for_a_step_and_surfaces_what_training_raised(tmp_path):
    cfg = _Cfg()
    cfg.run.dir = str(tmp_path)

    def train(_cfg):
        with open(tmp_path / "metrics.jsonl", "a") as f:
            for step in range(3):
                f.write(json.dumps({"step": step}) + "\n")
                f.flush()
                time.sleep(0.05)
        return {"steps": 3}

    job = BackgroundRun(train, cfg)
    assert job.wait_for_step(2, timeout_s=30)
    assert job.result() == {"steps": 3} and not job.alive
    assert not job.wait_for_step(5, timeout_s=30)  # training ended without it: no wait for the timeout

    def broken(_cfg):
        raise ValueError("no such node")

    with pytest.raises(ValueError, match="no such node"):
        BackgroundRun(broken, cfg).result(timeout_s=30)
