"""The committed gRPC stubs match the .proto, and server reflection lists the calls (what
``grpcurl -H 'authorization: Bearer KEY' -plaintext 127.0.0.1:50051 list`` shows)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from serve_helpers import API_KEY, grpc_metadata, tiny_model

from mmformer.serve.engine import Engine
from mmformer.serve.server import ServerThread, ServeSettings

REPO = Path(__file__).resolve().parent.parent
PROTO = "mmformer/serve/proto/mmformer.proto"
GENERATED = ("mmformer_pb2.py", "mmformer_pb2.pyi", "mmformer_pb2_grpc.py")


def test_committed_stubs_equal_freshly_generated_ones(tmp_path):
    pytest.importorskip("grpc_tools")
    # The one command that makes the stubs (run from the repository root, output beside the .proto;
    # "-I ." makes the generated imports absolute: from mmformer.serve.proto import mmformer_pb2):
    #   python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. mmformer/serve/proto/mmformer.proto
    out = tmp_path / "gen"
    out.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            PROTO,
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    for name in GENERATED:
        fresh = (out / "mmformer/serve/proto" / name).read_text()
        committed = (REPO / "mmformer/serve/proto" / name).read_text()
        assert fresh == committed, (
            f"mmformer/serve/proto/{name} is stale: regenerate it with the command in this test (and commit it)"
        )


def test_reflection_lists_the_services_and_their_calls(tmp_path):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    thread = ServerThread(ServeSettings(grpc_port=0, http_port=0, api_key=API_KEY), lambda: Engine(tiny_model()))
    server = thread.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)

            def ask(**request):
                [answer] = list(
                    stub.ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(**request)]), metadata=grpc_metadata()
                    )
                )
                return answer

            services = sorted(s.name for s in ask(list_services="").list_services_response.service)
            assert services == [
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
                "mmformer.v1.Retrieval",
            ]
            files = ask(file_containing_symbol="mmformer.v1.Retrieval").file_descriptor_response.file_descriptor_proto
            fd = descriptor_pb2.FileDescriptorProto.FromString(files[0])
            [svc] = fd.service
            assert [(m.name, m.input_type, m.output_type) for m in svc.method] == [
                ("EmbedText", ".mmformer.v1.EmbedTextRequest", ".mmformer.v1.EmbedTextResponse"),
                ("EmbedImage", ".mmformer.v1.EmbedImageRequest", ".mmformer.v1.EmbedImageResponse"),
                ("Search", ".mmformer.v1.SearchRequest", ".mmformer.v1.SearchResponse"),
                ("Info", ".mmformer.v1.InfoRequest", ".mmformer.v1.InfoResponse"),
            ]
            # without the key, reflection is refused like every call but health
            with pytest.raises(grpc.RpcError) as info:
                list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        thread.stop()
