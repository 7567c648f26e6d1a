"""The route log: ``runs/<name>/routes.jsonl``, one line per executed step.

Each line is ``{"step", "generation", "plan": <skippipe.plan.v1 object>, "timings": {node: report},
"iter_s", "warm"}``: the plan, the workers' measured times (:data:`runtime.wire.TIMING_KEYS`) and
the coordinator's iteration time, so the predictor can be replayed offline. Routes
are an input of the computation (DESIGN.md section 5): ``schedule.routes_from=RUN_DIR`` replays
them step by step, so a run is reproducible bit for bit given its route log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from skippipe.errors import UserError
from skippipe.metrics import JsonlWriter
from skippipe.plan import Plan


class RouteLog:
    def __init__(self, run_dir: Path, append: bool = False):
        self._writer = JsonlWriter(run_dir / "routes.jsonl", append=append)

    def record(self, step: int, plan: Plan, generation: int = 0, timings: Optional[Dict[str, Any]] = None,
               iter_s: Optional[float] = None, warm: Optional[bool] = None,
               coordinator_cpu_s: Optional[float] = None) -> None:
        line = {"step": step, "generation": generation, "plan": plan.to_dict()}
        if timings:
            line["timings"] = timings
        if iter_s is not None:
            line["iter_s"] = iter_s
        if warm is not None:
            line["warm"] = warm
        if coordinator_cpu_s is not None:
            line["coordinator_cpu_s"] = coordinator_cpu_s
        self._writer.write(line)

    def close(self) -> None:
        self._writer.close()


def read_routes(run_dir: str | Path) -> Dict[int, Plan]:
    """step -> the plan executed at that step (the last line wins if a step was redone)."""
    path = Path(run_dir) / "routes.jsonl"
    if not path.is_file():
        raise UserError(f"schedule.routes_from: '{path}' does not exist; point it at a finished run directory")
    plans: Dict[int, Plan] = {}
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            plans[int(line["step"])] = Plan.from_dict(line["plan"], origin=f"{path}:{number}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path}:{number}: not a route-log line ({err}); the file is damaged") from None
    return plans
