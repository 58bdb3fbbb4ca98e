"""The injector: apply LoRAs to the linears of a Hugging Face causal LM's decoder layers (FFN or attention, found
through :meth:`~hyper_prag.model.BaseModel.linear`), and restore it after.

Small and ours because of two needs: gradients must flow through the frozen LLM into LoRA tensors
that a hypernetwork has just *generated* (outputs of another network, not parameters of an adapter
layer), and many documents must train in one step, each under its own LoRA of one batched bank.
PEFT stays the interchange format (:mod:`hyper_prag.lora`) and the reference per-document trainer
(:mod:`hyper_prag.encoders.peft_reference`). Three modes:

``side``     one LoRA as an unmerged side path: y = W x + s · B (A x). Differentiable in A, B.
``batched``  a batch of N LoRAs; sample n of the input uses LoRA n:
             y[n] = W x[n] + s · B[n] (A[n] x[n]). This is what trains many documents in one step
             and lets a hypernetwork backpropagate through the LLM into the weights it generated.
``merged``   W ← W + s · B A in place (fast generation, no per-token overhead), one layer at a time:
             only one layer's ΔW exists at once. Restored bit-exactly on exit (see ``restore``).

Side paths are forward hooks on the ``nn.Linear`` modules; the model's own modules are never
replaced. :func:`injected` is a context manager that removes the hooks / restores the weights on
exit, also when the body raises.

**Restoring merged weights.** ``restore="subtract"`` (the default) keeps no copy of the weights:
while merging a layer it computes W' = W + ΔW and checks W' - ΔW against W; the few elements
where float rounding makes the subtraction inexact (about 0.2–7 % of them, growing with |ΔW|/|W|)
are saved as (index, original value), or the weight is copied where that is smaller (a ΔW much
larger than W). On exit it recomputes ΔW from the same A, B, subtracts, puts those elements back,
and checks a checksum of the weight, so the restore is bit-exact. Extra memory: about two layers'
worth of temporaries plus the saved elements. ``restore="copy"`` saves a copy of every touched
weight instead: as much memory as the adapted weights themselves, but merging and restoring take
about half the time. :func:`merge_memory` measures both.

**Precision.** LoRA tensors stay float32 whatever the model's dtype: side paths cast A and B to the
activations' dtype at the hook, and merging computes W + ΔW in float32 before rounding to the
weight's dtype.

**Threads.** Every model has one re-entrant lock, held for the whole ``with`` block (apply, the
caller's forward or generate, restore). Threads that inject into the same model therefore take
turns and never see each other's LoRAs, and the weights are always restored. A thread that runs the
model without a LoRA while others inject should hold :func:`exclusive` around its call. Gradients
through a side path should be computed inside the block, where the weights cannot change.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from hyper_prag.activated import ACTIVE
from hyper_prag.errors import HyperPragError
from hyper_prag.lora import Lora, check_base_model
from hyper_prag.model import BaseModel

InjectMode = Literal["side", "batched", "merged"]
RestoreMode = Literal["copy", "subtract"]

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(base: BaseModel) -> threading.RLock:
    """Returns the re-entrant lock of ``base``'s underlying model (one per ``nn.Module``, made on first use)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(base.model)
        if lock is None:
            lock = _LOCKS[base.model] = threading.RLock()
        return lock


@contextmanager
def exclusive(base: BaseModel) -> Iterator[BaseModel]:
    """Holds ``base`` for a plain (LoRA-free) forward or generate while other threads inject into it."""
    with model_lock(base):
        yield base


@contextmanager
def layers_cut(base: BaseModel, keep: slice) -> Iterator[nn.ModuleList]:
    """Runs ``base``'s decoder on ``layers[keep]`` alone (e.g. ``slice(0, n)``: stop after layer n − 1), holding
    the model's lock so another thread never sees the shortened model; the full list is restored after.

    Yields:
        The full layer list (hooks registered on its layers see the cut model's forward).
    """
    decoder = base.model.model
    with model_lock(base):
        full = decoder.layers
        decoder.layers = full[keep]
        try:
            yield full
        finally:
            decoder.layers = full


