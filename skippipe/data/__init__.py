"""Data: offline default corpus, tokenizers, and a sampler keyed by (seed, step, microbatch)."""

from skippipe.data.dataset import Microbatch, TokenData, load_data

__all__ = ["Microbatch", "TokenData", "load_data"]
