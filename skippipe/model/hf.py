"""Hugging Face LLaMA-family checkpoints in (``model.hf_path``) and out (``skippipe export --hf``).

Reading needs ``config.json`` and ``safetensors`` only (the optional extra ``hf``); ``transformers``
is never imported here. Each worker opens the safetensors files lazily and reads just the tensors
of its own layers (stage 0 also the embedding, final norm and LM head).

The two layouts differ in two places, converted here and nowhere else:

- fused projections: our ``qkv`` is ``cat(q_proj, k_proj, v_proj)`` and our ``gate_up`` is
  ``cat(gate_proj, up_proj)``;
- rotary pairing: Hugging Face rotates the pair (i, i + head_dim/2) ("rotate_half"), we rotate
  (2i, 2i+1). The rows of ``q_proj`` and ``k_proj`` are permuted within each head so that both
  pairings see the same angles; q.k is unchanged because q and k get the same permutation.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

from skippipe.errors import ConfigError, UserError

MODEL_TYPES = ("llama", "mistral")


def read_hf_config(directory: str) -> dict:
    """``DIR/config.json`` of a LLaMA-family checkpoint, checked for what our blocks can express."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.hf_path={directory!r}: no config.json there; give a directory written by "
                          "transformers' save_pretrained (config.json + *.safetensors)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"'{path}' is not readable JSON ({err}); re-save the checkpoint") from None
    problem = _unsupported(config)
    if problem:
        raise ConfigError(f"model.hf_path={directory!r}: {problem}; only LLaMA-family decoders (RMSNorm, "
                          "rotary, SwiGLU, no biases) load into skippipe's blocks")
    return config


def _unsupported(config: dict) -> Optional[str]:
    if config.get("model_type") not in MODEL_TYPES:
        return f"model_type {config.get('model_type')!r} is not one of {', '.join(MODEL_TYPES)}"
    if config.get("hidden_act", "silu") != "silu":
        return f"hidden_act {config['hidden_act']!r} is not silu"
    if config.get("attention_bias") or config.get("mlp_bias"):
        return "attention_bias/mlp_bias are set"
    if config.get("sliding_window"):
        return f"sliding_window={config['sliding_window']} attention is not supported"
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"rope type {rope.get('rope_type', rope.get('type'))!r} is not supported (default rotary only)"
    heads = config["num_attention_heads"]
    if config.get("head_dim") not in (None, config["hidden_size"] // heads):
        return f"head_dim={config['head_dim']} is not hidden_size/num_attention_heads"
    return None


def spec_fields(config: dict) -> Dict[str, object]:
    """ModelSpec fields given by a Hugging Face config (``max_positions`` is the context limit)."""
    rope = config.get("rope_parameters") or {}
    return {"dim": config["hidden_size"], "n_layers": config["num_hidden_layers"],
            "n_heads": config["num_attention_heads"],
            "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
            "ffn_dim": config["intermediate_size"], "vocab_size": config["vocab_size"],
            "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
            "max_positions": config.get("max_position_embeddings")}


# ---------------------------------------------------------------------------------------------
# rotary row order


def rotary_order(head_dim: int) -> torch.Tensor:
    """Per head, our row j is Hugging Face row ``order[j]``: [0, h, 1, h+1, ...] with h = head_dim/2."""
    return torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)


def _rows(weight: torch.Tensor, heads: int, order: torch.Tensor) -> torch.Tensor:
    head_dim = order.numel()
    return weight.reshape(heads, head_dim, -1)[:, order].reshape(heads * head_dim, -1)


# ---------------------------------------------------------------------------------------------
# reading


class SafetensorsDir:
    """The tensors of a checkpoint directory by name, each read from its file on demand."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: self.directory / file
                          for name, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.files = self._scan()
        if not self.files:
            raise ConfigError(f"model.hf_path={str(directory)!r}: no *.safetensors files there; save the model "
                              "with save_pretrained(..., safe_serialization=True)")

    def _scan(self) -> Dict[str, Path]:
        from safetensors import safe_open

        files = {}
        for path in sorted(self.directory.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                files.update((name, path) for name in handle.keys())
        return files

    def read(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: Dict[Path, list] = {}
        for name in names:
            if name not in self.files:
                raise UserError(f"model.hf_path={str(self.directory)!r}: tensor {name!r} is missing; "
                                "is this a LlamaForCausalLM checkpoint?")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, wanted in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                out.update((name, handle.get_tensor(name)) for name in wanted)
        return out

    def has(self, name: str) -> bool:
        return name in self.files


def _layer_names(layer: int) -> Dict[str, str]:
    prefix = f"model.layers.{layer}."
    return {key: prefix + name for key, name in (
        ("attn_norm", "input_layernorm.weight"), ("q", "self_attn.q_proj.weight"),
        ("k", "self_attn.k_proj.weight"), ("v", "self_attn.v_proj.weight"), ("o", "self_attn.o_proj.weight"),
        ("mlp_norm", "post_attention_layernorm.weight"), ("gate", "mlp.gate_proj.weight"),
        ("up", "mlp.up_proj.weight"), ("down", "mlp.down_proj.weight"))}


def block_state(tensors: Dict[str, torch.Tensor], layer: int, spec) -> Dict[str, torch.Tensor]:
    """Our Block's state dict from the Hugging Face tensors of ``layer``."""
    t = {key: tensors[name] for key, name in _layer_names(layer).items()}
    order = rotary_order(spec.head_dim)
    qkv = torch.cat([_rows(t["q"], spec.n_heads, order), _rows(t["k"], spec.kv_heads, order), t["v"]])
    return {"attn_norm.weight": t["attn_norm"], "qkv.weight": qkv, "out.weight": t["o"],
            "mlp_norm.weight": t["mlp_norm"], "gate_up.weight": torch.cat([t["gate"], t["up"]]),
            "down.weight": t["down"]}


