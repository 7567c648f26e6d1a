"""The in-process reference executor (``launcher=inprocess``).

Runs a whole plan in one process: every microbatch along its own path, with the gradients of
DESIGN.md section 6. It is the golden reference for the distributed runtime (which calls the same
per-node compute in :mod:`skippipe.train.compute`) and the cheap way to study convergence, since a
replicated stage needs only one copy of its parameters here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from skippipe.data.dataset import Microbatch
from skippipe.model.presets import ModelSpec
from skippipe.model.transformer import build_stages
from skippipe.plan import Plan
from skippipe.train import compute
from skippipe.train.compute import GradAccumulator
from skippipe.train.optim import apply_step, make_optimizer


@dataclass
class StepResult:
    loss: float  # mean of the microbatch losses
    losses: Dict[int, float]  # per microbatch id
    grad_norm: float  # global norm before clipping


def microbatch_gradients(stages, stage_of: Dict[str, int], mb_route, microbatch: Microbatch,
                         accumulators) -> float:
    """Run one microbatch's F, L and B phases along its path; add its gradients to the visited
    nodes' accumulators. Returns its loss."""
    nodes = [mb_route.originator, *mb_route.path]
    saved = []
    hidden = microbatch.inputs
    for node in nodes:
        hidden, kept = compute.forward(stages[stage_of[node]], hidden)
        saved.append(kept)
    first = stages[0]
    loss, grad, head_grads = compute.loss_and_head_grads(first, hidden, microbatch.targets)
    accumulators[mb_route.originator].add(microbatch.id, compute.head_params(first), head_grads)
    for node, kept in zip(reversed(nodes), reversed(saved)):
        stage = stages[stage_of[node]]
        grad, body_grads = compute.backward(stage, kept, grad)
        accumulators[node].add(microbatch.id, compute.body_params(stage), body_grads)
        accumulators[node].complete(microbatch.id)
    return float(loss)


class ReferenceExecutor:
    """Holds one copy of every stage and its optimizer; ``step`` runs one iteration of a plan."""

    def __init__(self, spec: ModelSpec, num_stages: int, seed: int, train_cfg, device: str = "cpu"):
        self.spec = spec
        self.train_cfg = train_cfg
        self.stages = {k: s.to(device) for k, s in build_stages(spec, num_stages, seed).items()}
        self.optimizers = {k: make_optimizer(s, train_cfg) for k, s in self.stages.items()}
        self.device = device

    def gradients(self, plan: Plan, microbatches: List[Microbatch]) -> tuple[Dict[int, torch.Tensor], Dict[int, float]]:
        """Per-stage flat gradients of one iteration (before clipping) and per-microbatch losses."""
        by_id = {mb.id: mb for mb in microbatches}
        stage_of = plan.stage_of()
        accumulators = {node: GradAccumulator(self.stages[stage_of[node]], plan.visits_of(node))
                        for node in plan.nodes()}
        losses = {}
        for route in sorted(plan.microbatches, key=lambda r: r.id):
            mb = by_id[route.id]
            moved = Microbatch(mb.id, mb.sample_ids, mb.inputs.to(self.device), mb.targets.to(self.device))
            losses[route.id] = microbatch_gradients(self.stages, stage_of, route, moved, accumulators)
        num_mb = len(plan.microbatches)
        grads = {stage: compute.reduce_replicas([accumulators[n].result() for n in nodes], num_mb)
                 for stage, nodes in enumerate(plan.allocation) if stage in self.stages}
        return grads, losses

    def step(self, plan: Plan, microbatches: List[Microbatch], lr: float) -> StepResult:
        grads, losses = self.gradients(plan, microbatches)
        norm, scale = compute.clip_coefficient([compute.grad_sq_norm(grads[k]) for k in sorted(grads)],
                                               self.train_cfg.grad_clip)
        for k in sorted(grads):
            apply_step(self.stages[k], self.optimizers[k], grads[k], scale, lr)
        mean = sum(losses[i] for i in sorted(losses)) / len(losses)
        return StepResult(mean, losses, norm)

    def evaluate(self, batches, stage_path=None) -> float:
        """Mean validation loss over ``batches`` along ``stage_path`` (default: every stage in order)."""
        from skippipe.train.evaluate import evaluate

        return evaluate(self.stages, batches, stage_path, self.device)
