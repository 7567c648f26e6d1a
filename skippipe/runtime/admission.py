"""Where the stage of a node admitted into a new generation comes from.

A replacement or a new node of a stage with a live replica copies it (``sync``: parameters and
AdamW state broadcast from the first live replica). A stage that lost every replica restarts from
``fault.rebuild``: ``init`` (the seeded initial parameters), ``checkpoint`` (the newest verified
checkpoint that holds it) or ``checkfree`` (the average of the neighbouring stages, CheckFree arXiv
2506.15461). ``origin`` records the choice for the ledger: the replay must do the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set

log = logging.getLogger("skippipe")


@dataclass
class StageSources:
    sync: Dict[int, str] = field(default_factory=dict)  # stage -> the live replica it is copied from
    rebuild: Dict[int, List[str]] = field(default_factory=dict)  # stage -> neighbours averaged (CheckFree)
    restore: Dict[int, str] = field(default_factory=dict)  # stage -> checkpoint directory its new replica loads
    origin: Dict[int, Dict[str, Any]] = field(default_factory=dict)  # stage with no survivor -> where it restarts from


def stage_sources(ready: List[str], allocation: List[List[str]], live: Set[str], rebuild: str,
                  checkpoint_of: Callable[[int], Optional[Path]]) -> StageSources:
    """The source of each admitted node's stage (``ready``: in admission order)."""
    out = StageSources()
    for node in ready:
        stage = next(k for k, nodes in enumerate(allocation) if node in nodes)
        sources = [n for n in allocation[stage] if n in live]
        if sources:
            out.sync[stage] = sources[0]
        elif stage in out.origin:
            continue  # another new replica of the same stage: it starts like the first one
        elif rebuild == "checkpoint" and checkpoint_of(stage) is not None:
            out.restore[stage] = str(checkpoint_of(stage))
            out.origin[stage] = {"from": "checkpoint", "step": int(Path(out.restore[stage]).name)}
            log.warning("stage %d lost every replica: %s restores it from %s", stage, node, out.restore[stage])
        elif rebuild == "checkfree":
            neighbours = [k for k in (stage - 1, stage + 1)
                          if 0 <= k < len(allocation) and any(n in live for n in allocation[k])]
            out.rebuild[stage] = [next(n for n in allocation[k] if n in live) for k in neighbours]
            out.origin[stage] = {"from": "checkfree", "stages": neighbours}
            log.warning("stage %d lost every replica: %s rebuilds it from the average of stages %s "
                        "(CheckFree)", stage, node, out.rebuild[stage])
        else:
            out.origin[stage] = {"from": "init"}
            log.warning("stage %d lost every replica: %s restarts it from its initial parameters", stage, node)
    return out


def verified_checkpoint(cfg, stage: int) -> Optional[Path]:
    """The newest checkpoint of this run that holds ``stage`` and verifies against its manifest
    and the ledger (later ones, written after the stage lost every replica, lack it)."""
    from skippipe.config import run_dir
    from skippipe.verify.checkpoint import newest_verified_checkpoint
    from skippipe.verify.ledger import read_ledger

    out = run_dir(cfg)
    if not (out / "ledger" / "steps.jsonl").is_file():
        return None
    step, _ = newest_verified_checkpoint(out, read_ledger(out), holding=f"stage{stage}.pt")
    return None if step is None else Path(out) / "ckpt" / str(step)
