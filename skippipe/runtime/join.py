"""Adding nodes to a running Ray job: a mailbox actor per run, and the client that writes to it.

A Ray run (``launcher=ray``) creates a small named actor, ``join:<run.name>`` in the Ray namespace
``skippipe``. ``skippipe join RUN --node n6 --region eu`` (or :func:`request_join`) connects to the
cluster from anywhere and leaves a request in it. Before each step the coordinator takes the
requests: it checks the node (a new name, a known region, a stage that fits its memory), puts it in
the topology and the allocation, and starts its worker actor; once the worker is up it joins in a
new generation with its stage copied from a live replica (the same admission as a replacement), and
from then on the plans route microbatches through it. The request's status goes ``queued`` ->
``accepted`` (stage chosen, worker starting) -> ``joined`` (step and generation), or ``rejected``
with the reason; the client waits for ``joined`` unless told not to.

The mailbox lives as long as the driver (not detached), so a finished or crashed run leaves nothing
behind. A second run with the same name on the same cluster is refused at start.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from skippipe.errors import RunFailed, UserError

NAMESPACE = "skippipe"
log = logging.getLogger("skippipe")
AUTOJOIN_POLL_S = 0.5  # ray.autojoin: how often the cluster's Ray nodes are listed


def mailbox_name(run_name: str) -> str:
    return f"join:{run_name}"


class JoinMailbox:
    """The requests of one run (a Ray actor; decorated lazily so ray stays optional at import)."""

    def __init__(self):
        self._ids = itertools.count()
        self.requests: Dict[int, Dict[str, Any]] = {}

    def request(self, spec: Dict[str, Any]) -> int:
        rid = next(self._ids)
        self.requests[rid] = {"id": rid, "spec": dict(spec), "status": "queued", "time": time.time()}
        return rid

    def take(self) -> List[Dict[str, Any]]:
        """Queued requests, oldest first; each is handed out once (its status becomes ``taken``)."""
        out = [dict(r) for r in self.requests.values() if r["status"] == "queued"]
        for r in out:
            self.requests[r["id"]]["status"] = "taken"
        return out

    def update(self, rid: int, status: str, **info) -> None:
        self.requests[rid].update(info, status=status)

    def status(self, rid: int) -> Dict[str, Any]:
        return dict(self.requests[rid])


def node_spec(node: str, region: str, speed: float = 1.0, memory_gb: float = 80.0, stage: Optional[int] = None,
              node_ip: Optional[str] = None) -> Dict[str, Any]:
    """A join request, checked for what can be checked without the run (the rest the run checks)."""
    if not node or not str(node).replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UserError(f"--node {node!r}: give a node name of letters, digits, '-', '_' or '.'")
    if speed <= 0:
        raise UserError(f"--speed {speed}: give a relative speed > 0 (1.0: a typical node)")
    if memory_gb <= 0:
        raise UserError(f"--memory-gb {memory_gb}: give the node's memory in GB (> 0)")
    if stage is not None and stage < 0:
        raise UserError(f"--stage {stage}: give a stage index >= 0, or leave it out to let the run choose")
    return {"name": str(node), "region": str(region), "speed": float(speed), "memory_gb": float(memory_gb),
            "stage": stage, "node_ip": node_ip}


def open_mailbox(run_name: str):
    """The coordinator's side: create this run's mailbox (the driver must be connected to Ray)."""
    import ray

    name = mailbox_name(run_name)
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    else:
        raise UserError(f"run.name={run_name}: a run with this name is already training on this Ray cluster "
                        f"(actor {name} in namespace {NAMESPACE}); give this run another run.name")
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on the driver's own machine: it lives as long as the driver, and the loss of another machine
    # must not take the run's mailbox with it
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(JoinMailbox).options(name=name, namespace=NAMESPACE,
                                                       scheduling_strategy=here).remote()


def close_mailbox(mailbox, run_name: str, timeout_s: float = 10.0) -> None:
    """Kill the mailbox and wait until its name is free again (so the next run may reuse it)."""
    import ray

    ray.kill(mailbox, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(mailbox_name(run_name), namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)


def request_join(run_name: str, spec: Dict[str, Any], address: Optional[str] = None, wait: bool = True,
                 timeout_s: float = 300.0, wait_start_s: float = 0.0) -> Dict[str, Any]:
    """Ask the running run ``run_name`` to add a node; returns the request's last status: ``joined``,
    or ``accepted`` when not ``wait``.

    Connects to Ray (``address``, else RAY_ADDRESS, else ``auto``) unless this process already is.
    Raises :class:`UserError` when no such run is training there or the run rejects the node, and
    :class:`RunFailed` when the node has not got that far within ``timeout_s``. ``wait_start_s``: how
    long to wait for a run that has not started yet (right after ``ray job submit --no-wait``).
    """
    request = submit_join(run_name, spec, address, wait_start_s)
    return wait_join(request, "joined" if wait else "accepted", timeout_s)


def submit_join(run_name: str, spec: Dict[str, Any], address: Optional[str] = None,
                wait_start_s: float = 0.0) -> Dict[str, Any]:
    """Leave the request in the run's mailbox; returns a handle for :func:`wait_join`."""
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    _check_reachable(address)
    if address.split("://")[-1].split(":")[0] in ("127.0.0.1", "localhost") and "ray" not in sys.modules:
        # Ray swaps a loopback address for this host's public IP unless clusters are kept local
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError) as err:
            raise UserError(f"--address {address}: cannot connect to a Ray cluster ({str(err).splitlines()[0]}); "
                            "give the head's address, e.g. --address 127.0.0.1:6379") from None
    deadline = time.monotonic() + wait_start_s
    while True:
        try:
            mailbox = ray.get_actor(mailbox_name(run_name), namespace=NAMESPACE)
            break
        except ValueError:
            if time.monotonic() >= deadline:
                waited = f" (waited {wait_start_s:g} s)" if wait_start_s else ""
                raise UserError(f"no run named '{run_name}' is training on this Ray cluster (with launcher=ray)"
                                f"{waited}; check the run's run.name, or give --wait-start S for a run still "
                                f"starting") from None
            time.sleep(0.5)
    return {"run": run_name, "spec": spec, "mailbox": mailbox, "id": ray.get(mailbox.request.remote(spec))}


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once on a host:port nobody listens on (``ray.init`` would retry for minutes)."""
    import socket

    hostport = address.split("://")[-1]
    if hostport in ("auto", "local") or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as err:
        raise UserError(f"--address {address}: no Ray cluster answers there ({err}); give the head's GCS "
                        "address (host:port, port 6379 unless `ray start --head --port` said otherwise)") from None


def wait_join(request: Dict[str, Any], until: str = "joined", timeout_s: float = 300.0,
              poll_s: float = 0.05) -> Dict[str, Any]:
    """Poll the request's status until it is ``until`` (``accepted`` also ends at ``joined``)."""
    import ray

    run_name, name = request["run"], request["spec"]["name"]
    done = {"accepted": ("accepted", "joined"), "joined": ("joined",)}[until]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status = ray.get(request["mailbox"].status.remote(request["id"]))
        except ray.exceptions.RayActorError:
            raise RunFailed(f"run '{run_name}' ended before node '{name}' joined") from None
        if status["status"] == "rejected":
            raise UserError(f"run '{run_name}' rejected node '{name}': {status.get('reason')}")
        if status["status"] in done:
            return status
        if time.monotonic() > deadline:
            raise RunFailed(f"after {timeout_s:.0f} s node '{name}' is still '{status['status']}' in run "
                            f"'{run_name}' (waited for '{until}'); the request stays with the run")
        time.sleep(poll_s)


