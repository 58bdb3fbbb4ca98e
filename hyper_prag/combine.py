"""Combining the LoRAs of the k retrieved documents into one LoRA (a pure function).

With ΔW_i = s_i · B_i A_i (s_i = alpha_i / r_i), the modes compute:

``sum``   ΔW = Σ_i w_i ΔW_i with w_i = 1 (or the given weights). Done by *concatenating ranks*:
          A = [A_1; …; A_k] (Σr, d_in) and B = [w_1 s_1/s · B_1, …, w_k s_k/s · B_k] (d_out, Σr), so
          s · B A = Σ_i w_i s_i B_i A_i exactly. This is what the paper's code gets from PEFT's
          ``add_weighted_adapter(combination_type="cat")``.
``mean``  ΔW = (1/k) Σ_i ΔW_i: the same concatenation with w_i = 1/k (or normalised weights).
``softmax`` ΔW = Σ_i w_i ΔW_i with w = softmax of the documents' retrieval scores (:func:`softmax_weights`):
          a weighted mean that leans on the top-ranked document; without scores, equal weights (the mean).

Averaging the A's and the B's separately is *not* offered: (ΣB_i)(ΣA_i)/k² contains the cross terms
B_i A_j and equals no mean of the ΔW_i.

The result keeps the first LoRA's scaling s: rank Σ r_i, alpha = s · Σ r_i.

:func:`pad_rank` writes the same ΔW at a larger rank (zero rows of A, zero columns of B), so LoRAs of
different ranks can be stacked into one batch (one generate call for questions whose documents have
LoRAs of different ranks).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, Sequence, get_args

import torch

from hyper_prag.errors import HyperPragError
from hyper_prag.lora import Lora

# How a question's k LoRAs become one (see the module docstring). Measured by benchmarks/perdoc_recipe.py
# --interference: own document + 2 BM25 neighbours, lookup F1 sum 3.1, mean 2.1, softmax 14.6, own LoRA alone
# 25.7; so softmax is the default of the online path.
CombineMode = Literal["sum", "mean", "softmax"]
COMBINE_MODES: tuple[CombineMode, ...] = get_args(CombineMode)
DEFAULT_COMBINE: CombineMode = "softmax"


def check_combine_mode(mode: str) -> CombineMode:
    """Returns ``mode`` if it is a :data:`CombineMode`, else raises :class:`HyperPragError` listing them."""
    if mode not in COMBINE_MODES:
        raise HyperPragError(f"unknown combine mode {mode!r}; use one of {', '.join(COMBINE_MODES)}.")
    return mode  # type: ignore[return-value]


def combine(loras: Sequence[Lora], mode: CombineMode = "sum", weights: Sequence[float] | None = None,
            scores: Sequence[float] | None = None) -> Lora:
    """Merges k LoRAs made for the same base model, modules and layers into one LoRA.

    Args:
        loras: single (unbatched) LoRAs; ranks and alphas may differ.
        mode: ``"sum"`` (Σ w_i ΔW_i), ``"mean"`` (Σ w_i ΔW_i / Σ w_i) or ``"softmax"`` (Σ w_i ΔW_i with
            w = softmax(scores)); see the module docstring.
        weights: optional per-LoRA weights w_i (default all 1; not with ``"softmax"``, whose weights are the scores').
        scores: the LoRAs' retrieval scores, read by ``"softmax"`` only (``None`` or empty: equal weights).

    Returns:
        One LoRA of rank Σ r_i whose ΔW is the requested combination.
    """
    if not loras:
        raise HyperPragError("combine() needs at least one LoRA.")
    check_combine_mode(mode)
    if mode == "softmax":
        if weights is not None:
            raise HyperPragError("combine(mode='softmax') weighs the LoRAs by their scores; pass scores, not weights.")
        if scores and len(scores) != len(loras):
            raise HyperPragError(f"got {len(scores)} retrieval scores for {len(loras)} LoRAs.")
        weights = softmax_weights(scores) if scores else [1.0 / len(loras)] * len(loras)
        mode = "sum"
    first = loras[0].spec
    for lora in loras:
        if lora.batch_size is not None:
            raise HyperPragError("combine() takes single LoRAs; unbind() a batch first.")
        if (lora.spec.base_model, lora.spec.target_modules, lora.spec.layers) != (first.base_model, first.target_modules, first.layers):
            raise HyperPragError(
                "cannot combine LoRAs made for different base models, modules or layers: "
                f"{first} vs {lora.spec}; re-encode them with one encoder configuration."
            )
    w = [1.0] * len(loras) if weights is None else [float(x) for x in weights]
    if len(w) != len(loras):
        raise HyperPragError(f"got {len(w)} weights for {len(loras)} LoRAs.")
    if mode == "mean":
        total = sum(w)
        if total == 0:
            raise HyperPragError("mean of LoRAs with weights summing to 0 is undefined.")
        w = [x / total for x in w]
    scale = first.scaling
    rank = sum(lora.spec.rank for lora in loras)
    A = {m: torch.cat([lora.A[m] for lora in loras], dim=-2) for m in first.target_modules}  # (L, Σr, d_in)
    B = {
        m: torch.cat([lora.B[m] * (wi * lora.spec.scaling / scale) for lora, wi in zip(loras, w)], dim=-1)
        for m in first.target_modules
    }  # (L, d_out, Σr)
    return Lora(replace(first, rank=rank, alpha=scale * rank), A, B)


def pad_rank(lora: Lora, rank: int, scaling: float | None = None) -> Lora:
    """The same ΔW at rank ``rank`` ≥ its own (and, optionally, another scaling s'), so LoRAs stack.

    A gains zero rows and B zero columns; with ``scaling`` B is multiplied by s / s' so that
    s' · B' A' = s · B A.

    Args:
        lora: a single or batched LoRA.
        rank: the new rank.
        scaling: the new alpha / rank (``None``: keep the LoRA's own).

    Returns:
        ``lora`` itself if nothing changes, else the padded LoRA (the same ΔW).
    """
    extra = rank - lora.spec.rank
    if extra < 0:
        raise HyperPragError(f"pad_rank: cannot pad a rank-{lora.spec.rank} LoRA down to rank {rank}.")
    scaling = lora.spec.scaling if scaling is None else float(scaling)
    if extra == 0 and scaling == lora.spec.scaling:
        return lora
    factor = lora.spec.scaling / scaling
    A = {m: torch.cat([a, a.new_zeros(*a.shape[:-2], extra, a.shape[-1])], dim=-2) for m, a in lora.A.items()}  # (…, r', d_in)
    B = {m: torch.cat([b if factor == 1.0 else b * factor, b.new_zeros(*b.shape[:-1], extra)], dim=-1)
         for m, b in lora.B.items()}  # (…, d_out, r')
    return Lora(replace(lora.spec, rank=rank, alpha=scaling * rank), A, B)


# ------------------------------------------------------------------------ interference fixes for summed LoRAs
#
# Summing k documents' LoRAs (the paper's merge) adds k − 1 foreign updates to the one that holds the
# answer. The functions below are the remedies the per-document recipe study compares; each is a pure
# function of the LoRAs (and, for the weights, of the retrieval scores) and says what ΔW it returns.


def scale(lora: Lora, factor: float) -> Lora:
    """The LoRA whose update is ``factor · ΔW``: B is multiplied by ``factor``; A and the spec are unchanged.

    ``scale(combine(loras, "sum"), 1 / k)`` is the mean (1/k) Σ ΔW_i, exactly ``combine(loras, "mean")``;
    ``factor = 1 / √k`` keeps the Frobenius norm of a sum of k mutually orthogonal updates of equal norm
    equal to one of them.

    Args:
        lora: a single or batched LoRA.
        factor: the multiplier of ΔW.

    Returns:
        A new :class:`Lora` (the input is not modified).
    """
    return Lora(lora.spec, dict(lora.A), {m: b * float(factor) for m, b in lora.B.items()})


def softmax_weights(scores: Sequence[float], temperature: float = 1.0) -> list[float]:
    """Combination weights from retrieval scores: w_i = exp(s_i / τ) / Σ_j exp(s_j / τ) (they sum to 1).

    With ``combine(loras, "sum", softmax_weights(bm25_scores))`` (what ``combine(loras, "softmax", scores=bm25_scores)``
    does) the update is Σ w_i ΔW_i, a weighted mean that leans on the document the retriever ranks highest.

    Args:
        scores: one retrieval score per LoRA (e.g. BM25).
        temperature: τ > 0; large τ tends to the plain mean, small τ to the top document alone.

    Returns:
        The weights, in the order of ``scores``.
    """
    if not scores:
        raise HyperPragError("softmax_weights() needs at least one score.")
    if temperature <= 0:
        raise HyperPragError(f"softmax temperature must be positive, got {temperature}.")
    return torch.softmax(torch.tensor([float(s) for s in scores], dtype=torch.float64) / temperature, dim=0).tolist()


def delta_norms(lora: Lora) -> dict[str, torch.Tensor]:
    """The Frobenius norm ‖ΔW‖_F of every module and layer, computed without forming ΔW.

    ‖s · B A‖_F² = s² · tr(Aᵀ Bᵀ B A) = s² · Σ_ij (BᵀB)_ij (A Aᵀ)_ij, an r × r computation per layer.

    Args:
        lora: a single LoRA (A: (L, r, d_in), B: (L, d_out, r)) or a batch (N, L, …).

    Returns:
        ``module -> (L,)`` (or ``(N, L)``) norms, float32.
    """
    out = {}
    for m in lora.spec.target_modules:
        a, b = lora.A[m].float(), lora.B[m].float()
        gram_b = b.transpose(-1, -2) @ b  # (…, L, r, r)
        gram_a = a @ a.transpose(-1, -2)  # (…, L, r, r)
        squared = (gram_b * gram_a).sum(dim=(-1, -2)).clamp(min=0)  # (…, L)
        out[m] = abs(lora.spec.scaling) * squared.sqrt()
    return out


def combine_renormalized(loras: Sequence[Lora], weights: Sequence[float] | None = None,
                         target: Literal["max", "mean"] = "max") -> Lora:
    """Rank concatenation (Σ w_i ΔW_i) rescaled, per module and layer, to the norm of a single LoRA.

    For every module m and layer l the combined update is c_{m,l} · Σ_i w_i ΔW_i with
    c_{m,l} = t_{m,l} / ‖Σ_i w_i ΔW_i‖_F, where t_{m,l} is the largest (``target="max"``) or the mean
    (``"mean"``) of the single ‖ΔW_i‖_F. The direction of the sum is kept; its size is that of one
    document's update, so k documents no longer push the layer k times as far. A layer whose sum is zero
    stays zero.

    Args:
        loras: single LoRAs for the same base model, modules and layers (ranks may differ).
        weights: optional w_i (default all 1).
        target: which single-LoRA norm the combination takes.

    Returns:
        One LoRA of rank Σ r_i.
    """
    if target not in ("max", "mean"):
        raise HyperPragError(f"unknown renormalisation target {target!r}; use 'max' or 'mean'.")
    summed = combine(loras, "sum", weights)
    singles = [delta_norms(lora) for lora in loras]
    norms = delta_norms(summed)  # module -> (L,)
    B = {}
    for m, b in summed.B.items():
        stacked = torch.stack([s[m] for s in singles])  # (k, L)
        goal = stacked.amax(0) if target == "max" else stacked.mean(0)  # (L,)
        factor = torch.where(norms[m] > 0, goal / norms[m].clamp(min=torch.finfo(torch.float32).tiny),
                             torch.ones_like(goal))  # (L,)
        B[m] = b * factor.to(b.dtype)[:, None, None]  # (L, d_out, Σr) · (L, 1, 1)
    return Lora(summed.spec, summed.A, B)
