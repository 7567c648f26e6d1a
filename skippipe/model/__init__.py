"""Model: presets and the staged LLaMA-style decoder."""

from skippipe.model.presets import PRESETS, ModelSpec, resolve_model_spec
from skippipe.model.transformer import Stage, Transformer, build_stages, forward_path, split_layers

__all__ = ["PRESETS", "ModelSpec", "resolve_model_spec", "Stage", "Transformer", "build_stages",
           "forward_path", "split_layers"]
