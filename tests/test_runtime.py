"""Tier 2: real gloo process groups on 127.0.0.1, free ports, short timeouts."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skippipe.cli import main

REPO = Path(__file__).resolve().parents[1]
# a small, fast model on the tiny topology (6 nodes in 2 regions, stages [2, 2, 1, 1])
SMALL = ["model.dim=64", "model.n_heads=2", "model.ffn_dim=128", "model.seq_len=32", "train.samples_per_microbatch=2",
         "data.max_corpus_mb=1", "train.eval_batches=2", "tracking.wandb.mode=disabled", "tracking.progress=false",
         "runtime.timeout_s=30",
         "cost.emulate_links=false"]


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def final_params(run):
    return {k: torch.load(Path(run) / "final" / f"stage{k}.pt", weights_only=True) for k in range(4)}


@pytest.mark.parametrize("method,precision,checkpointing", [
    ("full", "fp32", "none"), ("skippipe", "fp32", "none"),
    ("skippipe", "bf16", "full"), ("skippipe", "fp16", "every_2")])
def test_local_equals_inprocess_bitwise(tmp_path, method, precision, checkpointing):
    ref, dist_run = tmp_path / "ref", tmp_path / "local"
    common = ["configs/tiny.yaml", *SMALL, "train.steps=3", f"schedule.method={method}",
              f"train.precision={precision}", f"train.activation_checkpointing={checkpointing}"]
    assert main(["train", *common, f"run.dir={ref}", "launcher=inprocess"]) == 0
    # the same routes, executed by 6 worker processes (with emulated links, which must not change numbers)
    assert main(["train", *common, f"run.dir={dist_run}", "launcher=local", f"schedule.routes_from={ref}",
                 "cost.emulate_links=true"]) == 0
    a, b = metrics(ref), metrics(dist_run)
    assert [m["loss/train"] for m in a[:3]] == [m["loss/train"] for m in b[:3]]
    assert a[-1]["loss/val"] == b[-1]["loss/val"]
    pa, pb = final_params(ref), final_params(dist_run)
    for k in range(4):
        for name in pa[k]:
            assert torch.equal(pa[k][name], pb[k][name]), f"stage {k} {name} differs"
    routes = [json.loads(line) for line in (ref / "routes.jsonl").read_text().splitlines()]
    stages_per_mb = {len(mb["path"]) for mb in routes[0]["plan"]["microbatches"]}
    assert stages_per_mb == ({3} if method == "full" else {2})  # 4 of 4 vs 3 of 4 stages visited
    assert b[0]["time/predicted_iter_s"] > 0 and b[0]["memory/peak_rss_mb"] > 0


def test_eval_every_validates_the_parameters_after_every_kth_step_on_each_launcher(tmp_path):
    """train.eval_every=2 over 5 steps: loss/val after 2 and 4 steps, then the final one after 5. The
    value after 4 steps is the final validation of a 4-step run on the same schedule
    (train.lr_steps), and 6 worker processes validate to the same numbers as one process."""
    common = ["configs/tiny.yaml", *SMALL, "train.lr_steps=5", "run.overwrite=true"]
    ref, local, four = tmp_path / "ref", tmp_path / "local", tmp_path / "four"
    assert main(["train", *common, "train.steps=5", "train.eval_every=2", f"run.dir={ref}", "launcher=inprocess"]) == 0
    assert main(["train", *common, "train.steps=5", "train.eval_every=2", f"run.dir={local}", "launcher=local",
                 f"schedule.routes_from={ref}"]) == 0
    assert main(["train", *common, "train.steps=4", f"run.dir={four}", "launcher=inprocess",
                 f"schedule.routes_from={ref}"]) == 0
    val = {run: [(m["step"], m["loss/val"]) for m in metrics(run) if "loss/val" in m] for run in (ref, local)}
    assert [s for s, _ in val[ref]] == [2, 4, 5]
    assert val[ref] == val[local]
    assert val[ref][1][1] == metrics(four)[-1]["loss/val"]
    assert val[ref][0][1] != val[ref][1][1]
    assert not (ref / "eval").exists() and not (local / "eval").exists()  # the snapshots are removed


def test_worker_error_surfaces_in_coordinator(tmp_path, capsys):
    code = main(["train", "configs/tiny.yaml", *SMALL, "train.steps=4", f"run.dir={tmp_path}", "launcher=local",
                 "fault.error.step=1", "fault.error.node=n3"])
    err = capsys.readouterr().err
    assert code == 1
    line = [x for x in err.splitlines() if x.startswith("error:")][-1]
    assert "worker n3" in line and "injected error" in line
    # the error itself, not a hang until a timeout blames someone for silence
    assert not any(w in line for w in ("no report", "timed out", "no heartbeat")), line


def test_killed_worker_is_routed_around_and_step_redone(tmp_path):
    """A worker killed mid-run: the step is redone in a new generation without it, every step
    trains the same microbatch ids once, and the run finishes."""
    run = tmp_path / "run"
    assert main(["train", "configs/tiny.yaml", *SMALL, "train.steps=5", f"run.dir={run}", "launcher=local",
                 "fault.kill.step=2", "fault.kill.node=n2"]) == 0
    steps = [m for m in metrics(run) if "loss/val" not in m]
    assert [m["step"] for m in steps] == [0, 1, 2, 3, 4]  # no step lost or repeated
    assert [m["cluster/generation"] for m in steps] == [0, 0, 1, 1, 1]
    assert steps[2]["route/reroutes"] >= 1 and steps[2]["node/n2/alive"] == 0
    assert all(math.isfinite(m["loss/train"]) for m in steps)
    routes = [json.loads(line) for line in (run / "routes.jsonl").read_text().splitlines()]
    ids = [sorted(mb["id"] for mb in r["plan"]["microbatches"]) for r in routes]
    assert all(i == ids[0] for i in ids)
    for r in routes[2:]:
        assert all("n2" not in [mb["originator"], *mb["path"]] for mb in r["plan"]["microbatches"])


def test_recovered_slow_node_is_probed_and_used_again(tmp_path):
    """A node 8x slower until step 6 is routed around (no work), then, after fault.probe_after steps
    without work, tried again; it is fast by then, so it keeps receiving microbatches."""
    run = tmp_path / "run"
    single = ["schedule.memory=4", "topology.file=null", "topology.generate.count=6",
              "topology.generate.placement=single", "cost.fwd_s_per_sample_layer=0.002"]
    from skippipe.config import load_config
    from skippipe.model.presets import resolve_model_spec
    from skippipe.planner import Planner

    cfg = load_config("configs/tiny.yaml", [*SMALL, *single])
    slow = Planner(cfg, resolve_model_spec(cfg.model, vocab_size=256)).allocation[1][0]  # a stage-1 replica
    assert main(["train", "configs/tiny.yaml", *SMALL, *single, "train.steps=24", f"run.dir={run}", "launcher=local",
                 f"fault.slow_nodes.{slow}=8.0", "fault.slow_until=6", "fault.probe_after=3"]) == 0
    routes = [json.loads(line) for line in (run / "routes.jsonl").read_text().splitlines()]
    visits = [sum(slow in mb["path"] for mb in r["plan"]["microbatches"]) for r in routes]
    first_idle = visits.index(0)  # routed around while slow
    back = next((i for i in range(first_idle, len(visits)) if visits[i] > 0), None)
    # ...probed within a doubled wait after it recovered at step 6, and mostly in use from then on (on
    # this 2-core box a busy step can flag it again for a while; a CI run saw it idle at the last step)
    assert first_idle < 10 and back is not None and back <= 6 + 2 * 3, visits
    assert sum(v > 0 for v in visits[back:]) >= len(visits[back:]) / 2, visits
    assert metrics(run)[-2]["fault/probes"] >= 1


def _links_of(plan):
    """How many messages of a recorded plan's microbatches cross each link (a, b), a <= b."""
    from skippipe.plan import Plan
    from skippipe.runtime.links import links_used

    return links_used(Plan.from_dict(plan))


