"""Retrievers: known queries find their article, on-disk caches are reused, the HTTP client
retries with backoff and gives up with RetrievalError against a faulty loopback server."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from megatron_recycle.agent.retrievers import (
    BM25Retriever,
    DenseRetriever,
    HTTPRetriever,
    build_retriever,
)
from megatron_recycle.agent.types import Passage, RetrievalError
from megatron_recycle.data.corpus import load_corpus

KNOWN = [
    ("German-born theoretical physicist theory of relativity", "Albert Einstein"),
    ("capital and largest city of France", "Paris"),
    ("tragedy by William Shakespeare prince of Denmark", "Hamlet"),
    ("half-length portrait painting by Leonardo da Vinci", "Mona Lisa"),
    ("44th president of the United States", "Barack Obama"),
    ("1968 science fiction film by Stanley Kubrick", "2001: A Space Odyssey"),
]


@pytest.fixture(scope="module")
def wiki():
    return load_corpus("wiki")


@pytest.fixture(scope="module")
def bm25_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bm25cache")


@pytest.fixture(scope="module")
def bm25(wiki, bm25_cache):
    return BM25Retriever(wiki, cache_dir=bm25_cache)


def test_bm25_known_queries_find_their_article(bm25):
    results = bm25.search([q for q, _ in KNOWN], topk=3)
    assert len(results) == len(KNOWN)
    for (query, title), hits in zip(KNOWN, results):
        assert 1 <= len(hits) <= 3
        assert all(isinstance(h, Passage) for h in hits)
        assert title in [h.title for h in hits], (query, [h.title for h in hits])
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0


def test_bm25_index_cache_is_reused_and_keyed_by_corpus(wiki, bm25, bm25_cache):
    assert not bm25.loaded_from_cache and (bm25.index_dir / "meta.json").is_file()
    again = BM25Retriever(wiki, cache_dir=bm25_cache)
    assert again.loaded_from_cache and again.index_dir == bm25.index_dir
    queries = [q for q, _ in KNOWN]
    first, second = bm25.search(queries, 5), again.search(queries, 5)
    assert [[(p.id, round(p.score, 5)) for p in r] for r in first] == [
        [(p.id, round(p.score, 5)) for p in r] for r in second
    ]
    small = BM25Retriever(wiki.subset(list(range(50))), cache_dir=bm25_cache)
    assert not small.loaded_from_cache and small.cache_key != bm25.cache_key


def test_bm25_damaged_cache_is_rebuilt(wiki, tmp_path):
    corpus = wiki.subset(list(range(0, 10_000, 25)))
    first = BM25Retriever(corpus, cache_dir=tmp_path)
    (first.index_dir / "vocab.index.json").write_text("{broken")
    second = BM25Retriever(corpus, cache_dir=tmp_path)
    assert not second.loaded_from_cache and second.cache_rebuilds == 1
    query = [corpus.contents[7].split("\n")[0]]
    assert [p.id for p in second.search(query, 3)[0]] == [p.id for p in first.search(query, 3)[0]]
    assert BM25Retriever(corpus, cache_dir=tmp_path).loaded_from_cache  # the rebuilt cache is good
    # a crash while removing a damaged cache leaves a folder without meta.json: it is cleared
    # and replaced, not left to block every later publish
    (first.index_dir / "meta.json").unlink()
    third = BM25Retriever(corpus, cache_dir=tmp_path)
    assert not third.loaded_from_cache and third.cache_rebuilds == 1 and (third.index_dir / "meta.json").is_file()
    assert BM25Retriever(corpus, cache_dir=tmp_path).loaded_from_cache


def testmodel_fingerprint_sees_new_weights_of_the_same_size(tmp_path):
    from megatron_recycle.agent.retrievers import model_fingerprint

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    rng = np.random.default_rng(0)
    weights = rng.standard_normal(400_000).astype(np.float32)  # 1.6 MB: fingerprinted by sampling
    (model / "model.safetensors").write_bytes(weights.tobytes())
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    weights[200_000] += 1.0  # one value in the middle changed, same size
    (model / "model.safetensors").write_bytes(weights.tobytes())
    assert model_fingerprint(model) != before


def test_bm25_edge_cases(bm25, wiki):
    empty = bm25.search(["", "zzqqxxv", "the of and"], topk=3)
    assert empty == [[], [], []]
    assert bm25.stats.empty_results >= 3
    assert bm25.search([], topk=3) == []
    with pytest.raises(TypeError, match="single string"):
        bm25.search("Paris", topk=3)
    with pytest.raises(ValueError, match="topk"):
        bm25.search(["Paris"], topk=0)
    tiny = BM25Retriever(wiki.subset([0, 1, 2]), use_cache=False)
    assert len(tiny.search(["number"], topk=50)[0]) <= 3


def test_dense_retriever_on_a_small_subset(wiki, tmp_path):
    titles = [t for _, t in KNOWN] + ["Berlin", "Isaac Newton", "Moon", "Pacific Ocean"]
    rows = [wiki.index_of(wiki.find_title(t).id) for t in titles] + list(range(0, 2000, 100))
    corpus = wiki.subset(sorted(set(rows)))
    dense = DenseRetriever(corpus, cache_dir=tmp_path, max_seq_length=128)
    assert not dense.loaded_from_cache and dense.cache_file.is_file()
    queries = [
        ("the physicist who came up with E = mc2", "Albert Einstein"),
        ("famous painting of a smiling woman by Leonardo", "Mona Lisa"),
        ("largest ocean on Earth", "Pacific Ocean"),
    ]
    results = dense.search([q for q, _ in queries], topk=3)
    for (query, title), hits in zip(queries, results):
        assert title in [h.title for h in hits], (query, [h.title for h in hits])
        assert hits[0].score <= 1.0 + 1e-5 and hits[0].score >= hits[-1].score
    again = DenseRetriever(corpus, cache_dir=tmp_path, max_seq_length=128)
    assert again.loaded_from_cache
    assert [h.id for h in again.search([queries[0][0]], 3)[0]] == [h.id for h in results[0]]
    np.testing.assert_allclose(again.embeddings, dense.embeddings)
    for damage in (b"not a numpy file", b""):  # a damaged (or empty) cache is recomputed
        dense.cache_file.write_bytes(damage)
        third = DenseRetriever(corpus, cache_dir=tmp_path, max_seq_length=128)
        assert not third.loaded_from_cache
        np.testing.assert_allclose(third.embeddings, dense.embeddings, atol=1e-5)


def test_build_retriever_validates_kind(wiki, bm25_cache):
    assert isinstance(build_retriever("bm25", corpus=wiki, cache_dir=bm25_cache), BM25Retriever)
    with pytest.raises(ValueError, match="unknown retriever kind 'sparse'"):
        build_retriever("sparse", corpus=wiki)
    with pytest.raises(ValueError, match="needs url"):
        build_retriever("http")
    with pytest.raises(ValueError, match="http://"):
        HTTPRetriever("localhost:8000")


# ----------------------------------------------------------------- HTTP client fault handling


class _FaultyHandler(BaseHTTPRequestHandler):
    """Answers according to the server's script: a list of actions consumed one per request."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.bodies.append(body)
        action = server.script.pop(0) if server.script else server.default
        if action == "sleep":
            time.sleep(server.sleep_s)
            action = "ok"
        if action == "reject-bad":  # a validation error whenever the request holds a bad query
            action = "422" if any(q.startswith("bad") for q in body["queries"]) else "ok"
        if action == "ok":
            result = [
                [{"document": {"id": "7", "contents": f"Title\n{q}"}, "score": 1.5}] for q in body["queries"]
            ]
            self._send(200, {"result": result})
        elif action == "bare":  # Search-R1 without return_scores: bare documents
            self._send(200, {"result": [[{"id": "7", "contents": "T\ntext"}] for _ in body["queries"]]})
        elif action == "garbage":
            self._send(200, {"unexpected": 1})
        elif action == "badgzip":  # a body its Content-Encoding does not describe
            self._send(200, None, b"not gzip at all", {"Content-Encoding": "gzip"})
        elif action == "deep":  # valid JSON nested deeper than Python's recursion limit
            self._send(200, None, b"[" * 100_000 + b"]" * 100_000)
        else:
            self._send(int(action), {"detail": "scripted failure"})

    def _send(self, status: int, payload: dict | None, data: bytes = b"", headers: dict | None = None) -> None:
        data = json.dumps(payload).encode() if payload is not None else data
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and hung up, as intended

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def faulty_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FaultyHandler)
    server.daemon_threads = True
    server.script, server.default, server.sleep_s, server.bodies = [], "ok", 1.0, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_http_retriever_retries_5xx_then_succeeds(faulty_server):
    faulty_server.script = ["500", "503"]
    with HTTPRetriever(_url(faulty_server), timeout=2.0, max_retries=3, backoff=0.01) as client:
        hits = client.search(["who", "what"], topk=2)
        assert [[h.contents for h in r] for r in hits] == [["Title\nwho"], ["Title\nwhat"]]
        assert hits[0][0].score == 1.5 and hits[0][0].id == "7"
        stats = client.stats_snapshot()
    assert stats["requests"] == 3 and stats["retries"] == 2 and stats["http_errors"] == 2
    assert stats["failures"] == 0
    assert faulty_server.bodies[0] == {"queries": ["who", "what"], "topk": 2, "return_scores": True}


