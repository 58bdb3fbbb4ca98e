"""Scoring answers: the official SQuAD v1.1 EM / F1, answer-contained, and bootstrap confidence intervals.

Scoring (max over all accepted answer aliases), exactly as the official SQuAD v1.1 evaluation script
(``evaluate-v1.1.py``) does, so our SQuAD numbers compare with published ones:

- :func:`normalize_answer`: lower-case; delete every ASCII punctuation character (``string.punctuation``:
  "15,140" → "15140", "3.5" → "35", "Jean-Luc" → "jeanluc"; curly quotes and other Unicode
  punctuation are kept); remove the articles a/an/the; collapse whitespace.
- ``em``: normalised prediction == normalised alias.
- ``f1``: token-level F1 between the two normalised strings (0 when they share no token, also when
  both are empty, as in v1.1).
- ``contained`` ("answer contained", ours): the normalised alias occurs as whole words inside the
  normalised prediction (small instruction models are verbose: "It was founded in 1873." contains "1873").
  Results written before this name was chosen call it ``accuracy`` (:data:`RENAMED_METRICS`).

Every mean comes with a seeded percentile-bootstrap 95% confidence interval (resamples of the
questions), per question type and in total (:func:`summarize`).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from hyper_prag.errors import HyperPragError

METRICS: tuple[str, ...] = ("f1", "em", "contained")  # one name each in JSON, Markdown and W&B
RENAMED_METRICS: dict[str, str] = {"accuracy": "contained"}  # old name -> name, for results files read back
TOTAL = "total"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lower case, no ASCII punctuation, no articles, single spaces.

    Args:
        text: a prediction or an answer alias.

    Returns:
        The normalised string.
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def f1_score(prediction: str, ground_truth: str) -> float:
    """The official SQuAD v1.1 token F1 of two strings (normalised here)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    overlap = sum((Counter(pred) & Counter(gold)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, ground_truth: str) -> float:
    """The official SQuAD v1.1 exact match of two strings (normalised here)."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def score(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """Scores one prediction against all accepted aliases (max over aliases for every metric).

    Args:
        prediction: the generated answer.
        answers: accepted aliases (non-empty).

    Returns:
        ``{"em": 0|1, "f1": [0, 1], "contained": 0|1}``.
    """
    if not answers:
        raise HyperPragError("a question has no accepted answers; every question needs at least one.")
    padded = f" {normalize_answer(prediction)} "
    return {
        "em": max(exact_match(prediction, a) for a in answers),
        "f1": max(f1_score(prediction, a) for a in answers),
        "contained": float(any(g and f" {g} " in padded for g in map(normalize_answer, answers))),
    }


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Mean with a percentile-bootstrap confidence interval (resampling questions with replacement).

    Args:
        values: one score per question.
        n_resamples: bootstrap resamples.
        seed: RNG seed (same seed, same interval).
        level: confidence level.

    Returns:
        ``(mean, low, high)``; NaNs for no values.
    """
    x = np.asarray(values, dtype=np.float64)  # (n,)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))  # (B, n)
    means = x[idx].mean(axis=1)  # (B,)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (float(x.mean()), float(low), float(high))


def summarize(per_question: list[dict[str, float]], types: list[str], all_types: list[str],
              n_resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and bootstrap CI of every metric, per question type and over all questions (``"total"``).

    Args:
        per_question: :func:`score` of each question.
        types: each question's type.
        all_types: the types to report (sorted), even if some have no question here.
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        type | ``"total"`` -> metric -> ``{"mean", "low", "high", "n"}``.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for group in [*all_types, TOTAL]:
        rows = [s for s, t in zip(per_question, types) if group in (TOTAL, t)]
        out[group] = {}
        for metric in METRICS:
            mean, low, high = bootstrap_ci([r[metric] for r in rows], n_resamples, seed)
            out[group][metric] = {"mean": mean, "low": low, "high": high, "n": len(rows)}
    return out
