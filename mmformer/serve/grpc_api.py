"""The gRPC face of the service: ``mmformer.v1.Retrieval`` on a ``grpc.aio`` server, with the
standard health service (``grpc.health.v1``; NOT_SERVING until the model and indexes are loaded,
and again while draining) and server reflection.

The API key, when set, is required as ``authorization: Bearer KEY`` metadata on every call
except the health service; a wrong or missing key ends the call UNAUTHENTICATED before any work.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import time
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mmformer.serve.engine import metadata_json
from mmformer.serve.errors import InvalidArgument, ServeError
from mmformer.serve.proto import mmformer_pb2 as pb
from mmformer.serve.proto import mmformer_pb2_grpc as pb_grpc
from mmformer.serve.service import RetrievalService

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Retrieval"].full_name  # "mmformer.v1.Retrieval"
HEALTH_PREFIX = "/grpc.health.v1.Health/"

log = logging.getLogger(__name__)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _embeddings(rows) -> list[pb.Embedding]:
    return [pb.Embedding(values=r.tolist()) for r in rows]


class _Malformed:
    """What the request deserializer hands over for bytes that are not a valid message: the parse
    error, or the string field that is not UTF-8 (``field``, ``reason``)."""

    def __init__(self, error: Exception, field: str = "", reason: str = "") -> None:
        self.error, self.field, self.reason = error, field, reason


def _lenient(message_class):
    """``message_class.FromString`` that returns :class:`_Malformed` instead of raising, so the
    call ends INVALID_ARGUMENT with a message (grpc would answer UNKNOWN and log a traceback)."""

    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as e:
            return _Malformed(e, *(_bad_utf8_field(message_class, data) or ("", "")))

    return parse


@functools.cache
def _bytes_pool() -> descriptor_pool.DescriptorPool:
    """The messages of ``mmformer.proto`` with every string field turned into bytes (a separate pool),
    to read a request whose strings failed UTF-8 validation."""
    file = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(file)
    todo = list(file.message_type)
    while todo:
        m = todo.pop()
        todo.extend(m.nested_type)
        for f in m.field:
            if f.type == f.TYPE_STRING:
                f.type = f.TYPE_BYTES
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return pool


def _bad_utf8_field(message_class, data: bytes) -> tuple[str, str] | None:
    """(field, reason) of the first string of a request that is not UTF-8 (``texts[3]``), or None
    when the bytes are malformed otherwise."""
    twin = message_factory.GetMessageClass(_bytes_pool().FindMessageTypeByName(message_class.DESCRIPTOR.full_name))
    try:
        message = twin.FromString(data)
    except DecodeError:
        return None
    todo = [(message, message_class.DESCRIPTOR, "")]
    while todo:
        message, descriptor, prefix = todo.pop()
        for twin_field, value in message.ListFields():
            field = descriptor.fields_by_name[twin_field.name]
            repeated = not isinstance(value, (bytes, Message))
            for i, v in enumerate(value if repeated else [value]):
                name = f"{prefix}{field.name}[{i}]" if repeated else prefix + field.name
                if field.type == field.TYPE_STRING:
                    try:
                        v.decode("utf-8")
                    except UnicodeDecodeError as e:
                        return name, (
                            f"not valid UTF-8 (byte 0x{v[e.start]:02x} at offset {e.start}; strings are UTF-8 text)"
                        )
                elif field.type == field.TYPE_MESSAGE:
                    todo.append((v, field.message_type, name + "."))
    return None


class RetrievalServicer(pb_grpc.RetrievalServicer):
    def __init__(self, service: RetrievalService) -> None:
        self.service = service

    async def _run(self, name: str, request, context, body):
        try:
            async with self.service.call(name, "grpc"):
                if isinstance(request, _Malformed):
                    if request.field:
                        raise InvalidArgument(request.reason, request.field)
                    raise InvalidArgument(f"not a valid {name}Request message ({request.error})", "request")
                return await body()
        except ServeError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)
        except Exception as e:  # logged by the batcher or here; the process keeps serving
            log.exception("%s failed", name)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")

    async def EmbedText(self, request, context):
        async def body():
            rows, dropped = await self.service.embed_text(list(request.texts), _deadline(context))
            return pb.EmbedTextResponse(embeddings=_embeddings(rows), pieces_dropped=dropped)

        return await self._run("EmbedText", request, context, body)

    async def EmbedImage(self, request, context):
        async def body():
            rows = await self.service.embed_image(list(request.images), _deadline(context))
            return pb.EmbedImageResponse(embeddings=_embeddings(rows))

        return await self._run("EmbedImage", request, context, body)

    async def Search(self, request, context):
        async def body():
            which = request.WhichOneof("query")
            hits, dropped = await self.service.search(
                text=request.text if which == "text" else None,
                image=request.image if which == "image" else None,
                index=request.index,
                k=request.k,
                deadline=_deadline(context),
            )
            return pb.SearchResponse(
                pieces_dropped=dropped,
                hits=[
                    pb.Hit(
                        id=h.id,
                        score=h.score,
                        row=h.row,
                        caption=h.metadata.get("caption") or "",
                        metadata_json=metadata_json(h),
                    )
                    for h in hits
                ],
            )

        return await self._run("Search", request, context, body)

    async def Info(self, request, context):
        async def body():
            info = self.service.info()
            b = info["batching"]
            return pb.InfoResponse(
                fingerprint=info["fingerprint"],
                config_json=json.dumps(info["config"], sort_keys=True),
                precision=info["precision"],
                indexes=[pb.IndexInfo(**ix) for ix in info["indexes"]],
                batching=pb.BatchingInfo(
                    enabled=b["enabled"],
                    max_batch_size=b["max_batch_size"],
                    max_delay_ms=b["max_delay_ms"],
                    max_queue=b["max_queue"],
                ),
            )

        return await self._run("Info", request, context, body)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuse every call but health without ``authorization: Bearer <key>`` (compared in constant time)."""

    def __init__(self, api_key: str) -> None:
        self._expected = f"Bearer {api_key}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        given = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given, self._expected):
            return await continuation(details)
        handler = await continuation(details)
        return _refusing_handler(handler, "missing or wrong API key: send metadata 'authorization: Bearer <key>'")


def _refusing_handler(handler: Any, message: str):
    """A handler of the same shape as ``handler`` that ends the call UNAUTHENTICATED."""

    async def abort(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator)

    if handler is None:
        return None
    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


def _add_servicer(servicer: RetrievalServicer, server: grpc.aio.Server) -> None:
    """``add_RetrievalServicer_to_server`` with lenient request parsing (see :func:`_lenient`)."""
    methods = pb.DESCRIPTOR.services_by_name["Retrieval"].methods
    handlers = {
        m.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, m.name),
            request_deserializer=_lenient(getattr(pb, m.input_type.name)),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString,
        )
        for m in methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def build_grpc_server(
    service: RetrievalService,
    host: str,
    port: int,
    *,
    api_key: str | None = None,
    tls: tuple[bytes, bytes] | None = None,
    max_message_bytes: int = 16 << 20,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """(server not yet started, its health servicer, the bound port). ``tls``: (key PEM, cert PEM)."""
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(api_key)] if api_key else None,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    _add_servicer(RetrievalServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is not None:
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot bind the gRPC port {address} (in use? choose another with --grpc-port): {e}") from e
    if not bound:
        raise OSError(f"cannot bind the gRPC port {address} (in use? choose another with --grpc-port)")
    return server, health_servicer, bound


async def set_health(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
