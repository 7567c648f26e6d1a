"""``skippipe join RUN --node NAME --region REGION [--speed S] [--memory-gb M] [--stage K]
[--node-ip IP] [--address ADDR] [--no-wait] [--timeout S] [--wait-start S] [--json]``.

Adds a node to a run that is training on a Ray cluster (``launcher=ray``, e.g. under ``ray job
submit``). ``RUN`` is the run's ``run.name``. The run places the node (``--stage``, or the stage with
the fewest live replicas), starts a worker actor for it (on the Ray node with ``--node-ip`` if
given), copies the stage's parameters and optimizer state from a live replica, and routes
microbatches through it from the next plan on. ``--region`` must be one of the run's topology
regions: its links to the other nodes follow that region's latency and bandwidth.

Waits until the node has joined (prints the step and generation) unless ``--no-wait`` (then it
returns once the run has accepted the node). Exit 2 when no such run is found or the run rejects the
node, 1 when ``--timeout`` passes first.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math

from skippipe.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="the training run's run.name")
    parser.add_argument("--node", required=True, help="the new node's name (not already in the run)")
    parser.add_argument("--region", required=True, help="its region, one of the run's topology regions")
    parser.add_argument("--speed", type=float, default=1.0, help="relative compute speed (default 1.0)")
    parser.add_argument("--memory-gb", type=float, default=80.0, help="device memory in GB (default 80)")
    parser.add_argument("--stage", type=int, default=None, help="the stage to hold (default: the run chooses)")
    parser.add_argument("--node-ip", default=None, help="start the worker on the Ray node with this IP")
    parser.add_argument("--address", default=None,
                        help="the Ray cluster (default: RAY_ADDRESS, else the local cluster: auto)")
    parser.add_argument("--no-wait", action="store_true", help="return once the run has accepted the node")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
    parser.add_argument("--wait-start", type=float, default=0.0,
                        help="seconds to wait for a run that has not started yet (default 0: fail at once)")
    parser.add_argument("--json", action="store_true", help="print the request's final status as JSON")


def run(args: argparse.Namespace) -> int:
    from skippipe.runtime.join import node_spec, request_join

    for flag, value in (("--timeout", args.timeout), ("--wait-start", args.wait_start)):
        if not math.isfinite(value) or value < 0 or (flag == "--timeout" and value == 0):
            raise UserError(f"{flag} {value:g}: give seconds {'> 0' if flag == '--timeout' else '>= 0'}")
    if args.node_ip is not None:
        try:
            ipaddress.ip_address(args.node_ip)
        except ValueError:
            raise UserError(f"--node-ip {args.node_ip}: give the Ray node's IP address, e.g. 10.0.0.5") from None
    spec = node_spec(args.node, args.region, args.speed, args.memory_gb, args.stage, args.node_ip)
    status = request_join(args.run, spec, address=args.address, wait=not args.no_wait, timeout_s=args.timeout,
                          wait_start_s=args.wait_start)
    if args.json:
        print(json.dumps(status, sort_keys=True))
    elif status["status"] == "joined":
        print(f"node {args.node} joined run {args.run} at step {status['step']} "
              f"(stage {status['stage']}, generation {status['generation']})")
    else:
        print(f"run {args.run} accepted node {args.node} for stage {status['stage']}; it joins once its worker is up")
    return 0
