"""The remote executor: drives worker processes (local, torchrun or Ray) over the control channel,
and turns node failures into new generations instead of a stopped run.

Per command it publishes ``cmd/<i>`` (a :class:`~skippipe.runtime.wire.Command`) and gathers
``report/<i>/<node>`` (a :class:`~skippipe.runtime.wire.NodeReport`) from every member. A member that exits (launcher), stops beating
(heartbeats), sends a message that does not match the plan (named by its receiver) or never reports
(timeout) is *dead*: :class:`NodeFailure` tells the coordinator, which re-plans without it and redoes
the step in a new generation. ``commit_step`` makes the optimizer step two-phase: workers hold each
step's reduced gradient and apply it only when the next command declares that step complete, so a
failed step is never half applied. A worker error that is not caused by a peer (a bug) stops the
run with that worker's message (:class:`WorkerFailed`).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Set

from skippipe.config import Config, to_dict
from skippipe.errors import RunFailed, UserError
from skippipe.plan import Plan
from skippipe.runtime.admission import stage_sources, verified_checkpoint
from skippipe.runtime.executor import Admission, Finished, StepOutcome, WorkerGroup
from skippipe.runtime.heartbeats import HeartbeatWatch
from skippipe.runtime.membership import Membership
from skippipe.runtime.wire import Command, NodeReport

log = logging.getLogger("skippipe")
CHECK_EVERY_S = 0.05  # how often the coordinator looks for dead or silent workers while it waits


class WorkerFailed(RunFailed):
    """A worker raised (not because of a peer); the message names the node and the cause."""

    def __init__(self, message: str, node: Optional[str] = None):
        super().__init__(message)
        self.node = node


class NodeFailure(Exception):
    """Nodes died or misbehaved during a step; the step must be redone without them."""

    def __init__(self, dead: Set[str], reasons: Dict[str, str]):
        super().__init__("; ".join(f"{n}: {r}" for n, r in sorted(reasons.items())))
        self.dead = dead
        self.reasons = reasons


def raise_on_failure(reports: Dict[str, NodeReport], dead: Dict[str, str]) -> None:
    """Whom a failed step blames, from the members' reports and the nodes found dead:
    - nodes found dead, and peers named as senders of a bad message, are excluded
      (:class:`NodeFailure`: the step is redone without them);
    - otherwise a worker's own error (not caused by a peer) fails the run (:class:`WorkerFailed`),
      the earliest one if several;
    - errors that only name failed peers while nobody died cannot be blamed on anyone: the earliest
      is reported as the worker's failure."""
    errors = {n: r for n, r in reports.items() if not r.ok}
    if not errors and not dead:
        return
    reasons = dict(dead)
    for node, report in errors.items():
        if report.bad_peer:
            reasons[report.bad_peer] = f"sent a bad message to {node}: {report.message}"
    primary = sorted(((n, r) for n, r in errors.items() if not r.secondary and not r.bad_peer),
                     key=lambda e: e[1].time)
    if primary and not reasons:
        node, report = primary[0]
        raise WorkerFailed(f"worker {node} failed: {report.message}", node)
    if not reasons:  # only errors caused by peers, yet nobody died: cannot tell whom to blame
        node, report = sorted(errors.items(), key=lambda e: e[1].time)[0]
        raise WorkerFailed(f"worker {node} failed: {report.message}", node)
    raise NodeFailure(set(reasons), reasons)


class Doorbell:
    """Wakes the coordinator when every member has reported on a command: a thread blocked in the
    store (on its own connection) until the last reporter sets ``allin/<index>``."""

    def __init__(self, control):
        self.control = control
        self.store = control.doorbell_connection()
        self._thread: Optional[threading.Thread] = None

    def watch(self, index: int, timeout_s: float) -> threading.Event:
        """An event set once every member of command ``index`` reported."""
        rang = threading.Event()
        self._thread = threading.Thread(target=self._block, args=(index, timeout_s, rang), daemon=True,
                                        name="skippipe-doorbell")
        self._thread.start()
        return rang

    def _block(self, index: int, timeout_s: float, rang: threading.Event) -> None:
        try:
            self.store.wait([f"allin/{index}"], timedelta(seconds=timeout_s))
        except RuntimeError:  # timed out: the coordinator's own checks decide
            return
        rang.set()

    def release(self, index: int) -> None:
        """The gather is over: make sure the waiting thread ends before the connection is reused."""
        if self._thread is not None and self._thread.is_alive():
            self.control.ring(index)
            self._thread.join()
        self._thread = None


