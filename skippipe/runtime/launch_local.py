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

log = logging.getLogger("skippipe")


def worker_env(rank: int, world_size: int, addr: str, port: int, threads: int) -> Dict[str, str]:
    """The torchrun environment contract, so one worker code path serves every launcher."""
    env = dict(os.environ)
    env.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": addr, "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return env


def spawn_workers(world_size: int, addr: str, port: int, threads: int) -> List[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "skippipe.runtime.worker"],
                             env=worker_env(rank, world_size, addr, port, threads))
            for rank in range(world_size)]


def stop_workers(procs: List[subprocess.Popen], grace_s: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def train_local(cfg: Config) -> Dict[str, Any]:
    from skippipe.runtime.control import ControlChannel, connect_store
    from skippipe.runtime.coordinator import Coordinator, RemoteExecutor
    from skippipe.topology import load_topology
    from skippipe.train.loop import pin_threads

    pin_threads(cfg.run.threads)
    addr = cfg.runtime.master_addr
    store = connect_store(addr, cfg.runtime.master_port or 0, True, cfg.runtime.timeout_s)
    control = ControlChannel(store, cfg.runtime.timeout_s)
    world_size = len(load_topology(cfg).nodes)
    procs = spawn_workers(world_size, addr, store.port, cfg.run.threads)

    def exited() -> Dict[int, int]:
        return {rank: p.returncode for rank, p in enumerate(procs) if p.poll() is not None}

    try:
        return Coordinator(cfg, lambda spec, num_stages: RemoteExecutor(cfg, control, world_size, exited)).run()
    finally:
        stop_workers(procs)
