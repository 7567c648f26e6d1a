"""The ledger of a run: ``runs/<name>/ledger/`` (DESIGN.md sections 7 and 8).

Files:

- ``header.json``: scheme, hash, versions, CPU capability, threads, device, seed, verify level and
  the resolved config (:func:`make_header`). Its canonical JSON digest starts the chain.
- ``steps.jsonl``: one line per step, ``{step, root, chain, global_root, stage_roots}``.
- ``leaves/<step>.json``: ``{"step": s, "leaves": {leaf name: digest}}``.

Leaf names (the executors produce them):

- global: ``data/mb{id}``, ``route``, ``loss/mb{id}``;
- level ``full`` only: ``act/mb{id}/hop{h}/stage{k}`` and ``grad/mb{id}/hop{h}/stage{k}`` (``k`` =
  the sending node's stage, ``h`` = the hop's index along the path, 0 = originator -> first node);
- per stage, after the step's optimizer update: ``param/stage{k}/{node}/{tensor}`` and
  ``opt/stage{k}/{node}/{tensor}/{exp_avg|exp_avg_sq|step}``.

A leaf belongs to stage ``k`` when one of its path segments is ``stage{k}``; the others are global.
Per step: ``global_root`` = Merkle root of the global leaves, ``stage_roots[k]`` = Merkle root of stage
``k``'s leaves, ``root = H(global_root, (k, stage_root_k) in stage order)`` and the chain
``c_s = H(c_{s-1}, s, root_s)`` from ``c_{-1} = H(committed header)`` (Verde, arXiv 2502.19405), where the
committed header leaves out what does not change the bits (run directory, launcher, logging, ...).
"""

from __future__ import annotations

import json
import platform
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from skippipe.errors import UserError
from skippipe.fileio import absent, write_text_atomic
from skippipe.verify.digest import chain_next, chain_start, hash_fields, merkle_root, tensor_digest

SCHEME = "skippipe.ledger.v1"
STEP_KEYS = ("step", "root", "chain", "global_root", "stage_roots")
_STAGE_SEGMENT = re.compile(r"^stage(\d+)$")

# ---------------------------------------------------------------------------------------------
# leaf names


def leaf_stage(name: str) -> Optional[int]:
    """The stage a leaf belongs to (its ``stage{k}`` path segment), or None for a global leaf."""
    for segment in name.split("/"):
        match = _STAGE_SEGMENT.match(segment)
        if match:
            return int(match.group(1))
    return None


def data_leaf(microbatch_id: int) -> str:
    return f"data/mb{microbatch_id}"


def loss_leaf(microbatch_id: int) -> str:
    return f"loss/mb{microbatch_id}"


def act_leaf(microbatch_id: int, hop: int, stage_id: int) -> str:
    return f"act/mb{microbatch_id}/hop{hop}/stage{stage_id}"


def grad_leaf(microbatch_id: int, hop: int, stage_id: int) -> str:
    return f"grad/mb{microbatch_id}/hop{hop}/stage{stage_id}"


def checkpoint_leaves(stage_id: int, node: str, tensors: Dict[str, Any]) -> Dict[str, str]:
    """Ledger leaves for a stage's flat checkpoint dict (``param/<name>``, ``opt/<name>/<slot>``).

    The digest tag of each leaf is the checkpoint tensor name, so a checkpoint manifest's digests
    equal these leaves by construction: ``param/<name>`` -> leaf ``param/stage{k}/{node}/<name>``,
    ``opt/<name>/<slot>`` -> ``opt/stage{k}/{node}/<name>/<slot>``. Other entries (``meta/...``)
    are not leaves.
    """
    leaves = {}
    for tensor_name, tensor in tensors.items():
        name = checkpoint_to_leaf(stage_id, node, tensor_name)
        if name is not None:
            leaves[name] = tensor_digest(tensor_name, tensor)
    return leaves


def checkpoint_to_leaf(stage_id: int, node: str, tensor_name: str) -> Optional[str]:
    """``param/<name>`` -> ``param/stage{k}/{node}/<name>`` (same for ``opt/``); None for other names."""
    kind, _, rest = tensor_name.partition("/")
    if kind not in ("param", "opt") or not rest:
        return None
    return f"{kind}/stage{stage_id}/{node}/{rest}"


