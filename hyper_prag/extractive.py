"""Extractive QA pairs: questions written from a document's own sentences, answers that are its spans.

LLM-free, deterministic and fast: for a corpus that brings no QA pairs and an augmenting LLM too
small to write good ones. Each sentence is read as ``[adjunct,] subject verb-group rest`` (participle
clauses such as ", born in 1927," and conjuncts such as "and later worked as ..." inherit the subject),
answer candidates are found in it (full dates, years, counts, measures, capitalised names, the noun of
"was a ..."; the reading is :mod:`hyper_prag.clauses`'s) and each candidate gets

- a wh-question where the clause allows one::

      X was born in 1950 in Kelb.        When was X born? / Where was X born?
      It was published by Y Books.       Who published <title>?
      X has 5,068 employees.             How many employees does X have?
      The city is home to 9,000 people.  How many people is <title> home to?

- a cloze question otherwise: ``Fill in the blank: A census counted ____ residents?``.

Pronouns, surnames and "the city"-style references to the document's subject are replaced by its
name, so that a question can be asked closed-book. Every answer is an exact span of the document
(checked before it is returned). Heuristics for general English prose, not for one data set's templates.
"""

from __future__ import annotations

import re

from hyper_prag.clauses import (
    ADVERBS, BE, HAVE, PARTICIPLES, PARTICLES, PAST, POSSESSIVES, PREPOSITIONS, PRONOUNS, Candidate, Clause,
    Reading, Token, find_candidates, find_clauses, is_participle, it_replacements, noun_phrase, present_base,
    read_document, render, sentence_spans, tokenize, verb_kind,
)

VERSION = 1  # bump when the pairs written here change: LoRAs trained on older pairs then get new store keys

# What the question words depend on.
_LANGUAGES = set("English French German Spanish Latin Italian Russian Chinese Japanese Arabic Greek Portuguese "
                 "Dutch Hebrew Hindi Korean Persian Polish Swedish Turkish".split())
_MOTION = {"move", "go", "come", "travel", "return", "emigrate", "relocate", "flee", "migrate", "sail", "fly",
           "walk", "run", "retire", "transfer"}
_TIME_ABSORB = {"in", "on", "during", "around", "circa", "about", "at"}
_PLACE_ABSORB = {"in", "at", "near", "within", "inside"}
_CLOZE_WINDOW = 16  # tokens kept on either side of a cloze question's blank


def _is_subject(doc: Reading, answer: str) -> bool:
    """Whether an answer only names the document's subject (its title or a surname of it)."""
    name = answer.removeprefix("the ").removeprefix("The ")
    return doc.subject is not None and (doc.subject in (answer, name) or name in doc.subject_words)


# ------------------------------------------------------------------------------------------------ questions

_Found = tuple[tuple[int, int], str]  # (the answer's character span in the document, the question)


def _join(*parts: str | None) -> str:
    text = re.sub(r"\s+", " ", " ".join(p for p in parts if p)).strip()
    text = re.sub(r"\s+([,;:'’])(?=\W|s\b)", r"\1", text)
    text = re.sub(r"[,;:\s]+$", "", text)
    return text[0].upper() + text[1:] + "?"


def _phrase_start(toks: list[Token], c: Candidate, lo: int) -> tuple[int, str | None]:
    """(first token of the phrase that holds the candidate, its preposition): "in the city of X" -> "in"."""
    s = c.start
    if s - 4 >= lo and toks[s - 1].low == "of" and toks[s - 3].low == "the" and toks[s - 4].low in PREPOSITIONS \
            and toks[s - 2].is_word and not toks[s - 2].is_cap:
        return s - 4, toks[s - 4].low  # "in the city of X"
    if s - 3 >= lo and toks[s - 1].low == "year" and toks[s - 2].low == "the" and toks[s - 3].low in PREPOSITIONS:
        return s - 3, toks[s - 3].low  # "in the year 1927"
    if s - 1 >= lo and toks[s - 1].low in PREPOSITIONS:
        return s - 1, toks[s - 1].low
    return s, None


