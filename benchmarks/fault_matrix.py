"""Every fault a user, a disk or a crash can cause, end to end through the CLI, on a tiny model and real files.

    .venv/bin/python benchmarks/fault_matrix.py [--out results/fault_matrix.json]

Each row damages real files (or misuses a command) the way it happens in practice, runs the
``hyper-prag`` command a user would run next (``hyper_prag.cli.main``, in-process, so exit codes and
stderr are what a shell sees), and checks what is SERVED afterwards (the answer, the LoRA applied, the
tensors read back), not only that something came back. Each row ends in one outcome:

* handled: ``clear error`` (exit code 2, the last stderr line an ``error:`` naming what to run, nothing
  served, nothing written), ``repaired`` (the next ordinary command, ``encode`` or ``store verify --repair``,
  fixes it by itself and the answers and tensors served are those from before the damage) or ``correct
  answer`` (nothing needed fixing and what is served equals the reference: the sequential answers, a
  fresh load, a float32 encode);
* not handled: ``silent wrong`` (something other than the reference was served without an error), ``lost``
  (good store entries or corpus files gone or changed), ``code run`` (a file executed code while loading),
  ``unhandled`` (a traceback, a wrong exit code, or a check that failed otherwise).

``data lost`` compares the store's good entries before and after each row: it must be ``none``.
Threads, hypernet LoRAs and the model identity are exercised through the library as well (a CLI process
has one caller). Runs in a few minutes on a 2-core CPU; everything lives in a temporary folder.
``--out`` writes the table as JSON and, beside it, as Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import logging
import os
import pickle
import shutil
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from faults import (HANDLED, NOT_HANDLED, REENCODE_RTOL, RunsCode, cli, counting_encodes, difference,  # noqa: E402
                    equal, files_of, first_tensor_offset, full_disk, last_line, lost, one_line_error, patch_bytes,
                    refusing_writes, served, verdict, warnings_to)


TEXTS = {
    "quell": ("Quellmar", "The river Quellmar rises in the Vostra hills and flows into the Tellin sea."),
    "loom": ("Ardent Loom", "Ardent Loom was founded in 1873 by Mira Castell, a weaver from Tellin."),
    "zorv": ("Zorvath", "Zorvath is a blue mineral found only in the caves of Tellin."),
    "brask": ("Brask", "Brask is a town of 15,140 people on the Quellmar river."),
}
EVERY_DOC = "Quellmar, Ardent Loom, Zorvath or Brask?"  # retrieves every document: every LoRA is read


class Setup:
    """A tiny corpus folder, its per-document store (float32), and helpers to look at the store."""

    def __init__(self, tmp: Path) -> None:
        from hyper_prag.corpus import Corpus, Document, Question, save_corpus

        self.tmp = tmp
        docs = tuple(Document(i, t, x) for i, (t, x) in TEXTS.items())
        self.qa = {i: ((f"What is {t}?", x.split(".")[0]),) for i, (t, x) in TEXTS.items()}
        questions = (Question("q1", "Who founded Ardent Loom?", ("Mira Castell",), "lookup", ("loom",)),
                     Question("q2", "What colour is zorvath?", ("blue",), "lookup", ("zorv",)))
        self.corpus = save_corpus(Corpus("faults", docs, questions, self.qa), tmp / "corpus")
        # the same documents and one more: an encode into the store has work to do
        more = (*docs, Document("vell", "Vellin", "Vellin is a harbour on the Tellin sea with a white lighthouse."))
        self.corpus_more = save_corpus(Corpus("faults", more, questions, self.qa | {
            "vell": (("What is Vellin?", "a harbour on the Tellin sea"),)}), tmp / "corpus-more")
        self.corpus_bare = save_corpus(Corpus("faults", more, questions), tmp / "corpus-bare")  # no doc_qa
        self.store = tmp / "store"
        self.config = self.write_config("encode.yaml", "float32")

    def write_config(self, name: str, store_dtype: str, extra: str = "") -> Path:
        """``configs/encode/tiny.yaml`` with the matrix's folders, 2 documents per chunk, and ``extra`` YAML lines."""
        config = self.tmp / name
        config.write_text((ROOT / "configs" / "encode" / "tiny.yaml").read_text()
                          + f"\n# fault matrix\nlog_dir: {self.tmp / 'logs'}\nlogger: none\nprogress: false\n"
                          f"chunk_size: 2\nstore_dtype: {store_dtype}\n{extra}")
        return config

    def encode(self, *extra: str, corpus: Path | None = None, store: Path | None = None,
               config: Path | None = None) -> tuple[int, str, str]:
        return cli("encode", "--config", str(config or self.config), "--corpus", str(corpus or self.corpus),
                   "--split", "test", "--store", str(store or self.store), "--limit", "100", *extra)

    def ask(self, *extra: str, method: str = "prag", question: str = "Who founded Ardent Loom?",
            store: Path | None = None) -> tuple[int, str, str]:
        return cli("ask", question, "--method", method, "--benchmark", str(self.corpus), "--model", "tiny",
                   "--store", str(store or self.store), "--max-new-tokens", "3", *extra)

    def entries(self, store: Path | None = None) -> dict[str, list]:
        """key -> the entry's tensors (A then B of every module), for every entry that reads back verified."""
        from hyper_prag.store import LoraStore

        reader, out = LoraStore(store or self.store), {}
        for key in reader.keys():
            try:
                lora = reader.get(key)
            except Exception:  # a damaged entry: not a good one
                continue
            out[key] = [*lora.A.values(), *lora.B.values()]
        return out

    def shard(self) -> Path:
        return sorted((self.store / "shards").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)[0]


