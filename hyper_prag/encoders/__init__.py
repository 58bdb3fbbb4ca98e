"""Encoders: the ways a document becomes a LoRA, all behind one :class:`Encoder` protocol.

* :mod:`~hyper_prag.encoders.per_doc`: the paper's f_φ (§3.2), one LoRA trained per document on its
  augmented data, many documents in one batched bank;
* :mod:`~hyper_prag.encoders.hypernet`: the amortized encoder, a trained hypernetwork (network in
  :mod:`hyper_prag.hypernet`) that generates a document's LoRA in one forward pass, and its checkpoint files;
* :mod:`~hyper_prag.encoders.refine`: the hypernetwork's LoRA refined by k steps of the per-document
  objective (k = 0: the generated LoRA itself), the knob between the two encoders above;
* :mod:`~hyper_prag.encoders.peft_reference`: the paper's sequential per-document loop on PEFT, the
  reference the batched trainer is checked and timed against (not an :class:`Encoder` itself).

Every encoder emits the same :class:`~hyper_prag.lora.Lora` contract for one base model, so the store,
``combine`` and the injector never know which encoder made a LoRA; its :meth:`Encoder.settings` enter
the store key, so another encoder or setting is another key.

Long documents: an encoder reads at most a window of tokens at once (per-document: its training
sequence length; hypernetwork: the tokens it reads). A longer document is cut into consecutive pieces
of at most that many tokens (:func:`split_text`, at token boundaries, no character lost), each piece is
encoded, and the pieces' LoRAs are summed (:func:`hyper_prag.combine.combine`, rank concatenation), as
the online path sums the LoRAs of several documents. No text is dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from hyper_prag.errors import HyperPragError
from hyper_prag.lora import Lora

if TYPE_CHECKING:
    from hyper_prag.augment import AugmentedDocument
    from hyper_prag.model import BaseModel


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


def split_text(base: "BaseModel", text: str, window: int) -> list[str]:
    """Cuts ``text`` into consecutive pieces of at most ``window`` tokens (one piece if it fits).

    Args:
        base: the base model (its tokenizer counts the tokens).
        text: the document text.
        window: tokens per piece (≥ 1).

    Returns:
        The pieces; joined they give ``text`` back exactly (cuts fall on token starts).
    """
    if window < 1:
        raise HyperPragError(f"an encoder window must hold at least one token, got {window}.")
    enc = base.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]  # [(start, end)] per token
    if len(offsets) <= window:
        return [text]
    cuts = [offsets[i][0] for i in range(window, len(offsets), window)]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


__all__ = ["Encoder", "split_text"]
