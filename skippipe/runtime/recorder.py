"""The coordinator's record of a run: the hash ledger and verified checkpoints (DESIGN.md 7).

Each step's leaves come from two places: what the step computed (data, executed route, losses, and
at ``verify.level=full`` every tensor sent) and the state after its optimizer update. In-process the
state is known at once; remote workers apply an update only when the next command commits it
(:mod:`skippipe.runtime.remote`), so they report the state digests of step s with step s+1 (or the
stop). The recorder holds a step until both halves are in and writes the ledger strictly in order.

Checkpoints: after step s with ``(s+1) % checkpoint.every == 0`` the next command asks the first live
replica of each stage to write ``stage<k>.pt`` into ``ckpt/.tmp-<s>``; with the ledger line of s
written, the manifest (tensor digests, chain at s) is written and the directory renamed to
``ckpt/<s>``, so a crash never leaves a half checkpoint that resume would pick up.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set

from skippipe.errors import UserError
from skippipe.runtime.wire import NodeReport
from skippipe.verify.leaves import loss_leaves, node_state_leaves, route_leaves

log = logging.getLogger("skippipe")


class RunRecorder:
    def __init__(self, cfg, out: Path, header_extra: Dict[str, Any], resume_from_step: Optional[int] = None):
        from skippipe.verify.ledger import LedgerWriter, make_header

        self.cfg, self.out = cfg, out
        self.enabled = cfg.verify.level != "off"
        self.writer = LedgerWriter(out, make_header(cfg, header_extra), resume_from_step) if self.enabled else None
        self.pending: Dict[int, Dict[str, str]] = {}
        self.stage_of: Dict[int, Dict[str, int]] = {}
        self.stage_state: Dict[int, Dict[int, Dict[str, str]]] = {}  # step -> stage -> reported digests
        self.next_step = 0 if resume_from_step is None else resume_from_step + 1
        self.chain: Optional[str] = self.writer.head if self.writer is not None else None  # kept by a resume
        self.checkpoints: Dict[int, List[dict]] = {}
        self.pinned = pinned_checkpoints(out) if resume_from_step is not None else set()

    # -- ledger ---------------------------------------------------------------------------------
    def add_step(self, step: int, plan, outcome, deferred_state: bool) -> None:
        """Record what ``step`` computed; with ``deferred_state`` its state digests arrive later."""
        if not self.enabled:
            return
        self.pinned |= {int(o["step"]) for o in outcome.rebuilt.values() if o.get("from") == "checkpoint"}
        leaves = {**route_leaves(plan), **loss_leaves(outcome.losses), **outcome.leaves}
        for report in outcome.node_reports.values():
            leaves.update(report.leaves)
        self.pending[step] = leaves
        self.stage_of[step] = plan.stage_of()
        self.add_state(outcome.node_reports)
        self.add_states(outcome.states)
        if not deferred_state:
            self.flush(step)
        else:
            self.flush(step - 1)

    def add_state(self, reports: Dict[str, NodeReport]) -> None:
        """State digests reported by workers (``{"step", "digests"}`` of the last committed update)."""
        self.add_states({node: r.state for node, r in reports.items() if r.state})

    def add_states(self, states: Dict[str, Dict[str, Any]]) -> None:
        """``node -> {"step", "digests"}``; the state of a step is that of its stage's replicas."""
        for node, state in states.items():
            if not state or state["step"] not in self.pending:
                continue
            stage = self.stage_of[state["step"]].get(node)
            if stage is not None:
                self.pending[state["step"]].update(node_state_leaves(stage, [node], state["digests"]))
                self.stage_state.setdefault(state["step"], {})[stage] = state["digests"]

    def _complete_state(self, step: int) -> None:
        """A node that died after ``step`` committed (its digests rode on the command that failed)
        held what its stage's surviving replicas hold: replicas apply the same reduced gradient to
        the same state, bit for bit, and a replay recomputes the stage once for every holder, so
        the replicas' digests are the dead node's. A stage that lost every replica has no
        survivor to ask; its state leaves are left out (and the replay leaves them out: see
        :func:`skippipe.verify.replay.lost_state`)."""
        known = self.stage_state.pop(step, {})
        leaves = self.pending[step]
        for node, stage in self.stage_of.get(step, {}).items():
            if stage in known:
                missing = {k: v for k, v in node_state_leaves(stage, [node], known[stage]).items() if k not in leaves}
                leaves.update(missing)

    def flush(self, up_to: int) -> None:
        while self.next_step <= up_to and self.next_step in self.pending:
            self._complete_state(self.next_step)
            line = self.writer.record(self.next_step, self.pending.pop(self.next_step))
            self.stage_of.pop(self.next_step, None)
            self.chain = line["chain"]
            self._finish_checkpoint(self.next_step)
            self.next_step += 1

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint_due(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return self.enabled and every > 0 and (step + 1) % every == 0

    def temp_dir(self, step: int) -> Path:
        return self.out / "ckpt" / f".tmp-{step}"

    def add_checkpoint_entries(self, step: int, entries: List[dict]) -> None:
        self.checkpoints.setdefault(step, []).extend(e for e in entries if e)
        if step < self.next_step:
            self._finish_checkpoint(step)

    def _finish_checkpoint(self, step: int) -> None:
        entries = self.checkpoints.pop(step, None)
        if not entries:
            return
        from skippipe.verify.checkpoint import write_manifest

        tmp, final = self.temp_dir(step), self.out / "ckpt" / str(step)
        files = {e["file"]: {"node": e["node"], "tensors": e["tensors"]} for e in entries}
        write_manifest(tmp, step, self.ledger_chain(step), files)
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
        self._prune()
        log.info("checkpoint %s (%d stage files, verified digests in manifest.json)", final, len(files))

    def ledger_chain(self, step: int) -> str:
        from skippipe.verify.ledger import read_ledger

        if step == self.next_step - 1 and self.chain is not None:
            return self.chain
        return read_ledger(self.out).chain(step)

    def _prune(self) -> None:
        from skippipe.verify.checkpoint import list_checkpoints

        ckpt = self.out / "ckpt"
        stages = lambda step: {f.name for f in (ckpt / str(step)).glob("stage*.pt")}  # noqa: E731
        for old in prunable(list_checkpoints(self.out), stages, self.cfg.checkpoint.keep, self.pinned):
            shutil.rmtree(ckpt / str(old), ignore_errors=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def prunable(steps: List[int], stages: Callable[[int], Set[str]], keep: int, pinned: Set[int]) -> List[int]:
    """Checkpoints (steps, oldest first) that ``checkpoint.keep`` lets go: all but the newest
    ``keep``, except one a stage restarted from (``pinned``: the replay needs it) and the newest
    one holding a stage file (``stages(step)``) that no newer kept checkpoint holds (the stage lost
    every replica; ``fault.rebuild=checkpoint`` restores it from there)."""
    if keep <= 0 or len(steps) <= keep:
        return []
    held = set().union(*(stages(step) for step in steps[-keep:]))
    out = []
    for old in reversed(steps[:-keep]):  # newest first
        files = stages(old)
        if old in pinned or files - held:
            held |= files
        else:
            out.append(old)
    return sorted(out)


def find_resume_point(out: Path) -> Optional[int]:
    """The newest checkpoint of ``out``, verified against its manifest and the ledger; a checkpoint
    that does not verify is refused (exit 2, naming the file and tensor) rather than skipped."""
    from skippipe.verify.checkpoint import list_checkpoints, verify_checkpoint
    from skippipe.verify.ledger import read_ledger

    steps = list_checkpoints(out)
    if not steps:
        return None
    ledger = read_ledger(out)
    newest = steps[-1]
    problem = verify_checkpoint(out / "ckpt" / str(newest), ledger)
    if problem:
        raise UserError(f"run.resume: refusing {problem}; restore the file or delete ckpt/{newest} "
                        "to resume from an older checkpoint")
    return newest


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of steps <= ``last_step``, atomically: resume continues after them. A validation
    line's step counts the steps before it, so the one of ``last_step + 1`` (the checkpoint's own
    parameters) is redone by the resumed run, and the final summary (step ``train.steps`` >
    ``last_step``) goes too."""
    if not path.is_file():
        return
    from skippipe.fileio import write_text_atomic
    from skippipe.runfiles import read_jsonl

    texts = [line for line in path.read_text().splitlines() if line.strip()]
    records = read_jsonl(path)  # a torn last line (the crash that made this a resume) is dropped
    kept = [line for line, r in zip(texts, records) if r.get("step", 0) <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def pinned_checkpoints(out: Path) -> set:
    """Checkpoints a stage restarted from (``extra.rebuilt`` in routes.jsonl): never pruned, since
    the replay restarts the stage from the same files."""
    path = out / "routes.jsonl"
    if not path.is_file():
        return set()
    pins = set()
    for text in path.read_text().splitlines():
        if '"rebuilt"' not in text:
            continue
        try:
            rebuilt = json.loads(text)["plan"]["extra"]["rebuilt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        pins |= {int(o["step"]) for o in rebuilt.values() if o.get("from") == "checkpoint"}
    return pins
