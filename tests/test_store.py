import multiprocessing as mp

import pytest
import torch

from hyper_prag.errors import HyperPragError
from hyper_prag.lora import LoraSpec
from hyper_prag.model import tiny_base_model
from hyper_prag.store import LoraStore, store_key
from tests.conftest import random_lora


def test_round_trip_fp32_exact_and_bf16_rounded(tiny, tmp_path):
    lora = random_lora(tiny, seed=0)
    for dtype, tol in (("float32", 0.0), ("bfloat16", 1e-2)):
        store = LoraStore(tmp_path / dtype, dtype=dtype)
        store.put("k1", lora, {"doc_id": "d1"})
        back = LoraStore(tmp_path / dtype).get("k1", base_model=tiny.identity)
        assert back.spec == lora.spec
        for m in lora.spec.target_modules:
            assert torch.allclose(back.A[m], lora.A[m], atol=tol, rtol=tol)
            assert torch.allclose(back.B[m], lora.B[m], atol=tol, rtol=tol)
        assert store.meta("k1") == {"doc_id": "d1"}


def test_key_changes_with_every_input(tiny):
    spec = LoraSpec().for_model(tiny)
    base = store_key("text", tiny.identity, spec, {"n_qa": 3}, {"lr": 3e-4})
    assert base == store_key("text", tiny.identity, spec, {"n_qa": 3}, {"lr": 3e-4})
    variants = [
        store_key("text!", tiny.identity, spec, {"n_qa": 3}, {"lr": 3e-4}),
        store_key("text", "other-model", spec, {"n_qa": 3}, {"lr": 3e-4}),
        store_key("text", tiny.identity, LoraSpec(rank=4).for_model(tiny), {"n_qa": 3}, {"lr": 3e-4}),
        store_key("text", tiny.identity, spec, {"n_qa": 4}, {"lr": 3e-4}),
        store_key("text", tiny.identity, spec, {"n_qa": 3}, {"lr": 1e-4}),
    ]
    assert len({base, *variants}) == 6


def test_cache_hit_and_missing(tiny, tmp_path):
    store = LoraStore(tmp_path)
    store.put_many([("a", random_lora(tiny, 0), {}), ("b", random_lora(tiny, 1), {})])
    assert "a" in store and "c" not in store
    assert store.missing(["a", "c", "b", "d"]) == ["c", "d"]
    store.put_many([("a", random_lora(tiny, 2), {})])  # already stored: no new shard
    assert store.stats()["shards"] == 1
    stats = store.stats()
    assert stats["documents"] == 2 and stats["bytes_per_document"] == stats["bytes"] / 2


def test_lora_of_other_base_model_is_refused(tiny, tmp_path):
    store = LoraStore(tmp_path)
    store.put("x", random_lora(tiny_base_model(seed=1), 0))
    with pytest.raises(HyperPragError, match="made for base model"):
        store.get("x", base_model=tiny.identity)


def test_corrupted_shard_is_detected(tiny, tmp_path):
    store = LoraStore(tmp_path)
    store.put_many([("a", random_lora(tiny, 0), {})])
    shard = next((tmp_path / "shards").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(HyperPragError, match="corrupted"):
        LoraStore(tmp_path).verify()
    shard.write_bytes(bytes(data[:40]))  # truncated
    with pytest.raises(HyperPragError, match="truncated or corrupted"):
        LoraStore(tmp_path).get("a")


def test_half_written_shard_is_ignored_and_collected(tiny, tmp_path):
    store = LoraStore(tmp_path)
    store.put("a", random_lora(tiny, 0))
    shards = tmp_path / "shards"
    (shards / "deadbeef.safetensors").write_bytes(b"partial")  # died before its sidecar
    (shards / ".x.safetensors.123.tmp").write_bytes(b"partial")
    fresh = LoraStore(tmp_path)
    assert fresh.keys() == ["a"]
    fresh.verify()
    assert fresh.gc() == 2
    assert fresh.get("a") is not None


def _writer(root: str, worker: int) -> None:
    base = tiny_base_model(seed=0)
    store = LoraStore(root)
    for i in range(3):
        store.put_many([(f"w{worker}-{i}-{j}", random_lora(base, 100 * worker + 10 * i + j), {"w": worker})
                        for j in range(2)])


def test_concurrent_writers_do_not_corrupt(tiny, tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = LoraStore(tmp_path)
    store.verify()
    assert len(store) == 18
    for w in range(3):
        lora = store.get(f"w{w}-2-1", base_model=tiny.identity)
        expected = random_lora(tiny, 100 * w + 21)
        assert torch.allclose(lora.B["up_proj"], expected.B["up_proj"], atol=1e-2)