def test_http_retriever_gives_up_after_bounded_retries(faulty_server):
    faulty_server.default = "500"
    client = HTTPRetriever(_url(faulty_server), timeout=2.0, max_retries=2, backoff=0.01)
    with pytest.raises(RetrievalError, match="HTTP 500"):
        client.search(["q"], topk=3)
    stats = client.stats_snapshot(reset=True)
    assert stats == {**stats, "requests": 3, "retries": 2, "failures": 1}
    assert client.stats_snapshot()["failures"] == 0  # reset


def test_http_retriever_timeouts_are_retried_and_bounded(faulty_server):
    faulty_server.default, faulty_server.sleep_s = "sleep", 1.5
    client = HTTPRetriever(_url(faulty_server), timeout=0.2, max_retries=2, backoff=0.05)
    start = time.monotonic()
    with pytest.raises(RetrievalError, match="timeout"):
        client.search(["slow"], topk=1)
    elapsed = time.monotonic() - start
    assert client.stats.timeouts == 3 and client.stats.retries == 2 and client.stats.failures == 1
    assert elapsed < client.max_total_seconds() + 1.0  # never hangs on a dead server


def test_http_retriever_does_not_retry_client_errors_or_bad_bodies(faulty_server):
    faulty_server.script = ["422"]
    client = HTTPRetriever(_url(faulty_server), timeout=2.0, max_retries=3, backoff=0.01)
    with pytest.raises(RetrievalError, match="HTTP 422"):
        client.search(["q"], topk=3)
    assert client.stats.requests == 1 and client.stats.failures == 1
    faulty_server.script = ["garbage"]
    with pytest.raises(RetrievalError, match="bad response body"):
        client.search(["q"], topk=3)
    faulty_server.script = ["bare"]
    hits = client.search(["q"], topk=3)
    assert hits[0][0].contents == "T\ntext" and hits[0][0].score == 0.0


