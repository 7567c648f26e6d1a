"""Process setup shared by every launcher, and the ``launcher=inprocess`` entry point."""

from __future__ import annotations

import os
from typing import Any, Dict

import torch

from skippipe.config import Config


def pin_threads(threads: int) -> None:
    """One thread per rank by default: oversubscription is ~10x slower, and bitwise determinism
    holds only at a fixed thread count."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def train_inprocess(cfg: Config) -> Dict[str, Any]:
    """Train with every stage in this process (the reference executor)."""
    from skippipe.runtime.coordinator import train_inprocess as run

    return run(cfg)
