"""A LLaMA-style decoder split into pipeline stages.

Blocks: RMSNorm, rotary embeddings, causal attention through ``scaled_dot_product_attention`` and a
SwiGLU MLP. Stage 0 holds the token embedding, its block of layers, and the final norm + LM head +
loss (as in the SkipPipe reference); stages 1..S-1 hold one block of layers each. Because the hidden
state has the same shape (batch, seq, dim) between any two stages, a skipped stage is simply not
run, and stages can run in any order (arXiv 2502.19913, section on partial pipelines).

Every layer is initialised from its own generator seeded by (seed, layer index), so a worker that
builds only its stage gets exactly the parameters the whole model would have.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from skippipe.model.presets import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(seq_len: int, head_dim: int, theta: float, device=None):
    """cos and sin tables of shape (seq_len, head_dim // 2) for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); rotate pairs (even, odd) by the position angle."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # keep bf16/fp16 activations in their dtype
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class Block(nn.Module):
    """One pre-norm decoder layer: x + attn(norm(x)), then x + swiglu(norm(x))."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_heads, self.n_kv_heads = spec.n_heads, spec.kv_heads
        self.head_dim = spec.head_dim
        self.kv_dim = spec.kv_heads * spec.head_dim
        self.theta = spec.rope_theta
        self.attn_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.qkv = nn.Linear(spec.dim, spec.dim + 2 * self.kv_dim, bias=False)
        self.out = nn.Linear(spec.dim, spec.dim, bias=False)
        self.mlp_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.gate_up = nn.Linear(spec.dim, 2 * spec.ffn_dim, bias=False)
        self.down = nn.Linear(spec.ffn_dim, spec.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split((dim, self.kv_dim, self.kv_dim), dim=-1)
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = (t.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2) for t in (k, v))
        cos, sin = rotary_tables(seq, self.head_dim, self.theta, device=x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: kv head j serves a run of q heads
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attn.transpose(1, 2).reshape(batch, seq, dim))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def _init_linear_(module: nn.Module, std: float, generator: torch.Generator) -> None:
    for p in module.parameters():
        if p.dim() >= 2:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def make_block(spec: ModelSpec, layer_id: int, seed: int) -> Block:
    block = Block(spec)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer_id + 1)
    # scaled init for the residual projections (GPT-2 style), so deep stacks start stable
    _init_linear_(block, spec.init_std, gen)
    with torch.no_grad():
        for proj in (block.out, block.down):
            proj.weight.mul_(1.0 / (2 * spec.n_layers) ** 0.5)
    return block


def split_layers(n_layers: int, num_stages: int) -> List[List[int]]:
    """Layer ids per stage, contiguous, as even as possible; extra layers go to the lowest stages
    (:func:`skippipe.cost.split_layers` is their counts)."""
    base, extra = divmod(n_layers, num_stages)
    out, start = [], 0
    for stage in range(num_stages):
        count = base + (1 if stage < extra else 0)
        out.append(list(range(start, start + count)))
        start += count
    return out


class Stage(nn.Module):
    """One pipeline stage. Stage 0 also owns the embedding, final norm, LM head and loss.

    Shapes: tokens (batch, seq) int64; hidden (batch, seq, dim).
    """

    def __init__(self, spec: ModelSpec, stage_id: int, layer_ids: Sequence[int], seed: int):
        super().__init__()
        self.spec = spec
        self.stage_id = stage_id
        self.layer_ids = list(layer_ids)
        self.blocks = nn.ModuleList(make_block(spec, layer, seed) for layer in self.layer_ids)
        if stage_id == 0:
            gen = torch.Generator().manual_seed(seed * 1_000_003)
            self.embed = nn.Embedding(spec.vocab_size, spec.dim)
            self.norm = RMSNorm(spec.dim, spec.norm_eps)
            self.head = nn.Linear(spec.dim, spec.vocab_size, bias=False)
            with torch.no_grad():
                self.embed.weight.copy_(torch.randn(self.embed.weight.shape, generator=gen) * spec.init_std)
                self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen) * spec.init_std)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy over the microbatch's tokens."""
        logits = self.logits(hidden)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def build_stages(spec: ModelSpec, num_stages: int, seed: int,
                 only: Optional[Iterable[int]] = None) -> Dict[int, Stage]:
    """Build the stages (all, or those in ``only``) with the same parameters as the whole model:
    seeded random ones, or those of the Hugging Face checkpoint ``spec.weights`` (each stage reads
    only its own layers)."""
    layers = split_layers(spec.n_layers, num_stages)
    wanted = range(num_stages) if only is None else only
    stages = {s: Stage(spec, s, layers[s], seed) for s in wanted}
    if spec.weights:
        from skippipe.model.hf import load_hf_weights

        for stage in stages.values():
            load_hf_weights(stage, spec, spec.weights)
    return stages


def forward_path(stages: Dict[int, Stage], tokens: torch.Tensor, targets: torch.Tensor,
                 stage_path: Sequence[int]) -> torch.Tensor:
    """Loss of one microbatch along a path: stage 0's embedding and block, the visited stages in
    path order, then stage 0's head. ``stage_path`` lists the stages after stage 0."""
    first = stages[0]
    hidden = first(first.embed_tokens(tokens))
    for stage in stage_path:
        hidden = stages[stage](hidden)
    return first.loss(hidden, targets)


class Transformer(nn.Module):
    """The unsplit model: the same parameters as the stages, run as one module.

    ``forward(tokens, layer_order=None)`` runs the given layer ids in order (default: all), so a
    skipping/reordering path can be checked against the plain model.
    """

    def __init__(self, spec: ModelSpec, seed: int):
        super().__init__()
        self.spec = spec
        whole = build_stages(spec, 1, seed)[0]  # one stage holding every layer (and any loaded weights)
        self.embed, self.norm, self.head = whole.embed, whole.norm, whole.head
        self.layers = whole.blocks

    def forward(self, tokens: torch.Tensor, layer_order: Optional[Sequence[int]] = None) -> torch.Tensor:
        hidden = self.embed(tokens)
        for layer in (range(len(self.layers)) if layer_order is None else layer_order):
            hidden = self.layers[layer](hidden)
        return self.head(self.norm(hidden))
