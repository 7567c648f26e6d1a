"""Tier 2/4: a run that recovered from a fault verifies like any other (full replay).

The state digests of step s ride on the command of step s+1; when that command fails they come from
the surviving replicas, and a stage that lost every replica is left out on both sides."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from skippipe.cli import main
from skippipe.config import load_config

# a small, fast model on the tiny topology (as in test_runtime.py)
SMALL = ["model.dim=64", "model.n_heads=2", "model.ffn_dim=128", "model.seq_len=32", "train.samples_per_microbatch=2",
         "data.max_corpus_mb=1", "train.eval_batches=2", "tracking.wandb.mode=disabled", "tracking.progress=false",
         "runtime.timeout_s=30", "cost.emulate_links=false"]

RUN = ["configs/tiny.yaml", *SMALL, "launcher=local"]


def steps_of(run):
    lines = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "loss/val" not in m]


def leaf_counts(run):
    return [len(json.loads(p.read_text())["leaves"]) for p in sorted((Path(run) / "ledger" / "leaves").glob("*.json"),
                                                                       key=lambda p: int(p.stem))]


@pytest.mark.parametrize("node, complete", [("n2", True), ("n3", False)])  # stage 1 (2 replicas); stage 2 (alone)
def test_killed_worker_run_verifies_by_replay(tmp_path, node, complete):
    run = tmp_path / "run"
    assert main(["train", *RUN, "train.steps=5", f"run.dir={run}", "checkpoint.every=2",
                 "fault.kill.step=2", f"fault.kill.node={node}"]) == 0
    assert [m["cluster/generation"] for m in steps_of(run)] == [0, 0, 1, 1, 1]
    counts = leaf_counts(run)
    if complete:  # the dead replica's digests come from its twin: step 1 is as complete as step 0
        assert counts[1] == counts[0], counts
    else:  # a stage nobody holds any more: its state leaves are left out, nothing else
        assert 9 < counts[1] < counts[0], counts
    assert main(["verify", str(run)]) == 0  # chain, checkpoints, full replay


def test_stopped_worker_dropped_for_missing_heartbeats_verifies(tmp_path):
    """SIGSTOP a worker: it stops beating, is dropped, the step is redone; the run verifies."""
    from skippipe.runtime.launch_local import train_local

    run = tmp_path / "run"
    cfg = load_config(RUN[0], [*RUN[1:], "train.steps=6", f"run.dir={run}", "fault.heartbeat_s=0.2"])
    errors = []
    thread = threading.Thread(target=lambda: _train(train_local, cfg, errors))
    thread.start()
    stopped = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and thread.is_alive() and stopped is None:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            stopped = train_local.last_launcher.pid("n1")
            os.kill(stopped, signal.SIGSTOP)
        time.sleep(0.02)
    thread.join(timeout=180)
    assert stopped is not None and not errors, errors
    steps = steps_of(run)
    assert [m["step"] for m in steps] == list(range(6))
    assert steps[-1]["cluster/generation"] == 1 and steps[-1]["node/n1/alive"] == 0
    assert main(["verify", str(run)]) == 0


def _train(train_local, cfg, errors):
    try:
        train_local(cfg)
    except BaseException as err:  # surfaced by the test
        errors.append(err)


@pytest.mark.parametrize("rebuild", ["init", "checkpoint", "checkfree"])
def test_stage_rebuilt_after_losing_every_replica_verifies(tmp_path, rebuild):
    """n3 holds stage 2 alone; it is killed and replaced. The replacement restarts the stage from
    ``fault.rebuild``; the plan of that step says so, and the replay does the same."""
    run = tmp_path / "run"
    # emulated links: steps of ~0.3 s, so the replacement (ready ~2 s after the kill) joins mid-run
    assert main(["train", *RUN, "train.steps=16", f"run.dir={run}", "checkpoint.every=2", "fault.kill.step=4",
                 "fault.kill.node=n3", "fault.replace=true", f"fault.rebuild={rebuild}", "cost.emulate_links=true"]) == 0
    routes = [json.loads(x) for x in (run / "routes.jsonl").read_text().splitlines()]
    rebuilt = [(r["step"], r["plan"]["extra"]["rebuilt"]) for r in routes if "rebuilt" in r["plan"].get("extra", {})]
    assert len(rebuilt) == 1, rebuilt
    step, origin = rebuilt[0]
    expected = {"init": {"from": "init"}, "checkfree": {"from": "checkfree", "stages": [1, 3]},
                "checkpoint": {"from": "checkpoint", "step": origin["2"].get("step")}}[rebuild]
    assert origin == {"2": expected}
    if rebuild == "checkpoint":  # the newest checkpoint written before the kill
        assert origin["2"]["step"] in (1, 3) and (run / "ckpt" / str(origin["2"]["step"])).is_dir()
    assert any("n3" in r["plan"]["allocation"][2] for r in routes if r["step"] >= step)
    assert main(["verify", str(run)]) == 0
