"""Training the hypernetwork with Lightning: the frozen LLM, a generated LoRA per document, QA losses.

One step, for a batch of N QA sequences (``prompts.qa_sequence(q, a)``: the closed-book question
prompt and the answer, **no document in context**, so the generated LoRAs must carry the knowledge);
a document's own QA pair is asked under its LoRA, a multi-document benchmark question
(``questions: true``) under the sum of its documents' LoRAs (:func:`sum_groups`)::

    doc_embedding (U docs) ──► hypernet ──► LoRAs (U, L, …) ──► sum per sequence (N, L, …) ──► inject(mode="batched")
    loss = lm_weight    · CE(answer tokens | question, LoRA_n)                    (a) end-to-end
         + delta_weight · mean_{m,l} ‖ΔW_gen − ΔW_teacher‖²_F  (via the factors)  (b) distillation
         + kl_weight    · KL(p_teacher-LoRA ‖ p_generated-LoRA) on answer tokens   (c) logit distillation

(b) and (c) need per-document LoRAs of the training documents (``teacher_store``); both weigh 0 by
default. Documents are split by the corpus: train on ``train``, validate on ``val``; the datamodule
refuses ``test`` documents. Doc embeddings are computed once with the frozen LLM (cached on disk).

Entry point: ``python -m train.hypernet fit --config configs/hypernet/<name>.yaml`` (:class:`HypernetCLI`);
``hyper-prag export-hypernet CKPT OUT`` then turns a ``.ckpt`` into the shippable inference checkpoint
(:func:`hyper_prag.encoders.hypernet.export_hypernet`). The sequences and their loss on labelled tokens are
the library's (:mod:`hyper_prag.sequences`), shared with the per-document trainer.

Data-parallel training needs no other config: ``--trainer.strategy ddp --trainer.devices N
--trainer.num_nodes M`` (gloo on CPU, nccl on GPUs; torchrun and SLURM's srun are detected by Lightning).
Every rank loads its own frozen base model (:func:`shared_base`, once per process); the doc embeddings are
computed once per machine in :meth:`HypernetDataModule.prepare_data` and read from the cache by every
rank's ``setup``; DDP averages the hypernet's gradients; validation metrics are averaged over ranks
(``sync_dist``), and loggers and checkpoints write on rank 0 (Lightning's default).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import Tensor
from torch.utils.data import DataLoader

from hyper_prag.encoders.hypernet import CKPT_KEY, load_hypernet
from hyper_prag.errors import HyperPragError
from hyper_prag.hypernet import EmbeddingCache, Hypernet, HypernetConfig, pad_states
from hyper_prag.lora import Lora, stack
from hyper_prag.model import BaseModel
from hyper_prag.prompts import qa_sequence
from hyper_prag.sequences import (
    LossOn, TokenSequence, labelled_logits, per_sample_mean, right_pad, sequence_losses, tokenize,
)

log = logging.getLogger(__name__)

_BASES: dict[tuple[str, str], BaseModel] = {}


def shared_base(model: str, device: str = "cpu") -> BaseModel:
    """Loads the base model once per process (the module and the datamodule share it; it is frozen).

    Args:
        model: ``tiny`` (random 2-layer test model), ``smollm2-135m-instruct`` or a model folder.
        device: torch device.
    """
    key = (model, device)
    if key not in _BASES:
        from hyper_prag.model import load_base_model, tiny_base_model

        _BASES[key] = tiny_base_model(device=device) if model == "tiny" else load_base_model(model, device=device)
    return _BASES[key]


# ------------------------------------------------------------------------------------------------ losses


def delta_distance(student: Lora, teacher: Lora) -> Tensor:
    """‖ΔW_s − ΔW_t‖²_F per document, averaged over modules and layers, from the low-rank factors.

    With ΔW = s B A: ‖s B A − s' B' A'‖² = s²⟨BA,BA⟩ − 2ss'⟨BA,B'A'⟩ + s'²⟨B'A',B'A'⟩ and
    ⟨BA, B'A'⟩ = Σ_ij (BᵀB')_ij (A A'ᵀ)_ij: r×r' products, never a (d_out, d_in) matrix.

    Args:
        student: batched LoRA (N, L, …).
        teacher: batched LoRA with the same N, modules and layers (any rank).

    Returns:
        ``(N,)``.
    """

    def inner(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Tensor:
        return ((B1.transpose(-1, -2) @ B2) * (A1 @ A2.transpose(-1, -2))).sum((-1, -2))  # (N, L)

    s, t = student.spec.scaling, teacher.spec.scaling
    per_module = []
    for m in student.spec.target_modules:
        A1, B1, A2, B2 = student.A[m], student.B[m], teacher.A[m].to(student.A[m]), teacher.B[m].to(student.B[m])
        d = s * s * inner(B1, A1, B1, A1) - 2 * s * t * inner(B1, A1, B2, A2) + t * t * inner(B2, A2, B2, A2)
        per_module.append(d.clamp(min=0).mean(-1))  # (N,)
    return torch.stack(per_module).mean(0)  # (N,)


def delta_norm(lora: Lora) -> Tensor:
    """‖ΔW‖_F per document, averaged over modules and layers, from the factors (no (d_out, d_in) matrix).

    Returns:
        ``(N,)`` for a batched LoRA.
    """
    s = lora.spec.scaling
    norms = [(s * s * ((B.transpose(-1, -2) @ B) * (A @ A.transpose(-1, -2))).sum((-1, -2))).clamp(min=0).sqrt()
             for A, B in ((lora.A[m], lora.B[m]) for m in lora.spec.target_modules)]  # each (N, L)
    return torch.stack(norms).mean((0, -1))  # (N,)


def lr_factor(step: int, warmup: int, total: int, schedule: str, floor: float) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then constant or cosine decay to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -------------------------------------------------------------------------------------------------- data


@dataclass
class HypernetBatch:
    """N QA sequences (right-padded) over the U distinct documents they are asked about.

    Sequence n is asked under the sum of the LoRAs of documents ``groups[n]`` (one for a document's own QA
    pair; several for a multi-document benchmark question, as the online path combines them).
    """

    doc_embedding: Tensor  # (U, E) pooled, or (U, D, E) token states for the attention readout
    input_ids: Tensor  # (N, T)
    attention_mask: Tensor  # (N, T) 1 = real token
    labels: Tensor  # (N, T) IGNORE at padding (and at the prompt for loss_on="answer")
    doc_rows: Tensor  # (U,) row of each document in its split's table
    groups: Tensor  # (N, K) indices into the U documents, -1 = none
    teacher: Lora | None = None  # per-document LoRAs of the U documents (distillation), batched (U, …)
    doc_mask: Tensor | None = None  # (U, D) 1 = real document token (token states only)

    def to(self, device: torch.device) -> "HypernetBatch":
        return HypernetBatch(self.doc_embedding.to(device), self.input_ids.to(device), self.attention_mask.to(device),
                             self.labels.to(device), self.doc_rows.to(device), self.groups.to(device),
                             self.teacher.to(device) if self.teacher is not None else None,
                             self.doc_mask.to(device) if self.doc_mask is not None else None)


def sum_groups(lora: Lora, groups: Tensor) -> Lora:
    """Per row of ``groups``, the sum of those LoRAs of the batch: what ``combine(mode="sum")`` gives online.

    Σ_k s B_k A_k = s [B_1 … B_K] [A_1; …; A_K]: the factors are concatenated along the rank (rank K·r, the
    scaling s = alpha/r kept); a ``-1`` slot contributes zero (its B block is zeroed).

    Args:
        lora: batched LoRA (U, L, …).
        groups: ``(N, K)`` indices into the U LoRAs, ``-1`` = no LoRA.

    Returns:
        Batched LoRA (N, L, …) of rank K·r (``lora`` itself, reindexed, when K = 1).
    """
    N, K = groups.shape
    idx, keep = groups.clamp(min=0), (groups >= 0)  # (N, K)
    spec, r = lora.spec, lora.spec.rank
    A, B = {}, {}
    for m in spec.target_modules:
        a, b = lora.A[m][idx], lora.B[m][idx]  # (N, K, L, r, d_in), (N, K, L, d_out, r)
        b = b * keep[:, :, None, None, None].to(b.dtype)
        A[m] = a.transpose(1, 2).reshape(N, a.shape[2], K * r, a.shape[-1])  # (N, L, K·r, d_in)
        B[m] = b.permute(0, 2, 3, 1, 4).reshape(N, b.shape[2], b.shape[3], K * r)  # (N, L, d_out, K·r)
    if K == 1:
        return Lora(spec, A, B)
    return Lora(replace(spec, rank=K * r, alpha=spec.scaling * K * r), A, B)


def tokenize_qa(base: BaseModel, question: str, answer: str, loss_on: LossOn) -> TokenSequence:
    """Token ids and labels of ``qa_sequence(question, answer)`` (prompt and answer tokenized apart, no truncation)."""
    return tokenize(base, *qa_sequence(base, question, answer), loss_on)


Item = tuple[tuple[int, ...], TokenSequence]  # the documents a sequence is asked about (rows of the split), the sequence


def collate(items: list[Item], embeddings: Tensor | Sequence[Tensor], pad_id: int,
            teachers: Sequence[Lora] | None = None) -> HypernetBatch:
    """Pads a list of ``(doc_rows, sequence)`` into a :class:`HypernetBatch`.

    Args:
        items: the documents each sequence is asked about (rows of the split's table) and the sequence.
        embeddings: the split's pooled ``(D, E)`` embeddings, or its per-document token states ``D × (T_i, E)``.
        pad_id: token id of the right padding.
        teachers: per-document LoRAs of the split's documents (distillation), or ``None``.
    """
    ids, mask, labels = right_pad([seq for _, seq in items], pad_id)  # each (N, T)
    per_item = [tuple(rows) for rows, _ in items]
    unique = sorted({r for rows in per_item for r in rows})
    where = {r: u for u, r in enumerate(unique)}
    groups = torch.full((len(items), max(map(len, per_item))), -1, dtype=torch.long)  # (N, K)
    for i, rows in enumerate(per_item):
        groups[i, : len(rows)] = torch.tensor([where[r] for r in rows])
    rows = torch.tensor(unique, dtype=torch.long)  # (U,)
    teacher = stack([teachers[r] for r in unique]) if teachers is not None else None
    if isinstance(embeddings, Tensor):
        return HypernetBatch(embeddings[rows], ids, mask, labels, rows, groups, teacher)
    states, doc_mask = pad_states([embeddings[r] for r in unique])  # (U, D, E), (U, D)
    return HypernetBatch(states, ids, mask, labels, rows, groups, teacher, doc_mask)


class HypernetDataModule(pl.LightningDataModule):
    """Train/val documents of a corpus with their QA pairs and cached doc embeddings (never test documents)."""

    def __init__(
        self,
        model: str = "tiny",
        embed_layers: list[int] | None = None,
        max_doc_tokens: int = 512,
        readout: Literal["mean", "attention"] = "mean",
        corpus: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        qa_source: Literal["template", "llm"] = "template",
        questions: bool = False,
        loss_on: LossOn = "answer",
        batch_size: int = 8,
        max_train_docs: int | None = None,
        max_val_pairs: int | None = 128,
        teacher_store: str | None = None,
        teacher_key: dict | None = None,
        embedding_cache: str | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            model: base model (linked from the module's ``model``).
            embed_layers: doc-embedding layers (linked from the module).
            max_doc_tokens: doc tokens read (linked from the module).
            readout: the hypernet's readout (linked from the module): ``attention`` needs per-token states.
            corpus: corpus folder; ``None``: the default fictional benchmark.
            train_split: documents trained on.
            val_split: documents validated on (unseen during training).
            qa_source: ``template``: the corpus's ``doc_qa`` pairs (what augment's template source returns);
                ``llm``: self-augmentation with the base model (``augment.augment_documents``; slow on CPU).
            questions: also train (and validate) on the split's benchmark questions, each asked under the sum
                of the generated LoRAs of its supporting documents: multi-document questions (compare, bridge,
                inference) teach LoRAs that still work once summed, as the online path combines them.
            loss_on: ``answer`` (answer tokens only) or ``all`` (prompt too).
            batch_size: QA sequences per step.
            max_train_docs: use only the first N training documents (debug).
            max_val_pairs: validation QA pairs (a fixed, seeded sample; ``None``: all).
            teacher_store: LoRA store with per-document LoRAs of the training documents (distillation).
            teacher_key: ``{"augmentation": {...}, "encoder": {...}, "rank": 2, "alpha": 32}``: how the
                teacher LoRAs were keyed (``store.store_key``).
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
        from hyper_prag.corpus import load_corpus

        return load_corpus(self.hparams.corpus)

    def _qa(self, corpus, docs, base: BaseModel) -> list[tuple[tuple[str, str], ...]]:
        if self.hparams.qa_source == "template":  # the same pairs augment(source="template") returns
            return [tuple(corpus.doc_qa.get(d.id, ())) for d in docs]
        from hyper_prag.augment import AugmentConfig, augment_documents

        return [aug.qa for aug in augment_documents(docs, AugmentConfig(source="llm"), base=base, corpus=corpus)]

    def _teachers(self, base: BaseModel, docs) -> list[Lora]:
        from hyper_prag.lora import LoraSpec
        from hyper_prag.store import LoraStore, store_key

        key = self.hparams.teacher_key or {}
        spec = LoraSpec(rank=key.get("rank", 2), alpha=key.get("alpha", 32.0)).for_model(base)
        keys = [store_key(d.text, base.identity, spec, key.get("augmentation", {}), key.get("encoder", {})) for d in docs]
        store = LoraStore(self.hparams.teacher_store)
        missing = store.missing(keys)
        if missing:
            raise HyperPragError(f"teacher store {self.hparams.teacher_store} lacks {len(missing)} of {len(keys)} "
                                 "training documents; encode them first (hyper-prag encode --split train) "
                                 "or set delta_weight and kl_weight to 0.")
        return store.get_many(keys, base_model=base.identity)

    def _question_items(self, corpus, split: str, docs, base: BaseModel) -> list[Item]:
        """``(doc_rows, sequence)`` of the split's benchmark questions whose documents are all in ``docs``."""
        row = {d.id: i for i, d in enumerate(docs)}
        return [(tuple(row[d] for d in q.doc_ids), tokenize_qa(base, q.question, q.answers[0], self.hparams.loss_on))
                for q in corpus.split(split).questions if q.doc_ids and all(d in row for d in q.doc_ids)]

    def _documents(self, corpus, split: str) -> list:
        """The documents of ``split`` (of the train split, the first ``max_train_docs``)."""
        docs = list(corpus.split(split).documents)
        if split == self.hparams.train_split and self.hparams.max_train_docs:
            docs = docs[: self.hparams.max_train_docs]
        return docs

    def _layers(self, base: BaseModel) -> tuple[int, ...]:
        return HypernetConfig(embed_layers=tuple(self.hparams.embed_layers or ())).for_model(base).embed_layers

    def prepare_data(self) -> None:
        """Computes the doc embeddings of both splits into the on-disk cache.

        Lightning calls this on one process per machine before ``setup`` runs on every rank, so the ranks
        of a distributed run read the embeddings instead of each computing them.
        """
        hp = self.hparams
        base = shared_base(hp.model)
        corpus = self._corpus()
        cache = EmbeddingCache(hp.embedding_cache)
        for split in (hp.train_split, hp.val_split):
            docs = self._documents(corpus, split)
            if docs:  # an empty split is reported by setup
                cache.get(base, [d.text for d in docs], self._layers(base), hp.max_doc_tokens,
                          tokens=hp.readout == "attention")

    def setup(self, stage: str | None = None) -> None:
        if self.tables:
            return
        hp = self.hparams
        base = shared_base(hp.model)
        corpus = self._corpus()
        test_ids = {d.id for d in corpus.documents if d.split == "test"}
        layers = self._layers(base)
        cache = EmbeddingCache(hp.embedding_cache)  # a hit after prepare_data
        rng = random.Random(hp.seed)
        for split in (hp.train_split, hp.val_split):
            docs = self._documents(corpus, split)
            # Never touch test documents (they are the benchmark's evaluation set).
            assert not any(d.split == "test" or d.id in test_ids for d in docs), "test documents in hypernet training"
            if not docs:
                raise HyperPragError(f"corpus {corpus.name!r} has no {split!r} documents to train the hypernet on.")
            qa = self._qa(corpus, docs, base)
            items = [((row,), tokenize_qa(base, q, a, hp.loss_on)) for row, pairs in enumerate(qa) for q, a in pairs]
            if hp.questions:
                items += self._question_items(corpus, split, docs, base)
            if not items:
                raise HyperPragError(f"no QA pairs for the {split!r} documents; give the corpus doc_qa or use qa_source=llm.")
            if split == hp.val_split and hp.max_val_pairs and len(items) > hp.max_val_pairs:
                items = rng.sample(items, hp.max_val_pairs)
            embeddings = cache.get(base, [d.text for d in docs], layers, hp.max_doc_tokens,
                                   tokens=hp.readout == "attention")  # (D, E) or D × (T_i, E)
            teachers = self._teachers(base, docs) if hp.teacher_store and split == hp.train_split else None
            self.tables[split] = {"items": items, "embeddings": embeddings, "teachers": teachers, "docs": len(docs)}
            log.info("hypernet data: %s %d documents, %d QA sequences", split, len(docs), len(items))
        self.pad_id = base.tokenizer.pad_token_id

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        table = self.tables[split]
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(table["items"], batch_size=self.hparams.batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=partial(collate, embeddings=table["embeddings"], pad_id=self.pad_id,
                                             teachers=table["teachers"]))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.train_split, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.val_split, shuffle=False)


