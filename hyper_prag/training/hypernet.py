"""Training the hypernetwork with Lightning: the frozen LLM, a generated LoRA per document, QA losses.

One step, for a batch of N QA sequences (``prompts.qa_sequence(q, a)``: the closed-book question
prompt and the answer, **no document in context**, so the generated LoRAs must carry the knowledge);
a document's own QA pair is asked under its LoRA, a multi-document benchmark question
(``questions: true``) under the sum of its documents' LoRAs (:func:`sum_groups`)::

    doc_embedding (U docs) ──► hypernet ──► ΔW_gen (U, L, …) ⊕ bias LoRA ──► sum per sequence (N, L, …) ──► inject
    loss = ce_weight      · CE(gold answer tokens | question, LoRA_n)                          (a) end-to-end
         + kl_weight      · T² KL(p_teacher ‖ p_student) on answer tokens, teacher top-k       (b) context distillation
         + norm_weight    · mean ‖ΔW_gen‖_F                                                   (c) norm penalty
         + delta_weight   · mean_{m,l} ‖ΔW_gen − ΔW_per-doc‖²_F  (via the factors)            (d) weight-space
         + lora_kl_weight · KL(p_per-doc-LoRA ‖ p_generated-LoRA) on answer tokens            (e) per-doc logits
         + margin_weight  · mean_n max(0, m − (CE_n(another doc's LoRA) − CE_n(own LoRA)))     (f) the control

(b) is what makes generated LoRAs carry facts (Doc-to-LoRA, DistilledPRAG, deep context distillation): the
teacher is the same frozen LLM with the document(s) in the online prompt (:mod:`hyper_prag.teacher`); its
top-k log-probabilities on every answer are computed once (:class:`~hyper_prag.teacher.TeacherCache`). The
hypernet's bias LoRA (``bias_rank``) is document-independent, so format goes there and ΔW_gen must carry
content; ``output_scale_init`` starts ΔW_gen near zero; :class:`DivergenceGuard` stops (and rolls back) a run
whose ΔW_gen norm explodes or whose validation loss rises above closed-book. (d) and (e) need per-document
LoRAs of the training documents (``teacher_store``). Only (a) weighs anything by default (the old objective).

(f) optimises the wrong-document control itself: a LoRA that answers every question equally well, whatever its
document, pays the full margin. With ``apply_from: question`` the generated LoRAs act from the question's text
onward; the prompt head (system turn and worked examples, ~244 of ~275 tokens) is the base model's, read once
into a KV cache, and each step runs only the tokens after it (:mod:`hyper_prag.activated`; 9.97 → 1.26 s a step
at batch 8 on SmolLM2 here, ``scripts/hypernet_step_speed.py``); the checkpoint records it and the online path
serves the LoRAs the same way.

The data side is :mod:`hyper_prag.training.hypernet_data`: documents are split by the corpus (train on ``train``, validate on
``val``; ``test`` documents are refused); doc embeddings and the teacher's top-k are computed once (cached on
disk). With LoRAs on the upper layers only (``layers``), the hidden states entering the lowest adapted layer do
not depend on the LoRA: the datamodule computes them once per QA sequence and each step runs only the layers
above (``lower_states``, ``upper_labelled_logits``); the backward pass never reaches below that layer anyway.

Entry point: ``hyper-prag train hypernet fit --config <name or YAML>`` (:func:`main`, :class:`HypernetCLI`; from a
checkout also ``python -m train.hypernet fit --config configs/hypernet/<name>.yaml``);
``hyper-prag export-hypernet CKPT OUT`` then turns a ``.ckpt`` into the shippable inference checkpoint
(:func:`hyper_prag.encoders.hypernet.export_hypernet`). The sequences and their loss on labelled tokens are
the library's (:mod:`hyper_prag.sequences`), shared with the per-document trainer.

Precision: the frozen base model's weights are ``model.dtype`` (``auto``: bfloat16 when the trainer runs on a
CUDA GPU with native bf16, else float32); the hypernet's parameters and optimizer state stay float32, and
``trainer.precision`` defaults to the matching Lightning precision (:func:`lightning_precision`: ``bf16-mixed``
for bfloat16 weights, ``32-true`` for float32).

Data-parallel training needs no other config: ``--trainer.strategy ddp --trainer.devices N
--trainer.num_nodes M`` (gloo on CPU, nccl on GPUs; torchrun and SLURM's srun are detected by Lightning).
Every rank loads its own frozen base model (:func:`shared_base`, once per process); the doc embeddings and the
teacher's top-k are computed once per machine in :meth:`HypernetDataModule.prepare_data` and read from the
caches by every rank's ``setup``; DDP averages the hypernet's gradients; validation metrics are averaged over
ranks (``sync_dist``), and loggers and checkpoints write on rank 0 (Lightning's default).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from torch import Tensor

from hyper_prag.activated import ApplyFrom, head_cache
from hyper_prag.encoders.hypernet import CKPT_KEY, load_hypernet
from hyper_prag.errors import HyperPragError
from hyper_prag.hypernet import Hypernet, HypernetConfig
from hyper_prag.lora import Lora, stack
from hyper_prag.prompts import fixed_head
from hyper_prag.sequences import IGNORE, labelled_logits, per_sample_mean
from hyper_prag.teacher import KlSupport, topk_kl
from hyper_prag.flags import config_argv, hyphenate
from hyper_prag.model import DtypeName, resolve_dtype
from hyper_prag.training.hypernet_data import (  # noqa: F401  (re-exported: the data side of this trainer)
    HypernetBatch, HypernetDataModule, QAItem, collate, lower_states, shared_base, tokenize_qa, upper_labelled_logits,
)

log = logging.getLogger(__name__)

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

    missing = [m for m in student.spec.target_modules if m not in teacher.A]
    if missing:
        raise HyperPragError(f"the per-document LoRAs lack the hypernet's target modules {missing} (they adapt "
                             f"{list(teacher.A)}); set delta_weight to 0, or encode teachers on the same modules.")
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


def masked_sample_mean(values: Tensor, keep: Tensor, owner: Tensor, n: int) -> Tensor:
    """Mean of ``values`` ``(K,)`` over the positions where ``keep`` ``(K,)`` holds, per sample → ``(n,)`` (0 if none)."""
    keep = keep.to(values.dtype)
    total = torch.zeros(n, device=values.device, dtype=values.dtype).index_add(0, owner, values * keep)  # (n,)
    count = torch.zeros(n, device=values.device, dtype=values.dtype).index_add(0, owner, keep)  # (n,)
    return total / count.clamp(min=1)


# ------------------------------------------------------------------------------------------ batch LoRAs


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


# ------------------------------------------------------------------------------------------------ module


def _leading_cores(name: str, rows: int) -> tuple:
    """Index of the first ``rows`` rank rows of a fastweight factor: fw_key / fw_value / fw_A are
    (L, c·r, ·), fw_B is (L, d_out, c·r)."""
    return (..., slice(0, rows)) if name.startswith("fw_B.") else (slice(None), slice(0, rows))


class HypernetModule(pl.LightningModule):
    """The hypernet as a LightningModule; the frozen base LLM is used, never trained nor checkpointed."""

    def __init__(
        self,
        model: str = "tiny",
        dtype: DtypeName = "auto",
        embed_layers: list[int] | None = None,
        max_doc_tokens: int = 512,
        doc_dim: int = 256,
        emb_dim: int = 32,
        width: int = 256,
        depth: int = 2,
        rank: int = 2,
        alpha: float = 32.0,
        dropout: float = 0.0,
        readout: Literal["mean", "attention", "fastweight"] = "mean",
        heads: int = 4,
        layers: list[int] | None = None,
        bias_rank: int = 0,
        output_scale_init: float | None = None,
        shift: int = 0,
        cores: int = 1,
        apply_from: ApplyFrom = "all",
        target_modules: list[str] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 50,
        schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.1,
        ce_weight: float = 1.0,
        kl_weight: float = 0.0,
        temperature: float = 1.0,
        kl_support: KlSupport = "topk",
        norm_weight: float = 0.0,
        delta_weight: float = 0.0,
        lora_kl_weight: float = 0.0,
        margin_weight: float = 0.0,
        margin: float = 1.0,
        init_from: str | None = None,
        frozen_cores: int = 0,
    ) -> None:
        """
        Args:
            model: base model: ``tiny``, ``smollm2-135m-instruct`` or a model folder.
            dtype: the frozen base model's weights: ``auto`` (bfloat16 on a CUDA GPU with native bf16, else float32;
                the command line resolves it for ``trainer.accelerator``), ``float32``, ``bfloat16``, ``float16``.
                The hypernet itself stays float32.
            embed_layers: decoder layers pooled into the doc embedding (``None``: 1/4 and 1/2 depth).
            max_doc_tokens: doc tokens read.
            doc_dim: projected doc-embedding width.
            emb_dim: layer/module embedding width.
            width: trunk width.
            depth: trunk linear layers.
            rank: rank of the generated LoRA (paper: 2).
            alpha: LoRA alpha (paper: 32); ΔW = alpha / rank · B A for the generated and the bias part.
            dropout: trunk dropout.
            readout: ``mean`` (one pooled doc vector), ``attention`` (slot queries over the doc's tokens) or
                ``fastweight`` (per layer, a normalised outer product of the layer's own input states of the doc;
                the document shapes ΔW from the first step, see :meth:`hyper_prag.hypernet.Hypernet._fastweight`).
            heads: attention heads of the token readout.
            layers: decoder layers the generated LoRA adapts (``None``: all). Upper layers only make steps
                cheaper (the states below are computed once) and the LoRAs smaller.
            bias_rank: rank of the learned document-independent bias LoRA concatenated to every generated one
                (0: none, as before).
            output_scale_init: start of a learned scalar on the generated B (e.g. 1e-3: ΔW_gen starts ≈ 0);
                ``None``: no scalar, head_B zero-initialised (as before).
            shift: fastweight: values from the token ``shift`` after each key's (1: next-token associations).
            cores: fastweight: independent r×r cores per layer (generated LoRA rank ``cores · rank``); a run with
                ``init_from`` a net with fewer cores starts from its LoRAs exactly and trains the added ones.
            apply_from: ``question``: the generated LoRAs act from the question's text onward, the prompt head is
                read once by the base model (KV cache, :mod:`hyper_prag.activated`) and each step runs only the
                tokens after it; served the same way (the checkpoint records it). ``all``: every position.
            target_modules: the linears the generated LoRAs adapt in every adapted layer, e.g. ``[o_proj]`` (the
                attention output projection, where Generative Adapter puts its adapter) or any of ``q_proj``,
                ``k_proj``, ``v_proj`` and the FFN linears (``None``: the base model's FFN linears, as before).
            lr: AdamW learning rate (after linear warm-up).
            weight_decay: AdamW weight decay.
            warmup_steps: linear learning-rate warm-up steps.
            schedule: after warm-up, ``constant`` or ``cosine`` decay to ``min_lr_ratio * lr`` at
                ``trainer.max_steps`` (set max_steps to the steps the run will really make, e.g. within max_time).
            min_lr_ratio: final learning rate of the cosine schedule, as a fraction of ``lr``.
            ce_weight: weight of (a), the cross-entropy of the gold answer through the generated LoRA.
            kl_weight: weight of (b), T² KL(context teacher ‖ student) on answer tokens (the datamodule then
                computes the teacher's top-k, ``data.teacher_topk``).
            temperature: T of (b) (DistilledPRAG: 2).
            kl_support: ``topk`` (both renormalised over the teacher's top-k) or ``topk_tail`` (plus one bucket
                for the remaining mass); see :mod:`hyper_prag.teacher`.
            norm_weight: weight of (c), mean ‖ΔW_gen‖_F of the batch's generated LoRAs.
            delta_weight: weight of (d), ‖ΔW_gen − ΔW_per-doc‖² (needs the datamodule's teacher_store).
            lora_kl_weight: weight of (e), KL to the per-document-LoRA model's answer distribution (needs
                teacher_store).
            margin_weight: weight of (f), the control optimised directly: mean max(0, margin − (CE under another
                document's LoRA − CE under its own)) over the batch's sequences.
            margin: m of (f), in nats per answer token.
            init_from: start from this hypernet's weights (inference checkpoint or ``.ckpt``; same architecture,
                except that a bias LoRA may be added: it starts as initialised), with a fresh optimizer and
                schedule: fine-tuning the shipped checkpoint on another corpus, or at another learning rate.
                ``--ckpt-path`` instead *resumes* a run (optimizer, step, timer).
            frozen_cores: fastweight: the first this many cores keep their weights (their gradients are zeroed),
                e.g. the cores a grown net took from ``init_from``, so only the added ones train.
        """
        super().__init__()
        self.save_hyperparameters()
        self.base = shared_base(model, dtype=dtype)  # a dataclass, not an nn.Module: not a submodule, not in the checkpoint
        config = HypernetConfig(embed_layers=tuple(embed_layers or ()), max_doc_tokens=max_doc_tokens, doc_dim=doc_dim,
                                emb_dim=emb_dim, width=width, depth=depth, rank=rank, alpha=alpha, dropout=dropout,
                                readout=readout, heads=heads, layers=tuple(layers or ()), bias_rank=bias_rank,
                                output_scale_init=output_scale_init, shift=shift, cores=cores, apply_from=apply_from,
                                target_modules=tuple(target_modules or ()))
        self.hypernet = Hypernet.for_model(self.base, config)
        if init_from:
            self._init_from(init_from)
        if frozen_cores:
            self._freeze_cores(frozen_cores)
        self.last_delta_norm = 0.0  # ‖ΔW_gen‖ of the last training batch (DivergenceGuard reads it)
        log.info("hypernet: %d parameters", self.hypernet.num_parameters())

    def _freeze_cores(self, n: int) -> None:
        config = self.hypernet.config
        if config.readout != "fastweight" or not 0 < n < config.cores:
            raise HyperPragError(f"frozen_cores {n} needs the fastweight readout and 0 < frozen_cores < cores "
                                 f"({config.cores}); set it to 0 or grow cores.")
        rows = n * config.rank

        def keep(index: tuple):
            def hook(grad: Tensor) -> Tensor:
                grad = grad.clone()
                grad[index] = 0
                return grad
            return hook

        for name, param in self.hypernet.named_parameters():
            if name.startswith("fw_"):
                param.register_hook(keep(_leading_cores(name, rows)))
        # AdamW's decoupled weight decay would still shrink the frozen rows: configure_optimizers puts the
        # fastweight factors in a group without it.

    def _init_from(self, path: str) -> None:
        """Loads a trained hypernet's weights. Only ``bias_rank`` may differ (the bias LoRA starts fresh), and a
        fastweight net may grow ``cores``: the trained cores fill the first rows of each factor, the added cores
        keep their fresh init with B₁ = 0, so the run starts from exactly the trained net's LoRAs."""
        start = load_hypernet(path, self.base)
        mine = self.hypernet.config
        if replace(start.config, bias_rank=mine.bias_rank, cores=mine.cores) != mine or start.config.cores > mine.cores:
            raise HyperPragError(f"init_from {path} has architecture {start.config.to_dict()}, this run "
                                 f"{mine.to_dict()}; set the model keys to the checkpoint's "
                                 "(only bias_rank may differ, and cores may grow).")
        state = start.state_dict()
        if start.config.bias_rank != mine.bias_rank:
            state = {k: v for k, v in state.items() if not k.startswith("bias_")}
        if start.config.cores != mine.cores:
            own, n = self.hypernet.state_dict(), start.config.generated_rank
            for key in [k for k in state if k.startswith("fw_")]:
                grown = own[key].clone()
                grown[_leading_cores(key, n)] = state[key]
                state[key] = grown
        missing, unexpected = self.hypernet.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("bias_") for k in missing), (missing, unexpected)
        grew = f" (cores {start.config.cores} -> {mine.cores})" if start.config.cores != mine.cores else ""
        log.info("hypernet: initialised from %s%s%s", path, " (bias LoRA fresh)" if missing else "", grew)

    def forward(self, doc_embedding: Tensor, mask: Tensor | None = None) -> Lora:
        return self.hypernet(doc_embedding, mask)

    def transfer_batch_to_device(self, batch: HypernetBatch, device: torch.device, dataloader_idx: int) -> HypernetBatch:
        return batch.to(device)

    def on_fit_start(self) -> None:
        self.base.model.to(self.device)  # the frozen LLM is no submodule: Lightning does not move it

    def on_validation_start(self) -> None:
        self.base.model.to(self.device)

    def student_logits(self, lora: Lora | None, batch: HypernetBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Logits at the labelled positions under ``lora`` (N LoRAs or ``None``): the full forward, or the layers
        above the cached lower states."""
        head = head_cache(self.base, fixed_head(self.base)) if self.hypernet.config.apply_from == "question" else None
        if batch.lower is None:
            return labelled_logits(self.base, lora, batch.input_ids, batch.attention_mask, batch.labels, head)
        start = min(self.hypernet.spec.layers)
        if batch.lower_layer != start:
            raise HyperPragError(f"the batch holds states entering layer {batch.lower_layer}, the hypernet adapts "
                                 f"layers from {start}: link model.layers to data.layers.")
        if (head is None) != (batch.lower.shape[1] == batch.input_ids.shape[1]):
            raise HyperPragError("the batch's cached states and the module disagree on apply_from: link "
                                 "model.apply_from to data.apply_from.")
        return upper_labelled_logits(self.base, lora, batch.lower, start, batch.attention_mask, batch.labels, head)

    def answer_terms(self, lora: Lora | None, batch: HypernetBatch) -> dict[str, Tensor]:
        """CE of the gold answer (and, with teacher tensors, the KL to the teacher) of each sequence, batch-mean."""
        hp, n = self.hparams, len(batch.input_ids)
        logits, targets, owner = self.student_logits(lora, batch)  # (K, V), (K,), (K,)
        per = per_sample_mean(F.cross_entropy(logits, targets, reduction="none"), owner, n)  # (N,)
        out = {"ce": per.mean(), "ce_per_sample": per, "logits": logits}
        if batch.teacher_indices is not None:
            labelled = batch.labels[:, 1:] != IGNORE  # (N, T-1): the order of the K logits
            keep = batch.teacher_mask[:, 1:][labelled]  # (K,) answer tokens
            kl = topk_kl(logits, batch.teacher_indices[:, 1:][labelled], batch.teacher_logprobs[:, 1:][labelled],
                         hp.temperature, hp.kl_support)  # (K,)
            out["kl"] = masked_sample_mean(kl, keep, owner, n).mean()
        return out

    def losses(self, batch: HypernetBatch, generated: Lora | None = None) -> dict[str, Tensor]:
        """All loss terms of one batch (weighted total under ``"loss"``); ``generated``: the batch's documents'
        generated LoRAs (without the bias) when the caller already has them."""
        hp = self.hparams
        if generated is None:
            generated = self.hypernet(batch.doc_embedding, batch.doc_mask, bias=False)  # (U, L, …) rank r
        # Each document's LoRA carries the bias, and a multi-document question sums its documents' LoRAs,
        # bias included: exactly what the online path gets from the stored LoRAs.
        lora = sum_groups(self.hypernet.add_bias(generated), batch.groups)  # (N, L, …)
        terms = self.answer_terms(lora, batch)
        norms = delta_norm(generated)  # (U,)
        out = {"ce": terms["ce"], "loss": hp.ce_weight * terms["ce"], "delta_norm": norms.detach().mean()}
        if "kl" in terms:
            out["kl"] = terms["kl"]
        if hp.kl_weight:
            if "kl" not in terms:
                raise HyperPragError("kl_weight > 0 needs the teacher's top-k in the batch: the datamodule computes "
                                     "it with data.distill (linked to model.kl_weight by the CLI).")
            out["loss"] = out["loss"] + hp.kl_weight * terms["kl"]
        if hp.margin_weight:
            # (f) the control itself: each sequence under the LoRA(s) of the previous sequence's documents must
            # answer worse, by `margin` nats, than under its own (pairs that share a document are left out).
            other = batch.groups.roll(1, dims=0)  # (N, K)
            differs = ~(batch.groups[:, :, None] == other[:, None, :]).any(-1).any(-1)  # (N,)
            wrong = self.answer_terms(sum_groups(self.hypernet.add_bias(generated), other), batch)["ce_per_sample"]
            gap = wrong - terms["ce_per_sample"]  # (N,)
            out["margin_gap"] = gap.detach().mean()
            hinge = F.relu(hp.margin - gap) * differs.to(gap.dtype)  # (N,)
            out["margin"] = hinge.sum() / differs.sum().clamp(min=1)
            out["loss"] = out["loss"] + hp.margin_weight * out["margin"]
        if hp.norm_weight:
            out["norm"] = norms.mean()
            out["loss"] = out["loss"] + hp.norm_weight * out["norm"]
        if hp.delta_weight or hp.lora_kl_weight:
            if batch.teacher_lora is None:
                raise HyperPragError("delta_weight/lora_kl_weight > 0 need per-document LoRAs: set data.teacher_store.")
            teacher = sum_groups(batch.teacher_lora, batch.groups)  # (N, L, …)
            if hp.delta_weight:
                out["delta"] = delta_distance(lora, teacher).mean()
                out["loss"] = out["loss"] + hp.delta_weight * out["delta"]
            if hp.lora_kl_weight:
                n = len(batch.input_ids)
                with torch.no_grad():
                    t_logits, _, owner = self.student_logits(teacher, batch)  # (K, V)
                kl = F.kl_div(terms["logits"].log_softmax(-1), t_logits.log_softmax(-1), log_target=True,
                              reduction="none").sum(-1)  # (K,)
                out["lora_kl"] = per_sample_mean(kl, owner, n).mean()
                out["loss"] = out["loss"] + hp.lora_kl_weight * out["lora_kl"]
        return out

    def training_step(self, batch: HypernetBatch, batch_idx: int) -> Tensor:
        out = self.losses(batch)
        self.last_delta_norm = float(out["delta_norm"])
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, prog_bar=False, batch_size=len(batch.input_ids))
        self.log("loss", out["loss"].detach(), prog_bar=True, logger=False)
        return out["loss"]

    def validation_step(self, batch: HypernetBatch, batch_idx: int) -> None:
        """val/loss: gold-answer CE under the right documents' LoRAs; the controls it must beat: no LoRA
        (closed book), the wrong documents' LoRAs (same bias, another document's content) and, with a bias
        LoRA, the bias alone. With a teacher: the KL of each, and the teacher's own CE (document in context)."""
        n = len(batch.input_ids)
        generated = self.hypernet(batch.doc_embedding, batch.doc_mask, bias=False)
        out = self.losses(batch, generated)  # under the right documents' LoRAs
        closed = self.answer_terms(None, batch)
        # Each question under the LoRAs of the *previous* sequence's documents: the gap to val/loss is what the
        # generated LoRAs carry about their own documents (beyond answer format and corpus-wide priors).
        wrong = self.answer_terms(sum_groups(self.hypernet.add_bias(generated), batch.groups.roll(1, dims=0)), batch)
        metrics = {"val/loss": out["ce"], "val/loss_closed_book": closed["ce"], "val/loss_wrong_doc": wrong["ce"],
                   "val/delta_norm": out["delta_norm"], "val/objective": out["loss"]}
        bias = self.hypernet.bias_lora()
        if bias is not None:
            only = stack([bias] * n)  # (N, L, …) the document-independent part alone
            metrics["val/loss_bias_only"] = self.answer_terms(only, batch)["ce"]
        if "kl" in out:
            metrics |= {"val/kl": out["kl"], "val/kl_closed_book": closed["kl"], "val/kl_wrong_doc": wrong["kl"]}
            labelled = batch.labels[:, 1:] != IGNORE
            gold = batch.teacher_gold[:, 1:][labelled]  # (K,)
            owner = torch.arange(n, device=labelled.device)[:, None].expand_as(labelled)[labelled]
            metrics["val/loss_teacher"] = masked_sample_mean(-gold, batch.teacher_mask[:, 1:][labelled], owner, n).mean()
        self.log_dict(metrics, prog_bar=True, batch_size=n, sync_dist=True)  # DDP: the mean over every rank's share

    def configure_optimizers(self):
        hp = self.hparams
        params = list(self.hypernet.named_parameters())
        if hp.frozen_cores:  # no decay where gradients are zeroed, or the frozen cores would still shrink
            groups = [{"params": [p for n, p in params if not n.startswith("fw_")]},
                      {"params": [p for n, p in params if n.startswith("fw_")], "weight_decay": 0.0}]
            groups = [g for g in groups if g["params"]]
        else:
            groups = [{"params": [p for _, p in params]}]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
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


# ------------------------------------------------------------------------------------------------- guard


class DivergenceGuard(pl.Callback):
    """Stops a run that diverges, rolls the hypernet back to its last good weights, and says why.

    Two signs of divergence (one run's generated ΔW norm went 70 → 400 and ended worse than closed-book):

    * the generated ΔW norm of a training batch exceeds ``max_delta_norm`` (or the loss is not finite);
    * ``val/loss`` exceeds ``val/loss_closed_book`` by more than ``margin`` at ``patience`` validations in a row.

    "Good" weights are those at the start of the fit and after every validation that passes. On a trip the
    hypernet gets them back (so a ``last.ckpt`` that ``ModelCheckpoint`` writes after it holds them), ``trainer.
    should_stop`` is set, the reason is logged and written to ``dirpath/divergence.json``, with the rolled-back
    weights as ``dirpath/last-good.ckpt`` beside it (export that one). The decision is taken on every rank at once.
    """

    def __init__(self, max_delta_norm: float | None = None, margin: float | None = None, patience: int = 1,
                 dirpath: str | None = None) -> None:
        """
        Args:
            max_delta_norm: largest allowed mean ‖ΔW_gen‖_F of a training batch (``None``: not checked).
            margin: allowed excess of val/loss over val/loss_closed_book (``None``: not checked).
            patience: validations in a row above closed-book + margin before stopping.
            dirpath: folder for ``divergence.json`` and ``last-good.ckpt`` (``None``: ``trainer.default_root_dir``).
        """
        super().__init__()
        self.max_delta_norm, self.margin, self.patience, self.dirpath = max_delta_norm, margin, patience, dirpath
        self.bad = 0
        self.good: dict[str, Tensor] | None = None
        self.good_step = 0
        self.reason: str | None = None  # why the run was stopped (None: it was not)

    def _snapshot(self, trainer: pl.Trainer, module: HypernetModule) -> None:
        self.good = {k: v.detach().clone() for k, v in module.hypernet.state_dict().items()}
        self.good_step = trainer.global_step

    def on_fit_start(self, trainer: pl.Trainer, pl_module: HypernetModule) -> None:
        self._snapshot(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: HypernetModule, outputs, batch, batch_idx: int) -> None:
        norm = pl_module.last_delta_norm
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        reason = None
        if not math.isfinite(norm) or (self.max_delta_norm is not None and norm > self.max_delta_norm):
            reason = f"generated ΔW norm {norm:.4g} exceeds max_delta_norm {self.max_delta_norm} at step {trainer.global_step}"
        elif loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
            reason = f"training loss is not finite at step {trainer.global_step}"
        self._decide(trainer, pl_module, reason)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: HypernetModule) -> None:
        if trainer.sanity_checking or self.reason is not None:
            return
        metrics = trainer.callback_metrics
        reason = None
        if self.margin is not None and "val/loss" in metrics and "val/loss_closed_book" in metrics:
            loss, closed = float(metrics["val/loss"]), float(metrics["val/loss_closed_book"])
            self.bad = self.bad + 1 if not loss <= closed + self.margin else 0
            if self.bad >= self.patience:
                reason = (f"val/loss {loss:.4f} above closed-book {closed:.4f} + margin {self.margin} at {self.bad} "
                          f"validation(s) in a row (step {trainer.global_step})")
        if not self._decide(trainer, pl_module, reason) and self.bad == 0:
            self._snapshot(trainer, pl_module)

    def _decide(self, trainer: pl.Trainer, module: HypernetModule, reason: str | None) -> bool:
        if not trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            return False
        self.reason = reason or "another rank diverged"
        log.warning("divergence guard: %s; stopping and rolling the hypernet back to step %d", self.reason,
                    self.good_step)
        if self.good is not None:
            module.hypernet.load_state_dict(self.good)
        trainer.should_stop = True
        folder = Path(self.dirpath or trainer.default_root_dir)
        trainer.save_checkpoint(folder / "last-good.ckpt")
        if trainer.is_global_zero:
            (folder / "divergence.json").write_text(json.dumps(
                {"reason": self.reason, "stopped_at_step": trainer.global_step, "rolled_back_to_step": self.good_step},
                indent=2))
        return True


def _distills(kl_weight: float) -> bool:
    return kl_weight > 0


def lightning_precision(dtype: torch.dtype) -> str:
    """The Lightning precision of a run whose frozen base model has ``dtype`` weights (the hypernet stays float32)."""
    return {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}.get(dtype, "32-true")


def training_device(accelerator: object) -> str:
    """The device name (:func:`hyper_prag.model.resolve_device`) that ``trainer.accelerator`` trains on."""
    name = accelerator.lower() if isinstance(accelerator, str) else "auto"
    return {"cpu": "cpu", "mps": "mps", "gpu": "cuda", "cuda": "cuda"}.get(name, "auto")


class HypernetCLI(LightningCLI):
    """``hyper-prag train hypernet fit --config …``: the data's model/layers are linked to the module's, the data
    computes the teacher's top-k exactly when the module distils (``model.kl_weight > 0``), ``model.dtype: auto``
    is resolved for ``trainer.accelerator`` and ``trainer.precision`` defaults to the matching precision."""

    def add_arguments_to_parser(self, parser) -> None:
        for key in ("model", "dtype", "embed_layers", "max_doc_tokens", "readout", "layers", "apply_from"):
            parser.link_arguments(f"model.{key}", f"data.{key}")
        parser.link_arguments("model.kl_weight", "data.distill", compute_fn=_distills)

    def parse_arguments(self, parser, args) -> None:
        """Parses ``args`` (always given: :func:`main` passes them) after hyphenating the top-level flags."""
        for sub in [parser, *getattr(self, "_subcommand_parsers", {}).values()]:
            hyphenate(sub)
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        dtype = resolve_dtype(config.model.dtype, training_device(config.trainer.accelerator))
        config.model.dtype = config.data.dtype = str(dtype).removeprefix("torch.")
        if config.trainer.precision is None:
            config.trainer.precision = lightning_precision(dtype)


def main(args: Sequence[str] | None = None, run: bool = True, prog: str | None = None) -> HypernetCLI:
    """Runs the LightningCLI for :class:`HypernetModule` / :class:`HypernetDataModule`.

    Args:
        args: ``fit --config NAME_OR_YAML [--key value ...]`` (``None``: ``sys.argv``); ``--config`` takes a
            shipped config's name too (:func:`hyper_prag.paths.config_file`).
        run: run the subcommand (``False``: only parse ``args``, without a subcommand, and build the classes).
        prog: the program name in usage lines.

    Raises:
        HyperPragError: a config that is no file nor shipped name, or a setting the module or data refuse.
    """
    argv = config_argv(sys.argv[1:] if args is None else args, "hypernet")
    return HypernetCLI(HypernetModule, HypernetDataModule, args=argv, run=run, save_config_kwargs={"overwrite": True},
                       auto_configure_optimizers=False, parser_kwargs={"prog": prog} if prog else {})
