"""Reading a run directory's files back (``skippipe plot``, ``eval``, ``verify``, ``export``, a
resume, the benchmarks): its JSON-lines logs and the resolved config it saved (every reader of
``runs/<name>/config.yaml`` goes through :func:`read_config_data`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from skippipe.fileio import absent


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """Every complete JSON line of ``path``: a torn last line (a crash while writing it) is skipped;
    a damaged line before it is a one-line UserError naming the file and the line."""
    from skippipe.errors import UserError

    texts = [t for t in Path(path).read_text(encoding="utf-8").splitlines() if t.strip()]
    lines = []
    for number, text in enumerate(texts, 1):
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            if number == len(texts):
                break
            raise UserError(f"'{path}' line {number} is not JSON (the file was damaged); "
                            "restore it or cut the file before that line") from None
    return lines


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    """The lines of ``RUN/metrics.jsonl``; a missing file is a one-line UserError."""
    from skippipe.errors import UserError

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"'{path}' {absent(path)}; give a run directory written by `skippipe train` (runs/<name>)")
    return read_jsonl(path)


def read_config_data(run_dir: Path) -> Dict[str, Any]:
    """``runs/<name>/config.yaml`` as plain data (resolved); a missing or unreadable file is a
    one-line UserError naming it."""
    from omegaconf import OmegaConf

    from skippipe.errors import UserError

    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise UserError(f"run directory '{run_dir}' {absent(run_dir, 'directory')}; give a directory written by "
                        "`skippipe train`")
    if not path.is_file():
        raise UserError(f"'{path}' {absent(path)}; '{run_dir}' is not a run directory written by `skippipe train`")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:
        raise UserError(f"'{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' does not hold a config (a mapping); it is not a file written by `skippipe train`")
    return data


def read_run_config(run_dir: Path, need_topology: bool = False):
    """The resolved config a run saved (``runs/<name>/config.yaml``).

    The topology is the run's own copy (``runs/<name>/topology.yaml``, which also holds the nodes
    that joined the running job) when there is one. Otherwise paths are relative to where the run
    was started; a topology file that is not found from here is dropped unless ``need_topology``
    (then the error says where to run from). The replay source is always dropped (a finished run
    does not need it).
    """
    from skippipe.config import from_dict
    from skippipe.errors import UserError

    run_dir = Path(run_dir)
    data = read_config_data(run_dir)
    if (run_dir / "topology.yaml").is_file():  # the run's own copy, with any nodes that joined it
        data["topology"] = {**(data.get("topology") or {}), "file": str(run_dir / "topology.yaml")}
    topology_file = (data.get("topology") or {}).get("file")
    if topology_file and not Path(topology_file).is_file():
        if need_topology:
            raise UserError(f"the run's topology.file '{topology_file}' is not found from here; "
                            "run this from the directory the run was started in")
        data["topology"]["file"] = None
    (data.get("schedule") or {})["routes_from"] = None
    from skippipe.config import ConfigError

    try:
        return from_dict(data)
    except ConfigError as err:
        message = str(err).removeprefix("saved config: ")
        raise ConfigError(f"{run_dir / 'config.yaml'}: {message}") from None
