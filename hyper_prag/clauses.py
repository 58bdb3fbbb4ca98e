"""Reading English sentences for question writing: tokens, names, answer candidates and clauses.

The reading :mod:`hyper_prag.extractive` writes its questions from. Everything keeps character offsets
into the document, so an answer taken from a reading is an exact span of the text.

- :func:`read_document`: the document's subject (its title where the text contains it, else the name that
  opens it), whether it is about a person, and the noun of its "X is a <noun>" ("publishing house");
- :func:`find_candidates`: a sentence's answer spans: full dates, years, counts ("5,068 employees"),
  measures ("212 km long"), capitalised names (lists such as "Denmark, Iceland and Norway" as one);
- :func:`find_clauses`: a sentence as ``[adjunct,] subject verb-group rest`` clauses: participle clauses
  (", born in 1927,") and conjuncts ("and later worked as ...") inherit the subject, and a subject that
  refers to the document's ("She", "Her elder brother", "The city", a surname) is resolved to its name.

Heuristics for general English prose; they fail soft (a sentence they cannot read has no clause).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ------------------------------------------------------------------------------------------------ lexicon

_MONTHS = ("January February March April May June July August September October November December "
           "Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec").split()
_WEEKDAYS = set("Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split())
_MONTH = "(?:" + "|".join(_MONTHS) + r")\.?"
_DATE = re.compile(
    rf"\b(?:\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH},?\s+\d{{3,4}}"  # 12 March 1950
    rf"|{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{3,4}}"  # March 12, 1950
    rf"|{_MONTH}\s+\d{{4}}"  # March 1950
    r"|\d{4}-\d{2}-\d{2})\b")  # 1950-03-12
_TOKEN = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\w)|\d+(?:\.\d+)?(?!\w)|\w+(?:-\w+)*|\S")
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")

# Capitalised words that start sentences without naming anything.
_FUNCTION = set("""a an the in on at by for from to with of as after before during since until when while where which
who whose what why how he she it they we i you his her its their our my your this that these those there here today
later now then however also although though because but and or so if many most some several each every all both one
two three four five six seven eight nine ten another other such no not according despite unlike like following
among between over under within without about around near once yet still thus meanwhile currently eventually
subsequently originally initially formerly previously afterwards recently finally""".split())
PRONOUNS = {"he", "she", "it", "they"}
_DETERMINERS = {"a", "an", "the", "his", "her", "its", "their", "this", "that", "these", "those"}
_HONORIFICS = {"dr", "mr", "mrs", "ms", "prof", "sir", "saint", "st", "lord", "lady", "king", "queen"}
POSSESSIVES = {"his", "her", "its", "their"}
_PERSON_WORDS = {"he", "she", "him", "his", "her", "hers", "himself", "herself"}
BE = {"is", "are", "was", "were"}
HAVE = {"has", "have", "had"}
_MODALS = {"will", "would", "can", "could", "may", "might", "shall", "should", "must", "does", "do", "did"}
ADVERBS = set("""also later then still now never not first once subsequently eventually originally initially
already often only soon again jointly officially formally finally briefly mainly largely partly""".split())
PARTICLES = {"up", "out", "down", "off", "back", "away"}
PREPOSITIONS = set("""in on at by for from to with of as into onto near within inside during since until till
before after about around across through throughout under over against between among toward towards via upon
circa""".split())
_STOP = PREPOSITIONS | _FUNCTION | BE | HAVE | _MODALS | {"and", "or", "but", "nor", "who", "that", "which"}
_CONNECTORS = {"of", "de", "del", "della", "di", "da", "du", "des", "la", "le", "van", "von", "der", "den", "&"}
_NUMBER_WORDS = {"hundred", "thousand", "million", "billion", "trillion"}
_RELATIVES = {"who", "which", "whose", "whom", "where"}
_UNITS = set("km m cm mm kg g t mi miles mile ft feet foot metres meters metre meter kilometres kilometers "
             "kilometre kilometer hectares ha acres inches years".split())
_MEASURE_ADJECTIVES = {"long", "tall", "high", "wide", "deep", "old", "heavy", "large", "thick", "broad"}
_SUBORDINATORS = {"where", "which", "who", "whose", "whom", "when", "while", "although", "though", "because", "as",
                  "whereas", "if", "unless", "that"}
_LEADING_ADVERBS = set("""today later now currently eventually subsequently then meanwhile originally initially
formerly previously afterwards recently finally""".split())

# Past tense -> base form of common verbs (do-support needs the base: "When did X die?").
PAST = dict(pair.split(":") for pair in """became:become began:begin brought:bring built:build bought:buy
came:come died:die drew:draw fled:flee flew:fly fought:fight gave:give got:get grew:grow held:hold kept:keep
knew:know led:lead left:leave lost:lose made:make met:meet paid:pay ran:run rose:rise said:say sang:sing
saw:see sent:send sold:sell spent:spend stood:stand taught:teach told:tell took:take went:go won:win wrote:write
spoke:speak fell:fall chose:choose drove:drive lived:live moved:move received:receive published:publish
founded:found created:create produced:produce joined:join married:marry studied:study worked:work served:serve
played:play started:start opened:open closed:close completed:complete designed:design directed:direct
composed:compose painted:paint recorded:record released:release signed:sign returned:return retired:retire
settled:settle emigrated:emigrate travelled:travel traveled:travel graduated:graduate attended:attend
appeared:appear employed:employ established:establish introduced:introduce launched:launch acquired:acquire
merged:merge discovered:discover invented:invent developed:develop reached:reach counted:count entered:enter
visited:visit named:name called:call elected:elect awarded:award earned:earn gained:gain achieved:achieve
announced:announce ruled:rule reigned:reign stayed:stay remained:remain belonged:belong contained:contain
included:include hosted:host passed:pass owned:own managed:manage housed:house covered:cover survived:survive
defeated:defeat captured:capture occupied:occupy translated:translate edited:edit
performed:perform competed:compete followed:follow represented:represent operated:operate""".split())
_BASES = set(PAST.values()) | {"employ", "border", "flow", "lie", "stand", "serve", "operate", "have"}
# Past participles that do not end in -ed, and the past tense that makes "was P by X" active ("Who P' S?").
PARTICIPLES = dict(pair.split(":") for pair in """born:bore written:wrote drawn:drew given:gave taken:took
known:knew shown:showed seen:saw begun:began sung:sang grown:grew chosen:chose driven:drove spoken:spoke done:did
built:built made:made set:set held:held led:led won:won run:ran kept:kept sold:sold told:told found:found
brought:brought bought:bought caught:caught taught:taught left:left lost:lost put:put read:read laid:laid
paid:paid sent:sent spent:spent rebuilt:rebuilt overseen:oversaw undertaken:undertook been:was""".split())


# ------------------------------------------------------------------------------------------------ tokens


@dataclass(frozen=True)
class Token:
    """One word, number or punctuation mark of a document."""

    text: str
    start: int  # character offsets in the document
    end: int

    @property
    def low(self) -> str:
        return self.text.lower()

    @property
    def is_cap(self) -> bool:
        return self.text[0].isupper()

    @property
    def is_word(self) -> bool:
        return self.text[0].isalpha()


def tokenize(text: str) -> list[Token]:
    """Words, numbers ("5,068", "3.5") and single punctuation marks, with their offsets in ``text``."""
    return [Token(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


@dataclass(frozen=True)
class Candidate:
    """An answer span in a sentence: tokens ``[start, end)`` of the sentence's token list."""

    kind: str  # date | year | count | measure | name | noun | number
    start: int
    end: int
    extra: str = ""  # count: the counted noun ("employees"); measure: its adjective ("long")
    drop: int = 0  # count / measure: tokens after the answer that the wh-phrase also replaces


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text`` (abbreviations and initials do not end a sentence)."""
    abbreviations = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "mt", "no", "vol", "inc", "ltd", "co",
                     "corp", "vs", "etc", "gen", "col", "lt", "sgt", "capt", "rev", "hon", "fig", "approx", "ca"}
    spans, start = [], 0
    for m in re.finditer(r"[.!?]+[\"')\]”’]*\s+", text):
        word = re.search(r"(\w+)$", text[start : m.start()])
        nxt = text[m.end() : m.end() + 1]
        if m.group().startswith(".") and word and (word.group(1).lower() in abbreviations
                                                    or (len(word.group(1)) == 1 and word.group(1).isupper())):
            continue
        if nxt and not (nxt.isupper() or nxt.isdigit() or nxt in "\"'(“‘["):
            continue
        spans.append((start, m.end() - len(m.group()) + len(m.group().rstrip())))
        start = m.end()
    if text[start:].strip():
        spans.append((start, len(text.rstrip())))
    return [(a, b) for a, b in spans if text[a:b].strip()]


# ------------------------------------------------------------------------------------------------ the document


@dataclass
class Reading:
    """What the whole document tells about its sentences (:func:`read_document`)."""

    text: str
    subject: str | None  # the entity the document is about ("Wenda Naduth"), or None
    subject_words: tuple[str, ...]
    is_person: bool  # uses he/she/his/her: "it" then does not refer to the subject
    known: set[str]  # capitalised words seen mid-sentence (names, not sentence-initial common words)
    category: str = ""  # the noun of "S is a <noun>" in the first sentence ("publishing house")


def render(text: str, toks: list[Token], a: int, b: int, replace: dict[int, str] | None = None) -> str:
    """Tokens ``[a, b)`` as written in the document, some replaced."""
    out: list[str] = []
    for k in range(a, b):
        if k > a and toks[k].start > toks[k - 1].end:
            out.append(" ")
        out.append(replace[k] if replace and k in replace else toks[k].text)
    return "".join(out)


def _names(doc: Reading, toks: list[Token], dates: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Capitalised multi-word spans (and single known names) as token ranges; the title first."""
    spans: list[tuple[int, int]] = []
    taken = [False] * len(toks)
    for a, b in dates:
        for k in range(a, b):
            taken[k] = True
    if doc.subject:  # occurrences of the title, which may contain lower-case words ("A Winter in Dryglas")
        words = doc.subject_words
        for i in range(len(toks) - len(words) + 1):
            longer = (i + len(words) < len(toks) and toks[i + len(words)].is_cap and toks[i + len(words)].is_word) \
                or (i > 0 and toks[i - 1].is_cap and toks[i - 1].is_word and toks[i - 1].low not in _FUNCTION)
            if tuple(t.text for t in toks[i : i + len(words)]) == words and not any(taken[i : i + len(words)]) \
                    and not longer:
                spans.append((i, i + len(words)))
                for k in range(i, i + len(words)):
                    taken[k] = True
    first = next((k for k, t in enumerate(toks) if t.is_word), 0)
    i = 0
    while i < len(toks):
        t = toks[i]
        if taken[i] or not (t.is_word and t.is_cap) or t.text in _MONTHS or t.text in _WEEKDAYS or t.text == "I":
            i += 1
            continue
        if i == first and t.low in _FUNCTION:
            i += 1
            continue
        j = i + 1
        while j < len(toks) and not taken[j]:
            u = toks[j]
            if u.is_word and u.is_cap and u.text not in _MONTHS:
                j += 1
            elif (u.low in _CONNECTORS or u.text in "'’") and j + 1 < len(toks) and toks[j + 1].is_cap \
                    and toks[j + 1].is_word and not taken[j + 1]:
                j += 1
            elif u.low == "of" and j + 2 < len(toks) and toks[j + 1].low == "the" and toks[j + 2].is_cap:
                j += 2
            else:
                break
        if i == first and j == i + 1 and t.text not in doc.known:
            i = j  # a sentence-initial capital that never appears mid-sentence: a common word
            continue
        spans.append((i, j))
        i = j
    return sorted(spans)


