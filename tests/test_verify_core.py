"""Tier 1: digests, ledger, checkpoints, bisection and the ``verify`` command on hand-made ledgers."""

import json
import math
import random
import sys
import types

import pytest
import torch

from skippipe.cli import main
from skippipe.config import Config
from skippipe.errors import UserError
from skippipe.verify.checkpoint import check_checkpoint, list_checkpoints, verify_checkpoint, write_checkpoint
from skippipe.verify.compare import (
    describe_leaf,
    diff_leaves,
    first_divergent_step,
    leaf_order_key,
    linear_first_divergent_step,
)
from skippipe.verify.digest import (
    EMPTY_ROOT,
    bytes_digest,
    chain_next,
    chain_start,
    hash_fields,
    json_digest,
    merkle_root,
    tensor_digest,
)
from skippipe.verify.ledger import (
    LedgerWriter,
    check_chain,
    checkpoint_leaves,
    comparable,
    leaf_stage,
    make_header,
    read_ledger,
    step_record,
)

STAGES, MICROBATCHES = 3, 4

# ---------------------------------------------------------------------------------------------
# hand-made runs


def stage_tensors(stage, step, bump=0.0):
    """A stage's flat checkpoint dict at the end of ``step`` (what a worker would save)."""
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3) * (stage + 1) + step + bump
    return {"param/blocks.0.qkv.weight": w, "param/norm.weight": torch.ones(3) * step,
            "opt/blocks.0.qkv.weight/exp_avg": w / 10, "opt/blocks.0.qkv.weight/exp_avg_sq": w * w,
            "opt/blocks.0.qkv.weight/step": torch.tensor(float(step + 1)),
            "meta/step": torch.tensor(step)}


def step_leaves(step, tamper=None):
    """All leaves of one step; ``tamper`` = (step t, leaf) changes that leaf at t and, as a real fault
    would, everything computed after it at t and the losses and states of every later step."""
    t, target = tamper if tamper else (None, None)
    bad = t is not None and step > t
    leaves = {}
    for mb in range(MICROBATCHES):
        leaves[f"data/mb{mb}"] = hash_fields("data", str(step), str(mb))
        for hop in range(STAGES - 1):
            leaves[f"act/mb{mb}/hop{hop}/stage{hop}"] = hash_fields("act", str(step), str(mb), str(hop))
            leaves[f"grad/mb{mb}/hop{hop}/stage{hop + 1}"] = hash_fields("grad", str(step), str(mb), str(hop))
        leaves[f"loss/mb{mb}"] = hash_fields("loss", str(step), str(mb), "bad" if bad else "")
    leaves["route"] = json_digest("route", {"step": step})
    for k in range(STAGES):
        leaves.update(checkpoint_leaves(k, f"n{k}", stage_tensors(k, step, bump=0.5 if bad else 0.0)))
    if step == t:
        for name in leaves:
            if leaf_order_key(name) >= leaf_order_key(target):
                leaves[name] = hash_fields("tampered", name)
    return leaves


def cfg(**run):
    c = Config()
    for key, value in run.items():
        setattr(c.run, key, value)
    return c


def make_run(path, steps=12, header=None, tamper=None, checkpoints=(), tamper_ckpt=False):
    header = header or make_header(cfg(dir=str(path)))
    with LedgerWriter(path, header) as writer:
        for s in range(steps):
            line = writer.record(s, step_leaves(s, tamper))
            if s in checkpoints:
                bad = tamper is not None and s > tamper[0]
                write_checkpoint(path, s, line["chain"],
                                 {k: (f"n{k}", stage_tensors(k, s, 0.5 if bad else 0.0)) for k in range(STAGES)})
    return path


