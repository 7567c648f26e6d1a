"""The worker: one node holding one pipeline stage. Launcher-agnostic.

Reads the torchrun environment contract (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
MASTER_PORT is the coordinator's control store), so ``launcher=local``, torchrun and Ray actors all
run this same code. ``SKIPPIPE_NODE`` names the node (a replacement joins under the name of the node
it replaces); otherwise the node is the RANK-th of the coordinator's node list.

Each command carries a generation (the membership epoch), the step's plan and learning rate. The
worker (1) applies the update of the last step the coordinator declared complete (``commit_step``),
so no optimizer step is ever half applied across replicas, (2) rebuilds its process group when the
generation changed (copying stage state to a new replica if told), then (3) runs, in the plan's
per-node order, the actions that concern it: receive activations, forward, send on (or back to the
originator), loss at the originator, backward along the exact reverse path, and reduces its stage's
gradient with the stage's replicas in allocation order (global-norm clip summed in stage order). It
reports measured times and losses, or the error that stopped it, and waits for the next command.

Run as ``python -m skippipe.runtime.worker`` with those variables set.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from skippipe.plan import Plan
from skippipe.runtime import node_state
from skippipe.runtime.control import ControlChannel, connect_store
from skippipe.runtime.groups import GenerationGroups
from skippipe.runtime.inject import FaultInjector
from skippipe.runtime.node_step import NodeStep, PendingUpdate, peak_rss_mb
from skippipe.runtime.transport import Aborted, LinkModel, TransportError, Waiter
from skippipe.runtime.wire import Command, NodeReport
from skippipe.train import compute
from skippipe.verify.leaves import state_digests

log = logging.getLogger("skippipe.worker")

_PEER_FAILURE_WORDS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                       "Connection refused", "timed out", "Timed out", "aborted")


@dataclass
class WorkerEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    node: Optional[str] = None  # SKIPPIPE_NODE
    incarnation: int = 0  # SKIPPIPE_INCARNATION: 0 for an original node, >0 for a replacement
    restart: int = 0  # TORCHELASTIC_RESTART_COUNT: >0 after torchrun restarted the group

    @classmethod
    def from_environ(cls, environ=os.environ) -> "WorkerEnv":
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in environ]
        if missing:
            raise RuntimeError(f"worker: environment variables {', '.join(missing)} are not set "
                               "(start workers with skippipe train, torchrun or the Ray launcher)")
        return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)),
                   environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), environ.get("SKIPPIPE_NODE"),
                   int(environ.get("SKIPPIPE_INCARNATION", "0")), int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")))

    @property
    def fresh(self) -> bool:
        """The first life of this node: injected faults apply only here, never to a replacement or
        a restarted group (they would repeat forever)."""
        return self.incarnation == 0 and self.restart == 0


class Worker:
    """Lifecycle: connect -> (per generation) setup -> step ... -> save -> close."""

    def __init__(self, env: WorkerEnv, control: ControlChannel):
        self.env = env
        self.control = control
        message = control.wait_for("config")
        from skippipe.config import from_dict

        self.cfg = from_dict(message["config"])
        self.nodes: List[str] = message["nodes"]
        self.vocab_size: int = message["vocab_size"]
        self.me = env.node or self.nodes[env.rank]
        self.device = self._device()
        self.stage = None
        self.stage_id: Optional[int] = None
        self.command_index = 0
        self.groups = GenerationGroups(self.me, self.device, self.cfg.runtime.timeout_s, Waiter(), self._aborted)
        self.faults = FaultInjector(self.cfg.fault, self.me, env.fresh)
        self.pending: Optional[PendingUpdate] = None
        self.level = self.cfg.verify.level
        self.state_report: Optional[Dict[str, Any]] = None  # digests after the last committed update
        self._link_names: List[str] = []
        self.base_rss_mb: Optional[float] = None

    @property
    def generation(self) -> int:
        return self.groups.generation

    def _device(self) -> torch.device:
        from skippipe.process import resolve_device

        name = resolve_device(self.cfg.train.device)
        if name == "cuda":  # one device per LOCAL_RANK
            torch.cuda.set_device(self.env.local_rank)
            return torch.device("cuda", self.env.local_rank)
        return torch.device(name)

    # -- membership -----------------------------------------------------------------------------
    def setup(self, command: Command, plan: Plan) -> None:
        """Join generation ``command.generation``: build the stage if new, form the process
        groups of the live members, and copy stage state to new replicas if the command says so."""
        from skippipe.model.presets import resolve_model_spec
        from skippipe.model.transformer import build_stages
        from skippipe.train.optim import make_optimizer

        self.close()
        cfg = self.cfg
        self.spec = resolve_model_spec(cfg.model, vocab_size=self.vocab_size)
        self.stage_id = plan.stage_of().get(self.me)
        if self.stage_id is not None and (self.stage is None or self.stage.stage_id != self.stage_id):
            self.stage = build_stages(self.spec, plan.num_stages, cfg.run.seed, only=[self.stage_id])[self.stage_id]
            self.stage.to(self.device)
            self.optimizer = make_optimizer(self.stage, cfg.train)
        self.mode = compute.mode_of(cfg.train, self.device)
        if self.stage_id == 0 and not hasattr(self, "data"):
            from skippipe.data import load_data

            self.data = load_data(cfg.data)
        backend = cfg.runtime.backend
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.groups.form(backend, self.control.raw, plan, self.stage_id, command.members, command.generation,
                         self._links(command.added))
        self._copy_stages(command, plan)
        if self.base_rss_mb is None:  # before the first step: the process, its stage and groups
            self.base_rss_mb = peak_rss_mb()

    def _links(self, added: List[Dict[str, Any]]) -> Optional[LinkModel]:
        """The emulated links (``cost.emulate_links``) of the topology and the nodes added to the
        running job (``skippipe join``); None without emulation."""
        if not self.cfg.cost.emulate_links:
            return None
        from skippipe.topology import Node, load_topology

        topo = load_topology(self.cfg)
        for a in added:
            topo = topo.with_node(Node(a["name"], a["region"], a["speed"], a["memory_gb"]))
        self._link_names = topo.names()
        return LinkModel(topo.latency_s, topo.bandwidth_bytes_per_s)

    def _copy_stages(self, command: Command, plan: Plan) -> None:
        """A new replica's stage: copied from a live one (``sync``), rebuilt from its neighbours
        (``rebuild``, CheckFree) or loaded from a verified checkpoint (``restore``)."""
        for stage, source in sorted(command.sync.items()):
            if self.stage_id == int(stage) and self.groups.stage_group is not None:
                node_state.sync_stage(self.groups, self.stage, self.optimizer, source)
        for stage, sources in sorted(command.rebuild.items()):
            node_state.rebuild_stage(self.groups, self.me, self.stage, self.stage_id, int(stage), sources, plan,
                                     self.spec.n_layers)
        restore = command.restore.get(str(self.stage_id))
        if restore:  # this stage lost every replica: load it from a verified checkpoint
            self.load_checkpoint(restore)

    def _aborted(self) -> bool:
        """Has the coordinator abandoned the command being executed?"""
        return self.control.has(f"abort/{self.command_index}")

    # -- one step -------------------------------------------------------------------------------
    def commit(self, commit_step: Optional[int]) -> None:
        """Apply the pending update if its step is the one the coordinator declared complete;
        drop it if it belongs to a step that is being redone."""
        from skippipe.train.optim import apply_step

        pending, self.pending = self.pending, None
        if pending is not None and commit_step is not None and pending.step == commit_step:
            apply_step(self.stage, self.optimizer, pending.grad, pending.scale, pending.lr)
            if self.faults.corrupting(pending.step, "param"):
                with torch.no_grad():
                    next(self.stage.parameters()).view(-1)[0] += 1e-3
            if self.level != "off":
                self.state_report = {"step": pending.step, "digests": state_digests(self.stage, self.optimizer)}

    def step(self, plan: Plan, step: int, lr: float, loss_scale: float = 1.0) -> NodeReport:
        self.faults.start_step(step, self.groups.transport.links, self._link_names)
        run = NodeStep(self, plan, step, loss_scale)
        report = run.run(lr)
        self.pending = run.pending
        report.cpu_s, report.control_rejected = self._cpu_since_last_report(), self.control.rejected
        return report

    def _cpu_since_last_report(self) -> float:
        """CPU seconds of this whole process (every thread) since its previous step report: the
        step and the wait for its command (benchmarks compare it with other systems' per rank)."""
        now = time.process_time()
        spent, self._cpu_mark = now - getattr(self, "_cpu_mark", now), now
        return spent

    # -- state on disk ----------------------------------------------------------------------------
    def take_state_report(self) -> Optional[Dict[str, Any]]:
        report, self.state_report = self.state_report, None
        return report

    def save_checkpoint(self, plan: Optional[Plan], step: int, directory: str,
                        members: List[str]) -> Optional[Dict[str, Any]]:
        """The first live replica of each stage writes ``stage<k>.pt`` and returns its manifest
        entry. ``members``: the command's (after a failure, the dead replica is no longer the first)."""
        if self.stage is None or plan is None or node_state.first_live_replica(plan, self.stage_id, members) != self.me:
            return None
        return {**node_state.save_checkpoint(self.stage, self.optimizer, self.stage_id, step, directory),
                "node": self.me}

    def check_paths(self, command: Command) -> None:
        from skippipe.config import run_dir

        check_command_paths(command, run_dir(self.cfg))

    def load_checkpoint(self, directory: str) -> None:
        """Load this stage's parameters and optimizer state (every replica reads the same file)."""
        if self.stage is not None:
            node_state.load_checkpoint(self.stage, self.optimizer, self.stage_id, directory)

    def save_final(self, plan: Plan, out_dir: str) -> None:
        """The first live replica of each stage writes its parameters (tensors only) for eval."""
        from pathlib import Path

        self.save_params(plan, Path(out_dir) / "final", self.groups.rank_of)

    def save_params(self, plan: Optional[Plan], target, live) -> None:
        """The first replica in ``live`` of each stage writes ``target/stage<k>.pt`` (parameters)."""
        from pathlib import Path

        if self.stage is not None and plan is not None and node_state.first_live_replica(plan, self.stage_id, live) == self.me:
            node_state.save_final({self.stage_id: self.stage}, Path(target))

    def close(self) -> None:
        """Drop this generation's groups (:meth:`GenerationGroups.close`)."""
        self.groups.close()


def check_command_paths(command: Command, run_directory) -> None:
    """Every path a command names (final model, checkpoint, load, restore) must lie inside the run's
    directory: commands are authenticated, and even so a worker never writes or reads elsewhere."""
    from pathlib import Path

    root = Path(run_directory).resolve()
    for path in command.paths():
        if not Path(path).resolve().is_relative_to(root):
            raise RuntimeError(f"refusing a command path outside the run directory {root}: {path}")


def describe_error(err: BaseException, node: str) -> NodeReport:
    """``node``'s failure report, one line. ``secondary`` marks errors caused by a failed peer (not
    to be blamed); ``bad_peer`` names a peer that sent a message that does not match the plan."""
    text = str(err).splitlines()[0] if str(err) else ""
    peer = err.peer if isinstance(err, TransportError) else None
    bad_message = isinstance(err, TransportError) and "bad message" in text
    secondary = ((peer is not None and not bad_message) or isinstance(err, Aborted)
                 or any(w in str(err) for w in _PEER_FAILURE_WORDS))
    return NodeReport(ok=False, node=node, message=f"{type(err).__name__}: {text}", peer=peer, secondary=secondary,
                      bad_peer=peer if bad_message else None, time=time.time())


def _heartbeat(control_addr, port, namespace, name, period_s, stop: threading.Event) -> None:
    """A separate store connection, so a worker stuck in compute or a receive still beats. A failed
    beat reconnects (a thread that died on one store error silenced a healthy worker); the thread
    ends with the process."""
    channel = None
    while not stop.wait(period_s):
        try:
            if channel is None:
                channel = ControlChannel(connect_store(control_addr, port, False, 30.0), 30.0, namespace)
            channel.heartbeat(name)
        except Exception as err:  # noqa: BLE001 - the coordinator may be gone; the main loop will notice
            log.debug("heartbeat of %s failed (%s); reconnecting", name, err)
            channel = None


def _process_age_s() -> Optional[float]:
    """Seconds since this process (a Ray actor: its constructor) started: its start-up cost,
    reported with ``ready``."""
    if os.environ.get("SKIPPIPE_STARTED_AT"):  # a Ray actor may run in a process Ray started earlier
        return round(time.time() - float(os.environ["SKIPPIPE_STARTED_AT"]), 3)
    try:
        import psutil

        return round(time.time() - psutil.Process().create_time(), 3)
    except Exception:  # noqa: BLE001 - informative only
        return None


def serve(env: WorkerEnv, control: ControlChannel, namespace: str = "") -> None:
    """The worker loop: wait for each command, run it, report; stop when told."""
    from skippipe.process import set_host_memory

    worker = Worker(env, control)
    torch.set_num_threads(worker.cfg.run.threads)
    set_host_memory(worker.cfg.runtime.host_memory)
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(env.master_addr, env.master_port, namespace, worker.me,
                                              worker.cfg.fault.heartbeat_s, stop), daemon=True).start()
    control.put(f"ready/{worker.me}/{env.incarnation}", {"time": time.time(), "process_s": _process_age_s()})
    index = control.wait_for(f"first/{worker.me}/{env.incarnation}", timeout_s=worker.cfg.runtime.timeout_s * 4)
    plan: Optional[Plan] = None
    try:
        while True:
            command = control.wait_command(index, timeout_s=worker.cfg.runtime.timeout_s * 4)
            worker.command_index = index
            if command.abort:
                raise RuntimeError(f"the coordinator aborted the run: {command.abort}")
            if worker.me not in command.members:
                return  # excluded from the new generation
            plan, stopped = _execute(worker, command, plan, index)
            if stopped:
                return
            index += 1
    finally:
        stop.set()
        worker.close()


