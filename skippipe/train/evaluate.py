"""Validation loss of a set of stages along a path, and loading a run's saved stages."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from skippipe.errors import UserError
from skippipe.model.transformer import Stage, build_stages, forward_path


@torch.no_grad()
def evaluate(stages: Dict[int, Stage], batches, stage_path: Optional[Sequence[int]] = None,
             device: str | torch.device = "cpu") -> float:
    """Mean loss over ``batches`` along ``stage_path`` (stages after 0; default: all in order)."""
    path = sorted(k for k in stages if k != 0) if stage_path is None else list(stage_path)
    total = 0.0
    for inputs, targets in batches:
        total += float(forward_path(stages, inputs.to(device), targets.to(device), path))
    return total / max(1, len(batches))


def load_stages(directory: Path, spec, num_stages: int, seed: int = 0,
                allow_missing: bool = False) -> Dict[int, Stage]:
    """Stages saved as ``stage<k>.pt`` (tensors only; loaded with weights_only=True).

    ``allow_missing``: leave out non-zero stages that have no file (a stage that lost every replica
    during training and was never replaced); paths then skip them, as training did."""
    from skippipe.verify.checkpoint import stage_file_problem

    stages = build_stages(spec, num_stages, seed)
    for k, stage in list(stages.items()):
        path = Path(directory) / f"stage{k}.pt"
        if not path.is_file() and allow_missing and k != 0:
            del stages[k]
            continue
        if not path.is_file():
            raise UserError(f"'{path}' is missing; was the run finished?")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            stage.load_state_dict(state)
        except Exception as err:
            raise UserError(f"'{path}' is not a stage checkpoint of this model: {str(err).splitlines()[0]}") from None
        problem = stage_file_problem(path, state)
        if problem:
            raise UserError(f"{problem}; restore the file from a copy, or train the run again")
    return stages
