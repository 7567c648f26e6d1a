import numpy as np
import pytest
import torch

from skippipe.config import load_config
from skippipe.data import load_data
from skippipe.errors import UserError
from skippipe.schedule import build_cost


@pytest.fixture(scope="module")
def data():
    return load_data(load_config(None, ["data.max_corpus_mb=1"]).data)


def test_default_corpus_is_real_text(data):
    text = data.tokenizer.decode(np.asarray(data.train[:5000]))
    assert "def " in text and "the " in text
    assert len(data.val) > 10_000 and data.vocab_size == 256


def test_microbatch_keyed_by_seed_step_id(data):
    a = data.microbatch(seed=1, step=5, microbatch_id=3, samples=4, seq_len=64)
    b = data.microbatch(seed=1, step=5, microbatch_id=3, samples=4, seq_len=64)
    c = data.microbatch(seed=1, step=5, microbatch_id=4, samples=4, seq_len=64)
    assert a.sample_ids == b.sample_ids and torch.equal(a.inputs, b.inputs)
    assert a.sample_ids != c.sample_ids
    assert a.inputs.shape == (4, 64) and a.inputs.dtype == torch.int64
    assert torch.equal(a.inputs[:, 1:], a.targets[:, :-1])
    # ids recorded: the tokens are exactly those windows of the training array
    start = a.sample_ids[0] * 64
    assert np.array_equal(a.inputs[0].numpy(), np.asarray(data.train[start:start + 64], dtype=np.int64))


def test_val_batches_fixed(data):
    first = data.val_batches(2, 4, 64)
    again = data.val_batches(2, 4, 64)
    assert len(first) == 2 and all(torch.equal(x[0], y[0]) for x, y in zip(first, again))


def test_local_text_files_and_bpe(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    cfg = load_config(None, ["data.source=files", f"data.path={tmp_path}/*.txt", "data.tokenizer=bpe",
                             "data.bpe_vocab_size=300"])
    data = load_data(cfg.data)
    assert 256 < data.vocab_size <= 300
    assert "quick brown" in data.tokenizer.decode(np.asarray(data.train[:50]))
    _, spec, _ = build_cost(cfg)  # the planner's cost model is the workers' model: same vocabulary (head)
    assert spec.vocab_size == data.vocab_size


def test_token_file(tmp_path):
    tokens = np.arange(10_000, dtype=np.uint16) % 500
    tokens.tofile(tmp_path / "toks.bin")
    cfg = load_config(None, ["data.source=tokens", f"data.path={tmp_path}/toks.bin"])
    data = load_data(cfg.data)
    assert data.vocab_size == 500 and len(data.train) + len(data.val) == 10_000
    assert build_cost(cfg)[1].vocab_size == 500
    mb = data.microbatch(0, 0, 0, 2, 16)
    assert mb.inputs.max() < 500


def test_missing_data_path_is_clear(tmp_path):
    with pytest.raises(UserError, match=r"data.path \(data.source=files\): .*\*\.txt' does not exist"):
        load_config(None, ["data.source=files", f"data.path={tmp_path}/*.txt"])  # a glob that matches nothing
    with pytest.raises(UserError, match="does not exist"):
        load_config(None, ["data.source=tokens", f"data.path={tmp_path}/none.bin"])