def test_http_retriever_malformed_bodies_are_retrieval_errors(faulty_server):
    # a broken Content-Encoding (httpx raises while decoding) and JSON nested too deep to parse
    # fail their queries like any malformed body: not retried, not a crash of the rollout
    faulty_server.script = ["badgzip", "deep", "ok"]
    with HTTPRetriever(_url(faulty_server), timeout=2.0, max_retries=3, backoff=0.01) as client:
        for _ in range(2):
            got = client.search_each(["a", "b"], topk=1)
            assert all(isinstance(g, RetrievalError) and "bad response body" in str(g) for g in got)
        assert client.search(["c"], topk=1)[0][0].contents == "Title\nc"
        assert client.stats.requests == 3 and client.stats.retries == 0 and client.stats.failures == 2


def test_http_retriever_connection_refused():
    # bind and close a port so that nothing listens on it
    probe = ThreadingHTTPServer(("127.0.0.1", 0), _FaultyHandler)
    port = probe.server_address[1]
    probe.server_close()
    client = HTTPRetriever(f"http://127.0.0.1:{port}/retrieve", timeout=1.0, max_retries=1, backoff=0.01)
    with pytest.raises(RetrievalError, match="ConnectError"):
        client.search(["q"], topk=1)
    assert client.stats.requests == 2 and client.stats.failures == 1