def _side_hook(A: Tensor, B: Tensor, scaling: float, batched: bool, active_from: int = 0):
    """Returns a forward hook adding s · B (A x) to a linear's output (at positions ≥ ``active_from`` only).

    A: (r, d_in) or (N, r, d_in); B: (d_out, r) or (N, d_out, r).
    """

    def hook(module: nn.Linear, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = args[0]  # (N, T, d_in) or (T, d_in)
        if active_from:
            # Activated LoRA in one full forward: the positions before active_from see no ΔW (their input is zeroed
            # on the side path only), as if they had been read by the base model into a KV cache.
            keep = torch.arange(x.shape[-2], device=x.device) >= active_from  # (T,)
            x = x * keep[:, None].to(x.dtype)
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
    if any(not 0 <= layer < base.num_layers for layer in lora.spec.layers):
        raise HyperPragError(f"LoRA layers {list(lora.spec.layers)} lie outside the model's {base.num_layers} layers.")
    if mode == "batched" and lora.batch_size is None:
        raise HyperPragError("mode='batched' needs a batch of LoRAs (A: (N, L, r, d_in)); stack() them first.")
    if mode != "batched" and lora.batch_size is not None:
        raise HyperPragError(f"mode='{mode}' takes one LoRA; combine() the batch first or use mode='batched'.")
    if mode not in ("side", "batched", "merged"):
        raise HyperPragError(f"unknown injection mode {mode!r}; use 'side', 'batched' or 'merged'.")
    # The edge: side paths run in the activations' dtype; merging computes ΔW in float32.
    dtype = torch.float32 if mode == "merged" else base.dtype
    return lora.to(device=base.device, dtype=dtype)  # a no-op (same tensors, grads kept) when already matching


# ------------------------------------------------------------------------------------- merged mode

@dataclass
class MergeMemory:
    """Bytes a merged injection holds beyond the model, as counted by the injector (see :func:`merge_memory`)."""

    restore: str  # "copy" | "subtract"
    peak_extra_bytes: int  # most bytes held at any moment while merging, inside the block, and restoring
    kept_bytes: int  # bytes kept for the whole block (weight copies, or saved inexact elements)
    layer_delta_bytes: int  # one layer's ΔW of the largest target module (float32)
    all_deltas_bytes: int  # every layer's ΔW at once: what a merge that materialises them all would hold
    touched_weight_bytes: int  # bytes of the weights the LoRA touches
    inexact_fraction: float  # for "subtract": share of touched elements whose subtraction is inexact
    device_peak_bytes: int | None = None  # CUDA only: torch.cuda.max_memory_allocated over the merge, minus before


class _Meter:
    """Counts the bytes of tensors the merge holds, to report its peak."""

    def __init__(self) -> None:
        self.live = self.peak = self.kept = 0

    def hold(self, *tensors: Tensor, kept: bool = False) -> None:
        n = sum(t.numel() * t.element_size() for t in tensors)
        self.live += n
        self.kept += n if kept else 0
        self.peak = max(self.peak, self.live)

    def drop(self, *tensors: Tensor) -> None:
        self.live -= sum(t.numel() * t.element_size() for t in tensors)


def _checksum(weight: Tensor) -> Tensor:
    """Order-free checksum of a weight's bits: the exact int64 sum of its elements read as integers.

    Any single changed element changes it, on any device and thread count.
    """
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[weight.element_size()]
    return weight.detach().reshape(-1).view(ints).sum(dtype=torch.int64)


class _Merge:
    """Merges one LoRA into the weights layer by layer, then restores them bit-exactly.

    Arithmetic is float32 whatever the weight's dtype (``delta + weight`` promotes), rounded once to
    the weight's dtype; restoring repeats exactly the operations that the merge-time check ran.
    """

    def __init__(self, base: BaseModel, lora: Lora, restore: RestoreMode) -> None:
        if restore not in ("copy", "subtract"):
            raise HyperPragError(f"unknown restore mode {restore!r}; use 'subtract' or 'copy'.")
        self.base, self.lora, self.restore, self.meter = base, lora, restore, _Meter()
        # (module, row i of the L axis, weight, its copy or (flat index, original values, checksum))
        self.saved: list[tuple[str, int, Tensor, Tensor | tuple[Tensor, Tensor, Tensor]]] = []
        self.inexact = self.touched = 0

    def _delta(self, module: str, i: int) -> Tensor:
        """ΔW of ``module`` for row i of the L axis, float32 (d_out, d_in); recomputed identically on restore."""
        lora = self.lora
        return torch.matmul(lora.B[module][i], lora.A[module][i]).mul_(lora.spec.scaling)  # (d_out, r) @ (r, d_in)

    def apply(self) -> None:
        spec, meter = self.lora.spec, self.meter
        if not all(torch.isfinite(t).all() for t in (*self.lora.A.values(), *self.lora.B.values())):
            raise HyperPragError("Refusing to merge a LoRA with non-finite (NaN/inf) weights; re-encode it.")
        for m in spec.target_modules:
            for i, layer in enumerate(spec.layers):
                weight = self.base.linear(layer, m).weight.detach()  # (d_out, d_in)
                low = weight.dtype != torch.float32
                delta = self._delta(m, i)  # (d_out, d_in) float32
                merged = delta + weight  # (d_out, d_in) float32
                meter.hold(delta, merged)
                if low:
                    merged_low = merged.to(weight.dtype)  # (d_out, d_in), rounded once
                    meter.hold(merged_low)
                    meter.drop(merged)
                    merged = merged_low
                if weight.dtype == torch.float16 and not torch.isfinite(merged).all():  # float16 overflows at 65504
                    raise HyperPragError(f"Refusing to merge: W + ΔW of {m} in layer {layer} is not finite in "
                                         f"{weight.dtype}; the LoRA is too large for this model.")
                if self.restore == "copy":
                    original: Tensor | tuple[Tensor, Tensor, Tensor] = weight.clone()
                    meter.hold(original, kept=True)
                else:
                    back = torch.sub(merged, delta, out=delta)  # what restoring computes, in delta's buffer
                    wrong = (back.to(weight.dtype) if low else back) != weight  # (d_out, d_in) bool
                    meter.hold(wrong, *((weight,) if low else ()))
                    index = wrong.reshape(-1).nonzero().squeeze(1)  # (k,) flat positions subtraction misses
                    if weight.numel() < 2**31:
                        index = index.to(torch.int32)  # half the bytes of int64 positions
                    meter.drop(wrong, *((weight,) if low else ()))
                    del back, wrong
                    self.inexact += index.numel()
                    if index.numel() * (index.element_size() + weight.element_size()) < weight.numel() * weight.element_size():
                        original = (index, weight.reshape(-1)[index], _checksum(weight))
                    else:  # ΔW dwarfs W here: a plain copy is smaller than the saved elements
                        original = weight.clone()
                    meter.hold(*((original,) if isinstance(original, Tensor) else original), kept=True)
                self.touched += weight.numel()
                self.saved.append((m, i, weight, original))
                weight.copy_(merged)
                meter.drop(merged, delta)
                del merged, delta

    def undo(self) -> None:
        failed = []
        while self.saved:
            m, i, weight, original = self.saved.pop()
            if isinstance(original, Tensor):
                weight.copy_(original)
                self.meter.drop(original)
                continue
            index, values, checksum = original
            delta = self._delta(m, i)  # (d_out, d_in), the same bits as when merging
            self.meter.hold(delta)
            if weight.dtype == torch.float32:
                weight.sub_(delta)
            else:
                restored = torch.sub(weight, delta, out=delta)  # float32, then rounded once like the check
                weight.copy_(restored)
            self.meter.drop(delta)
            del delta
            weight.reshape(-1)[index] = values
            self.meter.drop(*original)
            if not torch.equal(_checksum(weight), checksum):
                failed.append((m, self.lora.spec.layers[i]))
        if failed:
            raise HyperPragError(f"merged weights {failed} could not be restored bit-exactly (ΔW was not recomputed "
                                 "identically); reload the base model, and use injected(..., restore='copy').")


@contextmanager
def injected(
    base: BaseModel, lora: Lora, mode: InjectMode = "side", restore: RestoreMode = "subtract", active_from: int = 0
) -> Iterator[BaseModel]:
    """Applies ``lora`` to ``base`` for the duration of a ``with`` block, then restores the model.

    Holds the model's lock (:func:`model_lock`) for the whole block, so concurrent callers take
    turns: put the caller's forward or ``generate`` inside the block.

    Args:
        base: the base model; ``lora`` must have been made for it (same identity).
        lora: one LoRA (``side``, ``merged``) or a batch of N (``batched``), float32 or any dtype.
        mode: see the module docstring.
        restore: for ``merged``, how the weights are put back bit-exactly: ``"subtract"`` (no weight
            copies; see the module docstring) or ``"copy"`` (saves each touched weight).
        active_from: ``side``/``batched``: the LoRA acts only at positions ≥ this index of each forward (an
            activated LoRA in one full forward, :mod:`hyper_prag.activated`; 0: every position).

    Yields:
        ``base``, with the LoRA applied.

    Raises:
        HyperPragError: wrong base model, shapes, non-finite weights, or mode/batch mismatch.
    """
    with model_lock(base), _active(base):
        lora = _prepare(base, lora, mode)
        spec = lora.spec
        if active_from and mode == "merged":
            raise HyperPragError("a merged LoRA acts at every position; use mode='side' or 'batched' with active_from.")
        if mode == "merged":
            merge = _Merge(base, lora, restore)
            try:
                with torch.no_grad():
                    merge.apply()
                yield base
            finally:
                with torch.no_grad():
                    merge.undo()
            return
        handles = []
        try:
            for m in spec.target_modules:
                for i, layer in enumerate(spec.layers):
                    A, B = lora.A[m][..., i, :, :], lora.B[m][..., i, :, :]  # (N?, r, d_in), (N?, d_out, r)
                    hook = _side_hook(A, B, spec.scaling, batched=mode == "batched", active_from=active_from)
                    handles.append(base.linear(layer, m).register_forward_hook(hook))
            yield base
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def _active(base: BaseModel) -> Iterator[None]:
    """Marks ``base`` as holding a LoRA (a prompt head's KV cache must not be computed then)."""
    nested = base.model in ACTIVE
    ACTIVE.add(base.model)
    try:
        yield
    finally:
        if not nested:
            ACTIVE.discard(base.model)


def merge_memory(base: BaseModel, lora: Lora, restore: RestoreMode = "subtract") -> MergeMemory:
    """Merges ``lora`` into ``base`` and restores it, reporting the extra memory that took.

    The byte counts are those of the tensors the injector itself holds (exact by construction,
    on any device); on CUDA ``device_peak_bytes`` is also measured by the allocator.

    Args:
        base: the base model.
        lora: one LoRA made for it.
        restore: the restore strategy to measure.

    Returns:
        A :class:`MergeMemory`.
    """
    with model_lock(base):
        lora = _prepare(base, lora, "merged")
        spec = lora.spec
        cuda = base.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(base.device)
            before = torch.cuda.memory_allocated(base.device)
            torch.cuda.reset_peak_memory_stats(base.device)
        merge = _Merge(base, lora, restore)
        with torch.no_grad():
            try:
                merge.apply()
            finally:
                merge.undo()
        device_peak = torch.cuda.max_memory_allocated(base.device) - before if cuda else None
    deltas = {m: base.module_dims(m)[0] * base.module_dims(m)[1] * 4 for m in spec.target_modules}
    touched = sum(base.linear(layer, m).weight.numel() * base.linear(layer, m).weight.element_size()
                  for m in spec.target_modules for layer in spec.layers)
    return MergeMemory(
        restore=restore, peak_extra_bytes=merge.meter.peak, kept_bytes=merge.meter.kept,
        layer_delta_bytes=max(deltas.values()), all_deltas_bytes=sum(deltas.values()) * len(spec.layers),
        touched_weight_bytes=touched, inexact_fraction=merge.inexact / max(1, merge.touched),
        device_peak_bytes=device_peak,
    )
