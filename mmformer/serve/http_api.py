"""The HTTP/JSON face of the service (FastAPI, run by uvicorn on the same event loop as gRPC).

    GET  /                  the search page (no key needed: a static file; it asks for the key)
    GET  /healthz           alive                                   (no key)
    GET  /readyz            200 when the model and indexes are loaded, 503 otherwise (no key)
    GET  /metrics           Prometheus text format
    GET  /v1/info           model fingerprint, config, indexes, batching
    POST /v1/embed/text     {"texts": [...]} -> {"embeddings": [[...]], "pieces_dropped": [...]}
    POST /v1/embed/image    {"images": [base64, ...]} or one raw image body (Content-Type image/*)
    POST /v1/search         {"text": "..." | "image": base64, "index": NAME, "k": 10}
    GET  /v1/thumbnail/{index}/{id}   a PNG thumbnail of a file the index lists; 404 for anything else

Errors are ``{"error": {"code", "field", "message"}}`` with 400 / 401 / 404 / 413 / 415 / 429 /
503 / 504. With an API key every call but ``/``, ``/healthz`` and ``/readyz`` needs the header
``Authorization: Bearer KEY``. ``X-Timeout-Ms`` (a positive number) sets a deadline: a request
still queued when it passes is dropped before inference (504).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import re
import time
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mmformer.serve.engine import check_unicode, hit_record
from mmformer.serve.errors import Cancelled, InvalidArgument, ServeError, Unauthenticated
from mmformer.serve.service import RetrievalService

log = logging.getLogger(__name__)

PAGE = resources.files("mmformer.serve").joinpath("static/index.html")


class _HttpError(ServeError):
    """An HTTP-only refusal (413, 415) with its own status."""

    def __init__(self, status: int, code: str, message: str, field: str) -> None:
        super().__init__(message, field)
        self.status, self.code = status, code

    @property
    def http_status(self) -> int:
        return self.status


def _error_response(e: ServeError) -> JSONResponse:
    return _ErrorResponse({"error": e.to_dict()}, status_code=e.http_status)


def _b64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"expected a base64 string, got {type(value).__name__}", field)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidArgument(f"not valid base64 ({e})", field) from e


#: A JSON escape of a UTF-16 surrogate (``\ud83d`` of a pair, or a lone ``\ud800``).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, refusing (naming where) what no UTF-8 text holds: bytes
    that are not UTF-8, and strings with a lone surrogate. Nesting deeper than the interpreter's
    recursion limit is refused too."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidArgument(
            f"not valid UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start}; JSON bodies are UTF-8)", "body"
        ) from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise InvalidArgument("JSON nested too deeply (a request needs at most a few levels)", "body") from None
    except ValueError as e:
        raise InvalidArgument(f"malformed JSON ({e})", "body") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"expected a JSON object, got {type(data).__name__}", "body")
    if _SURROGATE_ESCAPE.search(text):
        _check_strings(data)
    return data


def _check_strings(data: dict[str, Any]) -> None:
    """:func:`check_unicode` on every key and string of ``data`` (without recursion), naming a bad
    one by its path (``texts[3]``, ``index``); a dict's keys are checked before its values."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            check_unicode(value, path)
        elif isinstance(value, dict):
            items = []
            for k, v in value.items():
                check_unicode(k, path or "body", "a key")
                items.append((v, f"{path}.{k}" if path else k))
            stack.extend(reversed(items))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(value))))


