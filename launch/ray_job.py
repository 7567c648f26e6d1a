"""Ray entry point:

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env launch/runtime_env.yaml -- python launch/ray_job.py CONFIG key=value ...

Inside a job RAY_ADDRESS is set and the driver joins that cluster; run directly (no address) it
starts a local Ray instance on 127.0.0.1. ``launcher=ray`` is implied.

``python`` is the Python on the PATH of the ``ray start`` that started the cluster: start it with the
virtual environment activated (``. .venv/bin/activate``) so that it is the one with skippipe's
dependencies; this script says so in one line when it is not. Outputs go to ``run.dir``, else
``ray.storage_path/<run.name>``, never into Ray's temporary copy of the working directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working_dir: its skippipe wins


def check_python() -> str:
    """'' when this Python can run skippipe, else the one-line reason (the job's ``python`` is whatever
    the cluster's PATH finds, often the system Python)."""
    import importlib.util

    missing = [m for m in ("torch", "omegaconf", "ray") if importlib.util.find_spec(m) is None]
    if not missing:
        return ""
    return (f"error: {sys.executable} has no module {', '.join(missing)}: the job's `python` is not the one "
            f"with skippipe installed; start the cluster with the venv active (`. .venv/bin/activate; ray start ...`) "
            f"or submit `-- /abs/path/to/.venv/bin/python launch/ray_job.py ...`")


def main(argv) -> int:
    problem = check_python()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    from skippipe.cli import main as cli_main
    from skippipe.config import split_config_arg

    config, overrides = split_config_arg(argv)
    return cli_main(["train", *([config] if config else []), *overrides, "launcher=ray"])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
