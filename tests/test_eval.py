"""``skippipe eval``: the full model reproduces the run's validation loss exactly; dropped stages
change it; bad input is one line and exit 2."""

import json
import math
from pathlib import Path

import pytest

from skippipe.cli import main

SMALL = ["model.dim=64", "model.n_heads=2", "model.ffn_dim=128", "model.seq_len=32", "train.samples_per_microbatch=2",
         "data.max_corpus_mb=1", "train.eval_batches=3",
         "launcher=inprocess", "tracking.wandb.mode=disabled",
         "tracking.progress=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    cache = tmp_path_factory.getbasetemp() / "skippipe-cache"
    assert main(["train", "configs/tiny.yaml", *SMALL, "train.steps=3", f"run.dir={run}",
                 f"data.cache_dir={cache}"]) == 0
    return run


def eval_json(capsys, *args):
    capsys.readouterr()
    assert main(["eval", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def final_val_loss(run: Path) -> float:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return next(m["loss/val"] for m in reversed(lines) if "loss/val" in m)


def test_full_model_equals_training_validation_loss(run, capsys):
    report = eval_json(capsys, run)
    assert report["full"]["loss"] == final_val_loss(run)  # exactly: the same stages, batches and sums
    assert report["full"]["ppl"] == pytest.approx(math.exp(report["full"]["loss"]))
    assert [r["keep_fraction"] for r in report["results"]] == [1.0, 0.75, 0.5]  # the defaults
    assert report["results"][0]["loss"] == report["full"]["loss"]
    assert [r["stages_kept"] for r in report["results"]] == [3, 2, 1]  # of stages 1..3
    # 3 stages choose 2 (or 1): every subset fits in the default 8 samples, so the average is exact
    assert len(report["results"][1]["subsets"]) == 3 and len(report["results"][2]["subsets"]) == 3
    for row in report["results"]:
        assert set(row) >= {"keep_fraction", "loss", "ppl"}
        assert row["ppl"] == pytest.approx(math.exp(row["loss"]))
        assert row["loss"] == pytest.approx(sum(s["loss"] for s in row["subsets"]) / len(row["subsets"]))


def test_dropping_stages_changes_the_loss(run, capsys):
    full = final_val_loss(run)
    one = eval_json(capsys, run, "--drop-stages", "2")["results"]
    two = eval_json(capsys, run, "--drop-stages", "1,3")["results"]
    assert one[0]["subsets"][0]["stages"] == [0, 1, 3] and one[0]["dropped"] == [2]
    assert two[0]["subsets"][0]["stages"] == [0, 2] and two[0]["keep_fraction"] == pytest.approx(1 / 3)
    assert one[0]["loss"] != full and two[0]["loss"] != full and one[0]["loss"] != two[0]["loss"]


def test_keep_fraction_random_subsets_are_seeded(run, capsys):
    a = eval_json(capsys, run, "--keep-fraction", "0.5", "--samples", "2")
    b = eval_json(capsys, run, "--keep-fraction", "0.5", "--samples", "2")
    assert a["results"] == b["results"]
    assert len(a["results"]) == 1 and len(a["results"][0]["subsets"]) == 2
    assert a["results"][0]["loss"] != a["full"]["loss"]


def test_table_output(run, capsys):
    capsys.readouterr()
    assert main(["eval", str(run), "--keep-fraction", "1.0", "--keep-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "keep fraction" in out and "ppl" in out and f"{final_val_loss(run):.4f}" in out
    assert len(out.strip().splitlines()) == 4  # heading, header, two rows


def test_subsets_without_replacement_are_distinct():
    from skippipe.commands.eval import kept_subsets, stages_kept

    subsets = kept_subsets(3, 9, samples=5, seed=0)
    assert len(subsets) == len(set(subsets)) == 5 and all(0 not in s and len(s) == 3 for s in subsets)
    assert kept_subsets(3, 9, 5, 0) == subsets and kept_subsets(3, 9, 5, 1) != subsets
    assert [stages_kept(f, 9) for f in (1.0, 0.75, 0.5, 0.0)] == [8, 6, 4, 0]


@pytest.mark.parametrize("args, words", [
    (["--drop-stages", "0"], "stage 0"),
    (["--drop-stages", "4"], "stage 4 does not exist"),
    (["--drop-stages", "2,9"], "stage 9 does not exist"),
    (["--drop-stages", "two"], "comma-separated stage numbers in 1..3"),
    (["--keep-fraction", "1.5"], "[0, 1]"),
    (["--samples", "0", "--keep-fraction", "0.5"], "--samples"),
    (["--drop-stages", "2", "--keep-fraction", "0.5"], "not allowed with"),
])
def test_bad_arguments_are_one_line_and_exit_2(run, capsys, args, words):
    capsys.readouterr()
    assert main(["eval", str(run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and len(err.splitlines()) == 1


def test_missing_or_unfinished_run_is_one_line(run, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run / "config.yaml").read_text())
    assert main(["eval", str(unfinished)]) == 2
    err = capsys.readouterr().err.strip()
    assert "has not finished" in err and len(err.splitlines()) == 1
    (unfinished / "final").mkdir()
    assert main(["eval", str(unfinished)]) == 2
    assert "was the run finished?" in capsys.readouterr().err
