"""The control channel between the coordinator and the workers: a TCPStore with JSON values.

Small messages only (DESIGN.md section 2): the resolved config and node list, one command per step
(the plan and learning rate, or stop), one report per worker per step, errors, and heartbeats. The
data-plane process group of each generation is built on a prefix of the same store, so survivors
can form a new group after a failure without a new rendezvous service.

Keys (under the prefix ``skippipe/``):
``config`` -> {config, nodes, vocab_size}; ``first/<node>`` -> the first command index a node reads;
``cmd/<i>`` -> {step, generation, members, lr, plan, commit_step, sync} or {stop} or {abort};
``report/<i>/<node>`` -> a worker's report or error; ``hb/<node>`` -> time of its last heartbeat.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any, Dict, Optional

import torch.distributed as dist

PREFIX = "skippipe"


def connect_store(host: str, port: int, is_master: bool, timeout_s: float) -> dist.TCPStore:
    """A TCPStore server (coordinator side) or client (workers). Port 0 picks a free port."""
    return dist.TCPStore(host, port, world_size=None, is_master=is_master, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


class ControlChannel:
    """``namespace`` separates attempts that share one store (torchrun restarts reuse the agent's)."""

    def __init__(self, store: dist.Store, timeout_s: float, namespace: str = ""):
        self.raw = dist.PrefixStore(f"{PREFIX}{namespace}", store)
        self.store = self.raw
        self.timeout_s = timeout_s

    # -- generic ------------------------------------------------------------------------------
    def put(self, key: str, value: Any) -> None:
        self.store.set(key, json.dumps(value))

    def has(self, key: str) -> bool:
        return self.store.check([key])

    def get_now(self, key: str) -> Any:
        return json.loads(self.store.get(key))

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
                return self.get_now(key)
            except RuntimeError as err:  # the store's wait timed out (or the store is gone)
                if "timeout" not in str(err).lower() and "timed out" not in str(err).lower():
                    raise
            if abort is not None:
                abort()
            if time.monotonic() > deadline:
                raise TimeoutError(f"control: nothing arrived for '{key}' within {limit:.0f} s")

    # -- protocol -----------------------------------------------------------------------------
    def publish_config(self, config: Dict[str, Any], nodes) -> None:
        self.put("config", {"config": config, "nodes": list(nodes)})

    def command(self, step: int, payload: Dict[str, Any]) -> None:
        self.put(f"cmd/{step}", payload)

    def report(self, index: int, node: str, payload: Dict[str, Any]) -> None:
        self.put(f"report/{index}/{node}", payload)

    def heartbeat(self, node: str) -> None:
        self.put(f"hb/{node}", time.time())