def read_document(text: str, title: str = "") -> Reading:
    """The document's subject (its title where the text contains it, else the name the text opens with),
    whether it is about a person, and the noun of its "X is a <noun>"."""
    toks = tokenize(text)
    words = {t.low for t in toks}
    known = set()
    for a, b in sentence_spans(text):
        inner = [t for t in toks if a <= t.start < b and t.is_word]
        known |= {t.text for t in inner[1:] if t.is_cap}
    subject = title.strip() if title and re.search(rf"(?<!\w){re.escape(title.strip())}(?!\w)", text) else None
    doc = Reading(text, subject, (), bool(words & _PERSON_WORDS), known)
    if subject:
        doc.subject_words = tuple(m.group() for m in _TOKEN.finditer(subject))
        doc.known |= set(doc.subject_words)
    spans = sentence_spans(text)
    if spans:
        a, b = spans[0]
        first = [t for t in toks if a <= t.start < b]
        names = _names(doc, first, [])
        if doc.subject is None and names and names[0][0] == 0:
            doc.subject = render(text, first, *names[0])
            doc.subject_words = tuple(t.text for t in first[names[0][0] : names[0][1]])
        # "S is/was a <noun> ...": "the <noun>" later refers to S
        k = names[0][1] if names and names[0][0] == 0 else -1
        if 0 < k < len(first) - 2 and first[k].low in BE and first[k + 1].low in ("a", "an"):
            j = k + 2
            while j < len(first) and first[j].is_word and first[j].is_cap:  # "a Finnish ... company"
                j += 1
            noun = noun_phrase(first, j, 5)
            doc.category = " ".join(t.low for t in first[j:noun])
    return doc


