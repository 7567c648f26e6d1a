"""The plan: the scheduler's output for one iteration, consumed by the simulator and every executor.

A plan holds the allocation (node names per stage, stage 0 first), and for every microbatch its
originator (a stage-0 node), its path (the nodes it visits after the originator, in visit order;
the return to the originator for the loss and the exact reverse backward are implicit), and its
planned start time. ``node_order`` optionally fixes, per node, the order of its actions
``(microbatch_id, phase)`` with phase ``F`` (forward), ``L`` (loss at the originator) or ``B``
(backward); executors follow it so that runs are deadlock free and reproducible.

File format ``skippipe.plan.v1`` (JSON): see :meth:`Plan.to_json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from skippipe.errors import PlanError
from skippipe.fileio import absent, write_text_atomic

PLAN_FORMAT = "skippipe.plan.v1"
PHASES = ("F", "L", "B")


def num_stages(schedule) -> int:
    """The stage count of a ``schedule`` config section: ``len(partition_sizes)`` if given, else
    ``num_stages``."""
    return len(schedule.partition_sizes) or schedule.num_stages


def stages_visited(num_stages_: int, skip_ratio: float) -> int:
    """L = S - round(skip_ratio * S), rounding halves up (SkipPipe: 6 stages at 33% -> 4)."""
    skipped = int(math.floor(skip_ratio * num_stages_ + 0.5 + 1e-9))
    return num_stages_ - skipped


@dataclass
class PathRules:
    """SkipPipe path rules (arXiv 2502.19913; DESIGN.md section 5, rules 1-2)."""

    max_swaps: int = 2
    max_swap_distance: int = 1
    max_jump: int = 4

    @classmethod
    def from_config(cls, schedule_cfg) -> "PathRules":
        return cls(schedule_cfg.max_swaps, schedule_cfg.max_swap_distance, schedule_cfg.max_jump)


@dataclass
class MicrobatchRoute:
    id: int
    originator: str
    path: List[str]
    start_s: float = 0.0


@dataclass
class Plan:
    method: str
    num_stages: int
    stages_visited: int
    allocation: List[List[str]]
    microbatches: List[MicrobatchRoute]
    predicted_makespan_s: Optional[float] = None
    node_order: Dict[str, List[Tuple[int, str]]] = field(default_factory=dict)
    extra: Dict[str, object] = field(default_factory=dict)

    # -- lookups --------------------------------------------------------------------------
    def stage_of(self) -> Dict[str, int]:
        return {node: stage for stage, nodes in enumerate(self.allocation) for node in nodes}

    def stages_of(self, mb: MicrobatchRoute) -> List[int]:
        """Stages visited after stage 0, in visit order."""
        stage_of = self.stage_of()
        return [stage_of[node] for node in mb.path]

    def nodes(self) -> List[str]:
        return [node for nodes in self.allocation for node in nodes]

    def visits_of(self, node: str) -> List[int]:
        """Microbatch ids that visit ``node`` (as originator or on the path), in id order."""
        return sorted(mb.id for mb in self.microbatches if mb.originator == node or node in mb.path)

    # -- file format ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {
            "format": PLAN_FORMAT,
            "method": self.method,
            "num_stages": self.num_stages,
            "stages_visited": self.stages_visited,
            "allocation": [list(nodes) for nodes in self.allocation],
            "microbatches": [
                {"id": mb.id, "originator": mb.originator, "path": list(mb.path), "start_s": mb.start_s}
                for mb in self.microbatches
            ],
            "predicted_makespan_s": self.predicted_makespan_s,
        }
        if self.node_order:
            out["node_order"] = {n: [[mb, ph] for mb, ph in acts] for n, acts in self.node_order.items()}
        if self.extra:
            out["extra"] = self.extra
        return out

    def to_json(self, indent: Optional[int] = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict, origin: str = "plan") -> "Plan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{origin}: 'format' must be \"{PLAN_FORMAT}\"")
        for key in ("method", "num_stages", "stages_visited", "allocation", "microbatches"):
            if key not in data:
                raise PlanError(f"{origin}: missing key '{key}'; see skippipe.plan.v1 in the README")
        try:
            mbs = [MicrobatchRoute(int(m["id"]), str(m["originator"]), [str(n) for n in m["path"]],
                                   float(m.get("start_s", 0.0))) for m in data["microbatches"]]
            order = {str(n): [(int(a), str(p)) for a, p in acts]
                     for n, acts in (data.get("node_order") or {}).items()}
            plan = cls(str(data["method"]), int(data["num_stages"]), int(data["stages_visited"]),
                       [[str(n) for n in nodes] for nodes in data["allocation"]], mbs,
                       data.get("predicted_makespan_s"), order, dict(data.get("extra") or {}))
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"{origin}: malformed entry ({err!r}); see skippipe.plan.v1 in the README") from None
        return plan

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan file '{path}' {absent(p)}; write one with `skippipe plan --out FILE`")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise PlanError(f"plan file '{path}' is not valid JSON: {err}") from None
        return cls.from_dict(data, origin=str(path))

    def save(self, path: str | Path) -> None:
        write_text_atomic(Path(path), self.to_json())



# ---------------------------------------------------------------------------------------------
# path rules


def path_rule_violation(stages: Sequence[int], num_stages: int, stages_visited: int,
                        rules: PathRules) -> Optional[str]:
    """Return why a stage sequence (after stage 0) breaks the SkipPipe path rules, or None.

    Rule 1: exactly ``stages_visited - 1`` distinct stages other than 0. Rule 2: a swap (a visit
    below the highest stage so far) goes back at most ``max_swap_distance`` stages, at most
    ``max_swaps`` swaps, and no visit jumps more than ``max_jump`` stages past the highest so far.
    """
    if len(stages) != stages_visited - 1:
        return f"rule 1: visits {len(stages)} stages after stage 0, expected {stages_visited - 1}"
    if len(set(stages)) != len(stages):
        return "rule 1: visits a stage twice"
    highest, swaps = 0, 0
    for stage in stages:
        if not 0 < stage < num_stages:
            return f"rule 1: stage {stage} is not one of 1..{num_stages - 1}"
        if stage > highest:
            if stage - highest > rules.max_jump:
                return f"rule 2: jumps {stage - highest} stages past stage {highest} (max_jump={rules.max_jump})"
            highest = stage
        else:
            swaps += 1
            if highest - stage > rules.max_swap_distance:
                return (f"rule 2: swap back {highest - stage} stages from {highest} to {stage} "
                        f"(max_swap_distance={rules.max_swap_distance})")
            if swaps > rules.max_swaps:
                return f"rule 2: more than {rules.max_swaps} swaps"
    return None


def check_plan(plan: Plan, rules: PathRules, dead: Sequence[str] = ()) -> None:
    """Raise PlanError naming the microbatch and rule if the plan is not executable."""
    if len(plan.allocation) != plan.num_stages:
        raise PlanError(f"plan: allocation has {len(plan.allocation)} stages, num_stages={plan.num_stages}")
    stage_of = plan.stage_of()
    if len(stage_of) != sum(len(n) for n in plan.allocation):
        raise PlanError("plan: a node appears in more than one stage of the allocation")
    if not plan.microbatches:
        raise PlanError("plan: 'microbatches' is empty; a plan routes at least one microbatch")
    if plan.num_stages >= 2 and plan.stages_visited < 2:
        raise PlanError(f"plan: stages_visited={plan.stages_visited}: a microbatch visits stage 0 and at least "
                        "one more stage (rule 1)")
    bad_start = next((mb for mb in plan.microbatches if not (math.isfinite(mb.start_s) and mb.start_s >= 0)), None)
    if bad_start is not None:
        raise PlanError(f"plan: microbatch {bad_start.id}: start_s={bad_start.start_s} must be a finite time >= 0")
    ids = [mb.id for mb in plan.microbatches]
    if sorted(ids) != list(range(len(ids))):
        raise PlanError("plan: microbatch ids must be 0..M-1, each once")
    dead_set = set(dead)
    for mb in plan.microbatches:
        if stage_of.get(mb.originator) != 0:
            raise PlanError(f"plan: microbatch {mb.id}: originator '{mb.originator}' is not a stage-0 node "
                            "(rule 1: a path starts and ends at its originator)")
        for node in [mb.originator, *mb.path]:
            if node not in stage_of:
                raise PlanError(f"plan: microbatch {mb.id}: node '{node}' is not in the allocation")
            if node in dead_set:
                raise PlanError(f"plan: microbatch {mb.id}: node '{node}' is dead")
        if any(stage_of[n] == 0 for n in mb.path):
            raise PlanError(f"plan: microbatch {mb.id}: rule 1: stage 0 is visited only at the start and end")
        why = path_rule_violation([stage_of[n] for n in mb.path], plan.num_stages, plan.stages_visited, rules)
        if why:
            raise PlanError(f"plan: microbatch {mb.id}: {why}")
    for node, acts in plan.node_order.items():
        if node not in stage_of:
            raise PlanError(f"plan: node_order names unknown node '{node}'")
        for mb_id, phase in acts:
            if phase not in PHASES or not 0 <= mb_id < len(ids):
                raise PlanError(f"plan: node_order of '{node}' has a bad action ({mb_id}, {phase})")
