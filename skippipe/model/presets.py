"""Model shapes by name. ``tiny`` trains on 2 CPU cores; the paper's shapes feed the cost model."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Dict, Optional

from skippipe.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    vocab_size: int
    seq_len: int
    init_std: float = 0.02
    rope_theta: float = 10000.0
    n_kv_heads: Optional[int] = None  # grouped-query attention; None: n_heads
    norm_eps: float = 1e-6
    weights: Optional[str] = None  # a Hugging Face checkpoint directory the stages load (model.hf_path)
    max_positions: Optional[int] = None  # the checkpoint's context limit, when it has one

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def attention_params(self) -> int:
        """q and output projections (dim x dim each) plus the key and value projections."""
        return 2 * self.dim * self.dim + 2 * self.dim * self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one transformer block: attention, SwiGLU MLP and two RMSNorm gains."""
        return self.attention_params() + 3 * self.dim * self.ffn_dim + 2 * self.dim

    def params(self) -> int:
        return self.n_layers * self.layer_params() + 2 * self.vocab_size * self.dim + self.dim

    def flops_per_token_layer(self) -> float:
        """Forward FLOPs of one block per token (2 per multiply-add, attention scores included)."""
        return 2.0 * (self.attention_params() + 3 * self.dim * self.ffn_dim) + 4.0 * self.seq_len * self.dim


PRESETS: Dict[str, ModelSpec] = {
    # about 1.7M parameters with the byte tokenizer: learns visibly in minutes on 2 CPU cores
    "tiny": ModelSpec(dim=128, n_layers=8, n_heads=4, ffn_dim=352, vocab_size=256, seq_len=128),
    # a little larger, for the quality study and benchmarks
    "small": ModelSpec(dim=192, n_layers=8, n_heads=6, ffn_dim=512, vocab_size=256, seq_len=256),
    # the SkipPipe paper's shapes (arXiv 2502.19913); used by the cost model and simulator
    "llama-500m": ModelSpec(dim=1024, n_layers=24, n_heads=16, ffn_dim=4096, vocab_size=32000, seq_len=1024),
    "llama-1.5b": ModelSpec(dim=2048, n_layers=24, n_heads=16, ffn_dim=8192, vocab_size=32000, seq_len=1024),
    "llama-8b": ModelSpec(dim=4096, n_layers=32, n_heads=32, ffn_dim=14336, vocab_size=32000, seq_len=2048),
}


def resolve_model_spec(model_cfg, vocab_size: int | None = None) -> ModelSpec:
    """The preset named by ``model.preset`` with every non-null ``model.*`` override applied; with
    ``model.hf_path`` the shape comes from that checkpoint's config.json instead."""
    if model_cfg.preset not in PRESETS:
        raise ConfigError(f"model.preset={model_cfg.preset!r} is unknown; use one of {', '.join(PRESETS)}")
    spec = PRESETS[model_cfg.preset]
    if model_cfg.hf_path:
        spec = _from_hf(model_cfg, spec, vocab_size)
    else:
        overrides = {k: getattr(model_cfg, k) for k in SHAPE_KEYS if getattr(model_cfg, k) is not None}
        spec = replace(spec, init_std=model_cfg.init_std, rope_theta=model_cfg.rope_theta,
                       norm_eps=model_cfg.norm_eps, **overrides)
        vocab = model_cfg.vocab_size or vocab_size
        if vocab:
            spec = replace(spec, vocab_size=int(vocab))
    for key in ("dim", "n_layers", "n_heads", "ffn_dim", "seq_len", "vocab_size"):
        if getattr(spec, key) <= 0:
            raise ConfigError(f"model.{key}={getattr(spec, key)} must be > 0")
    if spec.dim % spec.n_heads or spec.head_dim % 2:
        raise ConfigError(f"model.dim={spec.dim} must be a multiple of 2*model.n_heads={2 * spec.n_heads} "
                          "(rotary embeddings need an even head size)")
    if spec.kv_heads <= 0 or spec.n_heads % spec.kv_heads:
        raise ConfigError(f"model.n_kv_heads={spec.kv_heads} must divide model.n_heads={spec.n_heads} "
                          "(each key/value head serves a group of query heads)")
    return spec


SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "seq_len")


def _from_hf(model_cfg, preset: ModelSpec, vocab_size: Optional[int]) -> ModelSpec:
    """The shape of the checkpoint at ``model.hf_path``; a ``model.*`` key set to another value is
    an error, since the weights only fit their own shape."""
    from skippipe.model.hf import read_hf_config, spec_fields

    fields = spec_fields(read_hf_config(model_cfg.hf_path))
    where = f"{model_cfg.hf_path}/config.json"
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        value = getattr(model_cfg, key)
        if value is not None and value != fields[key]:
            raise ConfigError(f"model.{key}={value} conflicts with {fields[key]} in {where}; "
                              f"leave model.{key} unset with model.hf_path")
    limit = fields.pop("max_positions")
    seq_len = model_cfg.seq_len or min(preset.seq_len, limit or preset.seq_len)
    if limit and seq_len > limit:
        raise ConfigError(f"model.seq_len={seq_len} exceeds max_position_embeddings={limit} in {where}")
    if vocab_size and vocab_size > fields["vocab_size"]:
        raise ConfigError(f"data.tokenizer has {vocab_size} ids but {where} has vocab_size={fields['vocab_size']}; "
                          "use the model's own tokenizer (data.tokenizer=hf data.hf_tokenizer=DIR)")
    return replace(preset, seq_len=seq_len, init_std=model_cfg.init_std, weights=str(model_cfg.hf_path),
                   max_positions=limit, **fields)


def checkpoint_interval(value: str) -> int:
    """``train.activation_checkpointing`` as a block interval: 0 none, 1 full (every block), k every_k."""
    if value == "none":
        return 0
    if value == "full":
        return 1
    match = re.fullmatch(r"every_([1-9][0-9]*)", str(value))
    if not match:
        raise ConfigError(f"train.activation_checkpointing={value!r} is not none, full or every_k "
                          "(k >= 1 blocks, e.g. every_2)")
    return int(match.group(1))
