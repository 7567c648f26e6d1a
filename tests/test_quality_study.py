"""The quality study's statistics and its smoke run (bench/quality_study.py, bench/quality_report.py)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import quality_report as qr  # noqa: E402
from bench import quality_study as qs  # noqa: E402
from skippipe.plan import MicrobatchRoute, Plan  # noqa: E402


def test_mean_ci_is_the_student_t_interval():
    stat = qr.mean_ci([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["sd"] == 1.0
    half = 4.303 / math.sqrt(3)
    assert stat["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert qr.mean_ci([5.0])["ci95"] is None and qr.mean_ci([])["mean"] is None
    assert qr.t975(11) == 2.228 and qr.t975(100) == 1.96


def test_path_stats_count_skips_and_visits_after_a_later_stage():
    alloc = [["a"], ["b"], ["c"], ["d"]]
    plan = Plan("skippipe", 4, 3, alloc, [MicrobatchRoute(0, "a", ["b", "d", "c"]),
                                          MicrobatchRoute(1, "a", ["b", "c", "d"])])
    stats = qs.path_stats(plan)
    # mb0: 0->1 in order, 1->3 skip, 3->2 after a later stage; mb1: three in order
    assert stats["input_shares"] == pytest.approx({"in_order": 4 / 6, "after_skip": 1 / 6, "after_later_stage": 1 / 6})
    assert stats["paths_with_swap"] == 0.5 and stats["backward_steps_per_path"] == 0.5
    assert stats["visits"] == [0, 2, 2, 2]
    # the all-stage validation steps 0->1, 1->2, 2->3: mb0 trains only 0->1, mb1 all three
    assert qr.unseen_adjacent([p for p in stats["paths"][:1]], 4) == 2
    assert qr.unseen_adjacent(stats["paths"], 4) == 0


def record(name, seed, val, ppl_half, setting="shallow"):
    ppl = math.exp(val)
    return {"setting": setting, "seed": seed, "name": name, "steps": 10, "val_loss": val, "ppl": ppl,
            "ppl_keep_0.75": ppl, "ppl_keep_0.5": ppl * (1 + ppl_half), "loss_keep_0.75": val, "stages_kept_0.75": 5, "stages_kept_0.5": 3,
            "curve": [(0, 5.0), (10, val)], "swaps_per_iter": 1, "own_paths_loss": val, "coverage": [1.0, 0.5, 0.6],
            "routes": {"paths_with_swap": 0.25, "input_shares": {"in_order": 0.6, "after_skip": 0.3, "after_later_stage": 0.1}, "paths": [[1, 2]]},
            "train_s": 1.0}


def analysed(offsets, rises=(0.05, 0.05, 0.05), full_rise=0.2):
    records = []
    for seed, (off, r) in enumerate(zip(offsets, rises)):
        base = 2.0 + 0.1 * seed  # seeds differ far more than the paired differences
        records += [record("full", seed, base, full_rise), record("skippipe_33", seed, base * (1 + off), r)]
    geo = {"cases": {"full": {"iteration_time_s": 100.0}, "skippipe_33": {"iteration_time_s": 50.0}}}
    result = {"config": {"settings": {"shallow": {"runs": ["full", "skippipe_33"]}}}, "geo20": geo, "records": records}
    return qr.analyse(result)["shallow"]


def test_targets_are_judged_on_the_paired_mean_with_the_interval():
    a = analysed([0.01, 0.012, 0.011])
    vs = a["rows"]["skippipe_33"]["vs_full"]
    assert vs["mean"] == pytest.approx(0.011) and vs["n"] == 3
    t = a["targets"]["val_loss_within_3pct"]
    assert t["met"] and t["sure"]
    # a mean inside the bound whose interval crosses it is met but not sure; one above it is missed
    wide = analysed([-0.02, 0.0, 0.08])["targets"]["val_loss_within_3pct"]
    assert wide["met"] and not wide["sure"]
    assert not analysed([0.05, 0.05, 0.04])["targets"]["val_loss_within_3pct"]["met"]
    half = a["targets"]["keep_half_rise_below_half_full"]
    assert half["met"] and half["sure"]
    assert not analysed([0.0] * 3, rises=(0.15, 0.15, 0.15))["targets"]["keep_half_rise_below_half_full"]["met"]
    # equal time: skippipe_33 ends at 500 s (its final loss); full is halfway there, about 3.5: lower -> met
    assert a["targets"]["lower_loss_at_equal_geo20_time"]["met"]


def test_bad_arguments_name_the_flag():
    with pytest.raises(SystemExit, match="--seeds"):
        qs.parse_args(["--seeds", "a,b"])
    with pytest.raises(SystemExit, match="--settings"):
        qs.parse_args(["--settings", "wide"])
    with pytest.raises(SystemExit, match="include full"):
        qs.parse_args(["--runs", "skippipe_33"])


def test_quick_study_pairs_seeds_and_reuses_stored_runs(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "report"
    cmd = [sys.executable, str(ROOT / "bench" / "quality_study.py"), "--quick", "--settings", "deep",
           "--runs", "full,skippipe_33", "--seeds", "0,1", "--runs-dir", str(runs), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "quality.json").read_text())
    assert sorted((r["seed"], r["name"]) for r in result["records"]) == [
        (0, "full"), (0, "skippipe_33"), (1, "full"), (1, "skippipe_33")]
    row = result["analysis"]["deep"]["rows"]["skippipe_33"]
    assert row["vs_full"]["n"] == 2 and row["vs_full"]["ci95"] is not None
    full0 = next(r for r in result["records"] if r["name"] == "full")
    assert full0["own_paths_loss"] == pytest.approx(full0["val_loss"], rel=1e-6)  # full's path is every stage
    s33 = next(r for r in result["records"] if r["name"] == "skippipe_33")
    assert s33["routes"]["microbatches"] == 8 and all(len(p) == 3 for p in s33["routes"]["paths"])  # 2 of 6 skipped
    assert "| deep | 33% skip: val loss within 3% of full" in (out / "quality.md").read_text()
    job = qs.Job("deep", 1, "skippipe_33", 4, True, 2)
    assert qs.stored(job, runs)["val_loss"] == row["val_loss"]["values"][1]
    assert qs.stored(qs.Job("deep", 1, "skippipe_33", 5, True, 2), runs) is None  # another config: retrain
