"""``launcher=ray``: one Ray actor per node, in a placement group, running the same worker code.

Each actor gets exactly the torchrun environment contract (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT, plus SKIPPIPE_NODE), as in verl/OpenRLHF, so one worker serves every
launcher. The driver hosts the control store and runs the coordinator. Placement: one bundle per
node, ``PACK`` on one box, ``SPREAD`` across machines, GPU bundles with ``ray.use_gpu``; a topology
node's ``ray: {resources, labels}`` pins its bundle to the Ray nodes that have them (a region's
machines), and the run logs and records (``topology.yaml``: ``ray.placed_on``) which Ray node holds
which topology node. A dead actor (``ray.kill``, a crashed process, a lost machine) is seen through
its ``run`` call failing; with ``fault.replace=true`` a new actor takes the dead one's bundle and
name, or, when that bundle's machine is gone, a bundle of its own on a surviving machine (one with
the node's resources and labels if any has room, else any). Nodes can be added to the
running job (``skippipe join``, :mod:`skippipe.runtime.join`): each gets a placement group of its
own, so the job's group stays as it was.

Ray Train is not used: it restarts the whole group on failure, while SkipPipe routes around the dead
node and keeps training.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from skippipe.config import Config
from skippipe.errors import UserError

log = logging.getLogger("skippipe")
NODE_ID_LABEL = "ray.io/node-id"  # a label every Ray node carries (its id)


def _here() -> str:
    """A liveness probe: runs on the Ray node it is pinned to."""
    import ray

    return ray.get_runtime_context().get_node_id()


class WorkerActor:
    """A Ray actor around :func:`skippipe.runtime.worker.serve` (decorated lazily: ray is optional
    at import time)."""

    def __init__(self, env: Dict[str, str]):
        os.environ.update(env, SKIPPIPE_STARTED_AT=str(time.time()))  # the worker reports its start-up time
        import torch

        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))

    def pid(self) -> int:
        return os.getpid()

    def run(self) -> int:
        from skippipe.runtime.control import ControlChannel, connect_store
        from skippipe.runtime.worker import WorkerEnv, run_worker

        env = WorkerEnv.from_environ()
        logging.basicConfig(level=logging.WARNING, format=f"[{env.node}] %(levelname)s %(message)s")
        control = ControlChannel(connect_store(env.master_addr, env.master_port, False, 60.0), 60.0)
        return run_worker(env, control)


class RayLauncher:
    """Creates, watches, replaces and removes the worker actors."""

    def __init__(self, cfg: Config, nodes: List[Any], addr: str, port: int, secret: str):
        """``nodes``: the topology's :class:`~skippipe.topology.Node` entries (their ``ray`` pins)."""
        import ray

        self.cfg, self.nodes, self.addr, self.port = cfg, [n.name for n in nodes], addr, port
        self.pins: Dict[str, Dict[str, Any]] = {n.name: n.ray for n in nodes}  # resources, labels
        self.secret = secret  # the control channel's key, handed to each actor's environment
        self.cpus = worker_cpus(cfg, len(nodes), ray.available_resources())
        bundle = {"CPU": self.cpus}
        if cfg.ray.use_gpu:
            bundle["GPU"] = 1
        self.bundle = bundle
        check_pins(self.pins, ray.nodes())
        self.pg = place_job(cfg, [self._bundle(name) for name in self.nodes],
                            [dict(self.pins[name].get("labels", {})) for name in self.nodes], bundle,
                            pinned=any(self.pins.values()))
        self.bundle_of: Dict[str, Any] = {node: (self.pg, i) for i, node in enumerate(self.nodes)}
        self.extra_pgs: List[Any] = []
        self.placement: Dict[str, Dict[str, str]] = {}  # topology node -> {node_id, node_ip} of its Ray node
        self._record_placement(self.pg, self.nodes)
        from skippipe.runtime.join import RayJoins

        # ray.autojoin admits Ray nodes not among them, their workers started as soon as they are seen
        self.joins = RayJoins(cfg, {n["NodeID"] for n in ray.nodes()}, prestart=self._prestart)
        self._probed: Dict[str, Any] = {}  # Ray node id -> (when, responded) of the last liveness probe
        self.actor_cls = ray.remote(WorkerActor)
        self.actors: Dict[str, Any] = {}
        self.runs: Dict[str, Any] = {}
        # replacements being placed in the background (a liveness probe and a placement group can
        # take seconds; the redone step should not wait for them): node -> its thread
        self._lock = threading.Lock()
        self._starting: Dict[str, threading.Thread] = {}
        self._cancelled: Set[str] = set()  # killed while starting: not spawned
        self.spawned_at: Dict[str, float] = {}  # node -> when its latest worker was started (monotonic)
        self._prestarted: Set[str] = set()  # ray.autojoin: started, not yet taken by add (or rejected)

    def _bundle(self, node: str) -> Dict[str, float]:
        return {**self.bundle, **self.pins.get(node, {}).get("resources", {})}

    def _record_placement(self, pg, names: List[str]) -> None:
        """Which Ray node got each bundle of ``pg`` (``names`` in bundle order); logged."""
        import ray
        from ray.util.placement_group import placement_group_table

        ips = {n["NodeID"]: n.get("NodeManagerAddress", "") for n in ray.nodes()}
        on = placement_group_table(pg).get("bundles_to_node_id", {})
        placed = {name: {"node_id": on[i], "node_ip": ips.get(on[i], "")} for i, name in enumerate(names) if i in on}
        self.placement.update(placed)
        log.info("ray placement: %s", ", ".join(f"{n} -> {p['node_id'][:8]} ({p['node_ip']})" for n, p in placed.items()))

    def _env(self, node: str, incarnation: int) -> Dict[str, str]:
        from skippipe.process import torchrun_env

        return torchrun_env(self.nodes.index(node), len(self.nodes), 0, 1, self.addr, self.port, self.cfg.run.threads,
                            node, incarnation, self.secret)

    def _spawn(self, node: str, incarnation: int) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg, index = self.bundle_of[node]
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)
        actor = self.actor_cls.options(num_cpus=self.cpus,
                                       num_gpus=1 if self.cfg.ray.use_gpu else 0,
                                       scheduling_strategy=strategy, name=None,
                                       max_restarts=0).remote(self._env(node, incarnation))
        self.actors[node] = actor
        self.runs[node] = actor.run.remote()
        self.spawned_at[node] = time.monotonic()

    def start(self) -> None:
        for node in self.nodes:
            self._spawn(node, 0)

    # -- nodes added to the running job -------------------------------------------------------
    def open_mailbox(self) -> None:
        self.joins.open()

    def join_requests(self) -> List[Dict[str, Any]]:
        return self.joins.requests()

    def answer(self, request_id: int, status: str, **info) -> None:
        node = self.joins.autojoined.pop(request_id, None) if status != "accepted" else None
        if status == "rejected" and node in self._prestarted:  # its worker was started when its Ray node was seen
            self._prestarted.discard(node)
            self.kill(node)
        self.joins.answer(request_id, status, **info)

    def _prestart(self, spec: Dict[str, Any]) -> None:
        """``ray.autojoin`` (the watcher thread): start the worker of a Ray node that joined the
        cluster before the coordinator takes its request; :meth:`add` then finds it started."""
        with self._lock:
            if spec["name"] not in self.bundle_of:  # a name already in the run is rejected, not started
                self._start_added(spec["name"], spec)
                self._prestarted.add(spec["name"])

    def add(self, node: str, spec: Dict[str, Any]) -> float:
        """Start a worker for a node that was not in the topology, in a placement group of its own
        (pinned to the Ray node ``spec['ray_node_id']``, else to one with IP ``spec['node_ip']``, if
        given), unless ``ray.autojoin`` started it already. Returns at once (the actor starts when
        the cluster has room, and the worker joins once it reports ready) with when the worker was
        started (``time.monotonic()``)."""
        with self._lock:
            if node in self._prestarted:
                self._prestarted.discard(node)
            else:
                self._start_added(node, spec)
            return self.spawned_at[node]

    def _start_added(self, node: str, spec: Dict[str, Any]) -> None:
        pg = added_node_group(self.bundle, spec)
        self.extra_pgs.append(pg)
        self.nodes.append(node)
        self.bundle_of[node] = (pg, 0)
        self._spawn(node, 0)

    def exited(self) -> Dict[str, int]:
        """node -> exit code (-9 when the actor died) for every worker whose ``run`` has ended."""
        import ray

        with self._lock:  # a replacement still being placed has no run of its own yet
            runs = {node: ref for node, ref in self.runs.items() if node not in self._starting}
        refs = list(runs.values())
        if not refs:
            return {}
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done = set(done)
        out = {}
        for node, ref in runs.items():
            if ref in done:
                try:
                    out[node] = int(ray.get(ref))
                except Exception:  # RayActorError and friends: the actor is gone
                    out[node] = -9
        return out

    def replace(self, node: str, incarnation: int, away_from_last: bool = False) -> None:
        """A new actor for ``node``: in its old bundle while that bundle's Ray node is alive, else
        (or with ``away_from_last``: the last replacement died there before joining, e.g. on a machine
        Ray has not yet marked dead) in a bundle of its own on another Ray node, one with the node's
        pins if any has room, else any."""
        self.kill(node)
        with self._lock:
            self._cancelled.discard(node)
            thread = threading.Thread(target=self._replace, args=(node, incarnation, away_from_last),
                                      name=f"skippipe-replace-{node}", daemon=True)
            self._starting[node] = thread
        thread.start()

    def _replace(self, node: str, incarnation: int, away_from_last: bool) -> None:
        """:meth:`replace`'s placement and start, in a thread of its own; a failure leaves the old
        (exited) run in place, so the executor sees the node fail to join and tries again."""
        try:
            self._place_replacement(node, away_from_last)
            with self._lock:
                if node in self._cancelled:
                    return
                self._spawn(node, incarnation)
        except Exception as err:  # noqa: BLE001 - reported as a failed join
            log.warning("replacement for %s was not started: %s: %s", node, type(err).__name__, err)
        finally:
            with self._lock:
                self._starting.pop(node, None)
                self._cancelled.discard(node)

    def _place_replacement(self, node: str, away_from_last: bool) -> None:
        import ray
        from ray.util.placement_group import placement_group

        last = self.placement.get(node, {}).get("node_id")
        others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != last]
        if away_from_last or not self._responds(last):
            pins = self.pins.get(node, {})
            if pins and not can_hold(pins, self._bundle(node), others):
                log.warning("replacement for %s: no other Ray node has its ray.resources/labels %s; "
                            "placing it on any node with room", node, pins)
                pins = {}
            bundle = {**self.bundle, **pins.get("resources", {})}
            selector = dict(pins.get("labels", {}))
            if last:
                selector[NODE_ID_LABEL] = f"!{last}"  # not where the last one died
            pg = placement_group([bundle], strategy="PACK",
                                 **({"bundle_label_selector": [selector]} if selector else {}))
            self.extra_pgs.append(pg)
            self.bundle_of[node] = (pg, 0)
            ready, _ = ray.wait([pg.ready()], timeout=10.0)  # the actor waits for it if it is not ready yet
            if ready:
                self._record_placement(pg, [node])

    def _responds(self, ray_node: Optional[str], timeout_s: float = 5.0) -> bool:
        """Whether a Ray node runs a task now: Ray marks a lost machine dead only after missed health
        checks (tens of seconds), and an actor placed there meanwhile would wait for ever. One probe
        per Ray node and failure (a few seconds at most; cached for 30 s)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if ray_node is None:
            return False
        if ray_node not in {n["NodeID"] for n in ray.nodes() if n.get("Alive")}:
            return False
        seen = self._probed.get(ray_node)
        if seen is not None and time.monotonic() - seen[0] < 30.0:
            return seen[1]
        probe = ray.remote(num_cpus=0, max_retries=0)(_here).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray_node, soft=False)).remote()
        ready, _ = ray.wait([probe], timeout=timeout_s)
        alive = bool(ready)
        if not alive:
            ray.cancel(probe, force=True)
            log.warning("Ray node %s runs no task within %.0f s: taken as lost", ray_node[:8], timeout_s)
        self._probed[ray_node] = (time.monotonic(), alive)
        return alive

    def kill(self, node: str) -> None:
        import ray

        with self._lock:
            if node in self._starting:
                self._cancelled.add(node)
        actor = self.actors.get(node)
        if actor is not None:
            ray.kill(actor, no_restart=True)

    def actor(self, node: str):
        return self.actors[node]

    def stop(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        with self._lock:
            self._cancelled.update(self._starting)
            starting = list(self._starting.values())
        for thread in starting:  # none spawns now; wait for their Ray calls to return
            thread.join(timeout=20.0)
        for node in list(self.actors):
            try:
                ray.kill(self.actors[node], no_restart=True)
            except Exception:  # already gone
                pass
        for pg in [self.pg, *self.extra_pgs]:
            remove_placement_group(pg)
        self.joins.close()
        _wait_removed([self.pg, *self.extra_pgs])


def added_node_group(worker: Dict[str, float], spec: Dict[str, Any]):
    """A placement group of its own for an added node: on the Ray node ``spec['ray_node_id']``,
    else on one with IP ``spec['node_ip']``, if given."""
    from ray.util.placement_group import placement_group

    bundle, selector = dict(worker), {}
    if spec.get("ray_node_id"):
        selector = {"bundle_label_selector": [{NODE_ID_LABEL: spec["ray_node_id"]}]}
    elif spec.get("node_ip"):
        bundle[f"node:{spec['node_ip']}"] = 0.001
    return placement_group([bundle], strategy="PACK", **selector)


def place_job(cfg: Config, bundles: List[Dict[str, float]], selectors: List[Dict[str, str]],
              worker: Dict[str, float], pinned: bool):
    """The job's placement group, one bundle per node (``selectors``: each bundle's pinned labels;
    ``worker``: a bundle without pins), once Ray has placed it; a one-line error naming what to
    change when it cannot within ``runtime.timeout_s * 4``."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(bundles, strategy=cfg.ray.placement_strategy,
                         **({"bundle_label_selector": selectors} if any(selectors) else {}))
    try:
        ray.get(pg.ready(), timeout=cfg.runtime.timeout_s * 4)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        hint = "; nodes pinned by ray.resources/labels need a Ray node with them" if pinned else ""
        raise UserError(f"the Ray cluster did not place {len(bundles)} workers x {worker} within "
                        f"{cfg.runtime.timeout_s * 4:.0f} s (strategy {cfg.ray.placement_strategy}); "
                        f"lower ray.num_cpus_per_worker or add machines{hint}") from None
    return pg


