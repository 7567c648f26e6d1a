"""A node's stage state on disk and between replicas: checkpoint files, the final parameters,
and copying (or rebuilding) a stage for a replica that joins a generation.

A ``stage<k>.pt`` file is written by the first live replica of stage k (every replica holds the same
state), with ``save_tensors_atomic`` (temp name, fsync, rename), so a crash never leaves half a file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from skippipe.plan import Plan
from skippipe.runtime.transport import GRAD
from skippipe.train import compute
from skippipe.verify.leaves import load_state_tensors, state_tensors

log = logging.getLogger("skippipe.worker")


def first_live_replica(plan: Plan, stage_id: int, live) -> Optional[str]:
    nodes = [n for n in plan.allocation[stage_id] if n in live]
    return nodes[0] if nodes else None


def save_checkpoint(stage, optimizer, stage_id: int, step: int, directory: str) -> Dict[str, Any]:
    """Write ``stage<k>.pt`` (tensors only); its manifest entry: a digest per tensor, tagged by
    the tensor's name, as in the ledger."""
    from skippipe.verify.checkpoint import save_tensors_atomic, tensor_digests

    tensors = dict(state_tensors(stage, optimizer))
    tensors["meta/step"] = torch.tensor(step, dtype=torch.int64)
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(Path(directory) / f"stage{stage_id}.pt", tensors)
    return {"file": f"stage{stage_id}.pt", "tensors": tensor_digests(tensors)}


def load_checkpoint(stage, optimizer, stage_id: int, directory: str) -> None:
    """Load a stage's parameters and optimizer state (every replica reads the same file)."""
    from skippipe.verify.checkpoint import load_stage_file

    load_state_tensors(stage, optimizer, load_stage_file(Path(directory) / f"stage{stage_id}.pt"))


def save_final(stages: Dict[int, Any], target: Path) -> None:
    """The stages' parameters (tensors only: they load with ``torch.load(weights_only=True)``)
    as ``target/stage<k>.pt``, for evaluation and export, each with its tensor digests beside it
    (``stage<k>.digests.json``: loading checks them, so a damaged file is never used)."""
    from skippipe.verify.checkpoint import save_tensors_atomic, write_stage_digests

    target.mkdir(parents=True, exist_ok=True)
    for k, stage in stages.items():
        tensors = stage.state_dict()
        save_tensors_atomic(target / f"stage{k}.pt", tensors)
        write_stage_digests(target / f"stage{k}.pt", tensors)


def replica_sync_tensors(stage, optimizer) -> List[torch.Tensor]:
    """Parameters, then AdamW moments and step counters, in a fixed order (for replica sync)."""
    tensors = [p.data for p in stage.parameters()]
    for p in stage.parameters():
        state = optimizer.state[p]
        if not state:  # a fresh optimizer: create the state the source will send
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        tensors += [state["exp_avg"], state["exp_avg_sq"], state["step"]]
    return tensors


def sync_stage(groups, stage, optimizer, source: str) -> None:
    """Broadcast a stage's parameters and optimizer state from ``source`` to its replicas."""
    options = dist.BroadcastOptions()
    options.rootRank = groups.stage_members.index(source)
    for tensor in replica_sync_tensors(stage, optimizer):
        groups.collective(groups.stage_group.broadcast([tensor], options))


def rebuild_stage(groups, me: str, stage, my_stage: Optional[int], rebuilt: int, sources: List[str], plan: Plan,
                  n_layers: int) -> None:
    """CheckFree (arXiv 2506.15461): a stage that lost every replica restarts from the average of
    its neighbouring stages' blocks (same shapes required), with a fresh optimizer state. Each
    source sends its block parameters to every node of the rebuilt stage."""
    from skippipe.cost import split_layers

    layers = split_layers(n_layers, plan.num_stages)
    stage_of = plan.stage_of()
    if any(layers[stage_of[n]] != layers[rebuilt] for n in sources if n in stage_of):
        log.warning("stage %d: neighbours have other layer counts; keeping the initial parameters", rebuilt)
        return
    transport = groups.transport
    receivers = [n for n in plan.allocation[rebuilt] if n in groups.rank_of]
    if me in sources:
        flat = compute.flat_blocks(stage)
        for node in receivers:
            transport.send(flat, node, -1, rebuilt, GRAD)
        transport.flush()
    elif my_stage == rebuilt:
        numel = sum(p.numel() for p in stage.blocks.parameters())
        dtype = next(stage.blocks.parameters()).dtype
        flats = [transport.recv(source, -1, rebuilt, GRAD, (numel,), dtype) for source in sources]
        transport.check_received()
        compute.load_block_average(stage, flats)