# ------------------------------------------------------------------------------------------------ module


class HypernetModule(pl.LightningModule):
    """The hypernet as a LightningModule; the frozen base LLM is used, never trained nor checkpointed."""

    def __init__(
        self,
        model: str = "tiny",
        embed_layers: list[int] | None = None,
        max_doc_tokens: int = 512,
        doc_dim: int = 256,
        emb_dim: int = 32,
        width: int = 256,
        depth: int = 2,
        rank: int = 2,
        alpha: float = 32.0,
        dropout: float = 0.0,
        readout: Literal["mean", "attention"] = "mean",
        heads: int = 4,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 50,
        schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.1,
        lm_weight: float = 1.0,
        delta_weight: float = 0.0,
        kl_weight: float = 0.0,
        init_from: str | None = None,
    ) -> None:
        """
        Args:
            model: base model: ``tiny``, ``smollm2-135m-instruct`` or a model folder.
            embed_layers: decoder layers pooled into the doc embedding (``None``: 1/4 and 1/2 depth).
            max_doc_tokens: doc tokens read.
            doc_dim: projected doc-embedding width.
            emb_dim: layer/module embedding width.
            width: trunk width.
            depth: trunk linear layers.
            rank: LoRA rank (paper: 2).
            alpha: LoRA alpha (paper: 32).
            dropout: trunk dropout.
            readout: ``mean`` (one pooled doc vector) or ``attention`` (slot queries over the doc's tokens).
            heads: attention heads of the token readout.
            lr: AdamW learning rate (after linear warm-up).
            weight_decay: AdamW weight decay.
            warmup_steps: linear learning-rate warm-up steps.
            schedule: after warm-up, ``constant`` or ``cosine`` decay to ``min_lr_ratio * lr`` at
                ``trainer.max_steps`` (set max_steps to the steps the run will really make, e.g. within max_time).
            min_lr_ratio: final learning rate of the cosine schedule, as a fraction of ``lr``.
            lm_weight: weight of (a), the end-to-end answer loss through the generated LoRA.
            delta_weight: weight of (b), ‖ΔW_gen − ΔW_teacher‖² (needs the datamodule's teacher_store).
            kl_weight: weight of (c), KL to the teacher-LoRA model's answer distribution (needs teacher_store).
            init_from: start from this hypernet's weights (inference checkpoint or ``.ckpt``; same architecture),
                with a fresh optimizer and schedule: fine-tuning the shipped checkpoint on another corpus, or at
                another learning rate. ``--ckpt_path`` instead *resumes* a run (optimizer, step, timer).
        """
        super().__init__()
        self.save_hyperparameters()
        self.base = shared_base(model)  # a dataclass, not an nn.Module: not a submodule, not in the checkpoint
        config = HypernetConfig(embed_layers=tuple(embed_layers or ()), max_doc_tokens=max_doc_tokens, doc_dim=doc_dim,
                                emb_dim=emb_dim, width=width, depth=depth, rank=rank, alpha=alpha, dropout=dropout,
                                readout=readout, heads=heads)
        self.hypernet = Hypernet.for_model(self.base, config)
        if init_from:
            start = load_hypernet(init_from, self.base)
            if start.config != self.hypernet.config:
                raise HyperPragError(f"init_from {init_from} has architecture {start.config.to_dict()}, this run "
                                     f"{self.hypernet.config.to_dict()}; set the model keys to the checkpoint's.")
            self.hypernet.load_state_dict(start.state_dict())
            log.info("hypernet: initialised from %s", init_from)
        log.info("hypernet: %d parameters", self.hypernet.num_parameters())

    def forward(self, doc_embedding: Tensor, mask: Tensor | None = None) -> Lora:
        return self.hypernet(doc_embedding, mask)

    def transfer_batch_to_device(self, batch: HypernetBatch, device: torch.device, dataloader_idx: int) -> HypernetBatch:
        return batch.to(device)

    def on_fit_start(self) -> None:
        self.base.model.to(self.device)  # the frozen LLM is no submodule: Lightning does not move it

    def on_validation_start(self) -> None:
        self.base.model.to(self.device)

    def losses(self, batch: HypernetBatch, generated: Lora | None = None) -> dict[str, Tensor]:
        """All loss terms of one batch (weighted total under ``"loss"``); ``generated``: the batch's documents'
        LoRAs when the caller already has them."""
        hp = self.hparams
        if generated is None:
            generated = self.hypernet(batch.doc_embedding, batch.doc_mask)  # (U, L, …)
        lora = sum_groups(generated, batch.groups)  # (N, L, …)
        n = len(batch.input_ids)
        logits, targets, owner = labelled_logits(self.base, lora, batch.input_ids, batch.attention_mask,
                                                 batch.labels)  # (K, V), (K,), (K,)
        lm = per_sample_mean(F.cross_entropy(logits, targets, reduction="none"), owner, n).mean()
        out = {"lm": lm, "loss": hp.lm_weight * lm}
        if hp.delta_weight or hp.kl_weight:
            if batch.teacher is None:
                raise HyperPragError("delta_weight/kl_weight > 0 need teacher LoRAs: set data.teacher_store.")
            teacher = sum_groups(batch.teacher, batch.groups)  # (N, L, …)
            if hp.delta_weight:
                out["delta"] = delta_distance(lora, teacher).mean()
                out["loss"] = out["loss"] + hp.delta_weight * out["delta"]
            if hp.kl_weight:
                with torch.no_grad():
                    t_logits, _, _ = labelled_logits(self.base, teacher, batch.input_ids, batch.attention_mask,
                                                     batch.labels)  # (K, V)
                kl = F.kl_div(logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True,
                              reduction="none").sum(-1)  # (K,)
                out["kl"] = per_sample_mean(kl, owner, n).mean()
                out["loss"] = out["loss"] + hp.kl_weight * out["kl"]
        with torch.no_grad():
            out["delta_norm"] = delta_norm(lora).mean()
        return out

    def training_step(self, batch: HypernetBatch, batch_idx: int) -> Tensor:
        out = self.losses(batch)
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, prog_bar=False, batch_size=len(batch.input_ids))
        self.log("loss", out["loss"].detach(), prog_bar=True, logger=False)
        return out["loss"]

    def validation_step(self, batch: HypernetBatch, batch_idx: int) -> None:
        n = len(batch.input_ids)
        generated = self.hypernet(batch.doc_embedding, batch.doc_mask)
        out = self.losses(batch, generated)
        closed = sequence_losses(self.base, None, batch.input_ids, batch.attention_mask, batch.labels).mean()
        # Each question under the LoRAs of the *previous* sequence's documents: the gap to val/loss is what the
        # generated LoRAs carry about their own documents (beyond answer format and corpus-wide priors).
        wrong = sum_groups(generated, batch.groups.roll(1, dims=0))
        wrong_doc = sequence_losses(self.base, wrong, batch.input_ids, batch.attention_mask, batch.labels).mean()
        self.log_dict({"val/loss": out["lm"], "val/loss_closed_book": closed, "val/loss_wrong_doc": wrong_doc,
                       "val/delta_norm": out["delta_norm"]}, prog_bar=True, batch_size=n,
                      sync_dist=True)  # DDP: the mean over every rank's share of the val set

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.hypernet.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.trainer.max_steps
        if hp.schedule == "cosine" and total <= hp.warmup_steps:
            raise HyperPragError(f"schedule: cosine decays until trainer.max_steps, which is {total}; set "
                                 f"--trainer.max_steps above warmup_steps ({hp.warmup_steps}).")
        factor = partial(lr_factor, warmup=hp.warmup_steps, total=total, schedule=hp.schedule,
                         floor=hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CKPT_KEY] = self.hypernet.describe()  # lets load_hypernet read a .ckpt alone

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get(CKPT_KEY, {}).get("base_model")
        if saved and saved != self.base.identity:
            raise HyperPragError(f"checkpoint was trained for base model '{saved}', not '{self.base.identity}'.")


class HypernetCLI(LightningCLI):
    """``python -m train.hypernet fit --config …``: the data's model/layers are linked to the module's."""

    def add_arguments_to_parser(self, parser) -> None:
        for key in ("model", "embed_layers", "max_doc_tokens", "readout"):
            parser.link_arguments(f"model.{key}", f"data.{key}")


def main(args: Sequence[str] | None = None, run: bool = True) -> HypernetCLI:
    """Runs the LightningCLI for :class:`HypernetModule` / :class:`HypernetDataModule`."""
    return HypernetCLI(HypernetModule, HypernetDataModule, args=None if args is None else list(args), run=run,
                       save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
