"""``skippipe export RUN --hf OUT [--force]``: a finished run's model as a Hugging Face checkpoint.

Writes ``OUT/config.json`` (``LlamaForCausalLM``) and ``OUT/model.safetensors`` from the stages the
run saved in ``RUN/final``, plus the tokenizer when the run had one to give (``data.tokenizer=hf``:
its files are copied; ``bpe``: the trained ``tokenizer.json``; ``bytes``: none, ids are UTF-8
bytes). ``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads the result. Needs the
optional extra ``hf`` (``safetensors``); the directory is built beside ``OUT`` and renamed into
place, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict

from skippipe.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a finished run directory (runs/<name>)")
    parser.add_argument("--hf", metavar="OUT", required=True, help="write a Hugging Face checkpoint directory here")
    parser.add_argument("--force", action="store_true", help="replace OUT if it already holds files")


def tokenizer_files(cfg, data) -> Dict[str, Path]:
    """The tokenizer files to ship with the checkpoint, by name in ``OUT``."""
    if cfg.data.tokenizer == "hf":
        source = Path(cfg.data.hf_tokenizer)
        folder = source if source.is_dir() else source.parent
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
        return {name: folder / name for name in names if (folder / name).is_file()}
    if cfg.data.tokenizer == "bpe":
        return {"tokenizer.json": data.tokenizer.path}
    return {}


def export_run(run: str, out: str, force: bool = False) -> Path:
    from skippipe.config import num_stages
    from skippipe.data import load_data
    from skippipe.model.presets import resolve_model_spec
    from skippipe.runfiles import read_run_config
    from skippipe.train.evaluate import load_stages

    try:
        from skippipe.model import hf
    except ImportError as err:
        raise UserError(f"export --hf needs the optional extra hf ({err}); pip install 'skippipe[hf]'") from None
    run_dir, target = Path(run), Path(out)
    cfg = read_run_config(run_dir)
    if not (run_dir / "final").is_dir():
        raise UserError(f"'{run_dir / 'final'}' does not exist: the run has not finished; export reads its final stages")
    if target.exists() and not target.is_dir():
        raise UserError(f"--hf {out}: is a file; give a directory for the checkpoint")
    if _overlaps(target, run_dir):
        raise UserError(f"--hf {out}: overlaps the run directory {run_dir} (replacing it would delete the run); "
                        "give a directory outside the run")
    if target.exists() and any(target.iterdir()):
        if not force:
            raise UserError(f"--hf {out}: already exists and is not empty; choose another directory or pass --force")
    data = load_data(cfg.data)
    spec = resolve_model_spec(cfg.model, vocab_size=data.vocab_size)
    stages = load_stages(run_dir / "final", spec, num_stages(cfg), cfg.run.seed)
    base = hf.read_hf_config(cfg.model.hf_path) if cfg.model.hf_path else None
    return hf.write_hf_checkpoint(stages, spec, target, base, tokenizer_files(cfg, data))


def _overlaps(target: Path, run_dir: Path) -> bool:
    """Is ``target`` the run directory, inside it, or above it?"""
    a, b = target.resolve(), run_dir.resolve()
    return a == b or b in a.parents or a in b.parents


def run(args) -> int:
    path = export_run(args.run, args.hf, args.force)
    print(f"wrote {path}/config.json and model.safetensors (load with transformers' "
          f"AutoModelForCausalLM.from_pretrained({str(path)!r}))")
    return 0
