"""Token data: the offline default corpus, user text files, token files and HF datasets.

The default corpus is real text present on every machine with Python: the standard library's own
source files (code and English docstrings/comments), read in sorted order, capped at
``data.max_corpus_mb``. Files are split into train/validation by a hash of their relative path, so
the split is fixed and does not depend on the cap.

A microbatch is rebuilt from (seed, step, microbatch id) alone: :meth:`TokenData.microbatch` draws its
sample ids from a generator keyed by exactly those numbers and records them.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from skippipe.data.tokenizer import BPETokenizer, ByteTokenizer, HFTokenizer
from skippipe.errors import UserError
from skippipe.fileio import atomic_path

log = logging.getLogger(__name__)

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
              "ensurepip", "__pycache__", "tkinter", "pydoc_data"}


@dataclass
class Microbatch:
    """One microbatch: ``inputs``/``targets`` are (samples, seq_len) int64; ``sample_ids`` index the
    train windows they came from."""

    id: int
    sample_ids: List[int]
    inputs: torch.Tensor
    targets: torch.Tensor


def cache_dir(data_cfg) -> Path:
    root = data_cfg.cache_dir or os.environ.get("SKIPPIPE_CACHE") or "~/.cache/skippipe"
    return Path(root).expanduser()


def _is_val(rel_path: str, val_fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:4], "big") / 2**32
    return bucket < val_fraction


def stdlib_files() -> Tuple[Path, List[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if not _SKIP_DIRS.intersection(p.relative_to(root).parts)]
    return root, files


def _read_split_texts(root: Path, files: List[Path], max_bytes: int, val_fraction: float):
    train, val, total = [], [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (val if _is_val(str(path.relative_to(root)), val_fraction) else train).append(text)
        total += len(text)
        if total >= max_bytes:
            break
    if not train or not val:  # too few files to split by file: split the text itself
        text = "".join(train + val)
        if len(text) < 2:
            raise UserError(f"data: no readable text under '{root}'; point data.path at UTF-8 text files")
        cut = int(len(text) * (1 - val_fraction))
        train, val = [text[:cut]], [text[cut:]]
    return train, val


def _text_files(pattern: str) -> Tuple[Path, List[Path]]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        return path, sorted(p for p in path.rglob("*") if p.is_file())
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not matches:
        raise UserError(f"data.path: '{pattern}' matches no file; give an existing file, directory or glob")
    return Path(os.path.commonpath([str(m.parent) for m in matches])), matches


class TokenData:
    """Train and validation token arrays plus the tokenizer that made them."""

    def __init__(self, train: np.ndarray, val: np.ndarray, tokenizer, description: str):
        self.train, self.val, self.tokenizer, self.description = train, val, tokenizer, description

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def num_windows(self, seq_len: int) -> int:
        return max(0, (len(self.train) - 1) // seq_len)

    def window(self, array: np.ndarray, index: int, seq_len: int) -> np.ndarray:
        start = index * seq_len
        return np.asarray(array[start:start + seq_len + 1], dtype=np.int64)

    def microbatch(self, seed: int, step: int, microbatch_id: int, samples: int, seq_len: int) -> Microbatch:
        """The microbatch ``microbatch_id`` of ``step``: same arguments, same tokens, on any node."""
        windows = self.num_windows(seq_len)
        if windows < 1:
            raise UserError(f"data: the training text has {len(self.train)} tokens, fewer than model.seq_len+1; "
                            "give more data or lower model.seq_len")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, microbatch_id])))
        ids = rng.integers(0, windows, size=samples)
        rows = torch.from_numpy(np.stack([self.window(self.train, int(i), seq_len) for i in ids]))
        return Microbatch(microbatch_id, [int(i) for i in ids], rows[:, :-1].contiguous(), rows[:, 1:].contiguous())

    def val_batches(self, num_batches: int, samples: int, seq_len: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Fixed validation batches: windows spread evenly over the validation tokens."""
        windows = max(0, (len(self.val) - 1) // seq_len)
        if windows < 1:
            raise UserError("data: the validation split is shorter than model.seq_len+1; raise data.val_fraction")
        wanted = min(windows, num_batches * samples)
        picks = np.linspace(0, windows - 1, wanted).round().astype(int)
        batches = []
        for start in range(0, wanted, samples):
            rows = torch.from_numpy(np.stack([self.window(self.val, int(i), seq_len) for i in picks[start:start + samples]]))
            batches.append((rows[:, :-1].contiguous(), rows[:, 1:].contiguous()))
        return batches


def _tokenize(data_cfg, train_texts: List[str], val_texts: List[str], tag: str) -> TokenData:
    cdir = cache_dir(data_cfg)
    if data_cfg.tokenizer == "bpe":
        tokenizer = BPETokenizer(train_texts, data_cfg.bpe_vocab_size, cdir)
    elif data_cfg.tokenizer == "hf":
        tokenizer = HFTokenizer(data_cfg.hf_tokenizer)
    else:
        tokenizer = ByteTokenizer()
    digest = hashlib.sha256(tag.encode())
    for text in train_texts + ["\x00val\x00"] + val_texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    key = f"{tokenizer.name}-{getattr(tokenizer, 'vocab_size', 0)}-{digest.hexdigest()[:16]}"
    arrays = []
    for split, texts in (("train", train_texts), ("val", val_texts)):
        path = cdir / f"{key}.{split}.npy"
        if path.is_file():
            arrays.append(np.load(path, mmap_mode="r"))
            continue
        tokens = np.concatenate([tokenizer.encode(t) for t in texts])
        with atomic_path(path) as tmp:
            np.save(tmp, tokens)
        arrays.append(tokens)
    return TokenData(arrays[0], arrays[1], tokenizer, tag)


def _load_token_file(data_cfg) -> TokenData:
    path = Path(data_cfg.path).expanduser()
    if not path.is_file():
        raise UserError(f"data.path: token file '{data_cfg.path}' does not exist")
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
    else:
        if data_cfg.token_dtype not in ("uint16", "uint32"):
            raise UserError(f"data.token_dtype={data_cfg.token_dtype!r}: use uint16 or uint32")
        tokens = np.memmap(path, dtype=data_cfg.token_dtype, mode="r")
    split = int(len(tokens) * (1 - data_cfg.val_fraction))

    class _Given:  # token files come pre-tokenized: the vocabulary is max id + 1 unless configured
        name = "given"
        vocab_size = int(tokens.max()) + 1 if len(tokens) else 1

    return TokenData(tokens[:split], tokens[split:], _Given(), f"tokens:{path}")


def _load_hf(data_cfg) -> Tuple[List[str], List[str]]:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise UserError("data.source=hf needs the `datasets` package: pip install datasets") from None
    from datasets import load_dataset, load_from_disk

    name = data_cfg.hf_name
    ds = load_from_disk(name) if Path(name).is_dir() else load_dataset(name, split=data_cfg.hf_split)
    if hasattr(ds, "keys") and data_cfg.hf_split in ds:
        ds = ds[data_cfg.hf_split]
    if data_cfg.hf_text_field not in ds.column_names:
        raise UserError(f"data.hf_text_field={data_cfg.hf_text_field!r} is not a column of {name} "
                        f"(columns: {', '.join(ds.column_names)})")
    train, val, total = [], [], 0
    for i, row in enumerate(ds):
        text = row[data_cfg.hf_text_field]
        (val if _is_val(f"{name}:{i}", data_cfg.val_fraction) else train).append(text)
        total += len(text)
        if total >= data_cfg.max_corpus_mb * 1e6:
            break
    return train, val


def load_data(data_cfg) -> TokenData:
    """Load and tokenize the configured data (cached under ``data.cache_dir``)."""
    max_bytes = int(data_cfg.max_corpus_mb * 1e6)
    if data_cfg.source == "tokens":
        return _load_token_file(data_cfg)
    if data_cfg.source == "hf":
        train, val = _load_hf(data_cfg)
        return _tokenize(data_cfg, train, val, f"hf:{data_cfg.hf_name}")
    if data_cfg.source == "files":
        root, files = _text_files(data_cfg.path)
        tag = f"files:{data_cfg.path}"
    else:
        root, files = stdlib_files()
        tag = f"stdlib:python{sys.version_info.major}.{sys.version_info.minor}"
    train, val = _read_split_texts(root, files, max_bytes, data_cfg.val_fraction)
    return _tokenize(data_cfg, train, val, tag)