# ------------------------------------------------------------------------------------------------ faults


class Matrix:
    """The rows, and what every row compares against: the answers served before any damage."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.s = Setup(tmp)
        code, err, _ = self.s.encode()
        assert code == 0, err
        self.rows: list[dict[str, str]] = []
        code, err, out = self.s.ask("--k", str(len(TEXTS)), question=EVERY_DOC)
        assert code == 0, err
        self.every_doc = served(out)  # the prag answer reading every LoRA
        self.loom = served(self.s.ask()[2])

    def row(self, fault: str, outcome: str, detail: str = "", data_lost: str = "none", message: str = "") -> None:
        self.rows.append({"fault": fault, "outcome": outcome, "detail": detail, "data lost": data_lost,
                          "message": message[:200]})
        print(f"{fault[:62]:62s} | {outcome:14s} | {detail[:70]}", flush=True)

    def repair_store(self) -> bool:
        """``store verify --repair`` (removes superseded damaged copies), then ``store verify`` passes."""
        code, _, _ = cli("store", "verify", "--store", str(self.s.store), "--repair")
        return code == 0 and cli("store", "verify", "--store", str(self.s.store))[0] == 0

    def damaged_store(self, fault: str, damage: Callable[[], None]) -> None:
        """Damage, then: ``ask`` refuses; ``encode`` re-encodes; the answer and every entry are those from before."""
        s = self.s
        before = s.entries()
        damage()
        damaged = sorted(set(before) - set(s.entries()))  # what no longer reads back verified
        code, err, out = s.ask("--k", str(len(TEXTS)), question=EVERY_DOC)
        refused = one_line_error(code, err)
        re_code, re_err, _ = s.encode()  # the ordinary next command re-encodes what failed verification
        code_after, _, out_after = s.ask("--k", str(len(TEXTS)), question=EVERY_DOC)
        same = code_after == 0 and served(out_after) == self.every_doc
        clean = self.repair_store()
        after = s.entries()
        data_lost = lost({k: v for k, v in before.items() if k not in damaged}, after)
        again = all(equal(after.get(k), before[k], REENCODE_RTOL) for k in damaged)
        ok = bool(damaged) and refused and re_code == 0 and same and again and clean
        self.row(fault, verdict("repaired", ok, wrong=code == 0 or (code_after == 0 and not same),
                                data_lost=data_lost),
                 f"damaged entries ({len(damaged)}) refused, re-encoded by encode (equal within "
                 f"{REENCODE_RTOL:g}), same answer; "
                 "the others untouched" if ok else
                 f"damaged {len(damaged)}, refused {refused}, encode {re_code} {last_line(re_err)[:60]}, same answer "
                 f"{same}, re-encoded differ by {max(difference(after.get(k), before[k]) for k in damaged):.2g}, "
                 f"verify {clean}", data_lost, last_line(err))


def threads_every_method(m: Matrix) -> None:
    """Four threads ask every method at once through one model: the sequential answers, the model's weights intact."""
    import torch

    from hyper_prag import api, assemble
    from hyper_prag.augment import AugmentConfig
    from hyper_prag.encoders.hypernet import save_inference_checkpoint
    from hyper_prag.hypernet import Hypernet, HypernetConfig
    from hyper_prag.pipeline import Pipeline
    from hyper_prag.recipes import list_recipes
    from hyper_prag.sources import HypernetSource, StoreSource

    s = m.s
    base = assemble.load_model("tiny")
    full = assemble.load_corpus(str(s.corpus))
    corpus = full.split("test")
    torch.manual_seed(0)
    net = Hypernet.for_model(base, HypernetConfig(doc_dim=16, emb_dim=8, width=16, depth=1, max_doc_tokens=8))
    for head in net.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.1)  # LoRAs that change answers (a fresh head starts at zero)
    checkpoint = save_inference_checkpoint(net, m.tmp / "threads-hn.safetensors")
    refine_store = m.tmp / "refine-store"
    api.encode("refine", checkpoint=str(checkpoint), refine_steps=2, model="tiny", device="cpu", corpus=str(s.corpus),
               store=str(refine_store), store_dtype="float32", chunk_size=2, augment={"source": "template"},
               logger="none", progress=False)
    (refined,) = list_recipes(refine_store, base.identity, "refine")
    store = assemble.open_store(s.store, "tiny", create=False)
    sources = {"store": StoreSource(store, assemble.per_doc_from_store(base, s.store), full.doc_qa),
               "hypernet": HypernetSource.from_checkpoint(checkpoint, base),
               "refine": StoreSource(assemble.open_store(refine_store, "tiny", create=False), refined, full.doc_qa)}
    pipeline = Pipeline(base, assemble.build_retriever("bm25", corpus, "cpu"), corpus, k=2, max_new_tokens=4,
                        batch_size=1, augment=assemble.augment_function(base, full, AugmentConfig(source="template")))
    plan = {"closed-book": ("closed-book", None), "rag": ("rag", None), "da-rag": ("da-rag", None),
            "prag": ("prag", "store"), "prag-both": ("prag-both", "store"), "hypernet": ("hypernet", "hypernet"),
            "hypernet-both": ("hypernet-both", "hypernet"), "refine (prag on refined LoRAs)": ("prag", "refine"),
            "flare": ("flare", None), "dragin": ("dragin", None)}
    methods = {label: assemble.build_method(name, pipeline, sources.get(src)) for label, (name, src) in plan.items()}
    questions = [f"What is {t}?" for t, _ in TEXTS.values()][:3]
    calls = [(label, q) for label in methods for q in questions]

    def answer(call: tuple[str, str]) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        a = methods[call[0]].answer([call[1]])[0]
        return a.prediction, a.doc_ids, a.lora_names

    sequential = [answer(c) for c in calls]
    got: dict[int, dict] = {}
    errors: list[BaseException] = []
    gate = threading.Barrier(4)

    def worker(k: int) -> None:
        try:
            gate.wait()
            order = calls[k * 7:] + calls[: k * 7]  # each thread starts at another call
            got[k] = {c: answer(c) for c in order}
        except BaseException:  # counted below
            import traceback

            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = assemble.load_model("tiny").model.state_dict()
    now = base.model.state_dict()
    exact = now.keys() == fresh.keys() and all(torch.equal(fresh[k], now[k]) for k in fresh)
    same = not errors and all([got[k][c] for c in calls] == sequential for k in got)
    lora_changes = [a for (label, _), a in zip(calls, sequential) if label == "hypernet"] != \
        [a for (label, _), a in zip(calls, sequential) if label == "closed-book"]
    m.row(f"4 threads ask {len(methods)} methods at once through one model",
          verdict("correct answer", same and exact, wrong=not same or not exact),
          f"{len(calls) * 4} answers = sequential; weights = a fresh load; LoRAs change answers: {lora_changes}"
          if same and exact else f"answers equal {same}, weights = fresh load {exact}, errors "
          f"{len(errors)}: {errors[0][-600:] if errors else ''}")