# ---------------------------------------------------------------------------------------------
# roots


def step_record(step: int, leaves: Dict[str, str]) -> dict:
    """``{step, root, global_root, stage_roots}`` of one step's leaves (stage_roots keyed "0", "1", ...)."""
    by_stage: Dict[Optional[int], Dict[str, str]] = {None: {}}
    for name, digest in leaves.items():
        by_stage.setdefault(leaf_stage(name), {})[name] = digest
    global_root = merkle_root(by_stage.pop(None))
    stage_roots = {str(k): merkle_root(by_stage[k]) for k in sorted(by_stage)}
    fields: List[str] = [global_root]
    for k, root_k in stage_roots.items():
        fields += [k, root_k]
    return {"step": int(step), "root": hash_fields("root", *fields), "global_root": global_root,
            "stage_roots": stage_roots}


# ---------------------------------------------------------------------------------------------
# header


def make_header(cfg, extra: Optional[dict] = None) -> dict:
    """The ledger header: everything the bits of a run depend on, plus the resolved config.

    ``extra`` is merged at the top level (it may override ``device`` or ``threads`` with what the
    workers actually use). Keys under ``extra["info"]`` are recorded but never compared.
    """
    import torch

    from skippipe.config import to_dict

    header = {
        "scheme": SCHEME,
        "hash": "sha256",
        **environment(),
        "threads": {"configured": cfg.run.threads, "torch": torch.get_num_threads()},
        "device": cfg.train.device,
        "seed": cfg.run.seed,
        "verify_level": cfg.verify.level,
        "config": to_dict(cfg),
        "info": {"cpu_model": _cpu_model(), "torch_config": hash_fields("torch-config", torch.__config__.show())},
    }
    for key, value in (extra or {}).items():
        if key == "info" and isinstance(value, dict):
            header["info"].update(value)
        else:
            header[key] = value
    return json.loads(json.dumps(header))  # exactly what header.json will hold


def environment() -> dict:
    """The parts of a header that describe this machine and build: byte order, versions, CPU."""
    import numpy
    import torch

    import skippipe

    return {"byte_order": sys.byteorder,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": numpy.__version__, "skippipe": skippipe.__version__},
            "cpu": {"machine": platform.machine(), "capability": torch.backends.cpu.get_cpu_capability()}}


def environment_differences(header: dict) -> List[str]:
    """Fields of ``environment()`` where this machine differs from a run's header."""
    here = environment()
    return comparable({k: header.get(k) for k in here}, here)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# Config keys that do not change a single bit of the computation: where and how the run was
# launched, logged, checkpointed and faulted. fault.* is excluded so that an honest run and a run
# with fault.corrupt stay comparable (that is the dispute verification settles).
IGNORED_CONFIG_PREFIXES = ("run.", "tracking.", "launcher", "checkpoint.", "fault.", "schedule.routes_from",
                           "ray.", "runtime.timeout_s", "runtime.master_addr", "runtime.master_port",
                           "data.cache_dir")
IGNORED_HEADER_KEYS = ("info",)


