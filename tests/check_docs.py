"""Run the command blocks of README.md and examples/*/README.md as written and check their documented
output, so the docs cannot go stale.

    python tests/check_docs.py            # the cheap blocks (CI runs these through tests/test_docs.py)
    python tests/check_docs.py --all      # every block (make check-docs; Ray, torchrun, training: minutes)
    python tests/check_docs.py --all --file examples/torchrun/README.md --show   # one file, print outputs

Each ```bash or ```console block has a marker comment, on a line just before it (or right after it),
that says when it runs:
``<!-- docs: cheap -->``, ``<!-- docs: full -->`` or ``<!-- docs: skip REASON -->``; an unmarked
block is an error. A ```console block holds ``$ command`` lines each followed by its output; a
```text block right after a ```bash block is that block's output. The blocks of one file run in
order in one shell session (exports carry over), from the repository root, with the virtual
environment's ``bin/`` first on PATH (as after ``. .venv/bin/activate``).

Outputs are compared line by line, in order, as a subsequence of what the commands printed: numbers,
hashes and Ray job ids are masked (times, losses and allocations depend on the machine), runs of
spaces and of ``-`` are folded, a line ``...`` stands for any number of lines, and progress-bar lines
are not compared; ``...`` inside a line stands for any text.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
FILES = ["README.md", "examples/README.md", *sorted(str(p.relative_to(REPO)) for p in REPO.glob("examples/*/README.md"))]
MARKER = re.compile(r"<!--\s*docs:\s*(cheap|full|skip)\b([^>]*)-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    file: str
    line: int
    tier: str  # cheap, full, skip
    commands: List[str]  # one shell snippet per command (bash: the whole block)
    expected: List[List[str]] = field(default_factory=list)  # documented output per command


def parse(path: Path) -> List[Block]:
    """The marked command blocks of one markdown file; ValueError names an unmarked block."""
    lines = path.read_text().splitlines()
    blocks: List[Block] = []
    fences = []  # (start line index, language, body lines)
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            fences.append((i, match.group(1), lines[i + 1:end]))
            i = end + 1
        else:
            i += 1
    rel = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    for n, (start, lang, body) in enumerate(fences):
        if lang not in ("bash", "console"):
            continue
        end = start + len(body) + 1
        around = "\n".join(lines[max(0, start - 3):start]) + "\n" + "\n".join(lines[end + 1:end + 2])
        marker = MARKER.findall(around)
        if not marker:
            raise ValueError(f"{rel}:{start + 1}: ```{lang} block without a <!-- docs: cheap|full|skip --> marker")
        tier = marker[-1][0]
        if lang == "bash":
            block = Block(rel, start + 1, tier, ["\n".join(body)])
            nxt = fences[n + 1] if n + 1 < len(fences) else None
            block.expected.append(nxt[2] if nxt and nxt[1] == "text" and _adjacent(lines, start, nxt[0]) else [])
        else:
            block = Block(rel, start + 1, tier, [])
            for text in body:
                if text.startswith("$ "):
                    block.commands.append(text[2:])
                    block.expected.append([])
                elif block.expected:
                    block.expected[-1].append(text)
        blocks.append(block)
    return blocks


def _adjacent(lines: List[str], bash_start: int, text_start: int) -> bool:
    """A ```text block is the output of the ```bash block before it when no other fence lies between."""
    between = lines[bash_start + 1:text_start]
    return sum(1 for x in between if x.startswith("```")) == 1


_MASKS = [(re.compile(r"raysubmit_\w+"), "raysubmit_J"), (re.compile(r"\b[0-9a-f]{8,}\b"), "H"),
          (re.compile(r"\d[\d,]*(\.\d+)?(e[-+]?\d+)?"), "N"), (re.compile(r"-{3,}"), "---"), (re.compile(r"\s+"), " ")]


def normalize(line: str) -> str:
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    for pattern, repl in _MASKS:
        line = pattern.sub(repl, line)
    return line.strip()


def is_progress(line: str) -> bool:
    return bool(re.match(r"\s*train:\s+\d+%\|", line))


def missing_lines(expected: List[str], actual: str) -> List[str]:
    """Documented lines not found, in order, in ``actual`` ([] when the output matches)."""
    got = [normalize(x) for x in re.split(r"[\r\n]+", actual)]
    pos, missing = 0, []
    for line in expected:  # "..." and gaps between documented lines are always allowed
        if not line.strip() or line.strip() == "..." or is_progress(line):
            continue
        want = normalize(line)  # "..." inside a documented line stands for any text
        pattern = re.compile(".*".join(re.escape(part.strip()) for part in want.split("...")) + ("" if "..." in want else "$"))
        hit = next((i for i in range(pos, len(got)) if pattern.fullmatch(got[i]) or
                    ("..." in want and pattern.match(got[i]))), None)
        if hit is None:
            missing.append(line)
        else:
            pos = hit + 1
    return missing


def run_file(blocks: List[Block], tiers: set, show: bool = False, timeout_s: float = 900.0,
             lines: Optional[set] = None) -> List[str]:
    """Run the selected blocks of one file in one shell session; returns the failures."""
    failures = []
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "env.sh"
        state.write_text("")
        for block in blocks:
            if block.tier not in tiers or (lines and block.line not in lines):
                continue
            for command, expected in zip(block.commands, block.expected):
                script = f"source {state}\nset -eo pipefail\n{command}\nexport -p > {state}\n"
                start = time.monotonic()
                proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
                where = f"{block.file}:{block.line}"
                print(f"{where}: exit {proc.returncode} in {time.monotonic() - start:.1f} s: {command.splitlines()[0]}",
                      file=sys.stderr)
                if show:
                    print(proc.stdout)
                expects_failure = any(x.startswith(("error:", "FAILED:")) for x in expected) or "echo $?" in command
                if proc.returncode != 0 and not expects_failure:
                    failures.append(f"{where}: `{command.splitlines()[0]}` exited {proc.returncode}:\n"
                                    f"{proc.stdout[-2000:]}")
                    continue
                missing = missing_lines(expected, proc.stdout)
                if missing:
                    failures.append(f"{where}: `{command.splitlines()[0]}` did not print:\n  "
                                    + "\n  ".join(missing[:8]) + f"\n--- it printed:\n{proc.stdout[-3000:]}")
    return failures


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also the full blocks (training, torchrun, Ray)")
    parser.add_argument("--file", action="append", help="only these files (repository-relative)")
    parser.add_argument("--show", action="store_true", help="print each command's output")
    parser.add_argument("--line", type=int, action="append", help="only the blocks starting at these lines")
    args = parser.parse_args(argv)
    tiers = {"cheap", "full"} if args.all else {"cheap"}
    failures = []
    for name in args.file or FILES:
        failures += run_file(parse(REPO / name), tiers, args.show, lines=set(args.line or []))
    for failure in failures:
        print(f"FAILED {failure}\n", file=sys.stderr)
    print(f"docs: {'OK' if not failures else f'{len(failures)} failed'}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
