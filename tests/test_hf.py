"""Hugging Face interop: a random LlamaForCausalLM saved with transformers loads into skippipe's
stages with the same logits, trains, exports and reloads in transformers with the same logits again.
Nothing is downloaded: the model and tokenizer are built here."""

import json
import subprocess
import sys

import pytest
import torch

from skippipe.cli import main
from skippipe.config import load_config, num_stages
from skippipe.errors import ConfigError
from skippipe.model.presets import resolve_model_spec
from skippipe.model.transformer import build_stages

SEQ = 32
RUN = ["model.seq_len=32", "data.max_corpus_mb=1", "train.samples_per_microbatch=2", "train.eval_batches=2",
       "tracking.wandb.mode=disabled", "tracking.progress=false", "launcher=inprocess"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=5000.0, initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def logits_of(stages, tokens):
    first = stages[0]
    hidden = first(first.embed_tokens(tokens))
    for k in sorted(stages)[1:]:
        hidden = stages[k](hidden)
    return first.logits(hidden)


def hf_logits(directory, tokens):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def relative_error(ours, theirs):
    return float((ours - theirs).abs().max() / theirs.abs().max())


def tokens_for(vocab=256, seed=1):
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def test_loaded_stages_give_transformers_logits(hf_dir):
    spec = resolve_model_spec(load_config(None, [f"model.hf_path={hf_dir}", "model.seq_len=32"]).model, 256)
    assert (spec.dim, spec.n_layers, spec.n_heads, spec.kv_heads, spec.ffn_dim) == (64, 4, 4, 2, 96)
    assert (spec.norm_eps, spec.rope_theta) == (1e-5, 5000.0)
    tokens = tokens_for()
    theirs = hf_logits(hf_dir, tokens)
    for count in (1, 3):
        stages = build_stages(spec, count, seed=0)
        with torch.no_grad():
            ours = logits_of(stages, tokens)
        assert relative_error(ours, theirs) <= 1e-5, count
    # a worker builds only its own stage and reads only its layers: stage 2 of 3 alone equals the whole
    alone = build_stages(spec, 3, seed=0, only=[2])[2]
    together = build_stages(spec, 3, seed=0)[2]
    assert all(torch.equal(a, b) for a, b in zip(alone.parameters(), together.parameters()))


def test_train_export_and_reload_in_transformers(hf_dir, tmp_path):
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["train", "configs/tiny.yaml", *RUN, f"model.hf_path={hf_dir}", "train.steps=3",
                 f"run.dir={run}"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "loss/train" in r]) == 3
    assert main(["verify", str(run)]) == 0  # the replay loads the checkpoint's weights too
    assert main(["export", str(run), "--hf", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["model_type"] == "llama"

    from skippipe.train.evaluate import load_stages

    saved = load_config(str(run / "config.yaml"), [])
    spec, count = resolve_model_spec(saved.model, 256), num_stages(saved)
    assert count == 4  # configs/tiny.yaml's partition: one layer of the checkpoint per stage
    trained = load_stages(run / "final", spec, count)
    initial = build_stages(spec, count, seed=0)
    assert not torch.equal(trained[1].blocks[0].qkv.weight, initial[1].blocks[0].qkv.weight)  # it trained
    tokens = tokens_for(seed=2)
    with torch.no_grad():
        ours = logits_of(trained, tokens)
    assert relative_error(ours, hf_logits(out, tokens)) <= 1e-5
    # OUT now holds files: a second export refuses and leaves them as they are
    before = (out / "model.safetensors").read_bytes()
    assert main(["export", str(run), "--hf", str(out)]) == 2
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["export", str(run), "--hf", str(out), "--force"]) == 0
    # --force never replaces the run itself, a folder inside it or one holding it, nor a file
    files = sorted(p.relative_to(run) for p in run.rglob("*"))
    for target in (run, run / "final", tmp_path, run / "config.yaml"):
        assert main(["export", str(run), "--hf", str(target), "--force"]) == 2
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == files


def test_hf_tokenizer_is_used_and_shipped(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50,
                            trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    from skippipe.data import load_data

    cfg = load_config(None, ["data.tokenizer=hf", f"data.hf_tokenizer={folder}", "data.max_corpus_mb=1"])
    data = load_data(cfg.data)
    assert data.vocab_size == tok.get_vocab_size()
    assert list(data.tokenizer.encode("return x")) == tok.encode("return x").ids
    with pytest.raises(ConfigError, match="data.hf_tokenizer"):
        load_config(None, ["data.tokenizer=hf"])


@pytest.mark.parametrize("override, key", [("model.hf_path=/nonexistent/llama", "model.hf_path"),
                                           ("model.n_kv_heads=3", "model.n_kv_heads")])
def test_bad_hf_settings_are_one_line(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_hf_shape_conflicts_are_named(hf_dir):
    with pytest.raises(ConfigError, match="model.dim"):
        load_config(None, [f"model.hf_path={hf_dir}", "model.dim=128"])


def test_transformers_is_not_imported_without_hf_path():
    code = ("import sys; from skippipe.cli import build_parser; build_parser(); "
            "from skippipe.config import load_config; from skippipe.model.presets import resolve_model_spec; "
            "from skippipe.model.transformer import build_stages; "
            "build_stages(resolve_model_spec(load_config(None, []).model, 256), 2, 0); "
            "bad = [m for m in ('transformers', 'safetensors') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
