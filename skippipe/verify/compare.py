"""Comparing two runs: bisect their hash chains, then order the differing leaves of one step.

The chain is monotone (once ``c_s`` differs, every later ``c`` differs), so bisection over chain
equality finds the *first* divergent step in ``ceil(log2 n) + 1`` lookups with no compute (Verde
phase 1, arXiv 2502.19405). If a chain were not monotone (a forged ledger that does not follow its
own links; :func:`skippipe.verify.ledger.check_links` catches that), bisection still finds *a* step
where the runs go from agreeing to disagreeing, which is enough to adjudicate that step.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Tuple

ChainLookup = Callable[[int], str]

_LEAF = re.compile(r"^(?P<kind>data|loss)/mb(?P<mb>\d+)$"
                   r"|^(?P<ekind>act|grad)/mb(?P<emb>\d+)/hop(?P<hop>\d+)/stage(?P<estage>\d+)$"
                   r"|^(?P<skind>param|opt)/stage(?P<sstage>\d+)/(?P<node>[^/]+)/(?P<tensor>.+)$")
_OPT_SLOTS = ("step", "exp_avg", "exp_avg_sq")


def first_divergent_step(chain_a: ChainLookup, chain_b: ChainLookup, n: int) -> Tuple[Optional[int], int]:
    """First step ``s < n`` with ``chain_a(s) != chain_b(s)`` (None if none) and the number of lookups.

    One lookup = reading both chains at one step. At most ``ceil(log2 n) + 1`` lookups.
    """
    if n <= 0:
        return None, 0
    lookups = 1
    if chain_a(n - 1) == chain_b(n - 1):
        return None, lookups
    lo, hi = 0, n - 1  # invariant: the chains differ at hi; every step < lo agrees
    while lo < hi:
        mid = (lo + hi) // 2
        lookups += 1
        if chain_a(mid) != chain_b(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo, lookups


def linear_first_divergent_step(chain_a: ChainLookup, chain_b: ChainLookup, n: int) -> Optional[int]:
    """The same answer by scanning every step (for tests and for chains that may not be monotone)."""
    for step in range(n):
        if chain_a(step) != chain_b(step):
            return step
    return None


def describe_leaf(name: str) -> dict:
    """``{kind, stage, microbatch, hop, node, tensor, slot}`` of a leaf name; None where it does not apply."""
    out = {"kind": name.split("/")[0], "stage": None, "microbatch": None, "hop": None, "node": None,
           "tensor": None, "slot": None}
    match = _LEAF.match(name)
    if match is None:
        from skippipe.verify.ledger import leaf_stage

        out["stage"] = leaf_stage(name)
        return out
    if match.group("kind"):
        out["microbatch"] = int(match.group("mb"))
    elif match.group("ekind"):
        out.update(microbatch=int(match.group("emb")), hop=int(match.group("hop")), stage=int(match.group("estage")))
    else:
        tensor = match.group("tensor")
        if match.group("skind") == "opt":
            tensor, _, slot = tensor.rpartition("/")
            out["slot"] = slot
        out.update(stage=int(match.group("sstage")), node=match.group("node"), tensor=tensor)
    return out


def leaf_order_key(name: str) -> tuple:
    """Sort key putting leaves in the order a step computes them.

    data (by microbatch), route, rng, forward activations (by microbatch, hop), losses, backward
    gradients (by microbatch, hops from the last to the first, as backward runs), gnorm, then each
    stage's optimizer update (by stage, node, tensor: step, exp_avg, exp_avg_sq, then the parameter),
    then anything else by name.
    """
    d = describe_leaf(name)
    kind = d["kind"]
    if kind == "data" and d["microbatch"] is not None:
        return (0, d["microbatch"], 0, name)
    if name == "route":
        return (1, 0, 0, name)
    if kind == "rng":
        return (2, 0, 0, name)
    if kind == "act" and d["hop"] is not None:
        return (3, d["microbatch"], d["hop"], name)
    if kind == "loss" and d["microbatch"] is not None:
        return (4, d["microbatch"], 0, name)
    if kind == "grad" and d["hop"] is not None:
        return (5, d["microbatch"], -d["hop"], name)
    if kind == "gnorm":
        return (6, 0, 0, name)
    if kind in ("param", "opt") and d["tensor"] is not None:
        slot = _OPT_SLOTS.index(d["slot"]) if d["slot"] in _OPT_SLOTS else len(_OPT_SLOTS)
        return (7, d["stage"], (d["node"], d["tensor"], slot), name)
    return (8, 0, 0, name)


def diff_leaves(a: Dict[str, str], b: Dict[str, str]) -> List[str]:
    """Names of leaves that differ or exist on one side only, earliest computed first."""
    names = [name for name in set(a) | set(b) if a.get(name) != b.get(name)]
    return sorted(names, key=leaf_order_key)


def differing_stages(line_a: dict, line_b: dict) -> List[Optional[int]]:
    """Stages whose roots differ between two steps.jsonl lines (None = the global leaves), in order."""
    out: List[Optional[int]] = [None] if line_a.get("global_root") != line_b.get("global_root") else []
    roots_a, roots_b = line_a.get("stage_roots", {}), line_b.get("stage_roots", {})
    keys = sorted(set(roots_a) | set(roots_b), key=lambda k: int(k) if str(k).isdigit() else -1)
    return out + [int(k) for k in keys if roots_a.get(k) != roots_b.get(k) and str(k).isdigit()]
