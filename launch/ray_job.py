"""Ray entry point:

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env launch/runtime_env.yaml -- python launch/ray_job.py CONFIG key=value ...

Inside a job RAY_ADDRESS is set and the driver joins that cluster; run directly (no address) it
starts a local Ray instance on 127.0.0.1. ``launcher=ray`` is implied.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working_dir: its skippipe wins


def main(argv) -> int:
    from skippipe.cli import main as cli_main

    has_config = bool(argv) and "=" not in argv[0]
    config, overrides = (argv[0], argv[1:]) if has_config else (None, list(argv))
    return cli_main(["train", *([config] if config else []), *overrides, "launcher=ray"])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
