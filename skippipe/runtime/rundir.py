"""The run directory's safety rules: validate first, write after.

A command either refuses (exit 2) before it writes a byte into ``run.dir``, or it owns the directory:

- a new run goes only into a missing or empty directory, or over an old run with ``run.overwrite=true``
  (which removes that run's outputs first, and nothing else);
- ``run.resume=true`` checks the newest checkpoint against its manifest and the ledger, and the
  ledger's header and chain against this config, before the config, metrics or routes are touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from skippipe.config import Config, run_dir
from skippipe.errors import UserError

# what a run writes into its directory (DESIGN.md section 8, plus wandb's offline files)
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "routes.jsonl", "topology.yaml", "ledger", "ckpt", "final",
               "plots", "wandb", "summary.json")


def check_run_dir(cfg: Config) -> None:
    """Refuse to start a new run over an existing one (read-only)."""
    out = run_dir(cfg)
    if cfg.run.resume or cfg.run.overwrite or not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"run dir {out} is a file; set run.dir to a directory")
    if any(out.iterdir()):
        raise UserError(f"run dir {out} holds a run; pass run.resume=true, or run.overwrite=true to start over")


def prepare(cfg: Config, header_extra: Dict[str, Any]) -> Optional[int]:
    """Validate the run directory for this command; returns the checkpoint step to resume after
    (None: start at step 0). Raises UserError before anything is written; with ``run.overwrite``
    removes the old run's outputs (only after every check passed)."""
    check_run_dir(cfg)
    out = run_dir(cfg)
    if cfg.run.resume:
        keep_lr_schedule(cfg, out)  # before the header is compared: a resume may change train.steps
        return _check_resume(cfg, out, header_extra)
    if cfg.run.overwrite and out.is_dir():
        for name in RUN_OUTPUTS:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    return None


def keep_lr_schedule(cfg: Config, out: Path) -> None:
    """``run.resume=true`` with another ``train.steps`` extends (or shortens) the run: the learning-rate
    schedule keeps the horizon the run was started with (``train.lr_steps``; past it the lr stays at
    ``min_lr_ratio * lr``), so the steps already in the ledger keep their lr and still replay. Reads
    the run's config.yaml, writes nothing."""
    import logging

    from skippipe.runfiles import read_config_data

    if not cfg.run.resume or cfg.train.lr_steps is not None or not (out / "config.yaml").is_file():
        return
    old = read_config_data(out).get("train") or {}
    horizon = old.get("lr_steps") or old.get("steps")
    if horizon is not None and horizon != cfg.train.steps:
        cfg.train.lr_steps = int(horizon)
        logging.getLogger("skippipe").info(
            "run.resume: train.steps %s -> %d; the learning-rate schedule keeps its horizon of %d steps "
            "(train.lr_steps=%d)", old.get("steps"), cfg.train.steps, horizon, horizon)


def _check_resume(cfg: Config, out: Path, header_extra: Dict[str, Any]) -> Optional[int]:
    from skippipe.runtime.recorder import find_resume_point
    from skippipe.verify.ledger import make_header, resume_lines

    step = find_resume_point(out)
    if step is not None and cfg.verify.level != "off":
        resume_lines(out / "ledger", make_header(cfg, header_extra), step)
    if step is not None and step + 1 > cfg.train.steps:
        raise UserError(f"run.resume: {out} has a checkpoint after step {step} but train.steps={cfg.train.steps}; "
                        f"set train.steps >= {step + 1}")
    return step
