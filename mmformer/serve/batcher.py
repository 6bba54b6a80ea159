"""Dynamic batching: requests of one input kind merged into model calls.

A :class:`DynamicBatcher` holds one queue of inputs. A request with several inputs puts each
into the queue (so they may travel in different batches) and gets its results back in order.
A batch leaves when it holds ``max_batch_size`` inputs or when the OLDEST input in the queue has
waited ``max_delay_ms`` since its request arrived. The batch function runs in ``executor`` (one
model thread), so the event loop never blocks; while it runs, the next batch gathers.

Back-pressure: past ``max_queue`` queued inputs a request is refused at once
(:class:`~mmformer.serve.errors.QueueFull`). Inputs of a request whose deadline has passed, or that
was cancelled, are dropped before inference. ``enabled=False`` runs every request alone (one
model call per request), for comparison.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from mmformer.serve.errors import DeadlineExceeded, QueueFull, Unavailable
from mmformer.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    future: asyncio.Future
    arrival: float
    deadline: float | None
    results: list[Any]
    remaining: int
    expired: bool = False


@dataclass(eq=False)
class _Entry:
    request: _Request
    position: int
    item: Any = field(repr=False)


class DynamicBatcher:
    """Merge inputs of concurrent requests into calls of ``run_batch(items) -> results``."""

    def __init__(
        self,
        kind: str,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        executor: Executor | None,
        *,
        max_batch_size: int = 64,
        max_delay_ms: float = 2.0,
        max_queue: int = 1024,
        enabled: bool = True,
        metrics: ServeMetrics | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_delay_ms < 0:
            raise ValueError(
                f"need max_batch_size >= 1, max_queue >= 1, max_delay_ms >= 0; got "
                f"{max_batch_size}, {max_queue}, {max_delay_ms}"
            )
        self.kind, self.run_batch, self.executor = kind, run_batch, executor
        self.max_batch_size, self.max_delay, self.max_queue = max_batch_size, max_delay_ms / 1000, max_queue
        self.enabled, self.metrics = enabled, metrics
        self._queue: deque[_Entry] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        """Inputs waiting (not yet taken into a batch)."""
        return len(self._queue)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.kind}")

    async def close(self) -> None:
        """Refuse new requests, answer every queued one, then stop."""
        self._closing = True
        if self._task is not None:
            self._wakeup.set()
            await self._task

    async def submit(self, items: Sequence[Any], deadline: float | None = None) -> list[Any]:
        """Queue ``items``; returns their results in order. ``deadline``: ``time.monotonic()`` value."""
        if self._closing or self._task is None:
            raise Unavailable("the service is shutting down" if self._closing else "the batcher is not running")
        if not items:
            return []
        if self.depth + len(items) > self.max_queue:
            if self.metrics:
                self.metrics.refused.labels(self.kind).inc(len(items))
            raise QueueFull(
                f"the {self.kind} queue is full ({self.depth} inputs waiting, max_queue={self.max_queue}); retry later"
            )
        loop = asyncio.get_running_loop()
        req = _Request(loop.create_future(), time.monotonic(), deadline, [None] * len(items), len(items))
        self._queue.extend(_Entry(req, i, item) for i, item in enumerate(items))
        self._gauge()
        self._wakeup.set()
        # cancelling the caller cancels the future: its inputs are then skipped
        if deadline is None:
            return await req.future
        try:
            return await asyncio.wait_for(req.future, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:  # answered at the deadline; inputs still queued are skipped
            req.expired = True
            raise DeadlineExceeded("the deadline passed while the request was queued") from None

    # ---- the loop -----------------------------------------------------------------------------
    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(self.kind).set(len(self._queue))

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.enabled:
                await self._gather()
            batch = self._take()
            self._gauge()
            live = self._drop_dead(batch)
            if live:
                await self._execute(live)

    async def _gather(self) -> None:
        """Wait until the queue holds a full batch or its oldest input has waited max_delay."""
        oldest = self._queue[0].request.arrival
        while len(self._queue) < self.max_batch_size and not self._closing:
            remaining = oldest + self.max_delay - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Entry]:
        q = self._queue
        if self.enabled:
            n = min(self.max_batch_size, len(q))
        else:  # every request alone: the inputs of the first request in the queue
            first = q[0].request
            n = next((i for i, e in enumerate(q) if e.request is not first), len(q))
        return [q.popleft() for _ in range(n)]

    def _drop_dead(self, batch: list[_Entry]) -> list[_Entry]:
        now = time.monotonic()
        live = []
        for e in batch:
            req = e.request
            if req.future.done():  # cancelled by its caller or its deadline, or failed with an earlier batch
                self._count_drop("deadline" if req.expired else "cancelled")
            elif req.deadline is not None and now >= req.deadline:
                req.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
                self._count_drop("deadline")
            else:
                live.append(e)
        return live

    def _count_drop(self, reason: str) -> None:
        if self.metrics:
            self.metrics.dropped.labels(self.kind, reason).inc()

    async def _execute(self, live: list[_Entry]) -> None:
        start = time.monotonic()
        if self.metrics:
            self.metrics.batch_size.labels(self.kind).observe(len(live))
            for e in live:
                self.metrics.queue_wait.labels(self.kind).observe(start - e.request.arrival)
        items = [e.item for e in live]
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self.executor, self.run_batch, items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} inputs")
        except Exception as err:  # the whole batch failed: every request in it gets the error
            log.exception("%s batch of %d failed", self.kind, len(items))
            for e in live:
                if not e.request.future.done():
                    e.request.future.set_exception(err)
            return
        finally:
            if self.metrics:
                self.metrics.model_time.labels(self.kind).observe(time.monotonic() - start)
        for e, out in zip(live, results):
            req = e.request
            if req.future.done():
                continue
            req.results[e.position] = out
            req.remaining -= 1
            if req.remaining == 0:
                req.future.set_result(req.results)
