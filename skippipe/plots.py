"""A run's plots, ``runs/<name>/plots/*.png`` (DESIGN.md section 8), drawn from its files alone.

- ``loss.png``: training loss per step and the validation loss;
- ``gantt_step<k>.png``: planned (the simulator on the run's cost model, following the plan's node
  order) vs executed timeline per node for one step. Distributed runs report per-node compute and
  wait totals in routes.jsonl (drawn as stacked bars); a ``timings[node]["events"]`` list of
  ``[microbatch, phase, start_s, end_s]``, when a worker reports it, is drawn action by action;
- ``coverage.png``: a stage x step heat map of the fraction of each step's microbatches that visited
  each stage (a node lost at step 5 shows from step 5 on), and per stage its mean over the run
  (whiskers: the lowest and highest step) with the measured busy fraction;
- ``iter_time.png``: measured vs predicted iteration time per step.

Written at the end of training and on demand by ``skippipe plot RUN``. matplotlib is imported lazily
with the Agg backend, so no display is needed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from skippipe.fileio import absent, atomic_path, ensure_dir
from skippipe.gantt import draw_events, node_rows, phase_legend, stage_separators
from skippipe.runfiles import read_jsonl, read_metrics, read_run_config

log = logging.getLogger(__name__)

_TOTAL_COLOURS = {"F": "tab:blue", "L": "tab:purple", "B": "tab:cyan", "wait": "tab:red", "other": "lightgrey"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    ensure_dir(path.parent)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    _pyplot().close(fig)
    return path


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _series(metrics: List[Dict[str, Any]], key: str):
    points = [(m["step"], m[key]) for m in metrics if m.get(key) is not None and "step" in m]
    return [p[0] for p in points], [p[1] for p in points]


# ---------------------------------------------------------------------------------------------
# one plot each


def plot_loss(metrics: List[Dict[str, Any]], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, train = _series([m for m in metrics if "loss/val" not in m], "loss/train")
    ax.plot(steps, train, label="train", color="tab:blue")
    val_steps, val = _series(metrics, "loss/val")
    if val:
        ax.plot(val_steps, val, "o--", color="tab:orange", label="validation")
        ax.annotate(f"{val[-1]:.3f} (ppl {math.exp(val[-1]):.1f})", (val_steps[-1], val[-1]),
                    textcoords="offset points", xytext=(-10, 8), ha="right", fontsize=8)
    ax.set_xlabel("step")
    _integer_steps(ax)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_iter_time(metrics: List[Dict[str, Any]], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, measured = _series(metrics, "time/iter_s")
    ax.plot(steps, measured, "o-", ms=3, label="measured", color="tab:blue")
    p_steps, predicted = _series(metrics, "time/predicted_iter_s")
    if predicted:
        ax.plot(p_steps, predicted, "s--", ms=3, label="predicted (simulator)", color="tab:green")
    ax.set_xlabel("step")
    _integer_steps(ax)
    ax.set_ylabel("iteration time (s)")
    _clip_outliers(ax, steps, measured, predicted)
    ax.set_title(title or "iteration time")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _clip_outliers(ax, steps, measured, predicted) -> None:
    """Keep the y axis on the typical step: a start-up step (workers starting, first plan) can be
    ten times slower and would flatten the rest; off-scale points are labelled with their value."""
    ordered = sorted(measured)
    typical = ordered[len(ordered) // 2] if ordered else 0.0
    top = 3.0 * max([typical, *predicted, 1e-9])
    if not measured or max(measured) <= top:
        ax.set_ylim(bottom=0)
        return
    ax.set_ylim(0, top)
    for step, value in zip(steps, measured):
        if value > top:
            ax.annotate(f"step {step}: {value:.1f} s (off scale)", (step, top), textcoords="offset points",
                        xytext=(4, -12), fontsize=8, color="tab:blue")


def plot_links(metrics: List[Dict[str, Any]], topology, path: Path, title: str = "", limit: int = 8) -> Optional[Path]:
    """Measured (``link/<a>-<b>/latency_ms`` and ``/gbps``, solid) against configured (the run's
    topology, dashed) per link over the steps; the ``limit`` links furthest from their configured
    values. None when the run measured no links (in-process runs)."""
    keys = sorted({k.rsplit("/", 1)[0] for m in metrics for k in m if k.startswith("link/") and k.endswith("/latency_ms")})
    if not keys:
        return None
    from skippipe.topology import split_link

    names = topology.names()
    links = [(k, split_link(k[len("link/"):], names)) for k in keys]
    links = [(k, pair) for k, pair in links if pair is not None]
    if not links:
        return None

    def deviation(item):
        key, (a, b) = item
        _, lat = _series(metrics, key + "/latency_ms")
        configured = topology.latency_s(a, b) * 1e3
        return max(max(v / configured, configured / v) if v > 0 and configured > 0 else 1.0 for v in lat)

    links = sorted(links, key=deviation, reverse=True)[:limit]
    plt = _pyplot()
    fig, (ax_lat, ax_bw) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for i, (key, (a, b)) in enumerate(links):
        colour = f"C{i % 10}"
        for ax, suffix, configured in ((ax_lat, "/latency_ms", topology.latency_s(a, b) * 1e3),
                                       (ax_bw, "/gbps", topology.bandwidth_bytes_per_s(a, b) * 8 / 1e9)):
            steps, values = _series(metrics, key + suffix)
            ax.plot(steps, values, "o-", ms=2, color=colour, label=f"{a}-{b} measured" if ax is ax_lat else None)
            ax.axhline(configured, color=colour, ls="--", lw=0.8)
    ax_lat.set_ylabel("latency (ms)")
    ax_bw.set_ylabel("bandwidth (Gbit/s)")
    for ax in (ax_lat, ax_bw):
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    ax_bw.set_xlabel("step")
    _integer_steps(ax_bw)
    ax_lat.legend(fontsize=7, ncol=2)
    ax_lat.set_title(title or "links: measured (solid) vs configured (dashed)")
    return _save(fig, path)


def plot_coverage(metrics: List[Dict[str, Any]], path: Path, title: str = "") -> Path:
    """Top: stage x step heat map of ``stage/<k>/coverage``. Bottom: per stage, the mean over the run
    (whiskers: lowest and highest step) and the measured busy fraction."""
    plt = _pyplot()
    steps = [m for m in metrics if "loss/train" in m and "loss/val" not in m]
    stages = sorted({int(k.split("/")[1]) for m in steps for k in m if k.startswith("stage/") and k.endswith("/coverage")})
    fig, (heat_ax, ax) = plt.subplots(2, 1, figsize=(8, 6.5), gridspec_kw={"height_ratios": [1.2, 1]})
    _coverage_heatmap(fig, heat_ax, steps, stages)
    has_busy = any(f"stage/{s}/busy_frac" in m for m in steps for s in stages)
    width = 0.4 if has_busy else 0.6
    for offset, key, colour, label in ((0.0, "coverage", "tab:blue", "coverage: mean over steps (whiskers: min, max)"),
                                       (width, "busy_frac", "tab:orange", "busy fraction (measured): mean, min, max")):
        if key == "busy_frac" and not has_busy:
            continue
        values = [[m[f"stage/{s}/{key}"] for m in steps if f"stage/{s}/{key}" in m] for s in stages]
        means = [sum(v) / len(v) if v else 0.0 for v in values]
        low = [mean - min(v) if v else 0.0 for mean, v in zip(means, values)]
        high = [max(v) - mean if v else 0.0 for mean, v in zip(means, values)]
        ax.bar([s + offset for s in stages], means, width, yerr=[low, high], capsize=3, color=colour, label=label)
    ax.set_xticks([s + (width / 2 if has_busy else 0) for s in stages])
    ax.set_xticklabels([f"stage {s}" for s in stages])
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("fraction")
    ax.set_title("per stage, over the run", loc="left", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(title or "per-stage coverage")
    return _save(fig, path)


def _coverage_heatmap(fig, ax, steps: List[Dict[str, Any]], stages: List[int]) -> None:
    """Fraction of each step's microbatches that visited each stage; blank where not recorded."""
    nan = float("nan")
    grid = [[m.get(f"stage/{s}/coverage", nan) for m in steps] for s in stages]
    step_ids = [m["step"] for m in steps]
    if not step_ids or not stages:
        ax.set_title("coverage per step: no data", loc="left", fontsize=10)
        return
    extent = (step_ids[0] - 0.5, step_ids[-1] + 0.5, stages[-1] + 0.5, stages[0] - 0.5)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, extent=extent, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="fraction of the step's\nmicrobatches visiting", pad=0.01)
    ax.set_yticks(stages)
    ax.set_yticklabels([f"stage {s}" for s in stages])
    ax.set_xlabel("step")
    _integer_steps(ax)
    ax.set_title("coverage per step (stage 0 starts and ends every microbatch: 1.0)", loc="left", fontsize=10)


