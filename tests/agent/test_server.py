"""Retrieval server: the Search-R1 contract, request validation, and a real loopback round trip."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from megatron_recycle.agent.retrievers import BM25Retriever, HTTPRetriever
from megatron_recycle.agent.server import BackgroundServer, ServerLimits, create_app
from megatron_recycle.agent.types import Passage, RetrievalError
from megatron_recycle.data.corpus import load_corpus

TITLES = ["Albert Einstein", "Paris", "Hamlet", "Mona Lisa", "Berlin", "Moon"]


@pytest.fixture(scope="module")
def retriever():
    wiki = load_corpus("wiki")
    rows = {wiki.index_of(wiki.find_title(t).id) for t in TITLES} | set(range(0, 10_000, 40))
    return BM25Retriever(wiki.subset(sorted(rows)), use_cache=False)


@pytest.fixture(scope="module")
def client(retriever):
    app = create_app(retriever, ServerLimits(default_topk=3, max_topk=10, max_queries=4, max_query_chars=200))
    with TestClient(app) as c:
        yield c


def test_search_r1_request_with_scores(client, retriever):
    # the body Search-R1's generation code sends
    body = {
        "queries": ["capital and largest city of France", "Shakespeare tragedy Denmark"],
        "topk": 3,
        "return_scores": True,
    }
    response = client.post("/retrieve", json=body)
    assert response.status_code == 200
    result = response.json()["result"]
    assert len(result) == 2
    for hits, title in zip(result, ["Paris", "Hamlet"]):
        assert 1 <= len(hits) <= 3
        for hit in hits:
            assert set(hit) == {"document", "score"} and set(hit["document"]) == {"id", "contents"}
            assert isinstance(hit["score"], float) and "\n" in hit["document"]["contents"]
        assert hits[0]["document"]["contents"].split("\n", 1)[0] == title
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True)
    direct = retriever.search(body["queries"], 3)
    assert [[h["document"]["id"] for h in r] for r in result] == [[p.id for p in r] for r in direct]


def test_without_scores_returns_bare_documents_and_default_topk(client):
    result = client.post("/retrieve", json={"queries": ["Leonardo da Vinci portrait"]}).json()["result"]
    assert 1 <= len(result[0]) <= 3  # server default topk
    assert set(result[0][0]) == {"id", "contents"}
    assert result[0][0]["contents"].startswith("Mona Lisa\n")
    assert client.post("/retrieve", json={"queries": [], "topk": 2}).json() == {"result": []}
    # unknown keys are ignored, as pydantic does in Search-R1's server
    assert client.post("/retrieve", json={"queries": ["Moon"], "extra": 1}).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"topk": 3}, 422, "queries"),
        ({"queries": "a single string", "topk": 3}, 422, "queries"),
        ({"queries": [1, 2], "topk": 3}, 422, "queries"),
        ({"queries": ["a"], "topk": 0}, 422, "topk must be between 1 and 10"),
        ({"queries": ["a"], "topk": 11}, 422, "topk must be between 1 and 10"),
        ({"queries": ["a"], "topk": "many"}, 422, "topk"),
        ({"queries": ["a"] * 5, "topk": 3}, 413, "limit is 4"),
        ({"queries": ["a" * 201], "topk": 3}, 422, "201 characters"),
    ],
)
def test_malformed_requests_get_4xx_with_a_message(client, body, status, message):
    response = client.post("/retrieve", json=body)
    assert response.status_code == status
    assert message in json.dumps(response.json())


def test_non_json_and_oversized_bodies(retriever):
    app = create_app(retriever, max_body_bytes=1000, max_topk=10)
    with TestClient(app) as c:
        r = c.post("/retrieve", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        r = c.post("/retrieve", json={"queries": ["x" * 2000]})
        assert r.status_code == 413 and "exceeds 1000" in r.json()["detail"]
        # a body streamed without Content-Length is held to the same bound
        big = json.dumps({"queries": ["Mona Lisa"] * 300}).encode()
        r = c.post("/retrieve", content=iter([big[:500], big[500:]]), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers and r.status_code == 413
        small = json.dumps({"queries": ["Mona Lisa"], "topk": 1}).encode()
        r = c.post("/retrieve", content=iter([small[:10], small[10:]]), headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json()["result"][0][0]["id"]
        # NaN and infinities are JSON constants Python accepts; they are a 422, not a 500
        for body in (b'{"queries": ["a"], "topk": NaN}', b'{"queries": [Infinity]}',
                     b'{"queries": ["a"], "return_scores": -Infinity}'):
            r = c.post("/retrieve", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "body", body
        health = c.get("/health").json()
        # every refusal counts: the parse error, two oversized bodies and three invalid ones
        assert health["status"] == "ok" and health["counters"]["rejected"] == 6
        assert health["counters"]["requests"] == 1
    with pytest.raises(ValueError, match="default_topk"):
        ServerLimits(default_topk=20, max_topk=10)


def test_retrieval_failure_is_a_503(client):
    class Broken:
        def search(self, queries, topk) -> list[list[Passage]]:
            raise RetrievalError("index offline")

    with TestClient(create_app(Broken())) as c:
        r = c.post("/retrieve", json={"queries": ["x"], "topk": 1})
    assert r.status_code == 503 and "index offline" in r.json()["detail"]


def test_health(client, retriever):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["retriever"] == "BM25Retriever"
    assert health["passages"] == len(retriever.corpus) and health["limits"]["max_topk"] == 10


def test_real_uvicorn_round_trip_with_http_client(retriever):
    with BackgroundServer(create_app(retriever), host="127.0.0.1", port=0) as server:
        assert server.url.startswith("http://127.0.0.1:")
        queries = ["German-born theoretical physicist", "Mona Lisa", "qqqzzz"]
        for return_scores in (True, False):
            with HTTPRetriever(server.url, timeout=5.0, max_retries=0, return_scores=return_scores) as http:
                got = http.search(queries, topk=3)
            want = retriever.search(queries, 3)
            assert [[p.contents for p in r] for r in got] == [[p.contents for p in r] for r in want]
            assert got[0][0].title == "Albert Einstein" and got[2] == []
            if return_scores:
                assert got[0][0].score == pytest.approx(want[0][0].score, rel=1e-6)


def test_a_large_round_and_an_overlong_query_stay_within_the_servers_limits(retriever):
    # Server limits of 4 queries and 200 characters per request: 10 queries, one of them 5,000
    # characters long, go out as requests the server accepts, and every query gets its passages.
    limits = ServerLimits(max_queries=4, max_query_chars=200)
    queries = ["German-born theoretical physicist", "Mona Lisa", "capital of France"] * 3
    queries.insert(4, "Hamlet prince of Denmark " + "x" * 5000)
    with BackgroundServer(create_app(retriever, limits), host="127.0.0.1", port=0) as server:
        with HTTPRetriever(server.url, timeout=5.0, max_retries=0, max_batch=4, max_query_chars=200) as http:
            got = http.search(queries, topk=2)
            stats = http.stats_snapshot()
        with HTTPRetriever(server.url, timeout=5.0, max_retries=0, max_split_requests=0) as unbounded:
            with pytest.raises(RetrievalError, match="HTTP 413"):  # the defaults exceed these limits
                unbounded.search(queries, topk=2)
        with HTTPRetriever(server.url, timeout=5.0, max_retries=0) as splitting:
            split = splitting.search_each(queries, topk=2)  # halves until the server takes them
            split_stats = splitting.stats_snapshot()
    want = retriever.search([q[:200] for q in queries], 2)
    assert [[p.id for p in r] for r in got] == [[p.id for p in r] for r in want]
    assert got[4][0].title == "Hamlet"
    assert stats["requests"] == 3 and stats["calls"] == 1 and stats["truncated_queries"] == 1
    assert stats["failures"] == 0 and stats["http_errors"] == 0
    # without the client's limits, splitting still answers every query but the overlong one,
    # which the server refuses alone (its 4,096 characters exceed the server's 200)
    assert isinstance(split[4], RetrievalError) and "HTTP 422" in str(split[4])
    assert [[p.id for p in r] for i, r in enumerate(split) if i != 4] == [
        [p.id for p in r] for i, r in enumerate(want) if i != 4
    ]
    assert split_stats["failed_queries"] == 1 and split_stats["split_requests"] > 0


def test_requests_are_bounded_in_bytes_too():
    http = HTTPRetriever("http://127.0.0.1:9/retrieve", max_batch=100, max_request_bytes=50)
    try:
        chunks = http._requests(["a" * 20, "b" * 20, "c" * 20, "d" * 60, "e"])
    finally:
        http.close()
    # each JSON string with its separator takes len + 4 bytes; a query over the bound goes alone
    assert chunks == [["a" * 20, "b" * 20], ["c" * 20], ["d" * 60], ["e"]]
    with pytest.raises(ValueError, match="max_batch, max_query_chars and max_request_bytes >= 1"):
        HTTPRetriever("http://127.0.0.1:9/retrieve", max_batch=0)
