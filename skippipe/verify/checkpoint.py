"""Checkpoints with digest manifests: ``runs/<name>/ckpt/<step>/stage<k>.pt`` + ``manifest.json``.

A ``stage<k>.pt`` file is ``torch.save`` of a flat ``{tensor name: tensor}`` dict: ``param/<name>``,
``opt/<name>/exp_avg``, ``opt/<name>/exp_avg_sq``, ``opt/<name>/step`` and small ``meta/...`` tensors
(step, RNG, data position). The manifest::

    {"format": "skippipe.ckpt.v1", "step": s, "chain": <ledger chain at s>,
     "files": {"stage<k>.pt": {"node": node, "tensors": {tensor name: tensor_digest(name, tensor)}}}}

Checkpoints are data, never code: files are loaded with ``torch.load(weights_only=True)`` and every
tensor is re-hashed; digests use the tensor name as tag, so ``param/<name>`` in the manifest equals the
ledger leaf ``param/stage{k}/{node}/<name>`` at that step (:func:`skippipe.verify.ledger.checkpoint_leaves`).
A checkpoint is written into ``ckpt/.tmp-<step>`` and renamed to ``ckpt/<step>`` only when complete.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from skippipe.fileio import atomic_path, write_text_atomic
from skippipe.verify.digest import tensor_digest
from skippipe.verify.ledger import Ledger, checkpoint_to_leaf

FORMAT = "skippipe.ckpt.v1"
_STAGE_FILE = re.compile(r"^stage(\d+)\.pt$")


@dataclass
class CheckpointProblem:
    """One reason a checkpoint fails: ``message`` is the one line shown to the user."""

    message: str
    step: Optional[int] = None
    file: Optional[str] = None
    stage: Optional[int] = None
    tensor: Optional[str] = None
    leaf: Optional[str] = None  # the ledger leaf the tensor should equal, when known


def tensor_digests(tensors: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """``{name: tensor_digest(name, tensor)}``: a manifest entry's ``tensors``."""
    return {name: tensor_digest(name, t) for name, t in sorted(tensors.items())}


def digests_path(stage_file) -> Path:
    """``stage<k>.pt`` -> ``stage<k>.digests.json`` (the final model's and snapshots' own manifest)."""
    return Path(stage_file).with_suffix(".digests.json")


def write_stage_digests(stage_file, tensors: Dict[str, torch.Tensor]) -> None:
    write_text_atomic(digests_path(stage_file), json.dumps({"format": FORMAT, "tensors": tensor_digests(tensors)},
                                                           indent=1) + "\n")


def stage_file_problem(stage_file, tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    """Why the loaded ``tensors`` are not what was written to ``stage_file`` (its digests file
    disagrees or cannot be read), or None; a file written before digests existed has none to check."""
    path = digests_path(stage_file)
    if not path.is_file():
        return None
    try:
        expected = json.loads(path.read_text())["tensors"]
    except (ValueError, KeyError, TypeError):
        return f"'{path}' cannot be read (truncated?)"
    actual = tensor_digests(tensors)
    wrong = sorted(name for name in set(expected) | set(actual) if expected.get(name) != actual.get(name))
    if wrong:
        return f"'{stage_file}' does not match '{path.name}' (tensor {wrong[0]} differs): the file changed after the run wrote it"
    return None


def final_model_problem(run_dir) -> Tuple[int, Optional[str]]:
    """(stage files checked, why one of ``run_dir/final`` is not what the run wrote, or None)."""
    files = sorted((Path(run_dir) / "final").glob("stage*.pt"))
    for path in files:
        try:
            problem = stage_file_problem(path, load_stage_file(path))
        except ValueError as err:
            problem = f"'{path}' {err}"
        if problem:
            return len(files), problem
    return len(files), None


def write_manifest(ckpt_dir, step: int, chain: str, files: Dict[str, dict]) -> Path:
    """Write ``ckpt_dir/manifest.json`` atomically; ``files`` = {"stage<k>.pt": {"node", "tensors"}}."""
    path = Path(ckpt_dir) / "manifest.json"
    manifest = {"format": FORMAT, "step": int(step), "chain": chain,
                "files": {name: {"node": entry["node"], "tensors": dict(sorted(entry["tensors"].items()))}
                          for name, entry in sorted(files.items())}}
    write_text_atomic(path, json.dumps(manifest, indent=1) + "\n")
    return path


def save_tensors_atomic(path, tensors: Dict[str, torch.Tensor]) -> None:
    """``torch.save`` of the tensors (on the CPU) to ``path`` (:func:`skippipe.fileio.atomic_path`)."""
    with atomic_path(Path(path)) as tmp:
        torch.save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, tmp)


