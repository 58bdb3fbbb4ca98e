"""LoraStore: exact/rounded round trips, cache hits, base-model refusal, corruption, half writes, concurrency.

Spawned writer processes import this module, so it imports only torch and the store (LoRAs come from
the ``make_lora`` fixture, the model from ``tiny``), keeping each child start to a few seconds.
"""

import json
import multiprocessing as mp

import pytest
import torch

from hyper_prag.errors import HyperPragError
from hyper_prag.lora import Lora, LoraSpec, init_lora
from hyper_prag.store import LoraStore, quantize_int8, store_key, verify_store


def assert_close(back: Lora, lora: Lora, atol: float, rtol: float) -> None:
    assert back.spec == lora.spec
    for m in lora.spec.target_modules:
        assert back.A[m].dtype == torch.float32
        assert torch.allclose(back.A[m], lora.A[m], atol=atol, rtol=rtol)
        assert torch.allclose(back.B[m], lora.B[m], atol=atol, rtol=rtol)


def test_round_trip_fp32_exact_and_bf16_rounded(tiny, tmp_path, make_lora):
    lora = make_lora(tiny, seed=0)
    for dtype, rtol in (("float32", 0.0), ("bfloat16", 2**-8)):
        store = LoraStore(tmp_path / dtype, dtype=dtype)
        store.put("k1", lora, {"doc_id": "d1"})
        back = LoraStore(tmp_path / dtype).get("k1", base_model=tiny.identity)  # a fresh reader
        assert_close(back, lora, atol=0.0, rtol=rtol)
        assert store.meta("k1") == {"doc_id": "d1"}
    bf16 = LoraStore(tmp_path / "bfloat16").get("k1")
    assert not torch.equal(bf16.A["up_proj"], lora.A["up_proj"])  # bf16 really rounds


def test_int8_round_trip_within_half_a_step(tiny, tmp_path, make_lora):
    lora = make_lora(tiny, seed=3)
    store = LoraStore(tmp_path, dtype="int8")
    store.put("k", lora)
    zero = init_lora(lora.spec, {m: tiny.module_dims(m) for m in lora.spec.target_modules})  # B = 0
    store.put("zero", zero)
    back = LoraStore(tmp_path).get("k")
    for m in lora.spec.target_modules:
        step_a = lora.A[m].abs().amax(-1, keepdim=True) / 127  # (L, r, 1): one scale per row of A
        step_b = lora.B[m].abs().amax(-2, keepdim=True) / 127  # (L, 1, r): one scale per column of B
        assert ((back.A[m] - lora.A[m]).abs() <= step_a / 2 + 1e-7).all()
        assert ((back.B[m] - lora.B[m]).abs() <= step_b / 2 + 1e-7).all()
    assert all((b == 0).all() for b in store.get("zero").B.values())
    fp32 = LoraStore(tmp_path / "fp32", dtype="float32")
    fp32.put("k", lora)
    assert store.stats()["bytes_per_document"] < 0.3 * fp32.stats()["bytes_per_document"] * 2  # 2 entries vs 1


def test_quantize_int8_scales():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    q, scale = quantize_int8(x, dim=-1)
    assert q.dtype == torch.int8 and scale.shape == (2, 1)
    assert q[0].tolist() == [64, -127, 32] and (q[1] == 0).all()
    assert torch.allclose(q.float() * scale, x, atol=2 / 254)


def test_key_changes_with_every_input(tiny):
    spec = LoraSpec().for_model(tiny)
    base = store_key("text", tiny.identity, spec, {"n_qa": 3}, {"lr": 3e-4})
    assert base == store_key("text", tiny.identity, spec, {"n_qa": 3}, {"lr": 3e-4})
    assert base == store_key("text", tiny.identity, spec, {"n_qa": 3}, {"lr": 3e-4}.copy())
    assert len(base) == 64 and int(base, 16) >= 0
    variants = [
        store_key("text!", tiny.identity, spec, {"n_qa": 3}, {"lr": 3e-4}),
        store_key("text", "other-model", spec, {"n_qa": 3}, {"lr": 3e-4}),
        store_key("text", tiny.identity, LoraSpec(rank=4).for_model(tiny), {"n_qa": 3}, {"lr": 3e-4}),
        store_key("text", tiny.identity, LoraSpec(alpha=16.0).for_model(tiny), {"n_qa": 3}, {"lr": 3e-4}),
        store_key("text", tiny.identity, spec, {"n_qa": 4}, {"lr": 3e-4}),
        store_key("text", tiny.identity, spec, {"n_qa": 3}, {"lr": 1e-4}),
    ]
    assert len({base, *variants}) == 7