def _execute(worker: Worker, command: Command, plan: Optional[Plan], index: int):
    """Run one command and report on it: (the plan now in use, whether the command was the stop).
    A failure is reported (blamed on a peer or not, :func:`describe_error`) and this generation's
    groups are dropped; the worker then waits for the next command."""
    control = worker.control
    expected = len(command.members)  # the last of them to report rings the doorbell
    state, ckpt = None, None
    try:
        worker.check_paths(command)
        worker.commit(command.commit_step)
        state = worker.take_state_report()
        if command.checkpoint:
            ckpt = worker.save_checkpoint(plan, command.checkpoint["step"], command.checkpoint["dir"], command.members)
        if command.snapshot:
            worker.save_params(plan, command.snapshot, command.members)
        if command.stop:
            if plan is not None and command.save_dir:
                worker.save_final(plan, command.save_dir)
            control.report(index, NodeReport(ok=True, node=worker.me, stopped=True, state=state, ckpt=ckpt), expected)
            return plan, True
        plan = Plan.from_dict(command.plan)
        if command.generation != worker.generation:
            worker.setup(command, plan)
        if command.load:
            worker.load_checkpoint(command.load)
        report = worker.step(plan, command.step, command.lr, command.loss_scale)
        report.state, report.ckpt = state, ckpt
        control.report(index, report, expected)
    except Exception as err:  # report, drop this generation's groups, wait for the next command
        report = describe_error(err, worker.me)
        report.state, report.ckpt = state or worker.take_state_report(), ckpt
        control.report(index, report, expected)
        if report.secondary:  # caused by a peer: one line; the coordinator names the cause
            log.warning("step abandoned: %s", report.message[:200])
        else:
            traceback.print_exc(file=sys.stderr)
        worker.close()
    return plan, False


def run_worker(env: WorkerEnv, control: ControlChannel, namespace: str = "") -> int:
    try:
        serve(env, control, namespace)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        return 1
    return 0


def main() -> int:
    threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(threads))
    env = WorkerEnv.from_environ()
    logging.basicConfig(level=logging.WARNING, format=f"[{env.node or env.rank}] %(levelname)s %(message)s")
    namespace = os.environ.get("SKIPPIPE_NAMESPACE", "")
    control = ControlChannel(connect_store(env.master_addr, env.master_port, False, 60.0), 60.0, namespace)
    code = run_worker(env, control, namespace)
    # skip interpreter teardown: a receive abandoned after a failure may still block in a helper thread
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
