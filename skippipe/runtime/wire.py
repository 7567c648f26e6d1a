"""What the coordinator and the workers say to each other over the control channel, typed.

``cmd/<i>`` holds a :class:`Command`, ``report/<i>/<node>`` a :class:`NodeReport`. On the wire both
are JSON objects with the field names below (``routes.jsonl`` keeps each step's reports, cut to
:data:`TIMING_KEYS`, as ``timings``); everywhere else they are these classes, so a reader sees every
field in one place and a misspelt key fails at once instead of reading as absent.

A decoded message keeps only the fields named here: an older or forged value with extra keys loses
them, one with missing keys gets the defaults (a report without ``ok`` is a failure).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Type, TypeVar

T = TypeVar("T")

# what a worker report keeps in routes.jsonl (``timings``): enough to replay the predictor
TIMING_KEYS = ("compute_s", "compute_n", "compute_cpu_s", "recv_wait_s", "emulated_delay_s", "reduce_s", "step_s",
               "links", "cpu_s", "sent_bytes", "sent_messages", "peak_rss_mb", "base_rss_mb")


def _encode(message) -> Dict[str, Any]:
    """The message's fields, shallow: their values are JSON already (``dataclasses.asdict`` deep-copied
    every step's plan: 0.3 ms of the coordinator's CPU per command of a 4-node plan, 0.03 ms now)."""
    return {f.name: getattr(message, f.name) for f in fields(message)}


def _decode(cls: Type[T], data: Dict[str, Any]) -> T:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Command:
    """``cmd/<i>``: what every member does next. A training step (``plan`` set), the stop (``stop``:
    commit, write the final model to ``save_dir``, exit) or an abort (``abort``: the reason).

    Before the step a member applies the update of ``commit_step`` (the last step the coordinator
    declared complete), joins ``generation`` with ``members`` if it changed, and takes a new
    replica's state: stage -> source node (``sync``), -> neighbouring nodes to average (``rebuild``,
    CheckFree) or -> checkpoint directory (``restore``). ``load``: a checkpoint every stage loads
    (resume); ``checkpoint``: ``{step, dir}`` to write the state as it is before this step;
    ``added``: nodes that joined the running job (name, region, speed, memory_gb), for the link
    emulator; ``snapshot``: a directory for the parameters as they are before this step
    (``train.eval_every``: the coordinator validates them)."""

    members: List[str] = field(default_factory=list)
    step: Optional[int] = None
    generation: int = 0
    lr: float = 0.0
    loss_scale: float = 1.0
    plan: Optional[Dict[str, Any]] = None  # a skippipe.plan.v1 object
    commit_step: Optional[int] = None
    sync: Dict[str, str] = field(default_factory=dict)
    rebuild: Dict[str, List[str]] = field(default_factory=dict)
    restore: Dict[str, str] = field(default_factory=dict)
    checkpoint: Optional[Dict[str, Any]] = None
    load: Optional[str] = None
    added: List[Dict[str, Any]] = field(default_factory=list)
    snapshot: Optional[str] = None
    stop: bool = False
    save_dir: Optional[str] = None
    abort: Optional[str] = None

    def to_wire(self) -> Dict[str, Any]:
        return _encode(self)

    @classmethod
    def from_wire(cls, data: Dict[str, Any]) -> "Command":
        return _decode(cls, data)

    def paths(self) -> List[str]:
        """Every directory the command names (each must lie inside the run directory)."""
        named = [self.save_dir, (self.checkpoint or {}).get("dir"), self.load, self.snapshot, *self.restore.values()]
        return [p for p in named if p is not None]


@dataclass
class NodeReport:
    """``report/<i>/<node>``: one member's answer to a command.

    Every report may carry ``state`` (digests after the last committed update, ``{step, digests}``)
    and ``ckpt`` (its manifest entry of a requested checkpoint). A step's report (``ok``) carries
    the losses of the microbatches this node originated, its ledger ``leaves`` and what it measured:
    per phase (F, L, B) compute wall seconds, CPU seconds and counts, the gradient reduction, time
    blocked in receives, emulated link delay, link estimates (src -> latency_s, bytes_per_s, n), the
    step's duration, bytes and messages sent, and memory. A failure (not ``ok``) carries the
    ``message``, the ``peer`` involved, whether it was caused by a failed peer (``secondary``), the
    peer that sent a message that does not match the plan (``bad_peer``) and when (``time``)."""

    ok: bool = False
    node: str = ""
    stage: Optional[int] = None
    state: Optional[Dict[str, Any]] = None
    ckpt: Optional[Dict[str, Any]] = None
    stopped: bool = False
    control_rejected: int = 0  # forged or replayed control values this worker ignored so far
    # a step
    losses: Dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    leaves: Dict[str, str] = field(default_factory=dict)
    compute_s: Dict[str, float] = field(default_factory=dict)
    compute_n: Dict[str, int] = field(default_factory=dict)
    compute_cpu_s: Dict[str, float] = field(default_factory=dict)
    reduce_s: float = 0.0
    recv_wait_s: float = 0.0
    emulated_delay_s: float = 0.0
    links: Dict[str, Dict[str, float]] = field(default_factory=dict)
    step_s: Optional[float] = None
    cpu_s: float = 0.0  # the whole process since its previous report
    sent_bytes: int = 0
    sent_messages: int = 0
    peak_rss_mb: float = 0.0
    base_rss_mb: Optional[float] = None  # before the first step: the process, its stage and groups
    # a failure
    message: str = ""
    peer: Optional[str] = None
    secondary: bool = False
    bad_peer: Optional[str] = None
    time: float = 0.0

    def to_wire(self) -> Dict[str, Any]:
        return _encode(self)

    @classmethod
    def from_wire(cls, data: Dict[str, Any]) -> "NodeReport":
        return _decode(cls, data)

    def timings(self) -> Dict[str, Any]:
        """What ``routes.jsonl`` keeps of a step's report (``timings``): :data:`TIMING_KEYS`."""
        return {k: getattr(self, k) for k in TIMING_KEYS}

    @classmethod
    def from_timings(cls, data: Dict[str, Any]) -> "NodeReport":
        """A recorded step report (``routes.jsonl`` ``timings``) as the coordinator saw it."""
        return _decode(cls, {**data, "ok": True})

    @property
    def measured(self) -> bool:
        """Did this report measure a step (a failure or a stop did not)?"""
        return self.step_s is not None
