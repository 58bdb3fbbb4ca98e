"""Figures of an evaluation run (matplotlib, Agg backend: no display needed).

- :func:`plot_f1`: F1 per method and question type as grouped bars, with 95% bootstrap CI error bars.
- :func:`plot_latency`: median seconds per question per method, stacked by pipeline stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hyper_prag.methods import STAGES  # noqa: E402


class _Scored(Protocol):
    """One method's row of a harness run (``hyper_prag.evaluate.MethodResult``)."""

    name: str
    scores: Mapping[str, Mapping[str, Mapping[str, float]]]
    latency: Mapping[str, Mapping[str, float]]


class Scored(Protocol):
    """What the plots read of a harness run (``hyper_prag.evaluate.Results``)."""

    methods: Sequence[_Scored]
    types: Sequence[str]
    config: Mapping[str, Any]


def plot_f1(results: Scored, path: str | Path) -> Path:
    """Grouped bars: one group per question type (and "total"), one bar per method, CI error bars.

    Args:
        results: an evaluation's results.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    groups = [*results.types, "total"]
    n_methods = len(results.methods)
    width = 0.8 / max(1, n_methods)
    x = np.arange(len(groups))  # (G,)
    fig, ax = plt.subplots(figsize=(max(6.0, len(groups) * (0.8 + 0.35 * n_methods)), 4.5))
    for j, method in enumerate(results.methods):
        cells = [method.scores[g]["f1"] for g in groups]
        mean = np.array([100 * c["mean"] for c in cells])  # (G,)
        err = np.array([[100 * (c["mean"] - c["low"]) for c in cells],
                        [100 * (c["high"] - c["mean"]) for c in cells]])  # (2, G)
        ax.bar(x + (j - (n_methods - 1) / 2) * width, np.nan_to_num(mean), width, yerr=np.nan_to_num(err),
               capsize=2, label=method.name)
    ax.set_xticks(x, groups)
    ax.set_ylabel("F1 (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"F1 by question type (95% bootstrap CI, n={results.config.get('questions', '?')})")
    ax.legend(fontsize="small", ncols=min(4, max(1, n_methods)), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    return _save(fig, path)


def plot_latency(results: Scored, path: str | Path) -> Path:
    """Stacked bars: median seconds per question of each method, split into retrieve/lora/apply/generate.

    Args:
        results: an evaluation's results.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    names = [m.name for m in results.methods]
    x = np.arange(len(names))  # (M,)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 4.0))
    bottom = np.zeros(len(names))  # (M,)
    for stage in STAGES:
        values = np.array([m.latency["median"][stage] for m in results.methods])  # (M,)
        ax.bar(x, values, 0.6, bottom=bottom, label=stage)
        bottom += values
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("seconds per question (median per stage)")
    ax.set_title("Latency breakdown")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: "plt.Figure", path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
