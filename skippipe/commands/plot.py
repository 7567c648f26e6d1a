"""``skippipe plot RUN [--step K] [--out DIR]``: draw a run's plots (see :mod:`skippipe.plots`).

Writes ``RUN/plots/`` (loss curves, planned vs executed Gantt chart of one step, per-stage
coverage, measured vs predicted iteration time) and prints the files written. Training writes the
same plots when it ends; this redraws them, e.g. for another step or while a run is in progress.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run directory written by `skippipe train` (runs/<name>)")
    parser.add_argument("--step", type=int, default=None, help="the Gantt chart's step (default: the last)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN/plots)")


def run(args) -> int:
    from skippipe.plots import plot_run

    for path in plot_run(args.run, step=args.step, out_dir=args.out):
        print(path)
    return 0
