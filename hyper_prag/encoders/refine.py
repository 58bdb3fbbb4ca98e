"""Hypernetwork initialisation + k steps of per-document training: the amortized LoRA, refined.

The hypernetwork gives every document a LoRA in one forward pass; the per-document trainer (paper §3.2)
gives a better one after many steps. In between, :class:`RefineEncoder` starts the per-document objective
from the generated LoRA and runs k steps of it::

    d ──► HypernetEncoder.generate ──► ΔW_0 = s B_0 A_0  (generated part ⊕ bias LoRA, rank r + r_b)
      ──► LoraBank(initial = ΔW_0) ──► k AdamW steps on d's augmented sequences [d^k ⊕ q ⊕ a] ──► ΔW_k

The generated factors are trained directly (no new rank): A and B of every rank-1 component, the bias part
included, start where the hypernetwork put them. A long document (several hypernet pieces, rank P·r + r_b)
is padded with zero rows of A and zero columns of B to the chunk's largest rank so one bank trains the
chunk; those stay exactly zero (their gradients are zero, and AdamW keeps a zero with a zero gradient at
zero) and are cut off again, so a document's LoRA does not depend on its chunk.

Step t of a document uses its augmented sequence t mod S (S = its number of sequences), the per-document
trainer's order. ``steps = 0`` returns the generated LoRAs unchanged, bit for bit. ``steps`` and the
hypernetwork's checkpoint sha256 are in :meth:`RefineEncoder.settings`, hence in the store key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from torch import Tensor

from hyper_prag.combine import pad_rank
from hyper_prag.encoders.hypernet import HypernetEncoder
from hyper_prag.encoders.per_doc import (FitBank, MetricsLogger, PerDocConfig, document_sequences, fit_steps,
                                        replay_sha256, train_bank)
from hyper_prag.errors import HyperPragError
from hyper_prag.lora import Lora, stack
from hyper_prag.model import BaseModel
from hyper_prag.prompts import format_id

if TYPE_CHECKING:
    from hyper_prag.augment import AugmentedDocument


class RefineEncoder:
    """Generated LoRA, then ``steps`` steps of per-document training from it. Implements
    :class:`hyper_prag.encoders.Encoder`."""

    name = "refine"

    def __init__(self, hypernet: HypernetEncoder, steps: int, config: PerDocConfig = PerDocConfig(),
                 fit: FitBank = fit_steps, logger: MetricsLogger | None = None) -> None:
        """
        Args:
            hypernet: the hypernetwork encoder that gives the starting LoRAs.
            steps: k, per-document steps from the generated LoRA (0: the generated LoRA itself).
            config: per-document trainer settings (``lr``, ``weight_decay``, ``loss_on``, ``max_length``; its
                ``init``, ``epochs`` and ``seed`` do not apply: the start is the generated LoRA, k sets the length).
            fit: the runner of each chunk's bank (the per-document trainer's; same LoRAs either way).
            logger: logger for per-step losses.
        """
        if steps < 0:
            raise HyperPragError(f"refine steps must be >= 0, got {steps}.")
        self.hypernet, self.steps, self.config = hypernet, steps, config
        self.base, self.spec = hypernet.base, hypernet.spec
        self.fit, self.logger = fit, logger
        self.uses_augmentation = steps > 0  # k = 0 reads the document text only, like the hypernet
        self.last_losses: list[Tensor] = []
        self.steps_done = 0

    def settings(self) -> dict:
        """Encoder identity: k, the trainer settings that apply, and the hypernet's (its checkpoint sha256)."""
        # Every trainer setting but the three that do not apply here, so a new one cannot be left out of the key
        # (those that appear only when changed from their defaults keep older keys valid).
        trainer = {k: v for k, v in self.config.settings().items() if k not in ("init", "epochs", "seed")}
        if self.config.replay:
            trainer["replay_sha256"] = replay_sha256(self.config.replay)
        return {"name": self.name, "steps": self.steps, "trainer": trainer if self.steps else {},
                "hypernet": self.hypernet.settings(), **({"prompt": format_id()} if self.steps else {})}

    def encode(self, documents: Sequence["AugmentedDocument"]) -> list[Lora]:
        """The generated LoRA of every document, refined by ``steps`` per-document steps on its augmented data.

        Args:
            documents: augmented documents (one chunk).

        Returns:
            One LoRA per document (float32, CPU), in order; rank and scaling as the hypernet's.
        """
        generated = self.hypernet.generate([doc.text for doc in documents])
        if self.steps == 0 or not documents:
            return generated
        loras, self.last_losses = train_steps(self.base, documents, generated, self.steps, self.config, self.fit,
                                              self.logger, self.steps_done)
        self.steps_done += len(self.last_losses)
        return loras


def train_steps(base: BaseModel, documents: Sequence["AugmentedDocument"], initial: Sequence[Lora], steps: int,
                config: PerDocConfig = PerDocConfig(), fit: FitBank = fit_steps, logger: MetricsLogger | None = None,
                step_offset: int = 0) -> tuple[list[Lora], list[Tensor]]:
    """Exactly ``steps`` per-document steps from the given starting LoRAs, all documents in one bank.

    What :class:`RefineEncoder` runs from the generated LoRAs; from ``per_doc.initial_loras(...).unbind()`` it is
    the "random init + k steps" baseline with the same schedule.

    Args:
        base: the frozen base model.
        documents: augmented documents.
        initial: one starting LoRA per document (single LoRAs; one scaling, ranks may differ).
        steps: k ≥ 1.
        config: per-document trainer settings (``lr``, ``weight_decay``, ``loss_on``, ``max_length``).
        fit: the bank's runner.
        logger: logger for per-step losses.
        step_offset: global step of the first step in that logger.

    Returns:
        ``(loras, losses)``: one LoRA per document (its own rank and spec, float32, CPU) and each step's losses.
    """
    sequences = []
    for aug in documents:
        own = document_sequences(base, aug, config)
        sequences.append([own[t % len(own)] for t in range(steps)])  # the first k of its schedule
    rank = max(lora.spec.rank for lora in initial)
    start = stack([pad_rank(lora, rank) for lora in initial])  # (N, …) rank = the chunk's largest
    trained, losses = train_bank(base, sequences, start, replace(config, epochs=1), fit=fit, logger=logger,
                                 step_offset=step_offset)
    out = []
    for lora, own in zip(trained.unbind(), initial):
        r = own.spec.rank  # padded components stayed zero: cut them off
        out.append(Lora(own.spec, {m: a[..., :r, :].detach().clone() for m, a in lora.A.items()},
                        {m: b[..., :r].detach().clone() for m, b in lora.B.items()}))
    return out, losses


__all__ = ["RefineEncoder", "train_steps"]
