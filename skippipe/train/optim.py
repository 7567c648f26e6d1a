"""AdamW with one pinned code path, and the learning-rate schedule.

``foreach=False, fused=False`` pins the per-parameter loop so every executor (in-process, local,
torchrun, Ray) runs the same floating-point operations (DESIGN.md section 6).
"""

from __future__ import annotations

import math

import torch

from skippipe.model.transformer import Stage


def make_optimizer(stage: Stage, train_cfg) -> torch.optim.AdamW:
    decay = [p for p in stage.parameters() if p.dim() >= 2]
    no_decay = [p for p in stage.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                             eps=train_cfg.eps, foreach=False, fused=False)


def lr_at(step: int, train_cfg) -> float:
    """Linear warm-up for ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``."""
    if train_cfg.warmup_steps > 0 and step < train_cfg.warmup_steps:
        return train_cfg.lr * (step + 1) / train_cfg.warmup_steps
    horizon = getattr(train_cfg, "lr_steps", None) or train_cfg.steps  # a run extended by resume keeps its schedule
    span = max(1, horizon - train_cfg.warmup_steps)
    progress = min(1.0, (step - train_cfg.warmup_steps) / span)
    floor = train_cfg.min_lr_ratio * train_cfg.lr
    return floor + (train_cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_step(stage: Stage, optimizer: torch.optim.AdamW, flat_grad: torch.Tensor, scale: float, lr: float) -> None:
    """Clip (by the global ``scale``), set gradients, and take one AdamW step at ``lr``."""
    from skippipe.train.compute import set_flat_grads

    if scale != 1.0:
        flat_grad = flat_grad * scale
    set_flat_grads(stage, flat_grad)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
