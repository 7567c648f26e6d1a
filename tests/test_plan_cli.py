import json

import pytest

from skippipe.cli import main
from skippipe.plan import Plan

SMALL = ["topology.file=configs/topology/geo2.yaml", "schedule.partition_sizes=[2,2,2]",
         "schedule.skip_ratio=0.34", "schedule.microbatches_per_originator=2", "schedule.search_budget_s=30",
         "schedule.allocation_budget_s=30", "model.preset=tiny"]


def test_plan_json_has_all_methods(capsys):
    assert main(["plan", *SMALL, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["methods"]) == {"full", "random_skip", "skippipe_nc", "skippipe"}
    full = out["methods"]["full"]["iteration_time_s"]
    originators = len(out["allocation"][0])
    for row in out["methods"].values():
        assert row["reduction_vs_full"] == pytest.approx(1.0 - row["iteration_time_s"] / full)
        assert row["plan_time_s"] == pytest.approx(row["allocation_time_s"] + row["route_time_s"], abs=0.05)
        assert row["microbatches"] == 2 * originators  # schedule.microbatches_per_originator=2
    # skipping a third of the stages on this two-region topology is what makes skippipe faster
    assert out["methods"]["skippipe"]["iteration_time_s"] < full
    assert out["methods"]["full"]["stages_visited"] == 3
    assert out["methods"]["skippipe"]["stages_visited"] == 2
    # the lower bound and each method's gap to it (issue 13)
    assert out["lower_bound_s"] > 0
    for row in out["methods"].values():
        assert row["gap_to_bound"] == pytest.approx(row["iteration_time_s"] / out["lower_bound_s"])
        assert row["gap_to_bound"] >= 1.0 - 1e-9


def test_plan_table_out_and_simulate(tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / "g.png"
    assert main(["plan", *SMALL, "--out", str(out), "--gantt", str(png)]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.split()[:1] and
            line.split()[0] in ("full", "random_skip", "skippipe_nc", "skippipe")}
    assert set(rows) == {"full", "random_skip", "skippipe_nc", "skippipe"}
    assert float(rows["full"][2].rstrip("%")) == 0.0  # vs full
    assert float(rows["skippipe"][2].rstrip("%")) < 0.0  # faster than full, as the --json test finds
    assert all(float(r[3].rstrip("x")) >= 1.0 for r in rows.values())  # never below the lower bound
    assert png.stat().st_size > 1000
    plan = Plan.load(out)
    assert plan.method == "skippipe" and plan.node_order
    assert main(["simulate", str(out), *SMALL, "--json"]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert sim["makespan_s"] == pytest.approx(plan.predicted_makespan_s)


def _handwritten(tmp_path, path_nodes):
    plan = {"format": "skippipe.plan.v1", "method": "handmade", "num_stages": 3, "stages_visited": 2,
            "allocation": [["n0", "n1"], ["n2", "n3"], ["n4", "n5"]],
            "microbatches": [{"id": 0, "originator": "n0", "path": path_nodes, "start_s": 0.0}]}
    p = tmp_path / "hand.json"
    p.write_text(json.dumps(plan))
    return str(p)


def test_simulate_handwritten_plan_without_order(tmp_path, capsys):
    plan = _handwritten(tmp_path, ["n2"])
    assert main(["simulate", plan, *SMALL]) == 0
    printed = float(capsys.readouterr().out.split()[1])  # "makespan <s> s (...)"
    assert main(["simulate", plan, *SMALL, "--json"]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert printed == pytest.approx(sim["makespan_s"], abs=5e-4)
    # one microbatch: its originator n0 and the one node on its path do all the work
    assert {n for n, busy in sim["busy_s"].items() if busy > 0} == {"n0", "n2"} and sim["collisions"] == 0


@pytest.mark.parametrize("path_nodes, expect", [
    (["n2", "n4"], "microbatch 0: rule 1"),
    (["n1"], "microbatch 0: rule 1"),
    (["n9"], "microbatch 0: node 'n9' is not in the allocation"),
])
def test_simulate_rejects_rule_breaks(tmp_path, capsys, path_nodes, expect):
    assert main(["simulate", _handwritten(tmp_path, path_nodes), *SMALL]) == 2
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1


def test_simulate_rejects_swap_rule(tmp_path, capsys):
    plan = {"format": "skippipe.plan.v1", "method": "h", "num_stages": 4, "stages_visited": 3,
            "allocation": [["n0"], ["n1"], ["n2"], ["n3"]],
            "microbatches": [{"id": 0, "originator": "n0", "path": ["n3", "n1"]}]}
    p = tmp_path / "swap.json"
    p.write_text(json.dumps(plan))
    assert main(["simulate", str(p), "schedule.num_stages=4", "model.preset=tiny"]) == 2
    assert "microbatch 0: rule 2: swap back 2" in capsys.readouterr().err


def test_simulate_plan_node_missing_from_topology(tmp_path, capsys):
    plan = {"format": "skippipe.plan.v1", "method": "h", "num_stages": 2, "stages_visited": 2,
            "allocation": [["x0"], ["x1"]], "microbatches": [{"id": 0, "originator": "x0", "path": ["x1"]}]}
    p = tmp_path / "missing.json"
    p.write_text(json.dumps(plan))
    assert main(["simulate", str(p), "schedule.num_stages=2", "schedule.skip_ratio=0"]) == 2
    assert "node 'x0' is not in the topology" in capsys.readouterr().err


def test_bad_plan_file_format(tmp_path, capsys):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"format": "other"}))
    assert main(["simulate", str(p)]) == 2
    assert "'format' must be" in capsys.readouterr().err


def test_output_paths_in_the_way_are_one_line_errors(tmp_path, capsys):
    """--out naming a directory, --gantt with a format matplotlib cannot write, and plot --out on a
    file: exit 2 with one line, nothing replaced."""
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("keep")
    for args, words in ((["--out", str(tmp_path / "adir")], "is a directory"),
                        (["--gantt", str(tmp_path / "g.txt")], "give a .png, .svg or .pdf path"),
                        (["--out", str(tmp_path / "afile" / "p.json")], "a file is in the way")):
        assert main(["plan", *SMALL, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "afile").read_text() == "keep" and not any((tmp_path / "adir").iterdir())


def test_options_may_come_between_the_config_and_the_overrides(capsys):
    """``plan --json CFG key=v`` and ``plan CFG --json key=v`` read as ``plan CFG key=v --json``."""
    outputs = []
    for argv in (["configs/tiny.yaml", *SMALL, "schedule.seed=3", "--json"],
                 ["--json", "configs/tiny.yaml", *SMALL, "schedule.seed=3"],
                 ["configs/tiny.yaml", "--json", *SMALL, "schedule.seed=3"]):
        assert main(["plan", *argv]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    for out in outputs:
        out["methods"] = {m: {k: v for k, v in r.items() if "time_s" not in k} for m, r in out["methods"].items()}
    assert outputs[0]["config"] == "configs/tiny.yaml" and outputs[1] == outputs[0] and outputs[2] == outputs[0]
    assert main(["plan", "configs/tiny.yaml", "--json", "--bogus"]) == 2
