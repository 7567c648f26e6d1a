"""The per-microbatch compute of one node, shared by every executor.

The in-process reference executor and the distributed worker call exactly these functions, so the
two run the same floating-point operations in the same order and agree bit for bit at a fixed thread
count. A node's work on one microbatch has up to three phases (DESIGN.md section 6):

- ``F`` forward: stage 0 embeds tokens and runs its block; any other stage runs its block on the
  received hidden state. The output is kept (with its graph) until the backward.
- ``L`` loss at the originator: final norm, LM head, cross entropy; yields the gradient of the
  hidden state that arrived back, to send along the reverse path.
- ``B`` backward: given the gradient of this node's forward output, the gradient of its input (to
  send back) and of its parameters.

Gradients are flat float vectors over ``stage.parameters()`` in order, and a node accumulates them
in microbatch-id order, whatever order the microbatches arrive in.

A :class:`Mode` says how (``train.precision``, ``train.activation_checkpointing``): in bf16 or fp16
the phases run under autocast with fp32 master weights and fp32 gradients, the residual stream
inside a stage stays fp32, and what travels between nodes (activations and their gradients) is the
compute dtype, half the bytes. With activation checkpointing, every k-th block keeps only its input
and recomputes its forward in the backward (``torch.utils.checkpoint``, non-reentrant).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from skippipe.model.presets import checkpoint_interval
from skippipe.model.transformer import Stage

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Mode:
    """How a node computes. ``autocast``: the compute dtype (None: plain fp32); ``checkpoint_every``:
    0 keeps every activation, k recomputes every k-th block of a stage in the backward."""

    autocast: Optional[torch.dtype] = None
    checkpoint_every: int = 0
    device_type: str = "cpu"

    @property
    def wire_dtype(self) -> torch.dtype:
        """The dtype of the activations and gradients sent between nodes."""
        return self.autocast or torch.float32

    def context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast)


FP32 = Mode()


def mode_of(train_cfg, device="cpu") -> Mode:
    """The :class:`Mode` of ``train.precision`` and ``train.activation_checkpointing`` on ``device``."""
    return Mode(AUTOCAST_DTYPES[train_cfg.precision], checkpoint_interval(train_cfg.activation_checkpointing),
                torch.device(device).type)


def run_blocks(stage: Stage, hidden: torch.Tensor, checkpoint_every: int = 0) -> torch.Tensor:
    """The stage's blocks in order; with ``checkpoint_every`` k, blocks 0, k, 2k, ... of the stage
    keep only their input and run again in the backward."""
    for index, block in enumerate(stage.blocks):
        if checkpoint_every and index % checkpoint_every == 0:
            hidden = checkpoint(block, hidden, use_reentrant=False)
        else:
            hidden = block(hidden)
    return hidden


def head_params(stage: Stage) -> List[torch.nn.Parameter]:
    return [*stage.norm.parameters(), *stage.head.parameters()]


def body_params(stage: Stage) -> List[torch.nn.Parameter]:
    """Parameters used by the forward phase (stage 0: embedding and its blocks)."""
    if stage.stage_id == 0:
        return [*stage.embed.parameters(), *stage.blocks.parameters()]
    return list(stage.blocks.parameters())


def flat_param_index(stage: Stage) -> Dict[int, Tuple[int, int]]:
    """id(param) -> (offset, numel) in the flat gradient vector (stage.parameters() order)."""
    out, offset = {}, 0
    for p in stage.parameters():
        out[id(p)] = (offset, p.numel())
        offset += p.numel()
    return out


@dataclass
class Saved:
    """What a node keeps between a microbatch's forward and its backward."""

    inp: Optional[torch.Tensor]  # the received hidden state (None at the originator)
    out: torch.Tensor  # this node's forward output, with its graph


def forward(stage: Stage, hidden_or_tokens: torch.Tensor, mode: Mode = FP32) -> Tuple[torch.Tensor, Saved]:
    """Phase F. Returns (activation to send, in ``mode.wire_dtype``; saved state). Shapes: tokens
    (b, t); hidden (b, t, d)."""
    with torch.enable_grad(), mode.context():
        if stage.stage_id == 0 and not hidden_or_tokens.is_floating_point():
            inp, hidden = None, stage.embed_tokens(hidden_or_tokens)
        else:
            inp = hidden_or_tokens.detach().requires_grad_(True)
            hidden = inp if mode.autocast is None else inp.float()  # the residual stream stays fp32
        out = run_blocks(stage, hidden, mode.checkpoint_every)
        if mode.autocast is not None:
            out = out.to(mode.autocast)
    return out.detach(), Saved(inp, out)


def loss_and_head_grads(stage: Stage, hidden: torch.Tensor, targets: torch.Tensor, mode: Mode = FP32,
                        loss_scale: float = 1.0):
    """Phase L at the originator. Returns (loss value, grad of ``hidden``, head parameter grads);
    the gradients are of ``loss * loss_scale`` (fp16 loss scaling; 1 otherwise)."""
    with torch.enable_grad(), mode.context():
        inp = hidden.detach().requires_grad_(True)
        loss = stage.loss(inp if mode.autocast is None else inp.float(), targets)
        params = head_params(stage)
        grads = torch.autograd.grad(loss if loss_scale == 1.0 else loss * loss_scale, [inp, *params])
    return loss.detach(), grads[0], list(grads[1:])


