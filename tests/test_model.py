import pytest
import torch

from skippipe.model.presets import PRESETS
from skippipe.model.transformer import Transformer, build_stages, split_layers
from skippipe.train import compute

SPEC = PRESETS["tiny"]


def staged_logits(stages, tokens, stage_path):
    first = stages[0]
    hidden = first(first.embed_tokens(tokens))
    for s in stage_path:
        hidden = stages[s](hidden)
    return first.logits(hidden)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return Transformer(SPEC, seed=3), build_stages(SPEC, 4, seed=3)


def test_split_layers_even_and_contiguous():
    assert split_layers(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert split_layers(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]


def test_full_path_bitwise_equals_unsplit(models):
    whole, stages = models
    tokens = torch.randint(0, SPEC.vocab_size, (2, 32))
    assert torch.equal(staged_logits(stages, tokens, [1, 2, 3]), whole(tokens))


@pytest.mark.parametrize("stage_path", [[2], [1, 3], [2, 1, 3], [1, 3, 2], [3]])
def test_skipped_or_swapped_path_equals_those_blocks(models, stage_path):
    whole, stages = models
    tokens = torch.randint(0, SPEC.vocab_size, (2, 32))
    layers = split_layers(SPEC.n_layers, 4)
    order = layers[0] + [layer for s in stage_path for layer in layers[s]]
    assert torch.equal(staged_logits(stages, tokens, stage_path), whole(tokens, layer_order=order))
    # and it differs from the full path, so the comparison can fail
    assert not torch.equal(staged_logits(stages, tokens, stage_path), whole(tokens))


def test_stage_built_alone_has_same_params(models):
    _, stages = models
    alone = build_stages(SPEC, 4, seed=3, only=[2])[2]
    for a, b in zip(alone.parameters(), stages[2].parameters()):
        assert torch.equal(a, b)
    other_seed = build_stages(SPEC, 4, seed=4, only=[2])[2]
    assert not torch.equal(other_seed.blocks[0].qkv.weight, alone.blocks[0].qkv.weight)


def test_tiny_preset_size():
    assert 1_000_000 <= SPEC.params() <= 5_000_000
    stages = build_stages(SPEC, 4, seed=0)
    assert sum(p.numel() for s in stages.values() for p in s.parameters()) == SPEC.params()


def test_chained_phases_match_single_graph(models):
    """forward/loss/backward phases with detached hand-offs give the single-graph gradients."""
    _, stages = models
    tokens = torch.randint(0, SPEC.vocab_size, (2, 32))
    targets = torch.randint(0, SPEC.vocab_size, (2, 32))
    path = [2, 1]
    h, saved0 = compute.forward(stages[0], tokens)
    h, saved2 = compute.forward(stages[2], h)
    h, saved1 = compute.forward(stages[1], h)
    loss, g, head_grads = compute.loss_and_head_grads(stages[0], h, targets)
    g, grads1 = compute.backward(stages[1], saved1, g)
    g, grads2 = compute.backward(stages[2], saved2, g)
    none, grads0 = compute.backward(stages[0], saved0, g)
    assert none is None

    for s in stages.values():
        s.zero_grad(set_to_none=True)
    first = stages[0]
    hidden = first(first.embed_tokens(tokens))
    for s in path:
        hidden = stages[s](hidden)
    ref_loss = first.loss(hidden, targets)
    ref_loss.backward()
    assert torch.equal(loss, ref_loss.detach())
    for p, grad in zip(compute.body_params(stages[1]), grads1):
        assert torch.equal(p.grad, grad)
    for p, grad in zip(compute.body_params(stages[0]) + compute.head_params(stages[0]), grads0 + head_grads):
        assert torch.equal(p.grad, grad)
