"""The arguments of ``mmformer serve`` (argparse only, so ``mmformer --help`` stays fast; the
command itself is :func:`mmformer.serve.commands.serve_command`)."""

from __future__ import annotations

import argparse

API_KEY_ENV = "MMFORMER_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="save_pretrained directory (config.json, model.safetensors, tokenizer.model)"
    )
    p.add_argument(
        "--index",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an index built with this model, served under NAME (repeatable)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=8000)
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    prec.add_argument("--int8", action="store_true", help="int8 dynamic quantization of the Linear layers (CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max-batch-size", type=int, default=64, help="inputs per model call at most")
    p.add_argument(
        "--max-delay-ms",
        type=float,
        default=2.0,
        help="a batch leaves when its oldest input has waited this long (since its request arrived)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        help="queued inputs per kind at most; past it requests are refused (429 / RESOURCE_EXHAUSTED)",
    )
    p.add_argument("--no-batching", action="store_true", help="run every request alone (for comparison)")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every call but health (default: ${API_KEY_ENV})",
    )
    p.add_argument("--tls-cert", default=None, help="PEM certificate: serve gRPC and HTTP over TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--max-message-mb", type=float, default=16.0, help="largest gRPC message / HTTP body")
    p.add_argument("--max-image-mb", type=float, default=8.0, help="largest encoded image (the upload limit)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=4096 * 4096,
        help="largest image width*height (read from the header: refuses decompression bombs)",
    )
    p.add_argument(
        "--loop",
        default="asyncio",
        choices=["asyncio", "uvloop"],
        help="event loop of both servers (uvloop: pip install uvloop)",
    )
    p.add_argument(
        "--decode-workers",
        type=int,
        default=None,
        metavar="N",
        help="processes that decode uploaded images, off the event loop (default: the CPU count less "
        "one, at most 8; 0: decode in the server process)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads of the model (default: torch's)")
    p.add_argument(
        "--drain-seconds", type=float, default=30.0, help="on SIGTERM, wait this long at most for requests in flight"
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="HTTP: close a connection whose request headers are not complete S seconds after it opened "
        "or after its previous answer (idle and trickling clients; default: 10)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="HTTP: answer 408 and close when a request body is not complete S seconds after its headers (default: 60)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=1000,
        metavar="N",
        help="HTTP: open connections at most; one more is answered 503 and closed (default: 1000)",
    )
