"""``skippipe eval RUN [--drop-stages i,j | --keep-fraction f] [--samples N] [--json]``.

Validation loss and perplexity of a finished run's stages (``RUN/final``) with the full model and
with stages omitted at inference, as in SkipPipe's evaluation of partial models (arXiv 2502.19913,
section 6): a model trained with skips should degrade gracefully when stages are dropped. Stage 0
(embedding, head and loss) is always kept; the kept stages run in their natural order.

The data and validation batches are rebuilt from the run's saved config exactly as the training
run built them, so with every stage kept the loss equals the run's final ``loss/val``. For a keep
fraction, ``N`` random subsets of the non-zero stages (seeded; every subset when there are at most
``N``) are evaluated and their losses averaged; perplexity is ``exp`` of that mean loss.

``--json`` prints ``{"full": {"loss", "ppl"}, "results": [{"keep_fraction", "loss", "ppl",
"stages_kept", "subsets": [...]}, ...]}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from skippipe.errors import UserError

DEFAULT_KEEP_FRACTIONS = (1.0, 0.75, 0.5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run directory written by `skippipe train` (runs/<name>)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--drop-stages", metavar="I,J", help="omit exactly these stages (1..S-1), e.g. 2,3")
    which.add_argument("--keep-fraction", metavar="F", type=float, action="append",
                       help="keep this fraction of the non-zero stages (repeatable; default 1.0, 0.75, 0.5)")
    parser.add_argument("--samples", metavar="N", type=int, default=8,
                        help="random stage subsets averaged per keep fraction (default 8)")
    parser.add_argument("--seed", type=int, default=None, help="subset sampling seed (default: the run's run.seed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# ---------------------------------------------------------------------------------------------
# which stages


def parse_drop_stages(text: str, num_stages: int) -> List[int]:
    """``"2,3"`` -> [2, 3]; stage 0 and stages outside 1..S-1 are errors that say what is valid."""
    valid = f"1..{num_stages - 1}" if num_stages > 2 else "1"
    try:
        stages = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--drop-stages {text!r}: give comma-separated stage numbers in {valid}, e.g. 2,3") from None
    if not stages:
        raise UserError(f"--drop-stages is empty: give comma-separated stage numbers in {valid}")
    if 0 in stages:
        raise UserError(f"--drop-stages {text}: stage 0 holds the embedding, LM head and loss and cannot be "
                        f"dropped; choose among stages {valid}")
    outside = [s for s in stages if not 0 < s < num_stages]
    if outside:
        raise UserError(f"--drop-stages {text}: stage {outside[0]} does not exist; this run has {num_stages} "
                        f"stages, droppable ones are {valid}")
    return stages


def stages_kept(keep_fraction: float, num_stages: int) -> int:
    """Non-zero stages kept: the dropped count is rounded half up, as for schedule.skip_ratio."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise UserError(f"--keep-fraction {keep_fraction}: must be in [0, 1] (1.0 keeps every stage)")
    others = num_stages - 1
    dropped = int(math.floor((1.0 - keep_fraction) * others + 0.5 + 1e-9))
    return others - dropped


def kept_subsets(kept: int, num_stages: int, samples: int, seed: int) -> List[Tuple[int, ...]]:
    """``samples`` distinct subsets of stages 1..S-1 of size ``kept``, in ascending order each; every
    subset when there are no more than ``samples`` of them (then the average is exact)."""
    if samples < 1:
        raise UserError(f"--samples {samples}: must be >= 1")
    stages = range(1, num_stages)
    if math.comb(num_stages - 1, kept) <= samples:
        return list(itertools.combinations(stages, kept))
    rng = random.Random(seed)
    chosen: Dict[Tuple[int, ...], None] = {}
    while len(chosen) < samples:
        chosen[tuple(sorted(rng.sample(stages, kept)))] = None
    return list(chosen)


# ---------------------------------------------------------------------------------------------
# evaluation