def _base(toks: list[Token], clause: Clause) -> tuple[str, str] | None:
    """(do-auxiliary, base form) of the clause's lexical verb, when known: "received" -> ("did", "receive")."""
    if clause.lexical is None:
        return None
    w = toks[clause.lexical].low
    if w in PAST:
        return "did", PAST[w]
    if verb_kind(toks[clause.lexical]) == "present":
        return "does", present_base(w)
    return None


def _active(toks: list[Token], words: list[int]) -> str | None:
    """A passive's participles in the active past tense ("set up", "completed and published"), when known."""
    out = []
    for k in words:
        w = toks[k].low
        if w in ADVERBS or w in PARTICLES or w == "and":
            out.append(w)
        elif w in PARTICIPLES and w not in ("born", "been"):
            out.append(PARTICIPLES[w])
        elif w.endswith("ed") and w not in PARTICIPLES:
            out.append(w)
        else:
            return None
    return " ".join(out) or None


class _Asker:
    """Builds the questions of one clause: fronted wh-questions where the verb group allows, else in situ."""

    def __init__(self, doc: Reading, toks: list[Token], clause: Clause) -> None:
        self.doc, self.toks, self.clause = doc, toks, clause
        self.a, self.b = clause.rest
        self.it = it_replacements(doc, toks, self.a, self.b)
        self.base = _base(toks, clause)
        self.aux = clause.aux
        self.copula = self.aux in BE and not clause.verb
        self.possess = self.aux in HAVE and not clause.verb  # "has 5,068 employees"
        self.predicate: tuple[int, int] | None = None  # "a city" of "is a city in X"
        if self.copula and self.a + 1 < self.b and toks[self.a].low in ("a", "an"):
            end = noun_phrase(toks, self.a + 1)
            if end > self.a + 1:
                self.predicate = (self.a, end)

    def body(self, skip_from: int, skip_to: int, lo: int | None = None) -> str:
        """The rest of the clause without tokens ``[skip_from, skip_to)``."""
        text, toks = self.doc.text, self.toks
        lo = self.a if lo is None else lo
        return " ".join(p for p in (render(text, toks, lo, skip_from, self.it),
                                    render(text, toks, skip_to, self.b, self.it)) if p)

    def fronted(self, wh: str, skip_from: int, skip_to: int, lo: int | None = None, tail: bool = True) -> str | None:
        c, toks = self.clause, self.toks
        body, end = self.body(skip_from, skip_to, lo), c.tail if tail else ""
        if self.possess:
            return _join(wh, {"has": "does", "have": "do", "had": "did"}[self.aux], c.subject, "have", body, end)
        if self.aux:
            return _join(wh, self.aux, c.subject, " ".join(toks[k].low for k in c.verb), body, end)
        if self.base:
            adverbs = " ".join(toks[k].low for k in c.verb if toks[k].low in ADVERBS)
            particles = " ".join(toks[k].low for k in c.verb if toks[k].low in PARTICLES)
            return _join(wh, self.base[0], c.subject, adverbs, self.base[1], particles, body, end)
        return None

    def verb_text(self) -> str:
        c = self.clause
        ks = sorted(c.verb + ([c.lexical] if c.lexical is not None else []))
        return " ".join(([c.aux] if c.aux else []) + [self.toks[k].low for k in ks])

    def in_situ(self, wh: str, skip_from: int, skip_to: int) -> str:
        text, toks = self.doc.text, self.toks
        return _join(self.clause.subject, self.verb_text(), render(text, toks, self.a, skip_from, self.it), wh,
                     render(text, toks, skip_to, self.b, self.it), self.clause.tail)

    def span(self, start: int, end: int) -> tuple[int, int]:
        return self.toks[start].start, self.toks[end - 1].end

    def questions(self, cands: list[Candidate]) -> list[_Found]:
        out: list[_Found] = []
        doc, toks, a, b = self.doc, self.toks, self.a, self.b
        for c in cands:
            if a <= c.start and c.end <= b and (q := self.question(c)) is not None:
                out.append((self.span(c.start, c.end), q))
        out[:0] = self.noun_questions()
        return out

    def question(self, c: Candidate) -> str | None:
        toks, a = self.toks, self.a
        answer = render(self.doc.text, toks, c.start, c.end)
        if c.kind == "number" and self.possess and c.start - a == 3 and toks[a].low == "a" \
                and toks[a + 2].low == "of" and c.end == self.b:  # "has a population of N"
            noun = toks[a + 1].low
            return _join(f"What {'was' if self.aux == 'had' else 'is'} the {noun} of", self.clause.subject,
                         self.clause.tail)
        if c.kind in ("noun", "number") or _is_subject(self.doc, answer):
            return None
        p, prep = _phrase_start(toks, c, self.predicate[1] if self.predicate else a)
        stop = c.end + c.drop
        lexical = self.base[1] if self.base else None
        if c.kind in ("year", "date"):
            what = f"what {'year' if c.kind == 'year' else 'date'}"
            if prep in _TIME_ABSORB or (prep is None and p == a and self.aux):
                return self.fronted("When", p, stop) or self.in_situ(f"{prep or 'in'} {what}", p, stop)
            if prep is not None:  # "since 1950" -> "Since what year ..."
                return self.fronted(f"{prep.capitalize()} {what}", p, stop) or self.in_situ(f"{prep} {what}", p, stop)
            return None
        if c.kind == "name":
            if answer in _LANGUAGES or (p > a and p == c.start - 1 and toks[p - 1].is_cap and toks[p - 1].is_word):
                return None  # "in English"; "the Nobel Prize in Physics" (the phrase belongs to a name)
            if p == c.start - 4 and prep in ("in", "on", "at"):
                prep = "in"  # "on the island of X": a place
            drop = self.predicate[1] if self.predicate else None  # "is a city in X" -> "Where is S?"
            if prep in _PLACE_ABSORB or (prep in ("to", "into") and lexical in _MOTION):
                return self.fronted("Where", p, stop, drop) or self.in_situ("where", p, stop)
            if prep == "from":
                return self.fronted("Where", c.start, stop, drop) or self.in_situ("where", c.start, stop)
            if prep == "by" and self.predicate is not None and p == self.predicate[1]:
                noun = render(self.doc.text, toks, self.predicate[0] + 1, self.predicate[1])
                return _join(f"Whose {noun}", self.aux, self.clause.subject, self.body(p, stop, drop),
                             self.clause.tail)  # "is a novel by X" -> "Whose novel is S?"
            if prep == "by" and self.aux in BE and self.clause.verb and (active := _active(toks, self.clause.verb)):
                return _join("Who", active, self.clause.subject, self.body(p, stop), self.clause.tail)
            if prep is not None:
                wh = "Who" if prep in ("by", "with") else "What"
                return self.fronted(wh, c.start, stop) or self.in_situ("whom" if wh == "Who" else "what", c.start,
                                                                       stop)
            if p == a and not self.copula:  # the object right after the verb: "received the Order of X"
                return self.fronted("What", p, stop) or self.in_situ("what", p, stop)
            return None
        if c.kind == "count" and c.extra:
            return self.fronted(f"How many {c.extra}", c.start, stop) or self.in_situ(f"how many {c.extra}",
                                                                                    c.start, stop)
        if c.kind == "measure" and self.copula:
            return self.fronted(f"How {c.extra}", c.start, stop)  # "is 212 km long" -> "How long is S?"
        return None

    def noun_questions(self) -> list[_Found]:
        """"S was a merchant", "S became a painter", "S worked as a painter": the noun is an answer."""
        toks, a, b, c = self.toks, self.a, self.b, self.clause
        out: list[_Found] = []
        if a + 1 < b and toks[a].low in ("a", "an") and (self.copula or (self.base and self.base[1] == "become")):
            end = noun_phrase(toks, a + 1)
            if end > a + 1:
                q = _join("What", self.aux, c.subject, c.tail) if self.copula else \
                    _join("What", self.base[0], c.subject, "become", c.tail)
                out.append((self.span(a + 1, end), q))
        for k in range(a, b - 2):
            if toks[k].low == "as" and toks[k + 1].low in ("a", "an"):
                end = noun_phrase(toks, k + 2)
                if end > k + 2 and (q := self.fronted("What", k + 1, end)) is not None:
                    out.append((self.span(k + 2, end), q))
        return out

    def subject_question(self, cands: list[Candidate]) -> list[_Found]:
        """"Thuthysend Press brought it out." -> "Who brought <title> out?" (a name as subject, not the title's)."""
        c = self.clause
        if c.subject_span is None or _is_subject(self.doc, c.subject):
            return []
        s0, s1 = c.subject_span
        if not any(x.kind == "name" and x.start == s0 and x.end == s1 for x in cands):
            return []
        passive = c.aux in BE and any(is_participle(self.toks[k]) for k in c.verb)
        if c.lexical is not None:
            wh = "Who"  # an agent: a name before an active verb
        elif passive and self.toks[s0].low == "the":
            wh = "What"  # "The Order of X was conferred on Y." -> "What was conferred on Y?"
        else:
            return []
        rest = render(self.doc.text, self.toks, self.a, self.b, self.it)
        return [(self.span(s0, s1), _join(wh, self.verb_text(), rest, c.tail))]

    def adjunct_question(self, cands: list[Candidate]) -> list[_Found]:
        """"In 1976, X was awarded Y." -> "When was X awarded Y?" (the adjunct is asked for)."""
        if self.clause.adjunct is None:
            return []
        x, y = self.clause.adjunct
        toks = self.toks
        inner = [c for c in cands if x < c.start and c.end == y]
        if not inner or toks[x].low not in PREPOSITIONS:
            return []
        c, prep = inner[0], toks[x].low
        if c.start != x + 1 and toks[c.start - 1].low != "year":
            return []
        if c.kind in ("year", "date"):
            what = "year" if c.kind == "year" else "date"
            wh = "When" if prep in _TIME_ABSORB else f"{prep.capitalize()} what {what}"
        elif c.kind == "name" and prep in _PLACE_ABSORB:
            wh = "Where"
        else:
            return []
        q = self.fronted(wh, self.a, self.a, tail=False)
        return [] if q is None else [(self.span(c.start, c.end), q)]