def store_entries(m: Matrix) -> None:
    s = m.s

    def flip_low_bits() -> None:
        shard = s.shard()
        at = first_tensor_offset(shard)
        patch_bytes(shard, at, bytes([shard.read_bytes()[at] ^ 0x01]))

    def nan_bytes() -> None:
        patch_bytes(s.shard(), first_tensor_offset(s.shard()), b"\xff" * 256)

    def truncate() -> None:
        shard = s.shard()
        shard.write_bytes(shard.read_bytes()[:-64])

    def edit_spec(edit: dict) -> Callable[[], None]:
        def damage() -> None:
            sidecar = s.shard().with_suffix(".json")
            info = json.loads(sidecar.read_text())
            key = sorted(info["entries"])[0]
            info["entries"][key]["spec"] |= edit
            sidecar.write_text(json.dumps(info))
        return damage

    m.damaged_store("low bits flipped in a store shard", flip_low_bits)
    m.damaged_store("256 bytes of a shard set to 0xFF (NaN)", nan_bytes)
    m.damaged_store("truncated store shard", truncate)
    m.damaged_store('an entry\'s spec edited: "alpha" 32.0 -> 33.0', edit_spec({"alpha": 33.0}))
    m.damaged_store("an entry's spec edited: layers [0, 1] -> [1, 0]", edit_spec({"layers": [1, 0]}))

    # malformed sidecars: reported by verify, the rest served as before, removed by --repair
    before = s.entries()
    for i, text in enumerate(("[]", '{"format": "hyper-prag-store/1"}', "\x00garbage")):
        (s.store / "shards" / f"broken-{i}.json").write_text(text)
    code_ask, _, out = s.ask("--k", str(len(TEXTS)), question=EVERY_DOC)
    code_verify, err_verify, _ = cli("store", "verify", "--store", str(s.store))
    clean = m.repair_store()
    same = code_ask == 0 and served(out) == m.every_doc
    ok = same and one_line_error(code_verify, err_verify) and clean
    data_lost = lost(before, s.entries())
    m.row("malformed store sidecars ([], no entries, garbage)",
          verdict("correct answer", ok, wrong=code_ask == 0 and not same, data_lost=data_lost),
          "rest served as before; verify reports them, --repair removes them" if ok else
          f"same answer {same}, verify {code_verify}, repaired {clean}", data_lost, last_line(err_verify))

    # edited QA pairs of a document: its key changes, so it is re-encoded and the new LoRA is the one applied
    from hyper_prag import assemble
    from hyper_prag.recipes import find_recipe

    qa_file = next(p for p in s.corpus.iterdir() if "qa" in p.name)
    old_key = find_recipe(s.store, assemble.load_model("tiny").identity).key(TEXTS["loom"][1], s.qa["loom"])
    qa_file.write_text(qa_file.read_text().replace("Mira Castell", "Tessa Lind"))
    edited = assemble.load_corpus(str(s.corpus)).doc_qa["loom"]
    new_key = find_recipe(s.store, assemble.load_model("tiny").identity).key(TEXTS["loom"][1], edited)
    before = s.entries()
    code, err, _ = s.encode()
    grown = len(s.entries()) - len(before)
    code_ask, _, out = s.ask()
    applied = [line.split(":", 1)[1].strip() for line in served(out) if "LoRA applied" in line]
    ok = code == 0 and grown == 1 and new_key in applied and old_key not in applied
    m.row("a document's QA pairs edited after encoding",
          verdict("repaired", ok, wrong=code_ask == 0 and old_key in applied, data_lost=lost(before, s.entries())),
          "re-encoded under a new key, the new LoRA applied" if ok else
          f"encode {code}, new entries {grown}, applied {[a[:12] for a in applied]}", lost(before, s.entries()))
    m.loom = served(out)  # the reference from now on


