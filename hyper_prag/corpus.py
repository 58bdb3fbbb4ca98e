"""Corpus records (documents, questions, per-document QA) and their load/save on disk.

A corpus is a folder::

    corpus.json                        {"name": ...}                       (optional; default: folder name)
    documents.jsonl | .parquet         {"id", "title", "text", "split"}    (split optional, default "test")
    questions.jsonl | .parquet         {"id", "question", "answers": [...], "type", "doc_ids": [...], "split"}
    doc_qa.jsonl | .parquet            {"doc_id", "question", "answer"}    (optional augmentation pairs)

Any user corpus in that form works. Documents can also come from ``datasets``: a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a hub dataset id read through the
``datasets`` cache (nothing is downloaded unless ``local_files_only=False``), with a column mapping
``{"id": ..., "text": ..., "title": ..., "split": ...}`` from our fields to the dataset's columns
(:func:`parse_columns` reads ``"id=doc_id,text=body"``). Integer ids become strings, a missing
title column gives empty titles, and a ``DatasetDict``'s split names become the documents' splits
unless a split column is mapped. Such a corpus has documents only (no questions, no doc_qa);
:func:`load_questions` adds the questions of a second dataset (``"path_or_name[:split]"``, its own column
mapping over :data:`QUESTION_FIELDS`), each naming its gold documents by id or by their text.

:func:`load_corpus` validates every record and raises
:class:`HyperPragError` naming the file and the 1-based line (JSONL) or row (Parquet) of the first
problem: missing or mistyped field, empty text, duplicate id, a question's unknown ``doc_ids``, empty
answers, non-UTF-8 bytes, a malformed JSON line. Nothing is silently dropped (blank JSONL lines
carry no record and are skipped). JSONL is parsed line by line with :mod:`json` so errors carry line
numbers; Parquet is read and written through ``datasets``. :func:`save_corpus` writes into a
temporary folder and renames each file into place, and round-trips exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from hyper_prag.errors import HyperPragError

CorpusFormat = Literal["jsonl", "parquet"]
_FORMATS: tuple[str, ...] = ("jsonl", "parquet")
_PARTS: tuple[str, ...] = ("documents", "questions", "doc_qa")


@dataclass(frozen=True)
class Document:
    """One retrievable passage."""

    id: str  # unique within a corpus
    title: str
    text: str  # non-empty after strip()
    split: str = "test"  # "train" | "val" | "test" (user corpora: anything)


@dataclass(frozen=True)
class Question:
    """One evaluation question with its accepted answers and supporting documents."""

    id: str
    question: str
    answers: tuple[str, ...]  # all accepted aliases, first = canonical; non-empty
    type: str  # e.g. "lookup" | "compare" | "bridge" | "inference"
    doc_ids: tuple[str, ...]  # supporting document ids (must exist in the corpus)
    split: str = "test"

    def __post_init__(self) -> None:
        # Lists from callers become tuples so records stay hashable and compare equal after a round trip.
        object.__setattr__(self, "answers", tuple(self.answers))
        object.__setattr__(self, "doc_ids", tuple(self.doc_ids))


@dataclass(frozen=True)
class Corpus:
    """Documents, questions about them, and optional per-document (question, answer) pairs."""

    name: str
    documents: tuple[Document, ...]
    questions: tuple[Question, ...] = ()
    doc_qa: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "documents", tuple(self.documents))
        object.__setattr__(self, "questions", tuple(self.questions))
        # Empty entries are dropped: a doc with no pairs and a missing doc are the same on disk.
        object.__setattr__(self, "doc_qa", {k: tuple((str(q), str(a)) for q, a in v)
                                            for k, v in self.doc_qa.items() if len(v)})
        index: dict[str, Document] = {}
        for doc in self.documents:
            if doc.id in index:
                raise HyperPragError(f"corpus {self.name!r}: duplicate document id {doc.id!r}; give every document a unique id")
            index[doc.id] = doc
        object.__setattr__(self, "_index", index)
        seen: set[str] = set()
        for q in self.questions:
            if q.id in seen:
                raise HyperPragError(f"corpus {self.name!r}: duplicate question id {q.id!r}; give every question a unique id")
            seen.add(q.id)
            for doc_id in q.doc_ids:
                if doc_id not in index:
                    raise HyperPragError(f"corpus {self.name!r}: question {q.id!r} cites unknown document {doc_id!r}; "
                                         "add the document or fix doc_ids")
        for doc_id in self.doc_qa:
            if doc_id not in index:
                raise HyperPragError(f"corpus {self.name!r}: doc_qa names unknown document {doc_id!r}")

    def document(self, doc_id: str) -> Document:
        """Returns the document with id ``doc_id`` (O(1)); HyperPragError if unknown."""
        try:
            return self._index[doc_id]  # type: ignore[attr-defined]
        except KeyError:
            raise HyperPragError(f"corpus {self.name!r} has no document {doc_id!r}") from None

    def split(self, name: str) -> Corpus:
        """Returns the documents of split ``name``, the questions of that split and their doc_qa.

        Raises HyperPragError if a question of the split cites a document of another split.
        """
        docs = tuple(d for d in self.documents if d.split == name)
        ids = {d.id for d in docs}
        questions = tuple(q for q in self.questions if q.split == name)
        for q in questions:
            for doc_id in q.doc_ids:
                if doc_id not in ids:
                    raise HyperPragError(f"corpus {self.name!r}: question {q.id!r} of split {name!r} cites document "
                                         f"{doc_id!r} of split {self.document(doc_id).split!r}; put them in one split")
        doc_qa = {k: v for k, v in self.doc_qa.items() if k in ids}
        return Corpus(name=self.name, documents=docs, questions=questions, doc_qa=doc_qa)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 hex over the documents' (id, title, text), sorted by id (splits and questions excluded)."""
        h = hashlib.sha256()
        for doc in sorted(self.documents, key=lambda d: d.id):
            h.update(json.dumps([doc.id, doc.title, doc.text], ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()

    def __hash__(self) -> int:
        return hash((self.name, self.fingerprint, self.questions))


# ---------------------------------------------------------------------------------------------- reading

def _find(folder: Path, part: str) -> Path | None:
    found = [folder / f"{part}.{fmt}" for fmt in _FORMATS if (folder / f"{part}.{fmt}").is_file()]
    if len(found) > 1:
        raise HyperPragError(f"{folder}: both {found[0].name} and {found[1].name} exist; keep one of them")
    return found[0] if found else None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (1-based line number, object) for each non-blank line, validating UTF-8 and JSON."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise HyperPragError(f"{path}, line {line_no}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                                     "re-encode the file as UTF-8") from None
            if line_no == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise HyperPragError(f"{path}, line {line_no}: malformed JSON ({e.msg}, column {e.colno}); "
                                     "write one JSON object per line") from None
            if not isinstance(obj, dict):
                raise HyperPragError(f"{path}, line {line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (1-based row number, row) of a Parquet file read through ``datasets``."""
    import datasets
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        rows = datasets.Dataset(table).to_list()
    except (OSError, ValueError, UnicodeDecodeError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise HyperPragError(f"{path}, row 1: cannot read Parquet ({e}); rewrite the file with save_corpus") from None
    for row_no, row in enumerate(rows, start=1):
        yield row_no, {k: v for k, v in row.items() if v is not None}


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    return _jsonl_rows(path) if path.suffix == ".jsonl" else _parquet_rows(path)


def _where(path: Path, n: int) -> str:
    return f"{path}, {'line' if path.suffix == '.jsonl' else 'row'} {n}"


def _string(row: dict[str, Any], key: str, path: Path, n: int, *, default: str | None = None,
            non_empty: bool = False) -> str:
    if key not in row:
        if default is not None:
            return default
        raise HyperPragError(f"{_where(path, n)}: missing field {key!r}; every record needs it")
    value = row[key]
    if not isinstance(value, str):
        raise HyperPragError(f"{_where(path, n)}: field {key!r} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise HyperPragError(f"{_where(path, n)}: field {key!r} holds characters that are not valid UTF-8 "
                             "(lone surrogates); fix the text") from None
    if non_empty and not value.strip():
        raise HyperPragError(f"{_where(path, n)}: field {key!r} is empty; remove the record or give it content")
    return value


def _strings(row: dict[str, Any], key: str, path: Path, n: int) -> tuple[str, ...]:
    if key not in row:
        raise HyperPragError(f"{_where(path, n)}: missing field {key!r}; every record needs it")
    value = row[key]
    if not isinstance(value, (list, tuple)) or not value:
        raise HyperPragError(f"{_where(path, n)}: field {key!r} must be a non-empty list of strings")
    out = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise HyperPragError(f"{_where(path, n)}: field {key!r} holds {item!r}; every entry must be a non-empty string")
        _string({key: item}, key, path, n)
        out.append(item)
    return tuple(out)


COLUMN_FIELDS: tuple[str, ...] = ("id", "title", "text", "split")  # the Document fields a column can map to
# The Question fields a questions dataset's column can map to; "context" is the gold passage's text, matched to the
# document with that text when the dataset names no document ids (SQuAD-style rows).
QUESTION_FIELDS: tuple[str, ...] = ("id", "question", "answers", "type", "doc_ids", "context", "split")
DEFAULT_QUESTION_TYPE = "question"  # the type of questions read from a dataset without a type column
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def parse_columns(text: str, fields: tuple[str, ...] = COLUMN_FIELDS) -> dict[str, str]:
    """Parses a column mapping such as ``"id=doc_id,text=body,title=heading"``.

    Args:
        text: comma-separated ``field=column`` pairs.
        fields: the fields that may be mapped: :data:`COLUMN_FIELDS` (documents) or :data:`QUESTION_FIELDS`.
    Returns:
        ``{field: column}``.
    """
    mapping: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        field_name, sep, column = (x.strip() for x in part.partition("="))
        if not sep or not field_name or not column:
            raise HyperPragError(f"column mapping {text!r}: {part!r} is not field=column; write e.g. 'id=doc_id,text=body'")
        if field_name not in fields:
            raise HyperPragError(f"column mapping {text!r}: unknown field {field_name!r}; map any of {list(fields)}")
        if field_name in mapping:
            raise HyperPragError(f"column mapping {text!r}: field {field_name!r} is mapped twice")
        mapping[field_name] = column
    return mapping


def _check_columns(columns: Mapping[str, str] | str | None,
                   fields: tuple[str, ...] = COLUMN_FIELDS) -> dict[str, str]:
    mapping = parse_columns(columns, fields) if isinstance(columns, str) else dict(columns or {})
    unknown = [k for k in mapping if k not in fields]
    if unknown:
        raise HyperPragError(f"column mapping names unknown fields {unknown}; map any of {list(fields)}")
    return mapping


def _read_documents(rows: Iterator[tuple[int, dict[str, Any]]], path: Path, columns: Mapping[str, str],
                    default_split: str = "test", from_dataset: bool = False) -> list[Document]:
    """Validated documents from (row number, row) pairs, reading each field from its mapped column.

    ``from_dataset``: integer ids become strings and a title column may be absent (``datasets`` sources).
    """
    col = {f: columns.get(f, f) for f in COLUMN_FIELDS}
    documents: list[Document] = []
    doc_line: dict[str, int] = {}
    for n, row in rows:
        if from_dataset and isinstance(row.get(col["id"]), int) and not isinstance(row.get(col["id"]), bool):
            row = {**row, col["id"]: str(row[col["id"]])}  # datasets often number their rows
        doc_id = _string(row, col["id"], path, n, non_empty=True)
        if doc_id in doc_line:
            raise HyperPragError(f"{_where(path, n)}: duplicate document id {doc_id!r} "
                                 f"(first at {doc_line[doc_id]}); give every document a unique id")
        doc_line[doc_id] = n
        title_default = "" if from_dataset and "title" not in columns else None
        documents.append(Document(id=doc_id, title=_string(row, col["title"], path, n, default=title_default),
                                  text=_string(row, col["text"], path, n, non_empty=True),
                                  split=_string(row, col["split"], path, n, default=default_split, non_empty=True)))
    return documents


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_hub_dataset(name: str, split: str | None, local_files_only: bool):
    import datasets

    offline = datasets.config.HF_HUB_OFFLINE
    try:
        # datasets has no per-call offline switch; without it an uncached id costs ~25 s of retries.
        datasets.config.HF_HUB_OFFLINE = offline or local_files_only
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ValueError...
        hint = ("it is not in the datasets cache and local_files_only=True forbids downloading; save it with "
                "Dataset.save_to_disk where there is network and pass that folder, or pass local_files_only=False"
                if local_files_only else "check the id and your network")
        raise HyperPragError(f"corpus {name!r} is neither a corpus folder nor a loadable hub dataset: {hint} "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def _load_saved_dataset(folder: Path):
    import datasets

    try:
        return datasets.load_from_disk(str(folder))
    except (OSError, ValueError, FileNotFoundError) as e:
        raise HyperPragError(f"{folder}: cannot read this save_to_disk folder ({e}); save the dataset again") from None


def _dataset_corpus(data, where: Path, name: str, columns: Mapping[str, str], split: str | None) -> Corpus:
    """A documents-only corpus from a ``datasets.Dataset`` or ``DatasetDict``."""
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if split is not None:
            if split not in data:
                raise HyperPragError(f"{where}: no split {split!r}; it has {list(data)}")
            parts = {split: data[split]}
        else:
            parts = dict(data)
    else:
        parts = {split or "test": data}
    wanted = {columns.get(f, f) for f in ("id", "text")} | {columns[f] for f in ("title", "split") if f in columns}
    documents: list[Document] = []
    for part_name, ds in parts.items():
        missing = sorted(c for c in wanted if c not in ds.column_names)
        if missing:
            raise HyperPragError(f"{where} ({part_name}): no column(s) {missing}; its columns are {ds.column_names}. "
                                 "Map our fields to them, e.g. columns='id=doc_id,text=body,title=heading'")
        keep = [c for c in ds.column_names if c in wanted or c in ("title", "split")]
        rows = enumerate(({k: v for k, v in r.items() if v is not None} for r in ds.select_columns(keep).to_list()),
                         start=1)
        documents += _read_documents(rows, where, columns, default_split=part_name, from_dataset=True)
    return Corpus(name=name, documents=tuple(documents))


def load_corpus(path: str | Path, columns: Mapping[str, str] | str | None = None, *, split: str | None = None,
                local_files_only: bool = True) -> Corpus:
    """Loads and validates a corpus: a corpus folder, a ``datasets`` ``save_to_disk`` folder, or a hub dataset id.

    Args:
        path: a corpus folder (format: module docstring), a folder written by ``save_to_disk``, or a
            hub dataset id such as ``"org/name"`` (read through the ``datasets`` cache).
        columns: ``{field: column}`` (or ``"id=doc_id,text=body"``) naming the columns of the
            documents' fields; unmapped fields use their own names.
        split: for a ``DatasetDict`` or hub dataset, the one split to read (default: every split).
        local_files_only: for a hub id, never download (default); ``False`` lets ``datasets`` fetch it.
    Returns:
        The corpus; HyperPragError naming file and line (or row) on any invalid record.
    """
    mapping = _check_columns(columns)
    folder = Path(path)
    if not folder.is_dir():
        text = str(path)
        if not folder.exists() and _HUB_ID.match(text) and not text.startswith("."):
            data = _load_hub_dataset(text, split, local_files_only)
            return _dataset_corpus(data, Path(text), text, mapping, split)
        raise HyperPragError(f"{folder}: no such corpus folder; make one with save_corpus or `hyper-prag make-benchmark`, "
                             "or pass a datasets save_to_disk folder or a cached hub dataset id")
    if _is_saved_dataset(folder):
        return _dataset_corpus(_load_saved_dataset(folder), folder, folder.name, mapping, split)
    doc_path = _find(folder, "documents")
    if doc_path is None:
        raise HyperPragError(f"{folder}: no documents.jsonl or documents.parquet (nor a datasets save_to_disk folder); "
                             "a corpus needs its documents")
    name = folder.name
    meta = folder / "corpus.json"
    if meta.is_file():
        try:
            name = json.loads(meta.read_bytes().decode("utf-8"))["name"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise HyperPragError(f"{meta}, line 1: expected {{\"name\": ...}} in UTF-8 JSON ({e})") from None

    documents = _read_documents(_rows(doc_path), doc_path, mapping)
    doc_line = {d.id: None for d in documents}

    questions: list[Question] = []
    q_path = _find(folder, "questions")
    if q_path is not None:
        q_line: dict[str, int] = {}
        for n, row in _rows(q_path):
            q_id = _string(row, "id", q_path, n, non_empty=True)
            if q_id in q_line:
                raise HyperPragError(f"{_where(q_path, n)}: duplicate question id {q_id!r} (first at {q_line[q_id]})")
            q_line[q_id] = n
            doc_ids = _strings(row, "doc_ids", q_path, n)
            for doc_id in doc_ids:
                if doc_id not in doc_line:
                    raise HyperPragError(f"{_where(q_path, n)}: doc_ids names {doc_id!r}, which is not in "
                                         f"{doc_path.name}; add the document or fix the question")
            questions.append(Question(id=q_id, question=_string(row, "question", q_path, n, non_empty=True),
                                      answers=_strings(row, "answers", q_path, n),
                                      type=_string(row, "type", q_path, n, non_empty=True), doc_ids=doc_ids,
                                      split=_string(row, "split", q_path, n, default="test", non_empty=True)))

    doc_qa: dict[str, list[tuple[str, str]]] = {}
    qa_path = _find(folder, "doc_qa")
    if qa_path is not None:
        for n, row in _rows(qa_path):
            doc_id = _string(row, "doc_id", qa_path, n, non_empty=True)
            if doc_id not in doc_line:
                raise HyperPragError(f"{_where(qa_path, n)}: doc_id {doc_id!r} is not in {doc_path.name}")
            doc_qa.setdefault(doc_id, []).append((_string(row, "question", qa_path, n, non_empty=True),
                                                  _string(row, "answer", qa_path, n, non_empty=True)))
    return Corpus(name=name, documents=tuple(documents), questions=tuple(questions),
                  doc_qa={k: tuple(v) for k, v in doc_qa.items()})


# -------------------------------------------------------------------------------------- questions dataset

_DATA_FILES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}  # datasets builder by suffix


def split_source(text: str) -> tuple[str, str | None]:
    """Splits ``"path_or_name[:split]"`` into the dataset and its split (``None``: every split).

    A text that names an existing file or folder as a whole is never split (a path may hold a colon).
    """
    name, sep, split = text.rpartition(":")
    if not sep or Path(text).exists() or not name or not re.fullmatch(r"[\w.-]+", split):
        return text, None
    return name, split


def _open_questions(source: str, split: str | None, local_files_only: bool):
    """The questions' ``datasets`` object: a ``save_to_disk`` folder, a JSONL/JSON/Parquet/CSV file or a hub id."""
    import datasets

    path = Path(source).expanduser()
    if path.is_dir():
        if not _is_saved_dataset(path):
            raise HyperPragError(f"questions {source!r}: this folder is not a datasets save_to_disk folder; pass one, "
                                 "a .jsonl/.parquet/.csv file of questions, or a cached hub dataset id")
        data = _load_saved_dataset(path)
    elif path.is_file():
        builder = _DATA_FILES.get(path.suffix.lower())
        if builder is None:
            raise HyperPragError(f"questions {source!r}: unknown file type {path.suffix!r}; use one of {sorted(_DATA_FILES)}")
        try:
            data = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # pyarrow / datasets parse errors
            raise HyperPragError(f"questions {source!r}: cannot read the file ({type(e).__name__}: {e})") from None
        return {split or "test": data}
    elif _HUB_ID.match(source) and not source.startswith("."):
        data = _load_hub_dataset(source, split, local_files_only)
    else:
        raise HyperPragError(f"questions {source!r}: no such file or folder, and not a hub dataset id")
    if isinstance(data, datasets.DatasetDict):
        if split is not None and split not in data:
            raise HyperPragError(f"questions {source!r}: no split {split!r}; it has {list(data)} (write {source}:SPLIT)")
        return {split: data[split]} if split is not None else dict(data)
    return {split or "test": data}


def _answers(value: Any) -> Any:
    """An answers cell as a list: a string, a list of strings, or SQuAD's ``{"text": [...], "answer_start": [...]}``."""
    if isinstance(value, Mapping) and "text" in value:
        value = value["text"]
    return [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else value


def _ids(value: Any) -> Any:
    """A doc-ids cell as a list of strings (datasets often number documents with integers)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in items]


def load_questions(source: str | Path, corpus: Corpus, columns: Mapping[str, str] | str | None = None, *,
                   local_files_only: bool = True) -> Corpus:
    """Adds the questions of a second dataset to a corpus (e.g. a ``datasets`` corpus, which carries documents only).

    Each row gives a question, its answers and its gold documents: by id (``doc_ids``: one id or a list) or by
    text (``context``: the passage, matched to the corpus document with that exact text, as in SQuAD's rows); a
    row with neither has no gold documents. Missing optional columns: ids ``<dataset>-<row>``, type
    ``"question"``, split: the split of its gold documents, else the dataset split's name if documents have
    that split, else the documents' one split, else ``"test"``.

    Args:
        source: ``"path_or_name[:split]"``: a ``save_to_disk`` folder, a ``.jsonl``/``.json``/``.parquet``/``.csv``
            file, or a cached hub dataset id, optionally with the one split to read.
        corpus: the corpus the questions are about (its documents are what ``doc_ids``/``context`` name).
        columns: ``{field: column}`` (or ``"question=query,answers=answer,context=passage"``) over
            :data:`QUESTION_FIELDS`; unmapped fields use their own names.
        local_files_only: for a hub id, never download (default).
    Returns:
        The corpus with these questions after its own.
    Raises:
        HyperPragError: a missing column, an empty question or answer, an unknown document id or a context no
            document has, naming the dataset and row.
    """
    mapping = _check_columns(columns, QUESTION_FIELDS)
    col = {f: mapping.get(f, f) for f in QUESTION_FIELDS}
    name, split = split_source(str(source))
    parts = _open_questions(name, split, local_files_only)
    by_text: dict[str, str] = {}
    for doc in corpus.documents:
        by_text.setdefault(doc.text.strip(), doc.id)
    doc_splits = {d.split for d in corpus.documents}
    label = Path(name).stem if Path(name).expanduser().exists() else name.replace("/", "-")
    questions: list[Question] = []
    for part_name, ds in parts.items():
        where = Path(f"{name} ({part_name})")
        required = [col["question"], col["answers"]] + [mapping[f] for f in mapping if f not in ("question", "answers")]
        missing = sorted({c for c in required if c not in ds.column_names})
        if missing:
            raise HyperPragError(
                f"questions {name!r} ({part_name}): no column(s) {missing}; its columns are {ds.column_names}. Map "
                "our fields to them, e.g. question_columns='question=query,answers=answer,doc_ids=passage_id' "
                "(or context=passage to find the gold document by its text)")
        for n, row in enumerate(ds.to_list(), start=1):
            row = {k: v for k, v in row.items() if v is not None}
            if isinstance(row.get(col["id"]), int) and not isinstance(row.get(col["id"]), bool):
                row[col["id"]] = str(row[col["id"]])
            q_id = _string(row, col["id"], where, n, default=f"{label}-{part_name}-{n:05d}", non_empty=True)
            text = _string(row, col["question"], where, n, non_empty=True)
            answers = _strings({col["answers"]: _answers(row.get(col["answers"], []))}, col["answers"], where, n)
            if col["doc_ids"] in row:
                doc_ids = _strings({col["doc_ids"]: _ids(row[col["doc_ids"]])}, col["doc_ids"], where, n)
                unknown = [d for d in doc_ids if d not in corpus._index]  # type: ignore[attr-defined]  # O(1) each
                if unknown:
                    raise HyperPragError(f"{_where(where, n)}: doc_ids names {unknown[0]!r}, which is not a document "
                                         f"of corpus {corpus.name!r}; map doc_ids to the column of the documents' ids")
            elif col["context"] in row:
                context = _string(row, col["context"], where, n, non_empty=True).strip()
                if context not in by_text:
                    raise HyperPragError(f"{_where(where, n)}: no document of corpus {corpus.name!r} has this "
                                         f"context's text ({context[:60]!r}…); map doc_ids instead, or check --columns")
                doc_ids = (by_text[context],)
            else:
                doc_ids = ()
            cited = {corpus.document(d).split for d in doc_ids}
            default_split = (next(iter(cited)) if cited else part_name if part_name in doc_splits
                             else next(iter(doc_splits)) if len(doc_splits) == 1 else "test")
            questions.append(Question(id=q_id, question=text, answers=answers,
                                      type=_string(row, col["type"], where, n, default=DEFAULT_QUESTION_TYPE,
                                                   non_empty=True),
                                      doc_ids=doc_ids,
                                      split=_string(row, col["split"], where, n, default=default_split, non_empty=True)))
    if not questions:
        raise HyperPragError(f"questions {source!r}: the dataset has no rows")
    return Corpus(name=corpus.name, documents=corpus.documents, questions=corpus.questions + tuple(questions),
                  doc_qa=corpus.doc_qa)


# ---------------------------------------------------------------------------------------------- writing

def _records(corpus: Corpus) -> dict[str, list[dict[str, Any]]]:
    return {
        "documents": [{"id": d.id, "title": d.title, "text": d.text, "split": d.split} for d in corpus.documents],
        "questions": [{"id": q.id, "question": q.question, "answers": list(q.answers), "type": q.type,
                       "doc_ids": list(q.doc_ids), "split": q.split} for q in corpus.questions],
        "doc_qa": [{"doc_id": doc_id, "question": qq, "answer": a}
                   for doc_id, pairs in corpus.doc_qa.items() for qq, a in pairs],
    }


def save_corpus(corpus: Corpus, path: str | Path, format: CorpusFormat = "jsonl") -> Path:
    """Writes ``corpus`` as a folder (format: module docstring), atomically per file.

    Files are written into a temporary folder beside ``path`` and renamed into place; files of the
    other format (or parts the corpus lacks) left from an earlier save are removed.

    Args:
        corpus: what to write.
        path: the corpus folder (created if missing).
        format: "jsonl" (one JSON object per line, UTF-8) or "parquet" (through ``datasets``).
    Returns:
        The corpus folder.
    """
    if format not in _FORMATS:
        raise HyperPragError(f"unknown corpus format {format!r}; use one of {_FORMATS}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        written: list[str] = []
        for part, rows in _records(corpus).items():
            if not rows and part != "documents":
                continue
            target = tmp / f"{part}.{format}"
            if format == "jsonl":
                with open(target, "w", encoding="utf-8", newline="\n") as f:
                    for row in rows:
                        f.write(json.dumps(row, ensure_ascii=False))
                        f.write("\n")
            else:
                import datasets

                datasets.Dataset.from_list(rows).to_parquet(str(target))
            written.append(target.name)
        (tmp / "corpus.json").write_text(json.dumps({"name": corpus.name}, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append("corpus.json")
        for name in written:
            os.replace(tmp / name, folder / name)
        for part in _PARTS:
            for fmt in _FORMATS:
                stale = folder / f"{part}.{fmt}"
                if stale.name not in written and stale.exists():
                    stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
