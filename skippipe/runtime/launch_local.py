"""``launcher=local``: the embedded default. Spawns one worker process per topology node on this
machine (no cluster needed); this process hosts the control store and runs the coordinator. Every
channel binds to 127.0.0.1 unless ``runtime.master_addr`` says otherwise."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any, Dict, List

from skippipe.config import Config
from skippipe.process import torchrun_env

log = logging.getLogger("skippipe")


class LocalLauncher:
    """One worker process per node on this machine; watches and replaces them (a
    :class:`~skippipe.runtime.executor.WorkerGroup`). Adding nodes to a running job is a Ray
    feature (``skippipe join``): this launcher never receives a request."""

    def __init__(self, nodes: List[str], addr: str, port: int, threads: int, secret: str):
        self.nodes, self.addr, self.port, self.threads = list(nodes), addr, port, threads
        self.secret = secret
        self.procs: Dict[str, subprocess.Popen] = {}

    def _spawn(self, node: str, incarnation: int) -> None:
        rank = self.nodes.index(node)
        env = {**os.environ, **torchrun_env(rank, len(self.nodes), rank, len(self.nodes), self.addr, self.port,
                                            self.threads, node, incarnation, self.secret)}
        self.procs[node] = subprocess.Popen([sys.executable, "-m", "skippipe.runtime.worker"], env=env)

    def start(self) -> None:
        for node in self.nodes:
            self._spawn(node, 0)

    def exited(self) -> Dict[str, int]:
        return {node: p.returncode for node, p in self.procs.items() if p.poll() is not None}

    def replace(self, node: str, incarnation: int, away_from_last: bool = False) -> None:
        """A new worker process for ``node`` (one machine: ``away_from_last`` has nowhere else to go)."""
        self.kill(node)
        self._spawn(node, incarnation)

    def kill(self, node: str) -> None:
        proc = self.procs.get(node)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def add(self, node: str, spec: Dict[str, Any]) -> float:
        raise AssertionError("launcher=local takes no join requests")

    def join_requests(self) -> List[Dict[str, Any]]:
        return []

    def answer(self, request_id: int, status: str, **info) -> None:
        raise AssertionError("launcher=local takes no join requests")

    def pid(self, node: str) -> int:
        return self.procs[node].pid

    def stop(self, grace_s: float = 5.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def train_local(cfg: Config) -> Dict[str, Any]:
    from skippipe.process import pin_threads
    from skippipe.runtime.control import ControlChannel, connect_store, new_secret
    from skippipe.runtime.coordinator import Coordinator
    from skippipe.runtime.remote import RemoteExecutor
    from skippipe.topology import load_topology

    pin_threads(cfg.run.threads)
    addr = cfg.runtime.master_addr
    store = connect_store(addr, cfg.runtime.master_port or 0, True, cfg.runtime.timeout_s)
    secret = new_secret()
    control = ControlChannel(store, cfg.runtime.timeout_s, secret=secret)
    nodes = load_topology(cfg).names()
    launcher = LocalLauncher(nodes, addr, store.port, cfg.run.threads, secret)
    launcher.start()
    train_local.last_launcher = launcher  # tests and the chaos bench reach the worker processes through this
    try:
        return Coordinator(cfg, lambda spec, num_stages: RemoteExecutor(cfg, control, len(nodes), launcher)).run()
    finally:
        launcher.stop()
