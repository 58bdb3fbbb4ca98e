"""The hypernetwork's training data: QA sequences over a corpus split, their doc embeddings and teacher top-k.

Each split (train, val; never test) becomes a list of :class:`QAItem`: the documents a QA sequence is asked
about, the tokenized sequence (``prompts.qa_sequence``: the closed-book question prompt and the answer), and,
when computed once up front, the context teacher's top-k log-probabilities at its answer tokens
(:class:`hyper_prag.teacher.TeacherCache`) and the hidden states entering the lowest adapted layer
(:func:`lower_states`). :func:`collate` pads a list of items into a :class:`HypernetBatch`.

Where the QA comes from: the corpus's ``doc_qa`` pairs (the fictional benchmark's templates, SQuAD's gold
train questions), the split's benchmark questions (``questions: true``; a split with no ``doc_qa`` at all,
such as SQuAD's val, uses them anyway), or self-augmentation with the LLM (``qa_source: llm``) for corpora
with none; the targets are the gold answers or the teacher's own greedy answers (``answers: teacher``).

With LoRAs on the upper layers only, the states entering the lowest adapted layer l0 do not depend on the
LoRA. :func:`lower_states` computes them once (no LoRA, layers < l0 only) and :func:`upper_labelled_logits`
runs layers l0 … L−1 from them: the same logits as the full forward, and a step skips the l0 lower layers.
:class:`LowerStateCache` keeps them on disk, one file per content hash of what they depend on
(:func:`lower_states_key`), so a resumed or repeated run reads them instead of running the lower layers again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from hyper_prag import activated
from hyper_prag.activated import ApplyFrom, HeadCache, head_cache, suffix_hidden
from hyper_prag.errors import HyperPragError
from hyper_prag.hypernet import EmbeddingCache, HypernetConfig, pad_states
from hyper_prag.inject import injected, layers_cut
from hyper_prag.io import atomic_file
from hyper_prag.lora import Lora, LoraSpec, stack
from hyper_prag.model import BaseModel, DtypeName, resolve_dtype
from hyper_prag.paths import cache_dir
from hyper_prag.prompts import fixed_head, qa_sequence
from hyper_prag.recipes import Recipe
from hyper_prag.sequences import IGNORE, LossOn, TokenSequence, check_after_head, labelled_positions, right_pad, tokenize
from hyper_prag.teacher import TeacherCache, TeacherQuery, TeacherTopK, teacher_answers

log = logging.getLogger(__name__)

REAL_CORPORA = ("squad", "hotpotqa")  # corpus names read from the data cache (hyper_prag.realdata.load_real)
_BASES: dict[tuple[str, str, str], BaseModel] = {}


def shared_base(model: str, device: str = "cpu", dtype: DtypeName = "float32") -> BaseModel:
    """Loads the base model once per process (the module and the datamodule share it; it is frozen).

    Args:
        model: ``tiny`` (random 2-layer test model), ``smollm2-135m-instruct`` or a model folder.
        device: torch device it is loaded on (training moves it to the trainer's device).
        dtype: its weights: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (bfloat16 when a CUDA GPU with
            native bf16 is present, else float32; :func:`hyper_prag.model.resolve_dtype`).
    """
    dtype = str(resolve_dtype(dtype, "auto")).removeprefix("torch.")  # auto: for the GPU training will move it to
    key = (model, device, dtype)
    if key not in _BASES:
        from hyper_prag.model import load_base_model, tiny_base_model

        _BASES[key] = (tiny_base_model(device=device, dtype=dtype) if model == "tiny"
                       else load_base_model(model, device=device, dtype=dtype))
    return _BASES[key]


def teacher_recipe(base: BaseModel, teacher_key: dict | None) -> Recipe:
    """The recipe the teacher store's per-document LoRAs were keyed by, from a data module's ``teacher_key``
    (``{"augmentation": {...}, "encoder": {...}, "rank": 2, "alpha": 32}``): its :meth:`Recipe.key` is the one
    store key, content hash of templated QA pairs included."""
    key = teacher_key or {}
    encoder = dict(key.get("encoder", {}))
    spec = LoraSpec(rank=key.get("rank", 2), alpha=key.get("alpha", 32.0)).for_model(base)
    return Recipe(encoder=str(encoder.get("name", "per-doc")), base_identity=base.identity, spec=spec,
                  augmentation=dict(key.get("augmentation", {})), settings=encoder)


# ----------------------------------------------------------------------------------- upper-layers forward


@torch.no_grad()
def lower_states(base: BaseModel, sequences: Sequence[TokenSequence], start: int, batch_size: int = 16,
                 head: HeadCache | None = None) -> list[Tensor]:
    """The hidden states entering decoder layer ``start`` (the output of layer ``start − 1``) of each sequence.

    They do not depend on a LoRA on layers ≥ ``start``, so they are computed once (no LoRA) and every step
    runs only the layers above (:func:`upper_labelled_logits`). Only layers 0 … start − 1 run here.

    Args:
        base: the frozen base model.
        sequences: the QA sequences.
        start: the lowest adapted layer (≥ 1).
        batch_size: sequences per forward.
        head: the cached prompt head every sequence starts with: only the tokens after it are computed (they
            attend to the cached head), for the activated application (:mod:`hyper_prag.activated`).

    Returns:
        One float32 CPU tensor ``(T_i, hidden)`` per sequence (its real tokens only; after the head with ``head``).
    """
    decoder = base.model.model
    P = head.length if head is not None else 0
    out: list[Tensor] = []
    with layers_cut(base, slice(0, start)) as full:
        captured: list[Tensor] = []
        hook = full[start - 1].register_forward_hook(
            lambda mod, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            for i in range(0, len(sequences), batch_size):
                chunk = sequences[i : i + batch_size]
                ids, mask, labels = right_pad(chunk, base.tokenizer.pad_token_id)  # (n, T)
                captured.clear()
                if head is None:
                    decoder(input_ids=ids.to(base.device), attention_mask=mask.to(base.device), use_cache=False)
                else:
                    check_after_head(head, ids, labels)
                    suffix_hidden(base, head, ids[:, P:].to(base.device), mask[:, P:].to(base.device))
                h = captured[-1].float().cpu()  # (n, T − P, H)
                out += [h[j, : len(seq.input_ids) - P].clone() for j, seq in enumerate(chunk)]
        finally:
            hook.remove()
    return out


def upper_labelled_logits(base: BaseModel, lora: Lora | None, lower: Tensor, start: int, attention_mask: Tensor,
                          labels: Tensor, head: HeadCache | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`hyper_prag.sequences.labelled_logits` from the cached hidden states entering layer ``start``.

    Runs decoder layers start … L−1 (under ``lora``, which must adapt no layer below ``start``), the final norm
    and the LM head at the labelled positions: the same logits as the full forward, without layers < start.

    Args:
        base: the frozen base model.
        lora: a batch of N LoRAs or ``None``.
        lower: ``(N, T, hidden)`` right-padded states from :func:`lower_states` (with ``head``: ``(N, T − P,
            hidden)``, the positions after the head).
        start: the layer they enter.
        attention_mask: ``(N, T)``.
        labels: ``(N, T)``.
        head: the cached prompt head (the activated application; the states were computed after it).

    Returns:
        ``(logits (K, V) float32, targets (K,), owner (K,))`` as ``labelled_logits``.
    """
    if lora is not None and min(lora.spec.layers) < start:
        raise HyperPragError(f"a LoRA on layer {min(lora.spec.layers)} cannot run from states cached at layer {start}.")
    decoder = base.model.model
    N, P = len(labels), head.length if head is not None else 0
    kwargs: dict = {"use_cache": False, "attention_mask": attention_mask}  # over head and tokens with a head
    if head is not None:
        kwargs |= activated.after_head(head, N, attention_mask.shape[1] - P, lower.device)
    with injected(base, lora, mode="batched") if lora is not None else nullcontext(), \
            layers_cut(base, slice(start, None)):  # the LoRA's hooks on the real layers, then the upper ones alone
        h = decoder(inputs_embeds=lower.to(base.model.dtype), **kwargs).last_hidden_state  # (N, T − P, H)
    if head is None:
        return labelled_positions(base, h, labels)
    return labelled_positions(base, activated.from_head_end(head, h), labels[:, P - 1:])  # positions P − 1 … T − 1


# ------------------------------------------------------------------------------------- lower-state cache

LOWER_STATES_VERSION = 1  # bump when what a file holds changes: every cached file then misses


def lower_states_key(base: BaseModel, sequences: Sequence[TokenSequence], start: int, batch_size: int = 16,
                     head: HeadCache | None = None) -> str:
    """The sha256 that names one :func:`lower_states` result on disk: it covers everything the states depend on.

    That is the base model's identity and its runtime dtype and device type (the identity ignores both; the
    states do not, bfloat16 weights or GPU kernels give other float32 values), the layer they enter, the batch
    size of the forward (it sets each batch's padded length), the cached head's token ids (or ``"none"``) and
    the token ids of every sequence, in order. A changed document, question, model or prompt format is a miss.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([LOWER_STATES_VERSION, base.identity, str(base.dtype), base.device.type, start,
                              batch_size, list(head.ids) if head is not None else "none"]).encode())
    for seq in sequences:  # one JSON list each, so [1, 2][3] and [1][2, 3] hash apart
        digest.update(json.dumps(list(seq.input_ids)).encode())
    return digest.hexdigest()


class LowerStateCache:
    """:func:`lower_states` results on disk, one safetensors file per :func:`lower_states_key`.

    A file holds ``states`` ``(ΣT_i, hidden)`` float32 (the sequences' states concatenated in order: exact) and
    ``lengths`` ``(N,)`` int64; its metadata records the key, the layer, the base identity and the sha256 of the
    states' bytes. A file that does not load, whose key, lengths or hidden size differ from what is asked, or
    whose states do not hash to the recorded sha256 is never served: it is recomputed and rewritten.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        """
        Args:
            root: cache folder; default ``cache_dir("lower_states")``.
        """
        self.root = Path(root) if root is not None else cache_dir("lower_states")

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, base: BaseModel, sequences: Sequence[TokenSequence], start: int, batch_size: int = 16,
            head: HeadCache | None = None) -> list[Tensor]:
        """:func:`lower_states` of ``sequences`` (same arguments), read from disk if a file holds them, else
        computed and saved.

        Returns:
            One float32 CPU tensor ``(T_i, hidden)`` per sequence, equal to what :func:`lower_states` returns.
        """
        if not sequences:
            return []
        P = head.length if head is not None else 0
        if head is not None:  # a hit must refuse the sequences lower_states refuses
            for i in range(0, len(sequences), batch_size):
                ids, _, labels = right_pad(sequences[i : i + batch_size], base.tokenizer.pad_token_id)  # (n, T)
                check_after_head(head, ids, labels)
        key = lower_states_key(base, sequences, start, batch_size, head)
        path = self.path(key)
        began = time.perf_counter()
        if path.is_file():
            states = self._read(path, key, [len(seq.input_ids) - P for seq in sequences],
                                base.model.config.hidden_size)
            if states is not None:
                log.info("lower states: %d sequences' states entering layer %d loaded from %s in %.1f s",
                         len(states), start, path, time.perf_counter() - began)
                return states
        states = lower_states(base, sequences, start, batch_size, head)
        log.info("lower states: %d sequences' states entering layer %d computed in %.1f s",
                 len(states), start, time.perf_counter() - began)
        self._write(path, key, states, base, start, P)
        return states

    @staticmethod
    def _read(path: Path, key: str, lengths: list[int], hidden: int) -> list[Tensor] | None:
        """The states of ``path`` split per sequence, or ``None`` (with a warning) unless it holds exactly them."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key or f.get_tensor("lengths").tolist() != lengths:
                    raise ValueError("its key or sequence lengths differ from these sequences'")
                stored = f.get_slice("states")
                if stored.get_shape() != [sum(lengths), hidden] or stored.get_dtype() != "F32":
                    raise ValueError(f"its states are {stored.get_dtype()} {stored.get_shape()}, "
                                     f"not F32 {[sum(lengths), hidden]}")
                digest, states, at = hashlib.sha256(), [], 0
                for n in lengths:  # one sequence at a time: memory stays at one copy of the states
                    states.append(stored[at : at + n])  # (T_i, hidden)
                    digest.update(states[-1].numpy())
                    at += n
            if digest.hexdigest() != meta.get("sha256"):
                raise ValueError("its states do not match their recorded sha256 (damaged)")
        except (SafetensorError, OSError, ValueError) as err:
            log.warning("lower-state cache %s unusable (%s): recomputing", path, err)
            return None
        return states

    @staticmethod
    def _write(path: Path, key: str, states: list[Tensor], base: BaseModel, start: int, head_length: int) -> None:
        flat = torch.cat(states)  # (ΣT_i, hidden)
        meta = {"key": key, "version": str(LOWER_STATES_VERSION), "base": base.identity, "dtype": str(base.dtype),
                "start": str(start), "head_length": str(head_length),
                "sha256": hashlib.sha256(flat.numpy()).hexdigest()}
        lengths = torch.tensor([len(s) for s in states], dtype=torch.int64)  # (N,)
        try:  # a whole new file renamed into place: a crash or another rank never leaves half a file
            with atomic_file(path) as tmp:
                save_file({"states": flat, "lengths": lengths}, str(tmp), metadata=meta)
        except OSError as err:  # a full or read-only cache costs the next run the recomputation, not this one
            log.warning("lower-state cache %s not written (%s)", path, err)


# -------------------------------------------------------------------------------------------------- data


@dataclass
class HypernetBatch:
    """N QA sequences (right-padded) over the U distinct documents they are asked about.

    Sequence n is asked under the sum of the LoRAs of documents ``groups[n]`` (one for a document's own QA
    pair; several for a multi-document benchmark question, as the online path combines them). Teacher
    tensors are aligned with ``labels``: position t holds the teacher's top-k for the token at t.
    """

    doc_embedding: Tensor  # (U, E) pooled, or (U, D, E) token states for the attention readout
    input_ids: Tensor  # (N, T)
    attention_mask: Tensor  # (N, T) 1 = real token
    labels: Tensor  # (N, T) IGNORE at padding (and at the prompt for loss_on="answer")
    doc_rows: Tensor  # (U,) row of each document in its split's table
    groups: Tensor  # (N, K) indices into the U documents, -1 = none
    teacher_lora: Lora | None = None  # per-document LoRAs of the U documents (terms d, e), batched (U, …)
    doc_mask: Tensor | None = None  # (U, D) 1 = real document token (token states only)
    teacher_indices: Tensor | None = None  # (N, T, k) the context teacher's top-k token ids
    teacher_logprobs: Tensor | None = None  # (N, T, k) their log-probabilities
    teacher_gold: Tensor | None = None  # (N, T) the teacher's log-probability of the gold token
    teacher_mask: Tensor | None = None  # (N, T) True at answer tokens (where the teacher tensors are set)
    lower: Tensor | None = None  # (N, T, hidden) states entering layer lower_layer (no LoRA below it)
    lower_layer: int = 0

    def to(self, device: torch.device) -> "HypernetBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return HypernetBatch(**{k: v.to(device) if isinstance(v, (Tensor, Lora)) else v for k, v in moved.items()})


def tokenize_qa(base: BaseModel, question: str, answer: str, loss_on: LossOn) -> TokenSequence:
    """Token ids and labels of ``qa_sequence(question, answer)`` (prompt and answer tokenized apart, no truncation;
    the prompt's system turn and worked examples carry no loss under any ``loss_on``)."""
    return tokenize(base, *qa_sequence(base, question, answer), loss_on, unlearned=fixed_head(base))


@dataclass(eq=False)
class QAItem:
    """One training sequence: the documents it is asked about (rows of the split's table) and what it learns from."""

    rows: tuple[int, ...]
    sequence: TokenSequence
    teacher: TeacherTopK | None = None  # the context teacher's top-k at its answer tokens
    lower: Tensor | None = None  # (T, hidden) states entering the lowest adapted layer


def collate(items: list[QAItem], embeddings: Tensor | Sequence[Tensor], pad_id: int,
            teachers: Sequence[Lora] | None = None, lower_layer: int = 0) -> HypernetBatch:
    """Pads a list of :class:`QAItem` into a :class:`HypernetBatch`.

    Args:
        items: the sequences with their documents (and, if computed, teacher top-k and lower-layer states).
        embeddings: the split's pooled ``(D, E)`` embeddings, or its per-document token states ``D × (T_i, E)``.
        pad_id: token id of the right padding.
        teachers: per-document LoRAs of the split's documents (terms d, e), or ``None``.
        lower_layer: the layer the items' ``lower`` states enter.
    """
    ids, mask, labels = right_pad([it.sequence for it in items], pad_id)  # each (N, T)
    N, T = ids.shape
    per_item = [tuple(it.rows) for it in items]
    unique = sorted({r for rows in per_item for r in rows})
    where = {r: u for u, r in enumerate(unique)}
    groups = torch.full((N, max(map(len, per_item))), -1, dtype=torch.long)  # (N, K)
    for i, rows in enumerate(per_item):
        groups[i, : len(rows)] = torch.tensor([where[r] for r in rows])
    rows = torch.tensor(unique, dtype=torch.long)  # (U,)
    extra: dict = {"teacher_lora": stack([teachers[r] for r in unique]) if teachers is not None else None}
    if items[0].teacher is not None:
        k = items[0].teacher.indices.shape[-1]
        extra |= {"teacher_indices": torch.zeros(N, T, k, dtype=torch.long), "teacher_logprobs": torch.zeros(N, T, k),
                  "teacher_gold": torch.zeros(N, T), "teacher_mask": torch.zeros(N, T, dtype=torch.bool)}
        for i, it in enumerate(items):
            end = len(it.sequence.input_ids)
            a = end - len(it.teacher.gold)  # the answer is the sequence's last tokens
            extra["teacher_indices"][i, a:end] = it.teacher.indices  # (A, k)
            extra["teacher_logprobs"][i, a:end] = it.teacher.logprobs  # (A, k)
            extra["teacher_gold"][i, a:end] = it.teacher.gold  # (A,)
            extra["teacher_mask"][i, a:end] = True
    if items[0].lower is not None:
        P = len(items[0].sequence.input_ids) - len(items[0].lower)  # the cached head's length (0: no head)
        lower = torch.zeros(N, T - P, items[0].lower.shape[-1])  # (N, T − P, H); padding never reaches a label
        for i, it in enumerate(items):
            lower[i, : len(it.lower)] = it.lower
        extra |= {"lower": lower, "lower_layer": lower_layer}
    if isinstance(embeddings, Tensor):
        return HypernetBatch(embeddings[rows], ids, mask, labels, rows, groups, **extra)
    states, doc_mask = pad_states([embeddings[r] for r in unique])  # (U, D, E), (U, D)
    return HypernetBatch(states, ids, mask, labels, rows, groups, doc_mask=doc_mask, **extra)


Query = tuple[tuple[int, ...], str, str]  # (rows of the documents it is about, question, answer)


class HypernetDataModule(pl.LightningDataModule):
    """Train/val documents of a corpus with their QA pairs and cached doc embeddings (never test documents)."""

    def __init__(
        self,
        model: str = "tiny",
        dtype: DtypeName = "auto",
        embed_layers: list[int] | None = None,
        max_doc_tokens: int = 512,
        readout: Literal["mean", "attention", "fastweight"] = "mean",
        layers: list[int] | None = None,
        apply_from: ApplyFrom = "all",
        distill: bool = False,
        corpus: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        qa_source: Literal["template", "llm"] = "template",
        questions: bool = False,
        answers: Literal["gold", "teacher"] = "gold",
        loss_on: LossOn = "answer",
        batch_size: int = 8,
        max_train_docs: int | None = None,
        max_val_pairs: int | None = 128,
        teacher_topk: int = 16,
        teacher_cache: str | None = None,
        reuse_lower_states: bool = True,
        lower_state_cache: str | None = None,
        teacher_store: str | None = None,
        teacher_key: dict | None = None,
        embedding_cache: str | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            model: base model (linked from the module's ``model``).
            dtype: its weights' dtype (linked from the module's ``dtype``).
            embed_layers: doc-embedding layers (linked from the module).
            max_doc_tokens: doc tokens read (linked from the module).
            readout: the hypernet's readout (linked from the module): ``attention`` needs per-token states,
                ``fastweight`` each adapted layer's per-token input states.
            layers: the layers the generated LoRAs adapt (linked from the module): states below the lowest are
                computed once (``reuse_lower_states``).
            apply_from: where the generated LoRAs act (linked from the module): ``question``: from the question's
                text onward, the prompt head read once by the base model into a KV cache and only the tokens after
                it run per step (:mod:`hyper_prag.activated`); ``all``: every position, the whole sequence per step.
            distill: compute the context teacher's top-k for every QA sequence (linked: the module's
                ``kl_weight > 0``).
            corpus: corpus folder, ``squad`` or ``hotpotqa`` (from the data cache, ``hyper-prag fetch-data``);
                ``None``: the default fictional benchmark.
            train_split: documents trained on.
            val_split: documents validated on (unseen during training).
            qa_source: ``template``: the corpus's ``doc_qa`` pairs (what augment's template source returns);
                ``llm``: questions and answers by self-augmentation with the base model (slow on CPU), for
                corpora with no QA of their own. A split with no ``doc_qa`` (SQuAD's val) uses its benchmark
                questions instead.
            questions: also train (and validate) on the split's benchmark questions, each asked under the sum
                of the generated LoRAs of its supporting documents: multi-document questions (compare, bridge,
                inference) teach LoRAs that still work once summed, as the online path combines them.
            answers: the targets: ``gold`` (the corpus's or augmentation's answers) or ``teacher``: the teacher's
                own greedy answer with the document(s) in the prompt (:func:`hyper_prag.teacher.teacher_answers`).
            loss_on: ``answer`` (answer tokens only) or ``all`` (prompt too; the KL is on answer tokens only).
            batch_size: QA sequences per step.
            max_train_docs: use only the first N training documents (debug).
            max_val_pairs: validation QA pairs (a fixed, seeded sample; ``None``: all).
            teacher_topk: k of the teacher's top-k log-probabilities kept per answer token (Doc-to-LoRA: 16).
            teacher_cache: teacher cache folder; ``None``: ``cache_dir("teacher")``.
            reuse_lower_states: with ``layers`` above layer 0, compute the states entering the lowest adapted
                layer once (float32 in memory, exact) and run only the upper layers per step.
            lower_state_cache: folder of those states on disk (:class:`LowerStateCache`; a resumed or repeated run
                reads them); ``None``: ``cache_dir("lower_states")``.
            teacher_store: LoRA store with per-document LoRAs of the training documents (terms d, e).
            teacher_key: ``{"augmentation": {...}, "encoder": {...}, "rank": 2, "alpha": 32}``: how the
                per-document LoRAs were keyed (:func:`teacher_recipe`).
            embedding_cache: doc-embedding cache folder; ``None``: ``cache_dir("doc_embeddings")``.
            seed: sampling seed.
        """
        super().__init__()
        self.save_hyperparameters()
        if "test" in (train_split, val_split):
            raise HyperPragError("the hypernet never trains or validates on test documents; use train/val splits.")
        self.tables: dict[str, dict] = {}

    def _corpus(self):
        if self.hparams.corpus is None:
            from hyper_prag.benchmark import load_or_make_default

            return load_or_make_default()
        if self.hparams.corpus in REAL_CORPORA:
            from hyper_prag.realdata import load_real

            return load_real(self.hparams.corpus)
        from hyper_prag.corpus import load_corpus

        return load_corpus(self.hparams.corpus)

    def _qa(self, corpus, docs, base: BaseModel) -> list[tuple[tuple[str, str], ...]]:
        if self.hparams.qa_source == "template":  # the same pairs augment(source="template") returns
            return [tuple(corpus.doc_qa.get(d.id, ())) for d in docs]
        from hyper_prag.augment import AugmentConfig, augment_documents

        return [aug.qa for aug in augment_documents(docs, AugmentConfig(source="llm"), base=base, corpus=corpus)]

    def _teachers(self, base: BaseModel, corpus, docs) -> list[Lora]:
        from hyper_prag.store import existing_store

        recipe = teacher_recipe(base, self.hparams.teacher_key)
        keys = [recipe.key(d.text, corpus.doc_qa.get(d.id)) for d in docs]
        store = existing_store(self.hparams.teacher_store)  # read only: never created here
        missing = store.missing(keys)
        if missing:
            raise HyperPragError(f"teacher store {self.hparams.teacher_store} lacks {len(missing)} of {len(keys)} "
                                 "training documents; encode them first (hyper-prag encode --split train) "
                                 "or set delta_weight and lora_kl_weight to 0.")
        return store.get_many(keys, base_model=base.identity)

    def _question_queries(self, corpus, split: str, docs) -> list[Query]:
        """The split's benchmark questions whose documents are all in ``docs``."""
        row = {d.id: i for i, d in enumerate(docs)}
        return [(tuple(row[d] for d in q.doc_ids), q.question, q.answers[0])
                for q in corpus.split(split).questions if q.doc_ids and all(d in row for d in q.doc_ids)]

    def _queries(self, corpus, split: str, docs, base: BaseModel) -> list[Query]:
        """Every QA sequence of a split as ``(doc rows, question, answer)`` (val: the seeded sample)."""
        hp = self.hparams
        queries = [((row,), q, a) for row, pairs in enumerate(self._qa(corpus, docs, base)) for q, a in pairs]
        if hp.questions or not queries:
            extra = self._question_queries(corpus, split, docs)
            if extra and not queries and not hp.questions:
                log.info("hypernet data: the %s documents have no doc_qa pairs; using the split's %d questions",
                         split, len(extra))
            queries += extra
        if not queries:
            raise HyperPragError(f"no QA pairs for the {split!r} documents; give the corpus doc_qa or questions, "
                                 "or use qa_source=llm.")
        if split == hp.val_split and hp.max_val_pairs and len(queries) > hp.max_val_pairs:
            queries = random.Random(hp.seed).sample(queries, hp.max_val_pairs)
        if hp.answers == "teacher":
            said = teacher_answers(base, [(tuple(docs[r].text for r in rows), q) for rows, q, _ in queries],
                                   cache=hp.teacher_cache)
            kept = [(rows, q, a) for (rows, q, _), a in zip(queries, said) if a.strip()]
            if len(kept) < len(queries):
                log.warning("teacher answers: %d of %d empty, dropped", len(queries) - len(kept), len(queries))
            queries = kept
        return queries

    def _teacher_topk(self, base: BaseModel, docs, queries: Sequence[Query]) -> list[TeacherTopK]:
        teacher = [TeacherQuery(tuple(docs[r].text for r in rows), q, a) for rows, q, a in queries]
        return TeacherCache(self.hparams.teacher_cache).get(base, teacher, self.hparams.teacher_topk)

    def _documents(self, corpus, split: str) -> list:
        """The documents of ``split`` (of the train split, the first ``max_train_docs``)."""
        docs = list(corpus.split(split).documents)
        if split == self.hparams.train_split and self.hparams.max_train_docs:
            docs = docs[: self.hparams.max_train_docs]
        return docs

    def _base(self) -> BaseModel:
        """The shared frozen base model, on the trainer's device: the one-off passes (doc embeddings, teacher,
        lower states) run on the GPU when training does."""
        base = shared_base(self.hparams.model, dtype=self.hparams.dtype)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            base.model.to(trainer.strategy.root_device)
        return base

    def _config(self, base: BaseModel) -> HypernetConfig:
        hp = self.hparams
        return HypernetConfig(embed_layers=tuple(hp.embed_layers or ()), layers=tuple(hp.layers or ()),
                              readout=hp.readout).for_model(base)

    def _states(self, cache: EmbeddingCache, base: BaseModel, docs) -> Tensor | list[Tensor]:
        """The readout's input for ``docs``: pooled embeddings, per-token states, or per-token layer inputs."""
        hp = self.hparams
        return cache.get(base, [d.text for d in docs], self._config(base).embed_layers, hp.max_doc_tokens,
                         tokens=hp.readout == "attention", inputs=hp.readout == "fastweight")

    def head(self, base: BaseModel) -> HeadCache | None:
        """The cached prompt head of the activated application (``None`` for ``apply_from="all"``)."""
        return head_cache(base, fixed_head(base)) if self.hparams.apply_from == "question" else None

    def lower_layer(self, base: BaseModel) -> int:
        """The layer whose input states are cached (0: none are; every step runs the whole model)."""
        layers = self._config(base).layers
        return min(layers) if layers and self.hparams.reuse_lower_states else 0

    def prepare_data(self) -> None:
        """Computes the doc embeddings (and, to distil, the teacher's top-k) of both splits into the on-disk caches.

        Lightning calls this on one process per machine before ``setup`` runs on every rank, so the ranks
        of a distributed run read the caches instead of each computing them.
        """
        hp = self.hparams
        base = self._base()
        corpus = self._corpus()
        cache = EmbeddingCache(hp.embedding_cache)
        for split in (hp.train_split, hp.val_split):
            docs = self._documents(corpus, split)
            if docs:  # an empty split is reported by setup
                self._states(cache, base, docs)
                if hp.distill:
                    self._teacher_topk(base, docs, self._queries(corpus, split, docs, base))

    def setup(self, stage: str | None = None) -> None:
        if self.tables:
            return
        hp = self.hparams
        base = self._base()
        corpus = self._corpus()
        test_ids = {d.id for d in corpus.documents if d.split == "test"}
        start = self.lower_layer(base)
        cache = EmbeddingCache(hp.embedding_cache)  # a hit after prepare_data
        lower_cache = LowerStateCache(hp.lower_state_cache)
        for split in (hp.train_split, hp.val_split):
            docs = self._documents(corpus, split)
            # Never touch test documents (they are the benchmark's evaluation set).
            assert not any(d.split == "test" or d.id in test_ids for d in docs), "test documents in hypernet training"
            if not docs:
                raise HyperPragError(f"corpus {corpus.name!r} has no {split!r} documents to train the hypernet on.")
            queries = self._queries(corpus, split, docs, base)
            sequences = [tokenize_qa(base, q, a, hp.loss_on) for _, q, a in queries]
            teacher = self._teacher_topk(base, docs, queries) if hp.distill else [None] * len(queries)
            lower: list = [None] * len(queries)
            if start:
                lower = lower_cache.get(base, sequences, start, head=self.head(base))
            items = [QAItem(rows, seq, top, low) for (rows, _, _), seq, top, low in zip(queries, sequences, teacher, lower)]
            embeddings = self._states(cache, base, docs)  # (D, E) or D × (T_i, E)
            teachers = self._teachers(base, corpus, docs) if hp.teacher_store and split == hp.train_split else None
            self.tables[split] = {"items": items, "embeddings": embeddings, "teachers": teachers, "docs": len(docs)}
            log.info("hypernet data: %s %d documents, %d QA sequences", split, len(docs), len(items))
        self.pad_id = base.tokenizer.pad_token_id
        self.start = start

    def _loader(self, split: str, sampler: Sampler[int] | None = None) -> DataLoader:
        table = self.tables[split]
        return DataLoader(table["items"], batch_size=self.hparams.batch_size, sampler=sampler,
                          collate_fn=partial(collate, embeddings=table["embeddings"], pad_id=self.pad_id,
                                             teachers=table["teachers"], lower_layer=self.start))

    def train_dataloader(self) -> DataLoader:
        """Shuffled, and resumed where the checkpoint's step left the data order (see :class:`ResumableShuffle`)."""
        n = len(self.tables[self.hparams.train_split]["items"])
        trainer = getattr(self, "trainer", None)
        step, world, accumulate = 0, 1, 1
        if trainer is not None:
            step, world, accumulate = trainer.global_step, trainer.world_size, trainer.accumulate_grad_batches
        sampler = ResumableShuffle(n, self.hparams.seed)
        sampler.resume(step * accumulate, self.hparams.batch_size * world)
        return self._loader(self.hparams.train_split, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.val_split)


class ResumableShuffle(Sampler[int]):
    """Epoch e visits the items in the order ``randperm(n)`` seeded by ``(seed, e)``, the same in every process,
    so a run resumed from a checkpoint goes on in the data order where it stopped instead of starting the epoch
    over (a plain shuffled loader would show the resumed run the batches it already trained on).

    :meth:`resume` takes the batches already consumed (optimizer steps × gradient accumulation) and the items per
    batch over all processes; the first epoch iterated then starts that many items in. Each ``iter()`` is the
    next epoch (the wrapper Lightning puts around a custom sampler under DDP does not pass ``set_epoch`` on, and
    it keeps this order, giving each rank every world-size-th item). ``len()`` stays the whole epoch's, as
    Lightning counts a resumed epoch's batches from where the checkpoint left them."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed
        self.epoch, self.skip = 0, 0

    def resume(self, batches: int, batch_items: int) -> None:
        per_epoch = max(1, -(-self.n // batch_items))  # batches per epoch (the last one may be short)
        self.epoch, done = divmod(batches, per_epoch)
        self.skip = min(done * batch_items, self.n)

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self):
        order, skip = self.order(self.epoch), self.skip
        self.epoch, self.skip = self.epoch + 1, 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.n