def test_degraded_link_is_replanned_around_and_probed_after_recovery(tmp_path, caplog):
    """fault.slow_links makes a busy link 10x slower from step 2 until step 7: the coordinator
    measures it, re-plans around it within 3 steps (saying why), and after the link recovers a probe
    puts traffic on it again within fault.probe_after steps."""
    run, topology = tmp_path / "run", tmp_path / "one_region.yaml"
    topology.write_text("regions: {names: [r], latency_ms: [[20]], bandwidth_gbps: [[1]]}\n"
                        "nodes: [" + ", ".join(f"{{name: n{i}, region: r}}" for i in range(6)) + "]\n")
    single = ["schedule.memory=4", f"topology.file={topology}", "cost.emulate_links=true"]
    from skippipe.config import load_config
    from skippipe.model.presets import resolve_model_spec
    from skippipe.planner import Planner

    cfg = load_config("configs/tiny.yaml", [*SMALL, *single])
    planner = Planner(cfg, resolve_model_spec(cfg.model, vocab_size=256))
    plan = planner.plan(0).to_dict()
    replicated = {n for nodes in planner.allocation if len(nodes) > 1 for n in nodes}
    used = {k: v for k, v in _links_of(plan).items() if set(k) <= replicated}
    a, b = max(sorted(used), key=used.get)  # the busiest link with another replica at both ends
    with caplog.at_level("WARNING", logger="skippipe"):
        assert main(["train", "configs/tiny.yaml", *SMALL, *single, "train.steps=14", f"run.dir={run}",
                     "launcher=local", f"fault.slow_links.{a}-{b}=10.0", "fault.slow_links_from=2",
                     "fault.slow_links_until=7", "fault.probe_after=3"]) == 0
    routes = [json.loads(line) for line in (run / "routes.jsonl").read_text().splitlines()]
    use = [_links_of(r["plan"]).get((a, b), 0) for r in routes]
    assert use[0] > 0 and use[2] > 0, use  # the link was busy when it slowed down
    replanned = next(i for i, n in enumerate(use) if i > 2 and n == 0)
    assert replanned <= 2 + 3, use  # routed around within 3 steps of the change
    assert any(n > 0 for n in use[7:7 + 3 + 1]), use  # used again within probe_after steps of recovering
    assert any(f"re-planning: link {a}-{b} measured" in r.message for r in caplog.records)
    lines = metrics(run)
    assert lines[-2]["route/replans"] >= 1 and lines[-2]["link/probes"] >= 1
    slow_step = lines[3]  # measured over the degraded link, in ms
    assert slow_step[f"link/{a}-{b}/latency_ms"] > 8 * lines[1][f"link/{a}-{b}/latency_ms"]