def noun_phrase(toks: list[Token], i: int, most: int = 3) -> int:
    """End of a short lower-case noun phrase starting at ``i`` (at most ``most`` words)."""
    def plain(k: int) -> bool:
        t = toks[k]
        return t.is_word and not t.is_cap and t.low not in _STOP and t.low not in PARTICIPLES

    j = i
    while j < len(toks) and j - i < most and plain(j):
        if toks[j].low.endswith(("ed", "ing")) and not (j + 1 < len(toks) and plain(j + 1)
                                                         and not toks[j + 1].low.endswith(("ed", "ing"))):
            break  # "publishing house", "revised edition": a modifier; "city founded in": the phrase ends
        j += 1
    return j


# ------------------------------------------------------------------------------------------------ candidates


def find_candidates(doc: Reading, toks: list[Token]) -> list[Candidate]:
    """Answer spans of a sentence (its tokens ``toks``), in order, without overlaps."""
    out: list[Candidate] = []
    dates: list[tuple[int, int]] = []
    if not toks:
        return out
    for m in _DATE.finditer(doc.text, toks[0].start, toks[-1].end):
        a = next(k for k, t in enumerate(toks) if t.end > m.start())
        b = next(k for k in range(len(toks) - 1, -1, -1) if toks[k].start < m.end()) + 1
        if toks[a].start == m.start() and toks[b - 1].end == m.end():
            dates.append((a, b))
            out.append(Candidate("date", a, b))
    in_date = {k for a, b in dates for k in range(a, b)}
    for a, b in _names(doc, toks, dates):
        if a > 0 and toks[a - 1].low == "the":  # "the Order of X": the article belongs to the name
            a -= 1
            if b < len(toks) and toks[b].is_word and not toks[b].is_cap and toks[b].low not in _STOP \
                    and not toks[b].low.endswith("ed") and (b + 1 == len(toks) or not toks[b + 1].is_word
                                                            or toks[b + 1].low in _STOP):
                b += 1  # "the Vostra hills"
        out.append(Candidate("name", a, b))
    out = _coordinated(toks, out)
    for k, t in enumerate(toks):
        if k in in_date or not _NUMBER.fullmatch(t.text) or (k > 0 and toks[k - 1].low in _NUMBER_WORDS):
            continue
        if k + 1 < len(toks) and toks[k + 1].low in _NUMBER_WORDS:  # "1.46 million"
            n = k + 2
            nxt = toks[n] if n < len(toks) else None
            noun = nxt is not None and nxt.is_word and not nxt.is_cap and nxt.low not in _STOP
            end = noun_phrase(toks, n) if noun else n
            out.append(Candidate("count" if end > n else "number", k, n,
                                  " ".join(u.low for u in toks[n:end]), end - n))
            continue
        nxt = toks[k + 1] if k + 1 < len(toks) else None
        noun = nxt is not None and nxt.is_word and not nxt.is_cap and nxt.low not in _STOP \
            and not nxt.low.endswith("ed")
        if nxt is not None and nxt.low in _UNITS:
            after = toks[k + 2] if k + 2 < len(toks) else None
            if after is not None and after.low in _MEASURE_ADJECTIVES:
                out.append(Candidate("measure", k, k + 2, after.low, 1))
            else:
                out.append(Candidate("count", k, k + 1, nxt.low, 1))
        elif re.fullmatch(r"1\d{3}|20\d{2}", t.text) and not noun:
            out.append(Candidate("year", k, k + 1))
        elif noun:
            end = noun_phrase(toks, k + 1)
            out.append(Candidate("count", k, k + 1, " ".join(u.low for u in toks[k + 1 : end]), end - k - 1))
        else:
            out.append(Candidate("number", k, k + 1))
    out.sort(key=lambda c: (c.start, -c.end))
    kept: list[Candidate] = []
    for c in out:
        if not kept or c.start >= kept[-1].end:
            kept.append(c)
    return kept


