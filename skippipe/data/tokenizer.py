"""Tokenizers that need no network: raw bytes, a byte-level BPE trained locally and cached, or a
Hugging Face ``tokenizer.json`` from a local directory."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, List

import numpy as np

from skippipe.fileio import atomic_path


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
            with atomic_path(path) as tmp:
                tok.save(str(tmp))
            self._tok = tok
        self.path = path  # the trained tokenizer.json (shipped by `skippipe export --hf`)
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.uint16 if self.vocab_size < 65536 else np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


class HFTokenizer:
    """A local Hugging Face tokenizer (``tokenizer.json``, as ``save_pretrained`` writes it), read with
    the ``tokenizers`` library. Texts are encoded without special tokens and concatenated, like the
    other tokenizers; the name carries the file's hash so that token caches never mix tokenizers."""

    def __init__(self, location: str):
        from tokenizers import Tokenizer

        from skippipe.errors import ConfigError

        path = Path(location)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"data.hf_tokenizer={location!r}: no tokenizer.json there; give the directory "
                              "a tokenizer was saved to (save_pretrained) or the tokenizer.json file")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust library's error: bad JSON or an unknown model
            raise ConfigError(f"data.hf_tokenizer: '{path}' is not a tokenizers JSON file "
                              f"({str(err).splitlines()[0]})") from None
        self.path = path
        self.name = "hf-" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.uint16 if self.vocab_size < 65536 else np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])
