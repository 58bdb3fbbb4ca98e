"""What a method is: the answer record, the method and LoRA-source roles, and the table of methods.

Every method of the paper's comparison (§3.3, §4.1) answers through one online path; the static
ones differ only in whether they retrieve, what stands before the question, and where their LoRAs
come from::

    method          retrieval   context                       LoRAs
    closed-book     no          nothing                       none
    rag             top-k       the k documents               none
    da-rag          top-k       the k documents' augmented    none
                                text (rewrites + QA pairs)
    prag            top-k       nothing                       per-document LoRAs from the store
    hypernet        top-k       nothing                       hypernetwork LoRAs, generated on the fly
    prag-both       top-k       the k documents               store LoRAs      ("combine both")
    hypernet-both   top-k       the k documents               hypernet LoRAs   ("combine both")
    prag-wrong-doc, top-k       nothing                       another document's LoRAs (the control:
    hypernet-wrong-doc                                        hyper_prag.sources.WrongDocSource)
    flare           dynamic     the documents of each         none (optional: their LoRAs)
                                retrieval (hyper_prag.dynamic)
    dragin          dynamic     as flare                      none (optional: their LoRAs)

:data:`METHODS` is that table as data; :mod:`hyper_prag.pipeline` runs the static rows,
:mod:`hyper_prag.dynamic` the dynamic ones. This module imports nothing of the project but the
document type, so every layer above may use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from hyper_prag.errors import HyperPragError

if TYPE_CHECKING:
    from hyper_prag.corpus import Document
    from hyper_prag.lora import Lora

Context = Literal["none", "documents", "augmented"]  # what stands before the question
LoraKind = Literal["none", "store", "hypernet"]  # where the LoRAs come from
STAGES: tuple[str, ...] = ("retrieve", "lora", "apply", "generate")  # timed stages of answering


@dataclass(frozen=True)
class MethodSpec:
    """One row of the method table (see the module docstring)."""

    name: str
    retrieval: Literal["none", "top-k", "dynamic"]  # dynamic: FLARE / DRAGIN decide while generating
    context: Context
    lora: LoraKind  # dynamic methods: an optional source may be given; none is needed
    wrong_doc: bool = False  # the control: each retrieved document's LoRA is another document's

    @property
    def retrieves(self) -> bool:
        return self.retrieval != "none"

    @property
    def dynamic(self) -> bool:
        return self.retrieval == "dynamic"


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("closed-book", "none", "none", "none"),
    MethodSpec("rag", "top-k", "documents", "none"),
    MethodSpec("da-rag", "top-k", "augmented", "none"),
    MethodSpec("prag", "top-k", "none", "store"),
    MethodSpec("prag-wrong-doc", "top-k", "none", "store", wrong_doc=True),
    MethodSpec("prag-both", "top-k", "documents", "store"),
    MethodSpec("hypernet", "top-k", "none", "hypernet"),
    MethodSpec("hypernet-wrong-doc", "top-k", "none", "hypernet", wrong_doc=True),
    MethodSpec("hypernet-both", "top-k", "documents", "hypernet"),
    MethodSpec("flare", "dynamic", "documents", "none"),
    MethodSpec("dragin", "dynamic", "documents", "none"),
)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)  # every method, in the order tables list them


def method_spec(name: str) -> MethodSpec:
    """The table row of method ``name``; :class:`HyperPragError` naming the choices if unknown."""
    try:
        return METHODS[name]
    except KeyError:
        raise HyperPragError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}.") from None


def parse_methods(names: str | Sequence[str]) -> list[str]:
    """Method names from a comma-separated string or a list, checked against the table, order kept."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in items if n not in METHODS]
    if unknown or not items:
        raise HyperPragError(f"unknown methods {unknown or '(none given)'}; choose from {', '.join(METHOD_NAMES)}.")
    if len(set(items)) != len(items):
        raise HyperPragError(f"methods must be distinct, got {items}.")
    return items


@dataclass(frozen=True)
class Answer:
    """What one method answered to one question, and how."""

    question: str
    prediction: str
    doc_ids: tuple[str, ...] = ()  # retrieved documents, best first
    lora_names: tuple[str, ...] = ()  # applied LoRAs (store keys, or "hypernet:<doc id>")
    retrievals: int = 0  # retriever calls made for this question (FLARE/DRAGIN: several)
    timing: Mapping[str, float] = field(default_factory=dict)  # stage -> seconds (see STAGES)
    shared: int = 1  # batch stages were divided evenly over this many questions

    @property
    def seconds(self) -> float:
        return float(sum(self.timing.values()))


class Method(Protocol):
    """A way of answering questions (the harness compares these)."""

    name: str

    def answer(self, questions: Sequence[str]) -> list[Answer]:
        """One :class:`Answer` per question, in order."""
        ...


class Augmented(Protocol):
    """What DA-RAG reads of an augmented document (``hyper_prag.augment.AugmentedDocument``)."""

    doc_id: str

    @property
    def variants(self) -> tuple[str, ...]: ...

    qa: tuple[tuple[str, str], ...]


class LoraSource(Protocol):
    """Where the online path gets one LoRA per retrieved document (implementations: ``hyper_prag.sources``)."""

    name: str
    apply_from: str  # where its LoRAs act: "all" positions or from the "question" on (hyper_prag.activated)

    def loras(self, documents: Sequence["Document"]) -> list["Lora"]:
        """One single LoRA per document, made for the pipeline's base model."""
        ...

    def names(self, documents: Sequence["Document"]) -> list[str]:
        """A name per document's LoRA (store key, or hypernet + doc id) to report what was applied."""
        ...