def _link_pair(rank, port, result_path):
    from datetime import timedelta

    import torch.distributed as dist

    from skippipe.runtime.transport import ACT, LinkModel, Transport, link_estimates

    store = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=rank == 0)
    pg = dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=20))
    links = LinkModel(latency_s=lambda a, b: 0.3, bandwidth_bytes_per_s=lambda a, b: 1e6)  # 1 MB/s
    transport = Transport(pg, {"a": 0, "b": 1}, "ab"[rank], torch.device("cpu"), 20.0, links)
    payload = torch.ones(2, 50_000)  # 400 kB -> 0.4 s on the wire
    if rank == 0:
        store.wait(["posted"])  # the receiver waits before the message is sent: its times count
        sent = time.time()
        transport.send(payload, "b", step=0, microbatch_id=7, kind=ACT)
        transport.send(payload, "b", step=1, microbatch_id=7, kind=ACT)  # over a link slowed 3x
        transport.flush()
        Path(result_path).write_text(json.dumps({"sent": sent}))
        store.set("written", "1")
        store.wait(["read"])
    else:
        store.set("posted", "1")
        got = transport.recv("a", step=0, microbatch_id=7, kind=ACT, shape=(2, 50_000), dtype=torch.float32)
        received = time.time()
        normal = link_estimates(transport.link_samples)["a"]
        transport.link_samples, transport.links.factor = [], lambda a, b: 3.0  # fault.slow_links
        transport.recv("a", step=1, microbatch_id=7, kind=ACT, shape=(2, 50_000), dtype=torch.float32)
        slowed = link_estimates(transport.link_samples)["a"]
        store.wait(["written"])
        sent = json.loads(Path(result_path).read_text())["sent"]
        store.set("read", "1")
        Path(result_path).write_text(json.dumps({"elapsed": received - sent, "ok": bool(torch.equal(got, payload)),
                                                 "normal": normal, "slowed": slowed}))