def test_cache_hit_missing_and_stats(tiny, tmp_path, make_lora):
    store = LoraStore(tmp_path)
    store.put_many([("a", make_lora(tiny, 0), {}), ("b", make_lora(tiny, 1), {})])
    assert "a" in store and "c" not in store
    assert store.missing(["a", "c", "b", "d"]) == ["c", "d"]
    store.put_many([("a", make_lora(tiny, 2), {})])  # already stored: no new shard, not re-written
    stats = store.stats()
    assert stats["shards"] == 1 and stats["documents"] == 2
    assert stats["bytes_per_document"] == stats["bytes"] / 2
    lora_bytes = make_lora(tiny, 0).num_bytes() // 2  # float32 -> bfloat16
    assert lora_bytes < stats["bytes_per_document"] < 1.2 * lora_bytes  # little overhead beyond the tensors
    assert torch.allclose(store.get("a").B["up_proj"], make_lora(tiny, 0).B["up_proj"], rtol=2**-8)


def test_writes_of_another_instance_are_seen(tiny, tmp_path, make_lora):
    reader = LoraStore(tmp_path)
    assert "a" not in reader
    LoraStore(tmp_path).put("a", make_lora(tiny, 0))
    assert "a" in reader and reader.missing(["a"]) == []


def test_entries_with_different_specs_and_get_many(tiny, tmp_path, make_lora):
    store = LoraStore(tmp_path, dtype="float32")
    r2, r4 = make_lora(tiny, 0), make_lora(tiny, 1, rank=4, alpha=8.0)
    store.put_many([("r2", r2, {}), ("r4", r4, {})])
    got = LoraStore(tmp_path).get_many(["r4", "r2", "r4"], base_model=tiny.identity)
    assert [g.spec for g in got] == [r4.spec, r2.spec, r4.spec]
    assert torch.equal(got[0].A["down_proj"], r4.A["down_proj"])


def test_lora_of_other_base_model_is_refused(tiny, tmp_path, make_lora):
    from hyper_prag.model import tiny_base_model

    other = tiny_base_model(seed=1)
    assert other.identity != tiny.identity
    store = LoraStore(tmp_path)
    store.put("x", make_lora(other, 0))
    with pytest.raises(HyperPragError, match="made for base model"):
        store.get("x", base_model=tiny.identity)
    with pytest.raises(HyperPragError, match="made for base model"):
        store.get_many(["x"], base_model=tiny.identity)
    assert store.get("x", base_model=other.identity).spec.base_model == other.identity


def test_unknown_key_and_non_finite_lora_are_refused(tiny, tmp_path, make_lora):
    store = LoraStore(tmp_path)
    with pytest.raises(HyperPragError, match="not in the store"):
        store.get("nope")
    bad = make_lora(tiny, 0)
    bad.B["up_proj"][0, 0, 0] = float("nan")
    with pytest.raises(HyperPragError, match="NaN"):
        store.put_many([("ok", make_lora(tiny, 1), {}), ("bad", bad, {})])
    assert store.missing(["ok", "bad"]) == ["ok", "bad"]  # all or nothing
    with pytest.raises(HyperPragError, match="dtype"):
        LoraStore(tmp_path, dtype="float16")


def _one_shard(store: LoraStore):
    shards = list(store.shards.glob("*.safetensors"))
    assert len(shards) == 1
    return shards[0]


def test_flipped_bytes_are_found_by_verify(tiny, tmp_path, make_lora):
    store = LoraStore(tmp_path)
    store.put_many([("a", make_lora(tiny, 0), {}), ("b", make_lora(tiny, 1), {})])
    store.verify()
    shard = _one_shard(store)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data: the file still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(HyperPragError, match=f"(?s){shard.stem}.*--repair.*re-run encode"):
        LoraStore(tmp_path).verify()