def _wait_removed(pgs, timeout_s: float = 10.0) -> None:
    """Removing a placement group is asynchronous: wait (bounded) until Ray reports each removed, so
    a run that returns has given its CPUs back (a next run in the same driver sizes its workers by
    the free CPUs)."""
    from ray.util.placement_group import placement_group_table

    deadline = time.monotonic() + timeout_s
    for pg in pgs:
        while placement_group_table(pg).get("state") != "REMOVED" and time.monotonic() < deadline:
            time.sleep(0.05)


def check_pins(pins: Dict[str, Dict[str, Any]], ray_nodes: List[Dict[str, Any]]) -> None:
    """Fail at once, naming the node and the pin, when no live Ray node has a pinned resource or label
    (a placement group would otherwise wait ``runtime.timeout_s * 4`` and then fail vaguely)."""
    alive = [n for n in ray_nodes if n.get("Alive")]
    for name, pin in sorted(pins.items()):
        for res in pin.get("resources", {}):
            if not any(n.get("Resources", {}).get(res, 0) > 0 for n in alive):
                raise UserError(f"topology node '{name}': ray.resources.{res}: no Ray node in the cluster has "
                                f"resource '{res}'; start one with ray start --resources='{{\"{res}\": 4}}' "
                                "or remove the pin")
        for key, value in pin.get("labels", {}).items():
            if not any(n.get("Labels", {}).get(key) == value for n in alive):
                raise UserError(f"topology node '{name}': ray.labels.{key}={value}: no Ray node in the cluster has "
                                f"that label; start one with ray start --labels='{{\"{key}\": \"{value}\"}}' "
                                "or remove the pin")


