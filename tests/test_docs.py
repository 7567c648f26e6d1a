"""The README's config reference is generated from the schema and must be up to date."""

import subprocess
import sys
from pathlib import Path

import pytest

from skippipe.config import valid_keys
from skippipe.docs import END, MEANINGS, START, field_comments, main, reference_rows, render, update_readme

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def test_readme_config_reference_is_up_to_date():
    text = README.read_text()
    assert update_readme(text) == text, "README.md's config reference is stale: run `python -m skippipe.docs`"


def test_every_key_is_listed_with_a_default_and_a_meaning():
    rows = {r["key"]: r for r in reference_rows()}
    block = README.read_text().split(START, 1)[1].split(END, 1)[0]
    for key in valid_keys():
        assert key in rows, key
        assert rows[key]["meaning"], f"config key {key} has no meaning: give it a trailing comment in config.py"
        assert rows[key]["default"], key
        assert f"| `{key}` |" in block, f"{key} is missing from README.md"
    assert set(MEANINGS) <= set(rows), f"MEANINGS names keys that no longer exist: {set(MEANINGS) - set(rows)}"


def test_reference_follows_the_schema():
    rows = {r["key"]: r for r in reference_rows()}
    assert rows["train.steps"]["default"] == "`100`"
    assert rows["tracking.wandb.mode"]["default"] == "`auto`"
    assert "WANDB_API_KEY" in rows["tracking.wandb.mode"]["meaning"]  # the trailing comment in config.py
    assert rows["schedule.partition_sizes"]["default"] == "`[]`" and rows["run.dir"]["default"] == "`null`"
    assert rows["cost.emulate_links"]["default"] == "`true`"


def test_a_new_field_and_comment_reach_the_reference():
    source = "from dataclasses import dataclass\n\n@dataclass\nclass Extra:\n    depth: int = 3  # how deep\n"
    namespace = {}
    exec(compile(source, "extra.py", "exec"), namespace)
    assert field_comments(source) == {("Extra", "depth"): "how deep"}
    rows = reference_rows(namespace["Extra"], source)
    assert rows == [{"key": "depth", "type": "int", "default": "`3`", "meaning": "how deep"}]
    assert "| `depth` | int | `3` | how deep |" in render(rows)


def test_check_fails_on_a_stale_readme_and_the_generator_fixes_it(tmp_path, capsys):
    stale = tmp_path / "README.md"
    stale.write_text(f"# title\n\n{START}\nold table\n{END}\n\nafter\n")
    assert main(["--readme", str(stale), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["--readme", str(stale)]) == 0
    text = stale.read_text()
    assert text.startswith("# title\n") and text.endswith("\nafter\n") and "old table" not in text
    assert main(["--readme", str(stale), "--check"]) == 0


def test_module_entry_point_checks_the_repo_readme():
    result = subprocess.run([sys.executable, "-m", "skippipe.docs", "--check"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -- the README's and examples' command blocks (tests/check_docs.py) ---------------------------

def _check_docs():
    sys.path.insert(0, str(REPO / "tests"))
    import check_docs

    return check_docs


def test_every_command_block_is_marked_and_parsed():
    docs = _check_docs()
    blocks = [b for name in docs.FILES for b in docs.parse(REPO / name)]
    assert {b.file for b in blocks} >= {"README.md", "examples/geo_local/README.md", "examples/ray_join/README.md"}
    assert any(b.tier == "cheap" for b in blocks)
    ray = next(b for b in blocks if b.file == "README.md" and "ray job submit" in b.commands[0])
    assert "--no-wait" in ray.commands[0] and "ray job logs" in ray.commands[0]
    assert any("outputs" in line for line in ray.expected[0])


def test_unmarked_block_is_an_error(tmp_path):
    docs = _check_docs()
    page = tmp_path / "README.md"
    page.write_text("# t\n\n```bash\nskippipe train\n```\n")
    with pytest.raises(ValueError, match="README.md:3: ```bash block without a <!-- docs"):
        docs.parse(page)


def test_documented_output_must_appear_in_order_with_numbers_masked():
    docs = _check_docs()
    actual = "noise\nsteps                   20\nval loss                3.0396\nwall time 12.0 s\r\noutputs   runs/geo\n"
    assert docs.missing_lines(["steps 50", "...", "val loss  2.9315", "outputs runs/geo"], actual) == []
    assert docs.missing_lines(["outputs runs/geo", "val loss 2.9315"], actual) == ["val loss 2.9315"]  # order
    assert docs.missing_lines(["verify chain head n/a (no ledger)"], actual) == ["verify chain head n/a (no ledger)"]
    assert docs.missing_lines(["wall time ..."], actual) == []
    assert docs.missing_lines(["outputs .../geo"], actual) == [] and docs.missing_lines(["outputs .../tiny"], actual)


def test_cheap_command_blocks_run_as_written_and_leave_the_tree_clean():
    docs = _check_docs()
    status = ["git", "status", "--porcelain", "--untracked-files=all"]
    before = subprocess.run(status, cwd=REPO, capture_output=True, text=True).stdout
    assert docs.main([]) == 0
    after = subprocess.run(status, cwd=REPO, capture_output=True, text=True).stdout
    assert after == before, "a documented command wrote into the repository"
