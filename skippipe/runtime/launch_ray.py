"""``launcher=ray``: one Ray actor per node, in a placement group, running the same worker code.

Each actor gets exactly the torchrun environment contract (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT, plus SKIPPIPE_NODE), as in verl/OpenRLHF, so one worker serves every
launcher. The driver hosts the control store and runs the coordinator. Placement: one bundle per
node, ``PACK`` on one box, ``SPREAD`` across machines, GPU bundles with ``ray.use_gpu``. A dead
actor (``ray.kill``, a crashed process, a lost machine) is seen through its ``run`` call failing; with
``fault.replace=true`` a new actor takes the dead one's bundle and name. Nodes can be added to the
running job (``skippipe join``, :mod:`skippipe.runtime.join`): each gets a placement group of its
own, so the job's group stays as it was.

Ray Train is not used: it restarts the whole group on failure, while SkipPipe routes around the dead
node and keeps training.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List

from skippipe.config import Config
from skippipe.errors import UserError

log = logging.getLogger("skippipe")


class WorkerActor:
    """A Ray actor around :func:`skippipe.runtime.worker.serve` (decorated lazily: ray is optional
    at import time)."""

    def __init__(self, env: Dict[str, str]):
        os.environ.update(env)
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

    def __init__(self, cfg: Config, nodes: List[str], addr: str, port: int, secret: str):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        self.cfg, self.nodes, self.addr, self.port = cfg, list(nodes), addr, port
        self.secret = secret  # the control channel's key, handed to each actor's environment
        self.cpus = worker_cpus(cfg, len(nodes), ray.available_resources())
        bundle = {"CPU": self.cpus}
        if cfg.ray.use_gpu:
            bundle["GPU"] = 1
        self.bundle = bundle
        self.pg = placement_group([dict(bundle) for _ in nodes], strategy=cfg.ray.placement_strategy)
        try:
            ray.get(self.pg.ready(), timeout=cfg.runtime.timeout_s * 4)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise UserError(f"the Ray cluster did not place {len(nodes)} workers x {bundle} within "
                            f"{cfg.runtime.timeout_s * 4:.0f} s (strategy {cfg.ray.placement_strategy}); "
                            f"lower ray.num_cpus_per_worker or add machines") from None
        self.bundle_of: Dict[str, Any] = {node: (self.pg, i) for i, node in enumerate(nodes)}
        self.extra_pgs: List[Any] = []
        self.actor_cls = ray.remote(WorkerActor)
        self.actors: Dict[str, Any] = {}
        self.runs: Dict[str, Any] = {}
        self.mailbox = None

    def _env(self, node: str, incarnation: int) -> Dict[str, str]:
        rank = self.nodes.index(node)
        threads = str(self.cfg.run.threads)
        return {"RANK": str(rank), "WORLD_SIZE": str(len(self.nodes)), "LOCAL_RANK": "0",
                "MASTER_ADDR": self.addr, "MASTER_PORT": str(self.port), "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads, "SKIPPIPE_NODE": node, "SKIPPIPE_INCARNATION": str(incarnation),
                "SKIPPIPE_CONTROL_SECRET": self.secret,
                "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")}

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

    def start(self) -> None:
        for node in self.nodes:
            self._spawn(node, 0)

    # -- nodes added to the running job -------------------------------------------------------
    def open_mailbox(self) -> None:
        from skippipe.runtime.join import open_mailbox

        self.mailbox = open_mailbox(self.cfg.run.name)

    def join_requests(self) -> List[Dict[str, Any]]:
        import ray

        return ray.get(self.mailbox.take.remote()) if self.mailbox is not None else []

    def answer(self, request_id: int, status: str, **info) -> None:
        if self.mailbox is not None:
            self.mailbox.update.remote(request_id, status, **info)

    def add(self, node: str, node_ip: str = None) -> None:
        """Start a worker for a node that was not in the topology, in a placement group of its own
        (pinned to the Ray node with IP ``node_ip`` if given). Returns at once: the actor starts
        when the cluster has room, and the worker joins once it reports ready."""
        from ray.util.placement_group import placement_group

        bundle = dict(self.bundle)
        if node_ip:
            bundle[f"node:{node_ip}"] = 0.001
        pg = placement_group([bundle], strategy="PACK")
        self.extra_pgs.append(pg)
        self.nodes.append(node)
        self.bundle_of[node] = (pg, 0)
        self._spawn(node, 0)

    def exited(self) -> Dict[str, int]:
        """node -> exit code (-9 when the actor died) for every worker whose ``run`` has ended."""
        import ray

        refs = list(self.runs.values())
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done = set(done)
        out = {}
        for node, ref in self.runs.items():
            if ref in done:
                try:
                    out[node] = int(ray.get(ref))
                except Exception:  # RayActorError and friends: the actor is gone
                    out[node] = -9
        return out

    def replace(self, node: str, incarnation: int) -> None:
        self.kill(node)
        self._spawn(node, incarnation)

    def kill(self, node: str) -> None:
        import ray

        actor = self.actors.get(node)
        if actor is not None:
            ray.kill(actor, no_restart=True)

    def actor(self, node: str):
        return self.actors[node]

    def stop(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for node in list(self.actors):
            try:
                ray.kill(self.actors[node], no_restart=True)
            except Exception:  # already gone
                pass
        for pg in [self.pg, *self.extra_pgs]:
            remove_placement_group(pg)
        if self.mailbox is not None:
            from skippipe.runtime.join import close_mailbox

            close_mailbox(self.mailbox, self.cfg.run.name)
            self.mailbox = None


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
        ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1")


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
    from skippipe.runtime.control import ControlChannel, connect_store, new_secret
    from skippipe.runtime.coordinator import Coordinator
    from skippipe.runtime.remote import RemoteExecutor
    from skippipe.topology import load_topology
    from skippipe.train.loop import pin_threads

    pin_threads(cfg.run.threads)
    cfg.run.dir = str(resolve_run_dir(cfg))  # the summary and the config.yaml show the real path
    connect_ray(cfg)
    addr = control_address(cfg)
    store = connect_store(addr, cfg.runtime.master_port or 0, True, cfg.runtime.timeout_s)
    secret = new_secret()
    control = ControlChannel(store, cfg.runtime.timeout_s, secret=secret)
    nodes = load_topology(cfg).names()
    launcher = RayLauncher(cfg, nodes, addr, store.port, secret)
    train_ray.last_launcher = launcher  # tests reach the actors through this
    try:
        launcher.open_mailbox()
        launcher.start()
        return Coordinator(cfg, lambda spec, num_stages: RemoteExecutor(cfg, control, len(nodes), launcher)).run()
    finally:
        launcher.stop()
