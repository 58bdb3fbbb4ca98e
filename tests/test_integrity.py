"""Integrity: damaged store entries and index files are refused (never served), reported, and repaired.

Each test damages real files the way disks, crashes and hand edits do (flipped bits, NaN bytes,
truncation, malformed JSON, edited id lists) and checks that the damage raises
:class:`HyperPragError` naming what to run, or is repaired, instead of serving wrong values.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hyper_prag.corpus import Corpus, Document
from hyper_prag.errors import HyperPragError
from hyper_prag.retrieve import BM25Retriever, DenseRetriever, build_or_load, default_index_path, load_minilm
from hyper_prag.store import SIDECAR_FORMAT, LoraStore


# ------------------------------------------------------------------------------------------------ store

def _only_shard(root: Path) -> Path:
    shards = list((root / "shards").glob("*.safetensors"))
    assert len(shards) == 1
    return shards[0]


def _tensor_span(shard: Path, name: str) -> tuple[int, int]:
    """Byte range ``[start, end)`` of one tensor's data inside a safetensors file."""
    data = shard.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8 : 8 + header_len])[name]["data_offsets"]
    return 8 + header_len + start, 8 + header_len + end


def _patch(path: Path, offset: int, new: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(new)] = new
    path.write_bytes(bytes(data))


def test_flipped_low_bits_are_refused_on_read_and_repair_keeps_the_good_entries(tiny, tmp_path, make_lora):
    store = LoraStore(tmp_path, dtype="float32")
    store.put_many([("a", make_lora(tiny, 0), {"doc_id": "doc-a"}), ("b", make_lora(tiny, 1), {"doc_id": "doc-b"})])
    shard = _only_shard(tmp_path)
    start, _ = _tensor_span(shard, "a/A/up_proj")
    data = shard.read_bytes()
    _patch(shard, start, bytes([data[start] ^ 0x01]))  # lowest mantissa bit of one float: a silently wrong value
    reader = LoraStore(tmp_path)
    with pytest.raises(HyperPragError, match=r"a… \(document doc-a\).*store verify .*--repair.*hyper-prag encode"):
        reader.get("a")
    assert torch.equal(reader.get("b").A["up_proj"], make_lora(tiny, 1).A["up_proj"])  # one bad entry spoils nothing else
    assert LoraStore(tmp_path).missing(["a", "b"]) == ["a"]
    from hyper_prag.store import verify_store

    report = verify_store(tmp_path)
    assert not report.ok and [i.key for i in report.issues if i.key] == ["a"] and report.removed == []
    repaired = verify_store(tmp_path, repair=True)
    assert repaired.rewritten == ["b"] and repaired.lost == ["a"]
    assert verify_store(tmp_path).ok
    assert LoraStore(tmp_path).missing(["a", "b"]) == ["a"]  # `encode` now re-encodes exactly the damaged document
    assert torch.equal(LoraStore(tmp_path).get("b").B["down_proj"], make_lora(tiny, 1).B["down_proj"])  # copied byte for byte


def test_nan_bytes_are_refused_even_when_the_recorded_hash_matches(tiny, tmp_path, make_lora):
    store = LoraStore(tmp_path, dtype="float32")
    store.put("a", make_lora(tiny, 0), {"doc_id": "doc-a"})
    shard = _only_shard(tmp_path)
    start, end = _tensor_span(shard, "a/B/gate_proj")
    assert end - start >= 256
    _patch(shard, start, b"\xff" * 256)  # 64 float32 NaNs
    with pytest.raises(HyperPragError, match="doc-a"):
        LoraStore(tmp_path).get("a")
    # A writer that hashed NaNs (or a hand-made sidecar): the hash matches, finiteness still refuses it.
    from hyper_prag.store import entry_sha256

    with safe_open(str(shard), framework="pt") as f:
        raw = {n: f.get_tensor(n) for n in f.keys() if n.startswith("a/")}
    sidecar = shard.with_suffix(".json")
    info = json.loads(sidecar.read_text())
    info["entries"]["a"]["sha256"] = entry_sha256(raw)
    sidecar.write_text(json.dumps(info))
    with pytest.raises(HyperPragError, match=r"(?s)doc-a.*non-finite"):
        LoraStore(tmp_path).get("a")
    assert LoraStore(tmp_path).missing(["a"]) == ["a"]


