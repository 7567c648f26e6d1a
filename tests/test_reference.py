import copy

import torch
from plans import make_plan

from skippipe.config import load_config
from skippipe.data.dataset import Microbatch
from skippipe.model.presets import PRESETS
from skippipe.model.transformer import forward_path
from skippipe.train.reference import ReferenceExecutor

SPEC = PRESETS["tiny"]
ALLOCATION = [["a0", "a1"], ["b0", "b1"], ["c0"], ["d0"]]
# skips and swaps (3 of 4 stages visited), several replicas of stages 0 and 1
STAGE_PATHS = [[1, 2], [2, 1], [1, 3], [3, 2], [2, 3], [1, 2]]


def microbatches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        tokens = torch.randint(0, SPEC.vocab_size, (2, 33), generator=gen)
        out.append(Microbatch(i, [i], tokens[:, :-1], tokens[:, 1:]))
    return out


def direct_gradients(executor, plan, mbs):
    """Autograd of the mean of per-microbatch losses, computed in one graph."""
    stages = copy.deepcopy(executor.stages)
    for s in stages.values():
        s.zero_grad(set_to_none=True)
    losses = [forward_path(stages, mb.inputs, mb.targets, plan.stages_of(route))
              for route, mb in zip(plan.microbatches, mbs)]
    torch.stack(losses).mean().backward()
    flat = {}
    for k, s in stages.items():
        flat[k] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                             for p in s.parameters()])
    return flat


def test_reference_gradients_equal_autograd_of_mean_loss():
    cfg = load_config(None, [])
    executor = ReferenceExecutor(SPEC, 4, seed=1, train_cfg=cfg.train)
    plan = make_plan(ALLOCATION, STAGE_PATHS)
    mbs = microbatches(len(STAGE_PATHS))
    grads, losses = executor.gradients(plan, mbs)
    expected = direct_gradients(executor, plan, mbs)
    for k in range(4):
        rel = (grads[k] - expected[k]).norm() / expected[k].norm()
        assert rel < 1e-6, f"stage {k}: relative error {rel}"
    assert len(losses) == len(STAGE_PATHS)


def test_skipped_stage_gets_zero_gradient_share():
    cfg = load_config(None, [])
    executor = ReferenceExecutor(SPEC, 4, seed=1, train_cfg=cfg.train)
    plan = make_plan(ALLOCATION, [[1, 2], [2, 1]])  # nobody visits stage 3
    grads, _ = executor.gradients(plan, microbatches(2))
    assert torch.count_nonzero(grads[3]) == 0
    assert torch.count_nonzero(grads[1]) > 0


def test_step_is_deterministic_and_changes_params():
    cfg = load_config(None, [])
    plan = make_plan(ALLOCATION, STAGE_PATHS)
    runs = []
    for _ in range(2):
        executor = ReferenceExecutor(SPEC, 4, seed=1, train_cfg=cfg.train)
        before = executor.stages[2].blocks[0].qkv.weight.clone()
        result = executor.step(plan, microbatches(len(STAGE_PATHS)), lr=1e-3)
        assert not torch.equal(before, executor.stages[2].blocks[0].qkv.weight)
        runs.append((result.loss, [p.clone() for s in executor.stages.values() for p in s.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