def _copy_into(module: torch.nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
    params = dict(module.named_parameters())
    for name, value in state.items():
        if params[name].shape != value.shape:
            raise UserError(f"{where}: {name} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(params[name].shape)}; does config.json match the weights?")
        with torch.no_grad():
            params[name].copy_(value)  # any stored dtype into the fp32 master weights


def load_hf_weights(stage, spec, directory: str) -> None:
    """Overwrite a :class:`~skippipe.model.transformer.Stage`'s parameters with the checkpoint's."""
    source = SafetensorsDir(directory)
    names = [name for layer in stage.layer_ids for name in _layer_names(layer).values()]
    if stage.stage_id == 0:
        head = "lm_head.weight" if source.has("lm_head.weight") else "model.embed_tokens.weight"  # tied
        names += ["model.embed_tokens.weight", "model.norm.weight", head]
    tensors = source.read(dict.fromkeys(names))
    for block, layer in zip(stage.blocks, stage.layer_ids):
        _copy_into(block, block_state(tensors, layer, spec), f"{directory} layer {layer}")
    if stage.stage_id == 0:
        _copy_into(stage, {"embed.weight": tensors["model.embed_tokens.weight"],
                           "norm.weight": tensors["model.norm.weight"], "head.weight": tensors[head]}, directory)


# ---------------------------------------------------------------------------------------------
# writing


def hf_state(stages: Dict[int, "torch.nn.Module"], spec) -> Dict[str, torch.Tensor]:
    """The Hugging Face state dict of the whole model (every stage must be present)."""
    inverse = torch.argsort(rotary_order(spec.head_dim))
    q_rows, kv_rows = spec.dim, spec.kv_heads * spec.head_dim
    out = {}
    for stage in stages.values():
        for block, layer in zip(stage.blocks, stage.layer_ids):
            names = _layer_names(layer)
            q, k, v = block.qkv.weight.detach().split((q_rows, kv_rows, kv_rows))
            gate, up = block.gate_up.weight.detach().chunk(2)
            for key, value in (("attn_norm", block.attn_norm.weight), ("q", _rows(q, spec.n_heads, inverse)),
                               ("k", _rows(k, spec.kv_heads, inverse)), ("v", v), ("o", block.out.weight),
                               ("mlp_norm", block.mlp_norm.weight), ("gate", gate), ("up", up),
                               ("down", block.down.weight)):
                out[names[key]] = value.detach()
    first = stages[0]
    out.update({"model.embed_tokens.weight": first.embed.weight, "model.norm.weight": first.norm.weight,
                "lm_head.weight": first.head.weight})
    return {name: value.detach().to("cpu", torch.float32).contiguous().clone() for name, value in out.items()}


def hf_config(spec, base: Optional[dict] = None) -> dict:
    """A LlamaForCausalLM config.json for ``spec``; fields of ``base`` (the source checkpoint's
    config, e.g. token ids) are kept where they do not describe the shape."""
    config = dict(base or {})
    config.pop("rope_scaling", None)
    config.update({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": spec.dim,
        "intermediate_size": spec.ffn_dim, "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads, "num_key_value_heads": spec.kv_heads, "head_dim": spec.head_dim,
        "hidden_act": "silu", "rms_norm_eps": spec.norm_eps, "rope_theta": spec.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "vocab_size": spec.vocab_size, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32",
        "max_position_embeddings": max(spec.seq_len, int(config.get("max_position_embeddings") or 0)),
    })
    return config


def write_hf_checkpoint(stages, spec, out: Path, base_config: Optional[dict] = None,
                        extra_files: Optional[Dict[str, Path]] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ tokenizer files) into ``out``, built in a
    temporary sibling directory and renamed into place, so a failure leaves nothing half-written."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(hf_state(stages, spec), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(spec, base_config), indent=2) + "\n")
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():  # the caller allowed replacing it: move it aside until the new one is in place
            out.rename(old)
        tmp.replace(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
