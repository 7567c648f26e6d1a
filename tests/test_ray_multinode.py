"""Tier 3: the Ray launcher on a multi-node Ray cluster on one box: a head and two raylets on
127.0.0.1 (ray.cluster_utils.Cluster, once per module), each raylet standing for a machine in a region
(a custom resource and a label). Region-aware placement, and losing a whole machine mid-run."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # multi-raylet clusters on one box stay on 127.0.0.1
ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # make test-fast (one pytest process) leaves it out; make test runs it on its own

from skippipe.config import load_config  # noqa: E402
from skippipe.planner import Planner  # noqa: E402
from skippipe.runtime.background import BackgroundRun, first_step_using  # noqa: E402
from skippipe.runtime.launch_ray import train_ray  # noqa: E402

SMALL = ["model.dim=64", "model.n_heads=2", "model.ffn_dim=128", "model.seq_len=32", "train.samples_per_microbatch=2",
         "data.max_corpus_mb=1", "train.eval_batches=2", "tracking.wandb.mode=disabled", "tracking.progress=false",
         "runtime.timeout_s=30", "cost.emulate_links=false", "launcher=ray", "ray.num_cpus_per_worker=0.25"]
MACHINES = {"eu": 2, "us": 2}  # region -> CPUs of its raylet


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                      "include_dashboard": False, "labels": {"region": "head"}})
    machines = {region: c.add_node(num_cpus=cpus, node_ip_address="127.0.0.1", resources={f"region_{region}": 8},
                                   labels={"region": region})
                for region, cpus in MACHINES.items()}
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield c, machines
    ray.shutdown()
    c.shutdown()


def lose_machine(c, machine) -> None:
    """The machine at once: its raylet, object store and every worker process on it."""
    import psutil

    workers = psutil.Process(machine.all_processes["raylet"][0].process.pid).children(recursive=True)
    c.remove_node(machine, allow_graceful=False)
    for proc in workers:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def routes(run):
    return [json.loads(line) for line in (Path(run) / "routes.jsonl").read_text().splitlines()]


def ray_node_ids():
    """region label -> Ray node id of the live raylets."""
    return {n["Labels"].get("region"): n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def pinned_topology(path: Path, where: dict) -> Path:
    """Six nodes in one cost-model region; each pinned to a machine (``where``: node -> region), the
    even ones by label, the odd ones by custom resource (both ways must work)."""
    nodes = []
    for i in range(6):
        region = where[f"n{i}"]
        pin = {"labels": {"region": region}} if i % 2 == 0 else {"resources": {f"region_{region}": 1}}
        nodes.append({"name": f"n{i}", "region": "r", "ray": pin})
    path.write_text(json.dumps({"regions": {"names": ["r"], "latency_ms": [[20]], "bandwidth_gbps": [[1]]},
                                "nodes": nodes}))
    return path


def config(tmp_path, *extra):
    return load_config("configs/tiny.yaml", [*SMALL, f"run.dir={tmp_path / 'run'}", *extra])


def allocation_of(cfg):
    from skippipe.model.presets import resolve_model_spec

    return Planner(cfg, resolve_model_spec(cfg.model, vocab_size=256)).allocation


def test_nodes_are_placed_on_the_machines_their_pins_name(cluster, tmp_path):
    where = {f"n{i}": ("eu" if i < 3 else "us") for i in range(6)}
    cfg = config(tmp_path, f"topology.file={pinned_topology(tmp_path / 'topo.yaml', where)}", "train.steps=2")
    train_ray(cfg)
    ids = ray_node_ids()
    placement = train_ray.last_launcher.placement
    assert {n: p["node_id"] for n, p in placement.items()} == {n: ids[r] for n, r in where.items()}
    assert all(p["node_ip"] == "127.0.0.1" for p in placement.values())  # the cluster's node IPs, never 0.0.0.0
    import yaml

    recorded = yaml.safe_load((tmp_path / "run" / "topology.yaml").read_text())
    assert {n["name"]: n["ray"]["placed_on"]["node_id"] for n in recorded["nodes"]} == {n: ids[r] for n, r in where.items()}
    assert [m["step"] for m in metrics(tmp_path / "run") if "loss/val" not in m] == [0, 1]


def test_a_pin_no_machine_has_fails_in_seconds_naming_it(cluster, tmp_path):
    from skippipe.errors import UserError

    topo = tmp_path / "topo.yaml"
    topo.write_text(json.dumps({"regions": {"names": ["r"], "latency_ms": [[1]], "bandwidth_gbps": [[10]]},
                                "nodes": [{"name": f"n{i}", "region": "r",
                                           **({"ray": {"labels": {"region": "mars"}}} if i == 4 else {})}
                                          for i in range(6)]}))
    started = time.monotonic()
    with pytest.raises(UserError, match="'n4': ray.labels.region=mars: no Ray node"):
        train_ray(config(tmp_path, f"topology.file={topo}", "train.steps=2"))
    assert time.monotonic() - started < 30


def test_losing_a_machine_routes_around_it_and_replaces_its_nodes(cluster, tmp_path):
    """The "us" raylet holds both replicas of stage 1 and one stage-0 replica; it is killed at step 4
    of 30 (all three actors die together): the run finishes 30/30 steps, each step trains the same
    microbatches once, stage 1 is skipped until replacements on the surviving machines hold it, and
    the run verifies by replay."""
    c, machines = cluster
    probe = config(tmp_path, "topology.file=null", "topology.generate.count=6",
                   "topology.generate.placement=single")
    allocation = allocation_of(probe)
    lost = {allocation[0][0], *allocation[1]}
    assert len(allocation[1]) == 2, allocation
    where = {f"n{i}": ("us" if f"n{i}" in lost else "eu") for i in range(6)}
    # emulated 20 ms links: a step takes long enough for the machine to be lost during the run
    cfg = config(tmp_path, f"topology.file={pinned_topology(tmp_path / 'topo.yaml', where)}", "train.steps=30",
                 "fault.replace=true", "fault.rebuild=checkpoint", "checkpoint.every=2", "cost.emulate_links=true")
    assert allocation_of(cfg) == allocation
    run = tmp_path / "run"
    job = BackgroundRun(train_ray, cfg)
    assert job.wait_for_step(3)
    killed_at = job.last_step()
    lose_machine(c, machines["us"])
    job.result()
    c.add_node(num_cpus=MACHINES["us"], node_ip_address="127.0.0.1", resources={"region_us": 8},
               labels={"region": "us"})  # back for the next test
    steps = [m for m in metrics(run) if "loss/val" not in m]
    assert [m["step"] for m in steps] == list(range(30))
    log = routes(run)
    ids = [sorted(mb["id"] for mb in r["plan"]["microbatches"]) for r in log]
    assert all(i == ids[0] for i in ids) and len(set(ids[0])) == len(ids[0])
    generations = [r["generation"] for r in log]
    assert generations[-1] >= 2, generations  # the loss, then the replacements joining
    assert generations[killed_at + 2] >= 1, (killed_at, generations)  # the loss is seen by the next step but one
    stage1 = [sum(n in allocation[1] for mb in r["plan"]["microbatches"] for n in mb["path"]) for r in log]
    down = [s for g, s in zip(generations, stage1) if g == 1]
    assert down and all(v == 0 for v in down), stage1  # no live replica: skipped
    assert stage1[-1] > 0, stage1  # replaced and used again
    placement = train_ray.last_launcher.placement
    assert all(placement[n]["node_id"] != machines["us"].node_id for n in lost)  # on surviving machines
    from skippipe.cli import main

    assert main(["verify", str(run)]) == 0


def test_pins_are_checked_against_the_cluster_before_placing():
    from skippipe.errors import UserError
    from skippipe.runtime.launch_ray import can_hold, check_pins

    nodes = [{"Alive": True, "NodeID": "a", "Resources": {"CPU": 2.0, "region_eu": 8.0}, "Labels": {"region": "eu"}},
             {"Alive": False, "NodeID": "b", "Resources": {"CPU": 2.0, "region_us": 8.0}, "Labels": {"region": "us"}}]
    check_pins({"n0": {"resources": {"region_eu": 1}}, "n1": {"labels": {"region": "eu"}}, "n2": {}}, nodes)
    with pytest.raises(UserError, match="'n3': ray.resources.region_us: no Ray node .* has resource 'region_us'"):
        check_pins({"n3": {"resources": {"region_us": 1}}}, nodes)  # only on a dead machine
    with pytest.raises(UserError, match=r"'n4': ray.labels.region=us: .*ray start --labels"):
        check_pins({"n4": {"labels": {"region": "us"}}}, nodes)
    alive = [n for n in nodes if n["Alive"]]
    assert can_hold({"labels": {"region": "eu"}}, {"CPU": 1.0, "region_eu": 1.0}, alive)
    assert not can_hold({"labels": {"region": "eu"}}, {"CPU": 4.0}, alive)  # too big for the machine
    assert not can_hold({"labels": {"region": "us"}}, {"CPU": 1.0}, alive)


def test_a_raylet_joining_the_cluster_is_admitted_as_a_new_node(cluster, tmp_path):
    """ray.autojoin=true: a raylet started during the run (label region=r, a region of the topology)
    becomes a new node of the thinnest stage (whose only node is 8x slower, so the new one must take
    its microbatches), joins in a new generation and receives microbatches."""
    c, _ = cluster
    where = {f"n{i}": ("eu" if i % 2 else "us") for i in range(6)}
    topo = pinned_topology(tmp_path / "topo.yaml", where)
    probe = config(tmp_path, f"topology.file={topo}")
    allocation = allocation_of(probe)
    stage = min(range(1, len(allocation)), key=lambda k: (len(allocation[k]), k))
    # emulated links: the new node's links really are as the topology says (real loopback links are
    # 40x faster, and measured links of the others would make its unmeasured ones look dear)
    cfg = config(tmp_path, f"topology.file={topo}", "train.steps=40", "ray.autojoin=true", "cost.emulate_links=true",
                 f"fault.slow_nodes.{allocation[stage][0]}=8.0")
    run = tmp_path / "run"
    job = BackgroundRun(train_ray, cfg)
    assert job.wait_for_step(3)
    added = c.add_node(num_cpus=1, node_ip_address="127.0.0.1", labels={"region": "r"})
    added_after = job.last_step()  # the raylet has registered: the machine is in the cluster
    job.result()
    name = f"ray-{added.node_id[:6]}"
    log = routes(run)
    assert [r["step"] for r in log] == list(range(40))
    joined = [r for r in log if name in r["plan"]["allocation"][stage]]
    assert joined, f"{name} never joined"
    visits = [sum(name in mb["path"] for mb in r["plan"]["microbatches"]) for r in joined]
    assert visits[-1] > 0, visits
    # admitted in a new generation, it carries microbatches from its first step (it must: its stage's
    # other node is 8x slower); how many steps its worker takes to start depends on the step time
    # (seconds: bench/fault_bench.py --only machine)
    assert first_step_using(run, name) == joined[0]["step"] > added_after, (added_after, joined[0]["step"])
    assert joined[0]["generation"] == log[0]["generation"] + 1
    ids = [sorted(mb["id"] for mb in r["plan"]["microbatches"]) for r in log]
    assert all(i == ids[0] for i in ids)
    import yaml

    recorded = {n["name"]: n for n in yaml.safe_load((run / "topology.yaml").read_text())["nodes"]}
    assert recorded[name]["region"] == "r" and recorded[name]["ray"]["placed_on"]["node_id"] == added.node_id
    c.remove_node(added)
