"""Image decoding off the event loop: encoded bytes -> a (3, S, S) uint8 tensor in worker processes.

The event loop and the model thread share one GIL; decoding a PNG and resizing it holds the GIL for
a large part of its time, so decoding on the loop (or in a thread) slows the model down. A
:class:`DecodePool` decodes in a ``ProcessPoolExecutor`` (forkserver context where the platform has
one, else spawn) and hands back uint8 arrays: the eval transform up to its centre crop
(:func:`geometry_transform`); the model thread normalises the whole batch
(:class:`~mmformer.data.transforms.BatchNormalize`), which gives the same floats as the full eval
transform of each image.

The pool is bounded: past ``max_pending`` images waiting for a worker a request is refused with
:class:`~mmformer.serve.errors.QueueFull`, as the batchers refuse a full queue. The pixel cap
(``max_pixels``, read from the header before any decoding) applies inside the workers. A worker
that dies (killed, out of memory) fails the requests it was decoding with
:class:`~mmformer.serve.errors.Unavailable` (no transparent retry: the image may be what killed it)
and the pool is rebuilt for the next ones. ``workers=0`` decodes in this process (small images on
the event loop, larger ones in a thread).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torchvision.transforms import v2

from mmformer.data.errors import CorruptSample
from mmformer.data.transforms import CapAspect, load_image
from mmformer.serve.errors import InvalidArgument, QueueFull, Unavailable

log = logging.getLogger(__name__)

#: With ``workers=0``: encoded images up to this size are decoded on the event loop (a 64x64 PNG takes
#: well under a millisecond, less than a hop to a thread); larger ones in a thread.
INLINE_DECODE_BYTES = 16 << 10
#: Most worker processes chosen by default (more rarely help: the model thread needs a core too).
MAX_DEFAULT_WORKERS = 8

#: ``<_io.BytesIO object at 0x7f...>`` and the like, which decoders put in their messages.
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def default_workers() -> int:
    """Decode processes for this machine: the usable CPUs but one (the model thread's), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus - 1, MAX_DEFAULT_WORKERS))


def geometry_transform(image_size: int) -> v2.Compose:
    """The eval transform of :func:`~mmformer.data.transforms.build_transforms` without its float
    steps: ``PIL.Image`` -> (3, S, S) uint8 (aspect cap, resize of the short side, centre crop)."""
    return v2.Compose(
        [v2.ToImage(), CapAspect(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), v2.ToPureTensor()]
    )


@dataclass(frozen=True)
class DecodeSpec:
    """What a worker needs to turn bytes into pixels (picklable: sent once to each worker)."""

    image_size: int
    max_pixels: int | None


def decode_reason(e: CorruptSample) -> str:
    """Why an uploaded image could not be read, in words about the upload (no object reprs)."""
    if isinstance(e.__cause__, UnidentifiedImageError):
        return "format not recognized"
    return _OBJECT_REPR.sub("the upload", e.reason)


def decode_one(data: bytes, spec: DecodeSpec, transform=None) -> torch.Tensor | str:
    """Encoded bytes -> (3, S, S) uint8 tensor, or the reason (a string) they are not a readable image."""
    try:
        image = load_image(data, max_pixels=spec.max_pixels, name="upload")
    except CorruptSample as e:
        return decode_reason(e)
    return (transform or geometry_transform(spec.image_size))(image)


# ---- in the worker processes --------------------------------------------------------------------
_worker: dict[str, Any] = {}


def _init_worker(spec: DecodeSpec) -> None:
    torch.set_num_threads(1)  # one process per core: no intra-op threads fighting over it
    _worker["spec"], _worker["transform"] = spec, geometry_transform(spec.image_size)


def _decode_in_worker(items: Sequence[bytes]) -> list[np.ndarray | str]:
    """A request's images -> uint8 (3, S, S) arrays (pickled back plainly) or reasons."""
    out = []
    for data in items:
        r = decode_one(data, _worker["spec"], _worker["transform"])
        out.append(r if isinstance(r, str) else r.numpy())
    return out


def _worker_pid() -> int:
    return os.getpid()


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # the fork server imports these once; each worker forked from it starts without importing torch again
        ctx.set_forkserver_preload(["mmformer.serve.decode"])
        return ctx
    return multiprocessing.get_context("spawn")


class DecodePool:
    """Decode uploads in ``workers`` processes (0: in this process), at most ``max_pending`` images
    waiting for a worker."""

    def __init__(self, spec: DecodeSpec, workers: int | None = None, max_pending: int = 1024) -> None:
        workers = default_workers() if workers is None else workers
        if workers < 0 or max_pending < 1:
            raise ValueError(f"need workers >= 0 and max_pending >= 1, got {workers}, {max_pending}")
        self.spec, self.workers, self.max_pending = spec, workers, max_pending
        self.pending = 0
        self.restarts = 0
        self._transform = geometry_transform(spec.image_size)
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    # ---- lifecycle ----------------------------------------------------------------------------
    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise Unavailable("the service is shutting down")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.workers, mp_context=_context(), initializer=_init_worker, initargs=(self.spec,)
                )
            return self._pool

    def warm(self, timeout: float = 120.0) -> list[int]:
        """Start every worker now (blocking; call it from a thread): the pids of the workers."""
        if not self.workers:
            return []
        pool = self._executor()
        futures = [pool.submit(_worker_pid) for _ in range(self.workers)]
        pids = sorted({f.result(timeout) for f in futures})
        log.info("image decoding: %d worker process(es) ready", self.workers)
        return pids

    def pids(self) -> list[int]:
        """The worker processes alive now."""
        pool = self._pool
        procs = getattr(pool, "_processes", None) or {}
        return sorted(pid for pid, p in list(procs.items()) if p.is_alive())

    def _rebuild(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is not broken:  # another request rebuilt it already
                return
            self._pool = None
            self.restarts += 1
        broken.shutdown(wait=False, cancel_futures=True)
        log.warning("image decoding: a worker process died; the pool is restarted (restart %d)", self.restarts)
        try:  # start every new worker now (forked from the fork server: milliseconds), not at the next requests
            pool = self._executor()
            for _ in range(self.workers):
                pool.submit(_worker_pid)
        except Unavailable:  # closing meanwhile
            pass

    def close(self) -> None:
        """Stop every worker (waits for them to exit); later calls are refused."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    # ---- decoding -----------------------------------------------------------------------------
    async def decode(
        self, images: Sequence[Any], field: str, indexed: bool = True, max_bytes: int | None = None
    ) -> list[torch.Tensor]:
        """Check and decode a request's images: (3, S, S) uint8 tensors in order. ``field[i]`` (or
        ``field`` when not ``indexed``) names an image in errors."""
        names = [f"{field}[{i}]" if indexed else field for i in range(len(images))]
        for data, name in zip(images, names):
            check_upload(data, name, max_bytes)
        items = [bytes(d) for d in images]
        if self.pending + len(items) > self.max_pending:
            raise QueueFull(
                f"the image decoding queue is full ({self.pending} images waiting, max_queue="
                f"{self.max_pending}); retry later"
            )
        self.pending += len(items)
        try:
            results = await self._run(items)
        finally:
            self.pending -= len(items)
        out = []
        for r, name in zip(results, names):
            if isinstance(r, str):
                raise InvalidArgument(f"not a readable image (PNG, JPEG, WebP...): {r}", name)
            out.append(torch.from_numpy(r) if isinstance(r, np.ndarray) else r)
        return out

    async def _run(self, items: list[bytes]) -> list:
        if not self.workers:
            work = lambda: [decode_one(d, self.spec, self._transform) for d in items]  # noqa: E731
            return work() if sum(map(len, items)) <= INLINE_DECODE_BYTES else await asyncio.to_thread(work)
        pool = self._executor()
        try:
            return await asyncio.wrap_future(pool.submit(_decode_in_worker, items))
        except BrokenProcessPool:
            self._rebuild(pool)
            raise Unavailable(
                "an image decoding worker process died while decoding this request; the pool "
                "has been restarted, retry the request"
            ) from None


def check_upload(data: Any, field: str, max_bytes: int | None) -> None:
    """The checks of one upload that need no decoding: bytes, not empty, within the upload limit."""
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidArgument(f"expected encoded image bytes, got {type(data).__name__}", field)
    if not data:
        raise InvalidArgument("empty image (0 bytes)", field)
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidArgument(f"{len(data)} bytes exceeds the upload limit of {max_bytes} bytes", field)
