"""``mmformer serve``: the retrieval service from the command line.

    mmformer serve --model runs/demo/model --index emoji=runs/emoji-index

The service's modules (grpc, FastAPI, uvicorn, prometheus_client: the ``[serve]`` extra) are
imported when the command runs; without them it ends with one line naming the extra to install.
"""

from __future__ import annotations

import argparse
import asyncio
import math
from collections.abc import Sequence

#: Top-level modules of the ``[serve]`` extra (and of what its packages pull in).
SERVE_EXTRA_MODULES = frozenset(
    {"grpc", "grpc_health", "grpc_reflection", "google", "fastapi", "starlette", "uvicorn", "h11", "prometheus_client"}
)
MISSING_EXTRA = "mmformer serve: needs the [serve] extra: pip install 'mmformer[serve]'"


def import_service():
    """``mmformer.serve.server`` (which imports the whole service), or a one-line SystemExit when a
    module of the ``[serve]`` extra is missing."""
    try:
        import uvicorn  # noqa: F401  (imported by Server.start)

        from mmformer.serve import server
    except ImportError as e:
        if (e.name or "").split(".")[0] in SERVE_EXTRA_MODULES:
            raise SystemExit(MISSING_EXTRA) from None
        raise
    return server


def parse_indexes(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, directory = v.partition("=")
        if not sep or not name or not directory:
            raise SystemExit(f"mmformer serve: --index {v!r}: expected NAME=DIR (e.g. emoji=runs/emoji-index)")
        if name in out:
            raise SystemExit(f"mmformer serve: --index {name!r} given twice")
        out[name] = directory
    return out


def settings_from_args(args: argparse.Namespace):
    """The :class:`~mmformer.serve.server.ServeSettings` of the command line."""
    server = import_service()
    from mmformer.serve.engine import Limits
    from mmformer.serve.http_guard import HttpLimits
    from mmformer.serve.service import BatchSettings

    for flag, seconds in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if not (math.isfinite(seconds) and seconds > 0):
            raise SystemExit(f"mmformer serve: {flag} {seconds:g}: expected a positive number of seconds")
    if args.decode_workers is not None and args.decode_workers < 0:
        raise SystemExit(f"mmformer serve: --decode-workers {args.decode_workers}: expected 0 or more")
    if args.max_connections < 1:
        raise SystemExit(f"mmformer serve: --max-connections {args.max_connections}: expected at least 1")
    return server.ServeSettings(
        model=args.model,
        indexes=parse_indexes(args.index),
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        precision="int8" if args.int8 else args.precision,
        device=args.device,
        batching=BatchSettings(
            enabled=not args.no_batching,
            max_batch_size=args.max_batch_size,
            max_delay_ms=args.max_delay_ms,
            max_queue=args.max_queue,
        ),
        limits=Limits(max_image_bytes=int(args.max_image_mb * (1 << 20)), max_pixels=args.max_pixels),
        api_key=server.api_key_from(args.api_key),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_message_bytes=int(args.max_message_mb * (1 << 20)),
        threads=args.threads,
        drain_seconds=args.drain_seconds,
        decode_workers=args.decode_workers,
        http_limits=HttpLimits(
            header_timeout=args.header_timeout, body_timeout=args.body_timeout, max_connections=args.max_connections
        ),
    )


def serve_command(
    *,
    model: str,
    index: Sequence[str] = (),
    host: str = "127.0.0.1",
    grpc_port: int = 50051,
    http_port: int = 8000,
    precision: str = "fp32",
    int8: bool = False,
    device: str = "cpu",
    max_batch_size: int = 64,
    max_delay_ms: float = 2.0,
    max_queue: int = 1024,
    no_batching: bool = False,
    api_key: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    max_message_mb: float = 16.0,
    max_image_mb: float = 8.0,
    max_pixels: int = 4096 * 4096,
    loop: str = "asyncio",
    threads: int | None = None,
    drain_seconds: float = 30.0,
    header_timeout: float = 10.0,
    body_timeout: float = 60.0,
    max_connections: int = 1000,
    decode_workers: int | None = None,
) -> int:
    """``mmformer serve``: the saved model ``model`` and its ``index`` entries (``NAME=DIR``) over gRPC
    and HTTP until SIGTERM/SIGINT, then drained (each setting is a flag of
    :func:`mmformer.serve.options.add_arguments`, which describes it)."""
    return cmd_serve(argparse.Namespace(**{**locals(), "index": list(index)}))


def cmd_serve(args: argparse.Namespace) -> int:
    """:func:`serve_command` with its settings in an ``argparse.Namespace``."""
    server = import_service()
    settings = settings_from_args(args)
    scheme = "https" if settings.tls_cert else "http"

    def ready(running) -> None:
        names = ", ".join(running.service.engine.retrievers) or "none"
        print(
            f"mmformer serve: ready. gRPC {settings.host}:{running.grpc_port}, page {scheme}://{settings.host}:"
            f"{running.http_port}/ (indexes: {names}; {'API key required' if settings.api_key else 'no API key'})",
            flush=True,
        )

    print(f"mmformer serve: loading {settings.model} ...", flush=True)
    run = asyncio.run
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError as e:
            raise SystemExit("mmformer serve: --loop uvloop needs the uvloop package (pip install uvloop)") from e
        run = uvloop.run
    try:
        run(server.serve_until_signal(settings, on_ready=ready))
    except (OSError, ValueError) as e:
        raise SystemExit(f"mmformer serve: {e}") from e
    print("mmformer serve: stopped (all requests in flight answered)", flush=True)
    return 0
