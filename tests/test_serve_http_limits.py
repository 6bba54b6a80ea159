"""The HTTP listener's read deadlines and connection limit (``mmformer serve --header-timeout,
--body-timeout, --max-connections``), on loopback with a service in this process: idle clients,
clients trickling their headers or their body, and a kept-alive connection that goes quiet are all
closed within their deadline (408 for a late body); one connection past the limit is answered 503
at once; clients within the deadlines are served."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from serve_helpers import API_KEY, auth, build_gallery, start_service, tiny_model

from mmformer.serve.http_guard import HttpLimits

HEADER_S, BODY_S, MAX_CONNECTIONS = 1.0, 2.0, 40
#: How late a close may come on a loaded machine (the check runs every HEADER_S / 4).
SLACK_S = 2.0


@pytest.fixture(scope="module")
def service(one_thread, tmp_path_factory):
    model = tiny_model()
    index = build_gallery(tmp_path_factory.mktemp("limits"), model)
    thread = start_service(
        model,
        index,
        http_limits=HttpLimits(header_timeout=HEADER_S, body_timeout=BODY_S, max_connections=MAX_CONNECTIONS),
    )
    yield thread.server
    thread.stop()


def closed_count(service, reason: str) -> float:
    return service.service.metrics.http_connections_closed.labels(reason)._value.get()


def open_connections(service) -> int:
    return len(service.uvicorn.server_state.connections)


async def read_until_closed(reader: asyncio.StreamReader, limit_s: float) -> bytes:
    """Everything the server sends until it closes the connection (TimeoutError after ``limit_s``)."""
    got = []

    async def read() -> None:
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return
            if not chunk:
                return
            got.append(chunk)

    await asyncio.wait_for(read(), limit_s)
    return b"".join(got)


async def trickle(writer: asyncio.StreamWriter, data: bytes, every_s: float = 0.1) -> None:
    """Send ``data`` one byte at a time until the server closes the connection."""
    for i in range(len(data)):
        if writer.is_closing():
            return
        writer.write(data[i : i + 1])
        try:
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(every_s)


HEADERS = (
    f"POST /v1/embed/text HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
).encode()


async def client(port: int, kind: str) -> tuple[str, float, bytes]:
    """(kind, seconds from the start of the deadline to the close, bytes received)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    task = None
    if kind == "headers":  # a header block that never ends
        task = asyncio.ensure_future(trickle(writer, HEADERS + b"X-Pad: " + b"a" * 1000))
    elif kind == "body":  # complete headers, then a body far slower than the deadline allows
        writer.write(HEADERS + b'Content-Length: 1000\r\n\r\n{"texts": ["')
        start = time.monotonic()
        task = asyncio.ensure_future(trickle(writer, b"a" * 900))
    elif kind == "kept-alive":  # one answered request, then the next request's headers trickle
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b'"alive"}' not in answer:
            chunk = await asyncio.wait_for(reader.read(65536), 10 * BODY_S)
            assert chunk, answer  # not closed before the answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        start = time.monotonic()
        task = asyncio.ensure_future(trickle(writer, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 100))
    got = await read_until_closed(reader, 10 * BODY_S)
    waited = time.monotonic() - start
    if task is not None:
        task.cancel()
    writer.close()
    return kind, waited, got


def test_idle_and_trickling_clients_are_closed_within_their_deadline(service):
    before = {r: closed_count(service, r) for r in ("header_timeout", "body_timeout")}
    kinds = ["idle"] * 12 + ["headers"] * 6 + ["body"] * 6 + ["kept-alive"] * 3

    async def main():
        return await asyncio.gather(*(client(service.http_port, k) for k in kinds))

    results = asyncio.run(main())
    for kind, waited, got in results:
        deadline = BODY_S if kind == "body" else HEADER_S
        assert deadline * 0.5 <= waited <= deadline + SLACK_S, (kind, waited)
        if kind == "body":
            assert got.startswith(b"HTTP/1.1 408 Request Timeout"), got
            assert b'"field": "body"' in got and b"not received within 2 s of the headers" in got, got
        else:
            assert got == b"", (kind, got)
    assert closed_count(service, "header_timeout") - before["header_timeout"] == 21
    assert closed_count(service, "body_timeout") - before["body_timeout"] == 6
    # the service is still answering, and within the deadlines nothing is cut
    assert httpx.get(f"http://127.0.0.1:{service.http_port}/readyz").status_code == 200


def test_a_body_sent_slowly_within_the_deadline_is_served(service):
    body = b'{"texts": ["a red square"]}'

    def chunks():
        for i in range(0, len(body), 9):
            time.sleep(BODY_S / 8)
            yield body[i : i + 9]

    r = httpx.post(
        f"http://127.0.0.1:{service.http_port}/v1/embed/text",
        content=chunks(),
        headers={**auth(), "Content-Type": "application/json", "Content-Length": str(len(body))},
    )
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 1


def test_one_connection_past_the_limit_is_refused_at_once(service):
    before = closed_count(service, "connection_limit")

    async def main():
        held = [await asyncio.open_connection("127.0.0.1", service.http_port) for _ in range(MAX_CONNECTIONS)]
        end = time.monotonic() + HEADER_S / 2  # all accepted before the first would time out
        while open_connections(service) < MAX_CONNECTIONS:
            assert time.monotonic() < end, open_connections(service)
            await asyncio.sleep(0.005)
        reader, writer = await asyncio.open_connection("127.0.0.1", service.http_port)
        start = time.monotonic()
        refused = await read_until_closed(reader, SLACK_S)
        refused_after = time.monotonic() - start
        writer.close()
        for _, w in held:
            w.close()
        return refused, refused_after

    refused, refused_after = asyncio.run(main())
    assert refused.startswith(b"HTTP/1.1 503 Service Unavailable"), refused
    assert b"more than 40 open connections" in refused and refused_after < HEADER_S
    assert closed_count(service, "connection_limit") == before + 1
    end = time.monotonic() + HEADER_S + SLACK_S  # the held ones are gone; new clients are served
    while open_connections(service) and time.monotonic() < end:
        time.sleep(0.05)
    metrics = httpx.get(f"http://127.0.0.1:{service.http_port}/metrics", headers=auth())
    assert metrics.status_code == 200
    assert 'mmformer_http_connections_closed_total{reason="connection_limit"}' in metrics.text