def test_link_emulator_delays_by_latency_plus_bandwidth(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "result.json"
    mp.start_processes(_link_pair, args=(port, str(result)), nprocs=2, start_method="spawn")
    data = json.loads(result.read_text())
    assert data["ok"]
    assert data["elapsed"] >= 0.3 + 0.4 - 0.01  # lower bound only: latency + bytes / bandwidth
    # what the receiver measured of the link (sent before the receive was posted: it counts)
    normal, slowed = data["normal"], data["slowed"]
    assert normal["latency_s"] == pytest.approx(0.3, rel=0.1)
    assert normal["bytes_per_s"] == pytest.approx(1e6, rel=0.1)
    # the second message queued behind the first (FIFO): its latency includes that wait, but the
    # bandwidth, a difference of two times, is the slowed link's
    assert slowed["bytes_per_s"] == pytest.approx(1e6 / 3, rel=0.1)


def _deferred_pair(rank, port, result_path):
    from datetime import timedelta

    import torch.distributed as dist

    from skippipe.runtime.transport import ACT, Transport, TransportError

    store = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=rank == 0)
    pg = dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=20))
    transport = Transport(pg, {"a": 0, "b": 1}, "ab"[rank], torch.device("cpu"), 20.0, check_each=False)
    if rank == 0:
        transport.send(torch.full((2, 3), 1.0), "b", step=5, microbatch_id=1, kind=ACT)
        transport.send(torch.full((2, 3), 2.0), "b", step=5, microbatch_id=2, kind=ACT)
        transport.flush()
        transport.send(torch.full((2, 3), 3.0), "b", step=5, microbatch_id=1, kind=ACT)  # the plan said step 6
        transport.flush()
        store.wait(["done"])
        return
    first = transport.recv("a", step=5, microbatch_id=1, kind=ACT, shape=(2, 3), dtype=torch.float32)
    second = transport.recv("a", step=5, microbatch_id=2, kind=ACT, shape=(2, 3), dtype=torch.float32)
    unchecked_after_two = len(transport._unchecked)
    transport.check_received()  # both right: passes, and records their link times
    samples = len(transport.link_samples)
    wrong = transport.recv("a", step=6, microbatch_id=1, kind=ACT, shape=(2, 3), dtype=torch.float32)
    try:
        transport.check_received()
        error = None
    except TransportError as err:
        error = {"message": str(err), "peer": err.peer}
    store.set("done", "1")
    Path(result_path).write_text(json.dumps({
        "values": [float(first[0, 0]), float(second[0, 0]), float(wrong[0, 0])],
        "unchecked_after_two": unchecked_after_two, "samples": samples, "error": error}))


