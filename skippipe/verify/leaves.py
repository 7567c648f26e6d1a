"""The leaves of a step's ledger entry, as every executor computes them (DESIGN.md section 7).

Names (stage membership is the ``stage{k}`` segment; the others are global):

- ``data/mb{id}``: sample ids and tokens of a microbatch;
- ``route``: the executed allocation and paths;
- ``loss/mb{id}``: a microbatch's loss (float64 bytes of the reported value);
- ``act/mb{id}/hop{h}/stage{k}``, ``grad/mb{id}/hop{h}/stage{k}`` (``verify.level=full``): every
  activation and gradient sent between nodes; hop ``h`` goes from ``nodes[h]`` to ``nodes[h+1]`` of
  the microbatch's node list (originator first, back to it at the end), its gradient the reverse;
  ``k`` is the sending node's stage;
- ``param/stage{k}/{node}/{tensor}``, ``opt/stage{k}/{node}/{tensor}/{exp_avg|exp_avg_sq|step}``: the
  state of every node after the step's optimizer update.

The functions here return leaves (``{name: digest}``: ``data_leaves``, ``hop_leaves``, ...); the
names alone come from :mod:`skippipe.verify.ledger` (``ledger.data_leaf(id) -> "data/mb{id}"``).

Tensor digests use the tensor's role as tag (``param/<name>``), not the node, so replicas and a
checkpoint's manifest carry the same digests.
"""

from __future__ import annotations

import json
import struct
from typing import Dict, List

import torch

from skippipe.verify import ledger
from skippipe.verify.digest import bytes_digest, json_digest, tensor_digest

OPT_KEYS = ("exp_avg", "exp_avg_sq", "step")


def data_leaves(microbatch) -> Dict[str, str]:
    ids = json.dumps(list(microbatch.sample_ids)).encode()
    parts = ids + tensor_digest("data/inputs", microbatch.inputs).encode() + \
        tensor_digest("data/targets", microbatch.targets).encode()
    return {ledger.data_leaf(microbatch.id): bytes_digest("data", parts)}


def route_leaves(plan) -> Dict[str, str]:
    routes = [[mb.id, mb.originator, list(mb.path)] for mb in sorted(plan.microbatches, key=lambda m: m.id)]
    return {"route": json_digest("route", {"allocation": plan.allocation, "microbatches": routes})}


def loss_leaves(losses: Dict[int, float]) -> Dict[str, str]:
    return {ledger.loss_leaf(mb): bytes_digest("loss", struct.pack("<d", float(v))) for mb, v in losses.items()}


def gnorm_leaves(stage_sq_norms: Dict[int, object]) -> Dict[str, str]:
    """``gnorm/stage<k>``: each stage's squared gradient norm before the global-norm clip. The clip
    scales every stage's update by one factor, so a gradient wrong in one stage changes every stage's
    state; these leaves come first in a step's update and name the stage where it started."""
    return {f"gnorm/stage{k}": bytes_digest("gnorm", struct.pack("<d", float(v))) for k, v in stage_sq_norms.items()}


def hop_leaves(kind: str, microbatch_id: int, hop: int, sender_stage: int, tensor: torch.Tensor) -> Dict[str, str]:
    name = (ledger.act_leaf if kind == "act" else ledger.grad_leaf)(microbatch_id, hop, sender_stage)
    return {name: tensor_digest(kind, tensor)}


def state_tensors(stage, optimizer) -> Dict[str, torch.Tensor]:
    """``param/<name>`` and ``opt/<name>/<key>`` for a stage: the tensors of a checkpoint."""
    out: Dict[str, torch.Tensor] = {}
    for name, p in stage.named_parameters():
        out[f"param/{name}"] = p.detach()
    for name, p in stage.named_parameters():
        state = optimizer.state.get(p, {})
        for key in OPT_KEYS:
            if key in state:
                value = state[key]
                out[f"opt/{name}/{key}"] = value if torch.is_tensor(value) else torch.tensor(float(value))
    return out


def state_digests(stage, optimizer) -> Dict[str, str]:
    """Digest of every state tensor, tagged by its role: the same for every replica holding it, and
    equal to a checkpoint manifest's entries."""
    return {role: tensor_digest(role, t) for role, t in state_tensors(stage, optimizer).items()}


def node_state_leaves(stage_id: int, nodes: List[str], digests: Dict[str, str]) -> Dict[str, str]:
    """Ledger leaves of one stage's state digests, for each node holding that state."""
    out = {}
    for node in nodes:
        for role, digest in digests.items():
            name = ledger.checkpoint_to_leaf(stage_id, node, role)
            if name is not None:
                out[name] = digest
    return out


def load_state_tensors(stage, optimizer, tensors: Dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's ``param/`` and ``opt/`` tensors into a stage and its AdamW state."""
    with torch.no_grad():
        for name, p in stage.named_parameters():
            p.copy_(tensors[f"param/{name}"].to(p.device))
            state = optimizer.state[p]
            for key in OPT_KEYS:
                stored = tensors.get(f"opt/{name}/{key}")
                if stored is not None:
                    state[key] = stored.to(p.device if key != "step" else stored.device).clone()
