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


def _encode(tmp_path: Path, folder: str = "corpus", qa: bool = True, **settings):
    """Encodes the first document of a tiny corpus folder into ``tmp_path/store`` (per-doc, templated QA)."""
    import hyper_prag.api as api
    from hyper_prag.corpus import save_corpus

    path = tmp_path / folder
    if not path.exists():
        pairs = {d.id: ((f"What is {d.title}?", d.title),) for d in DOCS} if qa else {}
        save_corpus(Corpus("integrity", DOCS, (), pairs), path)
    return api.encode(**{"model": "tiny", "corpus": str(path), "limit": 1, "store": str(tmp_path / "store"),
                         "store_dtype": "float32", "augment": {"source": "template"}, "runner": "loop",
                         "logger": "none", "progress": False} | settings)


def test_a_truncated_recipe_is_reported_by_verify_and_gc_and_written_again_by_encode(tmp_path, capsys, caplog):
    import hyper_prag.api as api
    from hyper_prag.cli import main

    assert _encode(tmp_path).encoded == 1
    store = tmp_path / "store"
    (recipe,) = (store / "recipes").glob("*.json")
    good = json.loads(recipe.read_text())
    recipe.write_text(recipe.read_text()[:40])  # a crash or a full disk while copying the store by hand
    for action in (["verify"], ["gc", "--min-age", "0"]):
        assert main(["store", *action, "--store", str(store)]) == 2
        out = capsys.readouterr().out
        assert recipe.name in out and "not valid JSON" in out and "Re-run the `hyper-prag encode`" in out
    with pytest.raises(HyperPragError, match="unusable recipe files"):
        api.ask("What is Velmora River?", "prag", benchmark=str(tmp_path / "corpus"), model="tiny", store=store)
    with caplog.at_level(logging.WARNING, logger="hyper_prag.recipes"):
        again = _encode(tmp_path)  # the fix the messages give
    assert "writing it again" in caplog.text
    assert (again.encoded, again.skipped) == (0, 1)  # recorded again under the same keys: the LoRA is re-used
    assert {k: v for k, v in json.loads(recipe.read_text()).items() if k != "provenance"} == \
        {k: v for k, v in good.items() if k != "provenance"}
    assert main(["store", "verify", "--store", str(store)]) == 0
    assert api.ask("Who was Zorvath Kellimar?", "prag", benchmark=str(tmp_path / "corpus"), model="tiny", store=store,
                   k=1, max_new_tokens=2).lora_names  # the encoded document's LoRA is read with the recipe again


def test_a_recipe_edited_by_hand_is_reported_and_not_read(tmp_path):
    from hyper_prag.recipes import check_recipes, list_recipes

    _encode(tmp_path)
    store = tmp_path / "store"
    (recipe,) = (store / "recipes").glob("*.json")
    data = json.loads(recipe.read_text())
    data["spec"]["alpha"] = 64.0  # valid JSON, a valid recipe, but not the one its name (its key inputs) says
    recipe.write_text(json.dumps(data))
    (issue,) = check_recipes(store)
    assert recipe.name in issue.path and "edited by hand" in issue.why
    assert list_recipes(store) == []


def test_a_failed_encode_leaves_the_stores_recipes_unchanged(tmp_path):
    """Templated augmentation on a corpus without QA pairs fails; its recipe (another alpha) is not recorded, so the
    store keeps its one recipe and ask needs no --recipe."""
    import hyper_prag.api as api

    assert _encode(tmp_path).encoded == 1
    recipes = tmp_path / "store" / "recipes"
    before = {p.name: p.read_bytes() for p in recipes.iterdir()}
    with pytest.raises(HyperPragError, match="has no doc_qa pairs"):
        _encode(tmp_path, folder="bare", qa=False, alpha=16.0)
    assert {p.name: p.read_bytes() for p in recipes.iterdir()} == before
    answer = api.ask("What is Zorvath Kellimar?", "prag", benchmark=str(tmp_path / "corpus"), model="tiny",
                     store=tmp_path / "store", k=1, max_new_tokens=2)
    assert answer.lora_names


def test_an_encoder_that_fails_records_no_recipe_and_a_rerun_records_it(tmp_path, monkeypatch):
    from hyper_prag.encoders.per_doc import PerDocEncoder

    def diverged(self, documents):
        raise HyperPragError("the encoder diverged")

    with monkeypatch.context() as patch:
        patch.setattr(PerDocEncoder, "encode", diverged)
        with pytest.raises(HyperPragError, match="diverged"):
            _encode(tmp_path)
    assert not list((tmp_path / "store").glob("recipes/*.json"))
    assert _encode(tmp_path).encoded == 1 and len(list((tmp_path / "store").glob("recipes/*.json"))) == 1


