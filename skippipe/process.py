"""Process setup shared by every launcher: threads, device, and the torchrun environment contract
that every worker reads (:class:`skippipe.runtime.worker.WorkerEnv`), whichever launcher started it."""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Dict

import torch

from skippipe.config import Config
from skippipe.errors import ConfigError


def pin_threads(threads: int) -> None:
    """One thread per rank by default: oversubscription is ~10x slower, and bitwise determinism
    holds only at a fixed thread count."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


# glibc's mallopt parameters and the values ``runtime.host_memory=retain`` sets: allocations up to
# 32 MiB (glibc's largest mmap threshold) come from the heap, and up to 64 MiB of freed memory at the
# heap's top stays in the process instead of being returned to the OS at every free
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
RETAIN_MMAP_BYTES, RETAIN_TRIM_BYTES = 32 << 20, 64 << 20


def set_host_memory(policy: str) -> bool:
    """``runtime.host_memory``: with ``retain``, freed host memory stays in the process.

    By default glibc serves every allocation above a (moving) threshold with a fresh ``mmap`` and
    trims the heap after frees, so each step's activations, gradients and received tensors are
    page-faulted in anew: measured on the overhead shape of ``bench/runtime_bench.py``, ~12,000
    minor faults per second and 7% of the CPU in the kernel, against ~160 faults per second with the
    thresholds fixed. Peak memory is unchanged (the memory was in use at the peak); the resident size
    between steps stays nearer the peak. Returns whether the setting took (glibc only; elsewhere,
    and with ``system``, the C library's defaults stay)."""
    if policy != "retain" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, RETAIN_MMAP_BYTES)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, RETAIN_TRIM_BYTES))
    except (OSError, AttributeError):
        return False


def resolve_device(name: str) -> str:
    """``train.device``: ``auto`` is cuda when torch sees a GPU, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def torchrun_env(rank: int, world_size: int, local_rank: int, local_world_size: int, addr: str, port: int,
                 threads: int, node: str, incarnation: int = 0, secret: str = "") -> Dict[str, str]:
    """The torchrun environment contract (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), so one worker code path serves every launcher, plus the node's name, its
    incarnation (a replacement's count) and the control channel's secret. ``local_rank`` picks the
    CUDA device: the rank on one box (``launcher=local``), 0 for a Ray actor (Ray sets
    ``CUDA_VISIBLE_DEVICES`` to the actor's own GPU)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_world_size), "MASTER_ADDR": addr, "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "SKIPPIPE_NODE": node,
            "SKIPPIPE_INCARNATION": str(incarnation), "SKIPPIPE_CONTROL_SECRET": secret,
            # c10d's C++ socket warnings after a handled fault (a peer died: the coordinator says so in one line)
            "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")}


def check_device(cfg: Config) -> None:
    """``train.device=cuda`` on a torch without CUDA is a user error (one line, exit 2), caught before
    any process starts; otherwise every worker fails deep inside torch."""
    if cfg.train.device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"train.device={cfg.train.device!r} must be cpu, cuda or auto")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "finds no CUDA device"
        raise ConfigError(f"train.device=cuda but torch {torch.__version__} {why}; set train.device=cpu "
                          f"(or auto), or install a CUDA build of torch (README: Scale up)")
