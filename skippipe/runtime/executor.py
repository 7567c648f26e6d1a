"""The contracts between the coordinator, its executors and the launchers.

An :class:`Executor` runs the coordinator's steps: :class:`~skippipe.runtime.coordinator.InProcessExecutor`
(every stage in this process, the reference) or :class:`~skippipe.runtime.remote.RemoteExecutor`
(worker processes over the control channel). Each step returns a :class:`StepOutcome`, the run ends
with :class:`Finished`, and membership changes (failures, replacements, nodes joining) go through
the same methods for both (in-process, nobody ever fails or joins: :meth:`Executor.admit` admits
nobody). A :class:`WorkerGroup` is what a launcher gives the remote executor: processes it can
start, watch, kill and replace (``launcher=local`` and ``ray``; torchrun starts its ranks itself and
has none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Set

from skippipe.plan import Plan
from skippipe.runtime.wire import NodeReport


@dataclass
class StepOutcome:
    losses: Dict[int, float]
    grad_norm: float
    node_reports: Dict[str, NodeReport] = field(default_factory=dict)  # remote workers' step reports
    leaves: Dict[str, str] = field(default_factory=dict)  # ledger leaves computed in-process
    checkpoint: List[dict] = field(default_factory=list)  # manifest entries of a requested checkpoint
    # node -> {"step", "digests"}: state after the last committed update, reported with this step
    # (also by survivors of failed attempts of it)
    states: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # stage -> where a stage that lost every replica restarted from before this step (routes.jsonl
    # records it in the plan's extra.rebuilt, for the replay)
    rebuilt: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return sum(self.losses[i] for i in sorted(self.losses)) / max(1, len(self.losses))


@dataclass
class Finished:
    """What :meth:`Executor.finish` leaves: the final model is in ``<run>/final``; ``stages`` are the
    trained stages themselves when this process holds them (in-process), else None (read them
    from ``final``); ``reports``: the workers' stop reports (state digests of the last step);
    ``checkpoint``: manifest entries of the checkpoint the stop wrote, if asked."""

    stages: Optional[Dict[int, Any]] = None
    reports: Dict[str, NodeReport] = field(default_factory=dict)
    checkpoint: List[dict] = field(default_factory=list)


@dataclass
class Admission:
    """What :meth:`Executor.admit` did: the nodes it let in (a new generation when any), how long
    each took to start (``admitted_s`` from start to admitted on the coordinator's clock,
    ``process_s`` its process up to ready on its own), and the nodes whose worker ended before it
    could join, with why."""

    joined: List[str] = field(default_factory=list)
    startup: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    failed: Dict[str, str] = field(default_factory=dict)


class Executor(Protocol):
    deferred_state: bool  # state digests of step s arrive with step s+1 (workers commit late)

    def start(self, nodes: List[str], vocab_size: int) -> None: ...

    def resume(self, directory: Path) -> None: ...

    def step(self, plan: Plan, step: int, lr: float, data, checkpoint: Optional[dict] = None,
             meanwhile: Optional[Callable[[Plan], None]] = None, loss_scale: float = 1.0,
             snapshot: Optional[str] = None) -> StepOutcome: ...

    def finish(self, out: Path, checkpoint: Optional[dict] = None) -> Finished: ...

    def close(self) -> None: ...

    def rejected(self) -> Optional[int]:
        """Forged or replayed control values ignored (None: no control channel)."""

    # -- membership (the coordinator's FaultMonitor drives these) --------------------------------
    def new_generation(self, dead: Set[str]) -> None: ...

    def start_replacement(self, node: str, away_from_last: bool = False) -> None: ...

    def join_requests(self) -> List[Dict[str, Any]]: ...

    def answer_join(self, request_id: int, status: str, **info) -> None: ...

    def add_node(self, node: str, spec: Dict[str, Any]) -> None: ...

    def admit(self, allocation: List[List[str]], rebuild: str) -> Admission: ...


class WorkerGroup(Protocol):
    """A launcher's worker processes, one per node (an incarnation > 0 is a replacement)."""

    def start(self) -> None: ...

    def exited(self) -> Dict[str, int]:
        """Nodes whose process ended since it was started, with its exit code."""

    def replace(self, node: str, incarnation: int, away_from_last: bool = False) -> None: ...

    def kill(self, node: str) -> None: ...

    def add(self, node: str, spec: Dict[str, Any]) -> float:
        """Start a worker for a node that was not in the topology (``skippipe join``), or take the
        one ``ray.autojoin`` started when its machine appeared; returns when it was started
        (``time.monotonic()``)."""

    def join_requests(self) -> List[Dict[str, Any]]:
        """Requests to add nodes to the running job that arrived since the last call."""

    def answer(self, request_id: int, status: str, **info) -> None: ...

    def stop(self) -> None: ...
