"""One process, one event loop: the gRPC server, the HTTP server and the batchers.

:class:`Server` starts both listeners first (health NOT_SERVING, ``/readyz`` 503), loads the model
and indexes in a thread and starts the image decoding processes, then turns ready.
:meth:`Server.drain` (called on SIGTERM / SIGINT by :func:`run`) stops accepting work, answers
everything in flight, stops the decoding processes, then closes both listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmformer.serve.decode import DecodePool
from mmformer.serve.engine import Engine, Limits
from mmformer.serve.grpc_api import build_grpc_server, set_health
from mmformer.serve.http_api import build_app
from mmformer.serve.http_guard import HttpGuard, HttpLimits
from mmformer.serve.options import API_KEY_ENV
from mmformer.serve.service import BatchSettings, RetrievalService

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    """Everything ``mmformer serve`` takes (see :mod:`mmformer.serve.commands`)."""

    model: str | None = None
    indexes: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8000
    precision: str = "fp32"
    device: str = "cpu"
    batching: BatchSettings = field(default_factory=BatchSettings)
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_bytes: int = 16 << 20
    threads: int | None = None
    drain_seconds: float = 30.0
    http_limits: HttpLimits = field(default_factory=HttpLimits)
    decode_workers: int | None = None  # image decoding processes; None: from the CPU count, 0: in this process


class Server:
    """Both listeners around one :class:`RetrievalService`. ``engine_factory`` replaces loading
    ``settings.model`` (tests hand in a model built in memory)."""

    def __init__(self, settings: ServeSettings, engine_factory: Callable[[], Engine] | None = None) -> None:
        self.settings = settings
        self.engine_factory = engine_factory or (
            lambda: Engine.load(
                settings.model,
                settings.indexes,
                precision=settings.precision,
                device=settings.device,
                limits=settings.limits,
            )
        )
        self.service = RetrievalService(settings.batching)
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self.loaded = asyncio.Event()
        self.load_error: BaseException | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        s = self.settings
        if s.threads:
            torch.set_num_threads(s.threads)
        tls = None
        if s.tls_cert or s.tls_key:
            if not (s.tls_cert and s.tls_key):
                raise ValueError("TLS needs both --tls-cert and --tls-key")
            tls = (Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())
        self.grpc, self.health, self.grpc_port = build_grpc_server(
            self.service, s.host, s.grpc_port, api_key=s.api_key, tls=tls, max_message_bytes=s.max_message_bytes
        )
        await set_health(self.health, False)
        await self.grpc.start()
        await self._start_http(tls)
        log.info("listening: gRPC %s:%d, HTTP %s:%d; loading the model", s.host, self.grpc_port, s.host, self.http_port)
        self._loader = asyncio.get_running_loop().create_task(self._load())

    async def _start_http(self, tls) -> None:
        import uvicorn
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        s = self.settings
        app = build_app(self.service, api_key=s.api_key, max_body_bytes=s.max_message_bytes)
        guard = HttpGuard(s.http_limits, self.service.metrics)
        config = uvicorn.Config(
            app,
            host=s.host,
            port=s.http_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=s.tls_cert if tls else None,
            ssl_keyfile=s.tls_key if tls else None,
            timeout_graceful_shutdown=5,
            http=guard.protocol_class(AutoHTTPProtocol),
        )
        self.uvicorn = uvicorn.Server(config)
        config.load()
        self.uvicorn.lifespan = config.lifespan_class(config)
        try:
            await self.uvicorn.startup()
        except SystemExit:  # uvicorn exits when it cannot bind
            self.uvicorn.started = False
        if not self.uvicorn.started:
            await self.grpc.stop(None)
            raise OSError(f"cannot bind the HTTP port {s.host}:{s.http_port} (in use? choose another with --http-port)")
        self.http_port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        self._http_loop = loop.create_task(self.uvicorn.main_loop())
        self._http_guard = loop.create_task(guard.run(self.uvicorn.server_state.connections))

    async def _load(self) -> None:
        try:
            engine = await asyncio.to_thread(self.engine_factory)
            decoder = DecodePool(
                engine.decode_spec, self.settings.decode_workers, max_pending=self.settings.batching.max_queue
            )
            try:
                await asyncio.to_thread(decoder.warm)
            except BaseException:
                await asyncio.to_thread(decoder.close)
                raise
        except BaseException as e:  # reported by wait_loaded / run; the listeners keep answering 503
            log.error("loading failed: %s", e)
            self.load_error = e
            self.loaded.set()
            return
        self.service.set_engine(engine, decoder)
        await set_health(self.health, True)
        self.loaded.set()
        log.info(
            "ready: %s", ", ".join(f"{n} ({len(r.index)} rows)" for n, r in engine.retrievers.items()) or "no index"
        )

    async def wait_loaded(self) -> None:
        await self.loaded.wait()
        if self.load_error is not None:
            raise self.load_error

    async def drain(self) -> None:
        """No new requests, in-flight ones answered, then both listeners closed."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("draining: %d request(s) in flight", self.service.in_flight)
        await set_health(self.health, False)
        await self.service.drain(self.settings.drain_seconds)
        await self.grpc.stop(grace=1.0)
        self.uvicorn.should_exit = True
        await self._http_loop
        await self.uvicorn.shutdown()
        self._http_guard.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._http_guard
        if not self._loader.done():
            self._loader.cancel()


async def serve_until_signal(settings: ServeSettings, on_ready: Callable[[Server], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    server = Server(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = loop.create_task(stop.wait())
    loaded = loop.create_task(server.wait_loaded())
    await asyncio.wait({waiter, loaded}, return_when=asyncio.FIRST_COMPLETED)
    if loaded.done() and loaded.exception() is not None:
        await server.drain()
        raise loaded.exception()
    if loaded.done() and on_ready is not None:
        on_ready(server)
    await waiter
    await server.drain()
    if not loaded.done():
        loaded.cancel()


class ServerThread:
    """A :class:`Server` on its own event loop in a daemon thread (tests, notebooks)."""

    def __init__(self, settings: ServeSettings, engine_factory: Callable[[], Engine] | None = None) -> None:
        self.settings, self.engine_factory = settings, engine_factory
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mmformer-serve", daemon=True)

    def start(self, timeout: float = 60.0, wait_loaded: bool = True) -> Server:
        """Start listening; with ``wait_loaded`` also wait until the model is loaded (or failed)."""
        self.thread.start()
        self.server = Server(self.settings, self.engine_factory)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout)
        if wait_loaded:
            self.wait_loaded(timeout)
        return self.server

    def wait_loaded(self, timeout: float = 60.0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.wait_loaded(), self.loop).result(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.drain(), self.loop).result(timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)


def api_key_from(value: str | None) -> str | None:
    """``--api-key`` or, without it, ``$MMFORMER_API_KEY`` (empty = no key)."""
    return value or os.environ.get(API_KEY_ENV) or None