def test_truncated_or_unparseable_shard_is_found_by_get(tiny, tmp_path, make_lora):
    store = LoraStore(tmp_path)
    store.put_many([("a", make_lora(tiny, 0), {})])
    shard = _one_shard(store)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(HyperPragError, match=f"{shard.stem}.*truncated or corrupted.*store verify .*--repair"):
        LoraStore(tmp_path).get("a")
    with pytest.raises(HyperPragError, match=shard.stem):
        LoraStore(tmp_path).verify()
    garbled = bytearray(data)
    garbled[8:24] = b"\xff" * 16  # inside the JSON header: same size, no longer parses
    shard.write_bytes(bytes(garbled))
    reader = LoraStore(tmp_path)
    with pytest.raises(HyperPragError, match=f"{shard.stem}.*truncated or corrupted"):
        reader.get("a")
    shard.unlink()  # what the message says to do; then encode finds the document missing and re-encodes it
    shard.with_suffix(".json").unlink()
    assert reader.missing(["a"]) == ["a"]
    reader.put("a", make_lora(tiny, 0))
    assert torch.allclose(LoraStore(tmp_path).get("a").A["up_proj"], make_lora(tiny, 0).A["up_proj"], rtol=2**-8)


def test_half_written_shard_is_ignored_and_collected(tiny, tmp_path, make_lora):
    store = LoraStore(tmp_path)
    store.put("a", make_lora(tiny, 0))
    shards = tmp_path / "shards"
    (shards / "deadbeef.safetensors").write_bytes(b"partial")  # died before its sidecar
    (shards / ".x.safetensors.123.tmp").write_bytes(b"partial")  # died before the rename
    (shards / ".y.json.456.tmp").write_bytes(b'{"format"')
    fresh = LoraStore(tmp_path)
    assert fresh.keys() == ["a"] and fresh.stats()["shards"] == 1
    fresh.verify()
    assert fresh.gc().removed == []  # too young: could be a live writer's
    assert len(fresh.gc(min_age_seconds=0).removed) == 3
    assert sorted(p.suffix for p in shards.iterdir()) == [".json", ".safetensors"]
    assert fresh.get("a") is not None


N_ROUNDS = 10  # put_many calls per writer (plus one racing on a shared key each round)


def _spawned_lora(identity: str, seed: int) -> Lora:
    """A random LoRA with the tiny model's shapes, built without loading the model (fast in a child)."""
    spec = LoraSpec(layers=(0, 1), base_model=identity)
    gen = torch.Generator().manual_seed(seed)
    dims = {"gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    A = {m: torch.randn(2, spec.rank, dims[m][0], generator=gen) for m in spec.target_modules}
    B = {m: torch.randn(2, dims[m][1], spec.rank, generator=gen) for m in spec.target_modules}
    return Lora(spec, A, B)


def _writer(root: str, identity: str, worker: int, start) -> None:
    store = LoraStore(root, dtype="float32")
    start.wait(60)  # all writers write at the same time, not one after another as they finish importing
    for i in range(N_ROUNDS):
        store.put_many([(f"w{worker}-{i}-{j}", _spawned_lora(identity, 100 * worker + 10 * i + j), {"w": worker})
                        for j in range(3)])
        store.put_many([(f"shared-{i}", _spawned_lora(identity, i), {"w": worker})])  # racing on one key


def test_concurrent_writers_do_not_corrupt(tiny, tmp_path):
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(3)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), tiny.identity, w, start)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = LoraStore(tmp_path)
    store.verify()
    assert len(store) == 3 * N_ROUNDS * 3 + N_ROUNDS
    # One shard per put_many that had a new key: of the writers racing on "shared-i", only the first stores it.
    assert store.stats()["shards"] == 3 * N_ROUNDS + N_ROUNDS
    listed = [key for sidecar in (tmp_path / "shards").glob("*.json") for key in json.loads(sidecar.read_text())["entries"]]
    assert sorted(listed) == sorted(store.keys())  # every key in exactly one sidecar: put_many is idempotent
    for w in range(3):
        for i in range(N_ROUNDS):
            for j in range(3):
                got = store.get(f"w{w}-{i}-{j}", base_model=tiny.identity)
                assert torch.equal(got.B["up_proj"], _spawned_lora(tiny.identity, 100 * w + 10 * i + j).B["up_proj"])
    assert torch.equal(store.get("shared-4").A["gate_proj"], _spawned_lora(tiny.identity, 4).A["gate_proj"])