def plot_gantt(line: Dict[str, Any], cost, memory: Optional[int], path: Path, title: str = "") -> Path:
    """Planned (simulated) vs executed timeline of one routes.jsonl line, one row per node."""
    from skippipe.errors import PlanError
    from skippipe.plan import Plan
    from skippipe.simulate import simulate

    plt = _pyplot()
    plan = Plan.from_dict(line["plan"], origin=f"routes.jsonl step {line['step']}")
    stage_of = plan.stage_of()
    row, labels = node_rows(stage_of, stage_of)
    timings = line.get("timings") or {}
    panels = 2 if timings else 1
    fig, axes = plt.subplots(panels, 1, figsize=(12, (0.6 * len(row) + 1.4) * panels + 0.8), squeeze=False,
                             sharex=True)
    planned_ax = axes[0][0]
    try:
        timeline = simulate(plan, cost, memory)
        draw_events(planned_ax, timeline.events, row)
        for _, start, end in timeline.allreduce:
            planned_ax.axvspan(start, end, color="grey", alpha=0.15)
        phase_legend(planned_ax, allreduce=bool(timeline.allreduce))
        planned_ax.set_title(f"planned: {plan.method}, {timeline.makespan_s:.3f} s, {timeline.collisions} collisions"
                             + ("" if timings else "  (executed timings: distributed launchers only)"),
                             loc="left", fontsize=10, pad=22)
    except PlanError as err:
        planned_ax.set_title(f"planned: not simulable on this cost model ({str(err)[:60]})", loc="left", fontsize=10)
    _node_axis(planned_ax, labels)
    stage_separators(planned_ax, row, stage_of)
    if timings:
        _draw_executed(axes[1][0], timings, row)
        _node_axis(axes[1][0], labels)
        stage_separators(axes[1][0], row, stage_of)
    fig.suptitle(title or f"step {line['step']}")
    return _save(fig, path)


