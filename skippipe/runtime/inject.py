"""Faults a worker injects into itself on purpose (tests, demos, benchmarks), from ``fault.*``.

``fault.kill`` ends the process and ``fault.error`` raises at a step; ``fault.slow_nodes`` makes the
node's compute that many times slower (until ``fault.slow_until``); ``fault.slow_links`` slows
emulated links between steps ``slow_links_from`` and ``slow_links_until``; ``fault.corrupt``
perturbs one element of one tensor at one step and keeps going, hashing what it actually computed
(an honest-looking ledger of a wrong computation, for ``skippipe verify`` to find). Only the first
life of a node injects: a replacement or a restarted group would repeat the fault forever.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from skippipe.errors import UserError


def slow_links_at(fault, step: int, names) -> Callable[[str, str], float]:
    """The ``LinkModel.factor`` of ``step``: ``fault.slow_links`` between ``slow_links_from`` and
    ``slow_links_until`` (both directions of each named link), 1.0 otherwise."""
    from skippipe.topology import split_link

    start, until = fault.slow_links_from, fault.slow_links_until
    if not fault.slow_links or (start is not None and step < start) or (until is not None and step >= until):
        return lambda a, b: 1.0
    factors = {}
    for key, factor in fault.slow_links.items():
        pair = split_link(str(key), names)
        if pair is not None:
            factors[pair] = factors[pair[::-1]] = float(factor)
    return lambda a, b: factors.get((a, b), 1.0)


class FaultInjector:
    """The ``fault.*`` settings as one node applies them."""

    def __init__(self, fault, me: str, fresh: bool):
        self.fault, self.me, self.fresh = fault, me, fresh
        self.slowdown = float(fault.slow_nodes.get(me, 1.0))
        self.corrupt_step = fault.corrupt.step if fault.corrupt.node == me and fresh else None

    def start_step(self, step: int, links=None, names=()) -> None:
        """``fault.kill`` ends this process; ``fault.error`` raises; set this step's slowdown and,
        with link emulation, the emulated links' slowdown (``links``: the transport's
        :class:`~skippipe.runtime.transport.LinkModel`; ``names``: the run's nodes)."""
        fault = self.fault
        if self.fresh and fault.kill.node == self.me and fault.kill.step == step:
            os._exit(137)
        if self.fresh and fault.error.node == self.me and fault.error.step == step:
            raise RuntimeError(f"injected error on node {self.me} at step {step} (fault.error)")
        until = fault.slow_until
        self.slowdown = float(fault.slow_nodes.get(self.me, 1.0)) if until is None or step < until else 1.0
        if links is not None:
            links.factor = slow_links_at(fault, step, names)

    def corrupting(self, step: int, tensor: str) -> bool:
        """Does this node perturb ``tensor`` (act, grad, param, op) at ``step``?"""
        return self.corrupt_step == step and self.fault.corrupt.tensor == tensor

    def corrupt_activation(self, out: torch.Tensor) -> torch.Tensor:
        """One element of one activation, once."""
        out = out.clone()
        out.view(-1)[0] += 1e-3
        self.corrupt_step = None
        return out

    def op_hook(self, stage, step: int):
        """A forward hook perturbing the output of ``fault.corrupt.op`` for this step (remove it
        after the step), or None."""
        if not self.corrupting(step, "op") or stage is None:
            return None
        from skippipe.verify.ops import perturb_output_hook

        try:
            module = stage.get_submodule(self.fault.corrupt.op)
        except AttributeError:
            names = ", ".join(name for name, _ in stage.named_modules() if name.count(".") == 2 and ".0." in name)
            raise UserError(f"fault.corrupt.op={self.fault.corrupt.op!r} is not a module of node {self.me}'s stage; "
                            f"name one such as {names}") from None
        return module.register_forward_hook(perturb_output_hook)