def _coordinated(toks: list[Token], names: list[Candidate]) -> list[Candidate]:
    """"Pierre Curie and Henri Becquerel", "Denmark, Iceland and Norway": one answer."""
    out: list[Candidate] = []
    group: list[Candidate] = []
    joined = False

    def close() -> None:
        after = group[-1].end if group else 0
        place = len(group) == 2 and (after >= len(toks) or not toks[after].is_word)  # "Houston, Texas,"
        if len(group) > 1 and (joined or place):
            out.append(Candidate("name", group[0].start, group[-1].end))
        else:
            out.extend(group)

    for c in sorted(names, key=lambda c: c.start):
        gap = [t.low for t in toks[group[-1].end : c.start]] if group else None
        if c.kind == "name" and group and gap in ([","], ["and"], ["or"], [",", "and"], [",", "or"]):
            group.append(c)
            joined = joined or gap[-1] in ("and", "or")
            continue
        close()
        group, joined = ([c], False) if c.kind == "name" else ([], False)
        if c.kind != "name":
            out.append(c)
    close()
    return sorted(out, key=lambda c: c.start)


# ------------------------------------------------------------------------------------------------ clauses


@dataclass
class Clause:
    """``subject verb-group rest``: the verb group is an auxiliary with participles, or one lexical verb."""

    subject: str  # resolved: "Wenda Naduth's elder brother"
    subject_span: tuple[int, int] | None  # the subject's tokens (None: inherited from an earlier clause)
    aux: str | None  # "was", "has", "did" ... (None: a lexical verb); "was" is supplied for "..., born in X"
    verb: list[int]  # tokens of the group besides aux and lexical verb: adverbs, participles, particles
    lexical: int | None  # the lexical verb's token
    rest: tuple[int, int]  # the tokens after the verb group
    tail: str = ""  # a leading adjunct, said at the end of the question ("in 1976")
    adjunct: tuple[int, int] | None = None  # its tokens