def _flatten(obj: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: Dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def _ignored(key: str) -> bool:
    if key.split(".")[0] in IGNORED_HEADER_KEYS:
        return True
    if key.startswith("config."):
        sub = key[len("config."):]
        bases = (p.rstrip(".") for p in IGNORED_CONFIG_PREFIXES)
        return any(sub == base or sub.startswith(base + ".") for base in bases)
    return False


def comparable(header_a: dict, header_b: dict) -> List[str]:
    """Dotted header fields that affect the bits and differ (``threads.torch``, ``config.model.dim``).

    Empty when the two runs' ledgers can be compared bit for bit. Ignores ``info``, ``config.run.*``,
    ``config.tracking.*``, ``config.launcher``, ``config.checkpoint.*``, ``config.fault.*``,
    ``config.schedule.routes_from``, ``config.ray.*``, the rendezvous settings and the data cache dir.
    """
    flat_a, flat_b = _flatten(header_a), _flatten(header_b)
    keys = sorted(set(flat_a) | set(flat_b))
    return [k for k in keys if not _ignored(k) and flat_a.get(k, "<absent>") != flat_b.get(k, "<absent>")]


def committed_header(header: dict) -> dict:
    """The header without the fields :func:`comparable` ignores: what the chain commits to.

    Two runs of one config in different directories, on different launchers, with different logging
    or checkpointing, start from the same ``c_{-1} = chain_start(committed_header(header))`` and so
    produce identical ledgers; ``header.json`` still records everything.
    """
    def strip(obj: Any, prefix: str) -> Any:
        if not isinstance(obj, dict):
            return obj
        return {k: strip(v, f"{prefix}{k}.") for k, v in obj.items() if not _ignored(f"{prefix}{k}")}

    return strip(header, "")


def chain_origin(header: dict) -> str:
    """``c_{-1}`` of a ledger with this header."""
    return chain_start(committed_header(header))


def describe_differences(header_a: dict, header_b: dict, fields: List[str]) -> List[str]:
    """``field (a vs b)`` for each field, for messages."""
    flat_a, flat_b = _flatten(header_a), _flatten(header_b)
    return [f"{k} ({flat_a.get(k, '<absent>')!r} vs {flat_b.get(k, '<absent>')!r})" for k in fields]


# ---------------------------------------------------------------------------------------------
# writing


def extension(on_disk: dict, header: dict, step: int) -> Optional[dict]:
    """A resume with another ``train.steps`` but the same lr horizon (``train.lr_steps``) extends the
    run: only those two fields differ. Returns the record for ``info.extended`` in header.json
    (``info`` is not part of the chain), or None when the resume is not such an extension."""
    differ = comparable(on_disk, header)
    if not differ or not set(differ) <= {"config.train.steps", "config.train.lr_steps"}:
        return None

    def horizon(h):
        train = h["config"]["train"]
        return train.get("lr_steps") or train["steps"]

    if horizon(on_disk) != horizon(header):
        return None
    return {"from_step": step + 1, "train.steps": header["config"]["train"]["steps"], "lr_horizon": horizon(header)}


def resume_lines(ledger_dir: Path, header: dict, step: int) -> Tuple[dict, List[dict]]:
    """(header on disk, lines of steps 0..step) of a ledger to resume after ``step``; UserError when
    ``header`` is not comparable or the chain is broken. Read-only (validate before writing)."""
    ledger_dir = Path(ledger_dir)
    steps_path = ledger_dir / "steps.jsonl"
    on_disk = _read_header(ledger_dir / "header.json")
    differ = [] if extension(on_disk, header, step) else comparable(on_disk, header)
    if differ:
        raise UserError(f"run.resume: {ledger_dir / 'header.json'} was written by a different setup; "
                        f"differs in {', '.join(describe_differences(on_disk, header, differ))}")
    kept: List[dict] = []
    prev = chain_origin(on_disk)
    lines = steps_path.read_text().splitlines() if steps_path.is_file() else []
    for number, text in enumerate(lines[: step + 1], start=1):
        line = _parse_step_line(steps_path, number, text)
        if line["step"] != len(kept) or line["chain"] != chain_next(prev, line["step"], line["root"]):
            raise UserError(f"run.resume: {steps_path} line {number} does not continue the chain; "
                            f"the ledger was edited or damaged, start a new run")
        prev = line["chain"]
        kept.append(line)
    if len(kept) != step + 1:
        raise UserError(f"run.resume: {steps_path} has {len(kept)} steps, cannot resume after step {step}")
    return on_disk, kept


class LedgerWriter:
    """Appends one line per step to ``ledger/steps.jsonl`` and writes ``ledger/leaves/<step>.json``.

    ``resume_from_step=k`` keeps the lines of steps ``0..k`` (rewriting ``steps.jsonl`` atomically),
    checks that ``header`` is comparable with the header on disk (the header on disk is kept, so the
    resumed ledger equals an uninterrupted one) and continues the chain from step ``k``.
    Steps are recorded in order 0, 1, 2, ...; the leaves file is renamed into place before its line is
    appended, so a line never points at a missing leaves file.
    """

    def __init__(self, run_dir, header: dict, resume_from_step: Optional[int] = None):
        self.dir = Path(run_dir) / "ledger"
        self.leaves_dir = self.dir / "leaves"
        self.leaves_dir.mkdir(parents=True, exist_ok=True)
        self.steps_path = self.dir / "steps.jsonl"
        header = json.loads(json.dumps(header))
        if resume_from_step is None:
            write_text_atomic(self.dir / "header.json", json.dumps(header, indent=1, sort_keys=True) + "\n")
            self.header = header
            kept: List[dict] = []
            self._remove_leaves_after(-1)
        else:
            self.header, kept = self._resume(header, int(resume_from_step))
        text = "".join(_line_text(line) for line in kept)
        write_text_atomic(self.steps_path, text)
        self._prev = kept[-1]["chain"] if kept else chain_origin(self.header)
        self._next_step = len(kept)
        self._file = open(self.steps_path, "a")

    def _resume(self, header: dict, step: int) -> Tuple[dict, List[dict]]:
        on_disk, kept = resume_lines(self.dir, header, step)
        self._remove_leaves_after(step)
        extended = extension(on_disk, header, step)
        if extended:  # written once the resume is known to go ahead
            on_disk.setdefault("info", {}).setdefault("extended", []).append(extended)
            write_text_atomic(self.dir / "header.json", json.dumps(on_disk, indent=1, sort_keys=True) + "\n")
        return on_disk, kept

    @property
    def head(self) -> Optional[str]:
        """The chain value of the last step written or kept (None before the first step)."""
        return self._prev if self._next_step else None

    def _remove_leaves_after(self, step: int) -> None:
        for path in self.leaves_dir.glob("*.json"):
            if path.stem.isdigit() and int(path.stem) > step:
                path.unlink()

    @property
    def next_step(self) -> int:
        return self._next_step

    def record(self, step: int, leaves: Dict[str, str]) -> dict:
        """Record one step's leaves; returns its steps.jsonl line ``{step, root, chain, global_root, stage_roots}``."""
        if step != self._next_step:
            raise ValueError(f"LedgerWriter.record: got step {step}, expected step {self._next_step} "
                             f"(steps are recorded once each, in order)")
        rec = step_record(step, leaves)
        chain = chain_next(self._prev, step, rec["root"])
        line = {"step": step, "root": rec["root"], "chain": chain, "global_root": rec["global_root"],
                "stage_roots": rec["stage_roots"]}
        leaves_text = json.dumps({"step": step, "leaves": dict(sorted(leaves.items()))}, indent=0) + "\n"
        write_text_atomic(self.leaves_dir / f"{step}.json", leaves_text)
        self._file.write(_line_text(line))
        self._file.flush()
        self._prev, self._next_step = chain, step + 1
        return line

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "LedgerWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _line_text(line: dict) -> str:
    return json.dumps({key: line[key] for key in STEP_KEYS}) + "\n"


# ---------------------------------------------------------------------------------------------
# reading


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserError(f"'{path}' does not exist: {what}")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"'{path}' is not valid JSON (truncated or not a skippipe ledger file)") from None


