"""DynamicBatcher on its own, with a recording batch function instead of a model: when batches
leave (full, or the oldest input's max_delay), order of results across split requests,
back-pressure, deadlines and cancellation, --no-batching, and an event loop that never blocks."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mmformer.serve.batcher import DynamicBatcher
from mmformer.serve.errors import DeadlineExceeded, QueueFull, Unavailable
from mmformer.serve.metrics import ServeMetrics


class Recorder:
    """Batch function: records each batch, optionally blocks until released, returns x * 10."""

    def __init__(self, sleep: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.sleep = sleep
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, items):
        self.started.set()
        self.gate.wait(10)
        if self.sleep:
            time.sleep(self.sleep)
        self.batches.append(list(items))
        return [x * 10 for x in items]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


@pytest.fixture()
def executor():
    ex = ThreadPoolExecutor(max_workers=1)
    yield ex
    ex.shutdown(wait=True)


def test_full_batch_leaves_at_once_and_split_requests_come_back_in_order(executor):
    rec = Recorder()

    async def main():
        b = DynamicBatcher("t", rec, executor, max_batch_size=4, max_delay_ms=10_000)
        b.start()
        start = time.monotonic()
        # 3 requests of 3, 2, 3 inputs = 8 inputs = two full batches of 4; never waits 10 s
        outs = await asyncio.gather(b.submit([1, 2, 3]), b.submit([4, 5]), b.submit([6, 7, 8]))
        elapsed = time.monotonic() - start
        await b.close()
        return outs, elapsed

    outs, elapsed = run(main())
    assert outs == [[10, 20, 30], [40, 50], [60, 70, 80]]
    assert rec.batches == [[1, 2, 3, 4], [5, 6, 7, 8]]  # the second request was split across both
    assert elapsed < 5


def test_partial_batch_leaves_when_the_oldest_input_has_waited_max_delay(executor):
    rec = Recorder()

    async def main():
        b = DynamicBatcher("t", rec, executor, max_batch_size=64, max_delay_ms=300)
        b.start()
        t0 = time.monotonic()
        first = asyncio.ensure_future(b.submit([1]))
        await asyncio.sleep(0.2)
        second = asyncio.ensure_future(b.submit([2]))  # arrives 200 ms later: must not restart the clock
        out = await asyncio.gather(first, second)
        t_done = time.monotonic() - t0
        await b.close()
        return out, t_done

    out, t_done = run(main())
    assert out == [[10], [20]] and rec.batches == [[1, 2]]
    # measured from the first request's arrival (300 ms), not the second's (which would be 500 ms)
    assert 0.29 <= t_done < 0.48


def test_queue_full_is_refused_at_once_with_a_message(executor):
    rec = Recorder()
    rec.gate.clear()  # the model is busy: nothing leaves the queue

    async def main():
        metrics = ServeMetrics()
        b = DynamicBatcher("t", rec, executor, max_batch_size=2, max_delay_ms=0, max_queue=3, metrics=metrics)
        b.start()
        first = asyncio.ensure_future(b.submit([1, 2]))  # taken into the running batch
        while not rec.started.is_set():
            await asyncio.sleep(0.005)
        queued = asyncio.ensure_future(b.submit([3, 4, 5]))  # fills the queue (3)
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(QueueFull, match="queue is full .*max_queue=3"):
            await b.submit([6])
        refused_in = time.monotonic() - t0
        rec.gate.set()
        out = await asyncio.gather(first, queued)
        await b.close()
        return out, refused_in, metrics.refused.labels("t")._value.get()

    out, refused_in, refused = run(main())
    assert out == [[10, 20], [30, 40, 50]] and refused_in < 0.1 and refused == 1


def test_expired_and_cancelled_requests_are_dropped_before_inference(executor):
    rec = Recorder()
    rec.gate.clear()

    async def main():
        b = DynamicBatcher("t", rec, executor, max_batch_size=8, max_delay_ms=0)
        b.start()
        busy = asyncio.ensure_future(b.submit([1]))
        while not rec.started.is_set():
            await asyncio.sleep(0.005)
        expiring = asyncio.ensure_future(b.submit([2, 3], deadline=time.monotonic() + 0.05))
        cancelled = asyncio.ensure_future(b.submit([4]))
        kept = asyncio.ensure_future(b.submit([5], deadline=time.monotonic() + 30))
        await asyncio.sleep(0.1)  # the deadline passes while queued
        cancelled.cancel()
        rec.gate.set()
        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            await expiring
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        out = await asyncio.gather(busy, kept)
        await b.close()
        return out

    assert run(main()) == [[10], [50]]
    assert rec.batches == [[1], [5]]  # 2, 3 (expired) and 4 (cancelled) never reached the model


def test_no_batching_runs_every_request_alone(executor):
    rec = Recorder()

    async def main():
        b = DynamicBatcher("t", rec, executor, max_batch_size=64, max_delay_ms=50, enabled=False)
        b.start()
        out = await asyncio.gather(*(b.submit([i, i + 100]) for i in range(5)))
        await b.close()
        return out

    assert run(main()) == [[i * 10, (i + 100) * 10] for i in range(5)]
    assert sorted(rec.batches) == [[i, i + 100] for i in range(5)]


def test_the_event_loop_keeps_running_while_the_model_works(executor):
    rec = Recorder(sleep=0.3)

    async def main():
        b = DynamicBatcher("t", rec, executor, max_batch_size=1, max_delay_ms=0)
        b.start()
        ticks = 0

        async def heartbeat():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        hb = asyncio.ensure_future(heartbeat())
        await b.submit([1])
        hb.cancel()
        await b.close()
        return ticks

    assert run(main()) >= 10  # a blocked loop would have ticked about once in the 300 ms


def test_close_answers_queued_requests_then_refuses_new_ones(executor):
    rec = Recorder(sleep=0.05)

    async def main():
        b = DynamicBatcher("t", rec, executor, max_batch_size=2, max_delay_ms=1000)
        b.start()
        pending = [asyncio.ensure_future(b.submit([i])) for i in range(5)]
        await asyncio.sleep(0)
        await b.close()  # does not wait the 1 s delay: drains at once
        with pytest.raises(Unavailable, match="shutting down"):
            await b.submit([9])
        return [p.result() for p in pending]

    assert run(main()) == [[0], [10], [20], [30], [40]]


def test_a_failing_batch_fails_its_requests_and_the_next_batch_works(executor):
    calls = []

    def flaky(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [x + 1 for x in items]

    async def main():
        b = DynamicBatcher("t", flaky, executor, max_batch_size=8, max_delay_ms=0)
        b.start()
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit([1])
        out = await b.submit([2])
        await b.close()
        return out

    assert run(main()) == [3]
