"""The scheduler's inputs from the config, as plain frozen data (so the scheduler is pure).

``SchedulerParams.from_config(cfg)`` is the only place the scheduler reads a ``Config``; every
function of :mod:`skippipe.schedule` also accepts the params themselves (``as_params``), so tests
and benchmarks can build problems without a config file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

from skippipe.plan import PathRules, num_stages, stages_visited


@dataclass(frozen=True)
class SchedulerParams:
    method: str = "skippipe"
    num_stages: int = 4  # ignored when partition_sizes is given
    partition_sizes: Tuple[int, ...] = ()
    skip_ratio: float = 0.25
    memory: int = 3
    microbatches_per_originator: int = 2
    rules: PathRules = field(default_factory=PathRules)
    seed: int = 0
    allocation: str = "auto"  # auto (plan for skippipe, dtfm otherwise), dtfm, plan
    search_budget_s: float = 300.0
    allocation_budget_s: float = 120.0

    @classmethod
    def from_config(cls, cfg) -> "SchedulerParams":
        s = cfg.schedule
        return cls(method=s.method, num_stages=num_stages(s),
                   partition_sizes=tuple(s.partition_sizes), skip_ratio=s.skip_ratio, memory=s.memory,
                   microbatches_per_originator=s.microbatches_per_originator, rules=PathRules.from_config(s),
                   seed=s.seed if s.seed is not None else cfg.run.seed,
                   allocation=getattr(s, "allocation", "auto"), search_budget_s=s.search_budget_s,
                   allocation_budget_s=s.allocation_budget_s)

    def stages_visited(self, num_stages: int) -> int:
        return stages_visited(num_stages, self.skip_ratio)

    def allocator(self, method: str) -> str:
        """``dtfm`` or ``plan``: the allocation ``method`` gets (``auto``: plan for skippipe)."""
        if self.allocation != "auto":
            return self.allocation
        return "plan" if method == "skippipe" else "dtfm"


def as_params(cfg_or_params) -> SchedulerParams:
    """The params of a Config (or the params themselves)."""
    if isinstance(cfg_or_params, SchedulerParams):
        return cfg_or_params
    return SchedulerParams.from_config(cfg_or_params)
