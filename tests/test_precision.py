"""Per-document training on half-precision models: LoRA factors and optimizer state stay float32."""

from __future__ import annotations

import pytest
import torch

from hyper_prag.augment import AugmentedDocument
from hyper_prag.encoders.per_doc import PerDocConfig, PerDocEncoder
from hyper_prag.lora import LoraSpec
from hyper_prag.model import tiny_base_model

DOC = AugmentedDocument("d", "Varnholt was founded by Tessa Lind in 1902.",
                        qa=(("Who founded Varnholt?", "Tessa Lind"), ("When was Varnholt founded?", "1902")))


def train(dtype: str):
    base = tiny_base_model(seed=3, dtype=dtype)
    (lora,) = PerDocEncoder(base, LoraSpec(), PerDocConfig(lr=1e-3, epochs=2)).encode([DOC])
    return lora


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_training_gives_finite_float32_loras_close_to_float32(dtype):
    reference, half = train("float32"), train(dtype)
    for m in reference.spec.target_modules:
        assert half.A[m].dtype == half.B[m].dtype == torch.float32
        assert torch.isfinite(half.A[m]).all() and torch.isfinite(half.B[m]).all()
        ours, ref = half.B[m] @ half.A[m], reference.B[m] @ reference.A[m]  # (L, d_out, d_in) ΔW / scaling
        relative = float((ours - ref).norm() / ref.norm())  # measured: bf16 ≤ 0.04, fp16 ≤ 0.002
        assert ref.norm() > 0 and relative <= 0.1, (m, relative)
