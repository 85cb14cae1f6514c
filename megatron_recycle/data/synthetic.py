"""Synthetic multi-hop questions over the packaged Wikipedia corpus and countryinfo facts.

Templates (METHOD.md section 5: the paper trains on synthetic data):
- person_nationality_capital: person -> nationality (demonym) -> capital of that country
- work_creator_birth_year:    work -> creator -> creator's birth year
- capital_country_continent:  capital -> its country -> the country's continent
- born_first:                 which of two people was born first (comparison)
- single_hop:                 one fact from one passage (capital, birth year or creator)

Every hop's passage is in the corpus and the answer is checked to appear in the passage that
proves it (for bridge chains, the last hop). Questions are deduplicated and split into
train/dev/test by held-out entities: the key ("bridge") entities of a question all belong to
one split, so no bridge entity is shared between splits. Output is FlashRAG jsonl plus oracle
SFT trajectories in the tag protocol whose searches really retrieve the needed passages.
Deterministic by seed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_recycle.agent.protocol import format_information
from megatron_recycle.agent.reward import normalize_answer
from megatron_recycle.agent.types import Passage, Retriever
from megatron_recycle.data.corpus import WikiArticle, load_wiki_articles

TEMPLATES: tuple[str, ...] = (
    "person_nationality_capital",
    "work_creator_birth_year",
    "capital_country_continent",
    "born_first",
    "single_hop",
)
SPLITS: tuple[str, ...] = ("train", "dev", "test")

# Constituent countries of the United Kingdom that countryinfo lacks or lists without a capital;
# "English" and "Welsh" are frequent nationalities in Wikipedia descriptions.
COUNTRY_SUPPLEMENT: tuple[dict, ...] = (
    {
        "name": "England",
        "capital": "London",
        "demonym": "English",
        "region": "Europe",
        "population": 57_000_000,
    },
    {"name": "Wales", "capital": "Cardiff", "demonym": "Welsh", "region": "Europe", "population": 3_100_000},
)

# kind of work (last word before "by" in the description) -> role of its creator
WORK_ROLES: dict[str, str] = {
    "novel": "author",
    "novella": "author",
    "book": "author",
    "poem": "author",
    "epic": "author",
    "treatise": "author",
    "essay": "author",
    "play": "author",
    "tragedy": "author",
    "comedy": "author",
    "story": "author",
    "film": "director",
    "painting": "painter",
    "fresco": "painter",
    "sculpture": "sculptor",
    "statue": "sculptor",
    "opera": "composer",
    "symphony": "composer",
    "ballet": "composer",
    "oratorio": "composer",
    "concerto": "composer",
}

_LIFESPAN = re.compile(r"\((\d{3,4})\s*[–-]\s*(\d{3,4})\)$")
_BORN = re.compile(r"\(born (\d{3,4})\)$")
_PAREN_SUFFIX = re.compile(r"\s*\([^)]*\)$")
_YEAR_SPAN = re.compile(r"\d{2,4}\s*[–-]\s*\d{2,4}|\bborn \d{3,4}")
# Articles whose description ends in a year span but that are no person: the span is not a life
# ("English rock band (1968–1980)", "Imperial dynasty of China (1368–1644)"). The description's
# head noun (before "of", "in", ...) says so.
_NOT_A_PERSON = frozenset(
    "band group duo trio quartet team orchestra ensemble dynasty empire kingdom caliphate sultanate "
    "principality monarchy republic state union confederation league alliance coalition colony "
    "territory house family company conglomerate club party movement order organization organisation "
    "institution agency government regime war wars conflict conflicts battle revolution rebellion "
    "crisis depression period era civilization continuation emergence expansion dispute association "
    "series show programme program magazine newspaper".split()
)
_HEAD_CUT = re.compile(r"\s+(?:of|in|from|between|among|against|around|for|controlled)\s+")
# A passage that names more than one capital (an administrative, a former, a proclaimed one, a
# seat of government): the country's capital question has no single answer there.
_OTHER_CAPITAL = re.compile(
    r"\b(?:administrative|legislative|executive|judicial|constitutional|proclaimed|de facto|former)"
    r"(?:\s+and\s+\w+)?\s+capital\b|\bseat of government\b",
    re.IGNORECASE,
)
# Continents a country can straddle (its passage naming both: Russia, Turkey, Egypt, Georgia).
_STRADDLED = (("Europe", "Asia"), ("Africa", "Asia"), ("North America", "South America"))
# A nationality followed by another ("Austrian and American filmmaker"): no single country.
_SECOND_NATIONALITY = re.compile(r"^\s*(?:and|&|/)\s*[A-Z]")


@dataclass(frozen=True)
class Country:
    """A country with a corpus passage that names its capital."""

    title: str  # corpus title
    name: str  # name used in questions (the corpus title)
    capitals: tuple[str, ...]  # golden answers, the one found in the passage first
    demonym: str
    continent: str | None
    population: int
    source_name: str  # the countryinfo name


@dataclass(frozen=True)
class Person:
    """A person whose description gives an exact birth year, and a nationality when it starts with one."""

    title: str
    name: str
    birth_year: int
    demonym: str | None


@dataclass(frozen=True)
class Work:
    """A work whose description names its creator ("Painting by Georges Seurat")."""

    title: str
    name: str
    kind: str
    creator: str  # Person title


@dataclass
class Hop:
    """One search the chain needs: the passage it must reach and the queries to try, best first."""

    title: str
    queries: list[str]
    chosen: str | None = None  # the first query that retrieves the passage in the top-k


@dataclass
class Candidate:
    """One generated question with its hops, answers, held-out keys and oracle reasoning."""

    template: str
    question: str
    answers: list[str]
    hops: list[Hop]
    keys: tuple[str, ...]  # held-out (bridge) entities: all in one split
    thinks: list[str]  # one per hop, then one before the answer
    relation: str | None = None
    retrievable: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return "syn-" + hashlib.sha1(self.question.encode("utf-8")).hexdigest()[:12]


@functools.lru_cache(maxsize=65536)
def _words(text: str) -> str:
    """Lower-case words without punctuation or articles ("(1879–1955)" -> "1879 1955")."""
    text = re.sub(r"[^\w\s]|_", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def _contains(passage_text: str, phrase: str) -> bool:
    """Whether the phrase occurs in the passage as whole words, ignoring case and punctuation."""
    needle = _words(phrase)
    return bool(needle) and f" {needle} " in f" {_words(passage_text)} "


def _display(title: str) -> str:
    return _PAREN_SUFFIX.sub("", title).strip()


def _stable_pick(options: Sequence[str], key: str) -> str:
    """Pick a phrasing by a hash of the entity, so the choice is independent of iteration order."""
    return options[int(hashlib.sha1(key.encode()).hexdigest(), 16) % len(options)]


class Facts:
    """Countries, people and works extracted from the corpus articles and countryinfo."""

    def __init__(self, articles: Sequence[WikiArticle]) -> None:
        self.articles = {a.title: a for a in articles}
        self._by_words: dict[str, list[str]] = defaultdict(list)
        for title in self.articles:
            self._by_words[_words(title)].append(title)
        self.countries = self._countries()
        self.by_demonym = self._demonyms()
        self.people = self._people()
        self.works = self._works()

    def text(self, title: str) -> str:
        return self.articles[title].contents

    def _resolve_title(self, info: dict) -> str | None:
        names = [info.get("name") or ""]
        names += [a for a in info.get("altSpellings") or [] if isinstance(a, str) and len(a) > 3]
        names += [f"{info.get('name')} (country)"]
        return next((n for n in names if n in self.articles), None)

    def _countries(self) -> list[Country]:
        try:
            import countryinfo
        except ImportError:
            raise ImportError(
                "the synthetic generator needs countryinfo; install it with `pip install countryinfo==1.0.1`"
            ) from None
        infos = [c.info() for c in countryinfo.all_countries()] + [dict(d) for d in COUNTRY_SUPPLEMENT]
        # demonym -> the most populous country of all countryinfo records (in the corpus or not)
        self._demonym_owner: dict[str, str] = {}
        for info in sorted(infos, key=lambda i: (-(i.get("population") or 0), i.get("name") or "")):
            if info.get("demonym"):
                self._demonym_owner.setdefault(info["demonym"], info.get("name") or "")
        best: dict[str, dict] = {}
        for info in infos:
            title = self._resolve_title(info)
            if title is None or not info.get("capital") or not info.get("demonym"):
                continue
            # duplicated records (Burma/Myanmar) resolve to one article: keep the most populous
            if title not in best or (info.get("population") or 0) > (best[title].get("population") or 0):
                best[title] = info
        countries = []
        for title, info in sorted(best.items()):
            text = self.text(title)
            variants = [info["capital"]]
            if "," in info["capital"] or "." in info["capital"]:
                variants.append(info["capital"].replace(".", "").replace(",", ""))
            titled = list(self._by_words.get(_words(info["capital"]), []))
            variants = list(dict.fromkeys(titled + variants))
            found = [v for v in variants if _contains(text, v)]
            if not found:
                continue  # the country's passage does not name its capital: no checkable answer
            if _OTHER_CAPITAL.search(text):
                continue  # several capitals named (Bolivia, Malaysia, Sri Lanka, ...): no single answer
            capitals = tuple(dict.fromkeys(found + variants))
            countries.append(
                Country(
                    title=title,
                    name=title,
                    capitals=capitals,
                    demonym=info["demonym"],
                    continent=self._continent(info, text),
                    population=int(info.get("population") or 0),
                    source_name=info.get("name") or "",
                )
            )
        return countries

    @staticmethod
    def _continent(info: dict, text: str) -> str | None:
        region, sub = info.get("region") or "", info.get("subregion") or ""
        if region in ("Europe", "Asia", "Africa", "Oceania"):
            cont = region
        elif region == "Americas" and sub == "Northern America":
            cont = "North America"
        elif region == "Americas":
            named = [c for c in ("South America", "North America") if _contains(text, c)]
            cont = named[0] if len(named) == 1 else None
        else:
            cont = None
        if not cont or not _contains(text, cont):
            return None
        for pair in _STRADDLED:  # a country on two continents has no single answer
            if cont in pair and all(_contains(text, c) for c in pair):
                return None
        return cont

    def _demonyms(self) -> dict[str, Country]:
        """Demonym -> the most populous country using it; dropped when that one has no usable passage."""
        by_name = {c.source_name: c for c in self.countries}
        out = {}
        for demonym, owner in self._demonym_owner.items():
            if owner in by_name and by_name[owner].demonym == demonym:
                out[demonym] = by_name[owner]
        return out

    def _people(self) -> dict[str, Person]:
        """People with a birth year: an article (of the People topic, or uncategorized) whose
        description ends in its one life span, "(1835–1910)" or "(born 1947)". Not a person: a
        description with several spans (reigns, offices), a head noun like band, dynasty or war,
        or a span the extract repeats as one of activity ("was the Ottoman sultan from 1520 to
        1566"). The nationality is the demonym the description starts with, unless a second one
        follows ("Austrian and American filmmaker")."""
        demonyms = sorted(self.by_demonym, key=len, reverse=True)
        people = {}
        for a in self.articles.values():
            m = _LIFESPAN.search(a.description) or _BORN.search(a.description)
            if not m or a.title[:1].isdigit() or a.topic not in ("People", "Uncategorized", ""):
                continue
            if len(_YEAR_SPAN.findall(a.description)) != 1:
                continue
            head = re.findall(r"[A-Za-z-]+", _HEAD_CUT.split(_PAREN_SUFFIX.sub("", a.description), maxsplit=1)[0])
            if head and head[-1].lower() in _NOT_A_PERSON:
                continue
            if m.re is _LIFESPAN and all(re.search(rf"\b{y}\b", a.extract) for y in m.groups()):
                continue
            year = int(m.group(1))
            demonym = next((d for d in demonyms if a.description.startswith(d + " ")), None)
            if demonym and _SECOND_NATIONALITY.match(a.description[len(demonym):]):
                demonym = None
            people[a.title] = Person(a.title, _display(a.title), year, demonym)
        return people

    def _works(self) -> list[Work]:
        by_name = {p.name: p for p in self.people.values()}
        works = []
        for a in self.articles.values():
            if " by " not in a.description:
                continue
            left, creator = a.description.split(" by ", 1)
            kind = left.split()[-1].lower() if left.split() else ""
            person = self.people.get(creator.strip()) or by_name.get(creator.strip())
            if kind not in WORK_ROLES or person is None or person.title == a.title:
                continue
            if not _contains(a.contents, person.name):
                continue
            works.append(Work(a.title, _display(a.title), kind, person.title))
        return sorted(works, key=lambda w: w.title)


# ------------------------------------------------------------------------------ templates


def _person_chain(facts: Facts) -> list[Candidate]:
    out = []
    for p in sorted(facts.people.values(), key=lambda p: p.title):
        country = facts.by_demonym.get(p.demonym) if p.demonym else None
        if country is None or country.title == p.title:
            continue
        capital = country.capitals[0]
        question = _stable_pick(
            [
                f"What is the capital of the country {p.name} was from?",
                f"What is the capital city of {p.name}'s home country?",
            ],
            p.title,
        )
        out.append(
            Candidate(
                "person_nationality_capital",
                question,
                list(country.capitals),
                [
                    Hop(p.title, [p.name, f"{p.name} nationality"]),
                    Hop(
                        country.title,
                        [f"{country.name} country capital", f"{country.name} capital", country.name],
                    ),
                ],
                keys=(country.title,),
                thinks=[
                    f"To find the capital of {p.name}'s home country, I first need {p.name}'s nationality.",
                    f"{p.name} was {p.demonym}, so the country is {country.name}. "
                    f"Now I need the capital of {country.name}.",
                    f"The capital of {country.name} is {capital}.",
                ],
            )
        )
    return out


def _work_chain(facts: Facts) -> list[Candidate]:
    out = []
    for w in facts.works:
        p = facts.people[w.creator]
        role = WORK_ROLES[w.kind]
        out.append(
            Candidate(
                "work_creator_birth_year",
                f'In what year was the {role} of the {w.kind} "{w.name}" born?',
                [str(p.birth_year)],
                [Hop(w.title, [w.name, f"{w.name} {w.kind}"]), Hop(p.title, [p.name, f"{p.name} born"])],
                keys=(p.title,),
                thinks=[
                    f"I need the {role} of {w.name} first, then that person's birth year.",
                    f"{w.name} is a {w.kind} by {p.name}. Now I need the year {p.name} was born.",
                    f"{p.name} was born in {p.birth_year}.",
                ],
            )
        )
    return out


def _capital_chain(facts: Facts) -> list[Candidate]:
    out = []
    for c in facts.countries:
        if c.continent is None:
            continue
        cap_title = next((t for t in c.capitals if t in facts.articles), None)
        if cap_title is None or not _contains(facts.text(cap_title), c.name):
            continue  # the capital's passage must name its country (the bridge)
        cap = _display(cap_title)
        if _contains(cap, c.name):
            continue  # "Mexico City" would give the bridge away
        out.append(
            Candidate(
                "capital_country_continent",
                f"On which continent is the country whose capital is {cap}?",
                [c.continent],
                [
                    Hop(cap_title, [f"{cap} capital", cap, f"{cap} city"]),
                    Hop(c.title, [f"{c.name} country", c.name, f"{c.name} country continent"]),
                ],
                keys=(c.title,),
                thinks=[
                    f"I need the country whose capital is {cap}, then the continent it lies on.",
                    f"{cap} is the capital of {c.name}. Now I need the continent of {c.name}.",
                    f"{c.name} is in {c.continent}.",
                ],
            )
        )
    return out


def _single_hop(facts: Facts) -> list[Candidate]:
    out = []
    for c in facts.countries:
        out.append(
            Candidate(
                "single_hop",
                f"What is the capital of {c.name}?",
                list(c.capitals),
                [Hop(c.title, [f"{c.name} country capital", f"{c.name} capital", c.name])],
                keys=(c.title,),
                thinks=[
                    f"I need to look up the capital of {c.name}.",
                    f"The capital of {c.name} is {c.capitals[0]}.",
                ],
                relation="capital",
            )
        )
    for p in sorted(facts.people.values(), key=lambda p: p.title):
        out.append(
            Candidate(
                "single_hop",
                f"In what year was {p.name} born?",
                [str(p.birth_year)],
                [Hop(p.title, [p.name, f"{p.name} born"])],
                keys=(p.title,),
                thinks=[
                    f"I need to look up when {p.name} was born.",
                    f"{p.name} was born in {p.birth_year}.",
                ],
                relation="birth_year",
            )
        )
    for w in facts.works:
        p = facts.people[w.creator]
        role = WORK_ROLES[w.kind]
        out.append(
            Candidate(
                "single_hop",
                f'Who was the {role} of the {w.kind} "{w.name}"?',
                list(dict.fromkeys([p.name, p.title])),
                [Hop(w.title, [w.name, f"{w.name} {w.kind}"])],
                keys=(p.title,),
                thinks=[f"I need to look up who made {w.name}.", f"{w.name} is a {w.kind} by {p.name}."],
                relation="creator",
            )
        )
    return out


def _born_first(people: Sequence[Person], n: int, rng: random.Random) -> list[Candidate]:
    """Up to n comparison questions over pairs drawn from ``people`` (one split's people)."""
    people = [p for p in people if p.birth_year]
    names = Counter(p.name for p in people)
    people = [p for p in people if names[p.name] == 1]
    out, seen = [], set()
    attempts = 0
    while len(out) < n and len(people) >= 2 and attempts < 20 * n:
        attempts += 1
        a, b = rng.sample(people, 2)
        pair = tuple(sorted((a.title, b.title)))
        if a.birth_year == b.birth_year or pair in seen:
            continue
        seen.add(pair)
        first = a if a.birth_year < b.birth_year else b
        out.append(
            Candidate(
                "born_first",
                f"Who was born first, {a.name} or {b.name}?",
                list(dict.fromkeys([first.name, first.title])),
                [Hop(a.title, [a.name, f"{a.name} born"]), Hop(b.title, [b.name, f"{b.name} born"])],
                keys=(a.title, b.title),
                thinks=[
                    f"I need the birth years of {a.name} and {b.name}.",
                    f"{a.name} was born in {a.birth_year}. Now I need the birth year of {b.name}.",
                    f"{b.name} was born in {b.birth_year}, so {first.name} was born first.",
                ],
                extra={"years": [a.birth_year, b.birth_year]},
            )
        )
    return out


# ------------------------------------------------------------------------------ checks, split


def check_candidate(c: Candidate, facts: Facts) -> str | None:
    """Why a candidate is invalid, or None: hops in the corpus, answer in its proving passage."""
    if any(h.title not in facts.articles for h in c.hops):
        return "hop passage not in corpus"
    if not c.answers:
        return "no answer"
    if c.template == "born_first":
        years = c.extra["years"]
        if not all(str(y) in facts.text(h.title) for y, h in zip(years, c.hops)):
            return "birth year not in passage"
        winner = c.hops[years.index(min(years))].title
        if not _contains(facts.text(winner), c.answers[0]):
            return "answer not in its passage"
        return None
    if not _contains(facts.text(c.hops[-1].title), c.answers[0]):
        return "answer not in last hop passage"
    if _contains(c.question, c.answers[0]):
        return "answer given away by the question"
    return None


def _assign_entities(names: Sequence[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Entity -> split, by quotas over a seeded hash order (each held-out split gets >= 1 entity)."""
    order = sorted(set(names), key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    out, start = {}, 0
    for split in ("test", "dev"):
        k = max(1, round(fractions[split] * len(order))) if fractions[split] > 0 else 0
        for n in order[start : start + k]:
            out[n] = split
        start += k
    for n in order[start:]:
        out[n] = "train"
    return out


class SyntheticDataError(RuntimeError):
    """The synthetic data cannot be generated as asked (the message says why and what to do)."""


def _cap_shares(per_template: dict[str, list[Candidate]], size: int, share: float) -> dict[str, list[Candidate]]:
    """Each template's list cut so that no template passes ``share`` of the split that can be
    filled: the largest T <= ``size`` for which sum(min(available, floor(share * T))) >= T, each
    template capped at floor(share * T). (A cap on the size asked for would let the plentiful
    template fill the split the scarce ones leave short: 84% born_first under a 0.4 cap.)"""
    avail = [len(v) for v in per_template.values()]
    target = next((t for t in range(size, 0, -1) if sum(min(a, int(share * t)) for a in avail) >= t), 0)
    cap = int(share * target)
    return {name: lst[:cap] for name, lst in per_template.items()}


def _round_robin(per_template: dict[str, list[Candidate]], templates: Sequence[str], size: int) -> list[Candidate]:
    """Up to ``size`` candidates taken one per template in turn, each template's list in order."""
    chosen: list[Candidate] = []
    cursor = dict.fromkeys(templates, 0)
    while len(chosen) < size and any(cursor[t] < len(per_template.get(t, [])) for t in templates):
        for t in templates:
            if cursor[t] < len(per_template.get(t, [])) and len(chosen) < size:
                chosen.append(per_template[t][cursor[t]])
                cursor[t] += 1
    return chosen


def _title_key(title: str) -> str:
    """A title as retrievers' corpora spell it, folded: wiki-18 (Search-R1's corpus) quotes its
    titles (``"Paris"``), other corpora do not; case and white space vary too."""
    t = " ".join(title.split())
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        t = t[1:-1].strip()
    return t.casefold()


def _oracle_queries(cands: Sequence[Candidate], retriever: Retriever, topk: int) -> dict[str, list[Passage]]:
    """Choose, per hop, the first query whose top-k holds the hop's passage; mark retrievability.

    Queries are tried in rounds (all first choices in one batch, then the second choices of the
    hops that missed, ...), so each distinct query is searched once. Returns query -> passages.
    """
    results: dict[str, list[Passage]] = {}
    pending = [h for c in cands for h in c.hops]
    for h in pending:
        h.chosen = None
    for round_ in range(max((len(h.queries) for h in pending), default=0)):
        todo = sorted({h.queries[round_] for h in pending if round_ < len(h.queries)} - set(results))
        for i in range(0, len(todo), 1024):
            batch = todo[i : i + 1024]
            for q, hits in zip(batch, retriever.search(batch, topk)):
                results[q] = hits[:topk]  # what a rollout shows (a server may return more than topk)
        still = []
        for h in pending:
            if round_ < len(h.queries) and _title_key(h.title) in {
                _title_key(p.title) for p in results[h.queries[round_]]
            }:
                h.chosen = h.queries[round_]
            else:
                still.append(h)
        pending = still
    for c in cands:
        c.retrievable = all(h.chosen is not None for h in c.hops)
    return results


def _row(c: Candidate) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "template": c.template,
        "hops": [{"title": h.title, "search": h.chosen or h.queries[0]} for h in c.hops],
        "source": "synthetic",
        "bridge": list(c.keys),
        "oracle_retrievable": c.retrievable,
    }
    if c.relation:
        meta["relation"] = c.relation
    return {"id": c.id, "question": c.question, "golden_answers": c.answers, "metadata": meta}


def oracle_trajectory(
    c: Candidate, retriever: Retriever, topk: int, cache: dict[str, list[Passage]] | None = None,
    max_passage_words: int = 0,
) -> dict[str, Any]:
    """The tag-protocol turns an oracle agent would produce for a (retrievable) candidate.

    ``cache`` maps a query to the passages ``retriever.search([query], topk)`` gives (the same
    retriever and topk), to avoid searching again.
    """
    if not c.retrievable:
        raise ValueError(f"candidate {c.question!r} has a hop whose searches miss its passage")
    turns = []
    for think, hop in zip(c.thinks, c.hops):
        if cache is not None and hop.chosen in cache:
            passages = cache[hop.chosen]
        else:
            passages = retriever.search([hop.chosen], topk)[0]
        passages = passages[:topk]  # as a rollout cuts them
        turns.append(
            {
                "generated": f"<think>{think}</think>\n<search> {hop.chosen} </search>",
                "information": format_information(passages, max_passage_words),
            }
        )
    turns.append({"generated": f"<think>{c.thinks[-1]}</think>\n<answer> {c.answers[0]} </answer>"})
    return {"id": c.id, "question": c.question, "golden_answers": c.answers, "turns": turns}


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


# Present in a data folder while generate_dataset writes it: its files are not one set yet (a kill
# there left a new train split beside the old dev/test ones, whose questions it then shared).
INCOMPLETE_MARKER = ".gen-data-incomplete"


DOMINANT_SHARE = 0.5  # a template above this share of a split is named in a warning


def _warn_about_split(say: Callable[[str], None], split: str, got: int, asked: int, counts: dict[str, int],
                      max_share: float | None) -> None:
    """Say plainly when a split came out short, or mostly one template (the packaged Wikipedia holds
    a few thousand multi-hop chains; beyond that "who was born first" comparisons fill the splits)."""
    if got < asked:
        say(f"[gen-data] WARNING: {split} has {got} of the {asked} questions asked: the packaged Wikipedia "
            f"yields no more{' under max_template_share ' + str(max_share) if max_share else ''}; ask for fewer, "
            "or bring your own data (data.train_file, data.dev_file, data.test_file)")
    if got >= 50 and counts:
        name, n = max(counts.items(), key=lambda kv: kv[1])
        if n / got > DOMINANT_SHARE:
            advice = ("data.max_template_share caps each template's share (smaller splits, a balanced mix)"
                      if max_share is None else f"data.max_template_share is {max_share}")
            say(f"[gen-data] WARNING: {name} makes {100 * n / got:.0f}% of {split} ({n} of {got}); {advice}")


def generate_dataset(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 2000,
    n_dev: int = 200,
    n_test: int = 500,
    topk: int = 3,
    templates: Sequence[str] = TEMPLATES,
    retriever: Retriever | None = None,
    cache_dir: str | Path | None = None,
    require_retrievable: bool = False,
    max_passage_words: int = 0,
    max_per_bridge: int = 20,
    max_share: float | None = None,
    sft: bool = True,
    n_sft: int = 0,
    progress: Callable[[str], None] | None = print,
    retriever_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate train/dev/test jsonl (+ sft.jsonl oracle trajectories from the train split).

    Questions are taken round-robin over ``templates`` until each split has its size or the
    templates run out (the counts say what was reached). ``max_per_bridge`` caps how many
    questions of a template share one bridge entity (otherwise "American" people swamp the
    nationality chain). ``max_share`` (e.g. 0.4) caps each template's share of a split, at the
    cost of smaller splits: without it the plentiful born_first and single_hop questions fill
    what the chains cannot. With ``require_retrievable`` only questions whose oracle searches
    retrieve every hop passage in the BM25 top-k enter the splits. ``n_sft`` > 0: the SFT oracle
    trajectories come from that many questions of their own (the paper's separate SFT set), over
    the train split's entities but never among the train questions (the RL pool) or the held-out
    dev/test entities; 0: from the train questions themselves. ``retriever_info`` (what the
    oracle searches went through, e.g. the trainer's retriever id and corpus digest) is recorded
    in stats.json as it is. Returns paths and counts.
    """
    unknown = [t for t in templates if t not in TEMPLATES]
    if unknown or not templates:
        raise ValueError(f"unknown templates {unknown or templates!r}; choose from {', '.join(TEMPLATES)}")
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    if any(v < 0 for v in sizes.values()) or sum(sizes.values()) == 0:
        raise ValueError(f"split sizes must be >= 0 and not all 0, got {sizes}")
    if n_sft < 0:
        raise ValueError(f"n_sft must be >= 0, got {n_sft}")
    n_sft = n_sft if sft else 0
    # questions drawn from each split's entities: the SFT set shares the train split's
    drawn = dict(sizes, train=n_train + n_sft)
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if max_share is not None and not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    articles = load_wiki_articles()
    facts = Facts(articles)
    say(
        f"[gen-data] facts: {len(facts.countries)} countries, {len(facts.by_demonym)} demonyms, "
        f"{len(facts.people)} people with birth years, {len(facts.works)} works with a known creator"
    )
    if retriever is None:
        from megatron_recycle.agent.retrievers import BM25Retriever
        from megatron_recycle.data.corpus import Corpus

        corpus = Corpus([a.id for a in articles], [a.contents for a in articles], name="wiki-vital4")
        retriever = BM25Retriever(corpus, cache_dir=cache_dir)

    builders = {
        "person_nationality_capital": _person_chain,
        "work_creator_birth_year": _work_chain,
        "capital_country_continent": _capital_chain,
        "single_hop": _single_hop,
    }
    pools: dict[str, list[Candidate]] = {}
    rejected: Counter = Counter()
    seen_questions: set[str] = set()

    def keep(c: Candidate) -> bool:
        why = check_candidate(c, facts)
        norm = normalize_answer(c.question)
        if why is None and norm in seen_questions:
            why = "duplicate question"
        if why:
            rejected[f"{c.template}: {why}"] += 1
            return False
        seen_questions.add(norm)
        return True

    for name in templates:
        if name in builders:
            pools[name] = [c for c in builders[name](facts) if keep(c)]
    candidates_total = {k: len(v) for k, v in pools.items()}

    total = sum(drawn.values())
    fractions = {s: (drawn[s] / total if drawn[s] else 0.0) for s in SPLITS}
    entities = sorted({k for pool in pools.values() for c in pool for k in c.keys} | set(facts.people))
    split_of = _assign_entities(entities, fractions, seed)

    by_split: dict[str, dict[str, list[Candidate]]] = {s: defaultdict(list) for s in SPLITS}
    for name, pool in pools.items():
        for c in pool:
            by_split[split_of[c.keys[0]]][name].append(c)
    if "born_first" in templates:
        for s in SPLITS:
            members = [p for t, p in sorted(facts.people.items()) if split_of[t] == s]
            pairs = _born_first(members, 2 * drawn[s], random.Random(f"{seed}:born_first:{s}"))
            by_split[s]["born_first"] = [c for c in pairs if keep(c)]
            candidates_total["born_first"] = candidates_total.get("born_first", 0) + len(pairs)

    all_cands = [c for s in SPLITS for lst in by_split[s].values() for c in lst]
    t1 = time.perf_counter()
    search_cache = _oracle_queries(all_cands, retriever, topk)
    say(
        f"[gen-data] {len(all_cands)} candidates passed the checks; oracle searches "
        f"({len(search_cache)} queries) took {time.perf_counter() - t1:.1f} s"
    )

    rows: dict[str, list[Candidate]] = {}
    counts: dict[str, dict[str, int]] = {}
    for s in SPLITS:
        per_template = {}
        for name in templates:
            lst = sorted(by_split[s].get(name, []), key=lambda c: c.id)
            rng.shuffle(lst)
            if require_retrievable:
                lst = [c for c in lst if c.retrievable]
            per_bridge: Counter = Counter()
            capped = []
            for c in lst:
                if c.template != "born_first" and per_bridge[c.keys[0]] >= max_per_bridge:
                    continue
                per_bridge[c.keys[0]] += 1
                capped.append(c)
            per_template[name] = capped
        if s == "train" and n_sft:
            # The SFT set's questions: the retrievable ones (an oracle trajectory needs every hop
            # retrieved) dealt between the two sets in proportion to their sizes, per template.
            for_sft = {}
            for name, lst in per_template.items():
                keep, mine, k = [], [], 0
                for c in lst:
                    if c.retrievable and (k * n_sft) // drawn["train"] != ((k + 1) * n_sft) // drawn["train"]:
                        mine.append(c)
                    else:
                        keep.append(c)
                    k += c.retrievable
                per_template[name], for_sft[name] = keep, mine
            if max_share is not None:
                for_sft = _cap_shares(for_sft, n_sft, max_share)
            rows["sft"] = _round_robin(for_sft, templates, n_sft)
            counts["sft"] = dict(Counter(c.template for c in rows["sft"]))
        if max_share is not None:
            per_template = _cap_shares(per_template, sizes[s], max_share)
        chosen = _round_robin(per_template, templates, sizes[s])
        rows[s] = chosen
        counts[s] = dict(Counter(c.template for c in chosen))
        say(f"[gen-data] {s}: {len(chosen)} of {sizes[s]} questions {counts[s]}")
        _warn_about_split(say, s, len(chosen), sizes[s], counts[s], max_share)
    if n_sft:
        say(f"[gen-data] sft: {len(rows['sft'])} of {n_sft} questions of their own {counts['sft']}")
        _warn_about_split(say, "sft", len(rows["sft"]), n_sft, counts["sft"], max_share)
    sft_source = rows["sft"] if n_sft else rows["train"]

    if sft and (rows["train"] or n_sft) and not any(c.retrievable for c in sft_source):
        # Nothing is written: the SFT phase would fail later (after the evaluation before
        # training) with no hint at the cause, and a written folder would be reused as it is.
        what = "SFT questions" if n_sft else "train questions"
        raise SyntheticDataError(
            f"none of the {len(sft_source) if sft_source else n_sft} {what} is retrievable: for no hop did the "
            f"retriever's top-{topk} hold a passage titled like the hop's article, so there are no "
            "oracle trajectories for SFT. The retriever's corpus must hold the packaged Wikipedia "
            "articles (wiki-18 and the packaged corpus do); check retriever.kind / retriever.url / "
            "retriever.corpus, or generate without SFT data"
        )
    # The files are staged in a folder of their own and moved in together, stats.json last, with a
    # marker in place meanwhile: a kill leaves either the old set or a folder marked unfinished
    # (which ensure_data generates again), never a mix of two generations.
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(".gen-data-stage-*"):  # a killed generation's (one generator at a time)
        shutil.rmtree(old, ignore_errors=True)
    stage = out_dir / f".gen-data-stage-{os.getpid()}"
    stage.mkdir()
    staged = []
    try:
        for s in SPLITS:
            _write_jsonl(stage / f"{s}.jsonl", [_row(c) for c in rows[s]])
            staged.append(f"{s}.jsonl")
        sft_rows = []
        if sft:
            sft_rows = [
                oracle_trajectory(c, retriever, topk, search_cache, max_passage_words)
                for c in sft_source
                if c.retrievable
            ]
            _write_jsonl(stage / "sft.jsonl", sft_rows)
            staged.append("sft.jsonl")
            source = "SFT questions of their own" if n_sft else "train questions (the RL pool's own)"
            say(f"[gen-data] sft: {len(sft_rows)} oracle trajectories of {len(sft_source)} {source}")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # the folder's own files are untouched so far
        raise
    summary = {
        "seed": seed,
        "topk": topk,
        "max_passage_words": max_passage_words,
        "retriever": retriever_info,
        "templates": list(templates),
        "requested": dict(sizes, sft=n_sft),
        "max_share": max_share,
        "written": {s: len(rows[s]) for s in SPLITS},
        "sft_source": ("held-out sft questions" if n_sft else "train questions") if sft else None,
        "per_template": counts,
        "candidates": candidates_total,
        "retrievable": {s: dict(Counter(c.template for c in rows[s] if c.retrievable)) for s in SPLITS},
        "sft": len(sft_rows),
        "rejected": dict(sorted(rejected.items())),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (stage / "stats.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    marker = out_dir / INCOMPLETE_MARKER
    marker.write_text(f"gen-data (process {os.getpid()}) is replacing this folder's files\n")
    (out_dir / "stats.json").unlink(missing_ok=True)
    if not sft:
        (out_dir / "sft.jsonl").unlink(missing_ok=True)  # an older generation's, not of this set
    paths: dict[str, Any] = {}
    for name in [*staged, "stats.json"]:
        os.replace(stage / name, out_dir / name)
        paths[name.split(".")[0]] = out_dir / name
    marker.unlink()
    stage.rmdir()
    say(f"[gen-data] wrote {out_dir} in {summary['seconds']} s")
    return {"paths": {k: str(v) for k, v in paths.items()}, "counts": summary}