class RemoteExecutor:
    """An :class:`~skippipe.runtime.executor.Executor` over worker processes. ``launcher``: their
    :class:`~skippipe.runtime.executor.WorkerGroup` (None under torchrun, which starts the ranks
    itself: failures are then seen through reports, heartbeats and timeouts, and nothing is
    replaced or added)."""

    def __init__(self, cfg: Config, control, world_size: int, launcher: Optional[WorkerGroup] = None):
        self.cfg = cfg
        self.control = control
        self.world_size = world_size
        self.launcher = launcher
        self.command_index = 0
        self.membership = Membership([])
        self.commit_step: Optional[int] = None
        self.sync: Dict[int, str] = {}
        self.incarnation: Dict[str, int] = {}
        self.rebuild: Dict[int, List[str]] = {}
        self.origin: Dict[int, Dict[str, Any]] = {}  # stage -> where a stage with no survivor restarts from
        self.restore: Dict[int, str] = {}  # stage -> checkpoint directory its new replica loads
        self.started: Dict[str, float] = {}  # joining node -> when its worker was started (monotonic)
        self.added: List[Dict[str, Any]] = []  # nodes added to the running job: name, region, speed, ...
        # state digests of the last committed step ride on the next command's reports; a command that
        # fails still carried them (survivors report them with their error), so they are kept for
        # the ledger until a command succeeds
        self.carried_states: Dict[str, Dict[str, Any]] = {}
        self.heartbeats = HeartbeatWatch(control, cfg.fault.heartbeat_s)
        self.load_dir: Optional[str] = None  # a checkpoint the next command tells every stage to load
        self.worker_rejected: Dict[str, int] = {}  # node -> forged control values its worker ignored
        self.finished = False
        self._doorbell = Doorbell(control)

    def start(self, nodes: List[str], vocab_size: int) -> None:
        if len(nodes) != self.world_size:
            raise UserError(f"the topology has {len(nodes)} nodes but {self.world_size} workers were started; "
                            f"start exactly {len(nodes)} (e.g. torchrun --nproc_per_node={len(nodes)})")
        self.membership = Membership(nodes)
        for node in nodes:
            self.control.put(f"first/{node}/0", 0)
        self.control.put("config", {"config": to_dict(self.cfg), "nodes": nodes, "vocab_size": vocab_size})

    # -- one step -------------------------------------------------------------------------------
    deferred_state = True  # workers apply (and hash) a step's update when the next command commits it

    def resume(self, directory) -> None:
        """Workers load their stage from this checkpoint directory with the first command."""
        self.load_dir = str(directory)

    def step(self, plan: Plan, step: int, lr: float, data=None, checkpoint: Optional[dict] = None,
             meanwhile: Optional[Callable[[Plan], None]] = None, loss_scale: float = 1.0,
             snapshot: Optional[str] = None):
        """Send the step's command, run ``meanwhile(plan)`` (the coordinator's own work, while the
        workers compute), gather the reports. ``snapshot``: a directory for the parameters as they
        are before the step (``Command.snapshot``)."""
        index = self.command_index
        rebuilt = {str(k): v for k, v in sorted(self.origin.items())}  # the replay must do the same
        self.control.command(index, Command(
            members=self.membership.members, step=step, generation=self.membership.generation, lr=lr, loss_scale=loss_scale,
            plan=plan.to_dict(), commit_step=self.commit_step, sync={str(k): v for k, v in self.sync.items()},
            rebuild={str(k): v for k, v in self.rebuild.items()}, restore={str(k): v for k, v in self.restore.items()},
            checkpoint=checkpoint, load=self.load_dir, added=self.added, snapshot=snapshot))
        self.command_index += 1
        if meanwhile is not None:
            meanwhile(plan)
        reports, dead = self._gather(index)
        self.carried_states.update({n: r.state for n, r in reports.items() if r.state})
        raise_on_failure(reports, dead)
        states, self.carried_states = self.carried_states, {}
        self.load_dir = None
        self.commit_step, self.sync, self.rebuild, self.restore, self.origin = step, {}, {}, {}, {}
        losses = {int(k): v for r in reports.values() for k, v in r.losses.items()}
        missing = sorted({mb.id for mb in plan.microbatches} - set(losses))
        if missing:
            raise WorkerFailed(f"step {step}: no loss came back for microbatches {missing}")
        norm = next(iter(reports.values())).grad_norm
        return StepOutcome(losses, norm, dict(reports), states=states, rebuilt=rebuilt)

    def _gather(self, index: int):
        """Reports from every member, or the members found dead while waiting."""
        timeout_s = self.cfg.runtime.timeout_s * 2
        deadline = time.monotonic() + timeout_s
        pending = set(self.membership.members)
        reports: Dict[str, NodeReport] = {}
        dead: Dict[str, str] = {}
        rang = self._doorbell.watch(index, timeout_s)
        next_check, seen, rung = 0.0, 0, False
        self.heartbeats.start_watching()  # the time between steps was not spent watching
        while pending:
            # read the reports when the doorbell rings: the last member reported, or one failed (the
            # survivors must be told to stop waiting); after a failure's ring, read them whenever the
            # report counter moves. Look for exited or silent workers every CHECK_EVERY_S meanwhile
            # (reading every key of every worker at each check cost the coordinator ~20 ms of CPU
            # per step, and polling the counter at each check ~5 ms, taken from the workers on a
            # shared box)
            now = time.monotonic()
            checking = now >= next_check
            read = False
            if rang.is_set() and not rung:
                rung = read = True
            elif rung and checking:
                count = self.control.reported(index)
                read, seen = count > seen, max(count, seen)
            if read:
                for node in sorted(pending):
                    report = self.control.read_report(index, node)
                    if report is not None:
                        reports[node] = report
                        pending.discard(node)
                seen = max(seen, len(reports))
            if checking:
                next_check = now + CHECK_EVERY_S
                self._find_dead(index, pending, reports, dead)
            failed = dead or any(not r.ok for r in reports.values())
            if failed and not self.control.has(f"abort/{index}"):
                self.control.put(f"abort/{index}", True)  # survivors stop waiting on the failed step
            self.worker_rejected.update({n: r.control_rejected for n, r in reports.items() if r.control_rejected})
            if pending and time.monotonic() > deadline:
                for node in pending:
                    dead[node] = f"sent no report within {timeout_s:.0f} s (runtime.timeout_s)"
                break
            if pending:
                wait_s = max(0.0, next_check - time.monotonic())
                if rung:  # the bell stays rung: wait out the check interval
                    time.sleep(wait_s)
                else:
                    rang.wait(wait_s)
        self._doorbell.release(index)
        return reports, dead

    def _find_dead(self, index: int, pending: Set[str], reports: Dict[str, NodeReport], dead: Dict[str, str]) -> None:
        """Move the pending members whose process exited or whose heartbeat went silent to ``dead``
        (or to ``reports``: one that reported, then ended)."""
        exited = self.launcher.exited() if self.launcher is not None else {}
        for node in sorted(pending & set(exited)):
            report = self.control.read_report(index, node)
            if report is not None:  # it reported, then ended (e.g. after stop)
                reports[node] = report
            else:
                dead[node] = f"process exited with code {exited[node]}"
            pending.discard(node)
        for node in self.heartbeats.silent(pending):
            dead[node] = f"no heartbeat for {self.heartbeats.limit_s:.0f} s"
            pending.discard(node)

    def rejected(self) -> int:
        """``control/rejected``: forged or replayed control values ignored by the coordinator and
        (as last reported) by the workers."""
        return self.control.rejected + sum(self.worker_rejected.values())

    # -- membership -----------------------------------------------------------------------------
    def new_generation(self, dead: Set[str]) -> None:
        """Drop ``dead`` nodes: the step is redone by the survivors in a new generation. A node that
        is still running (it sent a bad message) is stopped."""
        if self.launcher is not None:
            for node in sorted(dead):
                self.launcher.kill(node)
        self.membership.lose(dead)
        self.sync = {}

    def start_replacement(self, node: str, away_from_last: bool = False) -> None:
        """Start a new process for a dead node; it joins once it reports ready (:meth:`admit`).
        ``away_from_last``: the last one died before joining; the launcher places this one elsewhere
        if it can."""
        if self.launcher is None:
            return
        self.incarnation[node] = self.incarnation.get(node, 0) + 1
        self.started[node] = time.monotonic()
        self.launcher.replace(node, self.incarnation[node], away_from_last)
        self.membership.joins(node, self.incarnation[node])

    def join_requests(self) -> List[Dict[str, Any]]:
        """Requests to add nodes to the running job (``skippipe join``) that reached the launcher."""
        return self.launcher.join_requests() if self.launcher is not None else []

    def answer_join(self, request_id: int, status: str, **info) -> None:
        self.launcher.answer(request_id, status, **info)

    def add_node(self, node: str, spec: Dict[str, Any]) -> None:
        """Start a worker for a node that was not in the topology; it joins once ready (:meth:`admit`).
        Workers learn its region and speed from the commands (``added``), for the link emulator."""
        self.membership.add(node)
        self.added.append(dict(spec))
        self.incarnation[node] = 0
        self.started[node] = self.launcher.add(node, spec)  # ray.autojoin may have started it already
        self.membership.joins(node, 0)

    def admit(self, allocation: List[List[str]], rebuild: str) -> Admission:
        """Let every ready replacement (or new node) into a new generation. Its stage state comes
        from a live replica; when none is alive, from ``rebuild`` (``init``: the seeded initial
        parameters; ``checkpoint``: the newest verified checkpoint; ``checkfree``: the average of the
        neighbouring stages, CheckFree arXiv 2506.15461)."""
        joining = self.membership.joining
        admission = Admission()
        exited = self.launcher.exited() if self.launcher is not None and joining else {}
        for node in sorted(set(joining) & set(exited)):
            if not self.control.has(f"ready/{node}/{joining[node]}"):
                self.membership.abandon(node)
                admission.failed[node] = f"its worker exited with code {exited[node]} before it could join"
                log.warning("node %s: %s", node, admission.failed[node])
        ready = [n for n, inc in sorted(joining.items()) if self.control.has(f"ready/{n}/{inc}")]
        if not ready:
            return admission
        for node in ready:
            incarnation = joining[node]
            info = self.control.get_now(f"ready/{node}/{incarnation}")
            admission.startup[node] = {
                "admitted_s": round(time.monotonic() - self.started.pop(node, time.monotonic()), 3),
                "process_s": info.get("process_s") if isinstance(info, dict) else None}
            self.control.put(f"first/{node}/{incarnation}", self.command_index)
        live = set(self.membership.members)
        self.membership.admit(ready)
        admission.joined = ready
        sources = stage_sources(ready, allocation, live, rebuild, lambda k: verified_checkpoint(self.cfg, k))
        self.sync, self.rebuild, self.restore, self.origin = (sources.sync, sources.rebuild, sources.restore,
                                                              sources.origin)
        return admission

    # -- end ------------------------------------------------------------------------------------
    def finish(self, out, checkpoint: Optional[dict] = None) -> Finished:
        """Commit the last step, write the final model (and a requested checkpoint), stop the workers."""
        index = self.command_index
        self.control.command(index, Command(members=self.membership.members, stop=True, save_dir=str(out),
                                            commit_step=self.commit_step, checkpoint=checkpoint))
        self.command_index += 1
        reports, dead = self._gather(index)
        if dead:
            raise RunFailed(f"workers {sorted(dead)} failed while saving the final model: "
                            + "; ".join(f"{n}: {why}" for n, why in sorted(dead.items())))
        self.finished = True
        return Finished(None, reports, [r.ckpt for r in reports.values() if r.ckpt])

    def close(self) -> None:
        """If the run did not finish, tell every worker to exit instead of waiting for a command."""
        if not self.finished:
            self.control.command(self.command_index, Command(abort="the coordinator stopped (see its error)"))