class RayJoins:
    """A Ray run's side of joining: its mailbox, and with ``ray.autojoin`` a join request for each
    Ray node that joins the cluster (``ray.join_template``), answered like ``skippipe join``.

    With ``ray.autojoin`` a thread lists the cluster's Ray nodes every :data:`AUTOJOIN_POLL_S` and,
    for a new one, calls ``prestart(spec)`` at once (the launcher starts its worker: a process's
    start-up takes seconds, which then overlap the steps until the coordinator takes the request)
    and leaves the request in the mailbox."""

    def __init__(self, cfg, seen_ray_nodes, prestart: Optional[Callable[[Dict[str, Any]], None]] = None):
        self.cfg = cfg
        self.seen_ray_nodes = set(seen_ray_nodes)  # Ray node ids present at the start (never admitted)
        self.mailbox = None
        self.prestart = prestart
        self.autojoined: Dict[int, str] = {}  # request id -> the node ray.autojoin asked for
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None

    def open(self) -> None:
        self.mailbox = open_mailbox(self.cfg.run.name)
        if self.cfg.ray.autojoin:
            self._watcher = threading.Thread(target=self._watch, name="skippipe-autojoin", daemon=True)
            self._watcher.start()

    def requests(self) -> List[Dict[str, Any]]:
        """The mailbox's new requests (``skippipe join``'s and ``ray.autojoin``'s)."""
        import ray

        if self.mailbox is None:
            return []
        return ray.get(self.mailbox.take.remote())

    def _watch(self) -> None:
        import ray

        while not self._stop.wait(AUTOJOIN_POLL_S):
            try:
                for spec in self._new_ray_nodes():
                    log.warning("ray.autojoin: Ray node %s (%s) joined the cluster; asking to add it as node %s "
                                "(region %s)", spec["ray_node_id"][:8], spec["node_ip"], spec["name"], spec["region"])
                    if self.prestart is not None:
                        self.prestart(spec)
                    self.autojoined[ray.get(self.mailbox.request.remote(spec))] = spec["name"]
            except Exception as err:  # noqa: BLE001 - the cluster or the mailbox going away ends the run anyway
                log.debug("ray.autojoin: listing the cluster failed (%s)", err)

    def _new_ray_nodes(self) -> List[Dict[str, Any]]:
        """Join requests (``ray.join_template``) for the live Ray nodes not seen before."""
        import ray

        template, out = self.cfg.ray.join_template, []
        for info in ray.nodes():
            node_id = info["NodeID"]
            if not info.get("Alive") or node_id in self.seen_ray_nodes:
                continue
            self.seen_ray_nodes.add(node_id)
            region = template.region
            if region == "from-label":
                region = info.get("Labels", {}).get(template.region_label)
                if region is None:
                    log.warning("ray.autojoin: Ray node %s has no label '%s' (ray.join_template.region_label); "
                                "not added", node_id[:8], template.region_label)
                    continue
            stage = None if str(template.stage) == "auto" else int(template.stage)
            spec = node_spec(f"{template.name_prefix}-{node_id[:6]}", region, template.speed, template.memory_gb,
                             stage, node_ip=info.get("NodeManagerAddress"))
            out.append({**spec, "ray_node_id": node_id})
        return out

    def answer(self, request_id: int, status: str, **info) -> None:
        if self.mailbox is not None:
            self.mailbox.update.remote(request_id, status, **info)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10.0)
        if self.mailbox is not None:
            close_mailbox(self.mailbox, self.cfg.run.name)
            self.mailbox = None
