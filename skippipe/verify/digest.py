"""Canonical digests, Merkle roots and the hash chain of the ledger (DESIGN.md section 7).

Every digest is sha256 over length-prefixed fields (8-byte little-endian length, then the bytes), led
by a kind word (``tensor``, ``bytes``, ``json``, ``leaf``, ``node``, ...), so no two different inputs
frame to the same byte string. Tensors are hashed over their raw contiguous bytes, never over pickled
files (pickle output is not canonical): dtype name, shape and bytes, so strides, storage offset and
conjugate/negative views do not matter, while ``-0.0`` vs ``0.0`` and NaN payloads do (the digest is
bitwise on purpose). The chain ``c_s = H(c_{s-1}, s, root_s)`` with ``c_{-1} = H(header)`` commits the
whole history in one value and is monotone: once two chains differ they stay different, which is what
makes bisection find the *first* divergent step (Verde, arXiv 2502.19405).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Union

import torch

Field = Union[str, bytes, bytearray, memoryview]


def _update(h, data: Field) -> None:
    if isinstance(data, str):
        data = data.encode("utf-8")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    h.update(size.to_bytes(8, "little"))
    h.update(data)


def hash_fields(*fields: Field) -> str:
    """sha256 hex over length-prefixed fields."""
    h = hashlib.sha256()
    for item in fields:
        _update(h, item)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the same object always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a dense CPU tensor in row-major order, without copying a contiguous tensor."""
    if t.layout != torch.strided:
        raise ValueError(f"tensor_digest: only dense tensors can be hashed, got layout {t.layout}")
    flat = t.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    # reinterpret, never cast: bf16/fp16 bits go through unchanged
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_digest(tag: str, t: torch.Tensor) -> str:
    """sha256 hex over (tag, dtype name, shape, raw contiguous bytes) of ``t`` (any shape, any device)."""
    h = hashlib.sha256()
    _update(h, "tensor")
    _update(h, tag)
    _update(h, str(t.dtype).removeprefix("torch."))
    shape = b"".join(int(d).to_bytes(8, "little", signed=True) for d in t.shape)
    _update(h, len(t.shape).to_bytes(8, "little") + shape)
    _update(h, _tensor_bytes(t))
    return h.hexdigest()


def bytes_digest(tag: str, data: bytes) -> str:
    return hash_fields("bytes", tag, data)


def json_digest(tag: str, obj: Any) -> str:
    """Digest of the canonical JSON text of ``obj`` (sorted keys, no spaces)."""
    return hash_fields("json", tag, canonical_json(obj))


EMPTY_ROOT = hash_fields("empty")


def leaf_hash(name: str, digest: str) -> str:
    return hash_fields("leaf", name, digest)


def merkle_root(leaves: Dict[str, str]) -> str:
    """Merkle root over ``{leaf name: digest}``.

    Leaf hashes ``H(leaf, name, digest)`` in sorted name order, then pairs ``H(node, left, right)``
    level by level; an odd last node is promoted unchanged. An empty map has root ``H(empty)``.
    """
    if not leaves:
        return EMPTY_ROOT
    level: List[str] = [leaf_hash(name, leaves[name]) for name in sorted(leaves)]
    while len(level) > 1:
        up = [hash_fields("node", level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            up.append(level[-1])
        level = up
    return level[0]


def chain_start(header: dict) -> str:
    """``c_{-1}``: the digest of the canonical JSON of the ledger header."""
    return hash_fields("header", canonical_json(header))


def chain_next(prev: str, step: int, root: str) -> str:
    """``c_s = H(c_{s-1}, s, root_s)``."""
    return hash_fields("chain", prev, str(int(step)), root)
