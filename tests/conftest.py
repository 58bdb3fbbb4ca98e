"""Shared fixtures: a tiny random Llama built in code (no downloads) and helpers to make LoRAs."""

from __future__ import annotations

import pytest
import torch

from hyper_prag.lora import Lora, LoraSpec, init_lora
from hyper_prag.model import BaseModel, tiny_base_model


@pytest.fixture(scope="session")
def tiny() -> BaseModel:
    """A 2-layer, width-64 random Llama with the SmolLM2 tokenizer (identity differs per seed)."""
    return tiny_base_model(seed=0)


def random_lora(base: BaseModel, seed: int, rank: int = 2, alpha: float = 32.0, batch: int | None = None) -> Lora:
    """A LoRA with non-zero random A and B (init_lora leaves B = 0), bound to ``base``."""
    spec = LoraSpec(rank=rank, alpha=alpha).for_model(base)
    gen = torch.Generator().manual_seed(seed)
    lora = init_lora(spec, {m: base.module_dims(m) for m in spec.target_modules}, batch=batch, generator=gen)
    for b in lora.B.values():
        b.normal_(0.0, 0.02, generator=gen)
    return lora


@pytest.fixture
def make_lora():
    return random_lora


def token_batch(base: BaseModel, texts: list[str]) -> dict[str, torch.Tensor]:
    base.tokenizer.padding_side = "right"
    return base.tokenizer(texts, return_tensors="pt", padding=True)
