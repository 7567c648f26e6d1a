"""Tracking: metrics.jsonl names and values, an offline wandb run read back from its own files,
``disabled`` writing nothing, the progress/summary console, and the run's plots."""

import json
import math
import re
import struct
import time
from pathlib import Path

import pytest

from skippipe.cli import main
from skippipe.plan import Plan

# a small, fast model on the tiny topology (6 nodes in 2 regions, stages [2, 2, 1, 1])
SMALL = ["model.dim=64", "model.n_heads=2", "model.ffn_dim=128", "model.seq_len=32", "train.samples_per_microbatch=2",
         "data.max_corpus_mb=1", "train.eval_batches=2",
         "runtime.timeout_s=30", "launcher=inprocess"]
NODES = [f"n{i}" for i in range(6)]
STEP_KEYS = ["loss/train", "time/iter_s", "time/predicted_iter_s", "time/plan_s", "throughput/tokens_per_s",
             "route/skip_ratio", "route/swaps", "route/collisions", "route/reroutes", "cluster/generation",
             *[f"stage/{k}/coverage" for k in range(4)],
             *[f"node/{n}/{what}" for n in NODES for what in ("alive", "slowdown")]]


def train(run_dir, *extra, steps=3):
    code = main(["train", "configs/tiny.yaml", *SMALL, f"train.steps={steps}", f"run.dir={run_dir}", *extra])
    assert code == 0
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """One 3-step run tracked by wandb in offline mode (no network)."""
    run = tmp_path_factory.mktemp("tracked") / "run"
    cache = tmp_path_factory.getbasetemp() / "skippipe-cache"
    lines = train(run, "tracking.wandb.mode=offline", "tracking.wandb.project=skippipe-tests",
                  "tracking.wandb.group=g1", "tracking.wandb.tags=[t1,t2]", "run.name=tracked",
                  "tracking.progress=false", f"data.cache_dir={cache}")
    return run, lines


# ---------------------------------------------------------------------------------------------
# reading wandb's own run file (.wandb: a LevelDB-style log of wandb protobuf Records)


def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, block, payloads, partial = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            payloads.append(chunk)
        elif kind in (2, 3):  # first, middle
            partial += chunk
        elif kind == 4:  # last
            payloads.append(partial + chunk)
            partial = b""
    records = []
    for raw in payloads:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def wandb_history(records):
    """wandb step -> {key: value} (nested keys joined with '.'), merged over history records."""
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        rows.setdefault(r.history.step.num, {}).update(items)
    return rows


def test_metrics_jsonl_has_every_name(offline_run):
    run, lines = offline_run
    steps, final = lines[:-1], lines[-1]
    assert [m["step"] for m in steps] == [0, 1, 2]
    routes = [json.loads(line) for line in (run / "routes.jsonl").read_text().splitlines()]
    for m in steps:
        missing = [k for k in STEP_KEYS if k not in m]
        assert not missing, f"step {m['step']} lacks {missing}"
        assert m["route/skip_ratio"] == pytest.approx(0.25)  # 3 of 4 stages visited
        assert m["stage/0/coverage"] == 1.0 and sum(m[f"stage/{k}/coverage"] for k in range(1, 4)) == pytest.approx(2.0)
        assert all(m[f"node/{n}/alive"] == 1 for n in NODES)
        assert m["route/reroutes"] == 0 and m["cluster/generation"] == 0
        assert m["time/predicted_iter_s"] > 0 and m["throughput/tokens_per_s"] > 0
        # the planner's own count for the plan it ran (the route log holds the plan)
        assert m["route/collisions"] == routes[m["step"]]["plan"]["extra"]["collisions"]
        # the ledger's chain head (in-process runs record each step at once)
        assert re.fullmatch(r"[0-9a-f]{12}", m["verify/chain"])
    assert final["step"] == 3 and final["ppl/val"] == pytest.approx(math.exp(final["loss/val"]))
    assert "loss/train" not in final and final["route/reroutes"] == 0  # no point for a step that never trained