def verb_kind(tok: Token) -> str | None:
    w = tok.low
    if not tok.is_word:
        return None
    if w in BE or w in HAVE or w in _MODALS:
        return "aux"
    if tok.is_cap:
        return None
    if w in PAST:
        return "past"
    if w.endswith("s") and present_base(w) in _BASES:
        return "present"
    if w.endswith("ed") and len(w) > 4:
        return "ed"
    return None


def present_base(word: str) -> str:
    if word == "has":
        return "have"
    if word.endswith("ies") and word[:-3] + "y" in _BASES:
        return word[:-3] + "y"
    if word.endswith("es") and word[:-2] in _BASES:
        return word[:-2]
    return word[:-1]


def is_participle(tok: Token) -> bool:
    w = tok.low
    return tok.is_word and not tok.is_cap and (w in PARTICIPLES or (w.endswith("ed") and len(w) > 3))


def _verb_group(toks: list[Token], v: int, b: int) -> tuple[str | None, list[int], int | None, int]:
    """(aux, other verb tokens, lexical verb, first token after the group) of the verb at ``v``."""
    if verb_kind(toks[v]) == "aux":
        j, words = v + 1, []
        while j < b:
            t = toks[j]
            if t.low in ADVERBS or t.low in ("been", "being", "be") or is_participle(t):
                words.append(j)
            elif t.low == "and" and words and j + 1 < b and is_participle(toks[j + 1]):
                words.append(j)  # "was completed and published"
            elif t.low in PARTICLES and words and is_participle(toks[words[-1]]):
                words.append(j)  # "was set up"
            else:
                break
            j += 1
        while words and (toks[words[-1]].low in ADVERBS or toks[words[-1]].low == "and"):
            words.pop()  # "is also" + object: the adverb belongs to the rest
        return toks[v].text.lower(), words, None, v + 1 + len(words)
    words = [v + 1] if v + 1 < b and toks[v + 1].low in PARTICLES else []  # "passed away"
    return None, words, v, v + 1 + len(words)


def _find_verb(toks: list[Token], a: int, b: int) -> int | None:
    """The first verb in tokens ``(a, b)`` at most 8 tokens in (what comes before it is its subject)."""
    for k in range(a + 1, min(b, a + 9)):
        kind = verb_kind(toks[k])
        if kind == "ed" and toks[k - 1].low in _DETERMINERS:
            continue  # "A revised edition": an adjective
        if kind is not None:
            return k
    return None


