"""Gantt chart of a simulated timeline: one row per node, one colour per microbatch (DESIGN.md 8).

Forwards are solid, the loss hatched, backwards lighter; gradient all-reduce in grey.
"""

from __future__ import annotations

from pathlib import Path

from skippipe.simulate import Timeline


def draw_gantt(timeline: Timeline, path: str | Path, title: str = "") -> Path:
    """Write the chart to ``path`` (PNG); matplotlib is imported lazily with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = sorted({e[0] for e in timeline.events} | set(timeline.busy_s), key=_natural)
    row = {n: i for i, n in enumerate(nodes)}
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(12, 0.35 * len(nodes) + 1.5))
    for node, mb, phase, start, end in timeline.events:
        alpha = {"F": 1.0, "L": 0.8, "B": 0.55}[phase]
        ax.barh(row[node], end - start, left=start, color=cmap(mb % 20), alpha=alpha,
                hatch="//" if phase == "L" else None, edgecolor="black", linewidth=0.2)
    ax.set_yticks(range(len(nodes)))
    ax.set_yticklabels(nodes, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_title(title or f"makespan {timeline.makespan_s:.1f} s, {timeline.collisions} collisions")
    for _, start, end in timeline.allreduce:
        ax.axvspan(start, end, color="grey", alpha=0.1)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _natural(name: str):
    digits = "".join(ch for ch in name if ch.isdigit())
    return (name.rstrip("0123456789"), int(digits) if digits else -1, name)
