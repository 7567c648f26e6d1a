"""Tier 2: the torch.distributed.pipelining baseline of bench/ runs on gloo and trains SkipPipe's
model on SkipPipe's microbatches (its first loss equals the in-process loss of the same stages)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["model.preset=tiny", "model.n_layers=2", "model.dim=32", "model.n_heads=2", "model.ffn_dim=64",
             "model.seq_len=32", "train.samples_per_microbatch=2", "schedule.num_stages=2",
             "schedule.microbatches_per_originator=2", "schedule.skip_ratio=0", "data.max_corpus_mb=1",
             "train.steps=2"]

pytest.importorskip("torch.distributed.pipelining")


def reference_first_loss() -> float:
    """Mean loss of step 0's microbatches through stage 0 -> stage 1 -> stage 0's head, in process."""
    sys.path.insert(0, str(ROOT / "bench" / "baselines"))
    import common

    from skippipe.model.transformer import build_stages, forward_path

    cfg, spec, data = common.load_setup(OVERRIDES)
    stages = build_stages(spec, 2, cfg.run.seed)
    inputs, targets = common.iteration_batch(cfg, spec, data, step=0)
    chunks = zip(inputs.chunk(common.num_microbatches(cfg)), targets.chunk(common.num_microbatches(cfg)))
    with torch.no_grad():
        losses = [forward_path(stages, x, y, [1]) for x, y in chunks]
    return float(torch.stack(losses).mean())


def test_torch_pipe_baseline_two_ranks(tmp_path):
    out = tmp_path / "torch_pipe.json"
    cmd = [sys.executable, str(ROOT / "bench" / "baselines" / "torch_pipe.py"), "--schedule=1f1b",
           "--iters=1", "--warmup=1", f"--out={out}", *OVERRIDES]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["losses"]) == 2 and all(math.isfinite(v) for v in result["losses"])
    assert len(result["peak_rss_mb"]) == 2 and result["n"] == 1
    assert result["losses"][0] == pytest.approx(reference_first_loss(), rel=1e-5)
