"""Mixed precision, fp16 loss scaling and activation checkpointing (issue 17, parts 1 and 2).

The local == in-process bit-for-bit check in every precision is in tests/test_runtime.py.
"""

import json
import math

import pytest
import torch

from skippipe.cli import main
from skippipe.config import load_config
from skippipe.cost import CostModel, resolve_memory
from skippipe.errors import ConfigError
from skippipe.model.presets import ModelSpec
from skippipe.model.transformer import build_stages
from skippipe.topology import load_topology
from skippipe.train import compute
from skippipe.train.optim import LossScaler, apply_step, make_optimizer

SPEC = ModelSpec(dim=32, n_layers=4, n_heads=2, ffn_dim=64, vocab_size=64, seq_len=16)


def _one_microbatch(stages, mode, loss_scale=1.0):
    """F, L, B of one microbatch through stages 0 -> 1 -> 0; the sent tensors and every grad."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SPEC.vocab_size, (2, SPEC.seq_len), generator=gen)
    targets = torch.randint(0, SPEC.vocab_size, (2, SPEC.seq_len), generator=gen)
    h0, saved0 = compute.forward(stages[0], tokens, mode)
    h1, saved1 = compute.forward(stages[1], h0, mode)
    loss, g1, head = compute.loss_and_head_grads(stages[0], h1, targets, mode, loss_scale)
    g0, body1 = compute.backward(stages[1], saved1, g1)
    _, body0 = compute.backward(stages[0], saved0, g0)
    return {"sent": [h0, h1, g1, g0], "loss": loss, "grads": [*head, *body1, *body0]}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("every", [1, 2])
def test_checkpointing_recomputes_the_same_gradients_bit_for_bit(precision, every):
    stages = build_stages(SPEC, 2, seed=3)
    dtype = compute.AUTOCAST_DTYPES[precision]
    plain = _one_microbatch(stages, compute.Mode(dtype, 0))
    recomputed = _one_microbatch(stages, compute.Mode(dtype, every))
    assert torch.equal(plain["loss"], recomputed["loss"])
    for a, b in zip(plain["grads"] + plain["sent"], recomputed["grads"] + recomputed["sent"]):
        assert torch.equal(a, b)


def test_checkpointing_keeps_less_for_the_backward():
    """The saved graph of a checkpointed stage holds fewer bytes (counted by saved-tensor hooks)."""
    stages = build_stages(SPEC, 2, seed=3)
    hidden = torch.randn(4, SPEC.seq_len, SPEC.dim)

    def saved_bytes(mode):
        held = {}

        def pack(t):
            held[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, saved = compute.forward(stages[1], hidden, mode)
        return sum(held.values())

    none, full = saved_bytes(compute.Mode(None, 0)), saved_bytes(compute.Mode(None, 1))
    assert full < 0.5 * none, (full, none)


def test_bf16_sends_half_the_bytes_and_keeps_fp32_master_gradients():
    stages = build_stages(SPEC, 2, seed=3)
    fp32 = _one_microbatch(stages, compute.FP32)
    bf16 = _one_microbatch(stages, compute.Mode(torch.bfloat16))
    for a, b in zip(fp32["sent"], bf16["sent"]):
        assert a.dtype == torch.float32 and b.dtype == torch.bfloat16
        assert b.element_size() * 2 == a.element_size()
        assert torch.allclose(a, b.float(), rtol=0.1, atol=0.05 * a.abs().max().item())
    assert all(g.dtype == torch.float32 for g in bf16["grads"])
    assert not torch.equal(fp32["loss"], bf16["loss"])  # autocast really ran in bf16
    assert abs(float(fp32["loss"]) - float(bf16["loss"])) < 0.02 * float(fp32["loss"])


def test_fp16_gradients_are_of_the_scaled_loss_and_unscaled_in_the_reduction():
    stages = build_stages(SPEC, 2, seed=3)
    mode = compute.Mode(torch.float16)
    one, scaled = _one_microbatch(stages, mode, 1.0), _one_microbatch(stages, mode, 1024.0)
    assert all(t.dtype == torch.float16 for t in scaled["sent"])
    for a, b in zip(one["grads"], scaled["grads"]):
        assert float((b / 1024.0 - a).norm()) < 1e-2 * float(a.norm())
        assert float(b.norm()) > 500 * float(a.norm())
    assert torch.equal(one["loss"], scaled["loss"])  # the reported loss is the unscaled one
    total = compute.reduce_replicas([scaled["grads"][0].reshape(-1)], 2, loss_scale=1024.0)
    assert torch.equal(total, scaled["grads"][0].reshape(-1) / 2 / 1024.0)


def test_overflow_skips_the_step_and_the_scaler_halves_then_grows():
    norm, scale = compute.clip_coefficient([torch.tensor(float("inf"))], 1.0)
    assert math.isinf(norm) and scale == 0.0
    stage = build_stages(SPEC, 2, seed=3)[1]
    optimizer = make_optimizer(stage, load_config(None, []).train)
    before = [p.detach().clone() for p in stage.parameters()]
    numel = sum(p.numel() for p in stage.parameters())
    apply_step(stage, optimizer, torch.full((numel,), float("nan")), scale, lr=1e-3)
    assert all(torch.equal(a, p) for a, p in zip(before, stage.parameters()))
    assert not optimizer.state  # not even AdamW's step counter moved

    cfg = load_config(None, ["train.precision=fp16", "train.loss_scale=1024", "train.loss_scale_window=3"])
    scaler = LossScaler(cfg.train)
    scaler.update(float("inf"))
    assert scaler.scale == 512.0
    for _ in range(3):
        scaler.update(1.0)
    assert scaler.scale == 1024.0 and scaler.good_steps == 0
    assert LossScaler(load_config(None, ["train.precision=bf16"]).train).scale == 1.0


def test_resumed_fp16_run_continues_at_the_recorded_scale(tmp_path):
    from skippipe.runtime.coordinator import scaler_at

    cfg = load_config(None, ["train.precision=fp16", "train.loss_scale=64", "train.loss_scale_window=2"])
    lines = [{"step": 0, "time/iter_s": 1, "grad_norm": float("inf")},
             {"step": 1, "time/iter_s": 1, "grad_norm": 1.0}, {"step": 2, "time/iter_s": 1, "grad_norm": 1.0},
             {"step": 3, "time/iter_s": 1, "grad_norm": float("nan")}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert scaler_at(cfg, tmp_path, 3).scale == 64.0  # 64 -> 32 (overflow) -> 64 (two good steps)
    assert scaler_at(cfg, tmp_path, 4).scale == 32.0
    assert scaler_at(cfg, tmp_path, 0).scale == 64.0


def test_cost_model_charges_recompute_and_smaller_memory():
    common = ["cost.fwd_s_per_sample_layer=0.01", "topology.file=configs/topology/geo2.yaml"]
    plain = load_config(None, common)
    ckpt = load_config(None, common + ["train.activation_checkpointing=full"])
    half = load_config(None, common + ["train.precision=bf16", "train.activation_checkpointing=every_2"])
    spec = ModelSpec(dim=128, n_layers=8, n_heads=4, ffn_dim=352, vocab_size=256, seq_len=128)
    costs = [CostModel.from_config(c, spec, load_topology(c)) for c in (plain, ckpt, half)]
    node = costs[0].topology.nodes[0].name
    f = costs[0].fwd_s(node, 1)
    assert costs[0].bwd_s(node, 1) == pytest.approx(1.5 * f)
    assert costs[1].bwd_s(node, 1) == pytest.approx(2.5 * f)  # 2 layers, both recomputed
    assert costs[2].bwd_s(node, 1) == pytest.approx(2.0 * f)  # every 2nd block: 1 of 2
    assert costs[2].activation_bytes * 2 == costs[0].activation_bytes  # bf16 on the wire
    assert costs[1].microbatch_memory_bytes(1) < costs[0].microbatch_memory_bytes(1) / 4
    # schedule.memory=null: derived from memory_gb, larger when less is kept per microbatch
    plain.schedule.memory = None
    for cost in costs[:2]:
        for n in cost.topology.nodes:
            n.memory_gb = 0.05  # 50 MiB: a handful of microbatches of this model
    most = 1000
    m_plain, m_ckpt = (cost.derived_memory(most) for cost in costs[:2])
    assert 1 <= m_plain < m_ckpt <= most
    assert resolve_memory(plain, costs[0]) == m_plain and plain.schedule.memory == m_plain


@pytest.mark.parametrize("override,key", [
    ("train.precision=fp8", "train.precision"),
    ("train.activation_checkpointing=every_0", "train.activation_checkpointing"),
    ("train.activation_checkpointing=some", "train.activation_checkpointing"),
    ("train.loss_scale=0", "train.loss_scale"),
    ("schedule.memory=0", "schedule.memory"),
])
def test_bad_precision_settings_are_one_line(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_bf16_run_records_precision_and_trains_like_fp32(tmp_path):
    small = ["model.dim=64", "model.n_heads=2", "model.ffn_dim=128", "model.seq_len=32", "data.max_corpus_mb=1",
             "train.samples_per_microbatch=2", "train.eval_batches=2", "tracking.wandb.mode=disabled",
             "tracking.progress=false", "launcher=inprocess", "train.steps=4", "schedule.memory=null"]
    losses = {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        assert main(["train", "configs/tiny.yaml", *small, f"train.precision={precision}", f"run.dir={run}"]) == 0
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[precision] = records[-1]["loss/val"]
        header = json.loads((run / "ledger" / "header.json").read_text())
        assert header["precision"] == precision, header
        saved = load_config(str(run / "config.yaml"), [])
        assert saved.schedule.memory is not None and saved.schedule.memory >= 2  # derived, recorded
    assert losses["fp32"] != losses["bf16"]
    assert abs(losses["bf16"] - losses["fp32"]) < 0.02 * losses["fp32"]
