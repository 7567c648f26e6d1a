"""Metrics sinks owned by the coordinator: JSONL (runs/<name>/metrics.jsonl), console, wandb.

Names are namespaced (STYLE.md): ``loss/train``, ``time/iter_s``, ``route/skip_ratio``, ...
Every line of metrics.jsonl is one JSON object with ``step``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlWriter:
    """Append-only JSON lines, flushed per line so a crash keeps every finished step."""

    def __init__(self, path: Path, append: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def wandb_mode(mode: str) -> str:
    """``auto``: online when WANDB_API_KEY is set, else offline (no network needed; sync later)."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class MetricsLogger:
    """Fans each step's metrics out to the JSONL file and, when enabled, to wandb."""

    def __init__(self, run_dir: Path, cfg, append: bool = False):
        self.jsonl = JsonlWriter(run_dir / "metrics.jsonl", append=append)
        self.run_dir = run_dir
        self.wandb_run = None
        mode = wandb_mode(cfg.tracking.wandb.mode)
        if mode != "disabled":
            self.wandb_run = self._start_wandb(cfg, mode)

    def _start_wandb(self, cfg, mode: str):
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed; metrics go to metrics.jsonl only")
            return None
        from skippipe.config import to_dict

        w = cfg.tracking.wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(project=w.project, entity=w.entity, name=w.name or cfg.run.name, group=w.group,
                          tags=list(w.tags), config=to_dict(cfg), dir=str(self.run_dir), mode=mode,
                          reinit="finish_previous")

    def log(self, record: Dict[str, Any], step: Optional[int] = None) -> None:
        self.jsonl.write(record)
        if self.wandb_run is not None:
            self.wandb_run.log({k: _jsonable(v) for k, v in record.items() if k != "step"},
                               step=record.get("step", step))

    def log_image(self, key: str, path: Path, step: Optional[int] = None) -> None:
        if self.wandb_run is not None and path.is_file():
            import wandb

            self.wandb_run.log({key: wandb.Image(str(path))}, step=step)

    def summary(self, values: Dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = _jsonable(v)

    def close(self) -> None:
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