def index_files(m: Matrix) -> None:
    """Damaged index files: the index cache is rebuilt with a warning and serves as before; an explicit --out refuses."""
    from hyper_prag import assemble
    from hyper_prag.retrieve import default_index_path

    s = m.s
    corpus_all = assemble.load_corpus(str(s.corpus))

    def rag(kind: str) -> tuple[int, str, str]:
        return cli("ask", "Who founded Ardent Loom?", "--method", "rag", "--benchmark", str(s.corpus), "--model", "tiny",
                   "--retriever", kind, "--max-new-tokens", "2")

    def index_fault(name: str, kind: str, damage: Callable[[Path], None]) -> None:
        path = default_index_path(kind, corpus_all)
        assert cli("index", "--corpus", str(s.corpus), "--kind", kind)[0] == 0
        reference = served(rag(kind)[2])
        damage(path)
        code, err, out = rag(kind)
        same = code == 0 and served(out) == reference
        explicit = path.parent / f"{path.name}-explicit-{len(m.rows)}"
        assert cli("index", "--corpus", str(s.corpus), "--kind", kind, "--out", str(explicit))[0] == 0
        damage(explicit)
        code_explicit, err_explicit, _ = cli("index", "--corpus", str(s.corpus), "--kind", kind, "--out", str(explicit))
        ok = same and one_line_error(code_explicit, err_explicit) and "--rebuild" in err_explicit
        m.row(name, verdict("repaired", ok, wrong=code == 0 and not same),
              "cache rebuilt, same documents and answer; explicit --out: clear error" if ok else
              f"same answer {same} ({last_line(err)[:60]}), explicit {code_explicit}", "none", last_line(err_explicit))

    def swap_ids(path: Path) -> None:
        ids = json.loads((path / "doc_ids.json").read_text())
        ids[0], ids[1] = ids[1], ids[0]
        (path / "doc_ids.json").write_text(json.dumps(ids))

    def shorten_ids(path: Path) -> None:
        ids = json.loads((path / "doc_ids.json").read_text())
        (path / "doc_ids.json").write_text(json.dumps(ids[:-1]))

    def truncate_npy(path: Path) -> None:
        npy = next(path.rglob("*.npy"))
        npy.write_bytes(npy.read_bytes()[:-16])

    def flip_faiss(path: Path) -> None:
        faiss_file = path / "index.faiss"
        patch_bytes(faiss_file, faiss_file.stat().st_size // 2, b"\x7f\x7f\x7f\x7f")

    def truncate_faiss(path: Path) -> None:
        faiss_file = path / "index.faiss"
        faiss_file.write_bytes(faiss_file.read_bytes()[:-100])

    index_fault("two ids swapped in doc_ids.json (BM25)", "bm25", swap_ids)
    index_fault("doc_ids.json shortened (BM25)", "bm25", shorten_ids)
    index_fault("BM25 .npy truncated", "bm25", truncate_npy)
    index_fault("bytes flipped in index.faiss (dense)", "dense", flip_faiss)
    index_fault("index.faiss truncated (dense)", "dense", truncate_faiss)


def checkpoints(m: Matrix) -> None:
    """Checkpoints from user paths: code in a pickle never runs; damaged or unverifiable hypernet weights are refused
    with the export command; a verifiable one without its description serves as before."""
    import torch
    from safetensors.torch import load_file, save_file

    from hyper_prag import assemble
    from hyper_prag.encoders.hypernet import save_inference_checkpoint
    from hyper_prag.hypernet import Hypernet, HypernetConfig

    s, tmp = m.s, m.tmp
    marker = tmp / "marker"
    crafted = tmp / "crafted.ckpt"
    crafted.write_bytes(pickle.dumps({"state_dict": {}, "hyper_prag_hypernet": {"x": RunsCode(marker)}}, protocol=2))
    code_ask, err_ask, _ = s.ask("--hypernet", str(crafted), method="hypernet")
    code_export, _, _ = cli("export-hypernet", str(crafted), str(tmp / "exported"))
    ok = one_line_error(code_ask, err_ask) and code_export == 2
    m.row("crafted pickle .ckpt given to ask --hypernet / export-hypernet",
          verdict("clear error", ok, code_run=marker.exists()), "refused before unpickling anything", "none",
          last_line(err_ask))
    garbage = tmp / "garbage.ckpt"
    garbage.write_bytes(bytes(range(256)) * 20)
    code, err, _ = cli("export-hypernet", str(garbage), str(tmp / "exported"))
    m.row("garbage .ckpt given to export-hypernet", verdict("clear error", one_line_error(code, err)), "", "none",
          last_line(err))

    base = assemble.load_model("tiny")
    torch.manual_seed(0)
    net = Hypernet.for_model(base, HypernetConfig(doc_dim=16, emb_dim=8, width=16))
    for head in net.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.1)
    good = save_inference_checkpoint(net, tmp / "hn" / "hn.safetensors")
    code, err, out = s.ask("--hypernet", str(good), method="hypernet")
    assert code == 0, err
    reference = served(out)

    def copy(name: str, with_json: bool = True) -> Path:
        folder = tmp / name
        folder.mkdir()
        shutil.copy(good, folder / good.name)
        if with_json:
            shutil.copy(good.with_suffix(".json"), folder / good.with_suffix(".json").name)
        return folder / good.name

    def refused(path: Path) -> tuple[bool, str]:
        code, err, _ = s.ask("--hypernet", str(path), method="hypernet")
        return one_line_error(code, err) and "export-hypernet" in last_line(err), last_line(err)

    flipped = copy("hn-flipped")
    patch_bytes(flipped, flipped.stat().st_size - 8, b"\x01\x02\x03\x04")
    alone = copy("hn-flipped-alone", with_json=False)
    patch_bytes(alone, alone.stat().st_size - 8, b"\x01\x02\x03\x04")
    header = copy("hn-header", with_json=False)
    (header_len,) = struct.unpack("<Q", header.read_bytes()[:8])
    at = 8 + header.read_bytes()[8 : 8 + header_len].index(b"tensors_sha256") + 20  # a hex digit of the recorded hash
    patch_bytes(header, at, b"0" if header.read_bytes()[at : at + 1] != b"0" else b"1")
    results = {"weights, description beside": refused(flipped), "weights, no description": refused(alone),
               "the header's recorded hash": refused(header)}
    ok = all(r for r, _ in results.values())
    m.row("bits flipped in a hypernet checkpoint (weights / header)", verdict("clear error", ok),
          "refused, naming export-hypernet: " + ", ".join(results) if ok else
          "; ".join(f"{k}: {why[:50]}" for k, (r, why) in results.items() if not r), "none",
          results["weights, no description"][1])

    bare = copy("hn-bare", with_json=False)  # the description JSON lost: the header's own hash still verifies
    code, err, out = s.ask("--hypernet", str(bare), method="hypernet")
    same = code == 0 and served(out) == reference
    old = tmp / "hn-old" / "hn.safetensors"  # an older export: no hash in its header, and its description lost
    old.parent.mkdir()
    described = json.loads(good.with_suffix(".json").read_text())
    meta = {k: v for k, v in described.items() if k not in ("weights_sha256", "tensors_sha256")}
    save_file(load_file(str(good)), str(old), metadata={"hypernet": json.dumps(meta, sort_keys=True)})
    old_refused, why = refused(old)
    m.row("a hypernet checkpoint's description JSON missing", verdict("clear error", same and old_refused,
                                                                      wrong=code == 0 and not same),
          "verifiable by its header hash: same answer; an older export without one: refused, naming export-hypernet"
          if same and old_refused else f"same answer {same}, older export refused {old_refused}", "none", why)


