"""Per-document parametric encoding (paper §3.2, the f_φ of P-RAG): one LoRA per document.

For document d_i with augmented set {(d_i^k, q_i^j, a_i^j)} the paper trains a LoRA ΔW_i on the FFN
(gate/up/down, all layers; rank 2, alpha 32, lr 3e-4, 1–2 epochs) with the causal-LM loss on the
sequences ``[d_i^k ⊕ q_i^j ⊕ a_i^j]``. The paper does this one document at a time. Here a whole
*chunk* of N documents trains at once: a **LoRA bank** (A: (N, L, r, d_in), B: (N, L, d_out, r),
``nn.Parameter`` s) is applied with ``inject.injected(mode="batched")`` so sample n uses LoRA n::

    step t:  [seq_t(doc 0); seq_t(doc 1); …]  ──► LLM + bank  ──► loss_n (mean over doc n's tokens)
             total = Σ_n loss_n  ──► backward ──► one AdamW step over the whole bank

Why this equals training each document alone (exact up to float rounding; tested ≤ 1e-4):

* d total / d bank[n] = d loss_n / d bank[n]: sample n touches only LoRA n, and the per-document
  losses are *summed* (not averaged over the batch), so each slice sees exactly its own gradient.
* AdamW is elementwise (weight decay, moments, bias correction), so a slice of the stacked
  parameter is updated exactly as a separate parameter with that gradient would be.
* Documents have different numbers of sequences. Each document's schedule is laid out
  epoch-major (all of epoch 1, then all of epoch 2, …) and starts at global step 0, so document n
  is active at steps 0 … S_n − 1 and never again. Its AdamW step count therefore equals its own
  count at every active step (bias correction matches), and its LoRA is **read out right after
  its last step**. A finished document leaves the batch (no compute); its bank rows still get a
  zero gradient and AdamW would keep moving them by momentum, but that copy is never used.
  (Masking a document *in the middle* of its schedule would not be exact: AdamW moves a
  parameter with zero gradient and advances its step count. This is why a runner makes one pass
  (Lightning: ``max_epochs=1``) over a schedule that already contains every epoch.)
* Dynamic padding: each step is right-padded to its own longest sequence; padded positions are
  masked in attention and carry no loss, and logits are computed only at positions with a label
  (:mod:`hyper_prag.sequences`).

The step code lives in :class:`LoraBank` (:meth:`~LoraBank.loss`, :meth:`~LoraBank.read_out`,
:meth:`~LoraBank.make_optimizer`). A *runner* (:data:`FitBank`) drives it over the schedule: the
library's plain loop :func:`fit_steps` (the default), or any other with the same calls in the same
order, such as the ``lightning.Trainer`` runner of ``hyper_prag/training/encode.py``, passed to
:class:`PerDocEncoder` as ``fit``. Both give bit-identical LoRAs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import Tensor, nn

from hyper_prag.combine import combine
from hyper_prag.encoders import split_text
from hyper_prag.errors import HyperPragError
from hyper_prag.lora import Lora, LoraSpec, init_lora, lora_sha256, stack
from hyper_prag.model import BaseModel
from hyper_prag.prompts import closed_book_sequence, fixed_head, format_id, training_sequence
from hyper_prag.sequences import LossOn, TokenSequence, right_pad, sequence_losses, tokenize

if TYPE_CHECKING:
    from hyper_prag.augment import AugmentedDocument

log = logging.getLogger(__name__)



QA_ROOM = 256  # tokens of a training sequence kept for the chat template, a question and its answer

# General-knowledge questions of the kinds a LoRA trained on one document's single-fact pairs stops answering
# in their own way (comparisons, yes/no), each with its bare answer; none is a worked example of the prompt.
REPLAY_QA: tuple[tuple[str, str], ...] = (
    ("Who was born later, Charles Darwin or Albert Einstein?", "Albert Einstein"),
    ("Were Pablo Picasso and Salvador Dali born in the same country?", "yes"),
    ("Which city has the larger population, Tokyo or Oslo?", "Tokyo"),
    ("Was the Eiffel Tower built before 1800?", "no"),
    ("Which was founded first, the University of Oxford or Harvard University?", "the University of Oxford"),
    ("Were William Shakespeare and Leo Tolstoy born in the same country?", "no"),
)


def replay_sha256(n: int) -> str:
    """Content hash of the first ``n`` replay pairs (enters the store key of a recipe that trains them)."""
    return hashlib.sha256(json.dumps(REPLAY_QA[:n]).encode()).hexdigest()


@dataclass(frozen=True)
class PerDocConfig:
    """Settings of per-document LoRA training (paper §3.2 defaults); all of them enter the store key."""

    lr: float = 3e-4  # AdamW learning rate (paper: 3e-4)
    epochs: int = 1  # passes over each document's augmented set (paper: 1–2)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    loss_on: LossOn = "all"  # paper: causal-LM loss over the whole d ⊕ q ⊕ a
    init: Literal["random", "warmup"] = "random"  # paper Table 2: warm-up initialisation is better
    max_length: int = 3000  # tokens per sequence; longer ones keep their last max_length tokens
    seed: int = 0  # random init: each document's A is drawn from a generator seeded by (seed, its text)
    # The prompt's worked examples stand in every training sequence, as at answer time (read, never learned).
    # False: the sequences hold the document, the system turn and the question alone: about half the tokens
    # of a short document's sequence, so about half the training cost, at a prompt that differs from the one
    # asked at answer time.
    examples: bool = True
    # Where a QA pair is trained. "document": after the document, d ⊕ q ⊕ a (paper §3.2); the answer can be
    # copied from the context, so the loss on it teaches reading more than remembering. "none": each pair as
    # the closed-book question it will be asked as (no document before it), plus one causal-LM sequence per
    # variant d_i^k (the text itself, every token learned): the LoRA alone must produce the answer.
    qa_context: Literal["document", "none"] = "document"
    # Format replay: the first `replay` pairs of REPLAY_QA (general-knowledge comparison and yes/no questions,
    # none about the document) are trained closed-book beside the document's own pairs every epoch, so a LoRA
    # trained only on single-fact questions keeps answering other kinds of question in their own way.
    replay: int = 0
    # What a replayed pair is trained on: "all" (every token, as the document's own pairs under loss_on="all")
    # or "answer" (its bare answer only). A sequence's loss is a mean over its learned tokens, so "answer"
    # weighs a replayed answer ten to twenty times more: on the fictional questions the LoRAs then answer
    # most questions "yes" or "no" (kept for that ablation; "all" is the one to use).
    replay_loss_on: LossOn = "all"
    # Where the replayed pairs stand in each epoch: "end" (after the document's own sequences) or "spread"
    # (evenly among them, the document's own last), so an epoch does not end on questions about no document.
    replay_position: Literal["end", "spread"] = "end"

    def __post_init__(self) -> None:
        if self.qa_context not in ("document", "none"):
            raise HyperPragError(f"qa_context must be 'document' (the paper) or 'none' (closed-book QA pairs and "
                                 f"the document as plain text), not {self.qa_context!r}.")
        if not 0 <= self.replay <= len(REPLAY_QA):
            raise HyperPragError(f"replay must be between 0 and {len(REPLAY_QA)} (the replay pairs there are), "
                                 f"not {self.replay}.")
        if self.replay_loss_on not in ("all", "answer"):
            raise HyperPragError(f"replay_loss_on must be 'all' (every token of a replayed pair) or 'answer' (its "
                                 f"answer only), not {self.replay_loss_on!r}.")
        if self.replay_position not in ("end", "spread"):
            raise HyperPragError(f"replay_position must be 'end' (after the document's own sequences) or 'spread' "
                                 f"(evenly among them), not {self.replay_position!r}.")

    def settings(self) -> dict:
        """The fields as a dict; ``examples``, ``qa_context`` and the ``replay`` fields only when changed from
        their defaults, so keys stored before they existed stay valid."""
        settings = asdict(self)
        if self.examples:
            del settings["examples"]
        if self.qa_context == "document":
            del settings["qa_context"]
        if not self.replay:
            del settings["replay"]
        if not self.replay or self.replay_loss_on == "all":  # without replayed pairs they change nothing
            del settings["replay_loss_on"]
        if not self.replay or self.replay_position == "end":
            del settings["replay_position"]
        return settings


@dataclass
class StepBatch:
    """What one step of the bank trains: the t-th sequence of every still-active document."""

    rows: Tensor  # (n,) bank rows (documents) trained at this step
    input_ids: Tensor  # (n, T) right-padded to this step's longest sequence
    attention_mask: Tensor  # (n, T) 1 = real token
    labels: Tensor  # (n, T) IGNORE at padding (and at the prefix for loss_on="answer")
    finished: Tensor  # (f,) bank rows whose last step this is: read them out after the optimizer step

    def to(self, device: torch.device | str) -> "StepBatch":
        return StepBatch(self.rows.to(device), self.input_ids.to(device), self.attention_mask.to(device),
                         self.labels.to(device), self.finished.to(device))


# ----------------------------------------------------------------------------------------------- data


def document_sequences(base: BaseModel, aug: "AugmentedDocument", config: PerDocConfig) -> list[TokenSequence]:
    """Tokenized training sequences of one augmented document, in ``augment.training_pairs`` order.

    Args:
        base: the base model (tokenizer and chat template).
        aug: the augmented document.
        config: trainer settings (``loss_on``, ``max_length``).

    Returns:
        ``qa_context="document"``: one :class:`TokenSequence` per (d_i^k, q_i^j, a_i^j); for a document
        the augmentation left with no QA pair (the LLM's output never parsed), one causal-LM sequence per
        variant d_i^k, so the document is still encoded (its text is the whole target) instead of failing
        the run. ``qa_context="none"``: one causal-LM sequence per variant d_i^k, then one closed-book
        sequence q_i^j ⊕ a_i^j per QA pair. The ``replay`` general pairs come after these
        (``replay_position="end"``) or evenly among them (``"spread"``).
    """
    from hyper_prag.augment import training_pairs

    eos = base.tokenizer.eos_token or ""
    texts = [tokenize(base, "", f"{d.strip()}{eos}", "all", config.max_length) for d in aug.variants]
    head = fixed_head(base) if config.examples else ""  # the system turn and worked examples: read, never learned
    replay = [tokenize(base, *closed_book_sequence(base, q, a, examples=config.examples), config.replay_loss_on,
                       config.max_length, unlearned=head) for q, a in REPLAY_QA[:config.replay]]
    if config.qa_context == "none":
        own = texts + [tokenize(base, *closed_book_sequence(base, q, a, examples=config.examples), config.loss_on,
                                config.max_length, unlearned=head) for q, a in aug.qa]
    elif pairs := training_pairs(aug):
        own = [tokenize(base, *training_sequence(base, d, q, a, examples=config.examples), config.loss_on,
                        config.max_length, unlearned=head) for d, q, a in pairs]
    else:
        log.warning("document %r has no augmented QA pair: training its LoRA on its text alone", aug.doc_id)
        own = texts
    return own + replay if config.replay_position == "end" else spread(own, replay)


def spread(own: Sequence[TokenSequence], extra: Sequence[TokenSequence]) -> list[TokenSequence]:
    """``own`` with ``extra`` inserted evenly among it, order kept: the j-th extra sequence (from 0) before
    ``own[(j + 1) · len(own) // (len(extra) + 1)]``, so ``own``'s last sequence stays last."""
    out = list(own)
    for j in reversed(range(len(extra))):
        out.insert((j + 1) * len(own) // (len(extra) + 1), extra[j])
    return out


def step_schedule(sequences: Sequence[Sequence[TokenSequence]], epochs: int, pad_id: int) -> list[StepBatch]:
    """Lays out the training steps of a bank: step t holds the t-th sequence of every document that has one.

    Each document's own sequence list is repeated ``epochs`` times (epoch-major), so document n is
    active at steps 0 … epochs·len(sequences[n]) − 1: a contiguous prefix (see the module docstring).

    Args:
        sequences: per document, its tokenized sequences.
        epochs: passes over each document's sequences.
        pad_id: token id used for right padding.

    Returns:
        One :class:`StepBatch` per step, padded to that step's longest sequence.
    """
    per_doc = [list(seqs) * epochs for seqs in sequences]
    if any(not seqs for seqs in per_doc):
        raise HyperPragError("every document needs at least one training sequence (and epochs >= 1).")
    steps = []
    for t in range(max(len(seqs) for seqs in per_doc)):
        rows = [n for n, seqs in enumerate(per_doc) if t < len(seqs)]
        ids, mask, labels = right_pad([per_doc[n][t] for n in rows], pad_id)  # each (n, T)
        finished = [n for n in rows if t == len(per_doc[n]) - 1]
        steps.append(StepBatch(torch.tensor(rows), ids, mask, labels, torch.tensor(finished, dtype=torch.long)))
    return steps


# ------------------------------------------------------------------------------------------- the bank


class MetricsLogger(Protocol):
    """Where the bank writes its per-step losses: any Lightning logger (CSV, W&B) has this method."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


class LoraBank(nn.Module):
    """The LoRA bank of one chunk of documents: its A and B are the only parameters; the step code of every runner.

    The frozen base model is held as a plain attribute (not a sub-module), so no runner trains, moves
    or switches it to train mode. :meth:`result` returns every document's LoRA as read out right after
    its own last step. A runner makes, per step of the schedule: ``optimizer.zero_grad()``,
    ``loss(batch).backward()``, ``optimizer.step()``, ``read_out(batch, t)`` (:func:`fit_steps`).
    """

    def __init__(self, base: BaseModel, initial: Lora, lr: float = 3e-4, weight_decay: float = 0.0,
                 metrics_logger: MetricsLogger | None = None, step_offset: int = 0) -> None:
        """
        Args:
            base: the frozen base model.
            initial: the N starting LoRAs (batched).
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            metrics_logger: a logger for per-step losses (shared by all chunks of a run).
            step_offset: global step of this bank's first step in that logger (chunks continue the count).
        """
        super().__init__()
        if initial.batch_size is None:
            raise HyperPragError("LoraBank needs a batch of initial LoRAs (one per document); stack() them.")
        self.base, self.spec = base, initial.spec
        self.lr, self.weight_decay = lr, weight_decay
        self.metrics_logger, self.step_offset = metrics_logger, step_offset
        device, dtype = base.device, torch.float32  # fp32 factors and optimizer state whatever the model's dtype
        self.A = nn.ParameterDict({m: nn.Parameter(a.detach().to(device, dtype).clone()) for m, a in initial.A.items()})
        self.B = nn.ParameterDict({m: nn.Parameter(b.detach().to(device, dtype).clone()) for m, b in initial.B.items()})
        start = initial.detach()
        self._final = Lora(self.spec, {m: t.to("cpu", torch.float32).clone() for m, t in start.A.items()},
                           {m: t.to("cpu", torch.float32).clone() for m, t in start.B.items()})  # filled as docs finish
        self.losses: list[Tensor] = []  # (n,) per-document losses of each step, detached, for logs and tests

    def lora(self, rows: Tensor | None = None) -> Lora:
        """The bank as a (differentiable) batched :class:`Lora`, or only ``rows`` of it."""
        if rows is None or len(rows) == self.A[self.spec.target_modules[0]].shape[0]:
            return Lora(self.spec, dict(self.A), dict(self.B))
        return Lora(self.spec, {m: a[rows] for m, a in self.A.items()}, {m: b[rows] for m, b in self.B.items()})

    def loss(self, batch: StepBatch) -> Tensor:
        """One step of every active document: the sum of their per-document losses (each a mean over its tokens)."""
        per_doc = sequence_losses(self.base, self.lora(batch.rows), batch.input_ids, batch.attention_mask,
                                  batch.labels)  # (n,)
        self.losses.append(per_doc.detach().cpu())
        return per_doc.sum()

    @torch.no_grad()
    def read_out(self, batch: StepBatch, step: int) -> None:
        """After the optimizer step: logs the step's losses and reads out the LoRAs of documents whose last step it was."""
        if self.metrics_logger:
            per_doc = self.losses[-1]
            self.metrics_logger.log_metrics({"encode/loss": per_doc.mean().item(), "encode/docs_in_step": len(per_doc)},
                                            step=self.step_offset + step)
        for m in self.spec.target_modules:
            self._final.A[m][batch.finished.cpu()] = self.A[m].detach()[batch.finished].float().cpu()
            self._final.B[m][batch.finished.cpu()] = self.B[m].detach()[batch.finished].float().cpu()

    def make_optimizer(self) -> torch.optim.Optimizer:
        # No gradient clipping: a global norm over the bank would couple documents.
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def result(self) -> Lora:
        """Every document's trained LoRA, batched: A (N, L, r, d_in), B (N, L, d_out, r), float32 on CPU."""
        return self._final


FitBank = Callable[[LoraBank, list[StepBatch]], None]  # a runner: trains a bank over its schedule, in order


def fit_steps(bank: LoraBank, steps: list[StepBatch]) -> None:
    """The plain loop runner: the bank's steps in order, the calls a Lightning ``Trainer`` makes, without it.

    Args:
        bank: the bank.
        steps: its schedule (:func:`step_schedule`).
    """
    device = bank.base.device
    bank.to(device)
    optimizer = bank.make_optimizer()
    for t, batch in enumerate(steps):
        batch = batch.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = bank.loss(batch)
        loss.backward()
        optimizer.step()
        bank.read_out(batch, t)


# ---------------------------------------------------------------------------------------- public API


def document_seed(seed: int, text: str) -> int:
    """The init seed of one document: a function of (seed, text) only, so a LoRA does not depend on its chunk."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{text}".encode()).digest()[:8], "little")


def initial_loras(texts: Sequence[str], spec: LoraSpec, dims: dict[str, tuple[int, int]], config: PerDocConfig,
                  warmup: Lora | None = None) -> Lora:
    """The starting LoRA of every document, batched (N, …).

    Args:
        texts: the documents' texts (seed the random init).
        spec: the bound LoRA spec.
        dims: ``module -> (d_in, d_out)``.
        config: ``init="random"``: A Kaiming-uniform, B = 0 (lora.init_lora); ``"warmup"``: a copy of ``warmup``.
        warmup: the warm-up LoRA (required for ``init="warmup"``).

    Returns:
        A batch of N LoRAs.
    """
    if config.init == "warmup":
        if warmup is None:
            raise HyperPragError("init='warmup' needs a warm-up LoRA: train one with train_warmup_lora() on "
                                 "held-out documents (or use init='random').")
        if warmup.spec != spec:
            raise HyperPragError(f"the warm-up LoRA's spec {warmup.spec} differs from the encoder's {spec}; retrain it.")
        return stack([warmup.detach().to("cpu", torch.float32)] * len(texts))
    gens = [torch.Generator().manual_seed(document_seed(config.seed, t)) for t in texts]
    return stack([init_lora(spec, dims, generator=g) for g in gens])


def train_bank(base: BaseModel, sequences: Sequence[Sequence[TokenSequence]], initial: Lora, config: PerDocConfig,
               fit: FitBank = fit_steps, logger: MetricsLogger | None = None, step_offset: int = 0
               ) -> tuple[Lora, list[Tensor]]:
    """Trains one LoRA per document, all documents in one bank (see the module docstring).

    Args:
        base: the frozen base model.
        sequences: per document, its tokenized training sequences.
        initial: the N starting LoRAs (:func:`initial_loras`).
        config: trainer settings.
        fit: the runner (:func:`fit_steps`, or e.g. the ``lightning.Trainer`` runner of ``hyper_prag/training/encode.py``).
        logger: logger for per-step losses (any Lightning logger).
        step_offset: global step of the first step in that logger.

    Returns:
        ``(loras, losses)``: the N trained LoRAs batched (float32, CPU) and each step's (n,) per-document losses.
    """
    if initial.batch_size != len(sequences):
        raise HyperPragError(f"{len(sequences)} documents but {initial.batch_size} initial LoRAs.")
    steps = step_schedule(sequences, config.epochs, base.tokenizer.pad_token_id)
    bank = LoraBank(base, initial, lr=config.lr, weight_decay=config.weight_decay, metrics_logger=logger,
                    step_offset=step_offset)
    fit(bank, steps)
    return bank.result(), bank.losses


def train_warmup_lora(base: BaseModel, spec: LoraSpec, held_out: Sequence["AugmentedDocument"],
                      config: PerDocConfig = PerDocConfig(), max_steps: int | None = 64) -> Lora:
    """Trains the warm-up LoRA (paper Table 2): one LoRA briefly on the augmented data of held-out documents.

    Every document of the corpus then starts from a copy of it (``PerDocConfig(init="warmup")``).

    Args:
        base: the frozen base model.
        spec: the bound LoRA spec.
        held_out: augmented documents that will *not* be encoded (e.g. the train split).
        config: lr, weight decay, loss and seed (its ``init`` is ignored: the warm-up starts at random).
        max_steps: at most this many sequences (one per step, round-robin over documents); ``None``: all.

    Returns:
        One LoRA.
    """
    if not held_out:
        raise HyperPragError("train_warmup_lora() needs held-out augmented documents (e.g. the train split).")
    per_doc = [document_sequences(base, aug, config) for aug in held_out]
    stream = [seqs[j] for j in range(max(map(len, per_doc))) for seqs in per_doc if j < len(seqs)]  # round-robin
    stream = stream[:max_steps] if max_steps else stream
    dims = {m: base.module_dims(m) for m in spec.target_modules}
    initial = initial_loras([f"warmup:{len(held_out)}"], spec, dims, replace(config, init="random"))
    loras, _ = train_bank(base, [stream], initial, replace(config, epochs=1))
    return loras.unbind()[0]


class PerDocEncoder:
    """The paper's per-document encoder f_φ, batched: ``encode`` trains one LoRA per augmented document.

    Implements :class:`hyper_prag.encoders.Encoder`.
    """

    name = "per-doc"
    uses_augmentation = True

    def __init__(self, base: BaseModel, spec: LoraSpec = LoraSpec(), config: PerDocConfig = PerDocConfig(),
                 warmup: Lora | None = None, fit: FitBank = fit_steps, logger: MetricsLogger | None = None) -> None:
        """
        Args:
            base: the frozen base model.
            spec: LoRA rank/alpha/targets (bound to ``base`` here).
            config: trainer settings.
            warmup: the warm-up LoRA for ``config.init="warmup"``.
            fit: the runner of each chunk's bank: :func:`fit_steps` (plain loop) or another with the same calls
                (``hyper_prag/training/encode.py`` passes its ``lightning.Trainer`` runner); the LoRAs are the same.
            logger: logger for per-step losses, any Lightning logger (global steps across chunks).
        """
        self.base, self.spec, self.config = base, spec.for_model(base), config
        self.warmup, self.fit, self.logger = warmup, fit, logger
        if config.init == "warmup" and warmup is None:
            raise HyperPragError("init='warmup' needs a warm-up LoRA (train_warmup_lora), or use init='random'.")
        self.last_losses: list[Tensor] = []
        self.steps_done = 0  # global step count across encode() calls, for the logger

    def settings(self) -> dict:
        """Encoder identity and trainer settings (enter the store key). The warm-up LoRA enters by content hash."""
        settings = {"name": self.name, **self.config.settings(), "prompt": format_id()}
        if self.config.init == "warmup":
            settings["warmup_sha256"] = lora_sha256(self.warmup)
        if self.config.replay:
            settings["replay_sha256"] = replay_sha256(self.config.replay)
        return settings

    @property
    def window(self) -> int:
        """Document tokens one training sequence holds beside a question and its answer (``max_length`` − 256)."""
        return max(1, self.config.max_length - QA_ROOM if self.config.max_length > 2 * QA_ROOM else self.config.max_length // 2)

    def pieces(self, aug: "AugmentedDocument") -> list["AugmentedDocument"]:
        """The document itself if it fits :attr:`window`, else its pieces (see :mod:`hyper_prag.encoders`).

        Each QA pair goes to the piece that contains its answer (the first piece when none does); the
        rewrites, which restate the whole document, go to the first piece.
        """
        from hyper_prag.augment import AugmentedDocument

        texts = split_text(self.base, aug.text, self.window)
        if len(texts) == 1:
            return [aug]
        owner = [next((i for i, t in enumerate(texts) if a.strip().lower() in t.lower()), 0) for _, a in aug.qa]
        return [AugmentedDocument(doc_id=f"{aug.doc_id}#{i}", text=t, rewrites=aug.rewrites if i == 0 else (),
                                  qa=tuple(pair for pair, o in zip(aug.qa, owner) if o == i))
                for i, t in enumerate(texts)]

    def encode(self, documents: Sequence["AugmentedDocument"]) -> list[Lora]:
        """Trains one LoRA per augmented document, all in one bank.

        A document longer than :attr:`window` tokens trains one LoRA per piece (:meth:`pieces`), and its
        LoRA is their sum (rank concatenation): every part of it is in some training sequence.

        Args:
            documents: augmented documents (one chunk).

        Returns:
            One LoRA per document (float32, CPU), in order.
        """
        if not documents:
            return []
        start = time.perf_counter()
        pieces = [self.pieces(aug) for aug in documents]
        flat = [p for ps in pieces for p in ps]
        if len(flat) > len(documents):
            log.info("%d long documents cut into %d pieces of at most %d tokens",
                     sum(len(ps) > 1 for ps in pieces), sum(len(ps) for ps in pieces if len(ps) > 1), self.window)
        dims = {m: self.base.module_dims(m) for m in self.spec.target_modules}
        trained: list[Lora] = []
        self.last_losses = []
        bank_size = len(documents)  # pieces train in banks no larger than the chunk the caller sized for memory
        for b in range(0, len(flat), bank_size):
            bank = flat[b : b + bank_size]
            sequences = [document_sequences(self.base, aug, self.config) for aug in bank]
            initial = initial_loras([aug.text for aug in bank], self.spec, dims, self.config, self.warmup)
            loras, losses = train_bank(self.base, sequences, initial, self.config, fit=self.fit,
                                       logger=self.logger, step_offset=self.steps_done)
            self.steps_done += len(losses)
            self.last_losses += losses
            trained += [lora.detach() for lora in loras.unbind()]
        log.debug("trained %d LoRAs in %.1f s", len(flat), time.perf_counter() - start)
        out, at = [], 0
        for ps in pieces:
            part = trained[at : at + len(ps)]
            out.append(part[0] if len(part) == 1 else combine(part, "sum"))
            at += len(ps)
        return out

