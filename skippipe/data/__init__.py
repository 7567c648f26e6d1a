"""Data: offline default corpus, tokenizers, and a sampler keyed by (seed, step, microbatch)."""

from skippipe.data.dataset import Microbatch, TokenData, load_data


def vocab_size_of(data_cfg) -> int:
    """The tokenizer's vocabulary, which the model is built with unless ``model.vocab_size`` is
    set: what the planner's cost model and the workers both use. Bytes need nothing loaded (256);
    any other tokenizer is the loaded data's (BPE is trained once and cached)."""
    from skippipe.data.tokenizer import ByteTokenizer

    if data_cfg.tokenizer == "bytes" and data_cfg.source != "tokens":
        return ByteTokenizer.vocab_size
    return load_data(data_cfg).vocab_size


__all__ = ["Microbatch", "TokenData", "load_data", "vocab_size_of"]