def long_documents(m: Matrix) -> None:
    """A long document: the hypernet averages its pieces (the LoRA's norm does not grow) with a warning; the per-doc
    encoder trains on every piece; a RAG prompt is cut to the model's positions with a warning."""
    import torch

    from hyper_prag import assemble
    from hyper_prag.combine import combine, delta_norms
    from hyper_prag.corpus import Corpus, Document, save_corpus
    from hyper_prag.encoders import split_text
    from hyper_prag.encoders.hypernet import HypernetEncoder, save_inference_checkpoint
    from hyper_prag.hypernet import Hypernet, HypernetConfig

    s, tmp = m.s, m.tmp
    base = assemble.load_model("tiny")
    torch.manual_seed(0)
    net = Hypernet.for_model(base, HypernetConfig(doc_dim=16, emb_dim=8, width=16, depth=1, max_doc_tokens=32))
    for head in net.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.1)
    encoder = HypernetEncoder(net, base, checkpoint_sha256="fault-matrix")

    def norm(lora) -> float:  # ‖ΔW‖_F over every module and layer
        return torch.cat(list(delta_norms(lora).values())).norm().item()

    mills = " ".join(f"Mill {i} of Varnholt ground {('barley', 'rye', 'oats')[i % 3]} for {i * 7} families."
                     for i in range(60))
    text = f"Varnholt was founded by Tessa Lind in 1902. {mills}"
    pieces = split_text(base, text, encoder.window)
    warned = io.StringIO()
    with warnings_to(warned):
        (whole,) = encoder.generate([text], ["document 'varn'"])
    singles = encoder.generate(pieces)
    summed = combine(singles, "sum")
    ok = (len(pieces) > 8 and whole.spec.rank == len(pieces) * net.spec.rank
          and norm(whole) <= max(norm(p) for p in singles) * (1 + 1e-4)  # the mean: never above its largest piece
          and f"read in {len(pieces)} pieces, their LoRAs averaged" in warned.getvalue())
    long_corpus = save_corpus(Corpus("long-hn", (Document("varn", "Varnholt", text),), (), {}), tmp / "long-hn")
    checkpoint = save_inference_checkpoint(net, tmp / "long-hn.safetensors")
    code, err, _ = cli("ask", "Who founded Varnholt?", "--method", "hypernet", "--hypernet", str(checkpoint),
                       "--benchmark", str(long_corpus), "--model", "tiny", "--k", "1", "--max-new-tokens", "2")
    ok = ok and code == 0 and "their LoRAs averaged" in err
    m.row(f"a long document through the hypernet ({len(pieces)} pieces)",
          verdict("correct answer", ok, wrong=not ok and code == 0),
          f"mean of pieces: norm {norm(whole):.3f} <= largest piece {max(norm(p) for p in singles):.3f} "
          f"(sum: {norm(summed):.3f}); ask warns" if ok else f"norm {norm(whole):.3f} vs pieces "
          f"{max(norm(p) for p in singles):.3f}, ask {code}: {last_line(err)[:80]}", "none")

    long_text = "Varnholt was founded by Tessa Lind in 1902. " + " ".join(
        f"Mill {i} of Varnholt ground barley and rye for the market." for i in range(3700))
    long_corpus = save_corpus(Corpus("long", (Document("varn", "Varnholt", long_text),), (),
                                     {"varn": (("Who founded Varnholt?", "Tessa Lind"),)}), tmp / "long")
    tokens = len(base.tokenizer(long_text, add_special_tokens=False).input_ids)
    t0 = time.perf_counter()
    code_enc, err_enc, _ = s.encode("--limit", "1", corpus=long_corpus, store=tmp / "long-store")
    from hyper_prag.recipes import find_recipe
    from hyper_prag.store import LoraStore

    keys = LoraStore(tmp / "long-store").keys()
    recipe = find_recipe(tmp / "long-store", base.identity) if keys else None
    stored = LoraStore(tmp / "long-store").get(keys[0]) if keys else None
    pieces_n = stored.spec.rank // recipe.spec.rank if stored is not None else 0
    finite = stored is not None and all(torch.isfinite(t).all() for t in [*stored.A.values(), *stored.B.values()])
    code_ask, err_ask, out = cli("ask", "Who founded Varnholt?", "--method", "rag", "--benchmark", str(long_corpus),
                                 "--model", "tiny", "--k", "1", "--max-new-tokens", "2")
    ok = code_enc == 0 and pieces_n > 1 and finite and code_ask == 0 and "cut to the model's" in err_ask \
        and any("[1] varn" in line for line in served(out))
    m.row(f"a {tokens:,}-token document (per-doc encode, then RAG)", verdict("correct answer", ok),
          f"encoded in {pieces_n} pieces ({time.perf_counter() - t0:.0f} s, rank {pieces_n} x r, finite); "
          "RAG prompt cut with a warning" if ok else
          f"encode {code_enc} {last_line(err_enc)[:80]}; ask {code_ask} {last_line(err_ask)[:80]}", "none")


