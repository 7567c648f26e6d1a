"""Model FLOPs utilisation on one GPU: SkipPipe's in-process executor against a plain PyTorch loop.

    python bench/gpu_mfu.py [--steps 20] [--preset llama-500m] [--precision bf16] [--out F.json]

Both train the same model (``model.preset``, the vocabulary of the preset) on the same number of
microbatches per step (8 x ``samples`` x ``seq_len`` tokens), in bf16 autocast with fp32 master
weights and AdamW:

- ``skippipe``: ``skippipe train launcher=inprocess train.device=cuda`` with 4 stages x 1 replica,
  ``schedule.method=full``, ``verify.level=off`` (hashing every step's state is a separate cost, measured
  by bench/verify_bench.py);
- ``anchor``: the unsplit :class:`skippipe.model.transformer.Transformer` (the same parameters), one
  loop of forward, loss, backward per microbatch, then ``optimizer.step()``: what a user would write.

Tokens per second are the median over the steps after the first two; MFU = tokens/s x model FLOPs per
token (6 x non-embedding parameters + 12 x layers x dim x seq_len, forward and backward) over the
device's peak dense bf16 FLOP/s (a table by device name, or ``--peak-tflops``). Target (issue 17):
SkipPipe's MFU >= 0.8x the anchor's. Prints one table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
MICROBATCHES = 8


def peak_tflops(name: str, override) -> float:
    if override:
        return float(override)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"gpu_mfu: no peak FLOP/s known for '{name}'; pass --peak-tflops")


def flops_per_token(spec) -> float:
    non_embedding = spec.n_layers * spec.layer_params()
    return 6.0 * non_embedding + 12.0 * spec.n_layers * spec.dim * spec.seq_len


def run_skippipe(args, spec) -> dict:
    run = Path(tempfile.mkdtemp(prefix="skippipe-mfu-"))
    cmd = [sys.executable, "-m", "skippipe", "train", "launcher=inprocess", "train.device=cuda",
           f"model.preset={args.preset}", f"model.vocab_size={spec.vocab_size}", f"train.precision={args.precision}",
           f"train.steps={args.steps}", f"train.samples_per_microbatch={args.samples}", "train.warmup_steps=2",
           "train.eval_batches=1", "schedule.method=full", "schedule.partition_sizes=[1,1,1,1]",
           f"schedule.microbatches_per_originator={MICROBATCHES}", "topology.generate={count: 4, placement: single}",
           "cost.emulate_links=false", "verify.level='off'", "tracking.wandb.mode=disabled",
           "tracking.progress=false", f"run.dir={run}"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"time/iter_s"' in line]
    return {"tokens_per_s": statistics.median(r["throughput/tokens_per_s"] for r in rows[2:]),
            "losses": [r["loss/train"] for r in rows], "run_dir": str(run)}


def run_anchor(args, spec) -> dict:
    import torch
    import torch.nn.functional as F

    from skippipe.config import DataConfig
    from skippipe.data import load_data
    from skippipe.model.transformer import Transformer

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = Transformer(spec, seed=0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = load_data(DataConfig())  # the default corpus, as the skippipe run
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    times, losses = [], []
    for step in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = 0.0
        for mb_id in range(MICROBATCHES):
            mb = data.microbatch(0, step, mb_id, args.samples, spec.seq_len)
            inputs, targets = mb.inputs.to(device), mb.targets.to(device)
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(inputs)
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
            (loss / MICROBATCHES).backward()
            total += float(loss.detach())  # the executor also reads each loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(total / MICROBATCHES)
    tokens = MICROBATCHES * args.samples * spec.seq_len
    return {"tokens_per_s": statistics.median(tokens / t for t in times[2:]), "losses": losses,
            "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--preset", default="llama-500m")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_mfu.json"))
    args = parser.parse_args(argv)
    import torch

    from skippipe.model.presets import PRESETS

    spec = PRESETS[args.preset]
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name, args.peak_tflops) * 1e12
    rows = {"skippipe": run_skippipe(args, spec), "anchor": run_anchor(args, spec)}
    for row in rows.values():
        row["mfu"] = row["tokens_per_s"] * flops_per_token(spec) / peak
        row["loss_fell"] = row["losses"][-1] < row["losses"][0]
    ratio = rows["skippipe"]["mfu"] / rows["anchor"]["mfu"]
    print(f"\n{args.preset} {args.precision} on {name} (peak {peak / 1e12:.0f} TFLOP/s), "
          f"{MICROBATCHES} x {args.samples} x {spec.seq_len} tokens per step, {args.steps} steps")
    print("system | tokens/s | MFU | loss first -> last")
    for key, row in rows.items():
        print(f"{key} | {row['tokens_per_s']:.0f} | {row['mfu']:.3f} | {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}")
    print(f"skippipe / anchor MFU: {ratio:.3f} (target >= 0.8)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "preset": args.preset,
                                          "precision": args.precision, "steps": args.steps, "rows": rows,
                                          "mfu_ratio": ratio}, indent=1))
    return 0 if all(r["loss_fell"] for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
