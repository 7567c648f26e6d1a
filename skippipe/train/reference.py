"""The in-process reference executor (``launcher=inprocess``).

Runs a whole plan in one process: every microbatch along its own path, with the gradients of
DESIGN.md section 6. It is the golden reference for the distributed runtime (which calls the same
per-node compute in :mod:`skippipe.train.compute`) and the cheap way to study convergence, since a
replicated stage needs only one copy of its parameters here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from skippipe.data.dataset import Microbatch
from skippipe.model.presets import ModelSpec
from skippipe.model.transformer import build_stages
from skippipe.plan import Plan
from skippipe.train import compute
from skippipe.train.compute import GradAccumulator
from skippipe.train.optim import apply_step, make_optimizer
from skippipe.verify.leaves import (
    data_leaves,
    gnorm_leaves,
    hop_leaves,
    loss_leaves,
    node_state_leaves,
    route_leaves,
    state_digests,
)


@dataclass
class StepResult:
    loss: float  # mean of the microbatch losses
    losses: Dict[int, float]  # per microbatch id
    grad_norm: float  # global norm before clipping
    leaves: Dict[str, str] = field(default_factory=dict)  # ledger leaves of the step (verify.level)


def microbatch_gradients(stages, stage_of: Dict[str, int], mb_route, microbatch: Microbatch,
                         accumulators, on_send: Optional[Callable] = None, mode: compute.Mode = compute.FP32,
                         loss_scale: float = 1.0) -> float:
    """Run one microbatch's F, L and B phases along its path; add its gradients to the visited
    nodes' accumulators. Returns its loss. ``on_send(kind, microbatch_id, hop, sender_stage, tensor)``
    sees every tensor that a distributed run would send (hop h: nodes[h] -> nodes[h+1])."""
    nodes = [mb_route.originator, *mb_route.path]
    saved = []
    hidden = microbatch.inputs
    for hop, node in enumerate(nodes):
        hidden, kept = compute.forward(stages[stage_of[node]], hidden, mode)
        saved.append(kept)
        if on_send is not None:
            on_send("act", microbatch.id, hop, stage_of[node], hidden)
    first = stages[0]
    loss, grad, head_grads = compute.loss_and_head_grads(first, hidden, microbatch.targets, mode, loss_scale)
    if on_send is not None:
        on_send("grad", microbatch.id, len(nodes) - 1, 0, grad)
    accumulators[mb_route.originator].add(microbatch.id, compute.head_params(first), head_grads)
    for hop in reversed(range(len(nodes))):
        node, stage = nodes[hop], stages[stage_of[nodes[hop]]]
        grad, body_grads = compute.backward(stage, saved[hop], grad)
        accumulators[node].add(microbatch.id, compute.body_params(stage), body_grads)
        accumulators[node].complete(microbatch.id)
        if on_send is not None and hop > 0:
            on_send("grad", microbatch.id, hop - 1, stage_of[node], grad)
    return float(loss)


class ReferenceExecutor:
    """Holds one copy of every stage and its optimizer; ``step`` runs one iteration of a plan."""

    def __init__(self, spec: ModelSpec, num_stages: int, seed: int, train_cfg, device: str = "cpu"):
        self.spec = spec
        self.train_cfg = train_cfg
        self.stages = {k: s.to(device) for k, s in build_stages(spec, num_stages, seed).items()}
        self.optimizers = {k: make_optimizer(s, train_cfg) for k, s in self.stages.items()}
        self.device = device
        self.mode = compute.mode_of(train_cfg, device)

    def gradients(self, plan: Plan, microbatches: List[Microbatch], level: str = "off",
                  leaves: Optional[Dict[str, str]] = None, loss_scale: float = 1.0):
        """Per-stage flat gradients of one iteration (before clipping) and per-microbatch losses;
        fills ``leaves`` with the data (and, at level ``full``, the sent tensors') digests."""
        by_id = {mb.id: mb for mb in microbatches}
        stage_of = plan.stage_of()
        accumulators = {node: GradAccumulator(self.stages[stage_of[node]], plan.visits_of(node))
                        for node in plan.nodes()}
        on_send = None
        if level == "full" and leaves is not None:
            def on_send(kind, mb_id, hop, sender_stage, tensor):
                leaves.update(hop_leaves(kind, mb_id, hop, sender_stage, tensor))
        losses = {}
        for route in sorted(plan.microbatches, key=lambda r: r.id):
            mb = by_id[route.id]
            if level != "off" and leaves is not None:
                leaves.update(data_leaves(mb))
            moved = Microbatch(mb.id, mb.sample_ids, mb.inputs.to(self.device), mb.targets.to(self.device))
            losses[route.id] = microbatch_gradients(self.stages, stage_of, route, moved, accumulators, on_send,
                                                    self.mode, loss_scale)
        num_mb = len(plan.microbatches)
        grads = {stage: compute.reduce_replicas([accumulators[n].result() for n in nodes], num_mb, loss_scale)
                 for stage, nodes in enumerate(plan.allocation) if stage in self.stages and nodes}
        # (a stage that lost every replica is held by nobody: no gradient, no update, as in a live run)
        return grads, losses

    def step(self, plan: Plan, microbatches: List[Microbatch], lr: float, level: str = "off",
             loss_scale: float = 1.0) -> StepResult:
        """One iteration; ``loss_scale``: the fp16 loss scale of the step (1 otherwise)."""
        leaves: Dict[str, str] = {}
        grads, losses = self.gradients(plan, microbatches, level, leaves, loss_scale)
        sq_norms = {k: compute.grad_sq_norm(grads[k]) for k in sorted(grads)}
        norm, scale = compute.clip_coefficient([sq_norms[k] for k in sorted(sq_norms)], self.train_cfg.grad_clip)
        for k in sorted(grads):
            apply_step(self.stages[k], self.optimizers[k], grads[k], scale, lr)
        if level != "off":  # every replica holds the same state: hash once, name it per node
            leaves.update(route_leaves(plan))
            leaves.update(loss_leaves(losses))
            leaves.update(gnorm_leaves(sq_norms))
            for k, nodes in enumerate(plan.allocation):
                if nodes:
                    leaves.update(node_state_leaves(k, nodes, state_digests(self.stages[k], self.optimizers[k])))
        mean = sum(losses[i] for i in sorted(losses)) / len(losses)
        return StepResult(mean, losses, norm, leaves)

    def evaluate(self, batches, stage_path=None) -> float:
        """Mean validation loss over ``batches`` along ``stage_path`` (default: every stage in order)."""
        from skippipe.train.evaluate import evaluate

        return evaluate(self.stages, batches, stage_path, self.device)