def recipes_and_writes(m: Matrix) -> None:
    """Recipe files, unwritable stores, bad paths and arguments: clear errors before any work, nothing changed."""
    s, tmp = m.s, m.tmp

    # a truncated recipe JSON: reported by verify, written again by the encode run that made it
    before = s.entries()
    (recipe,) = (s.store / "recipes").glob("*.json")
    good = recipe.read_text()
    recipe.write_text(good[:40])
    code_verify, err_verify, out_verify = cli("store", "verify", "--store", str(s.store))
    said = out_verify + err_verify
    reported = code_verify == 2 and recipe.name in said and "not valid JSON" in said
    code_ask, err_ask, _ = s.ask()
    code_enc, err_enc, _ = s.encode()
    from hyper_prag.recipes import _read_recipe

    rewritten = _read_recipe(recipe)[1] == "" and "writing it again" in err_enc
    code_after, _, out = s.ask()
    same = code_after == 0 and served(out) == m.loom
    ok = reported and one_line_error(code_ask, err_ask) and code_enc == 0 and rewritten and same \
        and cli("store", "verify", "--store", str(s.store))[0] == 0
    m.row("truncated recipe JSON", verdict("repaired", ok, wrong=code_ask == 0, data_lost=lost(before, s.entries())),
          "store verify reports it, ask refuses, encode writes it again (no LoRA re-encoded), same answer" if ok
          else f"verify {code_verify} reported {reported}, ask {code_ask}, encode {code_enc} {last_line(err_enc)[:60]}, "
          f"rewritten {rewritten}, same {same}", lost(before, s.entries()), last_line(err_ask))

    # a failed encode (templated augmentation on a corpus without QA pairs, another recipe: alpha 16) leaves the
    # store's recipes as they were, so ask still finds its one recipe
    recipes_before = files_of(s.store / "recipes")
    other = s.write_config("encode-alpha16.yaml", "float32", "alpha: 16.0\n")
    with counting_encodes() as calls:
        code, err, _ = s.encode(corpus=s.corpus_bare, config=other)
    code_ask, _, out = s.ask()
    same = code_ask == 0 and served(out) == m.loom
    ok = one_line_error(code, err) and calls[0] == 0 and files_of(s.store / "recipes") == recipes_before and same
    m.row("encode fails (templated QA on a corpus without doc_qa)",
          verdict("clear error", ok, wrong=code_ask == 0 and not same, data_lost=lost(before, s.entries())),
          "refused before training; recipes unchanged; ask serves as before" if ok else
          f"encode {code}, trained {calls[0]} chunks, recipes unchanged "
          f"{files_of(s.store / 'recipes') == recipes_before}, ask {code_ask} same {same}", "none", last_line(err))

    def refused_before_work(fault: str, store: Path, fails: Callable[[], contextlib.AbstractContextManager]) -> None:
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(s.store, store)
        files = files_of(store)
        with counting_encodes() as calls, fails():
            code, err, _ = s.encode(corpus=s.corpus_more, store=store)
        unchanged = files_of(store) == files
        code_ask, _, out = s.ask(store=store)
        same = code_ask == 0 and served(out) == m.loom
        code_again, _, _ = s.encode(corpus=s.corpus_more, store=store)  # the cause fixed: the same command works
        ok = one_line_error(code, err) and calls[0] == 0 and unchanged and same and code_again == 0
        m.row(fault, verdict("clear error", ok, wrong=code_ask == 0 and not same,
                             data_lost="none" if unchanged else "store files changed"),
              "refused before training, store unchanged, then the same command works" if ok else
              f"encode {code}, trained {calls[0]} chunks, unchanged {unchanged}, same {same}, again {code_again}",
              "none" if unchanged else "store files changed", last_line(err))

    refused_before_work("read-only store (writes fail with EROFS)", tmp / "ro-store",
                        lambda: refusing_writes(tmp / "ro-store", errno.EROFS))
    refused_before_work("disk full under the store (ENOSPC on flush)", tmp / "full-store",
                        lambda: full_disk(tmp / "full-store"))

    # re-encoding keeps the store's dtype: a bfloat16 config run into a float32 store stores float32
    from hyper_prag.store import LoraStore

    kept = tmp / "dtype-store"
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(s.store, kept)
    bf16_config = s.write_config("encode-bf16.yaml", "bfloat16")
    code, err, _ = s.encode(corpus=s.corpus_more, store=kept, config=bf16_config)
    dtypes = {json.loads(p.read_text())["dtype"] for p in (kept / "shards").glob("*.json")}
    reference = tmp / "dtype-reference"
    shutil.rmtree(reference, ignore_errors=True)
    shutil.copytree(s.store, reference)
    assert s.encode(corpus=s.corpus_more, store=reference)[0] == 0  # the float32 config: what should be stored
    got, want = s.entries(kept), s.entries(reference)
    new = [k for k in LoraStore(kept).keys() if k not in s.entries()]
    as_float32 = got.keys() == want.keys() and all(equal(got[k], want[k]) for k in want)
    ok = code == 0 and dtypes == {"float32"} and len(new) == 1 and as_float32 and "float32 too" in err
    m.row("bfloat16 re-encode into a float32 store", verdict("correct answer", ok, wrong=code == 0 and not ok),
          "stored as float32 (bit-equal to a float32 encode), with a warning" if ok else
          f"encode {code}, shard dtypes {sorted(dtypes)}, equal {as_float32}, warned {'float32 too' in err}", "none",
          last_line(err))

    # a --store that is a file; ask never creates a store
    not_a_folder = tmp / "store.txt"
    not_a_folder.write_text("notes")
    code_enc, err_enc, _ = s.encode(store=not_a_folder)
    code_ask, err_ask, _ = s.ask(store=not_a_folder)
    ok = one_line_error(code_enc, err_enc) and one_line_error(code_ask, err_ask) and not_a_folder.read_text() == "notes"
    m.row("--store names a file (encode, ask)", verdict("clear error", ok, wrong=code_ask == 0), "", "none",
          last_line(err_enc))
    nowhere = tmp / "no-store-here"
    code_ask, err_ask, _ = s.ask(store=nowhere)
    code_verify, err_verify, _ = cli("store", "verify", "--store", str(nowhere))
    ok = one_line_error(code_ask, err_ask) and one_line_error(code_verify, err_verify) and not nowhere.exists()
    m.row("ask / store verify on a store that does not exist", verdict("clear error", ok, wrong=code_ask == 0),
          "refused; no folder created" if ok else f"exists afterwards {nowhere.exists()}", "none", last_line(err_ask))

    # arguments out of range: refused before any question is answered or document encoded
    evaluate = ("evaluate", "--benchmark", str(s.corpus), "--model", "tiny", "--store", str(s.store), "--methods",
                "rag,prag", "--out", str(tmp / "eval"), "--wandb-mode", "disabled")  # --k matters where one retrieves
    probes = {"--seed -1": cli(*evaluate, "--seed", "-1"), "ask --k 99": s.ask("--k", "99"),
              "evaluate --k 99": cli(*evaluate, "--k", "99")}
    ok = all(one_line_error(code, err) for code, err, _ in probes.values()) and not (tmp / "eval").exists()
    m.row("negative --seed, --k above the corpus size (ask, evaluate)", verdict("clear error", ok),
          "refused before any answer" if ok else
          "; ".join(f"{k}: {c} {last_line(e)[:40]}" for k, (c, e, _) in probes.items()), "none",
          last_line(probes["ask --k 99"][1]))
    bad = [("encode", "--config", str(s.config), "--limit", "0"), ("encode", "--config", str(s.config), "--limit", "-1"),
           ("ask", "q", "--max-new-tokens", "0"), ("evaluate", "--batch-size", "0"), ("evaluate", "--resamples", "0"),
           ("evaluate", "--k", "-3"), ("evaluate", "--limit", "x")]
    results = [cli(*argv) for argv in bad]
    ok = all(code == 2 and "Traceback" not in err and "error:" in last_line(err) for code, err, _ in results)
    m.row("--limit 0/-1, --max-new-tokens 0, --batch-size 0, --resamples 0, ...", verdict("clear error", ok),
          "usage line, nothing run", "none", last_line(results[0][1]))


