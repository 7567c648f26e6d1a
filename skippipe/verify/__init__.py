"""Verifiable training (DESIGN.md section 7; Verde, arXiv 2502.19405).

- ``digest``: canonical tensor/bytes/JSON digests, Merkle roots, the hash chain.
- ``ledger``: leaf names, per-step roots, ``runs/<name>/ledger/`` writer and reader, chain checks,
  the header and when two headers are comparable.
- ``checkpoint``: checkpoint manifests of tensor digests and their verification against the ledger.
- ``compare``: bisection of two chains and the order of differing leaves.
- ``replay`` (executor side): recompute a range of steps' leaves from a run's config and routes.
- ``ops`` (executor side): operator pinning inside one disputed stage and microbatch.
"""