def run_cli(capsys, *argv):
    code = main(["verify", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _no_replay(monkeypatch):
    """Tests replace replay explicitly; never pick up the executor's one here."""
    monkeypatch.setattr("skippipe.commands.verify.load_replay", lambda: None)


# ---------------------------------------------------------------------------------------------
# digests


def test_tensor_digest_frames_tag_dtype_and_shape():
    t = torch.arange(12, dtype=torch.float32)
    d = tensor_digest("param/w", t)
    assert d == tensor_digest("param/w", t.clone())
    assert d != tensor_digest("param/v", t)
    assert d != tensor_digest("param/w", t.reshape(3, 4))  # same bytes, other shape
    assert d != tensor_digest("param/w", t.view(torch.int32))  # same bytes, other dtype
    assert d != tensor_digest("param/w", torch.arange(12, dtype=torch.float64))
    assert tensor_digest("x", torch.tensor(0.0)) != tensor_digest("x", torch.tensor(-0.0))  # bitwise
    assert tensor_digest("x", torch.zeros(0)) != tensor_digest("x", torch.zeros(0, 3))
    assert hash_fields("ab", "c") != hash_fields("a", "bc")  # length prefixes: no ambiguity
    assert bytes_digest("t", b"ab") != bytes_digest("tb", b"a")
    assert json_digest("r", {"b": 1, "a": [1, 2]}) == json_digest("r", {"a": [1, 2], "b": 1})


def test_tensor_digest_ignores_layout():
    m = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    view = m.t()[1:4, ::2]
    assert not view.is_contiguous()
    assert tensor_digest("a", view) == tensor_digest("a", view.contiguous())
    half = m.to(torch.bfloat16).t()
    assert tensor_digest("a", half) == tensor_digest("a", half.contiguous())
    assert tensor_digest("a", half) != tensor_digest("a", half.float())


def test_merkle_and_chain_are_deterministic():
    leaves = {f"l{i}": hash_fields(str(i)) for i in range(7)}
    root = merkle_root(leaves)
    assert root == merkle_root(dict(reversed(list(leaves.items()))))  # insertion order does not matter
    for name in leaves:
        assert merkle_root({**leaves, name: hash_fields("x")}) != root
    assert merkle_root({**leaves, "l7": hash_fields("7")}) != root
    assert merkle_root({}) == EMPTY_ROOT == hash_fields("empty")
    assert merkle_root({"a": "00"}) != merkle_root({"b": "00"})
    header = {"scheme": "s", "b": [1, 2], "a": {"y": 1, "x": 2}}
    c0 = chain_start(header)
    assert c0 == chain_start(json.loads(json.dumps(header, sort_keys=True)))
    assert chain_next(c0, 0, root) == chain_next(c0, 0, root)
    assert chain_next(c0, 0, root) != chain_next(c0, 1, root)


def test_step_record_groups_leaves_by_stage():
    leaves = step_leaves(3)
    assert leaf_stage("act/mb1/hop0/stage2") == 2 and leaf_stage("param/stage0/n0/w") == 0
    assert leaf_stage("data/mb3") is None and leaf_stage("route") is None
    rec = step_record(3, leaves)
    assert sorted(rec["stage_roots"]) == ["0", "1", "2"]
    changed = step_record(3, {**leaves, "param/stage1/n1/norm.weight": hash_fields("x")})
    assert changed["stage_roots"]["1"] != rec["stage_roots"]["1"]
    assert changed["stage_roots"]["0"] == rec["stage_roots"]["0"] and changed["global_root"] == rec["global_root"]
    assert changed["root"] != rec["root"]


# ---------------------------------------------------------------------------------------------
# ledger


def test_ledger_round_trip_and_identical_runs(tmp_path):
    a = make_run(tmp_path / "a", header=make_header(cfg()))
    b = make_run(tmp_path / "b", header=make_header(cfg()))
    assert (a / "ledger/steps.jsonl").read_bytes() == (b / "ledger/steps.jsonl").read_bytes()
    ledger = read_ledger(a)
    assert ledger.num_steps == 12 and check_chain(ledger) is None
    assert ledger.leaves(5) == step_leaves(5)
    assert ledger.header["scheme"] == "skippipe.ledger.v1" and ledger.header["threads"]["configured"] == 1


def test_edited_ledger_line_is_a_chain_break(tmp_path, capsys):
    run = make_run(tmp_path / "r")
    path = run / "ledger/steps.jsonl"
    lines = path.read_text().splitlines()
    line = json.loads(lines[7])
    line["chain"] = hash_fields("forged")
    lines[7] = json.dumps(line)
    path.write_text("\n".join(lines) + "\n")
    step, why = check_chain(read_ledger(run))
    assert step == 7
    assert why == "chain break: steps.jsonl line 8 (step 7) chain does not follow step 6"
    code, out, err = run_cli(capsys, str(run), "--json")
    assert code == 1 and "chain break" in err
    assert json.loads(out)["first_divergent_step"] == 7 and json.loads(out)["ok"] is False


def test_edited_root_or_leaf_is_caught_at_its_step(tmp_path):
    run = make_run(tmp_path / "r")
    path = run / "ledger/steps.jsonl"
    lines = path.read_text().splitlines()
    line = json.loads(lines[4])
    line["stage_roots"]["2"] = hash_fields("forged")  # root and chain untouched
    lines[4] = json.dumps(line)
    path.write_text("\n".join(lines) + "\n")
    step, why = check_chain(read_ledger(run))
    assert step == 4 and "stage 2 root" in why
    run2 = make_run(tmp_path / "r2")
    leaves_path = run2 / "ledger/leaves/9.json"
    data = json.loads(leaves_path.read_text())
    data["leaves"]["act/mb2/hop1/stage1"] = hash_fields("forged")
    leaves_path.write_text(json.dumps(data))
    assert check_chain(read_ledger(run2))[0] == 9


def test_truncated_or_foreign_ledger_is_a_user_error(tmp_path, capsys):
    run = make_run(tmp_path / "r", steps=3)
    path = run / "ledger/steps.jsonl"
    path.write_text(path.read_text()[:-40])
    with pytest.raises(UserError, match="steps.jsonl' line 3 is not valid JSON"):
        read_ledger(run)
    (run / "ledger/header.json").write_text('{"scheme": "other"}')
    code, _, err = run_cli(capsys, str(run))
    assert code == 2 and "header.json" in err and "not a skippipe ledger header" in err
    assert run_cli(capsys, str(tmp_path / "missing"))[0] == 2


def test_resume_continues_the_same_chain(tmp_path):
    full = make_run(tmp_path / "full", header=make_header(cfg()))
    part = tmp_path / "part"
    with LedgerWriter(part, make_header(cfg())) as writer:
        for s in range(8):
            writer.record(s, step_leaves(s))
    # the resumed process has run.resume=true and another run.dir: still the same ledger
    with LedgerWriter(part, make_header(cfg(resume=True, dir="elsewhere")), resume_from_step=5) as writer:
        assert writer.next_step == 6
        for s in range(6, 12):
            writer.record(s, step_leaves(s))
    assert (part / "ledger/steps.jsonl").read_bytes() == (full / "ledger/steps.jsonl").read_bytes()
    with pytest.raises(UserError, match="threads.configured"):
        LedgerWriter(part, make_header(cfg(threads=2)), resume_from_step=5)
    with pytest.raises(ValueError, match="expected step 12"):
        LedgerWriter(part, make_header(cfg()), resume_from_step=11).record(13, {})


def test_comparable_reports_threads_and_ignores_launch_details():
    base = make_header(cfg())
    other = Config()
    other.run.dir, other.run.name, other.launcher = "/elsewhere", "x", "ray"
    other.tracking.wandb.mode, other.checkpoint.every, other.fault.corrupt.step = "disabled", 5, 7
    assert comparable(base, make_header(other)) == []
    assert comparable(base, make_header(cfg(threads=2))) == ["threads.configured"]
    assert comparable(base, make_header(cfg(), {"threads": {"configured": 1, "torch": 4}})) == ["threads.torch"]
    assert comparable(base, make_header(cfg(seed=3))) == ["seed"]
    bigger = Config()
    bigger.model.dim = 64
    assert comparable(base, make_header(bigger)) == ["config.model.dim"]
    assert comparable(base, make_header(cfg(), {"info": {"host": "b"}})) == []


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_verifies_against_manifest_and_ledger(tmp_path):
    run = make_run(tmp_path / "r", checkpoints=(3, 7))
    ledger = read_ledger(run)
    assert list_checkpoints(run) == [3, 7]
    (run / "ckpt/.tmp-11").mkdir()  # a crash mid-write leaves a temp dir that nothing picks up
    assert list_checkpoints(run) == [3, 7]
    for s in (3, 7):
        assert verify_checkpoint(run / "ckpt" / str(s)) is None
        assert verify_checkpoint(run / "ckpt" / str(s), ledger) is None


def test_edited_checkpoint_tensor_is_named_before_any_replay(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path / "r", checkpoints=(4,))
    path = run / "ckpt/4/stage1.pt"
    tensors = torch.load(path, weights_only=True)
    tensors["param/blocks.0.qkv.weight"][1, 2] += 1e-3
    torch.save(tensors, path)
    assert verify_checkpoint(run / "ckpt/4") == \
        "ckpt/4/stage1.pt: tensor param/blocks.0.qkv.weight does not match its manifest digest"

    def replay_must_not_run(*_):
        raise AssertionError("replay ran before the checkpoint check")

    monkeypatch.setattr("skippipe.commands.verify.load_replay", lambda: replay_must_not_run)
    code, out, err = run_cli(capsys, str(run), "--json")
    result = json.loads(out)
    assert code == 1 and "param/blocks.0.qkv.weight" in err
    assert result["first_divergent_step"] == 4 and result["stage"] == 1 and result["check"] == "checkpoint"
    assert result["leaf"] == "param/stage1/n1/blocks.0.qkv.weight" and result["replayed_steps"] == 0


def test_checkpoint_consistent_with_itself_but_not_the_ledger(tmp_path):
    run = make_run(tmp_path / "r", checkpoints=(4,))
    ledger = read_ledger(run)
    forged = {k: (f"n{k}", stage_tensors(k, 4, bump=1.0 if k == 2 else 0.0)) for k in range(STAGES)}
    write_checkpoint(run, 4, ledger.chain(4), forged)  # a fresh, self-consistent manifest
    assert verify_checkpoint(run / "ckpt/4") is None
    problem = check_checkpoint(run / "ckpt/4", ledger)
    assert problem.stage == 2 and problem.tensor == "opt/blocks.0.qkv.weight/exp_avg"
    assert problem.message == ("ckpt/4/stage2.pt: tensor opt/blocks.0.qkv.weight/exp_avg does not match ledger "
                               "leaf opt/stage2/n2/blocks.0.qkv.weight/exp_avg at step 4")
    write_checkpoint(run, 4, ledger.chain(3), {k: (f"n{k}", stage_tensors(k, 4)) for k in range(STAGES)})
    assert verify_checkpoint(run / "ckpt/4", ledger) == \
        "ckpt/4/manifest.json: chain does not match the ledger at step 4"


@pytest.mark.parametrize("damage", ["truncate", "text", "pickle"])
def test_damaged_checkpoint_file_is_one_line(tmp_path, damage):
    run = make_run(tmp_path / "r", steps=3, checkpoints=(1,))
    path = run / "ckpt/1/stage0.pt"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "text":
        path.write_text("not a checkpoint")
    else:
        torch.save({"param/w": types.SimpleNamespace(x=1)}, path)  # weights_only refuses the object
    problem = verify_checkpoint(run / "ckpt/1")
    assert problem.startswith("ckpt/1/stage0.pt: cannot be read as a checkpoint") and "\n" not in problem


def test_checkpoint_missing_manifest_or_tensor(tmp_path):
    run = make_run(tmp_path / "r", steps=3, checkpoints=(1, 2))
    (run / "ckpt/1/manifest.json").unlink()
    assert verify_checkpoint(run / "ckpt/1") == "ckpt/1/manifest.json: missing (an incomplete or foreign checkpoint)"
    path = run / "ckpt/2/stage2.pt"
    tensors = torch.load(path, weights_only=True)
    del tensors["opt/blocks.0.qkv.weight/step"]
    torch.save(tensors, path)
    assert "tensor opt/blocks.0.qkv.weight/step is in the manifest but not in the file" in verify_checkpoint(
        run / "ckpt/2")


# ---------------------------------------------------------------------------------------------
# comparing runs


def test_bisection_agrees_with_linear_scan():
    rng = random.Random(0)
    for n in [1, 2, 3, 5, 8, 100, 1000, 1023, 1024, 1025]:
        for first in {0, n - 1, None, rng.randrange(n), rng.randrange(n)}:
            a = [hash_fields("a", str(s)) for s in range(n)]
            b = [x if first is None or s < first else hash_fields("b", str(s)) for s, x in enumerate(a)]
            step, lookups = first_divergent_step(a.__getitem__, b.__getitem__, n)
            assert step == linear_first_divergent_step(a.__getitem__, b.__getitem__, n) == first
            assert lookups <= math.ceil(math.log2(n)) + 1
    assert first_divergent_step(lambda s: "", lambda s: "", 0) == (None, 0)


def test_diff_leaves_in_computation_order():
    names = ["param/stage1/n1/w", "opt/stage0/n0/w/exp_avg_sq", "grad/mb0/hop0/stage1", "loss/mb1", "route",
             "act/mb1/hop0/stage0", "act/mb0/hop1/stage1", "data/mb10", "data/mb2", "grad/mb0/hop1/stage2",
             "opt/stage0/n0/w/exp_avg", "param/stage0/n0/w", "act/mb0/hop0/stage0"]
    a = {name: "0" for name in names}
    b = {**{name: "1" for name in names}, "only/in/b": "1"}
    assert diff_leaves(a, b) == [
        "data/mb2", "data/mb10", "route", "act/mb0/hop0/stage0", "act/mb0/hop1/stage1", "act/mb1/hop0/stage0",
        "loss/mb1", "grad/mb0/hop1/stage2", "grad/mb0/hop0/stage1", "opt/stage0/n0/w/exp_avg",
        "opt/stage0/n0/w/exp_avg_sq", "param/stage0/n0/w", "param/stage1/n1/w", "only/in/b"]
    assert diff_leaves(a, dict(a)) == []
    assert describe_leaf("act/mb3/hop1/stage2") == {"kind": "act", "stage": 2, "microbatch": 3, "hop": 1,
                                                    "node": None, "tensor": None, "slot": None}
    opt = describe_leaf("opt/stage1/n4/blocks.0.qkv.weight/exp_avg")
    assert (opt["stage"], opt["node"], opt["tensor"], opt["slot"]) == (1, "n4", "blocks.0.qkv.weight", "exp_avg")
    assert describe_leaf("loss/mb5")["microbatch"] == 5 and describe_leaf("loss/mb5")["stage"] is None


@pytest.mark.parametrize("step,leaf", [(0, "act/mb0/hop0/stage0"), (6, "grad/mb3/hop1/stage2"),
                                       (11, "param/stage1/n1/norm.weight"), (5, "data/mb2")])
def test_verify_against_locates_step_and_leaf(tmp_path, capsys, step, leaf):
    honest = make_run(tmp_path / "honest")
    faulty = make_run(tmp_path / "faulty", tamper=(step, leaf))
    code, out, err = run_cli(capsys, str(honest), "--against", str(faulty), "--json")
    result = json.loads(out)
    assert code == 1 and result["ok"] is False
    assert result["first_divergent_step"] == step and result["leaf"] == leaf
    info = describe_leaf(leaf)
    assert (result["stage"], result["microbatch"]) == (info["stage"], info["microbatch"])
    assert result["lookups"] <= math.ceil(math.log2(12)) + 1
    code, out, _ = run_cli(capsys, str(honest), "--against", str(faulty))
    assert f"first divergent step: {step}" in out and leaf in out


def test_verify_against_identical_and_not_comparable(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", header=make_header(cfg(dir="other", name="b")))
    code, out, _ = run_cli(capsys, str(a), "--against", str(b))
    assert code == 0 and out.startswith("OK") and "agree at all 12" in out
    c = make_run(tmp_path / "c", header=make_header(cfg(threads=2)))
    code, out, err = run_cli(capsys, str(a), "--against", str(c), "--json")
    result = json.loads(out)
    assert code == 1 and "not comparable" in err and result["differences"] == ["threads.configured"]
    assert result["comparable"] is False


# ---------------------------------------------------------------------------------------------
# replay, referee and operator hooks (stand-ins for the executor's replay)


def fake_replay(leaves_at, calls):
    def replay(run_dir, from_step, to_step):
        calls.append((from_step, to_step))
        return {s: leaves_at(s) for s in range(from_step, to_step + 1)}
    return replay


def test_verify_run_replay_ok_unavailable_and_divergent(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path / "r", checkpoints=(3, 7))
    code, out, _ = run_cli(capsys, str(run))
    assert code == 0 and "replay: unavailable" in out and "integrity only" in out
    calls = []
    monkeypatch.setattr("skippipe.commands.verify.load_replay", lambda: fake_replay(step_leaves, calls))
    code, out, _ = run_cli(capsys, str(run), "--json")
    result = json.loads(out)
    assert code == 0 and result["ok"] and result["replayed_steps"] == 12 and "full replay" in result["guarantee"]
    assert calls == [(0, 3), (4, 7), (8, 11)]  # from init, then from each verified checkpoint
    # the run's ledger says honest things, but the honest replay differs from step 9 on
    monkeypatch.setattr("skippipe.commands.verify.load_replay",
                        lambda: fake_replay(lambda s: step_leaves(s, (9, "act/mb1/hop1/stage1")), []))
    code, out, _ = run_cli(capsys, str(run), "--json")
    result = json.loads(out)
    assert code == 1 and result["first_divergent_step"] == 9 and result["leaf"] == "act/mb1/hop1/stage1"
    assert (result["stage"], result["microbatch"], result["replayed_steps"]) == (1, 1, 10)


def test_referee_and_ops_hooks(tmp_path, capsys, monkeypatch):
    honest = make_run(tmp_path / "honest", checkpoints=(2, 5))
    faulty = make_run(tmp_path / "faulty", tamper=(6, "grad/mb1/hop0/stage1"), checkpoints=(2, 5))
    # the real replay and operator pinning need a real run (config.yaml, routes.jsonl): a hand-made
    # ledger is refused with one line, exit 2; stand-ins below exercise the command's wiring
    code, _, err = run_cli(capsys, str(honest), "--against", str(faulty), "--referee", "--ops")
    assert code == 2 and "config.yaml" in err
    calls = []
    monkeypatch.setattr("skippipe.commands.verify.load_replay", lambda: fake_replay(step_leaves, calls))
    pinned = []
    fake_ops = types.ModuleType("skippipe.verify.ops")
    fake_ops.pin_operator = lambda a, b, step, leaf: pinned.append((step, leaf)) or {"op_index": 3, "op": "aten.mm"}
    monkeypatch.setitem(sys.modules, "skippipe.verify.ops", fake_ops)
    code, out, _ = run_cli(capsys, str(faulty), "--against", str(honest), "--referee", "--ops", "--json")
    result = json.loads(out)
    assert code == 1 and result["first_divergent_step"] == 6
    assert calls == [(6, 6)]  # from checkpoint 5, the newest before the divergent step
    assert result["referee"]["matches"] == str(honest) and result["referee"]["from_checkpoint"] == 5
    assert pinned == [(6, "grad/mb1/hop0/stage1")] and result["ops"]["op_index"] == 3


def test_referee_and_ops_need_against(tmp_path, capsys):
    run = make_run(tmp_path / "r", steps=2)
    assert run_cli(capsys, str(run), "--referee")[0] == 2
