"""The calls of the service (EmbedText, EmbedImage, Search, Info), shared by gRPC and HTTP.

:class:`RetrievalService` owns the two batchers (texts, images), the image decoding pool
(:class:`~mmformer.serve.decode.DecodePool`) and the model thread, counts
requests in flight (so SIGTERM can drain them), and refuses work until the engine is loaded
and after draining starts. Transports call :meth:`call` around each request for the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmformer.retrieval import Hit
from mmformer.serve.batcher import DynamicBatcher
from mmformer.serve.decode import DecodePool
from mmformer.serve.engine import Engine
from mmformer.serve.errors import InvalidArgument, ServeError, Unavailable
from mmformer.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

#: Indexes up to this many rows are searched on the event loop (microseconds); larger ones in a thread.
INLINE_SEARCH_ROWS = 20_000


@dataclass
class BatchSettings:
    enabled: bool = True
    max_batch_size: int = 64
    max_delay_ms: float = 2.0
    max_queue: int = 1024


class RetrievalService:
    """Embed and search through dynamic batchers; ``engine`` may be set later (:meth:`set_engine`)."""

    def __init__(self, batching: BatchSettings | None = None, metrics: ServeMetrics | None = None) -> None:
        self.batching = batching or BatchSettings()
        self.metrics = metrics or ServeMetrics()
        self.engine: Engine | None = None
        self.draining = False
        self.in_flight = 0
        self._idle: asyncio.Event | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmformer-model")
        self.text_batcher: DynamicBatcher | None = None
        self.image_batcher: DynamicBatcher | None = None
        self.decoder: DecodePool | None = None

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def set_engine(self, engine: Engine, decoder: DecodePool | None = None) -> None:
        """Start the batchers on the running loop; the service is ready from now on. ``decoder``
        decodes uploaded images (default: in this process, no worker processes)."""
        b = self.batching
        self.decoder = decoder or DecodePool(engine.decode_spec, workers=0, max_pending=b.max_queue)
        kw = dict(
            max_batch_size=b.max_batch_size,
            max_delay_ms=b.max_delay_ms,
            max_queue=b.max_queue,
            enabled=b.enabled,
            metrics=self.metrics,
        )
        self.text_batcher = DynamicBatcher("text", engine.encode_text_batch, self._executor, **kw)
        self.image_batcher = DynamicBatcher("image", engine.encode_image_batch, self._executor, **kw)
        self.text_batcher.start()
        self.image_batcher.start()
        self.engine = engine

    # ---- request accounting -------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def call(self, name: str, transport: str) -> AsyncIterator[dict[str, str]]:
        """Count one request; the body sets ``status["code"]`` only through raised ServeErrors."""
        start = time.monotonic()
        status = {"code": "OK"}
        self.in_flight += 1
        try:
            yield status
        except ServeError as e:
            status["code"] = e.code
            raise
        except asyncio.CancelledError:
            status["code"] = "CANCELLED"
            raise
        except Exception:
            status["code"] = "INTERNAL"
            raise
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self._idle is not None:
                self._idle.set()
            self.metrics.observe_request(name, transport, status["code"], time.monotonic() - start)

    def _engine(self) -> Engine:
        if self.draining:
            raise Unavailable("the service is shutting down (draining after SIGTERM)")
        if self.engine is None:
            raise Unavailable("the model and indexes are still loading; retry in a moment")
        return self.engine

    async def drain(self, timeout: float = 30.0) -> None:
        """Refuse new requests, wait (up to ``timeout`` s) for those in flight, stop the batchers."""
        self.draining = True
        if self.in_flight:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("drain: %d request(s) still in flight after %.0f s", self.in_flight, timeout)
        for b in (self.text_batcher, self.image_batcher):
            if b is not None:
                await b.close()
        if self.decoder is not None:
            await asyncio.to_thread(self.decoder.close)
        self._executor.shutdown(wait=True)

    # ---- calls --------------------------------------------------------------------------------
    async def embed_text(self, texts: Any, deadline: float | None = None) -> tuple[list[np.ndarray], list[int]]:
        """(embeddings, pieces dropped per text)."""
        engine = self._engine()
        inputs = engine.prepare_texts(texts)
        out = await self.text_batcher.submit(inputs, deadline)
        return out, [t.dropped for t in inputs]

    async def embed_image(self, images: Any, deadline: float | None = None) -> list[np.ndarray]:
        engine = self._engine()
        engine.check_images(images)
        tensors = await self.decoder.decode(images, "images", max_bytes=engine.limits.max_image_bytes)
        return await self.image_batcher.submit(tensors, deadline)

    async def search(
        self, *, text: Any = None, image: Any = None, index: Any = "", k: Any = 10, deadline: float | None = None
    ) -> tuple[list[Hit], int]:
        """(hits, pieces dropped from the text query) for exactly one of ``text`` / ``image``."""
        engine = self._engine()
        if not isinstance(index, str):
            raise InvalidArgument(f"expected an index name (string), got {type(index).__name__}", "index")
        name = engine.resolve_index(index)
        k = engine.check_k(name, k)
        if (text is None) == (image is None):
            raise InvalidArgument("give exactly one query: text or image", "text" if text is None else "image")
        dropped = 0
        if text is not None:
            t = engine.prepare_text(text, "text")
            dropped = t.dropped
            [emb] = await self.text_batcher.submit([t], deadline)
        else:
            [x] = await self.decoder.decode([image], "image", indexed=False, max_bytes=engine.limits.max_image_bytes)
            [emb] = await self.image_batcher.submit([x], deadline)
        if len(engine.retrievers[name].index) <= INLINE_SEARCH_ROWS:
            hits = engine.search(name, emb, k)
        else:
            hits = await asyncio.to_thread(engine.search, name, emb, k)
        return hits, dropped

    def info(self) -> dict[str, Any]:
        engine = self._engine()
        b = self.batching
        return {
            **engine.info(),
            "batching": {
                "enabled": b.enabled,
                "max_batch_size": b.max_batch_size,
                "max_delay_ms": b.max_delay_ms,
                "max_queue": b.max_queue,
            },
        }