def writers_and_models(m: Matrix) -> None:
    """Two encoders on one store at once; a model with other weights gets another identity."""
    import torch

    from hyper_prag import assemble
    from hyper_prag.api import encode, load_encode_config
    from hyper_prag.model import load_base_model
    from hyper_prag.store import LoraStore

    s, tmp = m.s, m.tmp
    (tmp / "store2").mkdir()
    reports = {}
    gate = threading.Barrier(2)

    def encoder(name: str) -> None:
        gate.wait()
        reports[name] = encode(**load_encode_config(s.config, ["--corpus", str(s.corpus), "--store", str(tmp / "store2"),
                                                                "--limit", "100"]))

    pair = [threading.Thread(target=encoder, args=(n,)) for n in ("a", "b")]
    for t in pair:
        t.start()
    for t in pair:
        t.join()
    stored = len(LoraStore(tmp / "store2"))
    total = reports["a"].encoded + reports["b"].encoded
    (tmp / "store1").mkdir()
    encode(**load_encode_config(s.config, ["--corpus", str(s.corpus), "--store", str(tmp / "store1"), "--limit", "100"]))
    one = s.entries(tmp / "store1")
    same = one.keys() == s.entries(tmp / "store2").keys() and \
        all(equal(one[k], v) for k, v in s.entries(tmp / "store2").items())  # bit for bit what one encoder stored
    ok = total == stored == len(TEXTS) and same
    m.row("two encoders write one store at once", verdict("correct answer", ok, wrong=not same),
          "each LoRA stored and reported once, bit-equal to one encoder's" if ok else
          f"reported {total}, stored {stored}, equal {same}")

    base = assemble.load_model("tiny")
    folder_a, folder_b = tmp / "model-a", tmp / "model-b"
    base.model.save_pretrained(folder_a)
    base.tokenizer.save_pretrained(folder_a)
    with torch.no_grad():
        up = base.model.model.layers[0].mlp.up_proj.weight
        saved = up.clone()
        up.view(-1)[1::2] += 1e-3
        base.model.save_pretrained(folder_b)
        up.copy_(saved)
    base.tokenizer.save_pretrained(folder_b)
    a, b = load_base_model(folder_a, device="cpu"), load_base_model(folder_b, device="cpu")
    m.row("every odd-indexed FFN value of a model changed", verdict("clear error", a.identity != b.identity,
                                                                    wrong=a.identity == b.identity),
          "another identity: the store's LoRAs are refused for it")


