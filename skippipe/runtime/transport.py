"""Point-to-point tensors between nodes, with an optional geo-link emulator.

Each message is a fixed-size float64 header (magic, step, microbatch, kind, dtype, shape, send time)
followed by the payload, both sent asynchronously under the same tag so that sends never block
(a node can send to a peer that is itself sending). The process group is an explicit object of the
current generation, so a new generation never has to tear down a group that a stuck operation
still uses. The receiver checks the header against what the
plan says it expects, so a peer that sends the wrong step, microbatch, kind, shape or dtype is reported
by name instead of corrupting training.

Link emulation (``cost.emulate_links``): a message from node a to node b is handed to the receiver no
earlier than ``latency(a, b) + bytes / bandwidth(a, b)`` after it was sent, FIFO per link, so a
geo-distributed topology runs on one box (``tc netem`` is not needed). The receiver does the waiting,
using the sender's timestamp from the header (one clock: all emulated nodes share a machine). A
stage's gradient collective waits what a ring all-reduce over its slowest link takes
(:meth:`Transport.emulate_allreduce`), as the simulator assumes. ``LinkModel.factor`` slows a link
(``fault.slow_links``: latency and serialisation both times the factor, both directions).

Measured links: every received message gives two one-way times, of its header (a few bytes: the
latency) and of its payload (latency + bytes / bandwidth), from the sender's timestamp to the moment
the receiver holds it. A time only counts when the receiver was already waiting (it posted the
receive before the message was sent, or it slept for the emulated delivery): otherwise it measures
the receiver being busy. :func:`link_estimates` takes the fastest of a step's times per link, robust
to queueing and scheduling noise; the coordinator folds them into the cost model (EWMA). The same
code measures real networks; their one-way latency is then only as good as the machines' clock
sync (the bandwidth, a difference of two times, is not affected).

Gloo matches messages by (source, tag); tags are unique per (microbatch, kind) inside a step and
steps are separated by the gradient collectives, so arrival order does not matter. NCCL ignores tags
and matches in order per pair: the plan's per-node order keeps sends and receives of one pair in the
same order, and the header check turns any mismatch into a clear error.

When headers are checked: by default as each message arrives (one copy of its 12 numbers to the
host). On a GPU without link emulation that copy would synchronise the host with the device at
every receive, so there (``check_each=False``) the headers stay on the device until
:meth:`Transport.check_received`, which the step calls once before its gradients are reduced: one
host copy per step, and a bad message still fails the step before any parameter changes. The
receiver never needs a header to receive: shape and dtype come from the plan.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Deque, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

MAGIC = 5_170_117.0
ACT, GRAD = 0, 1
KIND_NAMES = {ACT: "activation", GRAD: "gradient"}
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
HEADER_LEN = 12  # magic, step, microbatch, kind, dtype, ndim, d0..d4, send_time
# receives posted ahead of use (gloo): enough that the next message lands while this one is computed
# on, few enough that the buffers add little to a node's activation memory
PREPOST_WINDOW = 2


class TransportError(RuntimeError):
    """A peer failed, timed out, or sent a message that does not match the plan."""

    def __init__(self, message: str, peer: Optional[str] = None):
        super().__init__(message)
        self.peer = peer


class Aborted(RuntimeError):
    """The coordinator abandoned the step (a node failed elsewhere); stop waiting."""


@dataclass
class Ticket:
    """Works handed to the :class:`Waiter` in one go: when the helper thread began waiting for them
    (after every earlier ticket), when each completed, the error that stopped the rest."""

    works: list
    began: float = 0.0
    finished: List[float] = field(default_factory=list)
    error: Optional[BaseException] = None
    done: threading.Event = field(default_factory=threading.Event)


class Waiter:
    """Runs blocking ``work.wait()`` calls on a helper thread, so the caller can give up.

    Gloo's point-to-point works cannot be polled (``is_completed`` stays false until ``wait``, and
    ``get_future`` is not implemented) and ``ProcessGroup.abort`` does not release a blocked receive
    (all measured with torch 2.13). A peer that is alive but stopped (it failed elsewhere, or hangs)
    would hold the worker until the group timeout. Here the caller waits on an event, checking every
    0.2 s whether the coordinator abandoned the step; if so the blocked thread is left to time out on
    the discarded group and a fresh thread serves the next generation.

    Tickets are served in the order they are submitted, so a receive can be submitted before the
    caller needs it (:meth:`Transport.expect`): when the caller gets there it usually finds the
    ticket done and does not block at all.
    """

    def __init__(self):
        self._start()

    def _start(self) -> None:
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        threading.Thread(target=self._serve, args=(self._jobs,), daemon=True, name="skippipe-wait").start()

    def restart(self) -> None:
        """Abandon the tickets not yet served (a failed step's receives): a fresh thread serves the next."""
        self._start()

    @staticmethod
    def _serve(jobs) -> None:
        while True:
            ticket = jobs.get()
            ticket.began = time.time()
            try:
                for work in ticket.works:
                    work.wait()
                    ticket.finished.append(time.time())
            except BaseException as err:  # handed to the caller
                ticket.error = err
            ticket.done.set()

    def submit(self, works: list) -> Ticket:
        ticket = Ticket(works)
        self._jobs.put(ticket)
        return ticket

    def join(self, ticket: Ticket, timeout_s: float, should_abort: Optional[Callable[[], bool]] = None,
             what: str = "operation") -> None:
        """Wait until ``ticket`` is served; abandoning the step or the timeout raise."""
        if ticket.done.is_set():
            return
        deadline = time.monotonic() + timeout_s
        while not ticket.done.wait(0.2):
            if should_abort is not None and should_abort():
                self._start()
                raise Aborted(f"step abandoned by the coordinator while waiting for {what}")
            if time.monotonic() > deadline:
                self._start()
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def wait(self, work, timeout_s: float, should_abort: Optional[Callable[[], bool]] = None,
             what: str = "operation") -> None:
        _, error = self.wait_all([work], timeout_s, should_abort, what)
        if error is not None:
            raise error

    def wait_all(self, works: list, timeout_s: float, should_abort: Optional[Callable[[], bool]] = None,
                 what: str = "operation") -> Tuple[List[float], Optional[BaseException]]:
        """Wait for ``works`` in order with one hand-off to the helper thread (a step's sends).
        Returns the wall-clock time each one completed and the error that stopped the rest (None:
        all done); abandoning the step or the timeout raise."""
        ticket = self.submit(works)
        self.join(ticket, timeout_s, should_abort, what)
        return ticket.finished, ticket.error


@dataclass
class LinkModel:
    """One-way latency (s) and bandwidth (bytes/s) between two node names."""

    latency_s: Callable[[str, str], float]
    bandwidth_bytes_per_s: Callable[[str, str], float]
    factor: Callable[[str, str], float] = lambda a, b: 1.0  # noqa: E731 (fault.slow_links, set per step)


@dataclass
class LinkSample:
    """One received message: one-way seconds of its header and payload (None: the receiver was
    busy, not waiting, so the time says nothing about the link)."""

    src: str
    header_s: Optional[float]
    payload_s: Optional[float]
    nbytes: int


def link_estimates(samples: List[LinkSample]) -> Dict[str, Dict[str, float]]:
    """``src -> {latency_s, bytes_per_s, n}`` from one step's samples of the links into a node:
    the fastest header time is the latency, the fastest payload-minus-header time per byte the
    inverse bandwidth (queueing and a busy host only ever add time)."""
    out: Dict[str, Dict[str, float]] = {}
    for src in sorted({s.src for s in samples}):
        mine = [s for s in samples if s.src == src]
        headers = [s.header_s for s in mine if s.header_s is not None]
        per_byte = [max(s.payload_s - s.header_s, 1e-7) / s.nbytes for s in mine
                    if s.header_s is not None and s.payload_s is not None and s.nbytes > 0]
        if not headers or not per_byte:
            continue
        out[src] = {"latency_s": max(0.0, min(headers)), "bytes_per_s": 1.0 / min(per_byte), "n": len(per_byte)}
    return out


def message_tag(microbatch_id: int, kind: int) -> int:
    return 2 * microbatch_id + kind + 1


class Transport:
    """Tagged tensors between named nodes over a torch.distributed process group."""

    def __init__(self, pg, rank_of: Dict[str, int], me: str, device: torch.device, timeout_s: float,
                 links: Optional[LinkModel] = None, should_abort: Optional[Callable[[], bool]] = None,
                 waiter: Optional[Waiter] = None, check_each: Optional[bool] = None):
        self.pg = pg  # a ProcessGroup object of this generation (not the global default group)
        self.should_abort = should_abort
        self.waiter = waiter or Waiter()
        self.rank_of = rank_of
        self.me = me
        self.device = device
        self.timeout = timedelta(seconds=timeout_s)
        self.links = links
        # link emulation needs each header's send time at once; on CPU the check costs nothing extra
        self.check_each = check_each if check_each is not None else (links is not None or device.type != "cuda")
        if links is not None and not self.check_each:
            raise ValueError("transport: link emulation reads every header as it arrives (check_each=True)")
        self._unchecked: List[tuple] = []  # received, header not yet read (check_each=False)
        self._pending: List[Tuple[dist.Work, torch.Tensor]] = []
        # receives may be posted ahead on gloo only: NCCL runs a rank's p2p in order on one stream,
        # so a receive posted early would hold up this rank's sends that its peer waits for
        self.prepost = isinstance(pg, dist.ProcessGroupGloo)
        self._expected: Deque[tuple] = deque()  # this step's receives not yet posted, in plan order
        self._posted: Deque[tuple] = deque()  # posted ahead, not yet taken by recv
        self._link_free_at: Dict[str, float] = {}
        self.bytes_sent = 0  # payload bytes and messages sent (headers not counted)
        self.messages_sent = 0
        self.recv_wait_s = 0.0
        self.emulated_delay_s = 0.0
        self.link_samples: List[LinkSample] = []  # this step's; the worker reports and resets them

    def start_step(self) -> None:
        """Forget the previous step's counters, link times and any headers a failed step left unchecked."""
        self.recv_wait_s = self.emulated_delay_s = 0.0
        self.link_samples = []
        self._unchecked = []
        self.abandon()

    def expect(self, receives: List[Tuple[str, int, int, int, Tuple[int, ...], torch.dtype]]) -> None:
        """The step's receives ``(src, step, microbatch, kind, shape, dtype)`` in the order :meth:`recv`
        will ask for them: on gloo the first :data:`PREPOST_WINDOW` are posted now and each ``recv``
        posts the next, so a message usually arrives while the node computes and the helper thread has
        already seen it complete (no hand-off, no blocking). Elsewhere it does nothing."""
        if self.prepost:
            self._expected = deque(receives)
            self._post_ahead()

    def abandon(self) -> None:
        """Drop receives posted ahead that no ``recv`` took (a failed step): their tickets would hold
        the helper thread on a dead group, so a fresh thread serves what comes next."""
        self._expected.clear()
        if self._posted:
            self._posted.clear()
            self.waiter.restart()

    def _post_ahead(self) -> None:
        while self._expected and len(self._posted) < PREPOST_WINDOW:
            self._posted.append(self._post(*self._expected.popleft()))

    def _post(self, src: str, step: int, microbatch_id: int, kind: int, shape: Tuple[int, ...],
              dtype: torch.dtype) -> tuple:
        """Post the receives of one message (header and payload; the plan gives the payload's shape)."""
        tag, peer = message_tag(microbatch_id, kind), self.rank_of[src]
        header = torch.empty(HEADER_LEN, dtype=torch.float64, device=self.device)
        payload = torch.empty(shape, dtype=dtype, device=self.device)
        ticket = self.waiter.submit([self.pg.recv([header], peer, tag), self.pg.recv([payload], peer, tag)])
        return (src, step, microbatch_id, kind, tuple(shape), dtype), ticket, header, payload

    # -- send -------------------------------------------------------------------------------
    def send(self, tensor: torch.Tensor, dst: str, step: int, microbatch_id: int, kind: int) -> None:
        tensor = tensor.contiguous()
        if tensor.dim() > 5:
            raise ValueError("transport: tensors of at most 5 dimensions")
        shape = list(tensor.shape) + [0] * (5 - tensor.dim())
        header = torch.tensor([MAGIC, step, microbatch_id, kind, _DTYPES.index(tensor.dtype), tensor.dim(),
                               *shape, time.time()], dtype=torch.float64, device=self.device)
        tag = message_tag(microbatch_id, kind)
        peer = self.rank_of[dst]
        for payload in (header, tensor):
            self._pending.append((self.pg.send([payload], peer, tag), payload))
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self.messages_sent += 1

    def flush(self) -> None:
        """Wait for every outstanding send (end of step); buffers stay referenced until then."""
        pending, self._pending = self._pending, []
        if pending:
            _, error = self.waiter.wait_all([work for work, _ in pending], self.timeout.total_seconds(),
                                            self.should_abort, "the step's sends to complete")
            if error is not None:
                raise error

    # -- receive ----------------------------------------------------------------------------
    def recv(self, src: str, step: int, microbatch_id: int, kind: int, shape: Tuple[int, ...],
             dtype: torch.dtype) -> torch.Tensor:
        """Receive the message the plan expects from ``src``; check its header; emulate the link.

        Both parts are posted at once (the plan gives the payload's shape), ahead of time when
        :meth:`expect` listed them, and waited for with one hand-off; the header is checked before
        any error of the payload is reported, so a peer that sends the wrong shape is named as the
        sender of a bad message."""
        start = time.perf_counter()
        key = (src, step, microbatch_id, kind, tuple(shape), dtype)
        if self._posted:
            posted = self._posted.popleft()
            if posted[0] != key:
                raise RuntimeError(f"transport: receive {key[:4]} asked for out of the expected order {posted[0][:4]}")
        else:
            posted = self._post(*key)
        _, ticket, header, payload = posted
        self._post_ahead()
        what = f"{KIND_NAMES[kind]} of microbatch {microbatch_id} (step {step}) from node {src}"
        try:
            self.waiter.join(ticket, self.timeout.total_seconds(), self.should_abort, f"the {what}")
        except Aborted:
            raise
        except (RuntimeError, TimeoutError) as err:
            raise TransportError(f"receiving the {what} failed: {str(err).splitlines()[0]}", peer=src) from None
        arrived, error = ticket.finished, ticket.error
        if not arrived:
            raise TransportError(f"receiving the {what} failed: {str(error).splitlines()[0]}", peer=src)
        # the helper thread began waiting for this message at ``began``: a message sent after that
        # was waited for, so its arrival time is the link's, not this node being busy
        self._unchecked.append((header, step, microbatch_id, kind, tuple(shape), dtype, what, src, ticket.began,
                                arrived, payload.numel() * payload.element_size()))
        if self.check_each or error is not None:
            self.check_received()  # a bad header is reported before an error of the payload
        if error is not None:
            raise TransportError(f"receiving the payload of the {what} failed: {str(error).splitlines()[0]}",
                                 peer=src)
        self.recv_wait_s += time.perf_counter() - start
        return payload

    def check_received(self) -> None:
        """Check the headers of the messages received since the last check against what the plan
        expected, with one host copy for all of them; record their link times. Raises
        :class:`TransportError` naming the sender of the first bad one."""
        pending, self._unchecked = self._unchecked, []
        if not pending:
            return
        rows = (torch.stack([p[0] for p in pending]) if len(pending) > 1 else pending[0][0][None]).cpu().tolist()
        for values, (_, step, microbatch_id, kind, shape, dtype, what, src, posted, arrived, nbytes) in zip(rows, pending):
            self._check_header(values, step, microbatch_id, kind, shape, dtype, what, src)
            if src != self.me:
                self.link_samples.append(self._delivered(src, values[-1], posted, arrived, nbytes))

    def _delivered(self, src: str, sent_at: float, posted: float, arrived: List[float],
                   nbytes: int) -> LinkSample:
        """Hold the message until the emulated link delivers it; its one-way times. The receiver
        waited for the message iff it posted the receive before it was sent, or the emulated
        delivery is later than the real one (it sleeps for it). Emulated, both parts arrive when the
        link delivers them even if this node takes them later (busy): a payload timed by its real
        arrival while the header was timed by the emulated one came out before the header, an
        infinite bandwidth (a 66 ms link measured as 24.5 ms per activation, re-planning every
        other step)."""
        header_got, payload_got = arrived
        waited = sent_at >= posted
        if self.links is not None:
            header_at, payload_at = self._emulated_delivery(src, sent_at, nbytes)
            waited = waited or header_at > header_got
            header_got = max(header_got, header_at)
            waited = self._sleep_until(payload_at) or waited
            payload_got = max(payload_got, payload_at)
        header_s = header_got - sent_at if waited else None
        return LinkSample(src, header_s, payload_got - sent_at if waited else None, nbytes)

    @staticmethod
    def _check_header(values, step, microbatch_id, kind, shape, dtype, what, src) -> None:
        got_shape = tuple(int(v) for v in values[6:6 + int(values[5])])
        problems = []
        if values[0] != MAGIC:
            problems.append("not a SkipPipe message")
        elif int(values[1]) != step or int(values[2]) != microbatch_id or int(values[3]) != kind:
            problems.append(f"got step {int(values[1])} microbatch {int(values[2])} kind {int(values[3])}")
        elif got_shape != tuple(shape):
            problems.append(f"shape {got_shape} != expected {tuple(shape)}")
        elif _DTYPES[int(values[4])] != dtype:
            problems.append(f"dtype {_DTYPES[int(values[4])]} != expected {dtype}")
        if problems:
            raise TransportError(f"bad message for the {what}: {problems[0]}; node {src} is excluded", peer=src)

    def emulate_allreduce(self, members: List[str], nbytes: int) -> None:
        """After a stage's gradient collective (instant on one box), wait what a ring all-reduce of
        ``nbytes`` over the emulated links takes: ``2 (n-1)/n * bytes`` over the slowest link of the
        group plus ``2 (n-1)`` of its worst latency (``CostModel.allreduce_s``, the simulator's)."""
        if self.links is None or len(members) < 2:
            return
        pairs = [(a, b) for a in members for b in members if a != b]
        slowest = min(self.links.bandwidth_bytes_per_s(a, b) / self.links.factor(a, b) for a, b in pairs)
        worst = max(self.links.latency_s(a, b) * self.links.factor(a, b) for a, b in pairs)
        n = len(members)
        delay = (0.0 if slowest == float("inf") else 2.0 * (n - 1) / n * nbytes / slowest) + 2 * (n - 1) * worst
        if delay > 0:
            time.sleep(delay)
            self.emulated_delay_s += delay

    def _emulated_delivery(self, src: str, sent_at: float, nbytes: int) -> Tuple[float, float]:
        """When the header and the payload of a message sent at ``sent_at`` arrive over the emulated
        link: it is on the wire after the messages before it (FIFO), the header ``latency`` later,
        the payload after ``bytes / bandwidth`` more; ``fault.slow_links`` multiplies both."""
        factor = self.links.factor(src, self.me)
        bandwidth = self.links.bandwidth_bytes_per_s(src, self.me)
        serialise_s = 0.0 if bandwidth == float("inf") else factor * nbytes / bandwidth
        on_wire = max(sent_at, self._link_free_at.get(src, 0.0))
        self._link_free_at[src] = on_wire + serialise_s
        latency = factor * self.links.latency_s(src, self.me)
        return on_wire + latency, on_wire + serialise_s + latency

    def _sleep_until(self, wall: float) -> bool:
        """Sleep until wall-clock ``wall``; did it have to wait?"""
        delay = wall - time.time()
        if delay <= 0:
            return False
        time.sleep(delay)
        self.emulated_delay_s += delay
        return True