# ------------------------------------------------------------------------------------------------ documents


def _without_parentheses(toks: list[Token]) -> list[Token]:
    keep, depth = [], 0
    for t in toks:
        if t.text == "(":
            depth += 1
        elif t.text == ")":
            depth = max(0, depth - 1)
        elif depth == 0:
            keep.append(t)
    return keep


def _parenthetical(doc: Reading, toks: list[Token], cands: list[Candidate]) -> list[_Found]:
    """"X (born 1950) was ..." / "X (1950-2010) was ...": the years of birth and death."""
    out: list[_Found] = []
    if not doc.subject:
        return out
    for k in range(1, len(toks) - 2):
        if toks[k].text != "(":
            continue
        close = next((j for j in range(k + 1, min(len(toks), k + 8)) if toks[j].text == ")"), None)
        if close is None:
            continue
        years = [c for c in cands if c.kind in ("year", "date") and k < c.start and c.end <= close]
        spans = [(toks[c.start].start, toks[c.end - 1].end) for c in years]
        if toks[k + 1].low in ("born", "b") and len(years) == 1:
            out.append((spans[0], _join("When was", doc.subject, "born")))
        elif doc.is_person and len(years) == 2 and close - k == 4 and toks[k + 2].text in "-–—":
            out += [(spans[0], _join("When was", doc.subject, "born")),
                    (spans[1], _join("When did", doc.subject, "die"))]
    return out


