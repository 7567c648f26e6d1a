"""Process setup shared by every launcher: threads, device."""

from __future__ import annotations

import os

import torch

from skippipe.config import Config
from skippipe.errors import ConfigError


def pin_threads(threads: int) -> None:
    """One thread per rank by default: oversubscription is ~10x slower, and bitwise determinism
    holds only at a fixed thread count."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_device(cfg: Config) -> None:
    """``train.device=cuda`` on a torch without CUDA is a user error (one line, exit 2), caught before
    any process starts; otherwise every worker fails deep inside torch."""
    if cfg.train.device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"train.device={cfg.train.device!r} must be cpu, cuda or auto")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "finds no CUDA device"
        raise ConfigError(f"train.device=cuda but torch {torch.__version__} {why}; set train.device=cpu "
                          f"(or auto), or install a CUDA build of torch (README: Scale up)")