def backward(stage: Stage, saved: Saved, grad_out: torch.Tensor):
    """Phase B. Returns (grad of the input hidden state or None at stage 0, body parameter grads)."""
    params = body_params(stage)
    inputs = params if saved.inp is None else [saved.inp, *params]
    grads = torch.autograd.grad(saved.out, inputs, grad_outputs=grad_out)
    if saved.inp is None:
        return None, list(grads)
    return grads[0], list(grads[1:])


@dataclass
class GradAccumulator:
    """Sum of one node's per-microbatch gradients, added strictly in microbatch-id order.

    ``expected`` lists the microbatch ids that visit this node; a gradient that arrives early waits
    in ``pending`` until every smaller id has been added (DESIGN.md section 6: bitwise reproducible
    whatever the arrival order).
    """

    stage: Stage
    expected: List[int]
    total: torch.Tensor = field(init=False)
    pending: Dict[int, Dict[int, torch.Tensor]] = field(default_factory=dict)
    next_index: int = 0

    def __post_init__(self):
        numel = sum(p.numel() for p in self.stage.parameters())
        ref = next(self.stage.parameters())
        self.total = torch.zeros(numel, dtype=ref.dtype, device=ref.device)
        self.expected = sorted(self.expected)
        index = flat_param_index(self.stage)
        self._slices = {}  # id(param) -> its slice of ``total``, shaped like it
        for p in self.stage.parameters():
            start = index[id(p)][0]
            self._slices[id(p)] = self.total[start:start + p.numel()].view(p.shape)

    def add(self, microbatch_id: int, params: List[torch.nn.Parameter], grads: List[torch.Tensor]) -> None:
        """Record (part of) a microbatch's gradient; phases L and B each give a disjoint part."""
        part = self.pending.setdefault(microbatch_id, {})
        for p, g in zip(params, grads):
            part[id(p)] = g

    def complete(self, microbatch_id: int) -> None:
        """Mark a microbatch's gradient as whole; fold in every complete gradient that is next in order."""
        self.pending[microbatch_id]["done"] = True  # type: ignore[assignment]
        while self.next_index < len(self.expected):
            mb = self.expected[self.next_index]
            part = self.pending.get(mb)
            if part is None or "done" not in part:
                break
            # in place, slice by slice, in one call: the same additions as ``total + flat`` element by
            # element (every parameter of the stage gets a gradient from phase L or B of each microbatch)
            keys = [key for key in part if key != "done"]
            torch._foreach_add_([self._slices[key] for key in keys], [part[key] for key in keys])
            del self.pending[mb]
            self.next_index += 1

    def result(self) -> torch.Tensor:
        if self.next_index != len(self.expected):
            missing = self.expected[self.next_index:]
            raise RuntimeError(f"stage {self.stage.stage_id}: gradients of microbatches {missing} never completed")
        return self.total


def reduce_replicas(node_totals: List[torch.Tensor], num_microbatches: int, loss_scale: float = 1.0) -> torch.Tensor:
    """A stage's gradient: replica sums added in allocation order, then divided by the iteration's
    microbatch count (DESIGN.md section 6: replicas combine by sum; a skip contributes zero) and by
    the loss scale the gradients were computed at (a power of two: exact)."""
    total = torch.zeros_like(node_totals[0])
    for node_total in node_totals:
        total = total + node_total
    total = total / num_microbatches
    return total if loss_scale == 1.0 else total / loss_scale


def grad_sq_norm(flat_grad: torch.Tensor) -> torch.Tensor:
    return flat_grad.double().pow(2).sum()


def clip_coefficient(stage_sq_norms: List[torch.Tensor], max_norm: float) -> Tuple[float, float]:
    """Global norm over all stages, summed in stage order; returns (norm, scale <= 1). A norm that is
    not finite (an fp16 overflow) gives scale 0: the step is skipped on every stage."""
    total = torch.zeros((), dtype=torch.float64)
    for sq in stage_sq_norms:
        total = total + sq.to(torch.float64).cpu()
    norm = float(total.sqrt())
    if not math.isfinite(norm):
        return norm, 0.0
    if max_norm <= 0:
        return norm, 1.0
    return norm, min(1.0, max_norm / (norm + 1e-6))


def set_flat_grads(stage: Stage, flat_grad: torch.Tensor) -> None:
    """Each parameter's ``.grad`` becomes a view into ``flat_grad`` (no copy: the optimizer only
    reads gradients, and ``zero_grad(set_to_none=True)`` drops the views after the step)."""
    offset = 0
    for p in stage.parameters():
        p.grad = flat_grad[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


def flat_blocks(stage: Stage) -> torch.Tensor:
    """The stage's transformer-block parameters as one flat tensor (what CheckFree averages)."""
    return torch.cat([p.detach().reshape(-1) for p in stage.blocks.parameters()])


def load_block_average(stage: Stage, flats: List[torch.Tensor]) -> None:
    """CheckFree (arXiv 2506.15461): set the stage's blocks to the mean of ``flats`` (neighbours'
    :func:`flat_blocks`, in order). The worker that rebuilds a stage and the replay both call it,
    so the result is the same bit for bit."""
    params = list(stage.blocks.parameters())
    total = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    for flat in flats:
        total += flat
    total /= max(1, len(flats))
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(total[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