@pytest.mark.parametrize("edit", [{"alpha": 33.0}, {"layers": [1, 0]}])
def test_an_edited_spec_beside_intact_tensors_is_refused(tiny, tmp_path, make_lora, edit):
    """The tensors' hash still matches, but the spec beside them would rescale the LoRA or move it to other layers."""
    from hyper_prag.store import verify_store

    LoraStore(tmp_path, dtype="float32").put_many([("a", make_lora(tiny, 0), {"doc_id": "doc-a"}),
                                                    ("b", make_lora(tiny, 1), {"doc_id": "doc-b"})])
    sidecar = _only_shard(tmp_path).with_suffix(".json")
    info = json.loads(sidecar.read_text())
    info["entries"]["a"]["spec"] |= edit
    sidecar.write_text(json.dumps(info))
    with pytest.raises(HyperPragError, match=r"(?s)doc-a.*spec hash mismatch"):
        LoraStore(tmp_path).get("a")
    report = verify_store(tmp_path)
    assert not report.ok and [i.key for i in report.issues if i.key] == ["a"]
    assert LoraStore(tmp_path).get("b").spec.alpha == 32.0  # the other entry is served


def test_truncated_shard_counts_as_missing_and_put_many_repairs_it(tiny, tmp_path, make_lora):
    store = LoraStore(tmp_path)
    loras = {"a": make_lora(tiny, 0), "b": make_lora(tiny, 1)}
    store.put_many([(k, lora, {"doc_id": k}) for k, lora in loras.items()])
    assert store.missing(["a", "b"]) == []  # verified once, remembered...
    shard = _only_shard(tmp_path)
    shard.write_bytes(shard.read_bytes()[:-100])  # ...until the file changes
    assert store.missing(["a", "b"]) == ["a", "b"]  # the same reader notices
    assert LoraStore(tmp_path).missing(["a", "b", "c"]) == ["a", "b", "c"]  # not "cached": encode re-encodes them
    written = LoraStore(tmp_path).put_many([(k, lora, {"doc_id": k}) for k, lora in loras.items()])
    assert written == ["a", "b"]
    for reader in (store, LoraStore(tmp_path)):  # the old reader and a new one both serve the new copies
        assert torch.allclose(reader.get("a").A["up_proj"], loras["a"].A["up_proj"], rtol=2**-8)
    assert LoraStore(tmp_path).put_many([("a", loras["a"], {})]) == []  # now stored: skipped


def test_malformed_sidecars_are_reported_and_do_not_break_the_store(tiny, tmp_path, make_lora, caplog):
    LoraStore(tmp_path).put("good", make_lora(tiny, 0), {"doc_id": "g"})
    shards = tmp_path / "shards"
    good_bytes = _only_shard(tmp_path).read_bytes()
    bad = {"list": b"[]", "noentries": json.dumps({"format": SIDECAR_FORMAT, "sha256": "0" * 64, "bytes": 1}).encode(),
           "garbage": b"\x00\xffnot json at all"}
    for name, sidecar in bad.items():
        (shards / f"{name}.safetensors").write_bytes(good_bytes)
        (shards / f"{name}.json").write_bytes(sidecar)
    with caplog.at_level(logging.WARNING, logger="hyper_prag.store"):
        store = LoraStore(tmp_path)
    assert store.keys() == ["good"] and store.get("good", base_model=tiny.identity) is not None
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(f"{name}.json" in warned for name in bad)
    from hyper_prag.store import gc_store, verify_store

    report = verify_store(tmp_path)
    assert sorted(Path(i.path).name for i in report.issues) == sorted(f"{n}.json" for n in bad)
    store.put("new", make_lora(tiny, 1))  # writers are not blocked either
    gc = gc_store(tmp_path)
    assert sorted(Path(p).name for p in gc.removed) == sorted(f"{n}.{ext}" for n in bad for ext in ("json", "safetensors"))
    after = verify_store(tmp_path)
    assert after.ok and after.entries == 2


