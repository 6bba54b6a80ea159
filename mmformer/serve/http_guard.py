"""Read deadlines and a connection limit for the HTTP listener, so idle or trickling clients cannot
hold connections open (uvicorn's keep-alive timeout covers only the wait between two requests, and
a client that sends one byte at a time resets it).

- headers: a connection must deliver a complete request header block within ``header_timeout``
  seconds of opening, or of the end of its previous response; else it is closed;
- body: a request's body must arrive within ``body_timeout`` seconds of its headers; else the
  client gets 408 (if nothing was answered yet) and the connection is closed;
- connections: a connection that would be one more than ``max_connections`` open ones is answered
  503 and closed at once.

The time the service itself takes to answer is not limited here (``X-Timeout-Ms`` does that).
:meth:`HttpGuard.protocol_class` subclasses the uvicorn HTTP protocol (h11 or httptools) to count
connections and mark when each waits for headers; :meth:`HttpGuard.run` looks at every open
connection a few times per deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from mmformer.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

#: At most one "connection limit reached" warning in this many seconds.
LIMIT_WARNING_EVERY_S = 60.0


@dataclass
class HttpLimits:
    """Deadlines (seconds) and the connection limit of the HTTP listener (see the module doc)."""

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 1000

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if (
            isinstance(self.max_connections, bool)
            or not isinstance(self.max_connections, int)
            or self.max_connections < 1
        ):
            raise ValueError(f"max_connections must be a positive integer, got {self.max_connections!r}")


def _response(status: int, reason: str, code: str, field: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "field": field, "message": f"{field}: {message}"}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n\r\n"
    ).encode()
    return head + body


class HttpGuard:
    """Enforces :class:`HttpLimits` on the connections of one uvicorn server."""

    def __init__(self, limits: HttpLimits, metrics: ServeMetrics | None = None) -> None:
        self.limits = limits
        self.metrics = metrics
        self._last_limit_warning = -LIMIT_WARNING_EVERY_S
        self._busy = _response(
            503,
            "Service Unavailable",
            "UNAVAILABLE",
            "connection",
            f"more than {limits.max_connections} open connections; retry later",
        )
        self._late_body = _response(
            408,
            "Request Timeout",
            "DEADLINE_EXCEEDED",
            "body",
            f"not received within {limits.body_timeout:g} s of the headers",
        )

    def protocol_class(self, base: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
        """``base`` (a uvicorn HTTP protocol class) that counts connections and marks when each
        starts waiting for request headers."""
        guard = self

        class Guarded(base):  # type: ignore[valid-type, misc]
            def connection_made(self, transport) -> None:
                super().connection_made(transport)
                self.mmformer_phase = ("headers", None)
                self.mmformer_since = time.monotonic()
                if len(self.connections) > guard.limits.max_connections:
                    guard.refuse(self)

            def on_response_complete(self) -> None:
                super().on_response_complete()
                self.mmformer_phase = ("headers", self.cycle)
                self.mmformer_since = time.monotonic()

        Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
        return Guarded

    def refuse(self, protocol: Any) -> None:
        protocol.transport.write(self._busy)
        protocol.transport.close()
        self._count("connection_limit")
        now = time.monotonic()
        if now - self._last_limit_warning >= LIMIT_WARNING_EVERY_S:
            self._last_limit_warning = now
            log.warning(
                "HTTP: %d connections open, the limit (--max-connections): refusing new ones with 503",
                self.limits.max_connections,
            )

    def check(self, connections: set[Any], now: float | None = None) -> None:
        """Close every connection past its deadline."""
        now = time.monotonic() if now is None else now
        for protocol in list(connections):
            if not hasattr(protocol, "mmformer_phase") or protocol.transport.is_closing():
                continue
            cycle = protocol.cycle
            if cycle is None or cycle.response_complete:
                phase = ("headers", cycle)
            elif cycle.more_body:
                phase = ("body", cycle)
            else:  # the request is read; the service is answering it
                phase = ("answer", cycle)
            if phase != protocol.mmformer_phase:
                protocol.mmformer_phase, protocol.mmformer_since = phase, now
                continue
            waited = now - protocol.mmformer_since
            if phase[0] == "headers" and waited > self.limits.header_timeout:
                log.debug(
                    "HTTP %s: closed, no complete request headers within %g s",
                    _peer(protocol),
                    self.limits.header_timeout,
                )
                protocol.transport.close()
                self._count("header_timeout")
            elif phase[0] == "body" and waited > self.limits.body_timeout:
                log.debug(
                    "HTTP %s: closed, the body did not arrive within %g s", _peer(protocol), self.limits.body_timeout
                )
                if not cycle.response_started:
                    protocol.transport.write(self._late_body)
                protocol.transport.close()
                self._count("body_timeout")
        if self.metrics is not None:
            self.metrics.http_connections.set(len(connections))

    async def run(self, connections: set[Any]) -> None:
        """:meth:`check` every quarter of the shorter deadline (between 0.05 and 1 s), until cancelled."""
        period = min(max(min(self.limits.header_timeout, self.limits.body_timeout) / 4, 0.05), 1.0)
        reported = False
        while True:
            await asyncio.sleep(period)
            try:
                self.check(connections)
            except Exception:  # e.g. uvicorn's protocol changed; serving goes on, said once
                if not reported:
                    log.exception("HTTP deadline check failed: slow clients are not being closed")
                    reported = True

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.http_connections_closed.labels(reason).inc()


def _peer(protocol: Any) -> str:
    client = getattr(protocol, "client", None)
    return f"{client[0]}:{client[1]}" if client else "client"
