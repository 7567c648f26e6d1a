"""Gantt chart of a simulated timeline: one row per node, one colour per microbatch (DESIGN.md 8).

Forwards are solid, the loss hatched, backwards lighter; gradient all-reduce in grey. The legend says
so on the chart (:func:`phase_legend`), and rows are labelled with their stage when the plan is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from skippipe.simulate import Timeline

PHASE_ALPHA = {"F": 1.0, "L": 0.8, "B": 0.55}


def phase_legend(ax, allreduce: bool = True, loc: str = "lower right") -> None:
    """The key of :func:`draw_events` bars, on ``ax``: what the shades, the hatching, the colours and
    the grey bands mean."""
    from matplotlib.patches import Patch

    grey = "0.45"
    handles = [Patch(facecolor=grey, alpha=PHASE_ALPHA["F"], edgecolor="black", label="forward (solid)"),
               Patch(facecolor=grey, alpha=PHASE_ALPHA["L"], hatch="//", edgecolor="black",
                     label="loss on the originator (hatched)"),
               Patch(facecolor=grey, alpha=PHASE_ALPHA["B"], edgecolor="black", label="backward (lighter)"),
               Patch(facecolor="white", edgecolor="none", label="colour: one per microbatch")]
    if allreduce:
        handles.append(Patch(facecolor="grey", alpha=0.15, label="grey band: gradient all-reduce"))
    ax.legend(handles=handles, fontsize=7, loc=loc, bbox_to_anchor=(1.0, 1.0), ncol=len(handles), frameon=False)


def draw_events(ax, events, row: Dict[str, int]) -> None:
    """One bar per (node, microbatch, phase, start_s, end_s) event on the node's row."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")  # distinct hues: tab20's paired light shades would read as backward
    for node, mb, phase, start, end in events:
        if node not in row:
            continue
        ax.barh(row[node], end - start, left=start, color=cmap(int(mb) % 10), alpha=PHASE_ALPHA.get(phase, 1.0),
                hatch="//" if phase == "L" else None, edgecolor="black", linewidth=0.2)


def node_rows(nodes, stage_of: Optional[Dict[str, int]] = None):
    """Rows ordered by stage then name, and their labels ``n3 (stage 2)``."""
    if stage_of:
        ordered = sorted(nodes, key=lambda n: (stage_of.get(n, 1 << 30), _natural(n)))
        labels = [f"{n} (stage {stage_of[n]})" if n in stage_of else n for n in ordered]
    else:
        ordered = sorted(nodes, key=_natural)
        labels = list(ordered)
    return {n: i for i, n in enumerate(ordered)}, labels


def stage_separators(ax, row: Dict[str, int], stage_of: Optional[Dict[str, int]]) -> None:
    """A thin line between the rows of consecutive stages."""
    if not stage_of:
        return
    ordered = sorted(row, key=row.get)
    for a, b in zip(ordered, ordered[1:]):
        if stage_of.get(a) != stage_of.get(b):
            ax.axhline(row[b] - 0.5, color="black", linewidth=0.6, alpha=0.5)


def draw_gantt(timeline: Timeline, path: str | Path, title: str = "", plan=None) -> Path:
    """Write the chart to ``path`` (PNG); matplotlib is imported lazily with the Agg backend. With
    ``plan`` the rows are grouped and labelled by stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage_of = plan.stage_of() if plan is not None else None
    row, labels = node_rows({e[0] for e in timeline.events} | set(timeline.busy_s), stage_of)
    fig, ax = plt.subplots(figsize=(12, 0.35 * len(row) + 2.0))
    draw_events(ax, timeline.events, row)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    stage_separators(ax, row, stage_of)
    ax.set_xlabel("time in the iteration (s)")
    ax.set_ylabel("node")
    for _, start, end in timeline.allreduce:
        ax.axvspan(start, end, color="grey", alpha=0.15)
    phase_legend(ax, allreduce=bool(timeline.allreduce))
    ax.set_title(title or f"makespan {timeline.makespan_s:.1f} s, {timeline.collisions} collisions", loc="left",
                 fontsize=10, pad=22)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _natural(name: str):
    digits = "".join(ch for ch in name if ch.isdigit())
    return (name.rstrip("0123456789"), int(digits) if digits else -1, name)
