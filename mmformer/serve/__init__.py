"""The retrieval service: ``mmformer serve`` over gRPC and HTTP with dynamic batching.

Kept free of imports so ``mmformer --help`` does not load grpc or FastAPI. The parts:

- :mod:`.engine`: model + named indexes, input checks, batched model calls (no transport);
- :mod:`.batcher`: :class:`~.batcher.DynamicBatcher`, one queue per input kind;
- :mod:`.service`: the calls (EmbedText, EmbedImage, Search, Info) shared by both transports;
- :mod:`.grpc_api` (``proto/mmformer.proto``, health, reflection) and :mod:`.http_api` (FastAPI,
  the page in ``static/``, Prometheus ``/metrics`` from :mod:`.metrics`);
- :mod:`.http_guard`: read deadlines and a connection limit of the HTTP listener;
- :mod:`.server`: both listeners on one event loop, loading, SIGTERM drain;
- :mod:`.options` / :mod:`.commands`: the command line.
"""
