"""The injector: apply LoRAs to the FFN linears of a Hugging Face causal LM, and restore it after.

Small and ours because of two needs: gradients must flow through the frozen LLM into LoRA tensors
that a hypernetwork has just *generated* (outputs of another network, not parameters of an adapter
layer), and many documents must train in one step, each under its own LoRA of one batched bank.
PEFT stays the interchange format (:mod:`hyper_prag.lora`) and the reference per-document trainer
(:mod:`hyper_prag.encoders.peft_reference`). Three modes:

``side``     one LoRA as an unmerged side path: y = W x + s · B (A x). Differentiable in A, B.
``batched``  a batch of N LoRAs; sample n of the input uses LoRA n:
             y[n] = W x[n] + s · B[n] (A[n] x[n]). This is what trains many documents in one step
             and lets a hypernetwork backpropagate through the LLM into the weights it generated.
``merged``   W ← W + s · B A in place (fast generation, no per-token overhead); restored exactly on
             exit from a saved copy of the touched weights (or by subtraction with ``restore="subtract"``).

Side paths are forward hooks on the ``nn.Linear`` modules; the model's own modules are never
replaced. :func:`injected` is a context manager that removes the hooks / restores the weights on
exit, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from hyper_prag.errors import HyperPragError
from hyper_prag.lora import Lora, check_base_model
from hyper_prag.model import BaseModel

InjectMode = Literal["side", "batched", "merged"]


def _side_hook(A: Tensor, B: Tensor, scaling: float, batched: bool):
    """Returns a forward hook adding s · B (A x) to a linear's output.

    A: (r, d_in) or (N, r, d_in); B: (d_out, r) or (N, d_out, r).
    """

    def hook(module: nn.Linear, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = args[0]  # (N, T, d_in) or (T, d_in)
        if batched:
            if x.dim() != 3 or x.shape[0] != A.shape[0]:
                raise HyperPragError(
                    f"batched injection holds {A.shape[0]} LoRAs but the input batch has shape {tuple(x.shape)}; "
                    "pass exactly one LoRA per sample."
                )
            h = x @ A.transpose(-1, -2)  # (N, T, d_in) @ (N, d_in, r) -> (N, T, r)
            return output + scaling * (h @ B.transpose(-1, -2))  # (N, T, r) @ (N, r, d_out) -> (N, T, d_out)
        h = x @ A.transpose(-1, -2)  # (..., T, r)
        return output + scaling * (h @ B.transpose(-1, -2))  # (..., T, d_out)

    return hook


def _prepare(base: BaseModel, lora: Lora, mode: InjectMode) -> Lora:
    check_base_model(lora, base.identity)
    lora.validate(dims={m: base.module_dims(m) for m in lora.spec.target_modules})
    if mode == "batched" and lora.batch_size is None:
        raise HyperPragError("mode='batched' needs a batch of LoRAs (A: (N, L, r, d_in)); stack() them first.")
    if mode != "batched" and lora.batch_size is not None:
        raise HyperPragError(f"mode='{mode}' takes one LoRA; combine() the batch first or use mode='batched'.")
    dtype, device = next(base.model.parameters()).dtype, base.device
    return lora.to(device=device, dtype=dtype)  # a no-op (same tensors, grads kept) when already matching


@contextmanager
def injected(
    base: BaseModel, lora: Lora, mode: InjectMode = "side", restore: Literal["copy", "subtract"] = "copy"
) -> Iterator[BaseModel]:
    """Applies ``lora`` to ``base`` for the duration of a ``with`` block, then restores the model.

    Args:
        base: the base model; ``lora`` must have been made for it (same identity).
        lora: one LoRA (``side``, ``merged``) or a batch of N (``batched``).
        mode: see the module docstring.
        restore: for ``merged``, ``"copy"`` puts back saved weights bit-for-bit; ``"subtract"``
            saves no copy (less memory) and subtracts ΔW (exact up to float rounding).

    Yields:
        ``base``, with the LoRA applied.

    Raises:
        HyperPragError: wrong base model, shapes, non-finite weights, or mode/batch mismatch.
    """
    lora = _prepare(base, lora, mode)
    spec = lora.spec
    if mode == "merged":
        with torch.no_grad():
            deltas = {m: lora.delta(m) for m in spec.target_modules}  # m -> (L, d_out, d_in)
            if not all(torch.isfinite(d).all() for d in deltas.values()):
                raise HyperPragError("Refusing to merge a LoRA with non-finite (NaN/inf) weights; re-encode it.")
            saved: list[tuple[Tensor, Tensor | None, Tensor]] = []
            try:
                for m, delta in deltas.items():
                    for i, layer in enumerate(spec.layers):
                        weight = base.ffn_linear(layer, m).weight  # (d_out, d_in)
                        saved.append((weight, weight.detach().clone() if restore == "copy" else None, delta[i]))
                        weight.add_(delta[i])
                yield base
            finally:
                for weight, original, delta in saved:
                    weight.copy_(original) if original is not None else weight.sub_(delta)
        return
    handles = []
    try:
        for m in spec.target_modules:
            for i, layer in enumerate(spec.layers):
                A, B = lora.A[m][..., i, :, :], lora.B[m][..., i, :, :]  # (N?, r, d_in), (N?, d_out, r)
                hook = _side_hook(A, B, spec.scaling, batched=mode == "batched")
                handles.append(base.ffn_linear(layer, m).register_forward_hook(hook))
        yield base
    finally:
        for handle in handles:
            handle.remove()