def load_run(run_dir: Path, cfg):
    """(stages, validation batches) of a finished run, rebuilt as its training run built them."""
    from skippipe.config import num_stages
    from skippipe.data import load_data
    from skippipe.model.presets import resolve_model_spec
    from skippipe.process import pin_threads
    from skippipe.train.evaluate import load_stages

    if not (run_dir / "final").is_dir():
        raise UserError(f"'{run_dir / 'final'}' does not exist: the run has not finished "
                        "(eval reads the stages a finished run saves there)")
    pin_threads(cfg.run.threads)  # the training run's thread count: the same sums, the same loss
    data = load_data(cfg.data)
    spec = resolve_model_spec(cfg.model, vocab_size=data.vocab_size)
    stages = load_stages(run_dir / "final", spec, num_stages(cfg), cfg.run.seed)
    device = eval_device(cfg)
    for stage in stages.values():
        stage.to(device)
    batches = data.val_batches(cfg.train.eval_batches, cfg.train.samples_per_microbatch, spec.seq_len)
    return stages, batches


def eval_device(cfg) -> str:
    """Where the training run computed its final loss/val: on the stages' device for
    launcher=inprocess, else on the coordinator's CPU (it loads the saved stages there)."""
    import torch

    from skippipe.process import resolve_device

    wanted = resolve_device(cfg.train.device)
    if cfg.launcher == "inprocess" and wanted != "cpu" and (wanted != "cuda" or torch.cuda.is_available()):
        return wanted
    return "cpu"


def evaluate_subsets(stages, batches, subsets: Sequence[Tuple[int, ...]]) -> Dict[str, object]:
    from skippipe.train.evaluate import evaluate

    device = stages[0].embed.weight.device
    losses = [evaluate(stages, batches, stage_path=list(subset), device=device) for subset in subsets]
    loss = sum(losses) / len(losses)
    return {"loss": loss, "ppl": math.exp(loss),
            "subsets": [{"stages": [0, *subset], "loss": value} for subset, value in zip(subsets, losses)]}


def run_eval(run: str, drop_stages: Optional[str] = None, keep_fractions: Optional[Sequence[float]] = None,
             samples: int = 8, seed: Optional[int] = None) -> Dict[str, object]:
    """The ``--json`` object; see the module docstring. Arguments are checked before any loading."""
    from skippipe.config import num_stages
    from skippipe.runfiles import read_run_config
    from skippipe.train.evaluate import evaluate

    run_dir = Path(run)
    cfg = read_run_config(run_dir)
    count = num_stages(cfg)
    seed = cfg.run.seed if seed is None else seed
    if drop_stages is not None:
        dropped = parse_drop_stages(drop_stages, count)
        kept = tuple(s for s in range(1, count) if s not in dropped)
        plan = [(len(kept) / max(1, count - 1), [kept], {"dropped": dropped})]
    else:
        plan = []
        for fraction in keep_fractions or DEFAULT_KEEP_FRACTIONS:
            size = stages_kept(fraction, count)
            plan.append((fraction, kept_subsets(size, count, samples, seed), {}))
    stages, batches = load_run(run_dir, cfg)
    full = evaluate(stages, batches, device=stages[0].embed.weight.device)
    results = [{"keep_fraction": fraction, "stages_kept": len(subsets[0]), **extra,
                **evaluate_subsets(stages, batches, subsets)} for fraction, subsets, extra in plan]
    return {"run": str(run), "num_stages": count, "batches": len(batches),
            "full": {"loss": full, "ppl": math.exp(full)}, "results": results}


def format_table(report: Dict[str, object]) -> str:
    full = report["full"]
    lines = [f"{report['run']}: {report['num_stages']} stages, {report['batches']} validation batches; "
             f"full model loss {full['loss']:.4f}, ppl {full['ppl']:.2f}",
             f"{'keep fraction':>13} {'stages 1..S-1 kept':>18} {'subsets':>7} {'loss':>8} {'ppl':>9} {'ppl vs full':>11}"]
    for row in report["results"]:
        kept = f"{row['stages_kept']} of {report['num_stages'] - 1}"
        lines.append(f"{row['keep_fraction']:>13.2f} {kept:>18} "
                     f"{len(row['subsets']):>7d} {row['loss']:>8.4f} {row['ppl']:>9.2f} "
                     f"{row['ppl'] / full['ppl']:>10.2f}x")
    return "\n".join(lines)


def run(args) -> int:
    report = run_eval(args.run, args.drop_stages, args.keep_fraction, args.samples, args.seed)
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return 0