def test_deferred_header_checks_fail_the_step_once_naming_the_sender(tmp_path):
    """check_each=False (the GPU default without link emulation): receives do not read headers;
    check_received reads all of them at once and names the sender of a wrong message."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = tmp_path / "deferred.json"
    mp.start_processes(_deferred_pair, args=(port, str(result)), nprocs=2, start_method="spawn")
    data = json.loads(result.read_text())
    assert data["values"] == [1.0, 2.0, 3.0]
    assert data["unchecked_after_two"] == 2 and data["samples"] == 2
    assert data["error"]["peer"] == "a"
    assert "got step 5 microbatch 1" in data["error"]["message"] and "node a is excluded" in data["error"]["message"]


def _prepost_pair(rank, port, result_path):
    from datetime import timedelta

    import torch.distributed as dist

    from skippipe.runtime.transport import ACT, PREPOST_WINDOW, Transport

    store = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=rank == 0)
    pg = dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=20))
    transport = Transport(pg, {"a": 0, "b": 1}, "ab"[rank], torch.device("cpu"), 20.0)
    if rank == 0:
        store.wait(["posted"])
        for mb in range(4):
            transport.send(torch.full((2, 3), float(mb)), "b", step=0, microbatch_id=mb, kind=ACT)
        store.wait(["abandoned"])  # the receiver gave up on step 1's receives (never sent)
        transport.send(torch.full((2, 3), 5.0), "b", step=2, microbatch_id=5, kind=ACT)
        transport.flush()
        store.wait(["done"])
        return
    expected = [("a", 0, mb, ACT, (2, 3), torch.float32) for mb in range(4)]
    transport.expect(expected)
    posted_at_start = len(transport._posted)
    store.set("posted", "1")
    values, posted_after = [], []
    for mb in range(4):
        values.append(float(transport.recv("a", 0, mb, ACT, (2, 3), torch.float32)[0, 0]))
        posted_after.append(len(transport._posted))
    transport.expect([("a", 1, mb, ACT, (2, 3), torch.float32) for mb in range(2)])
    try:
        transport.recv("a", 1, 1, ACT, (2, 3), torch.float32)  # the plan's order says microbatch 0 first
        order_error = None
    except RuntimeError as err:
        order_error = str(err)
    transport.abandon()  # what a failed step does: the helper thread must not stay behind step 1's receives
    store.set("abandoned", "1")
    last = float(transport.recv("a", 2, 5, ACT, (2, 3), torch.float32)[0, 0])
    store.set("done", "1")
    Path(result_path).write_text(json.dumps({
        "values": values, "last": last, "window": PREPOST_WINDOW, "posted_at_start": posted_at_start,
        "posted_after": posted_after, "order_error": order_error, "samples": len(transport.link_samples)}))
    # as a worker ends (worker.main): step 1's abandoned receives still block in a helper thread, and
    # interpreter teardown would destroy the group under it (std::terminate, SIGABRT)
    os._exit(0)


def test_receives_posted_ahead_arrive_in_plan_order_and_a_failed_step_lets_go_of_them(tmp_path):
    """Transport.expect posts a window of the step's receives ahead (gloo); recv takes them in the
    plan's order, refuses another order, and abandon() frees the helper thread of what is left."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = tmp_path / "prepost.json"
    mp.start_processes(_prepost_pair, args=(port, str(result)), nprocs=2, start_method="spawn")
    data = json.loads(result.read_text())
    assert data["values"] == [0.0, 1.0, 2.0, 3.0] and data["last"] == 5.0
    window = data["window"]
    assert data["posted_at_start"] == window
    assert data["posted_after"] == [min(window, 4 - k) for k in range(1, 5)]  # the window refills as each is taken
    assert "out of the expected order" in data["order_error"]
    assert data["samples"] == 5  # every message's link times were recorded


def test_transport_checks_each_header_on_cpu_and_defers_on_cuda():
    from skippipe.runtime.transport import LinkModel, Transport

    links = LinkModel(latency_s=lambda a, b: 0.0, bandwidth_bytes_per_s=lambda a, b: 1e9)
    assert Transport(None, {}, "a", torch.device("cpu"), 1.0).check_each
    assert not Transport(None, {}, "a", torch.device("cuda", 0), 1.0).check_each
    assert Transport(None, {}, "a", torch.device("cuda", 0), 1.0, links).check_each  # emulation reads headers
    with pytest.raises(ValueError, match="check_each"):
        Transport(None, {}, "a", torch.device("cpu"), 1.0, links, check_each=False)


