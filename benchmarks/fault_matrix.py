"""Every fault a user, a disk or a crash can cause, end to end through the CLI, on a tiny model and real files.

    .venv/bin/python benchmarks/fault_matrix.py [--out results/fault_matrix.json]

Each row damages real files (or misuses a command) the way it happens in practice, runs the
``hyper-prag`` command a user would run next (``hyper_prag.cli.main``, in-process, so exit codes and
stderr are what a shell sees), and checks the outcome:

* ``clear error``: exit code 2 and one ``error:`` line that names what to run, nothing served;
* ``repaired``: the next ordinary command (``encode``, ``ask``) fixes it by itself and serves right;
* ``served correctly``: nothing needed fixing (e.g. concurrent callers get the sequential answers).

``data lost`` compares the store's good entries (and the corpus) before and after: it must be ``none``.
Threads and the model identity are exercised through the library (a CLI process has one caller).
Runs in about a minute on a 2-core CPU; everything lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _RunsCode:
    """A pickle payload that writes a marker file when unpickled (what a crafted checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def cli(*argv: str) -> tuple[int, str]:
    """Runs ``hyper-prag ARGV``; returns the exit code and stderr (argparse's exit included)."""
    from hyper_prag.cli import main

    import logging

    err = io.StringIO()
    handler = logging.StreamHandler(err)  # log lines (warnings) go to stderr in a shell too
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        finally:
            logging.getLogger().removeHandler(handler)
    return code, err.getvalue().strip()


def one_line_error(code: int, err: str) -> bool:
    lines = [line for line in err.splitlines() if line.strip()]
    return code == 2 and bool(lines) and lines[-1].startswith(("error:", "hyper-prag")) and "Traceback" not in err


class Setup:
    """A tiny corpus folder, its per-document store, and helpers to look at the store."""

    def __init__(self, tmp: Path) -> None:
        from hyper_prag.corpus import Corpus, Document, Question, save_corpus

        self.tmp = tmp
        texts = {
            "quell": ("Quellmar", "The river Quellmar rises in the Vostra hills and flows into the Tellin sea."),
            "loom": ("Ardent Loom", "Ardent Loom was founded in 1873 by Mira Castell, a weaver from Tellin."),
            "zorv": ("Zorvath", "Zorvath is a blue mineral found only in the caves of Tellin."),
            "brask": ("Brask", "Brask is a town of 15,140 people on the Quellmar river."),
        }
        docs = tuple(Document(i, t, x) for i, (t, x) in texts.items())
        qa = {i: ((f"What is {t}?", x.split(".")[0]),) for i, (t, x) in texts.items()}
        questions = (Question("q1", "Who founded Ardent Loom?", ("Mira Castell",), "lookup", ("loom",)),
                     Question("q2", "What colour is zorvath?", ("blue",), "lookup", ("zorv",)))
        self.texts = texts
        self.corpus = save_corpus(Corpus("faults", docs, questions, qa), tmp / "corpus")
        self.store = tmp / "store"
        self.config = tmp / "encode.yaml"
        self.config.write_text(
            (ROOT / "configs" / "encode" / "tiny.yaml").read_text()
            + f"\n# fault matrix\nlog_dir: {tmp / 'logs'}\nlogger: none\nprogress: false\nchunk_size: 2\n"
            "store_dtype: float32\n")

    def encode(self, *extra: str) -> tuple[int, str]:
        return cli("encode", "--config", str(self.config), "--corpus", str(self.corpus), "--split", "test",
                   "--store", str(self.store), "--limit", "100", *extra)

    def ask(self, *extra: str, method: str = "prag", question: str = "Who founded Ardent Loom?") -> tuple[int, str]:
        return cli("ask", question, "--method", method, "--benchmark", str(self.corpus), "--model", "tiny",
                   "--store", str(self.store), "--max-new-tokens", "3", *extra)

    def entries(self) -> dict[str, bytes]:
        """key -> the entry's tensors as bytes, for every entry that reads back verified."""
        from hyper_prag.store import LoraStore

        store, out = LoraStore(self.store), {}
        for key in store.keys():
            try:
                lora = store.get(key)
            except Exception:  # a damaged entry: not a good one
                continue
            out[key] = b"".join(t.numpy().tobytes() for t in [*lora.A.values(), *lora.B.values()])
        return out

    def shard(self) -> Path:
        return sorted((self.store / "shards").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)[0]


def _patch(path: Path, offset: int, new: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(new)] = new
    path.write_bytes(bytes(data))


def _first_tensor_offset(shard: Path) -> int:
    data = shard.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    first = min((v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"))
    return 8 + header_len + first


def lost(before: dict[str, bytes], after: dict[str, bytes]) -> str:
    """Good entries of ``before`` that are gone or changed in ``after`` (re-encoded ones count as kept)."""
    gone = [k for k, v in before.items() if after.get(k) not in (v, None) or k not in after]
    return "none" if not gone else f"{len(gone)} entries"


# ------------------------------------------------------------------------------------------------ faults


def store_damage(s: Setup, damage: Callable[[Path], None]) -> tuple[str, str, str]:
    before = s.entries()
    damage(s.shard())
    # every document retrieved (each title in the question): the damaged entry is asked for
    code, err = s.ask("--k", str(len(s.texts)), question="Quellmar, Ardent Loom, Zorvath or Brask?")
    refused = one_line_error(code, err)  # a damaged entry is never served
    re_code, _ = s.encode()  # the ordinary next command re-encodes what failed verification
    after = s.entries()
    ok = refused and re_code == 0 and s.ask()[0] == 0 and set(before) <= set(after)
    outcome = "clear error, then repaired by encode" if ok else f"FAILED ({err[-200:]})"
    return outcome, "none" if ok and set(before) <= set(after) else lost(before, after), err.splitlines()[-1] if err else ""


def run(tmp: Path) -> list[dict[str, str]]:
    import torch

    os.environ["HYPER_PRAG_CACHE"] = str(tmp / "cache")
    os.environ["WANDB_MODE"] = "disabled"
    s = Setup(tmp)
    assert s.encode()[0] == 0
    rows: list[dict[str, str]] = []

    def row(fault: str, outcome: str, data_lost: str = "none", message: str = "") -> None:
        rows.append({"fault": fault, "outcome": outcome, "data lost": data_lost, "message": message[:160]})
        print(f"{fault:58s} | {outcome:40s} | {data_lost}", flush=True)

    # 1. concurrent questions through one model (merged mode, what ask uses)
    from hyper_prag import assemble
    from hyper_prag.assemble import build_method
    from hyper_prag.pipeline import Pipeline
    from hyper_prag.sources import StoreSource

    base = assemble.load_model("tiny")
    corpus = assemble.load_corpus(str(s.corpus)).split("test")
    store = assemble.open_store(s.store, "tiny")
    source = StoreSource(store, assemble.per_doc_from_store(base, s.store), corpus.doc_qa)
    pipeline = Pipeline(base, assemble.build_retriever("bm25", corpus, "cpu"), corpus, max_new_tokens=4, batch_size=1)
    method = build_method("prag", pipeline, source)
    questions = [f"What is {t}?" for t, _ in s.texts.values()] * 3
    weights = {k: v.clone() for k, v in base.model.state_dict().items()}
    sequential = [a.prediction for a in method.answer(questions)]
    got: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, method.answer([questions[i]])[0].prediction))
               for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    exact = all(torch.equal(weights[k], v) for k, v in base.model.state_dict().items())
    same = [got[i] for i in range(len(questions))] == sequential
    row(f"{len(threads)} threads ask through one model (merged)", "served correctly" if same and exact else
        f"FAILED (answers equal {same}, weights bit-exact {exact})")

    # 2-4. damaged store entries
    def flip_low_bits(shard: Path) -> None:
        at = _first_tensor_offset(shard)
        _patch(shard, at, bytes([shard.read_bytes()[at] ^ 0x01]))

    def nan_bytes(shard: Path) -> None:
        _patch(shard, _first_tensor_offset(shard), b"\xff" * 256)

    def truncate(shard: Path) -> None:
        shard.write_bytes(shard.read_bytes()[:-64])

    for name, damage in (("low bits flipped in a store shard", flip_low_bits),
                         ("256 bytes of a shard set to 0xFF (NaN)", nan_bytes), ("truncated store shard", truncate)):
        row(name, *store_damage(s, damage))

    # 5. malformed sidecars
    before = s.entries()
    for i, text in enumerate(("[]", '{"format": "hyper-prag-store/1"}', "\x00garbage")):
        (s.store / "shards" / f"broken-{i}.json").write_text(text)
    code_ask, err_ask = s.ask()
    code_verify, err_verify = cli("store", "verify", "--store", str(s.store))
    code_repair, _ = cli("store", "verify", "--store", str(s.store), "--repair")
    ok = code_ask == 0 and one_line_error(code_verify, err_verify) and code_repair == 0
    row("malformed store sidecars ([], no entries, garbage)", "reported, rest served" if ok else "FAILED",
        lost(before, s.entries()), err_verify.splitlines()[-1] if err_verify else "")

    # 6. edited QA pairs of a document
    data = json.loads((s.corpus / "corpus.json").read_text()) if (s.corpus / "corpus.json").is_file() else None
    qa_file = next(p for p in s.corpus.iterdir() if "qa" in p.name)
    lines = qa_file.read_text().splitlines()
    lines = [line.replace("Mira Castell", "Tessa Lind") for line in lines]
    qa_file.write_text("\n".join(lines) + "\n")
    before = s.entries()
    code, err = s.encode()
    grown = len(s.entries()) - len(before)
    row("a document's QA pairs edited after encoding", "repaired (re-encoded under a new key)" if code == 0 and grown == 1
        else f"FAILED (encode {code}, new entries {grown})", lost(before, s.entries()))
    del data

    # 7-10. damaged index files (the index cache: rebuilt with a warning; an explicit --out: clear error)
    from hyper_prag.retrieve import default_index_path

    corpus_all = assemble.load_corpus(str(s.corpus))

    def index_fault(name: str, kind: str, damage: Callable[[Path], None]) -> None:
        path = default_index_path(kind, corpus_all)
        assert cli("index", "--corpus", str(s.corpus), "--kind", kind)[0] == 0
        damage(path)
        code, err = cli("ask", "Who founded Ardent Loom?", "--method", "rag", "--benchmark", str(s.corpus),
                        "--model", "tiny", "--retriever", kind, "--max-new-tokens", "2")
        explicit = path.parent / f"{path.name}-explicit-{len(rows)}"
        assert cli("index", "--corpus", str(s.corpus), "--kind", kind, "--out", str(explicit))[0] == 0
        damage(explicit)
        code_explicit, err_explicit = cli("index", "--corpus", str(s.corpus), "--kind", kind, "--out", str(explicit))
        ok = code == 0 and one_line_error(code_explicit, err_explicit) and "--rebuild" in err_explicit
        row(name, "repaired (cache rebuilt); explicit --out: clear error" if ok else f"FAILED ({err[-160:]})", "none",
            err_explicit.splitlines()[-1] if err_explicit else "")

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
        _patch(faiss_file, faiss_file.stat().st_size // 2, b"\x7f\x7f\x7f\x7f")

    def truncate_faiss(path: Path) -> None:
        faiss_file = path / "index.faiss"
        faiss_file.write_bytes(faiss_file.read_bytes()[:-100])

    index_fault("two ids swapped in doc_ids.json (BM25)", "bm25", swap_ids)
    index_fault("doc_ids.json shortened (BM25)", "bm25", shorten_ids)
    index_fault("BM25 .npy truncated", "bm25", truncate_npy)
    index_fault("bytes flipped in index.faiss (dense)", "dense", flip_faiss)
    index_fault("index.faiss truncated (dense)", "dense", truncate_faiss)

    # 11-13. checkpoints from user paths
    from hyper_prag.encoders.hypernet import save_inference_checkpoint
    from hyper_prag.hypernet import Hypernet, HypernetConfig

    marker = tmp / "marker"
    crafted = tmp / "crafted.ckpt"
    crafted.write_bytes(pickle.dumps({"state_dict": {}, "hyper_prag_hypernet": {"x": _RunsCode(marker)}}, protocol=2))
    code_ask, err_ask = s.ask("--hypernet", str(crafted), method="hypernet")
    code_export, _ = cli("export-hypernet", str(crafted), str(tmp / "exported"))
    row("crafted pickle .ckpt given to ask --hypernet / export-hypernet",
        "clear error, no code run" if one_line_error(code_ask, err_ask) and code_export == 2 and not marker.exists()
        else "FAILED", "none", err_ask.splitlines()[-1] if err_ask else "")
    garbage = tmp / "garbage.ckpt"
    garbage.write_bytes(bytes(range(256)) * 20)
    code, err = cli("export-hypernet", str(garbage), str(tmp / "exported"))
    row("garbage .ckpt given to export-hypernet", "clear error" if one_line_error(code, err) else "FAILED", "none",
        err.splitlines()[-1] if err else "")
    torch.manual_seed(0)
    checkpoint = save_inference_checkpoint(Hypernet.for_model(base, HypernetConfig(doc_dim=16, emb_dim=8, width=16)),
                                           tmp / "hn.safetensors")
    _patch(checkpoint, checkpoint.stat().st_size - 8, b"\x01\x02\x03\x04")
    code, err = s.ask("--hypernet", str(checkpoint), method="hypernet")
    row("hypernet weights changed after their sha256 was recorded", "clear error" if one_line_error(code, err) else
        "FAILED", "none", err.splitlines()[-1] if err else "")

    # 14. a 70,000-token document: encoded piece by piece; a RAG prompt cut to the model's positions
    from hyper_prag.corpus import Corpus, Document, save_corpus

    long_text = "Varnholt was founded by Tessa Lind in 1902. " + " ".join(
        f"Mill {i} of Varnholt ground barley and rye for the market." for i in range(3700))
    long_corpus = save_corpus(Corpus("long", (Document("varn", "Varnholt", long_text),), (),
                                     {"varn": (("Who founded Varnholt?", "Tessa Lind"),)}), tmp / "long")
    tokens = len(base.tokenizer(long_text, add_special_tokens=False).input_ids)
    t0 = time.perf_counter()
    code_enc, err_enc = cli("encode", "--config", str(s.config), "--corpus", str(long_corpus), "--split", "test",
                            "--store", str(tmp / "long-store"), "--limit", "1")
    from hyper_prag.recipes import find_recipe
    from hyper_prag.store import LoraStore

    keys = LoraStore(tmp / "long-store").keys()
    pieces = (LoraStore(tmp / "long-store").spec(keys[0]).rank // find_recipe(tmp / "long-store", base.identity).spec.rank
              if keys else 0)
    code_ask, err_ask = cli("ask", "Who founded Varnholt?", "--method", "rag", "--benchmark", str(long_corpus),
                            "--model", "tiny", "--max-new-tokens", "2")
    ok = code_enc == 0 and pieces > 1 and code_ask == 0 and "cut to the model's" in err_ask
    row(f"a {tokens:,}-token document (encode, then RAG)",
        f"served: encoded in {pieces} pieces ({time.perf_counter() - t0:.0f} s), prompt cut with a warning" if ok
        else f"FAILED ({err_enc[-300:]} {err_ask[-120:]})", "none")

    # 15. numeric arguments out of range
    bad = [("encode", "--config", str(s.config), "--limit", "0"), ("encode", "--config", str(s.config), "--limit", "-1"),
           ("ask", "q", "--max-new-tokens", "0"), ("evaluate", "--batch-size", "0"), ("evaluate", "--resamples", "0"),
           ("evaluate", "--k", "-3"), ("evaluate", "--limit", "x")]
    results = [cli(*argv) for argv in bad]
    ok = all(code == 2 and "Traceback" not in err and "error:" in err.splitlines()[-1] for code, err in results)
    row("--limit 0/-1, --max-new-tokens 0, --batch-size 0, --resamples 0, ...",
        "clear error (usage line, nothing run)" if ok else "FAILED", "none", results[0][1].splitlines()[-1])

    # 16. two encoders at once on one store
    (tmp / "store2").mkdir()
    from hyper_prag.api import encode, load_encode_config

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
    row("two encoders write one store at once", "served correctly (each LoRA stored and reported once)"
        if total == stored == len(s.texts) else f"FAILED (reported {total}, stored {stored})", "none")

    # 17. a model whose every odd-indexed FFN value changed gets another identity
    from hyper_prag.model import load_base_model

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
    row("every odd-indexed FFN value of a model changed", "refused (another identity: its LoRAs do not apply)"
        if a.identity != b.identity else "FAILED (same identity)", "none")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, force=True, filename=os.devnull)  # warnings reach cli() captures
    with tempfile.TemporaryDirectory(prefix="fault-matrix-") as tmp:
        rows = run(Path(tmp))
    failed = [r for r in rows if r["outcome"].startswith("FAILED") or r["data lost"] != "none"]
    print(f"\n{len(rows)} faults, {len(rows) - len(failed)} handled, data lost in none" if not failed
          else f"\n{len(failed)} of {len(rows)} faults NOT handled")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": "python benchmarks/fault_matrix.py", "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
