"""Writing files so that a crash or an error never leaves half of one (one policy for the run's
files, checkpoints, exported models, caches and plots): write under a temporary name beside the
target, fsync it, rename it onto the target. A failure removes the temporary file and leaves the
target as it was. Standard library only, so every module (the pure ones too) can use it."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from skippipe.errors import UserError


def ensure_dir(path: Path) -> Path:
    """``path`` as a directory (created with its parents), or a one-line error when a file is in the way."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"'{path}' cannot be a directory: a file is in the way; give another path") from None
    return path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so writers that pick a format from it work)
    to write to; on leaving the block it is fsynced and renamed onto ``path``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"'{path}' is a directory; give the path of a file to write")
    ensure_dir(path.parent)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def absent(path, want: str = "file") -> str:
    """Why ``path`` is not the ``want`` (``file`` or ``directory``) it should be, for an error
    message: "does not exist", "is a directory" or "is a file"."""
    p = Path(path)
    if not p.exists():
        return "does not exist"
    if want == "file":
        return "is a directory, not a file" if p.is_dir() else "is not a regular file"
    return "is a file, not a directory"
