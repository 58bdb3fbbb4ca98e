"""Encoders: the ways a document becomes a LoRA, all behind one :class:`Encoder` protocol.

* :mod:`~hyper_prag.encoders.per_doc`: the paper's f_φ (§3.2), one LoRA trained per document on its
  augmented data, many documents in one batched bank;
* :mod:`~hyper_prag.encoders.hypernet`: the amortized encoder, a trained hypernetwork (network in
  :mod:`hyper_prag.hypernet`) that generates a document's LoRA in one forward pass, and its checkpoint files;
* :mod:`~hyper_prag.encoders.peft_reference`: the paper's sequential per-document loop on PEFT, the
  reference the batched trainer is checked and timed against (not an :class:`Encoder` itself).

Every encoder emits the same :class:`~hyper_prag.lora.Lora` contract for one base model, so the store,
``combine`` and the injector never know which encoder made a LoRA; its :meth:`Encoder.settings` enter
the store key, so another encoder or setting is another key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from hyper_prag.lora import Lora

if TYPE_CHECKING:
    from hyper_prag.augment import AugmentedDocument


class Encoder(Protocol):
    """Anything that maps documents to LoRAs for one base model."""

    name: str  # "per-doc" | "hypernet"
    uses_augmentation: bool  # per-doc: True; hypernet: False (reads the document text only)

    def settings(self) -> dict:
        """Encoder identity + settings; enters the store key (hypernet: checkpoint sha256)."""
        ...

    def encode(self, documents: Sequence["AugmentedDocument"]) -> list[Lora]:
        """One LoRA per document, for the encoder's base model."""
        ...


__all__ = ["Encoder"]