def test_sidecar_without_entry_hashes_is_checked_by_shard_hash_and_upgraded_by_repair(tiny, tmp_path, make_lora):
    from hyper_prag.store import verify_store

    LoraStore(tmp_path).put_many([("a", make_lora(tiny, 0), {}), ("b", make_lora(tiny, 1), {})])
    sidecar = next((tmp_path / "shards").glob("*.json"))
    info = json.loads(sidecar.read_text())
    for entry in info["entries"].values():
        del entry["sha256"]  # as written before entries carried their own hash
    sidecar.write_text(json.dumps(info))
    assert LoraStore(tmp_path).get("a") is not None and LoraStore(tmp_path).missing(["a", "b"]) == []
    report = verify_store(tmp_path)
    assert report.ok and report.legacy == [str(sidecar)]
    assert verify_store(tmp_path, repair=True).removed == []
    assert all(e["sha256"] for e in json.loads(sidecar.read_text())["entries"].values())
    assert verify_store(tmp_path).legacy == []
    shard = _one_shard(LoraStore(tmp_path))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    sidecar.write_text(json.dumps(info))  # the old sidecar again, over a damaged shard: the shard hash refuses it
    with pytest.raises(HyperPragError, match="shard sha256 mismatch"):
        LoraStore(tmp_path).get("a")


def test_rewritten_entry_supersedes_the_damaged_copy_and_gc_removes_it(tiny, tmp_path, make_lora):
    store = LoraStore(tmp_path)
    store.put("a", make_lora(tiny, 0), {"doc_id": "d"})
    old = _one_shard(store)
    old.write_bytes(old.read_bytes()[:-1])
    assert store.put_many([("a", make_lora(tiny, 0), {"doc_id": "d"})]) == ["a"]
    report = LoraStore(tmp_path).gc(min_age_seconds=0)
    assert sorted(report.removed) == sorted([str(old), str(old.with_suffix(".json"))])
    assert report.lost == [] and report.rewritten == []  # the damaged copy was not the one served
    assert LoraStore(tmp_path).keys() == ["a"] and LoraStore(tmp_path).check().ok


def test_store_cli_verify_repair_and_gc(tiny, tmp_path, make_lora, capsys):
    from hyper_prag.cli import main

    root = str(tmp_path / "store")
    LoraStore(root).put_many([("a", make_lora(tiny, 0), {"doc_id": "doc-a"}), ("b", make_lora(tiny, 1), {})])
    assert main(["store", "verify", "--store", root]) == 0
    shard = _one_shard(LoraStore(root))
    shard.write_bytes(shard.read_bytes()[:-4])
    capsys.readouterr()
    assert main(["store", "verify", "--store", root]) == 2  # one line on stderr, naming the repair
    out = capsys.readouterr()
    assert "doc-a" in out.out and "--repair" in out.err
    assert sorted(verify_store(root, repair=True).lost) == ["a", "b"]  # a truncated shard cannot be opened
    assert main(["store", "gc", "--store", root, "--min-age", "0"]) == 0
    assert LoraStore(root).missing(["a", "b"]) == ["a", "b"]
    assert main(["store", "verify", "--store", str(tmp_path / "nowhere")]) == 2


def test_a_file_named_as_the_store_is_refused_with_a_message(tmp_path, capsys):
    from hyper_prag.cli import main

    not_a_folder = tmp_path / "store.txt"
    not_a_folder.write_text("notes")
    with pytest.raises(HyperPragError, match="is a file, not a folder; pass a folder with --store"):
        LoraStore(not_a_folder)
    assert main(["store", "verify", "--store", str(not_a_folder)]) == 2
    assert "no LoRA store at" in capsys.readouterr().err and not_a_folder.read_text() == "notes"