def test_concurrent_writers_store_each_key_once_and_report_what_they_wrote(tiny, tmp_path, make_lora):
    pool = [make_lora(tiny, i) for i in range(4)]
    keys = [f"k{i}" for i in range(12)]
    start, written, errors = threading.Barrier(3), {}, []

    def writer(w: int) -> None:
        try:
            store = LoraStore(tmp_path, dtype="float32")  # each writer its own handle on the folder
            start.wait(30)
            mine = []
            for lo in range(0, len(keys), 3):  # every writer offers every key: maximal overlap
                batch = keys[lo : lo + 3] if w != 1 else keys[lo : lo + 3][::-1]
                mine += store.put_many([(k, pool[int(k[1:]) % 4], {"doc_id": k, "w": w}) for k in batch])
            written[w] = mine
        except BaseException as err:  # surfaced in the main thread
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    claimed = [k for w in written.values() for k in w]
    assert sorted(claimed) == sorted(keys)  # each key reported written by exactly one writer
    listed = [k for s in (tmp_path / "shards").glob("*.json") for k in json.loads(s.read_text())["entries"]]
    assert sorted(listed) == sorted(keys)  # and stored exactly once
    store = LoraStore(tmp_path)
    for w, mine in written.items():
        assert all(store.meta(k)["w"] == w for k in mine)  # the writer that said it wrote the key did
    assert torch.equal(store.get("k5").A["gate_proj"], pool[1].A["gate_proj"])


# ------------------------------------------------------------------------------------------ recipes, writes


def _encode(tmp_path: Path):
    """Encodes the first document of a tiny corpus folder into ``tmp_path/store`` (per-doc, templated QA)."""
    import hyper_prag.api as api
    from hyper_prag.corpus import save_corpus

    folder = tmp_path / "corpus"
    if not folder.exists():
        save_corpus(Corpus("integrity", DOCS, (), {d.id: ((f"What is {d.title}?", d.title),) for d in DOCS}), folder)
    return api.encode(model="tiny", corpus=str(folder), limit=1, store=str(tmp_path / "store"), store_dtype="float32",
                      augment={"source": "template"}, runner="loop", logger="none", progress=False)


def test_a_truncated_recipe_is_reported_by_verify_and_gc_and_refused_by_encode_and_ask(tmp_path, capsys):
    import hyper_prag.api as api
    from hyper_prag.cli import main

    assert _encode(tmp_path).encoded == 1
    store = tmp_path / "store"
    (recipe,) = (store / "recipes").glob("*.json")
    recipe.write_text(recipe.read_text()[:40])  # a crash or a full disk while copying the store by hand
    with pytest.raises(HyperPragError, match=r"(?s)recipe file .*\.json is not valid JSON.*Delete it and re-run"):
        _encode(tmp_path)
    for action in (["verify"], ["gc", "--min-age", "0"]):
        assert main(["store", *action, "--store", str(store)]) == 2
        out = capsys.readouterr().out
        assert recipe.name in out and "not valid JSON" in out and "Delete it and re-run" in out
    with pytest.raises(HyperPragError, match="unusable recipe files"):
        api.ask("What is Velmora River?", "prag", benchmark=str(tmp_path / "corpus"), model="tiny", store=store)
    recipe.unlink()  # the fix the messages give
    again = _encode(tmp_path)
    assert (again.encoded, again.skipped) == (0, 1)  # recorded again under the same keys: the LoRA is re-used
    assert main(["store", "verify", "--store", str(store)]) == 0


def test_a_full_disk_while_encoding_is_a_clear_error_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import errno

    import hyper_prag.io as io

    store, flush = tmp_path / "store", io._fsync_file

    def full(path):  # a write is flushed before it is renamed into place: that is where a full disk shows
        if store in Path(path).parents:  # the store's disk is full; the caches live elsewhere
            raise OSError(errno.ENOSPC, "No space left on device")
        flush(path)

    monkeypatch.setattr(io, "_fsync_file", full)
    with pytest.raises(HyperPragError, match="cannot .* the LoRA store .*No space left on device.*free disk space"):
        _encode(tmp_path)
    left = [p for p in store.rglob("*") if p.is_file() and p.name != "write.lock"]
    assert left == []  # no temp file, no shard without its sidecar, no recipe
    monkeypatch.undo()
    assert _encode(tmp_path).encoded == 1  # space freed: the same command works


# ------------------------------------------------------------------------------------------------ index

DOCS = (
    Document("zorv", "Zorvath Kellimar", "Zorvath Kellimar was a glassblower born in the harbour town of Quillmere."),
    Document("bram", "Brambleton Observatory", "Brambleton Observatory is a telescope station on Mount Ferrick."),
    Document("tide", "Tidewater Cheese Guild", "The Tidewater Cheese Guild ages goat cheese in limestone caves."),
    Document("vel", "Velmora River", "The Velmora River floods every spring and feeds the rice paddies."),
)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(name="integrity", documents=DOCS)