def it_replacements(doc: Reading, toks: list[Token], a: int, b: int) -> dict[int, str]:
    """"it"/"its" of a document about a thing refer to that thing."""
    if doc.is_person or not doc.subject:
        return {}
    out = {}
    for k in range(a, b):
        if toks[k].low == "it":
            out[k] = doc.subject
        elif toks[k].low == "its":
            out[k] = doc.subject + "'s"
    return out


def _resolve_subject(doc: Reading, toks: list[Token], a: int, v: int, names: list[tuple[int, int]],
                     names_subject: bool) -> str | None:
    """The subject tokens ``[a, v)`` as words a closed-book question can use; None: an unresolved pronoun."""
    first = toks[a].low
    words = tuple(t.text for t in toks[a:v])
    if doc.subject and (words == doc.subject_words or (v - a == 1 and toks[a].text in doc.subject_words
                                                       and toks[a].is_cap and first not in _FUNCTION)):
        return doc.subject  # the title, or its surname
    if v - a == 1 and first in PRONOUNS:
        return None if first == "it" and doc.is_person else doc.subject
    replace = it_replacements(doc, toks, a, v)
    if first in POSSESSIVES and v - a > 1:  # "His elder brother" -> "X's elder brother"
        if doc.subject is None or (first == "its" and doc.is_person):
            return None
        return f"{doc.subject}'s " + render(doc.text, toks, a + 1, v, replace)
    if first == "the" and doc.subject and doc.category and v > a + 1:
        noun = " ".join(t.low for t in toks[a + 1 : v])
        if doc.category == noun or doc.category.endswith(" " + noun):
            return doc.subject  # "The publishing house" in a document about one
    text = render(doc.text, toks, a, v, replace)
    if any(x <= a < y for x, y in names) or first in _HONORIFICS:
        return text
    text = text[0].lower() + text[1:]
    head = noun_phrase(toks, a + 1)
    if first in ("the", "a", "an") and doc.subject and not names_subject and not replace and head > a + 1 \
            and all(not t.is_cap for t in toks[a + 1 : v]):
        # "a census taken in 1949" -> "a census of X taken in 1949"
        text = " ".join(p for p in (render(doc.text, toks, a, head).lower(), "of", doc.subject,
                                    render(doc.text, toks, head, v)) if p)
    return text


def _participles(toks: list[Token], a: int, b: int) -> list[int]:
    """The participles that start tokens ``[a, b)``: "born", "born and raised", "set up"."""
    def participle(t: Token) -> bool:
        return t.is_word and (t.low in PARTICIPLES or (t.low.endswith("ed") and len(t.low) > 3)) \
            and t.low not in PAST

    words, j = [], a
    while j < b and (participle(toks[j]) or (words and toks[j].low == "and" and j + 1 < b and participle(toks[j + 1]))
                     or (words and toks[j].low in PARTICLES)):
        words.append(j)
        j += 1
    return words


def _cut(toks: list[Token], a: int, b: int) -> int:
    """Where a relative clause ("who ...", "which ...") ends the rest ``[a, b)`` of a clause."""
    return next((k for k in range(a, b) if toks[k].low in _RELATIVES), b)


