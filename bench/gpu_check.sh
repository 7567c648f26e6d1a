#!/usr/bin/env bash
# GPU check (issue 5): the CUDA path of the same code, and a calibration of the cost model.
#
#   bash bench/gpu_check.sh            # on a CUDA machine, from anywhere; under 5 minutes on an H100
#
# 1. installs the project with the machine's own torch (pip keeps an installed torch; with no package
#    index it falls back to --no-deps; omegaconf, the one dependency the GPU image lacks, can come as a
#    wheel in .whl/: `pip download --no-deps --only-binary=:all: -d .whl omegaconf==2.4.0`);
# 2. trains configs/tiny.yaml with launcher=inprocess train.device=cuda for a few steps;
# 3. times forward and backward of one llama-500m stage (4 of its 24 layers) on one microbatch of
#    8 samples x 1024 tokens, in fp32 and bf16 autocast, with the worker's own skippipe.train.compute functions,
#    and prints cost.fwd_s_per_sample_layer, cost.bwd_factor and cost.loss_factor for the closing note;
# 4. (issue 17) bench/gpu_mfu.py: the in-process executor with llama-500m in bf16 for 20 steps against a
#    plain single-GPU PyTorch loop of the same model: tokens/s and MFU, one table ($OUT/gpu_mfu.json).
# Writes the numbers to $OUT/gpu_check.json when OUT is set (else bench/results/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_SILENT=true WANDB_MODE=disabled PYTHONUNBUFFERED=1
RESULT=${OUT:-bench/results}/gpu_check.json

echo "== 1. install (keeping this machine's torch)"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/skippipe-site .whl/*.whl
  export PYTHONPATH=/tmp/skippipe-site${PYTHONPATH:+:$PYTHONPATH}
fi
timeout 120 $PY -m pip install -q -e . 2>/dev/null \
  || $PY -m pip install -q --no-deps --no-build-isolation -e . \
  || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY - <<'EOF'
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE'}")
missing = [m for m in ("omegaconf", "yaml", "numpy", "scipy", "tqdm", "psutil") if importlib.util.find_spec(m) is None]
if missing or not torch.cuda.is_available():
    sys.exit(f"gpu_check: missing {missing or 'a CUDA device'}; carry wheels in .whl/ (see this script's header)")
EOF

echo "== 2. tiny config, launcher=inprocess, train.device=cuda"
RUN_DIR=$(mktemp -d /tmp/skippipe-gpu-check-XXXX)
timeout 240 $PY -m skippipe train configs/tiny.yaml launcher=inprocess train.device=cuda train.steps=20 \
  train.warmup_steps=2 train.eval_batches=2 tracking.wandb.mode=disabled tracking.progress=false \
  "run.dir=$RUN_DIR" | tail -n 15
$PY - "$RUN_DIR/metrics.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"time/iter_s"' in line]
losses = [r["loss/train"] for r in rows]
print(f"tiny on cuda: {len(rows)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
      f"median iter {statistics.median(r['time/iter_s'] for r in rows[2:]):.4f} s")
assert losses[-1] < losses[0], "the loss did not go down on CUDA"
EOF

echo "== 3. one llama-500m stage (4 layers), 8 x 1024 tokens per microbatch"
$PY - "$RESULT" <<'EOF'
import json, statistics, sys, time
from pathlib import Path
import torch
from skippipe.model.presets import PRESETS
from skippipe.model.transformer import build_stages
from skippipe.train import compute

spec, samples, num_stages, reps = PRESETS["llama-500m"], 8, 6, 10  # 24 layers / 6 stages = 4 per stage
dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = False  # plain fp32 numbers; bf16 is the fast row


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def measure(dtype):
    """fp32 parameters; bf16 as autocast (mixed precision): the model's rotary tables are fp32, so
    parameters cast to bf16 would meet fp32 queries in scaled_dot_product_attention."""
    stages = build_stages(spec, num_stages, seed=0, only=[0, 1])
    for s in stages.values():
        s.to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(samples, spec.seq_len, spec.dim, device=dev, generator=gen)
    targets = torch.randint(0, spec.vocab_size, (samples, spec.seq_len), device=dev, generator=gen)
    fwd, bwd, loss = [], [], []
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        for _ in range(reps + 3):
            (out, saved), f = timed(lambda: compute.forward(stages[1], hidden))
            _, b = timed(lambda: compute.backward(stages[1], saved, torch.ones_like(out)))
            _, lo = timed(lambda: compute.loss_and_head_grads(stages[0], out, targets))
            fwd.append(f), bwd.append(b), loss.append(lo)
            del out, saved
    f, b, lo = (statistics.median(x[3:]) for x in (fwd, bwd, loss))
    layers = len(stages[1].layer_ids)
    return {"dtype": "fp32" if dtype == torch.float32 else "bf16 autocast", "stage_layers": layers, "samples": samples,
            "seq_len": spec.seq_len, "fwd_ms": 1e3 * f, "bwd_ms": 1e3 * b, "head_loss_ms": 1e3 * lo,
            "fwd_s_per_sample_layer": f / (layers * samples), "bwd_factor": b / f, "loss_factor": lo / f,
            "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30}


rows = [measure(torch.float32), measure(torch.bfloat16)]
for r in rows:
    print(f"{r['dtype']:>13}: fwd {r['fwd_ms']:.2f} ms, bwd {r['bwd_ms']:.2f} ms, head+loss {r['head_loss_ms']:.2f} ms "
          f"per microbatch -> cost.fwd_s_per_sample_layer={r['fwd_s_per_sample_layer']:.3g} "
          f"cost.bwd_factor={r['bwd_factor']:.2f} cost.loss_factor={r['loss_factor']:.2f} "
          f"(peak {r['peak_gpu_mem_gb']:.1f} GiB)")
Path(sys.argv[1]).parent.mkdir(parents=True, exist_ok=True)
Path(sys.argv[1]).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                         "llama_500m_stage": rows}, indent=1))
print(f"wrote {sys.argv[1]}")
EOF

echo "== 4. llama-500m bf16, in-process executor vs a plain PyTorch loop (MFU)"
timeout 420 $PY bench/gpu_mfu.py --steps 20 --out "${OUT:-bench/results}/gpu_mfu.json"
