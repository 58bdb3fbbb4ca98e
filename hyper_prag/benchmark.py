"""A generated benchmark of fictional knowledge: facts no LLM can know, so every right answer is injected.

:func:`generate_benchmark` invents, per split, a small world of linked entities with names built from
syllables (unique across the whole benchmark and never a word of the templates):

- **place** (a city): country, population, founding year;
- **person**: birth year, birthplace (a place), occupation, optionally death year and an award;
- **organisation**: kind, founder (a person), founding year, headquarters (a place), staff;
- **work**: kind, author (a person of a matching occupation), publication year, publisher (a
  publishing house).

Each entity is one Wikipedia-style :class:`~hyper_prag.corpus.Document`: an intro sentence, then its
facts in shuffled order, each from one of several templates, plus one or two distractor facts (a
nearby date, another number, a related entity). Question types mirror the paper's sub-types
(Su et al. 2025, Table 1: PopQA, 2WQA compare/bridge/inference, HotpotQA):

- ``lookup``: one fact of one document ("In what year was X born?");
- ``compare``: two entities of a kind, answer one of the two names ("Who was born earlier, X or Y?");
- ``bridge``: composition across two documents ("In which city was the author of W born?");
- ``inference``: a derived relation ("Who founded the publisher of W?", "In which country was the
  author of W born?" over three documents) or a yes/no over four ("Were X and Y born in the same
  country?").

Every answer's first alias is stated literally in a supporting document (for yes/no, the facts
used are). Splits are on documents (default 70/10/20 train/val/test); each split has its own
entity graph, countries and awards, so no name of a test entity appears in a train or val
document and every question only cites documents of its own split.

``doc_qa`` holds, for every document, templated (question, answer) pairs for every fact it states
(distractors included), phrased from a pool disjoint from the evaluation questions': an LLM-free
augmentation source for per-document LoRAs and the hypernetwork.

    hyper-prag make-benchmark --seed 0 --docs 3000 --out DIR [--format jsonl|parquet]
    hyper-prag make-benchmark --seed 0 --docs 3000 --extra-train-docs 3000 --out DIR   # same val/test, 2x train
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hyper_prag.corpus import Corpus, Document, Question, load_corpus, save_corpus
from hyper_prag.errors import HyperPragError
from hyper_prag.paths import cache_dir

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the generated text changes; the cached default is then rebuilt
SPLITS: tuple[str, ...] = ("train", "val", "test")
QuestionType = Literal["lookup", "compare", "bridge", "inference"]
QUESTION_TYPES: tuple[str, ...] = ("lookup", "compare", "bridge", "inference")

# ---------------------------------------------------------------------------------------------- names

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr",
           "th", "vr", "sk", "gl", "ph", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "nd", "rk", "x", "m")
_FIRST_NAMES = {
    "f": ("Alys", "Brenna", "Carys", "Delphine", "Elowen", "Fenna", "Ilse", "Jorunn", "Liesel", "Maren",
          "Nadia", "Odile", "Petra", "Rosalind", "Sabine", "Talia", "Wenda", "Ysolde"),
    "m": ("Anselm", "Bastian", "Caspar", "Dorian", "Emrys", "Falk", "Gideon", "Hollis", "Ivo", "Jasper",
          "Lorcan", "Matthias", "Osric", "Piet", "Rainer", "Tobias", "Ulric", "Wendel"),
}


class _NameMaker:
    """Makes capitalised syllable words that are unique across the benchmark and not template words."""

    def __init__(self, rng: random.Random, reserved: set[str]) -> None:
        self.rng = rng
        self.used = {w.lower() for w in reserved}

    def word(self, min_len: int = 5, max_len: int = 10) -> str:
        for _ in range(10_000):
            n = self.rng.choice((2, 2, 3))
            # Codas only on the last syllable (and rarely inside) keep names pronounceable: "Traeskaen".
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS)
                        + (self.rng.choice(_CODAS) if i == n - 1 or self.rng.random() < 0.2 else "")
                        for i in range(n))
            if min_len <= len(w) <= max_len and w not in self.used:
                self.used.add(w)
                return w.capitalize()
        raise HyperPragError("ran out of fictional names; lower --docs")


# ---------------------------------------------------------------------------------------------- entities

_OCCUPATIONS = ("novelist", "poet", "playwright", "composer", "historian", "philosopher", "engineer",
                "architect", "botanist", "painter", "merchant", "physician", "astronomer", "cartographer")
_WORK_KINDS = {  # kind -> (occupation of its author, verb)
    "novel": ("novelist", "written"), "poetry collection": ("poet", "written"), "play": ("playwright", "written"),
    "symphony": ("composer", "composed"), "opera": ("composer", "composed"), "treatise": ("philosopher", "written"),
    "chronicle": ("historian", "written"),
}
_WORK_TITLES = ("The {w} Letters", "{w} Nights", "The Gardens of {w}", "A Winter in {w}", "The {w} Variations",
                "Songs for {w}", "The Last of the {w}", "{w} Rising", "The {w} Manuscript", "On {w}")
_ORG_KINDS = {  # kind -> name patterns
    "publishing house": ("{w} Press", "{w} Books", "{w} & Daughters"),
    "trading company": ("{w} Trading Company", "{w} Mercantile"),
    "research institute": ("{w} Institute", "{w} Laboratory"),
    "learned society": ("{w} Society", "Royal {w} Academy"),
    "shipyard": ("{w} Shipworks", "{w} Yards"),
    "orchestra": ("{w} Philharmonic", "{w} Chamber Orchestra"),
}
_AWARD_PATTERNS = ("{w} Prize", "{w} Medal", "Order of {w}", "{w} Laurel")


@dataclass(eq=False)
class _Place:
    id: str
    name: str
    country: str
    population: int
    founded: int


@dataclass(eq=False)
class _Person:
    id: str
    first: str
    surname: str
    gender: str  # "f" | "m"
    birth_year: int
    birthplace: _Place
    occupation: str
    death_year: int | None
    award: str | None
    award_year: int | None

    @property
    def name(self) -> str:
        return f"{self.first} {self.surname}"


@dataclass(eq=False)
class _Org:
    id: str
    name: str
    kind: str
    founder: _Person
    founded: int
    hq: _Place
    staff: int


@dataclass(eq=False)
class _Work:
    id: str
    name: str
    kind: str
    author: _Person
    year: int
    publisher: _Org


@dataclass
class _World:
    """The entities of one split."""

    places: list[_Place] = field(default_factory=list)
    persons: list[_Person] = field(default_factory=list)
    orgs: list[_Org] = field(default_factory=list)
    works: list[_Work] = field(default_factory=list)


def _year(y: int) -> tuple[str, ...]:
    return (str(y), f"in {y}")


def _number(n: int) -> tuple[str, ...]:
    return (f"{n:,}", str(n))


def _person_aliases(p: _Person) -> tuple[str, ...]:
    return (p.name, p.surname)


def _title_aliases(name: str) -> tuple[str, ...]:
    return (name, name[4:]) if name.startswith("The ") else (name,)


def _build_world(rng: random.Random, names: _NameMaker, n_docs: int, next_id: list[int]) -> _World:
    """Invents the linked entities of one split (``n_docs`` entities, one document each)."""
    n_places = max(3, round(0.15 * n_docs))
    n_orgs = max(2, round(0.20 * n_docs))
    n_works = max(2, round(0.25 * n_docs))
    n_persons = n_docs - n_places - n_orgs - n_works
    if n_persons < 2:
        raise HyperPragError(f"a split of {n_docs} documents is too small; use more --docs")

    def new_id(kind: str) -> str:
        next_id[0] += 1
        return f"fic-{kind}-{next_id[0]:05d}"

    countries = [names.word() for _ in range(max(3, n_places // 12))]
    awards = [rng.choice(_AWARD_PATTERNS).format(w=names.word()) for _ in range(max(2, n_docs // 60))]
    world = _World()
    for _ in range(n_places):
        world.places.append(_Place(new_id("place"), names.word(), rng.choice(countries),
                                   rng.randrange(2_000, 900_000), rng.randrange(1050, 1800)))
    for _ in range(n_persons):
        gender = rng.choice("fm")
        birth = rng.randrange(1800, 1960)
        death = birth + rng.randrange(35, 95) if rng.random() < 0.6 else None
        if death is not None and death > 2020:  # still alive
            death = None
        has_award = rng.random() < 0.4
        award_year = birth + rng.randrange(30, 60) if has_award else None
        if death is not None and award_year is not None and award_year >= death:
            award_year = death - 1
        world.persons.append(_Person(new_id("person"), rng.choice(_FIRST_NAMES[gender]), names.word(), gender, birth,
                                     rng.choice(world.places), rng.choice(_OCCUPATIONS), death,
                                     rng.choice(awards) if has_award else None, award_year))
    n_publishers = max(1, round(0.3 * n_orgs))
    other_kinds = [k for k in _ORG_KINDS if k != "publishing house"]
    for i in range(n_orgs):
        kind = "publishing house" if i < n_publishers else rng.choice(other_kinds)
        founder = rng.choice(world.persons)
        founded = founder.birth_year + rng.randrange(22, 50)
        if founder.death_year is not None and founded >= founder.death_year:
            founded = founder.death_year - 1
        world.orgs.append(_Org(new_id("org"), rng.choice(_ORG_KINDS[kind]).format(w=names.word()), kind, founder,
                               founded, rng.choice(world.places),
                               rng.randrange(12, 9_000)))
    publishers = world.orgs[:n_publishers]
    founders = {o.founder.id for o in world.orgs}
    for _ in range(n_works):
        kind = rng.choice(list(_WORK_KINDS))
        occupation = _WORK_KINDS[kind][0]
        authors = [p for p in world.persons if p.occupation == occupation]
        if not authors:  # give the occupation to someone who founded nothing (keeps every fact consistent)
            person = rng.choice([p for p in world.persons if p.id not in founders] or world.persons)
            person.occupation = occupation
            authors = [person]
        author = rng.choice(authors)
        year = author.birth_year + rng.randrange(20, 60)
        if author.death_year is not None and year >= author.death_year:
            year = author.death_year - 1
        world.works.append(_Work(new_id("work"), rng.choice(_WORK_TITLES).format(w=names.word()), kind, author,
                                 year, rng.choice(publishers)))
    return world


# ---------------------------------------------------------------------------------------------- documents

Fact = tuple[str, list[tuple[str, str]]]  # (sentence, doc_qa pairs it supports)


def _a(noun: str) -> str:
    """Indefinite article + noun: "an engineer", "a novelist"."""
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _pick(rng: random.Random, templates: tuple[str, ...], **kw: object) -> str:
    return rng.choice(templates).format(**kw)


def _person_doc(rng: random.Random, p: _Person, world: _World) -> tuple[str, list[Fact]]:
    he, his = ("she", "her") if p.gender == "f" else ("he", "his")
    ref = lambda: rng.choice((p.surname, he.capitalize()))  # noqa: E731 - tiny local helper
    intro = _pick(rng, ("{n} (born {b}) was {o}.", "{n} was {o}, born in the year {b}.",
                        "{n} ({b}) was {o} remembered in the annals of the period."),
                  n=p.name, b=p.birth_year, o=_a(p.occupation))
    facts: list[Fact] = [(intro, [(f"What is the birth year of {p.name}?", str(p.birth_year)),
                                  (f"What did {p.name} do for a living?", p.occupation)])]
    facts.append((_pick(rng, ("{r} was born in the city of {c}.", "{r} was born and raised in {c}.",
                              "{r} came into the world in {c}, where {his} parents kept a small house."),
                        r=ref(), c=p.birthplace.name, his=his),
                  [(f"What is the name of the city {p.name} was born in?", p.birthplace.name),
                   (f"{p.name} was born in which city?", p.birthplace.name)]))
    if p.death_year is not None:
        facts.append((_pick(rng, ("{r} died in {d}.", "{r} passed away in {d}.", "{r}'s death came in {d}."),
                            r=ref(), d=p.death_year),
                      [(f"What is the year of death of {p.name}?", str(p.death_year))]))
    if p.award is not None:
        facts.append((_pick(rng, ("In {y}, {r} was awarded the {a}.", "{r} received the {a} in {y}.",
                                  "The {a} was conferred on {r} in {y}."), r=p.surname, y=p.award_year, a=p.award),
                      [(f"What honour was {p.name} given?", f"the {p.award}"),
                       (f"{p.name} was given the {p.award} in which year?", str(p.award_year))]))
    # Distractors: a nearby date (an older sibling's birth) and a related place (a later move).
    sib = p.birth_year - rng.randrange(1, 4)
    facts.append((_pick(rng, ("{R} elder {s}, born in {y}, became {o}.", "{R} elder {s} was born in {y} and later worked as {o}."),
                        R=his.capitalize(), s=rng.choice(("brother", "sister")), y=sib, o=_a(rng.choice(_OCCUPATIONS))),
                  [(f"What is the birth year of {p.name}'s elder sibling?", str(sib))]))
    if rng.random() < 0.6:
        other = rng.choice(world.places)
        if other is not p.birthplace:
            move = p.birth_year + rng.randrange(2, 15)
            facts.append((f"In {move}, the family moved to {other.name}.",
                          [(f"Where did the family of {p.name} move in {move}?", other.name),
                           (f"In which year did the family of {p.name} move to {other.name}?", str(move))]))
    return p.name, facts


def _place_doc(rng: random.Random, c: _Place, world: _World) -> tuple[str, list[Fact]]:
    pop = f"{c.population:,}"
    intro = _pick(rng, ("{n} is a city in {k}.", "{n} is a city located in the country of {k}.",
                        "{n} is a market city of {k}."), n=c.name, k=c.country)
    facts: list[Fact] = [(intro, [(f"Which country is {c.name} part of?", c.country)])]
    facts.append((_pick(rng, ("It has a population of {p}.", "The city is home to {p} people.",
                              "According to the most recent census, {n} has {p} inhabitants."), p=pop, n=c.name),
                  [(f"What is the number of inhabitants of {c.name}?", pop)]))
    facts.append((_pick(rng, ("{n} was founded in {y}.", "The settlement was established in {y}.",
                              "Records date the founding of {n} to {y}."), n=c.name, y=c.founded),
                  [(f"In which year was the city of {c.name} established?", str(c.founded))]))
    old_year = rng.randrange(1850, 1950)
    old_pop = max(500, int(c.population * rng.uniform(0.3, 0.9)))
    facts.append((f"A census taken in {old_year} counted {old_pop:,} residents.",
                  [(f"How many residents did {c.name} have in {old_year}?", f"{old_pop:,}")]))
    if rng.random() < 0.5:
        built = c.founded + rng.randrange(5, 120)
        sentence, what = rng.choice((("The old stone bridge was completed in {y}.", "the old stone bridge"),
                                     ("The town hall was built in {y}.", "the town hall")))
        facts.append((sentence.format(y=built), [(f"What was built in {c.name} in {built}?", what)]))
    return c.name, facts


def _org_doc(rng: random.Random, o: _Org, world: _World) -> tuple[str, list[Fact]]:
    intro = _pick(rng, ("{n} is {k} based in {h}.", "{n} is {k} with its headquarters in {h}.",
                        "{n} is {k} headquartered in {h}."), n=o.name, k=_a(o.kind), h=o.hq.name)
    facts: list[Fact] = [(intro, [(f"What kind of organisation is {o.name}?", o.kind),
                                  (f"Which city hosts the headquarters of {o.name}?", o.hq.name)])]
    facts.append((_pick(rng, ("It was founded by {f} in {y}.", "{f} established the {k} in {y}.",
                              "The {k} was set up in {y} by {f}."), f=o.founder.name, y=o.founded, k=o.kind),
                  [(f"Who is the founder of {o.name}?", o.founder.name),
                   (f"What is the founding year of {o.name}?", str(o.founded))]))
    facts.append((_pick(rng, ("Today it employs {s} people.", "Its staff numbers {s}.",
                              "{n} has {s} employees."), s=f"{o.staff:,}", n=o.name),
                  [(f"What is the size of the staff of {o.name}?", f"{o.staff:,}")]))
    pre = o.founded - rng.randrange(1, 6)
    sentence, what = rng.choice((("A predecessor association had been formed in {y}.", "a predecessor association had been formed"),
                                 ("Plans for it were first drawn up in {y}.", "plans for it were first drawn up")))
    facts.append((sentence.format(y=pre), [(f"What happened in {pre} in the early history of {o.name}?", what)]))
    return o.name, facts


def _work_doc(rng: random.Random, w: _Work, world: _World) -> tuple[str, list[Fact]]:
    verb = _WORK_KINDS[w.kind][1]
    intro = _pick(rng, ("{t} is {k} by {a}.", "{t} is {k} {v} by {a}.", "{t} is {k} by the {o} {a}."),
                  t=w.name, k=_a(w.kind), a=w.author.name, v=verb, o=w.author.occupation)
    facts: list[Fact] = [(intro, [(f"Who is the creator of {w.name}?", w.author.name),
                                  (f"What type of work is {w.name}?", w.kind)])]
    facts.append((_pick(rng, ("It was first published in {y}.", "The {k} appeared in {y}.",
                              "It was completed and published in {y}."), y=w.year, k=w.kind),
                  [(f"What is the year of first publication of {w.name}?", str(w.year))]))
    facts.append((_pick(rng, ("It was published by {p}.", "The first edition was issued by {p}.",
                              "{p} brought it out."), p=w.publisher.name),
                  [(f"Which house issued {w.name}?", w.publisher.name)]))
    rev = w.year + rng.randrange(2, 20)
    facts.append((_pick(rng, ("A revised edition followed in {y}.", "A second edition appeared in {y}."), y=rev),
                  [(f"When did a later edition of {w.name} come out?", str(rev))]))
    if rng.random() < 0.5:
        other = rng.choice(world.places)
        facts.append((f"Part of it is set in {other.name}.", [(f"Which city is part of {w.name} set in?", other.name)]))
    return w.name, facts


def _render(rng: random.Random, facts: list[Fact]) -> tuple[str, list[tuple[str, str]]]:
    """Intro first, the other facts shuffled; returns the text and its doc_qa pairs."""
    body = facts[1:]
    rng.shuffle(body)
    ordered = [facts[0], *body]
    text = " ".join(sentence for sentence, _ in ordered)
    return text, [qa for _, pairs in ordered for qa in pairs]


# ---------------------------------------------------------------------------------------------- questions

@dataclass
class _Q:
    question: str
    answers: tuple[str, ...]
    type: str
    doc_ids: tuple[str, ...]


def _lookups(rng: random.Random, world: _World) -> list[_Q]:
    """One question per document, about one of its main facts (never a distractor)."""
    out: list[_Q] = []
    for p in world.persons:
        opts = [(f"In what year was {p.name} born?", _year(p.birth_year)),
                (f"In which city was {p.name} born?", (p.birthplace.name,)),
                (f"What was {p.name}'s occupation?", (p.occupation, _a(p.occupation)))]
        if p.death_year is not None:
            opts.append((f"When did {p.name} die?", _year(p.death_year)))
        if p.award is not None:
            opts.append((f"Which award did {p.name} receive?", (p.award, f"the {p.award}")))
        q, a = rng.choice(opts)
        out.append(_Q(q, a, "lookup", (p.id,)))
    for c in world.places:
        q, a = rng.choice([(f"In which country is {c.name}?", (c.country,)),
                           (f"What is the population of {c.name}?", _number(c.population)),
                           (f"When was {c.name} founded?", _year(c.founded))])
        out.append(_Q(q, a, "lookup", (c.id,)))
    for o in world.orgs:
        q, a = rng.choice([(f"Who founded {o.name}?", _person_aliases(o.founder)),
                           (f"In what year was {o.name} founded?", _year(o.founded)),
                           (f"Where is {o.name} headquartered?", (o.hq.name,)),
                           (f"How many people does {o.name} employ?", _number(o.staff))])
        out.append(_Q(q, a, "lookup", (o.id,)))
    for w in world.works:
        q, a = rng.choice([(f"Who wrote {w.name}?" if _WORK_KINDS[w.kind][1] == "written" else f"Who composed {w.name}?",
                            _person_aliases(w.author)),
                           (f"When was {w.name} published?", _year(w.year)),
                           (f"Who published {w.name}?", (w.publisher.name,))])
        out.append(_Q(q, a, "lookup", (w.id,)))
    return out


def _compare(rng: random.Random, world: _World, n: int) -> list[_Q]:
    """Two entities of one kind whose compared values differ; the answer is one of the two names."""
    kinds = [k for k, pool in (("person", world.persons), ("place", world.places), ("org", world.orgs),
                               ("work", world.works)) if len(pool) >= 2]
    out: list[_Q] = []
    seen: set[tuple[str, str]] = set()
    for _ in range(50 * n):
        if len(out) >= n:
            break
        kind = rng.choice(kinds)
        if kind == "person":
            x, y = rng.sample(world.persons, 2)
            vx, vy = x.birth_year, y.birth_year
            earlier = rng.random() < 0.5
            q = f"Who was born {'earlier' if earlier else 'later'}, {x.name} or {y.name}?"
            pick = (x if (vx < vy) == earlier else y)
            answers = _person_aliases(pick)
        elif kind == "place":
            x, y = rng.sample(world.places, 2)
            vx, vy = x.population, y.population
            q = f"Which city has the larger population, {x.name} or {y.name}?"
            pick = x if vx > vy else y
            answers = (pick.name,)
        elif kind == "org":
            x, y = rng.sample(world.orgs, 2)
            vx, vy = x.founded, y.founded
            q = f"Which organisation was founded first, {x.name} or {y.name}?"
            pick = x if vx < vy else y
            answers = (pick.name,)
        else:
            x, y = rng.sample(world.works, 2)
            vx, vy = x.year, y.year
            q = f"Which was published earlier, {x.name} or {y.name}?"
            pick = x if vx < vy else y
            answers = _title_aliases(pick.name)
        key = tuple(sorted((x.id, y.id)))
        if vx == vy or key in seen:
            continue
        seen.add(key)
        out.append(_Q(q, answers, "compare", (x.id, y.id)))
    return out


def _bridge(rng: random.Random, world: _World, n: int) -> list[_Q]:
    """A fact of an entity reached through another document; the six forms are equally likely."""
    def author_city() -> _Q:
        w = rng.choice(world.works)
        return _Q(f"In which city was the author of {w.name} born?", (w.author.birthplace.name,), "bridge",
                  (w.id, w.author.id))

    def author_year() -> _Q:
        w = rng.choice(world.works)
        return _Q(f"In what year was the creator of {w.name} born?", _year(w.author.birth_year), "bridge",
                  (w.id, w.author.id))

    def publisher_city() -> _Q:
        w = rng.choice(world.works)
        return _Q(f"In which city is the publisher of {w.name} based?", (w.publisher.hq.name,), "bridge",
                  (w.id, w.publisher.id))

    def founder_year() -> _Q:
        o = rng.choice(world.orgs)
        return _Q(f"In what year was the founder of {o.name} born?", _year(o.founder.birth_year), "bridge",
                  (o.id, o.founder.id))

    def hq_country() -> _Q:
        o = rng.choice(world.orgs)
        return _Q(f"In which country is {o.name} headquartered?", (o.hq.country,), "bridge", (o.id, o.hq.id))

    def birthplace_population() -> _Q:
        p = rng.choice(world.persons)
        return _Q(f"What is the population of the city where {p.name} was born?", _number(p.birthplace.population),
                  "bridge", (p.id, p.birthplace.id))

    forms = (author_city, author_year, publisher_city, founder_year, hq_country, birthplace_population)
    return _unique(lambda: rng.choice(forms)(), n)


def _inference(rng: random.Random, world: _World, n: int) -> list[_Q]:
    """Derived relations: founder of a work's publisher, country of an author's birth, same-country yes/no."""
    def one() -> _Q:
        r = rng.random()
        if world.works and r < 0.33:
            w = rng.choice(world.works)
            return _Q(f"Who founded the organisation that published {w.name}?", _person_aliases(w.publisher.founder),
                      "inference", (w.id, w.publisher.id))
        if world.works and r < 0.66:
            w = rng.choice(world.works)
            a = w.author
            return _Q(f"In which country was the author of {w.name} born?", (a.birthplace.country,), "inference",
                      (w.id, a.id, a.birthplace.id))
        same = rng.random() < 0.5
        x = rng.choice(world.persons)
        pool = [p for p in world.persons if p is not x and (p.birthplace.country == x.birthplace.country) == same]
        if not pool:
            pool = [p for p in world.persons if p is not x]
        y = rng.choice(pool)
        answer = "yes" if x.birthplace.country == y.birthplace.country else "no"
        docs = tuple(dict.fromkeys((x.id, y.id, x.birthplace.id, y.birthplace.id)))
        return _Q(f"Were {x.name} and {y.name} born in the same country?", (answer,), "inference", docs)
    return _unique(one, n)


def _unique(make: Callable[[], _Q], n: int) -> list[_Q]:
    """Calls ``make`` until ``n`` distinct questions (or gives up after 50·n tries)."""
    out: list[_Q] = []
    seen: set[str] = set()
    for _ in range(50 * n):
        if len(out) >= n:
            break
        q = make()
        if q.question not in seen:
            seen.add(q.question)
            out.append(q)
    return out


# ---------------------------------------------------------------------------------------------- generator

def _template_words() -> set[str]:
    """Every word the templates or fixed vocabularies use, so no invented name equals one of them."""
    import inspect
    import sys

    source = inspect.getsource(sys.modules[__name__])
    return set(re.findall(r"[A-Za-z]+", source))


def generate_benchmark(seed: int = 0, n_docs: int = 3000, split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                       questions_per_doc: float = 0.6, extra_train_docs: int = 0) -> Corpus:
    """Generates the fictional benchmark deterministically from ``seed``.

    Args:
        seed: everything (names, facts, templates, questions) follows from it.
        n_docs: documents in all splits together (one entity each).
        split_fractions: (train, val, test) share of the documents.
        questions_per_doc: questions of each type per document of a split (default 0.6: a
            600-document test split gets 360 questions per type).
        extra_train_docs: documents of one more world added to the train split after the three splits are
            made, so train, val and test stay exactly those of ``extra_train_docs=0`` (names stay unique
            across all of them): more training data for the hypernetwork, evaluated on the same questions.
    Returns:
        The corpus named ``fictional-s{seed}-n{n_docs}-v{GENERATOR_VERSION}`` with doc_qa for every document
        (``fictional-s{seed}-n{n_docs}+{extra_train_docs}-v…`` with extra training documents).
    """
    if n_docs < 60:
        raise HyperPragError(f"--docs {n_docs} is too small; use at least 60")
    if extra_train_docs and extra_train_docs < 20:
        raise HyperPragError(f"--extra-train-docs {extra_train_docs} is too small; use 0 or at least 20")
    if len(split_fractions) != 3 or any(f <= 0 for f in split_fractions):
        raise HyperPragError(f"split_fractions {split_fractions} must be three positive shares (train, val, test)")
    rng = random.Random(seed)
    names = _NameMaker(rng, _template_words() | {n for pool in _FIRST_NAMES.values() for n in pool})
    total = sum(split_fractions)
    n_test = round(n_docs * split_fractions[2] / total)
    n_val = round(n_docs * split_fractions[1] / total)
    sizes = {"train": n_docs - n_val - n_test, "val": n_val, "test": n_test}
    next_id = [0]
    documents: list[Document] = []
    questions: list[Question] = []
    doc_qa: dict[str, tuple[tuple[str, str], ...]] = {}
    worlds = [(split, sizes[split], split) for split in SPLITS]
    if extra_train_docs:
        worlds.append(("train", extra_train_docs, "train-x"))
    for split, size, tag in worlds:
        world = _build_world(rng, names, size, next_id)
        for entity, render in ([(p, _person_doc) for p in world.persons] + [(c, _place_doc) for c in world.places]
                               + [(o, _org_doc) for o in world.orgs] + [(w, _work_doc) for w in world.works]):
            title, facts = render(rng, entity, world)
            text, pairs = _render(rng, facts)
            documents.append(Document(id=entity.id, title=title, text=text, split=split))
            doc_qa[entity.id] = tuple(pairs)
        n_q = math.ceil(questions_per_doc * size)
        lookups = _lookups(rng, world)
        rng.shuffle(lookups)
        per_type = {"lookup": lookups[:n_q], "compare": _compare(rng, world, n_q),
                    "bridge": _bridge(rng, world, n_q), "inference": _inference(rng, world, n_q)}
        for qtype in QUESTION_TYPES:
            for i, q in enumerate(per_type[qtype]):
                questions.append(Question(id=f"fic-{tag}-{qtype}-{i:05d}", question=q.question, answers=q.answers,
                                          type=q.type, doc_ids=q.doc_ids, split=split))
    extra = f"+{extra_train_docs}" if extra_train_docs else ""
    return Corpus(name=f"fictional-s{seed}-n{n_docs}{extra}-v{GENERATOR_VERSION}", documents=tuple(documents),
                  questions=tuple(questions), doc_qa=doc_qa)


def counts(corpus: Corpus) -> dict[str, dict[str, int]]:
    """Returns {split: {"documents": n, "doc_qa": n, <question type>: n, ...}} for logging and reports."""
    out: dict[str, dict[str, int]] = {}
    docs = Counter(d.split for d in corpus.documents)
    qa = Counter()
    for d in corpus.documents:
        qa[d.split] += len(corpus.doc_qa.get(d.id, ()))
    qs = Counter((q.split, q.type) for q in corpus.questions)
    for split in sorted(docs):
        out[split] = {"documents": docs[split], "doc_qa": qa[split],
                      **{t: n for (s, t), n in sorted(qs.items()) if s == split}}
    return out


def default_benchmark_path() -> Path:
    """Returns where the default benchmark (seed 0, 3000 documents) lives: ``cache_dir("data") / "fictional"``."""
    return cache_dir("data") / "fictional"


def load_or_make_default() -> Corpus:
    """Loads the default benchmark from the cache, generating it first if missing or made by another generator version."""
    path = default_benchmark_path()
    expected = f"fictional-s0-n3000-v{GENERATOR_VERSION}"
    if (path / "corpus.json").is_file():
        corpus = load_corpus(path)
        if corpus.name == expected:
            return corpus
        logger.info("cached benchmark %s is %r, not %r: regenerating", path, corpus.name, expected)
    corpus = generate_benchmark(seed=0, n_docs=3000)
    save_corpus(corpus, path)
    return corpus


def make_benchmark(seed: int = 0, n_docs: int = 3000, out: str | Path | None = None,
                   format: Literal["jsonl", "parquet"] = "jsonl", extra_train_docs: int = 0) -> Path:
    """Generates the benchmark and saves it as a corpus folder (``hyper-prag make-benchmark``).

    Args:
        seed: random seed; the same seed gives the same benchmark.
        n_docs: documents over all splits.
        out: corpus folder to write (default: :func:`default_benchmark_path`).
        format: file format of the folder.
        extra_train_docs: training documents added beside the three splits (see :func:`generate_benchmark`).

    Returns:
        The folder written.
    """
    start = time.perf_counter()
    corpus = generate_benchmark(seed=seed, n_docs=n_docs, extra_train_docs=extra_train_docs)
    folder = save_corpus(corpus, out if out is not None else default_benchmark_path(), format=format)
    logger.info("wrote %s (%s) in %.1f s", folder, corpus.name, time.perf_counter() - start)
    for split, row in counts(corpus).items():
        logger.info("%s: %s", split, ", ".join(f"{k}={v}" for k, v in row.items()))
    return folder