def find_clauses(doc: Reading, toks: list[Token], names: list[tuple[int, int]], protect: set[int]) -> list[Clause]:
    """The clauses of one sentence.

    Args:
        doc: the document's reading.
        toks: the sentence's tokens, parentheses removed.
        names: token ranges of its names (without a leading "the").
        protect: tokens (commas inside lists and dates) that do not split the sentence into segments.

    Returns:
        Its clauses in order; none where the sentence has no subject a closed-book question could use.
    """
    end = len(toks)
    while end and toks[end - 1].text in ".!?\"'”’":
        end -= 1
    segs, start = [], 0
    for k in range(end):
        if toks[k].text in ",;:" and k not in protect:
            if k > start:
                segs.append((start, k))
            start = k + 1
    if end > start:
        segs.append((start, end))
    if not segs:
        return []
    adjunct, leading = None, None  # "In 1976, ..." / "Born in Warsaw, she ..."
    a, b = segs[0]
    if toks[a].low in _LEADING_ADVERBS and b - a == 1 and len(segs) > 1:  # "Today, it employs ..."
        adjunct = segs.pop(0)
    elif toks[a].low in _LEADING_ADVERBS and _find_verb(toks, a + 1, b) is not None:  # "Today it employs ..."
        adjunct, segs[0] = (a, a + 1), (a + 1, b)
    elif (toks[a].low in PREPOSITIONS or toks[a].low == "according") and b - a <= 7 and len(segs) > 1 \
            and _find_verb(toks, a, b) is None:
        adjunct = segs.pop(0)
    elif _participles(toks, a, b) and len(segs) > 1:
        leading = segs.pop(0)
    a, b = segs[0]
    if adjunct is None and toks[a].low in PREPOSITIONS:  # "In 1891 she moved ...": the subject after the adjunct
        k = next((k for k in range(a + 2, min(b, a + 8)) if toks[k].low in PRONOUNS
                  or any(x == k for x, _ in names)), None)
        if k is None:
            return []
        adjunct, segs[0] = (a, k), (k, b)
    tail = ""
    if adjunct is not None:
        tail = render(doc.text, toks, *adjunct)
        tail = tail[0].lower() + tail[1:]
    names_subject = doc.subject is not None and any(
        tuple(t.text for t in toks[x:y]) == doc.subject_words for x, y in names)
    out: list[Clause] = []
    subject: str | None = None
    past = True

    def participle_clause(a: int, b: int) -> Clause:
        words = _participles(toks, a, b)
        rest = (a + len(words), _cut(toks, a + len(words), b))
        return Clause(subject, None, "was" if past else "is", words, None, rest, tail, adjunct)

    for n, (a, b) in enumerate(segs):
        span = None
        if n == 0:
            v = _find_verb(toks, a, b)
            if v is None:  # an appositive subject: "His elder brother, born in 1833, became a painter."
                if b - a > 8 or len(segs) == 1 or toks[a].low in PREPOSITIONS:
                    return out
                subject = _resolve_subject(doc, toks, a, b, names, names_subject)
                if subject is None:
                    return out
                continue
            s_end = v
            while s_end - 1 > a and toks[s_end - 1].low in ADVERBS:  # "The company later moved"
                s_end -= 1
            if _participles(toks, a, a + 1) or toks[a].low in ("and", "or", "but"):
                return out
            subject = _resolve_subject(doc, toks, a, s_end, names, names_subject)
            if subject is None:
                return out
            span, adverbs = (a, s_end), list(range(s_end, v))
        elif subject is None or toks[a].low in _SUBORDINATORS:
            continue
        elif _participles(toks, a, b):  # ", born in 1927" / ", based in X"
            out.append(participle_clause(a, b))
            continue
        else:  # ", became a painter" / ", and later worked as ..."
            v = a + (toks[a].low in ("and", "but"))
            s_end = v
            while v < b and toks[v].low in ADVERBS:
                v += 1
            if v >= b or verb_kind(toks[v]) is None:
                continue
            adverbs = list(range(s_end, v))
        aux, words, lexical, after = _verb_group(toks, v, b)
        if n == 0:
            past = aux in ("was", "were", "had", "did") or (lexical is not None and
                                                             verb_kind(toks[lexical]) in ("past", "ed"))
        clause = Clause(subject, span, aux, adverbs + words, lexical, (after, _cut(toks, after, b)), tail, adjunct)
        out.extend(_split_conjuncts(toks, clause))
    if leading is not None and subject is not None:
        out.append(participle_clause(*leading))
    return out


def _split_conjuncts(toks: list[Token], clause: Clause) -> list[Clause]:
    """"... was born in 1926 and later worked as a painter": two clauses with one subject."""
    a, b = clause.rest
    for k in range(a + 1, b):
        if toks[k].low != "and":
            continue
        v = k + 1
        while v < b and toks[v].low in ADVERBS:
            v += 1
        if v < b and verb_kind(toks[v]) is not None and not _NUMBER.fullmatch(toks[v].text):
            aux, words, lexical, after = _verb_group(toks, v, b)
            first = Clause(clause.subject, clause.subject_span, clause.aux, clause.verb, clause.lexical, (a, k),
                            clause.tail, clause.adjunct)
            second = Clause(clause.subject, None, aux, list(range(k + 1, v)) + words, lexical, (after, b),
                             clause.tail, clause.adjunct)
            return [first, *_split_conjuncts(toks, second)]
    return [clause]