def can_hold(pins: Dict[str, Any], bundle: Dict[str, float], alive: List[Dict[str, Any]]) -> bool:
    """Whether some live Ray node has the pinned labels and the bundle's resources in total."""
    for node in alive:
        labels, resources = node.get("Labels", {}), node.get("Resources", {})
        if all(labels.get(k) == v for k, v in pins.get("labels", {}).items()) and \
                all(resources.get(r, 0) >= amount for r, amount in bundle.items()):
            return True
    return False


def connect_ray(cfg: Config) -> None:
    """Join the cluster (``ray.address``, or RAY_ADDRESS inside ``ray job submit``), or start a
    local one bound to 127.0.0.1 when neither is given."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = max(os.cpu_count() or 1, int((cfg.ray.num_cpus_per_worker or 1.0) * 64))
        # address="local": a new instance, never one that an earlier `ray start` here left behind
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1")


def worker_cpus(cfg: Config, num_workers: int, available: Dict[str, float]) -> float:
    """CPUs per worker actor: ``ray.num_cpus_per_worker``, or (unset) 1 when the cluster's free CPUs
    allow it, else an equal share of them that leaves one share free for a node that joins later
    (``skippipe join``), rounded down to 0.01 (Ray's resource granularity is 1e-4).
    Fails at once, naming the key and the numbers, when the request cannot fit: a placement group
    that cannot be placed would otherwise wait for ``runtime.timeout_s * 4`` seconds."""
    free = float(available.get("CPU", 0.0))
    wanted = cfg.ray.num_cpus_per_worker
    if wanted is None:
        share = math.floor(100 * free / (num_workers + 1)) / 100
        if share <= 0:
            raise UserError(f"the Ray cluster has {free:g} free CPUs for {num_workers} workers; "
                            f"free some or set ray.num_cpus_per_worker (e.g. 0.1)")
        if share < 1.0:
            log.info("ray.num_cpus_per_worker unset: %d workers (and room for one that joins) share the "
                     "cluster's %g free CPUs, %.2f each", num_workers, free, share)
        return min(1.0, share)
    if wanted <= 0:
        raise UserError(f"ray.num_cpus_per_worker={wanted:g} must be > 0")
    if wanted * num_workers > free + 1e-6:
        raise UserError(f"ray.num_cpus_per_worker={wanted:g} x {num_workers} workers = {wanted * num_workers:g} CPUs, "
                        f"but the Ray cluster has {free:g} free; set ray.num_cpus_per_worker<="
                        f"{math.floor(100 * free / num_workers) / 100:g} (or unset it), or add CPUs")
    return wanted


def in_ray_job_copy(cwd: Path) -> bool:
    """True inside ``ray job submit --working-dir``: the driver runs in Ray's temporary copy of the
    working directory, which Ray deletes when it cleans up."""
    return "runtime_resources" in cwd.parts and any(p.startswith("_ray_pkg_") for p in cwd.parts)


def resolve_run_dir(cfg: Config, cwd: Path = None) -> Path:
    """Where a Ray run writes its outputs, made absolute: ``run.dir``, else ``ray.storage_path/<run.name>``,
    else ``runs/<run.name>`` under the starting directory, or, inside ``ray job submit``'s temporary copy,
    ``~/skippipe_runs/<run.name>`` (outputs outlive the job, like Ray Train's storage_path)."""
    cwd = Path(cwd or Path.cwd())
    if cfg.run.dir:
        path = Path(cfg.run.dir).expanduser()
        if not path.is_absolute() and in_ray_job_copy(cwd):
            log.warning("run.dir=%s is inside Ray's temporary working_dir copy (deleted by Ray); "
                        "give an absolute run.dir or set ray.storage_path", cfg.run.dir)
    elif cfg.ray.storage_path:
        path = Path(cfg.ray.storage_path).expanduser() / str(cfg.run.name)
    elif in_ray_job_copy(cwd):
        path = Path.home() / "skippipe_runs" / str(cfg.run.name)
    else:
        path = Path("runs") / str(cfg.run.name)
    return path if path.is_absolute() else cwd / path


def control_address(cfg: Config) -> str:
    """Where actors reach the driver's control store: loopback on one machine, else this node's IP."""
    import ray

    if len([n for n in ray.nodes() if n.get("Alive")]) <= 1:
        return cfg.runtime.master_addr
    return ray.util.get_node_ip_address()


def train_ray(cfg: Config) -> Dict[str, Any]:
    from skippipe.process import pin_threads
    from skippipe.runtime.control import ControlChannel, connect_store, new_secret
    from skippipe.runtime.coordinator import Coordinator
    from skippipe.runtime.remote import RemoteExecutor
    from skippipe.topology import load_topology

    pin_threads(cfg.run.threads)
    cfg.run.dir = str(resolve_run_dir(cfg))  # the summary and the config.yaml show the real path
    connect_ray(cfg)
    addr = control_address(cfg)
    store = connect_store(addr, cfg.runtime.master_port or 0, True, cfg.runtime.timeout_s)
    secret = new_secret()
    control = ControlChannel(store, cfg.runtime.timeout_s, secret=secret)
    nodes = load_topology(cfg).nodes
    launcher = RayLauncher(cfg, nodes, addr, store.port, secret)
    train_ray.last_launcher = launcher  # tests reach the actors through this
    try:
        launcher.open_mailbox()
        launcher.start()
        return Coordinator(cfg, lambda spec, num_stages: RemoteExecutor(cfg, control, len(nodes), launcher),
                           placement=launcher.placement).run()
    finally:
        launcher.stop()