def _read_header(path: Path) -> dict:
    header = _read_json(path, "not a run with a ledger (train with verify.level=states or full)")
    if not isinstance(header, dict) or header.get("scheme") != SCHEME:
        found = header.get("scheme") if isinstance(header, dict) else type(header).__name__
        raise UserError(f"'{path}' is not a skippipe ledger header (scheme {found!r}, expected {SCHEME!r})")
    return header


def _parse_step_line(path: Path, number: int, text: str) -> dict:
    try:
        line = json.loads(text)
    except ValueError:
        raise UserError(f"'{path}' line {number} is not valid JSON (truncated?)") from None
    if not isinstance(line, dict) or any(key not in line for key in STEP_KEYS):
        raise UserError(f"'{path}' line {number} is not a ledger step (needs keys {', '.join(STEP_KEYS)})")
    if not isinstance(line["step"], int) or not isinstance(line["stage_roots"], dict):
        raise UserError(f"'{path}' line {number} is not a ledger step (step must be an integer)")
    return line


class Ledger:
    """A run's ledger as read from disk: ``header``, ``steps`` (the steps.jsonl lines) and leaves."""

    def __init__(self, run_dir: Path, header: dict, steps: List[dict]):
        self.run_dir = run_dir
        self.dir = run_dir / "ledger"
        self.header = header
        self.steps = steps
        self._index = {line["step"]: i for i, line in enumerate(steps)}

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def line(self, step: int) -> dict:
        i = self._index.get(step)
        if i is None:
            raise UserError(f"'{self.dir / 'steps.jsonl'}' has no step {step} ({self.num_steps} steps)")
        return self.steps[i]

    def chain(self, step: int) -> str:
        return self.line(step)["chain"]

    def root(self, step: int) -> str:
        return self.line(step)["root"]

    def leaves_path(self, step: int) -> Path:
        return self.dir / "leaves" / f"{step}.json"

    def leaves(self, step: int) -> Dict[str, str]:
        path = self.leaves_path(step)
        data = _read_json(path, f"the ledger has no leaves for step {step}")
        if not isinstance(data, dict) or data.get("step") != step or not isinstance(data.get("leaves"), dict):
            raise UserError(f"'{path}' is not the leaves file of step {step}")
        return data["leaves"]


