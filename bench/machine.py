"""What every benchmark records about the machine it ran on (one definition for all of bench/)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                 if line.startswith("model name")), platform.processor())


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> Dict[str, Any]:
    """Python, platform, CPU model and count, threads per rank, torch (and DeepSpeed when installed),
    the commit measured and the load average at the start, plus a one-line ``summary``."""
    import torch

    try:
        import deepspeed

        deepspeed_version = deepspeed.__version__
    except ImportError:
        deepspeed_version = None
    cpus = os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": _cpu_model(), "cpus": cpus,
            "omp_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
            "deepspeed": deepspeed_version, "commit": _commit(), "loadavg_start": load,
            "summary": f"{cpus} CPU cores (shared; load average {load[0]:.1f} at start)" if load else f"{cpus} CPUs"}
