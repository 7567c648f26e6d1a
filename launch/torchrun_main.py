"""torchrun entry point: ``torchrun --standalone --nproc_per_node=N launch/torchrun_main.py CONFIG key=value ...``

Every rank runs the same worker as ``launcher=local``; rank 0 also runs the coordinator (in a thread).
With ``--max-restarts``, a failed rank makes torchrun restart the whole group; the restarted group
(TORCHELASTIC_RESTART_COUNT > 0) resumes from the newest verified checkpoint (``run.resume=true``) and
does not repeat injected faults. Set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for restarts.
N must equal the topology's node count. The control store is torchrun's own store at
MASTER_ADDR:MASTER_PORT (hosted by the agent, or by rank 0 when TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1),
namespaced by TORCHELASTIC_RESTART_COUNT so a restarted group never reads a stale key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d socket warnings after a handled fault


def check_launch(cfg, env) -> None:
    """Mistakes every rank can see on its own (a wrong process count, CUDA on a CPU-only torch), so the
    group fails in seconds with one line instead of timing out on its sockets."""
    from skippipe.errors import ConfigError
    from skippipe.process import check_device
    from skippipe.topology import load_topology

    check_device(cfg)
    nodes = len(load_topology(cfg).nodes)
    if env.world_size != nodes:
        raise ConfigError(f"torchrun started {env.world_size} processes but the topology has {nodes} nodes; "
                          f"start exactly {nodes} (torchrun --nproc_per_node={nodes}, or --nnodes x --nproc_per_node "
                          f"= {nodes} across machines)")


def main(argv) -> int:
    from skippipe.config import load_config, split_config_arg
    from skippipe.errors import UserError
    from skippipe.process import pin_threads
    from skippipe.runtime.control import SECRET_ENV, ControlChannel, box_secret, box_secret_path, connect_store
    from skippipe.runtime.coordinator import Coordinator
    from skippipe.runtime.remote import RemoteExecutor
    from skippipe.runtime.worker import WorkerEnv, run_worker

    config, overrides = split_config_arg(argv)
    overrides = [*overrides, "launcher=local"]  # torchrun starts the worker processes (faults are injected there)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart:  # torchrun restarted the group after a failure: continue from the last verified checkpoint
        overrides += ["run.resume=true", "run.overwrite=false"]  # resume what the first attempt started
    try:
        cfg = load_config(config, overrides)
        env = WorkerEnv.from_environ()
        check_launch(cfg, env)
    except UserError as err:  # every rank fails alike, at once and before any socket; rank 0 says why
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    logging.basicConfig(level=cfg.run.log_level.upper() if env.rank == 0 else logging.WARNING,
                        format="%(message)s" if env.rank == 0 else f"[rank {env.rank}] %(levelname)s %(message)s")
    pin_threads(cfg.run.threads)
    if not os.environ.get(SECRET_ENV):
        # torchrun starts every rank itself, so no parent hands them a fresh secret. On one machine
        # the ranks share one through a private file; across machines the user sets it on each
        if int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)) != env.world_size:
            if env.rank == 0:
                print(f"error: {SECRET_ENV} is not set: a torchrun group across machines needs the same secret "
                      f"on every machine for its control channel (export {SECRET_ENV}=$(openssl rand -hex 32) "
                      "and pass it to every torchrun)", file=sys.stderr)
            return 2
        key_file = box_secret_path("torchrun-" + os.environ.get("TORCHELASTIC_RUN_ID", "none"))
        os.environ[SECRET_ENV] = box_secret("torchrun-" + os.environ.get("TORCHELASTIC_RUN_ID", "none"),
                                            cfg.runtime.timeout_s)
    else:
        key_file = None
    timeout = cfg.runtime.timeout_s
    namespace = f"/restart{restart}"
    hosted = None
    if env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        hosted = connect_store(env.master_addr, env.master_port, True, timeout)  # noqa: F841 (keep alive)
    failure = []
    coordinator_thread = None
    if env.rank == 0:
        coordinator_channel = ControlChannel(connect_store(env.master_addr, env.master_port, False, timeout),
                                             timeout, namespace)

        def coordinate():
            try:
                Coordinator(cfg, lambda spec, n: RemoteExecutor(cfg, coordinator_channel, env.world_size)).run()
            except BaseException as err:  # surfaced below, after the local worker has stopped
                failure.append(err)

        coordinator_thread = threading.Thread(target=coordinate, name="coordinator", daemon=True)
        coordinator_thread.start()
    channel = ControlChannel(connect_store(env.master_addr, env.master_port, False, timeout), timeout, namespace)
    code = run_worker(env, channel, namespace)
    if coordinator_thread is not None:
        coordinator_thread.join()
        if failure:
            print(f"error: {failure[0]}", file=sys.stderr)
            return getattr(failure[0], "exit_code", 1)
        if key_file and code == 0:  # the run is over: every rank read the secret long ago
            with contextlib.suppress(OSError):
                os.unlink(key_file)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