def _cloze(doc: Reading, toks: list[Token], c: Candidate) -> str:
    """"Fill in the blank: <the sentence, ____ for the answer>?" (a leading pronoun resolved)."""
    end = len(toks)
    while end and toks[end - 1].text in ".!?":
        end -= 1
    replace = it_replacements(doc, toks, 0, end)
    first = next((k for k, t in enumerate(toks) if t.is_word), 0)
    if doc.subject and first < c.start:
        w = toks[first].low
        if w in PRONOUNS and not (w == "it" and doc.is_person):
            replace[first] = doc.subject
        elif w in POSSESSIVES and not (w == "its" and doc.is_person):
            replace[first] = doc.subject + "'s"
    lo, hi = max(0, c.start - _CLOZE_WINDOW), min(end, c.end + _CLOZE_WINDOW)  # a long sentence: its middle
    before = ("... " if lo > 0 else "") + render(doc.text, toks, lo, c.start, replace)
    after = render(doc.text, toks, c.end, hi, replace) + (" ..." if hi < end else "")
    gap_before = " " if c.start > lo and toks[c.start].start > toks[c.start - 1].end else ""
    gap_after = " " if c.end < end and toks[c.end].start > toks[c.end - 1].end else ""
    text = before + gap_before + "____" + gap_after + after
    return f"Fill in the blank: {text[0].upper() + text[1:]}?"