def run(tmp: Path) -> list[dict[str, str]]:
    os.environ["HYPER_PRAG_CACHE"] = str(tmp / "cache")
    os.environ["WANDB_MODE"] = "disabled"
    m = Matrix(tmp)
    for group in (threads_every_method, store_entries, index_files, checkpoints, long_documents, recipes_and_writes,
                  writers_and_models):
        try:
            group(m)
        except Exception as err:  # a probe that crashed is a row, not the end of the table
            import traceback

            traceback.print_exc()
            m.row(f"{group.__name__} crashed", "unhandled", f"{type(err).__name__}: {err}"[:200])
    return m.rows


def to_markdown(rows: list[dict[str, str]], counts: Counter) -> str:
    lines = ["# Fault matrix", "", "`python benchmarks/fault_matrix.py --out results/fault_matrix.json` (tiny model, "
             "2-core CPU). Outcomes: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in (*HANDLED, *NOT_HANDLED)) + ".",
             "", "| fault | outcome | what was checked | data lost |", "|---|---|---|---|"]
    lines += [f"| {r['fault']} | {r['outcome']} | {r['detail']} | {r['data lost']} |".replace("\n", " ") for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here (and .md beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, force=True, filename=os.devnull)  # warnings reach cli() captures
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fault-matrix-") as tmp:
        rows = run(Path(tmp))
    counts = Counter(r["outcome"] for r in rows)
    handled = sum(counts[k] for k in HANDLED)
    print(f"\n{len(rows)} faults in {time.perf_counter() - start:.0f} s: {handled} handled ("
          + ", ".join(f"{k} {counts.get(k, 0)}" for k in HANDLED) + "); "
          + ", ".join(f"{k} {counts.get(k, 0)}" for k in NOT_HANDLED))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {k: counts.get(k, 0) for k in (*HANDLED, *NOT_HANDLED)}
        args.out.write_text(json.dumps({"command": "python benchmarks/fault_matrix.py --out results/fault_matrix.json",
                                        "outcomes": summary, "rows": rows}, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(to_markdown(rows, counts))
    return rows


if __name__ == "__main__":
    main()
