"""Where hyper-prag keeps what it computes once and reuses: converted models, data, indexes, stores.

The root is ``$HYPER_PRAG_CACHE`` if set, else ``$XDG_CACHE_HOME/hyper_prag``, else
``~/.cache/hyper_prag``. Each stage owns one sub-folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Returns the cache root folder (created if missing)."""
    env = os.environ.get("HYPER_PRAG_CACHE")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = Path(xdg) / "hyper_prag" if xdg else Path.home() / ".cache" / "hyper_prag"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(stage: str) -> Path:
    """Returns (and creates) the cache sub-folder of one pipeline stage, e.g. ``"models"``."""
    path = cache_root() / stage
    path.mkdir(parents=True, exist_ok=True)
    return path
