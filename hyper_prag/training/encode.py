"""Per-document LoRA encoding (paper §3.2) with Lightning: the ``lightning.Trainer`` runner and its CLI.

    hyper-prag encode --config tiny [--limit 4 --chunk-size 2 --trainer.epochs 2 ...]
    (the same: hyper-prag train encode …; from a checkout: python -m train.encode --config configs/encode/tiny.yaml)

The schema is :func:`hyper_prag.api.encode`'s signature (parsed by jsonargparse, the library under
LightningCLI: the per-chunk LoRA bank is built from the data, so the module is not a config object itself).
One key is this entry point's: ``runner``. With ``runner: lightning`` every chunk's bank trains under a
``lightning.Trainer`` (:func:`fit_lightning`: progress bar, callbacks, accelerators); with ``runner: loop``
the library's plain loop (:func:`hyper_prag.encoders.per_doc.fit_steps`) runs it.

Both runners drive the same step code (:class:`~hyper_prag.encoders.per_doc.LoraBank`) with the same
calls in the same order: zero the gradients, ``loss(batch).backward()``, one AdamW step, read out the
documents that finished. The LoRAs are bit-identical (tested), so the store keys, which name no runner,
stay valid whichever trained them. :class:`PerDocLoraModule` is the bank as a ``LightningModule``: it
adds only the progress-bar loss; :class:`StepDataModule` yields the precomputed schedule, one batch
per step, and the Trainer makes one epoch over it (the schedule already holds every epoch).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from hyper_prag.api import encode, load_encode_config
from hyper_prag.encode import EncodeReport
from hyper_prag.encoders.per_doc import FitBank, LoraBank, StepBatch

log = logging.getLogger(__name__)


class PerDocLoraModule(pl.LightningModule):
    """A :class:`~hyper_prag.encoders.per_doc.LoraBank` as a LightningModule: its parameters are the bank's.

    The frozen base model is an attribute of the bank, not a sub-module: Lightning neither trains nor
    moves it.
    """

    def __init__(self, bank: LoraBank) -> None:
        """
        Args:
            bank: the LoRA bank of one chunk (its step code, optimizer and read-out).
        """
        super().__init__()
        self.bank = bank

    def training_step(self, batch: StepBatch, batch_idx: int) -> Tensor:
        """The sum of the active documents' losses (the bank's :meth:`~LoraBank.loss`)."""
        loss = self.bank.loss(batch)
        n = len(batch.rows)
        self.log("loss", loss.detach() / n, prog_bar=True, logger=False, batch_size=n)
        return loss

    def on_train_batch_end(self, outputs, batch: StepBatch, batch_idx: int) -> None:
        """After the optimizer step: reads out the documents whose last step this was."""
        self.bank.read_out(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.bank.make_optimizer()


class StepDataModule(pl.LightningDataModule):
    """Yields the precomputed :class:`~hyper_prag.encoders.per_doc.StepBatch` es of one bank, in order."""

    def __init__(self, steps: list[StepBatch]) -> None:
        """
        Args:
            steps: the bank's schedule (:func:`hyper_prag.encoders.per_doc.step_schedule`), one batch per step.
        """
        super().__init__()
        self.steps = steps

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.steps, batch_size=None, shuffle=False, collate_fn=lambda step: step)


def fit_lightning(bank: LoraBank, steps: list[StepBatch], progress: bool = False,
                  callbacks: Sequence[pl.Callback] = ()) -> None:
    """Runs the bank's steps with ``lightning.Trainer`` (one epoch over a schedule that holds all epochs).

    The Trainer gets ``logger=False``: one Trainer runs per chunk and would restart its step count at 0,
    so the bank logs its losses itself to the run's shared logger, at global steps.

    Args:
        bank: the bank.
        steps: its schedule.
        progress: show Lightning's progress bar.
        callbacks: extra Lightning callbacks.
    """
    device = bank.base.device
    if device.type == "cuda":  # the base model's own GPU: cuda:<local rank> on a rank of a distributed encode
        accelerator, devices = "gpu", [device.index if device.index is not None else torch.cuda.current_device()]
    else:
        accelerator, devices = "cpu", 1
    with _quiet_lightning():
        trainer = pl.Trainer(
            max_epochs=1, logger=False, enable_checkpointing=False, devices=devices, accelerator=accelerator,
            enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=list(callbacks), log_every_n_steps=1,
        )
        trainer.fit(PerDocLoraModule(bank), datamodule=StepDataModule(steps))


def lightning_runner(progress: bool = False, callbacks: Sequence[pl.Callback] = ()) -> FitBank:
    """:func:`fit_lightning` with these options, as the ``fit`` of a ``PerDocEncoder`` or :func:`hyper_prag.api.encode`."""
    return partial(fit_lightning, progress=progress, callbacks=tuple(callbacks))


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silences Lightning's per-Trainer INFO banners (one Trainer runs per chunk), restoring the levels after."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch.utilities.rank_zero",
                                                     "lightning.pytorch.accelerators.cuda")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run(argv: Sequence[str] = (), prog: str = "hyper-prag encode") -> EncodeReport:
    """Encodes what the config (and ``--key value`` overrides) says, each bank under the runner it names.

    Args:
        argv: ``--config NAME_OR_YAML`` and overrides, as on the command line.
        prog: the program name of usage lines and ``--help``.

    Returns:
        The :class:`~hyper_prag.encode.EncodeReport`.
    """
    config = load_encode_config(None, list(argv), prog=prog)
    fit = lightning_runner() if config["runner"] == "lightning" else None  # None: the library's loop
    return encode(**config, fit=fit)


def main(argv: Sequence[str] | None = None, prog: str = "hyper-prag encode") -> EncodeReport:
    """``hyper-prag encode --config …``: logs the run's :class:`~hyper_prag.encode.EncodeReport`.

    Args:
        argv: command-line arguments (``None``: ``sys.argv``).
        prog: the program name of usage lines and ``--help``.
    """
    report = run(sys.argv[1:] if argv is None else argv, prog)
    log.info("%s", report)
    log.info("encoded %d, skipped %d (cached), %.2f s/doc, %.0f bytes/doc -> %s", report.encoded, report.skipped,
             report.seconds_per_doc, report.bytes_per_doc, report.store)
    return report
