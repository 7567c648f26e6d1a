"""The control channel between the coordinator and the workers: a TCPStore with JSON values.

Small messages only (DESIGN.md section 2): the resolved config and node list, one command per step
(the plan and learning rate, or stop), one report per worker per step, errors, and heartbeats. The
data-plane process group of each generation is built on a prefix of the same store, so survivors
can form a new group after a failure without a new rendezvous service.

Keys (under the prefix ``skippipe/``):
``config`` -> {config, nodes, vocab_size}; ``ready/<node>/<incarnation>`` -> {time, process_s} (a
worker is up); ``first/<node>/<incarnation>`` -> the first command index that incarnation reads;
``cmd/<i>`` -> a :class:`~skippipe.runtime.wire.Command`; ``abort/<i>`` -> True (survivors stop
waiting on failed command ``i``); ``report/<i>/<node>`` -> a :class:`~skippipe.runtime.wire.NodeReport`;
``hb/<node>`` -> time of its last heartbeat. Raw (unauthenticated) store
keys: ``reported/<i>`` (a counter) and ``allin/<i>`` (the doorbell set by the last reporter, or by a
failed one).

Privacy and authentication: the coordinator's store listens on one address (127.0.0.1 on one
box; a socket we bind and hand to the TCPStore, which alone would listen on every interface).
Every value is an envelope ``{"b": body, "m": HMAC-SHA256(secret, body)}`` whose body names its key
and carries the writer's time in ns, so a value is accepted only under the key it was written for
and never older than the last one accepted there (an old heartbeat replayed is refused). The per-run
secret is made by the coordinator and reaches workers through the environment
(``SKIPPIPE_CONTROL_SECRET``) or the Ray actor's environment; under torchrun, which starts every
rank itself, the ranks of one box share one through a private file (:func:`box_secret`) and a
group across machines needs the variable set on each; it is never logged. A value that fails
these checks is ignored (as if absent), counted (``control/rejected``) and logged once per key.
What authentication cannot stop on a shared store is deleting or overwriting keys (denial of
service), and gloo's own rendezvous keys (``pg/...``) are gloo's; binding to loopback limits
both to processes on this machine.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import time
from datetime import timedelta
from typing import Any, Dict, Optional, Set

import torch.distributed as dist

from skippipe.runtime.wire import Command, NodeReport

PREFIX = "skippipe"
SECRET_ENV = "SKIPPIPE_CONTROL_SECRET"
log = logging.getLogger("skippipe")


def new_secret() -> str:
    return secrets.token_hex(32)


def box_secret_path(run_id: str, directory: Optional[str] = None) -> str:
    """Where :func:`box_secret` keeps the secret of ``run_id`` (remove it when the run is over)."""
    import re
    import tempfile

    base = directory or os.path.join(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(),
                                     f"skippipe-{os.getuid()}")
    return os.path.join(base, re.sub(r"[^A-Za-z0-9_.-]", "_", run_id) + ".key")


def box_secret(run_id: str, timeout_s: float, directory: Optional[str] = None) -> str:
    """The secret of a run whose processes all start on this machine without a parent that could
    hand them one (torchrun): the first process to get here makes it and publishes it in a file
    only this user can read (``$XDG_RUNTIME_DIR`` or the temp dir, ``skippipe-<uid>/<run_id>.key``,
    mode 0600, created whole by a link so no reader sees half a key); the others read it. The
    same file serves a restarted group of the same run id."""
    import tempfile

    path = box_secret_path(run_id, directory)
    base = os.path.dirname(path)
    os.makedirs(base, mode=0o700, exist_ok=True)
    info = os.stat(base)
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise RuntimeError(f"control: {base} must belong to this user with mode 0700 (it holds run secrets); "
                           f"remove it or set {SECRET_ENV}")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=base, prefix=".key-")  # mode 0600
        try:
            with os.fdopen(fd, "w") as out:
                out.write(new_secret())
            try:
                os.link(tmp, path)  # atomic: fails if another process published first
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    deadline = time.monotonic() + timeout_s
    while True:
        with open(path) as handle:
            secret = handle.read().strip()
        if secret or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not secret:
        raise RuntimeError(f"control: {path} holds no secret; remove it or set {SECRET_ENV}")
    return secret


def connect_store(host: str, port: int, is_master: bool, timeout_s: float) -> dist.TCPStore:
    """A TCPStore server (coordinator side) or client (workers). Port 0 picks a free port. The
    server listens on ``host`` only: on a socket bound here and passed as ``master_listen_fd``."""
    timeout = timedelta(seconds=timeout_s)
    if not is_master:
        return dist.TCPStore(host, port, world_size=None, is_master=False, timeout=timeout, wait_for_workers=False)
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1024)
    try:
        store = dist.TCPStore(host, listener.getsockname()[1], world_size=None, is_master=True, timeout=timeout,
                              wait_for_workers=False, master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    # the store owns the socket now and closes it when it is destroyed; the Python object must not
    # close that fd number again later (by then another socket of this process may hold it: a run
    # whose control store stopped accepting connections, seen once in CI)
    listener.detach()
    return store


class ControlChannel:
    """``namespace`` separates attempts that share one store (torchrun restarts reuse the agent's).
    ``secret``: the run's key for message authentication (default: ``$SKIPPIPE_CONTROL_SECRET``)."""

    def __init__(self, store: dist.Store, timeout_s: float, namespace: str = "", secret: Optional[str] = None):
        self.raw = dist.PrefixStore(f"{PREFIX}{namespace}", store)
        self.store = self.raw
        self._base, self._prefix = store, f"{PREFIX}{namespace}"
        self.timeout_s = timeout_s
        secret = secret if secret is not None else os.environ.get(SECRET_ENV)
        if not secret:
            raise RuntimeError(f"control: no secret ({SECRET_ENV} is not set); start workers through a "
                               "SkipPipe launcher")
        self._key = secret.encode()
        self.rejected = 0
        self._seen_bad: Set[str] = set()
        self._latest: Dict[str, int] = {}
        self._written_ns = 0  # the last write's time: a wall clock stepped back must not make new values look old

    # -- generic ------------------------------------------------------------------------------
    def put(self, key: str, value: Any) -> None:
        self._written_ns = max(time.time_ns(), self._written_ns + 1)
        body = json.dumps({"k": key, "n": self._written_ns, "v": value})
        mac = hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()
        self.store.set(key, json.dumps({"b": body, "m": mac}))

    def read(self, key: str) -> Optional[Any]:
        """The value at ``key``, or None when absent or not authentic (then counted and logged)."""
        if not self.store.check([key]):
            return None
        raw = self.store.get(key)
        try:
            envelope = json.loads(raw)
            body, mac = envelope["b"], envelope["m"]
            good = hmac.compare_digest(hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest(), mac)
            message = json.loads(body) if good else None
        except (ValueError, TypeError, KeyError, AttributeError):
            message = None
        if message is None or message.get("k") != key or int(message.get("n", -1)) < self._latest.get(key, -1):
            self._reject(key, raw)
            return None
        self._latest[key] = int(message["n"])
        return message["v"]

    def _reject(self, key: str, raw: bytes) -> None:
        fingerprint = key + hashlib.sha256(raw).hexdigest()
        if fingerprint in self._seen_bad:  # the same forged value read again
            return
        self._seen_bad.add(fingerprint)
        self.rejected += 1
        if self.rejected <= 20 or self.rejected % 100 == 0:
            log.warning("control: ignored an unauthenticated or replayed value at '%s' (%d rejected so far)",
                        key, self.rejected)

    def has(self, key: str) -> bool:
        return self.read(key) is not None

    def get_now(self, key: str) -> Any:
        value = self.read(key)
        if value is None:
            raise KeyError(f"control: no authentic value at '{key}'")
        return value

    def wait_for(self, key: str, timeout_s: Optional[float] = None, abort=None, chunk_s: float = 5.0) -> Any:
        """Wait for ``key`` (blocking in the store server, so it wakes as soon as the key is set),
        checking ``abort()`` (which may raise, e.g. on a dead peer) every ``chunk_s``. (Each expired
        store wait logs a c10d warning, so the chunks are long; polling ``check`` instead would cost a
        round trip per poll on every waiting worker.)"""
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        while True:
            try:
                self.store.wait([key], timedelta(seconds=max(0.001, min(chunk_s, deadline - time.monotonic()))))
                value = self.read(key)
                if value is not None:
                    return value
                time.sleep(0.01)  # a forged value sits there: wait for the authentic one
            except RuntimeError as err:  # the store's wait timed out (or the store is gone)
                if "timeout" not in str(err).lower() and "timed out" not in str(err).lower():
                    raise
            if abort is not None:
                abort()
            if time.monotonic() > deadline:
                raise TimeoutError(f"control: nothing arrived for '{key}' within {limit:.0f} s")

    # -- protocol -----------------------------------------------------------------------------
    def command(self, index: int, command: Command) -> None:
        self.put(f"cmd/{index}", command.to_wire())

    def wait_command(self, index: int, timeout_s: Optional[float] = None) -> Command:
        return Command.from_wire(self.wait_for(f"cmd/{index}", timeout_s=timeout_s))

    def report(self, index: int, report: NodeReport, expected: int = 0) -> None:
        """``report``'s node reports on command ``index``; the last of its ``expected`` members, and
        any member that failed (its peers must be told to stop waiting), rings the doorbell."""
        self.put(f"report/{index}/{report.node}", report.to_wire())
        if self.store.add(f"reported/{index}", 1) >= expected > 0 or not report.ok:
            self.store.set(f"allin/{index}", "1")

    def reported(self, index: int) -> int:
        """How many members have reported on command ``index`` so far (one store round trip; the
        counter is raw, so a forged count only makes the coordinator read the authenticated reports early)."""
        return int(self.store.add(f"reported/{index}", 0))

    def read_report(self, index: int, node: str) -> Optional[NodeReport]:
        """``node``'s report on command ``index``, if one (authentic) is there."""
        value = self.read(f"report/{index}/{node}")
        return NodeReport.from_wire(value) if isinstance(value, dict) else None

    def ring(self, index: int) -> None:
        """Ring command ``index``'s doorbell (the coordinator, to release its own waiter)."""
        self.store.set(f"allin/{index}", "1")

    def doorbell_connection(self) -> dist.Store:
        """A second connection to the same store and namespace (every launcher's is a TCPStore), for
        a thread that blocks on the doorbell while this one keeps working (one TCPStore client must
        not serve two threads)."""
        client = dist.TCPStore(self._base.host, self._base.port, world_size=None, is_master=False,
                               timeout=timedelta(seconds=self.timeout_s), wait_for_workers=False)
        return dist.PrefixStore(self._prefix, client)

    def heartbeat(self, node: str) -> None:
        self.put(f"hb/{node}", time.time())
