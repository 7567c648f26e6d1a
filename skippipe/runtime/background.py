"""A training run in a background thread of this process, watched through its run directory.

What the tests, ``examples/ray_multinode`` and ``bench/fault_bench.py`` use to act on a running
job at a given step (kill a node, lose a machine, add one) and then look at what it did::

    job = BackgroundRun(train_ray, cfg)
    job.wait_for_step(3)          # metrics.jsonl holds step 3
    ...                           # the fault
    summary = job.result()        # joins the thread; re-raises what training raised
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

POLL_S = 0.05


def read_jsonl(path: Path, since: Optional[float] = None) -> List[Dict[str, Any]]:
    """The complete lines of a JSON-lines file another thread may be appending to
    (:func:`skippipe.runfiles.read_jsonl`); none from a missing file or one last written before
    ``since`` (wall-clock seconds: the file of an earlier run that this one will overwrite)."""
    from skippipe.runfiles import read_jsonl as read_lines

    try:
        if since is not None and path.stat().st_mtime < since:
            return []
    except FileNotFoundError:
        return []
    return read_lines(path) if path.is_file() else []


def logged_steps(run: Path, since: Optional[float] = None) -> List[int]:
    """The training steps ``metrics.jsonl`` holds (validation lines left out), in order."""
    return [m["step"] for m in read_jsonl(Path(run) / "metrics.jsonl", since) if "loss/val" not in m and "step" in m]


def first_step_using(run: Path, node: str) -> Optional[int]:
    """The first step whose plan (``routes.jsonl``) sends a microbatch through ``node``, if any."""
    for record in read_jsonl(Path(run) / "routes.jsonl"):
        if any(node in mb["path"] for mb in record["plan"]["microbatches"]):
            return record["step"]
    return None


class BackgroundRun:
    """``train(cfg)`` in a daemon thread; ``run`` is the run directory it writes (``cfg.run.dir``)."""

    def __init__(self, train: Callable[[Any], Dict[str, Any]], cfg: Any, run: Optional[Path] = None):
        self.run = Path(run if run is not None else cfg.run.dir)
        # metrics of an earlier run in the same directory (run.overwrite=true) are not this run's;
        # a second's slack for file systems with coarse modification times
        self.started = time.time() - 1.0
        self.summary: Optional[Dict[str, Any]] = None
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._train, args=(train, cfg), name="skippipe-train", daemon=True)
        self._thread.start()

    def _train(self, train, cfg) -> None:
        try:
            self.summary = train(cfg)
        except BaseException as err:  # re-raised by result()
            self.error = err

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def last_step(self) -> int:
        """The last training step logged so far (-1 before the first)."""
        steps = logged_steps(self.run, self.started)
        return steps[-1] if steps else -1

    def wait_for_step(self, step: int, timeout_s: float = 240.0) -> bool:
        """Block until ``step`` is logged; False if training ended or ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.alive:
            if self.last_step() >= step:
                return True
            time.sleep(POLL_S)
        return self.last_step() >= step

    def wait_until(self, condition: Callable[[], bool], timeout_s: float = 240.0) -> bool:
        """Block until ``condition()`` holds; False if training ended or ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.alive:
            if condition():
                return True
            time.sleep(POLL_S)
        return condition()

    def result(self, timeout_s: float = 400.0) -> Dict[str, Any]:
        """Wait for training to end; its summary, or what it raised."""
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"training in {self.run} still running after {timeout_s:.0f} s")
        if self.error is not None:
            raise self.error
        return self.summary