class _ErrorResponse(JSONResponse):
    """An error as JSON, all ASCII: a message quoting client input can never fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def build_app(service: RetrievalService, *, api_key: str | None = None, max_body_bytes: int = 16 << 20) -> FastAPI:
    app = FastAPI(title="mmformer retrieval", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    expected = f"Bearer {api_key}".encode() if api_key else None
    page = PAGE.read_bytes()

    def authorize(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise Unauthenticated(
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'", "Authorization"
            )

    def deadline(request: Request) -> float | None:
        raw = request.headers.get("x-timeout-ms")
        if raw is None:
            return None
        try:
            ms = float(raw)
        except ValueError:
            ms = math.nan
        if not (math.isfinite(ms) and ms > 0):
            raise InvalidArgument(
                f"expected a finite positive number of milliseconds, got {raw[:40]!r}", "X-Timeout-Ms"
            )
        return time.monotonic() + ms / 1000

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise _HttpError(
                413, "INVALID_ARGUMENT", f"{declared} bytes exceeds the limit of {max_body_bytes} bytes", "body"
            )
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    raise _HttpError(413, "INVALID_ARGUMENT", f"more than the limit of {max_body_bytes} bytes", "body")
                chunks.append(chunk)
        except ClientDisconnect:
            raise Cancelled(f"the client disconnected after {size} bytes of the body", "body") from None
        return b"".join(chunks)

    async def read_json(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise _HttpError(
                415, "INVALID_ARGUMENT", f"expected application/json, got {ctype or 'none'!r}", "Content-Type"
            )
        return parse_json_object(await read_body(request))

    async def handle(name: str, request: Request, body) -> Response:
        try:
            async with service.call(name, "http"):
                authorize(request)
                return await body()
        except Cancelled as e:  # nobody to answer; an ordinary event, not a failure
            log.debug("%s: %s", name, e.message)
            return Response(status_code=e.http_status)
        except ServeError as e:
            return _error_response(e)
        except Exception as e:  # the process keeps serving
            log.exception("%s failed", name)
            return _ErrorResponse(
                {"error": {"code": "INTERNAL", "field": "", "message": f"internal error: {type(e).__name__}"}},
                status_code=500,
            )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "NOT_FOUND", 405: "INVALID_ARGUMENT"}.get(exc.status_code, "INVALID_ARGUMENT")
        return _ErrorResponse(
            {"error": {"code": code, "field": "path", "message": f"path: {request.url.path}: {exc.detail}"}},
            status_code=exc.status_code,
        )

    @app.get("/", include_in_schema=False)
    async def index_page() -> Response:
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        state = "ready" if service.ready else ("draining" if service.draining else "loading")
        return JSONResponse({"status": state}, status_code=200 if service.ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        try:
            authorize(request)
        except ServeError as e:
            return _error_response(e)
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/info")
    async def info(request: Request) -> Response:
        async def body():
            return JSONResponse(service.info())

        return await handle("Info", request, body)

    @app.post("/v1/embed/text")
    async def embed_text(request: Request) -> Response:
        async def body():
            until = deadline(request)
            data = await read_json(request)
            if "texts" not in data:
                raise InvalidArgument("missing (expected a list of strings)", "texts")
            rows, dropped = await service.embed_text(data["texts"], until)
            return JSONResponse({"embeddings": [r.tolist() for r in rows], "pieces_dropped": dropped})

        return await handle("EmbedText", request, body)

    @app.post("/v1/embed/image")
    async def embed_image(request: Request) -> Response:
        async def body():
            until = deadline(request)
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype.startswith("image/"):
                images = [await read_body(request)]
            else:
                data = await read_json(request)
                raw = data.get("images")
                if not isinstance(raw, list):
                    raise InvalidArgument("missing or not a list (expected base64-encoded images)", "images")
                images = [_b64(v, f"images[{i}]") for i, v in enumerate(raw)]
            rows = await service.embed_image(images, until)
            return JSONResponse({"embeddings": [r.tolist() for r in rows]})

        return await handle("EmbedImage", request, body)

    @app.post("/v1/search")
    async def search(request: Request) -> Response:
        async def body():
            until = deadline(request)
            data = await read_json(request)
            unknown = sorted(set(data) - {"text", "image", "index", "k"})
            if unknown:
                raise InvalidArgument("unknown field (expected text, image, index, k)", unknown[0])
            image = _b64(data["image"], "image") if "image" in data else None
            hits, dropped = await service.search(
                text=data.get("text"), image=image, index=data.get("index", ""), k=data.get("k", 10), deadline=until
            )
            return JSONResponse({"hits": [hit_record(h) for h in hits], "pieces_dropped": dropped})

        return await handle("Search", request, body)

    @app.get("/v1/thumbnail/{index}/{item_id:path}")
    async def thumbnail(index: str, item_id: str, request: Request) -> Response:
        try:
            authorize(request)
        except ServeError as e:
            return _error_response(e)
        engine = service.engine
        png = None
        if engine is not None and index in engine.retrievers:
            png = await asyncio.to_thread(engine.thumbnail, index, item_id)
        if png is None:
            return _ErrorResponse(
                {
                    "error": {
                        "code": "NOT_FOUND",
                        "field": "id",
                        "message": f"id: index {index!r} lists no image file {item_id!r}",
                    }
                },
                status_code=404,
            )
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    return app