def test_offline_wandb_run_holds_metrics_config_and_plots(offline_run):
    run, lines = offline_run
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline wandb run under {run / 'wandb'}"
    records = wandb_records(files[0])
    history = wandb_history(records)
    for m in lines[:-1]:
        row = history[m["step"]]
        for key in STEP_KEYS:
            assert row[key] == pytest.approx(m[key]), key
    final = history[3]
    assert final["loss/val"] == pytest.approx(lines[-1]["loss/val"])
    assert final["ppl/val"] == pytest.approx(lines[-1]["ppl/val"])
    assert {"plots/loss.path", "plots/gantt_step2.path", "plots/coverage.path", "plots/iter_time.path"} <= set(final)
    image = files[0].parent / "files" / final["plots/loss.path"]
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.project == "skippipe-tests" and run_record.display_name == "tracked"
    assert run_record.run_group == "g1" and list(run_record.tags) == ["t1", "t2"]
    config = {u.key: json.loads(u.value_json) for u in run_record.config.update}
    assert config["train"]["steps"] == 3 and config["model"]["dim"] == 64  # the resolved config
    assert config["tracking"]["wandb"]["mode"] == "offline"


def test_disabled_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")  # the config's "disabled" wins over the environment
    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    code = main(["train", str(repo / "configs/tiny.yaml"), *SMALL, "train.steps=1", f"run.dir={run}",
                 f"topology.file={repo / 'configs/topology/geo2.yaml'}", "tracking.wandb.mode=disabled",
                 "tracking.progress=false"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no ./wandb beside the run
    assert not (run / "wandb").exists()
    assert not list(run.rglob("*.wandb"))
    assert {p.name for p in run.iterdir()} == {"config.yaml", "topology.yaml", "metrics.jsonl", "routes.jsonl",
                                               "final", "plots", "ledger"}  # wandb disabled: no wandb/ directory


def test_wandb_mode_auto(monkeypatch):
    from skippipe.metrics import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"
    assert wandb_mode("offline") == "offline" and wandb_mode("disabled") == "disabled"


# ---------------------------------------------------------------------------------------------
# console


def test_progress_and_summary_table(offline_run, caplog):
    import logging

    from skippipe.metrics import Progress, summary_table

    _, lines = offline_run
    with caplog.at_level(logging.INFO, logger="skippipe.metrics"):
        bar = Progress(total=3, enabled=False, log_every=2)
        for m in lines[:-1]:
            bar.update(m)
        bar.close()
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(logged) == 2 and logged[0].startswith("step 0 ")  # steps 0 and 2
    assert "skip 0.25" in logged[0] and "live 6/6" in logged[0] and "loss " in logged[0]
    table = summary_table({**lines[-1], "route/reroutes": 2, "verify/chain": "abcdef0123456789"})
    for text in ("steps", "tokens", "wall time", "val loss", f"{lines[-1]['loss/val']:.4f}", "reroutes", "2",
                 "abcdef012345"):
        assert text in table
    assert "abcdef0123456" not in table  # the chain head is shortened
    assert "n/a (no ledger)" in summary_table({k: v for k, v in lines[-1].items() if k != "verify/chain"})
    assert lines[-1]["verify/chain"][:12] in summary_table(lines[-1])


def test_cluster_stats_follow_dead_nodes_and_slowdown():
    from skippipe.config import load_config
    from skippipe.metrics import cluster_stats
    from skippipe.model.presets import resolve_model_spec
    from skippipe.planner import Planner

    cfg = load_config("configs/tiny.yaml", [*SMALL, "schedule.method=full"])
    planner = Planner(cfg, resolve_model_spec(cfg.model, vocab_size=256))
    plan = planner.plan(0)
    planner.state.dead.add("n3")
    node, stage = plan.allocation[1][0], 1
    planner.cost.observe_compute(node, stage, "F", 3.0 * planner.cost.modelled_fwd_s(node, stage))
    plan.extra.pop("collisions", None)  # forces the simulator's count
    stats = cluster_stats(planner, plan, generation=2, reroutes=5, chain="f" * 64)
    assert stats["node/n3/alive"] == 0 and stats["node/n0/alive"] == 1
    assert stats[f"node/{node}/slowdown"] == pytest.approx(3.0)
    assert stats["cluster/generation"] == 2 and stats["route/reroutes"] == 5
    assert stats["verify/chain"] == "f" * 12
    from skippipe.simulate import simulate

    simulated = simulate(plan, planner.cost, cfg.schedule.memory).collisions
    assert simulated > 0 and stats["route/collisions"] == simulated  # full: every microbatch through every stage


# ---------------------------------------------------------------------------------------------
# plots


def png_pixels(path: Path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return mpimg.imread(str(path))


def test_plots_written_at_end_are_valid_pngs_with_content(offline_run):
    run, _ = offline_run
    names = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert names == ["coverage.png", "gantt_step2.png", "iter_time.png", "loss.png"]
    for name in names:
        pixels = png_pixels(run / "plots" / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert pixels[..., :3].std() > 0.05, f"{name} looks blank"


def test_plot_command_redraws_a_chosen_step(offline_run, tmp_path, capsys):
    run, _ = offline_run
    assert main(["plot", str(run), "--step", "0", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "gantt_step0.png") in printed and len(printed) == 4
    assert png_pixels(tmp_path / "gantt_step0.png")[..., :3].std() > 0.05


@pytest.mark.parametrize("args, words", [(["{missing}"], "does not exist"),
                                          (["{run}", "--step", "99"], "holds steps 0..2")])
def test_plot_command_bad_input_is_one_line(offline_run, tmp_path, capsys, args, words):
    run, _ = offline_run
    argv = [a.format(run=run, missing=tmp_path / "nope") for a in args]
    assert main(["plot", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_local_launcher_reports_busy_fraction_and_executed_timeline(tmp_path):
    """Six worker processes: measured busy fractions and the executed panel of the Gantt chart."""
    lines = train(tmp_path / "run", "launcher=local", "tracking.wandb.mode=disabled", "tracking.progress=false",
                  "cost.emulate_links=false", steps=2)
    routes = [json.loads(line) for line in (tmp_path / "run" / "routes.jsonl").read_text().splitlines()]
    for m, r in zip(lines[:-1], routes):  # per stage: its nodes' measured compute over the iteration
        stage_of = Plan.from_dict(r["plan"]).stage_of()
        for k in range(4):
            nodes = [n for n, s in stage_of.items() if s == k]
            expected = sum(sum(r["timings"][n]["compute_s"].values()) / r["iter_s"] for n in nodes) / len(nodes)
            assert 0.0 < m[f"stage/{k}/busy_frac"] == pytest.approx(expected), (k, m[f"stage/{k}/busy_frac"])
    route = routes[-1]
    assert set(route["timings"]) == set(NODES)
    pixels = png_pixels(tmp_path / "run" / "plots" / "gantt_step1.png")
    assert pixels.shape[0] > 1000  # two panels (planned, executed); one is about 500 px high


def test_checkpoint_manifests_become_a_wandb_artifact(tmp_path, monkeypatch):
    from skippipe.config import load_config
    from skippipe.metrics import MetricsLogger

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # wandb's artifact staging
    run = tmp_path / "run"
    for step in (2, 4):
        (run / "ckpt" / str(step)).mkdir(parents=True)
        (run / "ckpt" / str(step) / "manifest.json").write_text(json.dumps({"step": step}))
    logger = MetricsLogger(run, load_config(None, ["tracking.wandb.mode=offline", "run.name=ck", f"run.dir={run}"]))
    assert logger.log_checkpoint_manifests(run) == 2
    logger.close()
    # wandb-core appends the artifact record to the offline log asynchronously: once seen in a full
    # suite under load, finish() returned before it was there; give it a bounded time to land
    deadline = time.monotonic() + 30
    while True:
        records = wandb_records(next(run.glob("wandb/offline-run-*/run-*.wandb")))
        artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
        if artifacts or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(artifacts) == 1 and artifacts[0].type == "checkpoint-manifest"
    assert sorted(c.path for c in artifacts[0].manifest.contents) == ["2/manifest.json", "4/manifest.json"]


def test_coverage_heatmap_is_stage_by_step_and_the_plots_explain_themselves(tmp_path):
    """A stage that loses coverage at step 5 shows from step 5 on (not averaged away), the step axis
    has integer ticks, and the Gantt legend names shades, hatching, colours and the grey bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skippipe.gantt import phase_legend
    from skippipe.plots import _coverage_heatmap, plot_coverage

    steps = [{"step": s, "loss/train": 3.0, "stage/0/coverage": 1.0, "stage/1/coverage": 0.5 if s < 5 else 0.25}
             for s in range(8)]
    fig, ax = plt.subplots()
    _coverage_heatmap(fig, ax, steps, [0, 1])
    grid = ax.images[0].get_array()
    assert grid.shape == (2, 8) and list(grid[1]) == [0.5] * 5 + [0.25] * 3 and list(grid[0]) == [1.0] * 8
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["stage 0", "stage 1"]
    phase_legend(ax)
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    for words in ("forward", "hatched", "backward", "microbatch", "all-reduce"):
        assert words in legend, legend
    plt.close(fig)
    assert plot_coverage(steps, tmp_path / "coverage.png").stat().st_size > 10_000
