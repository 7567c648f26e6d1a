"""Tier 4: a refused command changes nothing in the run directory (validate first, write after).

Every row runs the real CLI against a finished run and checks exit 2, one line on stderr, and that
every file of the run is byte-identical afterwards."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from skippipe.cli import main

# a small, fast model on the tiny topology (as in test_runtime.py)
SMALL = ["model.dim=64", "model.n_heads=2", "model.ffn_dim=128", "model.seq_len=32", "train.samples_per_microbatch=2",
         "data.max_corpus_mb=1", "train.eval_batches=2", "tracking.wandb.mode=disabled", "tracking.progress=false",
         "runtime.timeout_s=30", "cost.emulate_links=false"]

COMMON = ["configs/tiny.yaml", *SMALL, "launcher=inprocess", "train.steps=4", "checkpoint.every=2"]


def tree_hash(*roots):
    digests = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *COMMON, f"run.dir={run}"]) == 0
    return run


def refused(capsys, args):
    code = main(args)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


def test_train_into_a_finished_run_is_refused(finished, capsys):
    before = tree_hash(finished)
    line = refused(capsys, ["train", *COMMON, f"run.dir={finished}"])
    assert f"run dir {finished} holds a run; pass run.resume=true, or run.overwrite=true to start over" in line
    assert tree_hash(finished) == before


@pytest.mark.parametrize("overrides, words", [
    (["run.resume=true", "train.weight_decay=0.2"], "train.weight_decay"),  # resume with a changed config
    (["run.resume=true", "train.steps=2"], "train.steps"),  # fewer steps than its checkpoint (more extend it)
    (["run.resume=true", "train.lr=-1"], "train.lr"),  # an invalid override
    (["run.resume=true", "train.lr=nan"], "train.lr"),
    (["run.resume=true", "fault.kill.step=1", "fault.kill.node=zz"], "no such node"),
    (["run.resume=true", "fault.heartbeat_s=-1"], "fault.heartbeat_s"),
    (["run.resume=true", "run.overwrite=true"], "contradict"),
])
def test_refused_command_leaves_the_run_byte_identical(finished, capsys, overrides, words):
    before = tree_hash(finished)
    line = refused(capsys, ["train", *COMMON, f"run.dir={finished}", *overrides])
    assert words in line, line
    assert tree_hash(finished) == before  # config.yaml and the final validation line included


def test_overwrite_starts_over_and_an_empty_dir_is_fine(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "notes.txt").write_text("mine")
    assert main(["train", *COMMON, f"run.dir={run}", "train.steps=2", "run.overwrite=true"]) == 0
    assert len((run / "ledger" / "steps.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["1"]  # the old run's ckpt/3 is gone
    assert (run / "notes.txt").read_text() == "mine"  # not a run output: left alone
    assert main(["verify", str(run)]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", *COMMON, f"run.dir={empty}", "train.steps=1"]) == 0


def _plan_of(run):
    return json.loads((Path(run) / "routes.jsonl").read_text().splitlines()[0])["plan"]


@pytest.mark.parametrize("edit, words", [
    (lambda p: p.update(stages_visited=1), "stages_visited=1"),
    (lambda p: p.update(stages_visited=2), "stages_visited=2 < 3"),  # fewer than the config's L=3
    (lambda p: p["microbatches"][1].update(start_s=float("nan")), "start_s=nan"),
    (lambda p: p.update(microbatches=[], node_order={}), "empty"),
])
def test_simulate_rejects_bad_plans(finished, tmp_path, capsys, edit, words):
    plan = _plan_of(finished)
    edit(plan)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    before = tree_hash(tmp_path, finished)
    line = refused(capsys, ["simulate", str(path), *COMMON])
    assert words in line, line
    assert tree_hash(tmp_path, finished) == before


def test_pruning_keeps_the_last_copy_of_a_stage_that_newer_checkpoints_lack():
    """checkpoint.keep=2: stage 2 lost every replica after step 1, so checkpoints 3-9 lack it; the
    newest one holding it (1) must survive pruning until a newer one holds it again (11), else
    fault.rebuild=checkpoint has nothing to restore it from. Pinned checkpoints stay too."""
    from skippipe.runtime.recorder import prunable

    full = {"stage0.pt", "stage1.pt", "stage2.pt"}
    files = {0: full, 1: full, 3: full - {"stage2.pt"}, 5: full - {"stage2.pt"}, 7: full - {"stage2.pt"},
             9: full - {"stage2.pt"}, 11: full}
    steps = sorted(files)
    assert prunable(steps[:-1], files.get, 2, set()) == [0, 3, 5]  # 1: the last stage2.pt
    assert prunable(steps, files.get, 2, set()) == [0, 1, 3, 5, 7]  # 11 holds stage 2 again
    assert prunable(steps, files.get, 2, {3}) == [0, 1, 5, 7]  # a stage restarted from 3
    assert prunable(steps, files.get, 0, set()) == [] and prunable(steps[:2], files.get, 2, set()) == []
