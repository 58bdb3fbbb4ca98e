"""The lower-state cache: a repeated setup reads the states entering the lowest adapted layer from disk, equal to
the computed ones; any change of what they depend on misses; a damaged file is recomputed and rewritten."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hyper_prag.activated import head_cache
from hyper_prag.model import BaseModel, tiny_base_model
from hyper_prag.prompts import fixed_head
from hyper_prag.training import hypernet_data
from hyper_prag.training.hypernet_data import HypernetDataModule, LowerStateCache, lower_states, tokenize_qa

QA = [("Who founded Ardent Loom?", "Mira Castell"), ("What colour is zorvath?", "blue"), ("What is Pell?", "a dog")]


@pytest.fixture(scope="module")
def three() -> BaseModel:
    """A 3-layer tiny random Llama: states can enter layer 1 or layer 2."""
    return tiny_base_model(seed=0, num_layers=3)


@pytest.fixture
def forwards(monkeypatch) -> list[int]:
    """Counts the calls of ``lower_states`` made through the cache (each appends its number of sequences)."""
    calls: list[int] = []

    def counted(base, sequences, *args, **kwargs):
        calls.append(len(sequences))
        return lower_states(base, sequences, *args, **kwargs)

    monkeypatch.setattr(hypernet_data, "lower_states", counted)
    return calls


def equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def test_second_setup_loads_the_states_without_a_forward(tmp_path, forwards, caplog):
    def setup() -> HypernetDataModule:
        data = HypernetDataModule(model="tiny", layers=[1], max_train_docs=6, max_val_pairs=5, batch_size=4,
                                  embedding_cache=str(tmp_path / "emb"), lower_state_cache=str(tmp_path / "lower"))
        data.setup("fit")
        return data

    with caplog.at_level(logging.INFO, logger=hypernet_data.__name__):
        first = setup()
        assert len(forwards) == 2 and len(list((tmp_path / "lower").glob("*.safetensors"))) == 2  # train, val
        second = setup()
    assert len(forwards) == 2  # nothing computed the second time
    assert sum("loaded from" in r.getMessage() for r in caplog.records) == 2
    for split in ("train", "val"):
        one, two = first.tables[split]["items"], second.tables[split]["items"]
        assert [it.sequence for it in one] == [it.sequence for it in two]
        assert equal([it.lower for it in one], [it.lower for it in two])
    batch = next(iter(second.val_dataloader()))
    assert batch.lower_layer == 1 and batch.lower.shape[:2] == batch.input_ids.shape


def test_a_changed_sequence_layer_or_head_misses(three, tmp_path, forwards):
    cache = LowerStateCache(tmp_path)
    seqs = [tokenize_qa(three, q, a, "answer") for q, a in QA]
    base_states = cache.get(three, seqs, start=1)
    assert equal(cache.get(three, seqs, start=1), base_states) and forwards == [3]
    changed = seqs[:2] + [tokenize_qa(three, QA[2][0], "a cat", "answer")]
    assert equal(cache.get(three, changed, start=1)[:2], base_states[:2]) and forwards == [3, 3]
    assert equal(cache.get(three, seqs[::-1], start=1), base_states[::-1]) and forwards == [3, 3, 3]  # the order
    assert not equal(cache.get(three, seqs, start=2), base_states) and forwards == [3] * 4
    head = head_cache(three, fixed_head(three))
    after_head = cache.get(three, seqs, start=1, head=head)
    assert [len(h) for h in after_head] == [len(s.input_ids) - head.length for s in seqs] and forwards == [3] * 5
    assert equal(cache.get(three, seqs, start=1, head=head), after_head) and forwards == [3] * 5
    assert len(list(tmp_path.glob("*.safetensors"))) == 5


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty"])
def test_a_damaged_file_is_recomputed_and_rewritten(three, tmp_path, forwards, caplog, damage):
    cache = LowerStateCache(tmp_path)
    seqs = [tokenize_qa(three, q, a, "answer") for q, a in QA]
    computed = cache.get(three, seqs, start=1)
    (path,) = tmp_path.glob("*.safetensors")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":  # a byte inside the states: the file still parses, only the sha256 tells
        header = int.from_bytes(data[:8], "little")
        at = 8 + header + json.loads(data[8 : 8 + header])["states"]["data_offsets"][0] + 3
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    else:
        path.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger=hypernet_data.__name__):
        again = cache.get(three, seqs, start=1)
    (warning,) = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert damage != "flipped" or "sha256" in warning
    assert equal(again, computed) and forwards == [3, 3]
    assert path.stat().st_size == len(data)  # rewritten whole, and served from then on
    assert equal(cache.get(three, seqs, start=1), computed) and forwards == [3, 3]