def test_http_retriever_isolates_a_refused_query_by_splitting_the_request(faulty_server):
    faulty_server.default = "reject-bad"
    queries = [f"q{i}" for i in range(8)]
    queries[5] = "bad five"
    with HTTPRetriever(_url(faulty_server), timeout=2.0, max_retries=3, backoff=0.01, max_batch=8) as client:
        got = client.search_each(queries, topk=1)
        stats = client.stats_snapshot()
        with pytest.raises(RetrievalError, match="HTTP 422"):
            client.search(queries, topk=1)  # search() still raises when any query failed
    assert [isinstance(g, RetrievalError) for g in got] == [i == 5 for i in range(8)]
    assert [g[0].contents for i, g in enumerate(got) if i != 5] == [f"Title\n{q}" for q in queries if q != "bad five"]
    assert "HTTP 422" in str(got[5])
    # 8 -> 4 + 4 -> 2 + 2 -> 1 + 1, depth first: one request refused per level, none retried
    assert stats["requests"] == 7 and stats["split_requests"] == 6 and stats["retries"] == 0
    assert stats["failures"] == 1 and stats["failed_queries"] == 1
    assert [len(b["queries"]) for b in faulty_server.bodies] == [8, 4, 4, 2, 1, 1, 2] + [8, 4, 4, 2, 1, 1, 2]


def test_http_retriever_split_budget_bounds_the_requests(faulty_server):
    faulty_server.default = "reject-bad"
    queries = [f"bad {i}" for i in range(64)]  # a server refusing everything: not worth 127 requests
    with HTTPRetriever(_url(faulty_server), timeout=2.0, max_retries=0, max_batch=64, max_split_requests=6) as client:
        got = client.search_each(queries, topk=1)
    assert all(isinstance(g, RetrievalError) for g in got)
    assert client.stats.requests == 1 + 6 and client.stats.failed_queries == 64


def test_http_retriever_keeps_answers_received_before_the_server_went_down(faulty_server):
    faulty_server.script = ["ok", "500", "500"]
    faulty_server.default = "ok"
    queries = ["a", "b", "c", "d", "e", "f"]
    with HTTPRetriever(_url(faulty_server), timeout=2.0, max_retries=1, backoff=0.01, max_batch=2) as client:
        got = client.search_each(queries, topk=1)
    assert [g[0].contents for g in got[:2]] == ["Title\na", "Title\nb"]
    assert all(isinstance(g, RetrievalError) for g in got[2:])
    assert "HTTP 500" in str(got[2]) and "2 queries not sent" in str(got[4])
    # the third request is not sent once the second failed after its retry (a down server costs one
    # request's retries per call, not one per request); 500 is not split
    assert client.stats.requests == 3 and client.stats.split_requests == 0
    assert client.stats.failures == 1 and client.stats.failed_queries == 4


def test_http_retriever_a_split_half_that_finds_the_server_down_ends_the_call(faulty_server):
    # the first request is refused (422: split it), then the server answers 503 to everything: the
    # first half's failure stops the call, as a failed top-level request does
    faulty_server.script = ["422"]
    faulty_server.default = "503"
    queries = [f"q{i}" for i in range(32)]
    with HTTPRetriever(_url(faulty_server), timeout=2.0, max_retries=1, backoff=0.01, max_batch=8) as client:
        got = client.search_each(queries, topk=1)
    assert all(isinstance(g, RetrievalError) for g in got)
    assert [len(b["queries"]) for b in faulty_server.bodies] == [8, 4, 4]  # the half and its one retry
    assert "HTTP 503" in str(got[0]) and "queries not sent" in str(got[-1])
    assert client.stats.split_requests == 2 and client.stats.failed_queries == 32


def test_bm25_refuses_a_corpus_without_any_indexable_term(tmp_path):
    from megatron_recycle.data.corpus import Corpus

    with pytest.raises(ValueError, match="no passage has an indexable term"):
        BM25Retriever(Corpus(["a", "b"], ["the\nof the", "and\n"]), cache_dir=tmp_path)