def write_checkpoint(run_dir, step: int, chain: str,
                     stages: Dict[int, Tuple[str, Dict[str, torch.Tensor]]]) -> Path:
    """Write a whole checkpoint ``{stage: (node, flat tensor dict)}`` to ``ckpt/<step>`` atomically.

    Everything goes into ``ckpt/.tmp-<step>`` first; the directory is renamed only when every file and
    the manifest are complete, so a crash never leaves a checkpoint that resume would pick up.
    """
    root = Path(run_dir) / "ckpt"
    tmp, final = root / f".tmp-{step}", root / str(step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    for stage_id, (node, tensors) in sorted(stages.items()):
        name = f"stage{stage_id}.pt"
        save_tensors_atomic(tmp / name, tensors)
        files[name] = {"node": node, "tensors": tensor_digests(tensors)}
    write_manifest(tmp, step, chain, files)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def list_checkpoints(run_dir) -> List[int]:
    """Steps with a checkpoint directory ``ckpt/<step>`` (temp directories ignored), ascending."""
    root = Path(run_dir) / "ckpt"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def load_stage_file(path) -> Dict[str, torch.Tensor]:
    """Load a ``stage<k>.pt`` as data (``weights_only=True``); ValueError with a one-line reason."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, refused global: all one-line problems
        raise ValueError(f"cannot be read as a checkpoint ({type(err).__name__}: {_first_words(str(err))})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise ValueError("is not a skippipe checkpoint (expected a flat {name: tensor} dict)")
    return data


def _first_words(text: str, limit: int = 120) -> str:
    """The first line of an error, cut at a word boundary (with "...") when longer than ``limit``."""
    line = text.splitlines()[0] if text.strip() else "no detail"
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."


def _label(ckpt_dir: Path) -> str:
    """``ckpt/<step>`` for messages when the directory sits in a run's ckpt/ folder."""
    return f"ckpt/{ckpt_dir.name}" if ckpt_dir.parent.name == "ckpt" else str(ckpt_dir)


def read_manifest(ckpt_dir) -> Tuple[Optional[dict], Optional[CheckpointProblem]]:
    ckpt_dir = Path(ckpt_dir)
    label = f"{_label(ckpt_dir)}/manifest.json"
    path = ckpt_dir / "manifest.json"
    if not path.is_file():
        return None, CheckpointProblem(f"{label}: missing (an incomplete or foreign checkpoint)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None, CheckpointProblem(f"{label}: not valid JSON (truncated?)")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None, CheckpointProblem(f"{label}: not a skippipe checkpoint manifest (expected format {FORMAT})")
    files = manifest.get("files")
    if (not isinstance(manifest.get("step"), int) or not isinstance(files, dict)
            or not all(isinstance(e, dict) and isinstance(e.get("tensors"), dict) and "node" in e
                       for e in files.values())):
        return None, CheckpointProblem(f"{label}: malformed (needs step, chain and files with node and tensors)")
    if ckpt_dir.name.isdigit() and int(ckpt_dir.name) != manifest["step"]:
        return None, CheckpointProblem(f"{label}: says step {manifest['step']} but sits in {_label(ckpt_dir)}",
                                       step=int(ckpt_dir.name))
    return manifest, None


def check_checkpoint(ckpt_dir, ledger: Optional[Ledger] = None) -> Optional[CheckpointProblem]:
    """The first problem of a checkpoint (files against manifest, then manifest against ledger), or None."""
    ckpt_dir = Path(ckpt_dir)
    manifest, problem = read_manifest(ckpt_dir)
    if problem:
        return problem
    step = manifest["step"]
    for file_name, entry in manifest["files"].items():
        problem = _check_file(ckpt_dir, step, file_name, entry)
        if problem:
            return problem
    if ledger is not None:
        return _check_against_ledger(ckpt_dir, manifest, ledger)
    return None


def verify_checkpoint(ckpt_dir, ledger: Optional[Ledger] = None) -> Optional[str]:
    """One line naming the file and tensor that fails, or None when the checkpoint verifies."""
    problem = check_checkpoint(ckpt_dir, ledger)
    return problem.message if problem else None


def _check_file(ckpt_dir: Path, step: int, file_name: str, entry: dict) -> Optional[CheckpointProblem]:
    label = f"{_label(ckpt_dir)}/{file_name}"
    match = _STAGE_FILE.match(file_name)
    stage = int(match.group(1)) if match else None
    where = dict(step=step, file=file_name, stage=stage)
    if match is None:  # also refuses paths such as ../x from a crafted manifest
        return CheckpointProblem(f"{label}: not a stage file name (expected stage<k>.pt)", **where)
    path = ckpt_dir / file_name
    if not path.is_file():
        return CheckpointProblem(f"{label}: missing", **where)
    try:
        tensors = load_stage_file(path)
    except ValueError as err:
        return CheckpointProblem(f"{label}: {err}", **where)
    expected = entry["tensors"]
    for name in sorted(expected):
        if name not in tensors:
            return CheckpointProblem(f"{label}: tensor {name} is in the manifest but not in the file",
                                     tensor=name, **where)
        if tensor_digest(name, tensors[name]) != expected[name]:
            return CheckpointProblem(f"{label}: tensor {name} does not match its manifest digest",
                                     tensor=name, leaf=checkpoint_to_leaf(stage, entry["node"], name), **where)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        return CheckpointProblem(f"{label}: tensor {extra[0]} is not in the manifest", tensor=extra[0], **where)
    return None


def _check_against_ledger(ckpt_dir: Path, manifest: dict, ledger: Ledger) -> Optional[CheckpointProblem]:
    step, label = manifest["step"], _label(ckpt_dir)
    if step >= ledger.num_steps or step < 0:
        return CheckpointProblem(f"{label}: step {step} is not in the ledger ({ledger.num_steps} steps)", step=step)
    if manifest.get("chain") != ledger.chain(step):
        return CheckpointProblem(f"{label}/manifest.json: chain does not match the ledger at step {step}", step=step)
    leaves = ledger.leaves(step)
    for file_name, entry in manifest["files"].items():
        stage = int(_STAGE_FILE.match(file_name).group(1))
        node, where = entry["node"], dict(step=step, file=file_name, stage=stage)
        covered = set()
        for name, digest in sorted(entry["tensors"].items()):
            leaf = checkpoint_to_leaf(stage, node, name)
            if leaf is None:
                continue
            covered.add(leaf)
            if leaf not in leaves:
                return CheckpointProblem(f"{label}/{file_name}: tensor {name} has no ledger leaf {leaf} at step {step}",
                                         tensor=name, leaf=leaf, **where)
            if leaves[leaf] != digest:
                return CheckpointProblem(f"{label}/{file_name}: tensor {name} does not match ledger leaf {leaf} "
                                         f"at step {step}", tensor=name, leaf=leaf, **where)
        prefixes = (f"param/stage{stage}/{node}/", f"opt/stage{stage}/{node}/")
        missing = sorted(leaf for leaf in leaves if leaf.startswith(prefixes) and leaf not in covered)
        if missing:
            return CheckpointProblem(f"{label}/{file_name}: ledger leaf {missing[0]} at step {step} has no tensor "
                                     f"in the checkpoint (incomplete checkpoint)", leaf=missing[0], **where)
    return None


def newest_verified_checkpoint(run_dir, ledger: Optional[Ledger] = None, at_or_before: Optional[int] = None,
                               holding: Optional[str] = None) -> Tuple[Optional[int], List[str]]:
    """The newest checkpoint step (``<= at_or_before``; with the file ``holding``, e.g. ``stage2.pt``:
    a checkpoint written while a stage had no replica has none of it) that verifies, and the
    problems of newer ones."""
    problems = []
    for step in reversed(list_checkpoints(run_dir)):
        if at_or_before is not None and step > at_or_before:
            continue
        if holding is not None and not (Path(run_dir) / "ckpt" / str(step) / holding).is_file():
            continue
        problem = verify_checkpoint(Path(run_dir) / "ckpt" / str(step), ledger)
        if problem is None:
            return step, problems
        problems.append(problem)
    return None, problems
