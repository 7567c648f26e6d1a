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
    """Clip (by the global ``scale``), set gradients, and take one AdamW step at ``lr``. Scale 0
    (the global norm was not finite: an fp16 overflow) skips the step: nothing changes."""
    from skippipe.train.compute import set_flat_grads

    if scale == 0.0:
        return
    if scale != 1.0:
        flat_grad = flat_grad * scale
    set_flat_grads(stage, flat_grad)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class LossScaler:
    """fp16 dynamic loss scaling, the same on every node: each keeps its own copy and updates it from
    the global gradient norm of every committed step (which all nodes agree on), so no extra message
    is needed. Halved after a step whose norm overflowed (that step is skipped), doubled after
    ``window`` good steps in a row; 1.0 always in fp32 and bf16."""

    def __init__(self, train_cfg):
        self.enabled = train_cfg.precision == "fp16"
        self.scale = float(train_cfg.loss_scale) if self.enabled else 1.0
        self.window = int(train_cfg.loss_scale_window)
        self.good_steps = 0

    def update(self, grad_norm: float) -> None:
        if not self.enabled:
            return
        if not math.isfinite(grad_norm):
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale *= 2.0
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled and state:
            self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
