"""A resumed hypernet run goes on in the data order where its checkpoint stopped: it trains on the batches
the uninterrupted run would have seen next, not on the epoch's first batches again."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from hyper_prag.training.hypernet import HypernetDataModule, HypernetModule
from hyper_prag.training.hypernet_data import ResumableShuffle


def test_resumed_order_is_the_rest_of_the_epoch_then_new_epochs():
    whole = ResumableShuffle(23, seed=3)
    first, second = list(whole), list(whole)
    assert sorted(first) == sorted(second) == list(range(23)) and first != second  # every item once, reshuffled
    resumed = ResumableShuffle(23, seed=3)
    resumed.resume(batches=2, batch_items=4)  # two batches of 4 consumed
    assert list(resumed) == first[8:] and list(resumed) == second and len(resumed) == 23
    later = ResumableShuffle(23, seed=3)
    later.resume(batches=6 + 1, batch_items=4)  # 6 batches an epoch: the second epoch's second batch
    assert list(later) == second[4:]
    assert list(ResumableShuffle(23, seed=4)) != first


class Recorder(pl.Callback):
    """Every training batch's documents and token ids, in order."""

    def __init__(self) -> None:
        self.batches: list[tuple] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batches.append((tuple(batch.doc_rows.tolist()), tuple(batch.input_ids.flatten().tolist())))


def fit(tmp_path, max_steps: int, ckpt_path=None) -> Recorder:
    pl.seed_everything(0)
    module = HypernetModule(model="tiny", readout="fastweight", rank=2, layers=[1], lr=1e-3, warmup_steps=1)
    data = HypernetDataModule(model="tiny", readout="fastweight", layers=[1], batch_size=4, max_train_docs=6,
                              max_val_pairs=4, questions=False)
    recorder = Recorder()
    save = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True, every_n_train_steps=3)
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[recorder, save], accelerator="cpu")
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return recorder


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_resumed_fit_trains_on_the_batches_the_uninterrupted_one_saw_next(tmp_path):
    whole = fit(tmp_path / "whole", max_steps=5).batches
    fit(tmp_path / "cut", max_steps=3)
    resumed = fit(tmp_path / "cut", max_steps=5, ckpt_path=str(tmp_path / "cut" / "last.ckpt")).batches
    assert len(whole) == 5 and len(set(whole[:3])) == 3
    assert resumed == whole[3:]
    assert torch.load(tmp_path / "cut" / "last.ckpt", weights_only=False)["global_step"] == 5
