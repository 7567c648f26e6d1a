"""A worker's process groups of one generation (membership epoch), and the transport over them.

The world group of the live members and one group per stage with replicas are explicit objects on
store prefixes ``pg/<generation>/...``, not torch's global default group, so the survivors of a
failure form new ones without tearing down a group that a stuck receive may still be using (see
:class:`~skippipe.runtime.transport.Waiter`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from skippipe.plan import Plan
from skippipe.runtime.transport import LinkModel, Transport, Waiter


def make_group(backend: str, store, rank: int, size: int, timeout: timedelta):
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, options)
    raise ValueError(f"runtime.backend={backend!r}: use gloo or nccl")


class GenerationGroups:
    """The groups and transport of the generation a worker is in (none before its first)."""

    def __init__(self, me: str, device: torch.device, timeout_s: float, waiter: Waiter,
                 should_abort: Callable[[], bool]):
        self.me, self.device, self.timeout_s = me, device, timeout_s
        self.waiter, self.should_abort = waiter, should_abort
        self.generation = -1
        self.members: List[str] = []
        self.rank_of: Dict[str, int] = {}
        self.stage_members: List[str] = []  # the stage's live replicas in allocation order
        self.world_pg = self.stage_group = self.transport = None
        self._retired: List[Any] = []  # groups of earlier generations (see close)

    def form(self, backend: str, raw_store, plan: Plan, stage_id: Optional[int], members: List[str],
             generation: int, links: Optional[LinkModel]) -> None:
        """Groups of the live ``members`` (their order is the rank order) for ``generation``."""
        timeout = timedelta(seconds=self.timeout_s)
        self.members = members
        self.rank_of = {name: rank for rank, name in enumerate(members)}
        prefix = f"pg/{generation}"
        self.world_pg = make_group(backend, dist.PrefixStore(f"{prefix}/world", raw_store),
                                   self.rank_of[self.me], len(members), timeout)
        # stage group: the stage's live replicas in allocation order (gather index = that order)
        self.stage_group = None
        if stage_id is not None:
            self.stage_members = [n for n in plan.allocation[stage_id] if n in self.rank_of]
            if len(self.stage_members) > 1:
                store = dist.PrefixStore(f"{prefix}/stage{stage_id}", raw_store)
                self.stage_group = make_group(backend, store, self.stage_members.index(self.me),
                                              len(self.stage_members), timeout)
        self.transport = Transport(self.world_pg, self.rank_of, self.me, self.device, self.timeout_s,
                                   links, should_abort=self.should_abort, waiter=self.waiter)
        self.generation = generation

    def collective(self, work, what: str = "a gradient collective") -> None:
        self.waiter.wait(work, self.timeout_s, self.should_abort, what)

    def close(self) -> None:
        """Drop this generation's groups. They are not destroyed: a receive abandoned after a failure
        may still be blocked in one until the group timeout, and then ends harmlessly. They are not
        released either: the last reference going would run the group's destructor, which joins its
        threads, so the next generation would wait for that timeout (measured: 30 s per failure)."""
        self._retired.extend(g for g in (self.world_pg, self.stage_group) if g is not None)
        if self.transport is not None:
            self.transport.abandon()
        self.world_pg = self.stage_group = self.transport = None
        self.generation = -1
