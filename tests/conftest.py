import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Share one token cache across the session but keep it out of the user's home."""
    cache = tmp_path_factory.getbasetemp() / "skippipe-cache"
    monkeypatch.setenv("SKIPPIPE_CACHE", str(cache))