def extract_qa(text: str, title: str = "", n_qa: int = 0) -> list[tuple[str, str]]:
    """QA pairs written from a document's own sentences (deterministic, no model).

    Args:
        text: the document.
        title: its title; where it occurs in the text it names the document's subject (pronouns,
            surnames and "the city" then resolve to it). Without one, the name that starts the text.
        n_qa: at most this many pairs (``<= 0``: all); wh-questions first, then cloze questions, each
            spread over the sentences (every sentence's first question before any sentence's second).

    Returns:
        ``(question, answer)`` pairs: every question ends with "?", every answer is an exact span of
        ``text`` that the question does not contain, no question twice.
    """
    doc = read_document(text, title)
    all_toks = tokenize(text)
    ranked: list[tuple[int, int, int, str, tuple[int, int]]] = []  # (cloze, rank in sentence, sentence, q, span)
    for s, (sa, sb) in enumerate(sentence_spans(text)):
        toks = [t for t in all_toks if sa <= t.start < sb]
        cands = find_candidates(doc, toks) if toks else []
        if not cands:
            continue
        found = _parenthetical(doc, toks, cands)
        core = _without_parentheses(toks)
        core_cands = find_candidates(doc, core)
        names = [(c.start + (core[c.start].low == "the"), c.end) for c in core_cands if c.kind == "name"]
        protect = {k for c in core_cands if c.kind in ("date", "name") for k in range(c.start, c.end)}
        for clause in find_clauses(doc, core, names, protect):
            asker = _Asker(doc, core, clause)
            found += asker.adjunct_question(core_cands) + asker.questions(core_cands) + \
                asker.subject_question(core_cands)
        for rank, (span, q) in enumerate(found):
            ranked.append((0, rank, s, q, span))
        asked = {span for span, _ in found}
        for rank, c in enumerate(cands, start=len(found)):
            span = (toks[c.start].start, toks[c.end - 1].end)
            if span not in asked and not _is_subject(doc, text[span[0] : span[1]]):
                ranked.append((1, rank, s, _cloze(doc, toks, c), span))
    ranked.sort(key=lambda r: r[:3])
    pairs: list[tuple[str, str]] = []
    seen_questions: set[str] = set()
    seen_answers: set[tuple[int, int]] = set()
    for *_, q, (start, end) in ranked:
        answer = text[start:end]
        key = re.sub(r"\W+", " ", q.lower()).strip()
        words = re.escape(re.sub(r"\W+", " ", answer.lower()).strip())
        in_question = re.search(rf"(?<!\w){words}(?!\w)", key)
        if key in seen_questions or (start, end) in seen_answers or not answer.strip() or in_question:
            continue
        seen_questions.add(key)
        seen_answers.add((start, end))
        pairs.append((q, answer))
        if 0 < n_qa <= len(pairs):
            break
    return pairs
