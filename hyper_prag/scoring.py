"""Scoring answers: SQuAD-style EM / F1 / answer-contained, and bootstrap confidence intervals.

Scoring (max over all accepted answer aliases):

- ``normalize_answer``: lower-case; drop thousands separators *inside numbers* ("15,140" → "15140",
  so it matches "15140" and "15,140"; the PRAG reference code splits at the comma and keeps "15");
  other punctuation between digits separates two numbers ("3,4", "1990-1995"); delete the remaining
  punctuation except a decimal point between digits; remove the articles a/an/the; collapse whitespace.
- ``em``: normalised prediction == normalised alias.
- ``f1``: token-level F1 between the two normalised strings.
- ``accuracy`` ("contains"): the normalised alias occurs as whole words inside the normalised
  prediction (small instruction models are verbose: "It was founded in 1873." contains "1873").

Every mean comes with a seeded percentile-bootstrap 95% confidence interval (resamples of the
questions), per question type and in total (:func:`summarize`).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np

from hyper_prag.errors import HyperPragError

METRICS: tuple[str, ...] = ("f1", "em", "accuracy")
TOTAL = "total"

_NUMBER_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")  # thousands separator: 15,140 / 1,000,000
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_DIGIT_SEPARATOR = re.compile(r"(?<=\d)[^\w\s.](?=\d)")  # "3,4" / "1990-1995": two numbers, not one
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_KEEP = "\x00"  # placeholder protecting decimal points while punctuation is deleted


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation that keeps numbers whole (see the module docstring).

    Args:
        text: a prediction or an answer alias.

    Returns:
        The normalised string (lower case, single spaces).
    """
    text = text.lower()
    text = _NUMBER_COMMA.sub("", text)
    text = _DIGIT_SEPARATOR.sub(" ", text)
    text = _DECIMAL_POINT.sub(_KEEP, text)
    text = "".join(ch for ch in text if not _is_punctuation(ch)).replace(_KEEP, ".")
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _f1(prediction: str, alias: str) -> float:
    pred, gold = prediction.split(), alias.split()
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """Scores one prediction against all accepted aliases (max over aliases for every metric).

    Args:
        prediction: the generated answer.
        answers: accepted aliases (non-empty).

    Returns:
        ``{"em": 0|1, "f1": [0, 1], "accuracy": 0|1}``.
    """
    if not answers:
        raise HyperPragError("a question has no accepted answers; every question needs at least one.")
    pred = normalize_answer(prediction)
    golds = [normalize_answer(a) for a in answers]
    padded = f" {pred} "
    return {
        "em": float(any(pred == g for g in golds)),
        "f1": max(_f1(pred, g) for g in golds),
        "accuracy": float(any(g and f" {g} " in padded for g in golds)),
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