@pytest.mark.parametrize("fails", ["shard", "sidecar"])
def test_a_failed_write_is_a_clear_error_and_leaves_no_half_written_shard(tiny, tmp_path, make_lora, monkeypatch, fails):
    import errno

    import hyper_prag.io as io

    store = LoraStore(tmp_path, dtype="float32")
    store.put("old", make_lora(tiny, 0))
    before = sorted(p.name for p in store.shards.iterdir())
    flush, flushed = io._fsync_file, []

    def full(path):  # the shard is flushed first, then its sidecar
        flushed.append(path)
        if len(flushed) == (1 if fails == "shard" else 2):
            raise OSError(errno.ENOSPC, "No space left on device")
        flush(path)

    monkeypatch.setattr(io, "_fsync_file", full)
    with pytest.raises(HyperPragError, match=r"cannot write to the LoRA store .*No space left.*nothing half-written"):
        store.put("new", make_lora(tiny, 1))
    assert sorted(p.name for p in store.shards.iterdir()) == before  # no temp file, no shard without a sidecar
    monkeypatch.undo()
    assert LoraStore(tmp_path).missing(["old", "new"]) == ["new"] and store.put("new", make_lora(tiny, 1))
    assert verify_store(tmp_path).ok


def test_a_store_folder_that_cannot_be_created_is_a_clear_error(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(HyperPragError, match="cannot create the LoRA store .*Permission denied.*make it writable"):
        LoraStore(tmp_path / "new")


def test_a_store_keeps_its_dtype_when_a_writer_asks_for_another(tiny, tmp_path, make_lora, caplog):
    """A bf16 re-encode into a float32 store stores float32 (exact), with a warning; a new store takes the dtype asked."""
    import logging

    assert LoraStore(tmp_path / "new").dtype == "bfloat16" and LoraStore(tmp_path / "new").held_dtype() is None
    LoraStore(tmp_path, dtype="float32").put("a", make_lora(tiny, 0))
    again = LoraStore(tmp_path, dtype="bfloat16")
    assert again.dtype == "float32" and again.requested_dtype == "bfloat16"
    with caplog.at_level(logging.WARNING, logger="hyper_prag.store"):
        again.put_many([("b", make_lora(tiny, 1), {}), ("c", make_lora(tiny, 2), {})])
        again.put("d", make_lora(tiny, 3))
    assert caplog.text.count("holds float32 LoRAs: new entries are stored as float32 too, not bfloat16") == 1
    dtypes = {json.loads(p.read_text())["dtype"] for p in (tmp_path / "shards").glob("*.json")}
    assert dtypes == {"float32"}
    for key, seed in (("b", 1), ("d", 3)):
        assert torch.equal(LoraStore(tmp_path).get(key).A["up_proj"], make_lora(tiny, seed).A["up_proj"])  # exact
    assert LoraStore(tmp_path).dtype == "float32"  # no dtype asked: the store's own
    assert verify_store(tmp_path).ok


def test_check_writable_refuses_a_store_that_takes_no_writes_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import hyper_prag.io as io

    store = LoraStore(tmp_path)
    store.check_writable()  # a writable folder: nothing left behind
    assert list(store.shards.iterdir()) == []

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(io, "_fsync_file", read_only)
    with pytest.raises(HyperPragError, match=r"cannot write to the LoRA store .*Read-only file system.*make it writable"):
        store.check_writable()
    assert list(store.shards.iterdir()) == []


def test_a_served_lora_does_not_change_when_its_shard_is_rewritten_in_place(tiny, tmp_path, make_lora):
    """A float32 entry is served as a copy: the memory map under it follows the file, the served LoRA must not."""
    lora = make_lora(tiny, 0)
    LoraStore(tmp_path, dtype="float32").put("a", lora)
    served = LoraStore(tmp_path).get("a")
    (shard,) = (tmp_path / "shards").glob("*.safetensors")
    with open(shard, "r+b") as f:  # the same inode: what an in-place edit or bit rot does
        f.seek(-4096, 2)
        f.write(b"\xff" * 4096)
    assert all(torch.equal(served.A[m], lora.A[m]) and torch.equal(served.B[m], lora.B[m])
               for m in lora.spec.target_modules)
    with pytest.raises(HyperPragError, match="corrupted"):
        LoraStore(tmp_path).get("a")