def _draw_executed(ax, timings: Dict[str, Dict[str, Any]], row) -> None:
    if any(t.get("events") for t in timings.values()):
        draw_events(ax, [(n, *e) for n, t in timings.items() for e in t.get("events") or []], row)
        ax.set_title("executed (per action, as reported by the workers)", loc="left", fontsize=10)
        return
    labelled = set()
    for node, t in timings.items():
        if node not in row:
            continue
        left = 0.0
        compute = t.get("compute_s") or {}
        wait = float(t.get("recv_wait_s") or 0.0)
        other = max(0.0, float(t.get("step_s") or 0.0) - sum(compute.values()) - wait)
        for part, seconds in [*((p, float(compute.get(p, 0.0))) for p in ("F", "L", "B")), ("wait", wait), ("other", other)]:
            label = {"F": "forward", "L": "loss", "B": "backward", "wait": "waiting to receive",
                     "other": "other (send, reduce, optimizer)"}[part]
            ax.barh(row[node], seconds, left=left, color=_TOTAL_COLOURS[part], edgecolor="black", linewidth=0.2,
                    label=None if label in labelled else label)
            labelled.add(label)
            left += seconds
    ax.set_title("executed (per-node totals of the step, measured by the workers)", loc="left", fontsize=10, pad=22)
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=5, frameon=False)


def _node_axis(ax, labels: List[str]) -> None:
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlabel("time in the step (s)")


# ---------------------------------------------------------------------------------------------
# a whole run


def plot_run(run_dir: str | Path, step: Optional[int] = None, out_dir: Optional[str | Path] = None) -> List[Path]:
    """Draw every plot of a run into ``out_dir`` (default ``RUN/plots``); returns the files written.

    ``step`` chooses the Gantt chart's step (default: the last step in routes.jsonl).
    """
    from skippipe.errors import UserError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory '{run_dir}' {absent(run_dir, 'directory')}; give a directory written by "
                        "`skippipe train`")
    metrics = read_metrics(run_dir)
    if not any("loss/train" in m for m in metrics):
        raise UserError(f"'{run_dir}/metrics.jsonl' has no training step yet; nothing to plot")
    out = Path(out_dir) if out_dir else run_dir / "plots"
    name = run_dir.name
    gantt = _plot_run_gantt(run_dir, out, step)  # first: a bad --step fails before anything is written
    written = [plot_loss(metrics, out / "loss.png", f"{name}: loss"),
               plot_iter_time(metrics, out / "iter_time.png", f"{name}: iteration time"),
               plot_coverage(metrics, out / "coverage.png", f"{name}: per-stage coverage")]
    if (run_dir / "topology.yaml").is_file():
        from skippipe.topology import Topology

        links = plot_links(metrics, Topology.from_yaml(run_dir / "topology.yaml"), out / "links.png",
                           f"{name}: links, measured (solid) vs configured (dashed)")
        written += [links] if links is not None else []
    return written + ([gantt] if gantt is not None else [])


def _plot_run_gantt(run_dir: Path, out: Path, step: Optional[int]) -> Optional[Path]:
    from skippipe.errors import UserError

    routes_path = run_dir / "routes.jsonl"
    lines = {int(line["step"]): line for line in read_jsonl(routes_path)} if routes_path.is_file() else {}
    explicit = step is not None
    if not lines:
        if explicit:
            raise UserError(f"'{routes_path}' holds no steps; cannot draw the Gantt chart of step {step}")
        return None
    if step is None:
        step = max(lines)
    if step not in lines:
        raise UserError(f"--step {step}: '{routes_path}' holds steps {min(lines)}..{max(lines)}")
    try:
        cfg = read_run_config(run_dir, need_topology=True)
    except UserError as err:
        if not explicit:
            log.warning("no Gantt chart: %s", err)
            return None
        raise
    from skippipe.schedule import build_cost

    _, _, cost = build_cost(cfg)
    return plot_gantt(lines[step], cost, cfg.schedule.memory, out / f"gantt_step{step}.png",
                      f"{run_dir.name}: step {step}, planned vs executed")
