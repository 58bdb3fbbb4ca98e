"""LoRA sources: where the online path gets one LoRA per retrieved document.

- :class:`StoreSource`: per-document LoRAs read from the LoRA store, by the keys of the
  :class:`~hyper_prag.recipes.Recipe` that ``encode`` recorded (reading only: nothing is trained).
- :class:`HypernetSource`: LoRAs generated on the fly by a hypernetwork, one batched forward per call.
- :class:`WrongDocSource`: the control, another document's LoRA from either of them.

Both implement :class:`hyper_prag.methods.LoraSource`; the pipeline does not know which it holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hyper_prag.corpus import Document
from hyper_prag.errors import HyperPragError
from hyper_prag.lora import Lora
from hyper_prag.model import BaseModel
from hyper_prag.recipes import Recipe

if TYPE_CHECKING:
    from hyper_prag.encoders.hypernet import HypernetEncoder
    from hyper_prag.hypernet import Hypernet
    from hyper_prag.methods import LoraSource
    from hyper_prag.store import LoraStore


class StoreSource:
    """Per-document LoRAs read from a :class:`~hyper_prag.store.LoraStore` under one recipe's keys."""

    name = "store"

    def __init__(self, store: "LoraStore", recipe: Recipe,
                 doc_qa: Mapping[str, Sequence[Sequence[str]]] | None = None) -> None:
        """
        Args:
            store: the LoRA store.
            recipe: the recipe the LoRAs were encoded with (its base model is checked on every read).
            doc_qa: the corpus's question-answer pairs per document id (``Corpus.doc_qa``): with templated
                augmentation their content is part of each key.
        """
        self.store, self.recipe, self.doc_qa = store, recipe, dict(doc_qa or {})

    @property
    def base_model(self) -> str:
        return self.recipe.base_identity

    @property
    def apply_from(self) -> str:
        """Where these LoRAs act: as their encoder trained them (``all`` for per-document LoRAs)."""
        return str(self.recipe.settings.get("apply_from", "all"))

    def names(self, documents: Sequence[Document]) -> list[str]:
        return [self.recipe.key(doc.text, self.doc_qa.get(doc.id)) for doc in documents]

    def loras(self, documents: Sequence[Document]) -> list[Lora]:
        keys = self.names(documents)
        missing = set(self.store.missing(keys))
        if missing:
            ids = [doc.id for doc, key in zip(documents, keys) if key in missing]
            raise HyperPragError(
                f"{len(ids)} retrieved documents have no LoRA in the store {self.store.root} (e.g. {ids[:3]}): "
                f"encode them first with `hyper-prag encode` using recipe {self.recipe.id}'s settings, or let "
                "`hyper-prag evaluate` encode them."
            )
        return self.store.get_many(keys, base_model=self.base_model)


class HypernetSource:
    """LoRAs generated on the fly by a hypernetwork (one batched forward per call; no store)."""

    name = "hypernet"

    def __init__(self, encoder: "HypernetEncoder") -> None:
        """
        Args:
            encoder: a :class:`~hyper_prag.hypernet.HypernetEncoder` (hypernetwork + base model).
        """
        self.encoder = encoder

    @classmethod
    def from_hypernet(cls, hypernet: "Hypernet", base: BaseModel) -> "HypernetSource":
        """A source around an in-memory hypernetwork (e.g. one being trained)."""
        from hyper_prag.encoders.hypernet import HypernetEncoder

        return cls(HypernetEncoder(hypernet, base, checkpoint_sha256="in-memory"))

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, base: BaseModel) -> "HypernetSource":
        from hyper_prag.encoders.hypernet import HypernetEncoder

        return cls(HypernetEncoder.from_checkpoint(checkpoint, base))

    @property
    def apply_from(self) -> str:
        """Where these LoRAs act: as the hypernet was trained (its checkpoint records it)."""
        return self.encoder.hypernet.config.apply_from

    def names(self, documents: Sequence[Document]) -> list[str]:
        return [f"hypernet:{doc.id}" for doc in documents]

    def loras(self, documents: Sequence[Document]) -> list[Lora]:
        return self.encoder.generate([doc.text for doc in documents])


def wrong_partners(documents: Sequence[Document]) -> dict[str, Document]:
    """The fixed partner of each document for the wrong-document control: the one half-way round the
    documents sorted by id, never the document itself.

    Raises:
        HyperPragError: fewer than two documents.
    """
    by_id = {doc.id: doc for doc in documents}
    ids = sorted(by_id)
    if len(ids) < 2:
        raise HyperPragError(f"the wrong-document control needs at least 2 documents, got {len(ids)}.")
    shift = len(ids) // 2
    return {ids[i]: by_id[ids[(i + shift) % len(ids)]] for i in range(len(ids))}


class WrongDocSource:
    """The control that can fail: each document's LoRA replaced by another document's, from the same source
    (:func:`wrong_partners`). A method that scores as well under these LoRAs as under the right ones carries
    no document content: it helps through the format of answering, or not at all."""

    def __init__(self, source: "LoraSource", documents: Sequence[Document]) -> None:
        """
        Args:
            source: where the right LoRAs come from.
            documents: the documents partners are drawn from (the retrieval corpus; at least two).
        """
        self.source = source
        self.name = f"{source.name}-wrong-doc"
        self._partner = wrong_partners(documents)

    @property
    def apply_from(self) -> str:
        return getattr(self.source, "apply_from", "all")

    def partners(self, documents: Sequence[Document]) -> list[Document]:
        """The document whose LoRA stands in for each of ``documents``."""
        missing = [doc.id for doc in documents if doc.id not in self._partner]
        if missing:
            raise HyperPragError(f"documents {missing[:3]} are not among the wrong-document control's documents.")
        return [self._partner[doc.id] for doc in documents]

    def names(self, documents: Sequence[Document]) -> list[str]:
        return self.source.names(self.partners(documents))

    def loras(self, documents: Sequence[Document]) -> list[Lora]:
        return self.source.loras(self.partners(documents))
