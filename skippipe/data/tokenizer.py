"""Tokenizers that need no network: raw bytes, or a byte-level BPE trained locally and cached."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, List

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to train, nothing to download."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE (HF ``tokenizers``) trained on the training text and cached by content hash."""

    name = "bpe"

    def __init__(self, texts: List[str], vocab_size: int, cache_dir: Path):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        digest = hashlib.sha256()
        for text in texts:
            digest.update(hashlib.sha256(text.encode()).digest())
        path = cache_dir / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
        if path.is_file():
            self._tok = Tokenizer.from_file(str(path))
        else:
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            tok.train_from_iterator(texts, trainer=trainer)
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tok.save(str(tmp))
            tmp.replace(path)
            self._tok = tok
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.uint16 if self.vocab_size < 65536 else np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])
