"""The retrieval service end to end, in this process (gRPC and HTTP on free ports): embeddings
equal ``model.encode_*`` whatever batch they ride in, Search equals ``Retriever``, bad input gets a
code and a message naming the field, a fuzz run leaves the service answering, API keys, thumbnails
only of files the index lists, metrics, health while loading, back-pressure, precisions, TLS."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import shutil
import socket
import subprocess
import time

import grpc
import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import (
    API_KEY,
    COLORS,
    LogCapture,
    auth,
    build_gallery,
    grpc_metadata,
    png_bytes,
    start_service,
    tiny_model,
)

from mmformer.data.transforms import build_transforms, load_image
from mmformer.retrieval import Index, Retriever
from mmformer.serve.engine import Engine
from mmformer.serve.proto import mmformer_pb2 as pb
from mmformer.serve.proto import mmformer_pb2_grpc as pb_grpc
from mmformer.serve.server import ServerThread, ServeSettings
from mmformer.serve.service import BatchSettings

TEXTS = [
    "a red square",
    "blue",
    "a very long caption about a purple circle " * 6,
    "keycap: #",
    "green circle",
    "the smiling face with heart shaped eyes",
    "x",
    "a brown square on white",
]


@pytest.fixture(scope="module")
def model(one_thread):
    return tiny_model()


@pytest.fixture(scope="module")
def index_dir(model, tmp_path_factory):
    return build_gallery(tmp_path_factory.mktemp("serve"), model)


@pytest.fixture(scope="module")
def service(model, index_dir):
    thread = start_service(model, index_dir)
    yield thread.server
    thread.stop()


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        yield pb_grpc.RetrievalStub(channel)


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=f"http://127.0.0.1:{service.http_port}", timeout=30) as client:
        yield client


def reference_text(model, texts):
    with torch.inference_mode():
        return np.stack([model.encode_texts([t])[0].numpy() for t in texts])


def reference_image(model, data: bytes):
    c = model.config
    tf = build_transforms(c.image_size, train=False, mean=c.image_mean, std=c.image_std)
    with torch.inference_mode():
        return model.encode_image(tf(load_image(data))[None])[0].numpy()


def grpc_error(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return info.value


# ---- correctness --------------------------------------------------------------------------------
def test_embed_text_equals_the_model_over_grpc_and_http(model, stub, http):
    ref = reference_text(model, TEXTS)
    r = stub.EmbedText(pb.EmbedTextRequest(texts=TEXTS), metadata=grpc_metadata())
    got = np.array([e.values for e in r.embeddings], dtype=np.float32)
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    pieces = [len(model.tokenizer.encode(t)) for t in TEXTS]
    assert list(r.pieces_dropped) == [max(0, n - (model.config.context_length - 2)) for n in pieces]
    assert r.pieces_dropped[2] > 0  # the long caption was cut, and the response says by how much
    j = http.post("/v1/embed/text", json={"texts": TEXTS}, headers=auth()).json()
    np.testing.assert_allclose(np.array(j["embeddings"], dtype=np.float32), ref, atol=1e-6, rtol=0)
    assert j["pieces_dropped"] == list(r.pieces_dropped)


def test_a_batch_is_padded_to_its_longest_text_not_the_context(model):
    engine = Engine(model)
    seen = []
    encode = model.encode_text

    def spy(ids, mask=None, normalize=True):
        seen.append(tuple(ids.shape))
        return encode(ids, mask, normalize)

    model.encode_text = spy
    try:
        out = engine.encode_text_batch(engine.prepare_texts(["red", "a blue circle"]))
    finally:
        del model.encode_text
    longest = 2 + len(model.tokenizer.encode("a blue circle"))
    assert seen == [(2, longest)] and longest < model.config.context_length
    np.testing.assert_allclose(np.stack(out), reference_text(model, ["red", "a blue circle"]), atol=1e-6, rtol=0)


def test_embed_image_equals_the_model(model, stub, http):
    images = [png_bytes(rgb, shape) for rgb, shape in zip(COLORS.values(), ["square", "circle"] * 5)]
    ref = np.stack([reference_image(model, b) for b in images])
    r = stub.EmbedImage(pb.EmbedImageRequest(images=images), metadata=grpc_metadata())
    np.testing.assert_allclose(np.array([e.values for e in r.embeddings], np.float32), ref, atol=1e-6, rtol=0)
    j = http.post(
        "/v1/embed/image", json={"images": [base64.b64encode(b).decode() for b in images[:3]]}, headers=auth()
    ).json()
    np.testing.assert_allclose(np.array(j["embeddings"], np.float32), ref[:3], atol=1e-6, rtol=0)
    raw = http.post("/v1/embed/image", content=images[4], headers={**auth(), "Content-Type": "image/png"}).json()
    np.testing.assert_allclose(np.array(raw["embeddings"], np.float32), ref[4:5], atol=1e-6, rtol=0)


def test_200_concurrent_requests_of_mixed_lengths_equal_the_model(model, service):
    rng = random.Random(0)
    words = "red green blue square circle a the very long purple caption with heart eyes".split()
    requests = [
        [" ".join(rng.choices(words, k=rng.randint(1, 25))) for _ in range(rng.choice([1, 1, 2, 3]))]
        for _ in range(200)
    ]
    before = service.service.metrics.batch_size.labels("text")._sum.get()
    calls_before = _count(service.service.metrics.batch_size.labels("text"))

    async def main():
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}", timeout=60) as client,
        ):
            s = pb_grpc.RetrievalStub(ch)

            async def one(i, texts):
                if i % 2:
                    r = await s.EmbedText(pb.EmbedTextRequest(texts=texts), metadata=grpc_metadata())
                    return [list(e.values) for e in r.embeddings]
                r = await client.post("/v1/embed/text", json={"texts": texts}, headers=auth())
                return r.json()["embeddings"]

            return await asyncio.gather(*(one(i, t) for i, t in enumerate(requests)))

    answers = asyncio.run(main())
    flat = [t for texts in requests for t in texts]
    ref = reference_text(model, flat)
    got = np.array([e for a in answers for e in a], dtype=np.float32)
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    inputs = service.service.metrics.batch_size.labels("text")._sum.get() - before
    calls = _count(service.service.metrics.batch_size.labels("text")) - calls_before
    assert inputs == len(flat) and calls < len(requests) / 2  # merged: far fewer model calls than requests


def _count(histogram_child) -> float:
    return sum(b.get() for b in histogram_child._buckets)


def test_search_returns_what_the_retriever_returns(model, index_dir, stub, http):
    retriever = Retriever(model, Index.open(index_dir))
    for query in ["a red square", "circle", "a blue circle with a long caption " * 4]:
        ref = retriever.search_text([query], k=5)[0]
        r = stub.Search(pb.SearchRequest(text=query, index="shapes", k=5), metadata=grpc_metadata())
        assert [h.id for h in r.hits] == [h.id for h in ref]
        np.testing.assert_allclose([h.score for h in r.hits], [h.score for h in ref], atol=1e-6)
        assert [h.caption for h in r.hits] == [h.metadata["caption"] for h in ref]
        j = http.post("/v1/search", json={"text": query, "k": 5}, headers=auth()).json()  # only index: default
        assert [h["id"] for h in j["hits"]] == [h.id for h in ref]
        assert "path" not in j["hits"][0]["metadata"]  # local file paths stay on the server
    img = png_bytes(COLORS["orange"], "circle")
    ref = retriever.search_image([Image.open(io.BytesIO(img))], k=3)[0]
    r = stub.Search(pb.SearchRequest(image=img, index="shapes", k=3), metadata=grpc_metadata())
    assert [h.id for h in r.hits] == [h.id for h in ref] and r.hits[0].id == "shapes/orange-circle.png"
    np.testing.assert_allclose([h.score for h in r.hits], [h.score for h in ref], atol=1e-6)


def test_info_describes_model_indexes_and_batching(model, stub, http):
    from mmformer.model import model_fingerprint

    r = stub.Info(pb.InfoRequest(), metadata=grpc_metadata())
    assert r.fingerprint == model_fingerprint(model) and r.precision == "fp32"
    assert json.loads(r.config_json)["width"] == model.config.width
    assert [(i.name, i.kind, i.count, i.backend) for i in r.indexes] == [("shapes", "image", 20, "exact")]
    assert r.batching.enabled and r.batching.max_batch_size == 64 and r.batching.max_delay_ms == 5.0
    assert http.get("/v1/info", headers=auth()).json()["indexes"][0]["count"] == 20


# ---- bad input ----------------------------------------------------------------------------------
def bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")  # 9 M pixels in a few KB
    return buf.getvalue()


def noise_png(px: int = 200) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (px, px, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


BAD_GRPC = [  # (method, request, code, text in the message)
    ("EmbedText", pb.EmbedTextRequest(texts=["ok", "  "]), "INVALID_ARGUMENT", "texts[1]: empty text"),
    ("EmbedText", pb.EmbedTextRequest(), "INVALID_ARGUMENT", "texts: expected a non-empty list"),
    ("EmbedText", pb.EmbedTextRequest(texts=["x" * 30_000]), "INVALID_ARGUMENT", "texts[0]: 30000 characters"),
    (
        "EmbedImage",
        pb.EmbedImageRequest(images=[b"not an image at all"]),
        "INVALID_ARGUMENT",
        "images[0]: not a readable image",
    ),
    (
        "EmbedImage",
        pb.EmbedImageRequest(images=[png_bytes((1, 2, 3)), bomb_png()]),
        "INVALID_ARGUMENT",
        "images[1]: not a readable image (PNG, JPEG, WebP...): image too large: 3000x3000",
    ),
    (
        "EmbedImage",
        pb.EmbedImageRequest(images=[noise_png()]),
        "INVALID_ARGUMENT",
        "images[0]: 120",
    ),  # bytes exceeds the upload limit
    ("Search", pb.SearchRequest(text="red", k=0), "INVALID_ARGUMENT", "k: k=0 must be between 1 and"),
    ("Search", pb.SearchRequest(text="red", k=-3), "INVALID_ARGUMENT", "k: k=-3"),
    ("Search", pb.SearchRequest(text="red", k=21), "INVALID_ARGUMENT", "gallery size 20"),
    ("Search", pb.SearchRequest(text="red", index="nope", k=3), "NOT_FOUND", "index: unknown index 'nope'"),
    ("Search", pb.SearchRequest(index="shapes", k=3), "INVALID_ARGUMENT", "give exactly one query"),
    ("Search", pb.SearchRequest(image=b"\x89PNG\r\n\x1a\n broken", k=3), "INVALID_ARGUMENT", "image: not a readable"),
]


@pytest.mark.parametrize("method,request_,code,message", BAD_GRPC, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_GRPC)])
def test_bad_grpc_requests_get_a_code_and_a_message_naming_the_field(stub, method, request_, code, message):
    err = grpc_error(getattr(stub, method), request_, metadata=grpc_metadata())
    assert err.code() == getattr(grpc.StatusCode, code)
    if message == "images[0]: 120":
        assert "exceeds the upload limit of 65536 bytes" in err.details() and err.details().startswith("images[0]")
    else:
        assert message in err.details(), err.details()


def test_grpc_message_over_the_limit_is_refused(stub):
    err = grpc_error(stub.EmbedImage, pb.EmbedImageRequest(images=[b"\0" * (2 << 20)]), metadata=grpc_metadata())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_over_long_search_query_is_truncated_and_says_so(model, stub):
    query = "purple circle " * 40
    r = stub.Search(pb.SearchRequest(text=query, k=2), metadata=grpc_metadata())
    assert r.pieces_dropped == len(model.tokenizer.encode(query)) - (model.config.context_length - 2) > 0


BAD_HTTP = [  # (path, kwargs, status, field)
    ("/v1/embed/text", dict(json={"texts": [""]}), 400, "texts[0]"),
    ("/v1/embed/text", dict(json={"texts": "red"}), 400, "texts"),
    ("/v1/embed/text", dict(json={"text": ["red"]}), 400, "texts"),
    ("/v1/embed/text", dict(json={"texts": ["ok", 3]}), 400, "texts[1]"),
    ("/v1/embed/text", dict(content=b'{"texts": ["a"', headers={"Content-Type": "application/json"}), 400, "body"),
    ("/v1/embed/text", dict(content=b"[1, 2]", headers={"Content-Type": "application/json"}), 400, "body"),
    (
        "/v1/embed/text",
        dict(content=b"texts=a", headers={"Content-Type": "application/x-www-form-urlencoded"}),
        415,
        "Content-Type",
    ),
    ("/v1/embed/text", dict(content=b"\xff\xfe\x00", headers={"Content-Type": "application/json"}), 400, "body"),
    ("/v1/embed/image", dict(json={"images": ["%%%not base64"]}), 400, "images[0]"),
    ("/v1/embed/image", dict(content=b"GIF89a broken", headers={"Content-Type": "image/gif"}), 400, "images[0]"),
    ("/v1/embed/image", dict(content=noise_png(), headers={"Content-Type": "image/png"}), 400, "images[0]"),
    ("/v1/embed/image", dict(content=bomb_png(), headers={"Content-Type": "image/png"}), 400, "images[0]"),
    ("/v1/embed/image", dict(content=b"\0" * (2 << 20), headers={"Content-Type": "image/png"}), 413, "body"),
    ("/v1/search", dict(json={"text": "red", "k": 0}), 400, "k"),
    ("/v1/search", dict(json={"text": "red", "k": 1000}), 400, "k"),
    ("/v1/search", dict(json={"text": "red", "k": "5"}), 400, "k"),
    ("/v1/search", dict(json={"text": "red", "k": 2.5}), 400, "k"),
    ("/v1/search", dict(json={"text": "red", "index": "nope"}), 404, "index"),
    ("/v1/search", dict(json={"text": "red", "index": 7}), 400, "index"),
    ("/v1/search", dict(json={"text": "red", "image": "AAAA"}), 400, "image"),  # both given
    ("/v1/search", dict(json={"txt": "red"}), 400, "txt"),
    ("/v1/search", dict(json={"text": ""}), 400, "text"),
    ("/v1/search", dict(json={"text": ["red"]}), 400, "text"),
    (
        "/v1/embed/text",
        dict(
            content=b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", headers={"Content-Type": "application/json"}
        ),
        400,
        "body",
    ),
    (
        "/v1/embed/text",
        dict(content=b'{"texts": ["a", "b", "c", "x\\ud800"]}', headers={"Content-Type": "application/json"}),
        400,
        "texts[3]",
    ),
    (
        "/v1/embed/text",
        dict(content=b'{"texts": ["\xed\xa0\x80"]}', headers={"Content-Type": "application/json"}),
        400,
        "body",
    ),  # a surrogate encoded as UTF-8 bytes
    ("/v1/search", dict(content=b'{"text": "\\udc00 red"}', headers={"Content-Type": "application/json"}), 400, "text"),
    (
        "/v1/search",
        dict(content=b'{"text": "red", "index": "\\ud83d"}', headers={"Content-Type": "application/json"}),
        400,
        "index",
    ),
    (
        "/v1/search",
        dict(content=b'{"text": "red", "\\ud800": 1}', headers={"Content-Type": "application/json"}),
        400,
        "body",
    ),
]


@pytest.mark.parametrize("path,kwargs,status,field", BAD_HTTP, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_HTTP)])
def test_bad_http_requests_get_a_4xx_and_a_message_naming_the_field(http, path, kwargs, status, field):
    kwargs = {**kwargs, "headers": {**auth(), **kwargs.get("headers", {})}}
    r = http.post(path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["message"].startswith(field + ": ")


def test_over_deep_json_and_lone_surrogates_are_400s_without_a_traceback(http):
    deep = b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with LogCapture() as logs:
        r = http.post("/v1/embed/text", content=deep, headers={**auth(), "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("body: JSON nested too deeply"), r.text
        for _ in range(3):  # a client repeating it cannot flood the log
            r = http.post(
                "/v1/embed/text",
                content=b'{"texts": ["ok", "\\ud800"]}',
                headers={**auth(), "Content-Type": "application/json"},
            )
            assert r.json()["error"] == {
                "code": "INVALID_ARGUMENT",
                "field": "texts[1]",
                "message": "texts[1]: not valid Unicode (a lone surrogate U+D800 at character 0; expected UTF-8 text)",
            }
    logs.assert_quiet(most=1, needle="surrogate")
    logs.assert_quiet(most=1, needle="nested")
    # an escaped surrogate PAIR is an ordinary character, embedded like the character itself
    pair = http.post(
        "/v1/embed/text",
        content=b'{"texts": ["\\ud83d\\ude00 red"]}',
        headers={**auth(), "Content-Type": "application/json"},
    )
    plain = http.post("/v1/embed/text", json={"texts": ["\U0001f600 red"]}, headers=auth())
    assert pair.status_code == 200 and pair.json() == plain.json()


@pytest.mark.parametrize(
    "method,raw,field",
    [
        ("EmbedText", b"\x0a\x02ok" * 3 + b"\x0a\x03a\xffb", "texts[3]"),
        ("Search", b"\x0a\x02\xc3(\x20\x03", "text"),
        ("Search", b"\x0a\x03red\x1a\x01\xed\x20\x03", "index"),
    ],
)
def test_grpc_strings_that_are_not_utf8_name_the_field(service, method, raw, field):
    with LogCapture() as logs:
        err = grpc_error(service_raw_call(service, method), raw, metadata=grpc_metadata(), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{field}: not valid UTF-8 (byte 0x"), err.details()
    logs.assert_quiet()


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "-5", "0", "-0.0", "abc", "", "1e400"])
def test_x_timeout_ms_must_be_a_finite_positive_number(http, value):
    r = http.post("/v1/embed/text", json={"texts": ["red"]}, headers={**auth(), "X-Timeout-Ms": value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["field"] == "X-Timeout-Ms"
    assert err["message"] == f"X-Timeout-Ms: expected a finite positive number of milliseconds, got {value!r}"


def test_image_errors_say_what_is_wrong_without_object_reprs(stub, http):
    truncated = png_bytes((1, 2, 3))[:60]
    cases = [
        (b"GIF89a broken", "format not recognized"),
        (b"not an image at all", "format not recognized"),
        (truncated, "cannot decode image"),
    ]
    for data, reason in cases:
        request = pb.EmbedImageRequest(images=[data])
        messages = [
            grpc_error(stub.EmbedImage, request, metadata=grpc_metadata()).details(),
            http.post("/v1/embed/image", content=data, headers={**auth(), "Content-Type": "image/png"}).json()["error"][
                "message"
            ],
            http.post("/v1/search", json={"image": base64.b64encode(data).decode()}, headers=auth()).json()["error"][
                "message"
            ],
        ]
        for message, field in zip(messages, ["images[0]", "images[0]", "image"]):
            assert message.startswith(f"{field}: not a readable image (PNG, JPEG, WebP...): {reason}"), message
            assert " object at 0x" not in message and "<" not in message, message


def test_a_client_leaving_mid_body_is_logged_at_debug_only(service):
    counter = service.service.metrics.requests.labels("EmbedText", "http", "CANCELLED")
    before = counter._value.get()
    with LogCapture() as logs:
        with socket.create_connection(("127.0.0.1", service.http_port), timeout=10) as s:
            s.sendall(
                b"POST /v1/embed/text HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + API_KEY.encode()
                + b'\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"texts": ["red'
            )
            time.sleep(0.2)
        end = time.monotonic() + 10
        while counter._value.get() == before and time.monotonic() < end:
            time.sleep(0.02)
    assert counter._value.get() == before + 1
    logs.assert_quiet()
    assert [r.levelname for r in logs.records if "disconnected" in r.getMessage()] == ["DEBUG"], logs.text()


def test_fuzz_then_a_normal_request_still_gets_the_right_answer(model, service, stub, http):
    rng = random.Random(1)
    junk_values = [None, 0, -1, 1.5, True, "", "a" * 50, [], {}, [None], [""], [1, 2], {"a": 1}, "\x00"]
    statuses, codes = [], []
    for _ in range(300):
        path = rng.choice(["/v1/embed/text", "/v1/embed/image", "/v1/search", "/v1/info", "/v1/thumbnail/shapes/x"])
        kind = rng.randrange(4)
        headers = auth()
        if kind == 0:  # random bytes with a random content type
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
            headers["Content-Type"] = rng.choice(["application/json", "image/png", "text/plain", "", "image/jpeg"])
            r = http.request(rng.choice(["POST", "PUT", "GET"]), path, content=body, headers=headers)
        elif kind == 1:  # well-formed JSON of the wrong shape
            keys = rng.sample(["texts", "images", "text", "image", "index", "k", "zzz"], rng.randint(0, 3))
            r = http.post(path, json={k: rng.choice(junk_values) for k in keys}, headers=headers)
        elif kind == 2:  # truncated valid requests
            body = json.dumps({"texts": ["red square"], "text": "red", "k": 3}).encode()
            r = http.post(
                path, content=body[: rng.randrange(len(body))], headers={**headers, "Content-Type": "application/json"}
            )
        else:  # gRPC: random bytes as the serialized request
            method = rng.choice(["EmbedText", "EmbedImage", "Search", "Info"])
            raw = service_raw_call(service, method)
            try:
                raw(
                    bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
                    metadata=grpc_metadata(),
                    timeout=10,
                )
                codes.append("OK")
            except grpc.RpcError as e:
                codes.append(e.code().name)
            continue
        statuses.append(r.status_code)
        assert " object at 0x" not in r.text, r.text
    assert statuses and all(400 <= s < 500 or s == 200 for s in statuses), sorted(set(statuses))
    assert "INVALID_ARGUMENT" in codes and set(codes) <= {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}, set(codes)
    # still alive and right
    ref = reference_text(model, ["a green circle"])
    r = stub.EmbedText(pb.EmbedTextRequest(texts=["a green circle"]), metadata=grpc_metadata())
    np.testing.assert_allclose(np.array([r.embeddings[0].values], np.float32), ref, atol=1e-6, rtol=0)
    assert http.get("/readyz").status_code == 200


_RAW = {}


def service_raw_call(service, method):
    if method not in _RAW:
        ch = grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        _RAW[method] = ch.unary_unary(
            f"/mmformer.v1.Retrieval/{method}", request_serializer=None, response_deserializer=None
        )
    return _RAW[method]


# ---- security -----------------------------------------------------------------------------------
def test_a_missing_or_wrong_api_key_is_refused_before_any_work(service, stub, http):
    batches = service.service.metrics.batch_size.labels("text")
    before = _count(batches)
    for md in [None, grpc_metadata("wrong"), (("authorization", API_KEY),)]:
        err = grpc_error(stub.EmbedText, pb.EmbedTextRequest(texts=["red"]), metadata=md)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in err.details()
    for headers in [{}, auth("wrong"), {"Authorization": API_KEY}]:
        for path, body in [("/v1/embed/text", {"texts": ["red"]}), ("/v1/search", {"text": "red"})]:
            r = http.post(path, json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["field"] == "Authorization"
        assert http.get("/metrics", headers=headers).status_code == 401
        assert http.get("/v1/thumbnail/shapes/shapes/red-square.png", headers=headers).status_code == 401
    assert _count(batches) == before  # no model call happened
    # health needs no key
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="mmformer.v1.Retrieval"))
    assert h.status == health_pb2.HealthCheckResponse.SERVING
    assert http.get("/healthz").status_code == 200 and http.get("/readyz").status_code == 200


def test_thumbnails_only_of_files_the_index_lists(service, http, index_dir):
    ok = http.get("/v1/thumbnail/shapes/shapes/red-square.png", headers=auth())
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(ok.content)).size == (40, 40)
    root = index_dir.parent
    listed = str(root / "gallery" / "shapes" / "red-square.png")
    for bad in [
        "shapes/../../secret.txt",
        "..%2F..%2Fsecret.txt",
        "%2e%2e/%2e%2e/secret.txt",
        listed.lstrip("/"),
        "%2F" + listed.lstrip("/").replace("/", "%2F"),
        "shapes/nothere.png",
        "manifest.jsonl",
        "../index/index.json",
        "/etc/passwd",
        "shapes%2F..%2F..%2Fsecret.txt",
    ]:
        r = http.get("/v1/thumbnail/shapes/" + bad, headers=auth())
        assert r.status_code == 404, (bad, r.status_code)
    raw = httpx.get(
        f"http://127.0.0.1:{service.http_port}/v1/thumbnail/shapes/..%2F..%2F..%2Fsecret.txt", headers=auth()
    )
    assert raw.status_code == 404
    assert http.get("/v1/thumbnail/other/shapes/red-square.png", headers=auth()).status_code == 404


def test_metrics_expose_requests_errors_latency_and_batching(service, http, stub):
    stub.Search(pb.SearchRequest(text="red", k=2), metadata=grpc_metadata())
    http.post("/v1/search", json={"text": "red", "k": 0}, headers=auth())
    text = http.get("/metrics", headers=auth()).text
    for needle in [
        'mmformer_requests_total{call="Search",code="OK",transport="grpc"}',
        'mmformer_errors_total{call="Search",code="INVALID_ARGUMENT",transport="http"}',
        'mmformer_request_latency_seconds_bucket{call="Search",le="0.064",transport="grpc"}',
        'mmformer_queue_depth{kind="text"}',
        'mmformer_batch_size_bucket{kind="text",le="64.0"}',
        'mmformer_queue_wait_seconds_count{kind="text"}',
        'mmformer_model_seconds_count{kind="text"}',
    ]:
        assert needle in text, needle


def test_the_page_is_served_offline(http):
    page = http.get("/").text
    assert "<title>mmformer search</title>" in page and "/v1/search" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


def test_expired_requests_never_reach_the_model(service, http):
    """gRPC deadline and HTTP X-Timeout-Ms: a request still queued when its time is up is dropped."""
    import threading

    batcher = service.service.text_batcher
    run, seen, gate = batcher.run_batch, [], threading.Event()

    def gated(items):
        gate.wait(30)
        seen.extend(t.pieces for t in items)
        return run(items)

    batcher.run_batch = gated
    try:

        async def main():
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}", timeout=30) as client,
            ):
                stub = pb_grpc.RetrievalStub(ch)
                busy = asyncio.ensure_future(client.post("/v1/embed/text", json={"texts": ["blue"]}, headers=auth()))
                while not _count(service.service.metrics.batch_size.labels("text")) > before:
                    await asyncio.sleep(0.01)  # "blue" is in the model now, which waits for the gate
                late_http = asyncio.ensure_future(
                    client.post(
                        "/v1/embed/text", json={"texts": ["purple square"]}, headers={**auth(), "X-Timeout-Ms": "150"}
                    )
                )
                try:
                    await stub.EmbedText(
                        pb.EmbedTextRequest(texts=["orange circle"]), metadata=grpc_metadata(), timeout=0.15
                    )
                    code = "OK"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                await asyncio.sleep(0.2)
                answered_at_deadline = late_http.done()  # not kept waiting for the busy model
                gate.set()
                return code, answered_at_deadline, await late_http, await busy

        before = _count(service.service.metrics.batch_size.labels("text"))
        code, answered_at_deadline, late_http, busy = asyncio.run(main())
    finally:
        gate.set()
        batcher.run_batch = run
    assert code == "DEADLINE_EXCEEDED"
    assert answered_at_deadline
    assert late_http.status_code == 504 and late_http.json()["error"]["code"] == "DEADLINE_EXCEEDED"
    assert busy.status_code == 200
    tok = service.service.engine.model.tokenizer
    assert seen == [tok.encode("blue")]  # neither expired text was embedded


def test_no_batching_service_gives_the_same_embeddings(model, index_dir):
    thread = start_service(model, index_dir, batching=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{thread.server.grpc_port}") as ch:
            s = pb_grpc.RetrievalStub(ch)
            assert not s.Info(pb.InfoRequest(), metadata=grpc_metadata()).batching.enabled
            r = s.EmbedText(pb.EmbedTextRequest(texts=TEXTS), metadata=grpc_metadata())
        np.testing.assert_allclose(
            np.array([e.values for e in r.embeddings], np.float32), reference_text(model, TEXTS), atol=1e-6, rtol=0
        )
        batches = thread.server.service.metrics.batch_size.labels("text")
        assert _count(batches) == 1 and batches._sum.get() == len(TEXTS)  # one request = one model call
    finally:
        thread.stop()


def test_a_sharded_index_is_served_as_one(model, index_dir, tmp_path):
    from mmformer.retrieval import build_index, write_shard_list

    manifest = index_dir.parent / "gallery" / "manifest.jsonl"
    shards = [
        build_index(
            model,
            manifest,
            tmp_path / "shapes" / f"shard-{i}",
            part_size=8,
            batch_size=32,
            progress=False,
            shard=(i, 2),
        ).directory
        for i in range(2)
    ]
    write_shard_list(tmp_path / "shapes", shards)
    retriever = Retriever(model, Index.open(index_dir))
    thread = start_service(model, tmp_path / "shapes")  # what `mmformer serve --index shapes=DIR` opens
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{thread.server.http_port}", timeout=30) as client:
            info = client.get("/v1/info", headers=auth()).json()["indexes"][0]
            assert (info["count"], info["backend"]) == (20, "exact")
            for query in ["a red square", "circle"]:
                ref = retriever.search_text([query], k=20)[0]
                hits = client.post("/v1/search", json={"text": query, "k": 20}, headers=auth()).json()["hits"]
                assert [h["id"] for h in hits] == [h.id for h in ref]
                np.testing.assert_allclose([h["score"] for h in hits], [h.score for h in ref], atol=1e-6)
    finally:
        thread.stop()


# ---- lifecycle, back-pressure ------------------------------------------------------------------
def test_not_serving_while_loading_then_ready_and_queue_full_refused(model, index_dir):
    import threading

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    release = threading.Event()

    def slow_engine():
        release.wait(30)
        return Engine(model, {"shapes": Index.open(index_dir)})

    settings = ServeSettings(
        grpc_port=0, http_port=0, batching=BatchSettings(max_batch_size=1, max_delay_ms=0, max_queue=2)
    )
    thread = ServerThread(settings, slow_engine)
    server = thread.start(wait_loaded=False)
    ch = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    health = health_pb2_grpc.HealthStub(ch)
    base = f"http://127.0.0.1:{server.http_port}"
    try:
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert httpx.get(base + "/readyz").status_code == 503 and httpx.get(base + "/healthz").status_code == 200
        err = grpc_error(pb_grpc.RetrievalStub(ch).EmbedText, pb.EmbedTextRequest(texts=["red"]))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.details()
        release.set()
        thread.wait_loaded(30)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        assert httpx.get(base + "/readyz").status_code == 200

        gate = threading.Event()
        batcher = server.service.text_batcher
        run = batcher.run_batch
        batcher.run_batch = lambda items: (gate.wait(30), run(items))[1]

        async def flood():
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                first = asyncio.ensure_future(client.post("/v1/embed/text", json={"texts": ["a"]}))
                while (
                    batcher.depth or not first.done() and _count(server.service.metrics.batch_size.labels("text")) == 0
                ):
                    await asyncio.sleep(0.01)
                second = asyncio.ensure_future(client.post("/v1/embed/text", json={"texts": ["b", "c"]}))
                while batcher.depth < 2:
                    await asyncio.sleep(0.01)
                refused = await client.post("/v1/embed/text", json={"texts": ["d"]})
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ach:
                    try:
                        await pb_grpc.RetrievalStub(ach).EmbedText(pb.EmbedTextRequest(texts=["e"]))
                        code = "OK"
                    except grpc.aio.AioRpcError as e:
                        code, details = e.code().name, e.details()
                gate.set()
                return refused, code, details, await first, await second

        refused, code, details, first, second = asyncio.run(flood())
        assert refused.status_code == 429 and "queue is full" in refused.json()["error"]["message"]
        assert code == "RESOURCE_EXHAUSTED" and "max_queue=2" in details
        assert first.status_code == 200 and second.status_code == 200
    finally:
        release.set()
        ch.close()
        thread.stop()


def test_bf16_and_int8_engines_agree_with_fp32(model):
    texts = ["a red square", "a blue circle", "keycap"]
    ref = reference_text(model, texts)
    for precision, tol in [("bf16", 0.98), ("int8", 0.98)]:
        engine = Engine(tiny_model(), precision=precision)
        got = np.stack(engine.encode_text_batch(engine.prepare_texts(texts)))
        assert got.dtype == np.float32
        assert (np.sum(got * ref, axis=1) > tol).all(), precision
        assert engine.fingerprint == Engine(model).fingerprint  # indexes of the float model stay searchable


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_tls_on_both_transports(model, index_dir, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    settings = ServeSettings(grpc_port=0, http_port=0, tls_cert=str(cert), tls_key=str(key), api_key=API_KEY)
    thread = ServerThread(settings, lambda: Engine(model, {"shapes": Index.open(index_dir)}))
    server = thread.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{server.grpc_port}", creds) as ch:
            r = pb_grpc.RetrievalStub(ch).EmbedText(pb.EmbedTextRequest(texts=["red"]), metadata=grpc_metadata())
        np.testing.assert_allclose(
            np.array([r.embeddings[0].values], np.float32), reference_text(model, ["red"]), atol=1e-6, rtol=0
        )
        r = httpx.post(
            f"https://localhost:{server.http_port}/v1/search",
            json={"text": "red", "k": 2},
            headers=auth(),
            verify=str(cert),
        )
        assert r.status_code == 200 and len(r.json()["hits"]) == 2
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not answered on the TLS port
            httpx.get(f"http://localhost:{server.http_port}/healthz", timeout=3).raise_for_status()
    finally:
        thread.stop()


@pytest.mark.parametrize("which", ["grpc", "http"])
def test_a_port_in_use_is_a_clear_error(model, which):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = ServeSettings(grpc_port=port if which == "grpc" else 0, http_port=port if which == "http" else 0)
        thread = ServerThread(settings, lambda: Engine(model))
        with pytest.raises(
            OSError, match=f"cannot bind the {'gRPC' if which == 'grpc' else 'HTTP'} port .*--{which}-port"
        ):
            thread.start(timeout=30)
        thread.loop.call_soon_threadsafe(thread.loop.stop)
