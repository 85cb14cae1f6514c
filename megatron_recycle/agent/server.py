"""Retrieval server speaking the Search-R1 contract (METHOD.md section 4), on FastAPI + uvicorn.

POST /retrieve {"queries": [...], "topk": k, "return_scores": bool}
  -> {"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]} with return_scores,
  -> {"result": [[{"id", "contents"}, ...], ...]} without (Search-R1's server does the same).
A missing or null ``topk`` means the server's default (3, as Search-R1 launches it). Requests
outside the limits (topk, number of queries, query length, body size) get a 4xx with a message.
GET /health answers {"status": "ok", ...}. The server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from megatron_recycle.agent.types import RetrievalError, Retriever

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class RetrieveRequest(BaseModel):
    """Body of POST /retrieve (Search-R1's QueryRequest); unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore")
    queries: list[str]
    topk: int | None = None
    return_scores: bool = False


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on one /retrieve request; anything beyond them is answered with a 4xx."""

    default_topk: int = 3
    max_topk: int = 100
    max_queries: int = 512
    max_query_chars: int = 4096
    max_body_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 1 <= self.default_topk <= self.max_topk:
            raise ValueError(
                f"need 1 <= default_topk <= max_topk, got default_topk={self.default_topk}, "
                f"max_topk={self.max_topk}"
            )
        if self.max_queries < 1 or self.max_query_chars < 1 or self.max_body_bytes < 1:
            raise ValueError(f"server limits must be positive, got {self}")


def create_app(retriever: Retriever, limits: ServerLimits | None = None, **limit_overrides: int):
    """A FastAPI app serving ``retriever`` under the Search-R1 contract.

    Limits come from ``limits`` or keyword overrides (``max_topk=``, ``max_queries=``, ...).
    Calls into the retriever are serialized with a lock (FastAPI runs handlers in a thread pool
    and the retrievers are not meant to be shared by threads).
    """
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    if limits is None:
        limits = ServerLimits(**limit_overrides)
    elif limit_overrides:
        raise ValueError("pass either limits= or keyword limits, not both")

    app = FastAPI(title="megatron-recycle retrieval server")
    lock = threading.Lock()
    counters = _Counters()
    app.state.retriever = retriever
    app.state.limits = limits
    app.state.counters = counters

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        # FastAPI's own answer echoes the offending input, which fails to encode when it is a
        # NaN or an infinity (JSON constants Python's parser accepts), and becomes a 500
        counters.add(rejected=1)
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    def reject(status: int, message: str) -> HTTPException:
        counters.add(rejected=1)
        return HTTPException(status_code=status, detail=message)

    @app.post("/retrieve")
    def retrieve(request: RetrieveRequest) -> dict[str, Any]:
        topk = limits.default_topk if request.topk is None else request.topk
        if not 1 <= topk <= limits.max_topk:
            raise reject(422, f"topk must be between 1 and {limits.max_topk}, got {topk}")
        if len(request.queries) > limits.max_queries:
            raise reject(
                413, f"{len(request.queries)} queries in one request; the limit is {limits.max_queries}"
            )
        for i, q in enumerate(request.queries):
            if len(q) > limits.max_query_chars:
                raise reject(
                    422, f"queries[{i}] has {len(q)} characters; the limit is {limits.max_query_chars}"
                )
        counters.add(requests=1, queries=len(request.queries))
        try:
            with lock:
                hits = retriever.search(request.queries, topk) if request.queries else []
        except RetrievalError as e:
            counters.add(errors=1)
            raise HTTPException(status_code=503, detail=f"retrieval failed: {e}") from None
        result = []
        for passages in hits:
            docs = [{"id": p.id, "contents": p.contents} for p in passages]
            if request.return_scores:
                result.append([{"document": d, "score": p.score} for d, p in zip(docs, passages)])
            else:
                result.append(docs)
        return {"result": result}

    @app.get("/health")
    def health() -> dict[str, Any]:
        corpus = getattr(retriever, "corpus", None)
        return {
            "status": "ok",
            "retriever": type(retriever).__name__,
            "passages": len(corpus) if corpus is not None else None,
            "limits": limits.__dict__,
            "counters": counters.snapshot(),
        }

    return _BodyLimit(app, limits.max_body_bytes, counters)


class _Counters:
    """The server's request counters (handlers run on a thread pool, hence the lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = {"requests": 0, "queries": 0, "rejected": 0, "errors": 0}

    def add(self, **deltas: int) -> None:
        with self._lock:
            for key, delta in deltas.items():
                self._values[key] += delta

    def __getitem__(self, key: str) -> int:
        with self._lock:
            return self._values[key]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class _BodyLimit:
    """ASGI wrapper answering 413 to a request body over ``max_bytes``, whether the client
    announced its length or streamed it in chunks: the body is read (at most ``max_bytes``)
    before the app sees the request, then replayed to it. Other attributes come from the app.
    """

    def __init__(self, app, max_bytes: int, counters: _Counters) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.counters = counters

    def __getattr__(self, name: str):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send, f"request body of {int(length)} bytes exceeds {self.max_bytes}")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._reject(send, f"request body exceeds {self.max_bytes} bytes")
                return
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    async def _reject(self, send, message: str) -> None:
        self.counters.add(rejected=1)
        data = json.dumps({"detail": message}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": data})


def _replay(messages: list[dict], receive):
    """A receive callable giving ``messages`` first, then the real ``receive``."""
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed


class BackgroundServer:
    """A uvicorn server on a daemon thread (tests, notebooks, an in-process rollout worker)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="retrieval-server")
        self.host = host
        self.port = port

    def start(self, timeout: float = 20.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"retrieval server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    retriever_kind: str = "bm25",
    corpus: str | Path = "wiki",
    cache_dir: str | Path | None = None,
    model: str | Path | None = None,
    default_topk: int = 3,
    max_topk: int = 100,
    max_queries: int = 512,
    max_query_chars: int = 4096,
    log_level: str = "info",
) -> None:
    """Build a local retriever and serve it until interrupted (`megatron-recycle serve-retriever`)."""
    import uvicorn

    from megatron_recycle.agent.retrievers import build_retriever

    if retriever_kind == "http":
        raise ValueError("serve-retriever serves a local index; use retriever_kind 'bm25' or 'dense'")
    limits = ServerLimits(
        default_topk=default_topk, max_topk=max_topk, max_queries=max_queries, max_query_chars=max_query_chars
    )
    if host not in LOOPBACK_HOSTS:
        logger.warning(
            "retrieval server binds %s: it is reachable from other machines and has no authentication",
            host,
        )
    t0 = time.perf_counter()
    retriever = build_retriever(retriever_kind, corpus=corpus, cache_dir=cache_dir, model=model)
    logger.info("%s ready in %.1f s", type(retriever).__name__, time.perf_counter() - t0)
    uvicorn.run(create_app(retriever, limits), host=host, port=port, log_level=log_level)