@pytest.fixture(scope="module")
def dense_index(corpus, tmp_path_factory) -> tuple[Path, object]:
    """A saved dense index (and its encoder), built once; tests damage copies of it."""
    encoder = load_minilm("cpu")
    path = DenseRetriever.build(corpus, encoder=encoder).save(tmp_path_factory.mktemp("dense") / "index")
    return path, encoder


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPER_PRAG_CACHE", str(tmp_path / "cache"))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def test_swapped_doc_ids_are_refused_at_an_explicit_path_and_rebuilt_in_the_cache(corpus, tmp_path, caplog):
    path = BM25Retriever.build(corpus).save(tmp_path / "bm25")
    ids = json.loads((path / "doc_ids.json").read_text())
    ids[0], ids[1] = ids[1], ids[0]  # same ids, same length, valid JSON: every hit of rows 0/1 is the wrong document
    (path / "doc_ids.json").write_text(json.dumps(ids))
    with pytest.raises(HyperPragError, match=r"doc_ids\.json.*--rebuild"):
        BM25Retriever.load(path, corpus)
    with pytest.raises(HyperPragError, match=r"doc_ids\.json.*--rebuild"):
        build_or_load("bm25", corpus, path)  # a folder the caller named is not overwritten unasked
    assert build_or_load("bm25", corpus, path, rebuild=True).search(["Quillmere glassblower"], k=1)[0][0].doc_id == "zorv"
    cached = build_or_load("bm25", corpus)
    default = default_index_path("bm25", corpus)
    (default / "doc_ids.json").write_text(json.dumps(list(reversed(cached.doc_ids))))
    with caplog.at_level(logging.WARNING, logger="hyper_prag.retrieve"):
        again = build_or_load("bm25", corpus)  # our own cache: rebuilt, with a warning
    assert "rebuilding" in caplog.text
    assert again.search(["Quillmere glassblower"], k=1)[0][0].doc_id == "zorv"
    assert BM25Retriever.load(default, corpus).doc_ids == cached.doc_ids


def test_shortened_doc_ids_json_is_refused(corpus, tmp_path):
    path = BM25Retriever.build(corpus).save(tmp_path / "bm25")
    ids = json.loads((path / "doc_ids.json").read_text())
    (path / "doc_ids.json").write_text(json.dumps(ids[:-1]))
    with pytest.raises(HyperPragError, match=r"doc_ids\.json.*rebuild"):
        BM25Retriever.load(path, corpus)


def test_truncated_bm25_array_is_refused(corpus, tmp_path):
    path = BM25Retriever.build(corpus).save(tmp_path / "bm25")
    npy = path / "bm25" / "data.csc.index.npy"
    npy.write_bytes(npy.read_bytes()[:-8])
    with pytest.raises(HyperPragError, match=r"data\.csc\.index\.npy.*--rebuild"):
        BM25Retriever.load(path, corpus)


def test_flipped_bytes_in_index_faiss_are_refused(corpus, dense_index, tmp_path):
    src, encoder = dense_index
    path = _copy(src, tmp_path / "dense")
    faiss_file = path / "index.faiss"
    size = faiss_file.stat().st_size
    _patch(faiss_file, size - 64, bytes(b ^ 0x10 for b in faiss_file.read_bytes()[size - 64 : size - 32]))  # embeddings
    with pytest.raises(HyperPragError, match=r"index\.faiss.*--rebuild"):
        DenseRetriever.load(path, corpus, encoder=encoder)


def test_truncated_index_faiss_is_refused(corpus, dense_index, tmp_path):
    src, encoder = dense_index
    path = _copy(src, tmp_path / "dense")
    faiss_file = path / "index.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    with pytest.raises(HyperPragError, match=r"index\.faiss.*--rebuild"):
        DenseRetriever.load(path, corpus, encoder=encoder)
    with pytest.raises(HyperPragError, match=r"index\.faiss.*--rebuild"):
        build_or_load("dense", corpus, path)


def test_index_of_the_previous_format_is_rebuilt(corpus, tmp_path, caplog):
    path = BM25Retriever.build(corpus).save(tmp_path / "bm25")
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]
    manifest["format"] = 1  # what indexes looked like before they carried checksums
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HyperPragError, match="--rebuild"):
        BM25Retriever.load(path, corpus)
    with caplog.at_level(logging.WARNING, logger="hyper_prag.retrieve"):
        rebuilt = build_or_load("bm25", corpus, path)
    assert "older format" in caplog.text
    assert rebuilt.search(["Mount Ferrick telescope"], k=1)[0][0].doc_id == "bram"
    assert json.loads((path / "manifest.json").read_text())["files"]