def test_a_read_only_store_is_refused_before_any_document_is_trained(tmp_path, monkeypatch):
    import errno

    import hyper_prag.io as io
    from hyper_prag.encoders.per_doc import PerDocEncoder

    store, flush, trained = tmp_path / "store", io._fsync_file, []

    def read_only(path):
        if store in Path(path).parents:
            raise OSError(errno.EROFS, "Read-only file system")
        flush(path)

    encode = PerDocEncoder.encode
    monkeypatch.setattr(PerDocEncoder, "encode", lambda self, docs: trained.append(len(docs)) or encode(self, docs))
    monkeypatch.setattr(io, "_fsync_file", read_only)
    with pytest.raises(HyperPragError, match="cannot write to the LoRA store .*Read-only file system"):
        _encode(tmp_path)
    assert trained == [] and [p for p in store.rglob("*") if p.is_file()] == []


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


# ------------------------------------------------------------------------------------------- hypernet

def _hypernet(tiny, window: int = 32):
    from hyper_prag.hypernet import Hypernet, HypernetConfig

    torch.manual_seed(0)
    net = Hypernet.for_model(tiny, HypernetConfig(doc_dim=16, emb_dim=8, width=16, depth=1, max_doc_tokens=window))
    for head in net.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.1)
    return net


def test_the_hypernet_encoder_averages_a_long_documents_pieces(tiny, caplog):
    """What encode stores and ask applies: the mean of the pieces' LoRAs, never above its largest piece (their sum
    grew with the piece count); a warning names the document."""
    from hyper_prag.augment import AugmentedDocument
    from hyper_prag.combine import combine, delta_norms
    from hyper_prag.encoders import split_text
    from hyper_prag.encoders.hypernet import HypernetEncoder

    encoder = HypernetEncoder(_hypernet(tiny), tiny, checkpoint_sha256="test")
    text = " ".join(f"Mill {i} of Varnholt ground {('barley', 'rye')[i % 2]} for {i * 7} families." for i in range(40))
    pieces = split_text(tiny, text, encoder.window)
    singles = encoder.generate(pieces)
    assert len(pieces) > 8 and all(lora.spec.rank == 2 for lora in singles)

    def norm(lora):  # ‖ΔW‖_F over every module and layer
        return torch.cat(list(delta_norms(lora).values())).norm().item()

    with caplog.at_level(logging.WARNING, logger="hyper_prag.hypernet"):
        (stored,) = encoder.encode([AugmentedDocument("varn", text)])
    assert f"document 'varn' is longer than the hypernet's 32-token window: read in {len(pieces)} pieces" in caplog.text
    mean = combine(singles, "mean")
    assert stored.spec.rank == len(pieces) * 2
    for m in stored.spec.target_modules:  # ΔW = (1/P) Σ_p ΔW_p, exactly what combine's mean computes
        assert torch.allclose(delta_norms(stored)[m], delta_norms(mean)[m], rtol=1e-4, atol=1e-7)
    assert norm(stored) <= max(norm(p) for p in singles) * (1 + 1e-4) < norm(combine(singles, "sum"))
    assert encoder.settings()["pieces"] == "mean"  # the key changes with how pieces are joined


def test_every_damaged_hypernet_checkpoint_names_the_export_command(tiny, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from hyper_prag.encoders.hypernet import load_hypernet, save_inference_checkpoint

    good = save_inference_checkpoint(_hypernet(tiny), tmp_path / "good" / "hn.safetensors")

    def copy(name: str, with_json: bool) -> Path:
        (tmp_path / name).mkdir()
        shutil.copy(good, tmp_path / name / good.name)
        if with_json:
            shutil.copy(good.with_suffix(".json"), tmp_path / name / good.with_suffix(".json").name)
        return tmp_path / name / good.name

    damaged = {}
    for name, with_json in (("flipped", True), ("flipped-alone", False)):
        path = damaged[name] = copy(name, with_json)
        _patch(path, path.stat().st_size - 8, b"\x01\x02\x03\x04")
    header = damaged["header"] = copy("header", False)
    (n,) = struct.unpack("<Q", header.read_bytes()[:8])
    _patch(header, 10, b"\xff")  # the header's JSON: no longer parses
    digit = damaged["hash-digit"] = copy("hash-digit", False)
    at = 8 + digit.read_bytes()[8 : 8 + n].index(b"tensors_sha256") + 20
    _patch(digit, at, b"0" if digit.read_bytes()[at : at + 1] != b"0" else b"1")
    truncated = damaged["truncated"] = copy("truncated", False)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    old = damaged["older export, no description"] = tmp_path / "old" / "hn.safetensors"
    old.parent.mkdir()
    meta = {k: v for k, v in json.loads(good.with_suffix(".json").read_text()).items()
            if k not in ("weights_sha256", "tensors_sha256")}
    save_file(load_file(str(good)), str(old), metadata={"hypernet": json.dumps(meta)})
    for name, path in damaged.items():
        with pytest.raises(HyperPragError, match="export-hypernet") as err:
            load_hypernet(path, tiny)
        assert str(path) in str(err.value), name
    assert load_hypernet(copy("bare", False), tiny) is not None  # no description, but the header's hash verifies


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
