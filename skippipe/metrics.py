"""Metrics sinks owned by the coordinator: JSONL (runs/<name>/metrics.jsonl), console, wandb.

Names are namespaced (STYLE.md). Per step: ``loss/train``, ``lr``, ``grad_norm``, ``time/iter_s``,
``time/predicted_iter_s``, ``time/plan_s``, ``throughput/tokens_per_s``, ``route/skip_ratio``
(achieved), ``route/swaps``, ``route/collisions`` (predicted by the simulator), ``route/reroutes``,
``stage/<k>/coverage`` (fraction of microbatches that visited stage k), ``stage/<k>/busy_frac``
(measured; distributed launchers only), ``node/<name>/alive``, ``node/<name>/slowdown`` (measured
over modelled compute time), ``cluster/generation`` and, once the run has a ledger, ``verify/chain``
(short hash of the chain head). The final line adds ``loss/val``, ``ppl/val``, ``time/wall_s``,
``tokens``; with ``train.eval_every=k`` a line ``{step, loss/val, ppl/val}`` follows every k-th step
(the parameters after that many steps). Every line of metrics.jsonl is one JSON object with ``step``; wandb and the console get
the same records (every ``tracking.log_every`` steps), and the progress bar shows a few of them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

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
    """``auto``: $WANDB_MODE when set, else online when WANDB_API_KEY is set, else offline (no
    network needed; ``wandb sync`` later). Any other mode is taken as written."""
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "")
        if env in ("online", "offline", "disabled"):
            return env
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class MetricsLogger:
    """Fans each step's metrics out to the JSONL file and, when enabled, to wandb."""

    def __init__(self, run_dir: Path, cfg, append: bool = False):
        self.jsonl = JsonlWriter(run_dir / "metrics.jsonl", append=append)
        self.run_dir = run_dir
        self.log_every = max(1, int(cfg.tracking.log_every))
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
        try:
            return wandb.init(project=w.project, entity=w.entity, name=w.name or cfg.run.name, group=w.group,
                              tags=list(w.tags), config=to_dict(cfg), dir=str(self.run_dir), mode=mode,
                              reinit="finish_previous")
        except Exception as err:  # a tracking outage must not stop training
            log.warning("wandb (mode %s) did not start: %s; metrics go to metrics.jsonl only",
                        mode, str(err).splitlines()[0] if str(err) else type(err).__name__)
            return None

    def log(self, record: Dict[str, Any], step: Optional[int] = None) -> None:
        """Every record goes to metrics.jsonl; to wandb every ``tracking.log_every`` steps and
        always when it holds ``loss/val`` (the final line)."""
        self.jsonl.write(record)
        index = record.get("step", step)
        wanted = index is None or index % self.log_every == 0 or "loss/val" in record
        if self.wandb_run is not None and wanted:
            self.wandb_run.log({k: _jsonable(v) for k, v in record.items() if k != "step"}, step=index)

    def log_plots(self, paths: Iterable[Path], step: Optional[int] = None) -> None:
        """Each plot as a wandb image under ``plots/<file stem>`` (one wandb step for all)."""
        if self.wandb_run is None:
            return
        import wandb

        images = {f"plots/{p.stem}": wandb.Image(str(p)) for p in paths if p.is_file()}
        if images:
            self.wandb_run.log(images, step=step)

    def log_checkpoint_manifests(self, run_dir: Path) -> int:
        """Log every ``ckpt/<step>/manifest.json`` of the run as one wandb artifact; returns how many."""
        manifests = sorted(Path(run_dir).glob("ckpt/*/manifest.json"))
        if self.wandb_run is None or not manifests:
            return 0
        import wandb

        artifact = wandb.Artifact(f"{self.wandb_run.name or 'run'}-checkpoints".replace("/", "-"),
                                  type="checkpoint-manifest")
        for path in manifests:
            artifact.add_file(str(path), name=f"{path.parent.name}/manifest.json")
        self.wandb_run.log_artifact(artifact)
        return len(manifests)

    def log_run_outputs(self, run_dir: Path, step: Optional[int] = None) -> List[Path]:
        """End of run: draw ``plots/*.png`` (skippipe.plots) and give them and the checkpoint
        manifests to wandb. A plotting failure is a warning: the trained run is already saved."""
        from skippipe.plots import plot_run

        if step == 0:
            return []  # no training step: nothing to draw
        try:
            paths = plot_run(run_dir)
        except Exception as err:  # noqa: BLE001 (never lose a finished run to a plot)
            log.warning("plots were not written: %s: %s", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            paths = []
        self.log_plots(paths, step=step)
        self.log_checkpoint_manifests(run_dir)
        return paths

    def summary(self, values: Dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = _jsonable(v)

    def close(self) -> None:
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


# ---------------------------------------------------------------------------------------------
# skip-aware metrics the coordinator adds to every step (beyond route_stats and measured_stats)


def plan_collisions(plan, cost, memory: Optional[int] = None) -> int:
    """Predicted collisions of a plan: the planner's own count, else a simulation on ``cost``."""
    known = plan.extra.get("collisions")
    if isinstance(known, (int, float)):
        return int(known)
    from skippipe.errors import PlanError
    from skippipe.simulate import simulate

    try:
        return simulate(plan, cost, memory).collisions
    except PlanError:  # a replayed order that deadlocks on today's cost model: no prediction
        return -1


def cluster_stats(planner, plan, generation: int = 0, reroutes: int = 0,
                  chain: Optional[str] = None) -> Dict[str, Any]:
    """``route/collisions``, ``route/reroutes``, ``node/<n>/alive``, ``node/<n>/slowdown``,
    ``cluster/generation`` and, when the run keeps a ledger, ``verify/chain`` (its head, shortened)."""
    dead = set(planner.state.dead)
    stats: Dict[str, Any] = {"route/collisions": plan_collisions(plan, planner.cost, planner.cfg.schedule.memory),
                             "route/reroutes": int(reroutes), "cluster/generation": int(generation)}
    for node in planner.topology.names():
        stats[f"node/{node}/alive"] = 0 if node in dead else 1
        stats[f"node/{node}/slowdown"] = float(planner.cost.slowdown(node))
    if chain:
        stats["verify/chain"] = short_hash(chain)
    return stats


def short_hash(value: str, length: int = 12) -> str:
    """The first ``length`` hex digits of a hash: enough to tell chain heads apart by eye."""
    return str(value)[:length]


def live_nodes(record: Dict[str, Any]) -> tuple:
    """(alive, total) from a record's ``node/<n>/alive`` entries."""
    flags = [v for k, v in record.items() if k.startswith("node/") and k.endswith("/alive")]
    return sum(1 for v in flags if v), len(flags)


# ---------------------------------------------------------------------------------------------
# console


class Progress:
    """The run's one progress bar (rank 0): step, loss, iteration time, skip ratio, live nodes.

    With ``tracking.progress=false`` it logs one line every ``tracking.log_every`` steps instead.
    """

    def __init__(self, total: int, enabled: bool, log_every: int = 1):
        from tqdm import tqdm

        self.enabled = enabled
        self.log_every = max(1, int(log_every))
        self.bar = tqdm(total=total, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)

    def update(self, record: Dict[str, Any]) -> None:
        alive, total = live_nodes(record)
        fields = {"loss": f"{record['loss/train']:.3f}", "iter_s": f"{record['time/iter_s']:.2f}",
                  "skip": f"{record.get('route/skip_ratio', 0.0):.2f}", "live": f"{alive}/{total}"}
        if self.enabled:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(1)
        elif record["step"] % self.log_every == 0:
            log.info("step %d  %s", record["step"], "  ".join(f"{k} {v}" for k, v in fields.items()))

    def close(self) -> None:
        self.bar.close()


def summary_table(summary: Dict[str, Any], run_dir: Optional[Path] = None) -> str:
    """The end-of-run table: steps, tokens, wall time, final losses, reroutes, verify chain head."""

    def num(key: str, fmt: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else format(value, fmt)

    rows: List[tuple] = [
        ("steps", num("step", "d")),
        ("tokens", num("tokens", ",d")),
        ("wall time", f"{num('time/wall_s', '.1f')} s"),
        ("train loss (last step)", num("loss/train", ".4f")),
        ("val loss", num("loss/val", ".4f")),
        ("val perplexity", num("ppl/val", ".2f")),
        ("reroutes", num("route/reroutes", "d") if "route/reroutes" in summary else "0"),
        ("verify chain head", short_hash(summary["verify/chain"]) if summary.get("verify/chain") else "n/a (no ledger)"),
    ]
    if run_dir is not None:
        rows.append(("outputs", str(run_dir)))
    width = max(len(name) for name, _ in rows)
    rule = "-" * (width + 2 + max(len(value) for _, value in rows))
    return "\n".join(["summary", rule, *(f"{name:<{width}}  {value}" for name, value in rows), rule])
