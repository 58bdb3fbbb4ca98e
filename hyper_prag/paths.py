"""Where hyper-prag keeps things: the cache of what it computes once (converted models, data, indexes,
stores) and the YAML configs shipped in the package.

The cache root is ``$HYPER_PRAG_CACHE`` if set, else ``$XDG_CACHE_HOME/hyper_prag``, else
``~/.cache/hyper_prag``. Each stage owns one sub-folder. A shipped config is found by name
(:func:`config_file`), so ``--config tiny`` works from any folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from hyper_prag.errors import HyperPragError


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


# ------------------------------------------------------------------------------------------- shipped configs

# The YAML configs shipped inside the package (the checkout's top-level configs/ links here), one folder per
# trainer: configs/hypernet/*.yaml (hyper-prag train hypernet fit), configs/encode/*.yaml (per-document LoRAs).
CONFIGS = Path(__file__).parent / "configs"
ConfigKind = Literal["hypernet", "encode"]


def shipped_configs(kind: ConfigKind) -> list[str]:
    """The names (file stems) of the shipped ``kind`` configs, sorted."""
    return sorted(p.stem for p in (CONFIGS / kind).glob("*.yaml"))


def config_file(config: str | Path, kind: ConfigKind) -> Path:
    """The YAML file a ``--config`` value means: an existing file, or a shipped config by name.

    ``configs/<kind>/<name>.yaml`` names the shipped file too when the current folder is not a checkout, so
    the commands of the docs run from any folder.

    Args:
        config: a path, or a shipped config's name with or without ``.yaml`` (``tiny``, ``smollm2-fastweight``).
        kind: which trainer's configs are searched: ``hypernet`` or ``encode``.

    Raises:
        HyperPragError: neither a file nor a shipped name (the message lists the shipped names).
    """
    path = Path(config)
    if path.is_file():
        return path
    if path.suffix in ("", ".yaml") and (path.parent == Path(".") or path.parent.parts[-2:] == ("configs", kind)):
        shipped = CONFIGS / kind / f"{path.stem}.yaml"
        if shipped.is_file():
            return shipped
    raise HyperPragError(f"no {kind} config {str(config)!r}: give a YAML file or the name of a shipped one "
                         f"({', '.join(shipped_configs(kind))}).")
