"""What one training step returns, from either executor (in-process or remote workers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List


@dataclass
class StepOutcome:
    losses: Dict[int, float]
    grad_norm: float
    node_reports: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    leaves: Dict[str, str] = field(default_factory=dict)  # ledger leaves computed in-process
    checkpoint: List[dict] = field(default_factory=list)  # manifest entries of a requested checkpoint
    # node -> {"step", "digests"}: state after the last committed update, reported with this step
    # (also by survivors of failed attempts of it)
    states: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # stage -> where a stage that lost every replica restarted from before this step (routes.jsonl
    # records it in the plan's extra.rebuilt, for the replay)
    rebuilt: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return sum(self.losses[i] for i in sorted(self.losses)) / max(1, len(self.losses))
