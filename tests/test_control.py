"""Tier 2: the control channel is private (loopback) and authenticated; a forger changes nothing."""

import json
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from skippipe.config import load_config
from skippipe.runtime.control import ControlChannel, box_secret, connect_store, new_secret
from skippipe.runtime.heartbeats import READ_EVERY_S
from skippipe.runtime.wire import Command, NodeReport
from skippipe.runtime.worker import check_command_paths

SMALL = ["model.dim=64", "model.n_heads=2", "model.ffn_dim=128", "model.seq_len=32", "train.samples_per_microbatch=2",
         "data.max_corpus_mb=1", "train.eval_batches=2", "tracking.wandb.mode=disabled", "tracking.progress=false",
         "runtime.timeout_s=30", "cost.emulate_links=false"]


def listening(pid):
    return [c.laddr for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


def test_box_secret_is_shared_by_one_run_private_and_fresh_per_run(tmp_path):
    """torchrun on one box: every rank of a run reads the same secret from a 0600 file; another run
    id gets another; a directory others can read is refused."""
    base = tmp_path / "keys"
    first = [box_secret("run-a", 5.0, str(base)) for _ in range(3)]
    assert len(set(first)) == 1 and len(first[0]) == 64
    assert box_secret("run-b", 5.0, str(base)) != first[0]
    assert (base / "run-a.key").stat().st_mode & 0o777 == 0o600
    assert base.stat().st_mode & 0o777 == 0o700
    assert not [p for p in base.iterdir() if p.name.startswith(".key-")]  # no half-written keys left
    base.chmod(0o755)
    with pytest.raises(RuntimeError, match="mode 0700"):
        box_secret("run-a", 5.0, str(base))


def test_forged_wrong_key_and_replayed_values_are_rejected():
    store = connect_store("127.0.0.1", 0, True, 10.0)
    assert listening(os.getpid()) and all(a.ip == "127.0.0.1" for a in listening(os.getpid()) if a.port == store.port)
    secret = new_secret()
    writer = ControlChannel(store, 10.0, secret=secret)
    reader = ControlChannel(connect_store("127.0.0.1", store.port, False, 10.0), 10.0, secret=secret)
    forger = dist.PrefixStore("skippipe", dist.TCPStore("127.0.0.1", store.port, None, False, timedelta(seconds=10)))
    writer.put("hb/n3", 1.0)
    old = forger.get("hb/n3")
    writer.put("hb/n3", 2.0)
    assert reader.read("hb/n3") == 2.0
    forger.set("hb/n3", old)  # replay of an authentic but older value
    assert reader.read("hb/n3") is None and reader.rejected == 1
    forger.set("hb/n3", "0")  # no envelope at all
    assert not reader.has("hb/n3") and reader.rejected == 2
    writer.put("cmd/1", {"stop": True})
    forger.set("cmd/2", forger.get("cmd/1"))  # an authentic value moved to another key
    assert reader.read("cmd/2") is None and reader.rejected == 3
    other = ControlChannel(store, 10.0, secret=new_secret())  # a writer with the wrong secret
    other.put("cmd/3", {"stop": True})
    deadline = time.monotonic() + 10
    while not reader.store.check(["cmd/3"]):  # another client's write: wait until the store shows it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert reader.read("cmd/3") is None and reader.rejected == 4
    assert reader.read("cmd/1") == {"stop": True}


def test_the_doorbell_rings_for_the_last_report_or_at_once_for_a_failed_one():
    """The coordinator no longer polls the report counter while a step runs: the last of the expected
    reports rings, and so does a failure before the others (the survivors must be told to stop)."""
    store = connect_store("127.0.0.1", 0, True, 10.0)
    channel = ControlChannel(store, 10.0, secret=new_secret())
    channel.report(1, NodeReport(ok=True, node="n0"), expected=3)
    channel.report(1, NodeReport(ok=True, node="n1"), expected=3)
    assert not channel.store.check(["allin/1"]) and channel.reported(1) == 2
    channel.report(1, NodeReport(ok=True, node="n2"), expected=3)
    assert channel.store.check(["allin/1"])
    channel.report(2, NodeReport(ok=False, node="n1", message="RuntimeError: boom"), expected=3)
    assert channel.store.check(["allin/2"]) and channel.reported(2) == 1
    assert channel.read_report(2, "n1").message == "RuntimeError: boom"


def test_silence_counts_only_time_watched_and_ignores_wall_clock_steps(monkeypatch):
    """A worker is silent after heartbeat-limit seconds of the coordinator watching its beat not
    change: a coordinator that did not run for 60 s, or a wall clock stepped an hour either way,
    drops nobody; a beat that stops changing is found after the limit of watching."""
    import skippipe.runtime.remote as remote
    from skippipe.runtime.remote import RemoteExecutor

    store = connect_store("127.0.0.1", 0, True, 10.0)
    secret = new_secret()
    worker = ControlChannel(connect_store("127.0.0.1", store.port, False, 10.0), 10.0, secret=secret)
    executor = RemoteExecutor(load_config("configs/tiny.yaml", ["fault.heartbeat_s=2"]),
                              ControlChannel(store, 10.0, secret=secret), world_size=1)
    clock = {"mono": 1000.0, "wall": time.time()}
    monkeypatch.setattr(remote.time, "monotonic", lambda: clock["mono"])
    monkeypatch.setattr(time, "time", lambda: clock["wall"])
    monkeypatch.setattr(time, "time_ns", lambda: int(clock["wall"] * 1e9))

    def beat(advance_s):  # the worker beats (its own wall clock), the coordinator checks after advance_s
        worker.heartbeat("n0")
        clock["mono"] += advance_s
        return executor.heartbeats.silent(["n0"])

    assert beat(0.05) == [] and beat(60.0) == []  # the coordinator stalled for a minute: not the worker's fault
    clock["wall"] -= 3600.0  # NTP steps the clock back an hour: the beats still count (and are not replays)
    assert beat(0.05) == [] and executor.control.rejected == 0
    clock["wall"] += 7200.0
    assert beat(0.05) == []
    checks = 0
    while not executor.heartbeats.silent(["n0"]):  # the worker stops beating; the coordinator watches
        clock["mono"] += 0.05
        checks += 1
        assert checks < 1000
    # heartbeat limit max(5 x 2 s, 10 s) of watching; the beats are read every READ_EVERY_S at most,
    # so the last beat is seen up to one read late and the limit is crossed at the next read
    assert 10.0 - 0.1 <= checks * 0.05 <= 10.0 + 2 * READ_EVERY_S + 0.1


def test_command_paths_are_confined_to_the_run_dir(tmp_path):
    run = tmp_path / "run"
    check_command_paths(Command(save_dir=str(run), checkpoint={"dir": str(run / "ckpt" / ".tmp-3")},
                                load=str(run / "ckpt" / "3"), restore={"1": str(run / "ckpt" / "3")}), run)
    for bad in (Command(save_dir=str(tmp_path / "elsewhere")), Command(load=str(run / ".." / "other")),
                Command(checkpoint={"dir": "/tmp"}), Command(restore={"2": "/etc"})):
        with pytest.raises(RuntimeError, match="outside the run directory"):
            check_command_paths(bad, run)


def test_forger_on_loopback_changes_nothing(tmp_path):
    """A local process without the secret writes hb/n3=0 (which used to drop n3 at once), aborts,
    reports for commands to come and arbitrary keys while the run trains: every step completes, no
    node is dropped, and the run reports the rejected writes. (Overwriting an authentic value after
    it was written is a denial of service that no authentication stops; see control.py.)"""
    from skippipe.runtime.launch_local import train_local

    run = tmp_path / "run"
    cfg = load_config("configs/tiny.yaml", [*SMALL, "launcher=local", "train.steps=8", f"run.dir={run}",
                                            "fault.heartbeat_s=0.2"])
    errors, done = [], threading.Event()

    def train():
        try:
            train_local(cfg)
        except BaseException as err:  # surfaced below
            errors.append(err)
        finally:
            done.set()

    previous = getattr(train_local, "last_launcher", None)  # an earlier test's run in this process
    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 60
    while getattr(train_local, "last_launcher", None) is previous or train_local.last_launcher.procs == {}:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    launcher = train_local.last_launcher
    forger = dist.PrefixStore("skippipe", dist.TCPStore("127.0.0.1", launcher.port, None, False,
                                                          timedelta(seconds=10)))
    for index in range(1, 12):  # before the run gets there: the authentic report lands on top later
        forger.set(f"report/{index}/n2", json.dumps({"ok": False, "message": "forged", "bad_peer": "n4"}))
    sockets = set()
    i = 0
    while not done.is_set():
        forger.set("hb/n3", "0")
        forger.set(f"abort/{i % 12}", "true")
        forger.set(f"junk/{i}", "x" * 100)
        if i % 10 == 0:  # what listens while the run trains: the coordinator and every worker
            for pid in [os.getpid(), *(p.pid for p in launcher.procs.values() if p.poll() is None)]:
                try:
                    sockets.update(listening(pid))
                except psutil.NoSuchProcess:
                    pass
        i += 1
        time.sleep(0.05)
    thread.join()
    assert not errors, errors
    lines = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    steps, summary = [m for m in lines if "loss/val" not in m], lines[-1]
    assert [m["step"] for m in steps] == list(range(8))
    assert all(m["cluster/generation"] == 0 for m in steps)  # nobody dropped
    assert all(m["node/n3/alive"] == 1 for m in steps)
    assert summary["route/reroutes"] == 0 and summary["control/rejected"] > 0
    assert sockets and {a.ip for a in sockets} == {"127.0.0.1"}, sockets


def test_a_control_store_on_a_reused_port_keeps_listening():
    """The server store owns its listening socket and closes it itself; a second store on the same
    port (the OS hands ports out again) must not have its socket closed by the first one's leftovers."""
    import gc

    from skippipe.runtime.control import connect_store

    first = connect_store("127.0.0.1", 0, True, 5.0)
    port = first.port
    del first
    gc.collect()
    second = connect_store("127.0.0.1", port, True, 5.0)
    gc.collect()
    client = connect_store("127.0.0.1", port, False, 5.0)
    client.set("k", "v")
    assert second.get("k") == b"v"