def read_ledger(run_dir) -> Ledger:
    """Read ``run_dir/ledger``; a missing, truncated or foreign file is a UserError naming it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory '{run_dir}' {absent(run_dir, 'directory')}; give a directory written by "
                        "`skippipe train`")
    ledger_dir = run_dir / "ledger"
    header = _read_header(ledger_dir / "header.json")
    steps_path = ledger_dir / "steps.jsonl"
    if not steps_path.is_file():
        raise UserError(f"'{steps_path}' does not exist: the run recorded no steps")
    try:
        lines = steps_path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"'{steps_path}' is not a text file (not a skippipe ledger)") from None
    steps = [_parse_step_line(steps_path, n, text) for n, text in enumerate(lines, start=1) if text.strip()]
    return Ledger(run_dir, header, steps)


def check_links(ledger: Ledger) -> Optional[Tuple[int, str]]:
    """Check step numbering and the chain links of steps.jsonl (no leaves read; O(n) hashes)."""
    return _check(ledger, with_leaves=False)


def check_chain(ledger: Ledger) -> Optional[Tuple[int, str]]:
    """Recompute every step's roots from its leaves and the chain from the header.

    Returns ``(first bad step, why)`` or None when the ledger is consistent.
    """
    return _check(ledger, with_leaves=True)


def _check(ledger: Ledger, with_leaves: bool) -> Optional[Tuple[int, str]]:
    prev = chain_origin(ledger.header)
    for i, line in enumerate(ledger.steps):
        number = i + 1
        if line["step"] != i:
            return i, f"steps.jsonl line {number} has step {line['step']}, expected step {i}"
        if line["chain"] != chain_next(prev, i, line["root"]):
            after = "the header" if i == 0 else f"step {i - 1}"
            return i, f"chain break: steps.jsonl line {number} (step {i}) chain does not follow {after}"
        if with_leaves:
            why = root_mismatch(line, ledger.leaves(i))
            if why:
                return i, f"step {i}: {why} (steps.jsonl line {number} vs leaves/{i}.json)"
        prev = line["chain"]
    return None


def root_mismatch(line: dict, leaves: Dict[str, str]) -> Optional[str]:
    """Why a steps.jsonl line's roots do not follow from the leaves, or None."""
    rec = step_record(line["step"], leaves)
    if rec["global_root"] != line["global_root"]:
        return "global root does not match its leaves"
    recorded = {str(k): v for k, v in line["stage_roots"].items()}
    for k in sorted(set(rec["stage_roots"]) | set(recorded), key=lambda k: int(k) if k.isdigit() else -1):
        if rec["stage_roots"].get(k) != recorded.get(k):
            return f"stage {k} root does not match its leaves"
    if rec["root"] != line["root"]:
        return "step root does not match its leaves"
    return None