def test_bad_header_is_named():
    from skippipe.runtime.transport import MAGIC, Transport, TransportError

    header = [MAGIC, 0, 3, 0, 0, 3, 2, 32, 64, 0, 0, 0.0]
    with pytest.raises(TransportError, match=r"shape \(2, 32, 64\) != expected \(2, 32, 65\).*node n4 is excluded"):
        Transport._check_header(header, 0, 3, 0, (2, 32, 65), torch.float32, "activation", "n4")


@pytest.mark.slow
def test_torchrun_entry_runs_two_steps(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=6",
           "launch/torchrun_main.py", "configs/tiny.yaml", *SMALL, "train.steps=2", f"run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = metrics(tmp_path)
    assert [m["step"] for m in lines if "loss/train" in m and "loss/val" not in m] == [0, 1]
    assert lines[-1]["loss/val"] > 0


@pytest.mark.slow
def test_torchrun_restart_resumes_from_checkpoint(tmp_path):
    """A killed rank makes torchrun (--max-restarts=1) restart the group; it resumes from the newest
    verified checkpoint and its ledger equals an uninterrupted run's. The routes are the reference
    run's (``schedule.routes_from``): a live run re-plans on its measured links and nodes, which
    vary from run to run, and the routes are an input of the computation (DESIGN.md section 5)."""
    common = ["configs/tiny.yaml", *SMALL, "train.steps=6", "checkpoint.every=2"]
    assert main(["train", *common, f"run.dir={tmp_path / 'ref'}", "launcher=inprocess"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=6", "--max-restarts=1",
           "launch/torchrun_main.py", *common, f"run.dir={tmp_path / 'tr'}", f"schedule.routes_from={tmp_path / 'ref'}",
           "fault.kill.step=4",
           "fault.kill.node=n3"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after step" in proc.stdout + proc.stderr
    assert [m["step"] for m in metrics(tmp_path / "tr") if "loss/val" not in m] == list(range(6))
    ledger = [(tmp_path / run / "ledger" / "steps.jsonl").read_text() for run in ("ref", "tr")]
    assert ledger[0] == ledger[1]


def test_torchrun_wrong_process_count_fails_fast_with_one_line_first(tmp_path):
    """4 ranks for a 6-node topology: every rank stops before opening a socket; rank 0's line comes
    first, no socket warnings or Python tracebacks of ours follow (torchrun's own summary may)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           "launch/torchrun_main.py", "configs/tiny.yaml", *SMALL, "train.steps=2", f"run.dir={tmp_path}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - start < 60  # was 67 s of socket timeouts on a 2-core box
    # torchrun's own agent may log first that it stops the other ranks ("W1203 ... closing signal
    # SIGTERM", glog format); ours is the first line of the processes it started
    ours = [line for line in proc.stderr.lstrip().splitlines() if not re.match(r"[WIE]\d{4} \d\d:\d\d:", line)]
    first = ours[0]
    assert first == ("error: torchrun started 4 processes but the topology has 6 nodes; start exactly 6 "
                     "(torchrun --nproc_per_node=6, or --nnodes x --nproc_per_node = 6 across machines)")
    assert proc.stderr.count("error: torchrun started") == 1  # rank 0 only
    assert "socket" not in proc.stderr.lower() and "launch/torchrun_main.py\", line" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
@pytest.mark.parametrize("launcher", ["inprocess", "local"])
def test_cuda_on_cpu_only_torch_is_one_line(launcher, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "skippipe", "train", "configs/tiny.yaml", *SMALL,
                           f"launcher={launcher}", "train.device=cuda", f"run.dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.device=cuda but torch "), proc.stderr
    assert "set train.device=cpu" in lines[0] and not (tmp_path / "metrics.jsonl").exists()
