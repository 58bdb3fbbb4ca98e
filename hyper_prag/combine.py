"""Combining the LoRAs of the k retrieved documents into one LoRA (a pure function).

With ΔW_i = s_i · B_i A_i (s_i = alpha_i / r_i), the modes compute:

``sum``   ΔW = Σ_i w_i ΔW_i with w_i = 1 (or the given weights). Done by *concatenating ranks*:
          A = [A_1; …; A_k] (Σr, d_in) and B = [w_1 s_1/s · B_1, …, w_k s_k/s · B_k] (d_out, Σr), so
          s · B A = Σ_i w_i s_i B_i A_i exactly. This is what the paper's code gets from PEFT's
          ``add_weighted_adapter(combination_type="cat")``.
``mean``  ΔW = (1/k) Σ_i ΔW_i: the same concatenation with w_i = 1/k (or normalised weights).

Averaging the A's and the B's separately is *not* offered: (ΣB_i)(ΣA_i)/k² contains the cross terms
B_i A_j and equals no mean of the ΔW_i.

The result keeps the first LoRA's scaling s: rank Σ r_i, alpha = s · Σ r_i.

:func:`pad_rank` writes the same ΔW at a larger rank (zero rows of A, zero columns of B), so LoRAs of
different ranks can be stacked into one batch (one generate call for questions whose documents have
LoRAs of different ranks).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, Sequence

import torch

from hyper_prag.errors import HyperPragError
from hyper_prag.lora import Lora

CombineMode = Literal["sum", "mean"]


def combine(loras: Sequence[Lora], mode: CombineMode = "sum", weights: Sequence[float] | None = None) -> Lora:
    """Merges k LoRAs made for the same base model, modules and layers into one LoRA.

    Args:
        loras: single (unbatched) LoRAs; ranks and alphas may differ.
        mode: ``"sum"`` (Σ w_i ΔW_i) or ``"mean"`` (Σ w_i ΔW_i / Σ w_i); see the module docstring.
        weights: optional per-LoRA weights w_i (default all 1).

    Returns:
        One LoRA of rank Σ r_i whose ΔW is the requested combination.
    """
    if not loras:
        raise HyperPragError("combine() needs at least one LoRA.")
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
    elif mode != "sum":
        raise HyperPragError(f"unknown combine mode {mode!r}; use 'sum' or 'mean'.")
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
