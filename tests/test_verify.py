"""End-to-end verification on real runs: ledgers, corrupted workers, checkpoints, resume, ops."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from skippipe.cli import main
from skippipe.config import load_config
from skippipe.model.presets import resolve_model_spec
from skippipe.planner import Planner

SMALL = ["model.dim=64", "model.n_heads=2", "model.ffn_dim=128", "model.seq_len=32", "train.samples_per_microbatch=2",
         "data.max_corpus_mb=1", "train.eval_batches=2", "tracking.wandb.mode=disabled", "tracking.progress=false",
         "runtime.timeout_s=30", "cost.emulate_links=false", "train.steps=5", "checkpoint.every=2",
         "verify.level=full"]  # full: activations too, so a corrupted activation is pinned to its stage


def train(run, *extra):
    assert main(["train", "configs/tiny.yaml", *SMALL, f"run.dir={run}", *extra]) == 0
    return Path(run)


def verify(capsys, *args):
    code = main(["verify", *map(str, args), "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out[out.index("{"):])


def steps_lines(run):
    return (Path(run) / "ledger" / "steps.jsonl").read_text()


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """An honest in-process run (its ledger equals a local run's for the same routes: the local runs
    replay its routes with ``schedule.routes_from``, since a live run re-plans on measured links)."""
    return train(tmp_path_factory.mktemp("honest") / "run", "launcher=inprocess")


@pytest.fixture(scope="module")
def allocation():
    cfg = load_config("configs/tiny.yaml", SMALL)
    return Planner(cfg, resolve_model_spec(cfg.model, vocab_size=256)).allocation


def test_identical_runs_give_identical_ledgers(honest, tmp_path):
    again = train(tmp_path / "again", "launcher=inprocess")
    assert steps_lines(again) == steps_lines(honest)
    # another launcher, same bits for the same routes (a live run re-plans on its measured links)
    local = train(tmp_path / "local", "launcher=local", f"schedule.routes_from={honest}")
    assert steps_lines(local) == steps_lines(honest)


@pytest.mark.parametrize("step, stage, tensor", [(0, 0, "act"), (2, 1, "grad"), (4, 3, "param")])
def test_corrupted_worker_is_located(honest, allocation, tmp_path, capsys, step, stage, tensor):
    node = allocation[stage][0]
    bad = train(tmp_path / "bad", "launcher=local", f"fault.corrupt.step={step}", f"fault.corrupt.node={node}",
                f"fault.corrupt.tensor={tensor}", f"schedule.routes_from={honest}")
    code, report = verify(capsys, bad, "--against", honest)
    assert code == 1 and report["ok"] is False
    assert report["first_divergent_step"] == step
    assert report["stage"] == stage, report
    # a wrong gradient changes every stage's update through the global-norm clip: its gnorm leaf names it
    assert report["leaf"].startswith({"act": "act/", "grad": "gnorm/", "param": "param/"}[tensor])
    # the single-run check (replay by the in-process referee) finds the same step
    code, alone = verify(capsys, bad)
    assert code == 1 and alone["first_divergent_step"] == step and alone["stage"] == stage


def test_honest_run_verifies_by_replay(honest, capsys):
    code, report = verify(capsys, honest)
    assert code == 0 and report["ok"] is True and report["replayed_steps"] == 5


def test_edited_checkpoint_tensor_is_named_before_replay_and_refused_by_resume(honest, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(honest, run)
    path = run / "ckpt" / "3" / "stage2.pt"
    tensors = torch.load(path, weights_only=True)
    name = next(k for k in tensors if k.startswith("param/"))
    tensors[name].view(-1)[0] += 1.0
    torch.save(tensors, path)
    code, report = verify(capsys, run)
    assert code == 1 and name in report["message"] and report.get("replayed_steps", 0) == 0
    assert main(["train", "configs/tiny.yaml", *SMALL, f"run.dir={run}", "launcher=inprocess", "run.resume=true"]) == 2
    err = capsys.readouterr().err
    assert "stage2.pt" in err and name in err


def test_edited_ledger_line_is_a_chain_break(honest, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(honest, run)
    lines = steps_lines(run).splitlines()
    record = json.loads(lines[2])
    record["root"] = "0" * 64
    lines[2] = json.dumps(record)
    (run / "ledger" / "steps.jsonl").write_text("\n".join(lines) + "\n")
    code, report = verify(capsys, run)
    assert code == 1 and report["first_divergent_step"] == 2


def test_resume_reproduces_the_uninterrupted_ledger(honest, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(honest, run)
    shutil.rmtree(run / "ckpt" / "3")  # as if the run had died after step 2: resume from ckpt/1
    train(run, "launcher=local", "run.resume=true", f"schedule.routes_from={honest}")
    assert steps_lines(run) == steps_lines(honest)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss/val" not in m] == [0, 1, 2, 3, 4]


def test_different_thread_counts_are_not_comparable(honest, tmp_path, capsys):
    other = train(tmp_path / "threads", "launcher=inprocess", "run.threads=2", "train.steps=2")
    code, report = verify(capsys, other, "--against", honest)
    assert code == 1 and "not comparable" in report["message"] and "threads" in report["message"]


def test_operator_pinning_names_the_faulty_op(honest, allocation, tmp_path, capsys):
    node = allocation[1][0]
    bad = train(tmp_path / "bad", "launcher=local", "fault.corrupt.step=1", f"fault.corrupt.node={node}",
                "fault.corrupt.tensor=op", "fault.corrupt.op=blocks.1.gate_up", f"schedule.routes_from={honest}")
    code, report = verify(capsys, bad, "--against", honest, "--ops")
    assert code == 1 and report["first_divergent_step"] == 1
    assert report["ops"]["operator"] == "blocks.1.gate_up", report["ops"]


def test_ops_on_state_level_runs_says_it_needs_full(allocation, tmp_path, capsys):
    """At the default verify.level=states the first differing leaf is a state leaf that names no
    microbatch: --ops finds no operator and says that it needs verify.level=full."""
    node = allocation[1][0]
    honest = train(tmp_path / "honest", "launcher=inprocess", "train.steps=2", "verify.level=states")
    bad = train(tmp_path / "bad", "launcher=local", "train.steps=2", "verify.level=states", "fault.corrupt.step=1",
                f"fault.corrupt.node={node}", "fault.corrupt.tensor=grad", f"schedule.routes_from={honest}")
    code, report = verify(capsys, bad, "--against", honest, "--ops")
    assert code == 1 and report["first_divergent_step"] == 1
    assert report["ops"]["operator"] is None
    assert "verify.level=full" in report["ops"]["reason"] and "verify.level=states" in report["ops"]["reason"]


def test_resume_with_more_steps_extends_the_run_on_its_lr_schedule(tmp_path, capsys):
    """run.resume=true train.steps=9 on a finished 6-step run: it continues (the schedule keeps its
    6-step horizon, recorded in the ledger header), its step roots equal a fresh run with
    train.lr_steps=6, it verifies, and the summary counts every step's tokens and shows the chain."""
    common = ["launcher=inprocess", "checkpoint.every=3", "verify.level=states"]
    run = train(tmp_path / "ext", *common, "train.steps=6")
    head = json.loads(steps_lines(run).splitlines()[-1])["chain"]
    train(run, *common, "train.steps=6", "run.resume=true")  # a finished run: nothing to do
    assert metrics_of(run)[-1]["verify/chain"] == head[:12]  # the summary's chain head, not "n/a (no ledger)"
    train(run, *common, "train.steps=9", "run.resume=true")
    ref = train(tmp_path / "ref", *common, "train.steps=9", "train.lr_steps=6")
    roots = [[json.loads(x)["root"] for x in steps_lines(r).splitlines()] for r in (run, ref)]
    assert len(roots[0]) == 9 and roots[0] == roots[1]
    header = json.loads((run / "ledger" / "header.json").read_text())
    assert header["info"]["extended"] == [{"from_step": 6, "train.steps": 9, "lr_horizon": 6}]
    lines = metrics_of(run)
    assert [m["step"] for m in lines if "loss/val" not in m] == list(range(9))
    assert lines[-1]["tokens"] == metrics_of(ref)[-1]["tokens"]  # all 9 steps, not the 3 resumed
    code, report = verify(capsys, run)
    assert code == 0 and report["ok"]


def metrics_of(run):
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_a_changed_final_model_is_caught_by_verify_eval_and_export(honest, tmp_path, capsys):
    """final/stage<k>.pt carries its tensor digests beside it: a byte changed after the run makes
    verify fail (check final) and eval refuse with one line, instead of using the damaged weights."""
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(honest, run)
    code, report = verify(capsys, run, "--no-replay")
    assert code == 0 and report["ok"] and len(list((run / "final").glob("stage*.digests.json"))) == 4
    path = run / "final" / "stage2.pt"
    tensors = torch.load(path, weights_only=True)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] += 1e-3
    torch.save(tensors, path)
    code, report = verify(capsys, run, "--no-replay")
    assert code == 1 and report["check"] == "final" and f"tensor {name} differs" in report["message"]
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "stage2.pt' does not match 'stage2.digests.json'" in err and len(err.splitlines()) == 1
