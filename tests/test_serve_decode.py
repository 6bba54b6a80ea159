"""Images decoded in worker processes: the same embeddings as the model's own transform, the pixel
cap applied inside the workers, a bounded decoding queue, and a killed worker that fails only the
request it held while the pool is rebuilt for the next ones."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from serve_helpers import COLORS, auth, build_gallery, png_bytes, start_service, tiny_model

from mmformer.data.transforms import build_transforms, load_image
from mmformer.serve.decode import DecodePool, DecodeSpec, default_workers
from mmformer.serve.engine import Engine
from mmformer.serve.errors import InvalidArgument, QueueFull


@pytest.fixture(scope="module")
def model(one_thread):
    return tiny_model()


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    thread = start_service(model, build_gallery(tmp_path_factory.mktemp("decode"), model), decode_workers=2)
    with httpx.Client(base_url=f"http://127.0.0.1:{thread.server.http_port}", timeout=30, headers=auth()) as http:
        yield thread.server, http
    thread.stop()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def reference(model, images: list[bytes]) -> np.ndarray:
    c = model.config
    tf = build_transforms(c.image_size, train=False, mean=c.image_mean, std=c.image_std)
    with torch.inference_mode():
        return model.encode_image(torch.stack([tf(load_image(b)) for b in images])).numpy()


def photo_png(w: int, h: int, seed: int = 0) -> bytes:
    """A smooth, non-square image (resize and crop both matter)."""
    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(seed)
    arr = np.stack([(xx * rng.uniform(0.5, 2) + yy) % 256, (yy * 3) % 256, (xx ^ yy) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")  # 9 M pixels in a few KB
    return buf.getvalue()


def test_pixels_from_the_pool_normalised_in_the_batch_equal_the_eval_transform(model):
    engine = Engine(model)
    images = [photo_png(97, 61, 1), photo_png(40, 120, 2), png_bytes(COLORS["pink"], "circle")]
    pool = DecodePool(engine.decode_spec, workers=1)
    try:
        pixels = asyncio.run(pool.decode(images, "images"))
    finally:
        pool.close()
    in_process = asyncio.run(DecodePool(engine.decode_spec, workers=0).decode(images, "images"))
    assert all(torch.equal(a, b) for a, b in zip(pixels, in_process))
    assert [(p.dtype, tuple(p.shape)) for p in pixels] == [(torch.uint8, (3, 64, 64))] * 3
    floats = torch.stack([engine.prepare_image(b, "x") for b in images])
    np.testing.assert_allclose(engine.normalize(torch.stack(pixels)).numpy(), floats.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.stack(engine.encode_image_batch(pixels)), reference(model, images), atol=1e-5, rtol=0)


def test_decoding_queue_is_bounded_and_checks_come_before_any_work():
    pool = DecodePool(DecodeSpec(64, 1 << 20), workers=0, max_pending=2)
    ok = png_bytes(COLORS["red"])
    assert len(asyncio.run(pool.decode([ok, ok], "images"))) == 2
    with pytest.raises(QueueFull, match=r"the image decoding queue is full \(0 images waiting, max_queue=2\)"):
        asyncio.run(pool.decode([ok, ok, ok], "images"))
    with pytest.raises(InvalidArgument, match=r"^images\[1\]: 30 bytes exceeds the upload limit of 20 bytes$"):
        asyncio.run(pool.decode([b"x", b"y" * 30], "images", max_bytes=20))
    with pytest.raises(InvalidArgument, match=r"^image: not a readable image \(PNG, JPEG, WebP...\): image too large"):
        asyncio.run(pool.decode([bomb_png()], "image", indexed=False))


def test_default_worker_count_follows_the_cpus_and_the_option_reaches_the_settings():
    from mmformer.cli import build_parser
    from mmformer.serve.commands import settings_from_args

    assert default_workers() == max(1, min(len(os.sched_getaffinity(0)) - 1, 8))
    with pytest.raises(ValueError, match="workers >= 0"):
        DecodePool(DecodeSpec(64, None), workers=-1)
    parse = build_parser("serve").parse_args  # the table declares the flags of the verb it is given
    assert settings_from_args(parse(["serve", "--model", "m", "--decode-workers", "3"])).decode_workers == 3
    assert settings_from_args(parse(["serve", "--model", "m"])).decode_workers is None


def test_a_decode_bomb_is_a_400_from_the_worker_and_the_service_keeps_serving(model, served):
    server, http = served
    pool = server.service.decoder
    assert pool.workers == 2 and len(pool.pids()) == 2 and os.getpid() not in pool.pids()
    r = http.post("/v1/embed/image", json={"images": [b64(png_bytes(COLORS["red"])), b64(bomb_png())]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["field"] == "images[1]" and "image too large: 3000x3000" in err["message"], err
    r = http.post("/v1/search", json={"image": b64(bomb_png()), "k": 1})
    assert r.status_code == 400 and r.json()["error"]["field"] == "image"
    images = [png_bytes(COLORS["blue"], "circle"), photo_png(80, 50)]
    r = http.post("/v1/embed/image", json={"images": [b64(b) for b in images]})
    assert r.status_code == 200
    np.testing.assert_allclose(
        np.array(r.json()["embeddings"], np.float32), reference(model, images), atol=1e-5, rtol=0
    )
    assert pool.restarts == 0


def test_a_killed_worker_fails_its_request_with_503_and_the_pool_is_rebuilt(model, served):
    server, http = served
    pool = server.service.decoder
    old = pool.pids()
    restarts = pool.restarts
    # both workers busy, so the request below waits in the pool when one of them is killed
    busy = [pool._executor().submit(time.sleep, 3) for _ in range(pool.workers)]
    answer = {}

    def request():
        answer["r"] = http.post("/v1/embed/image", json={"images": [b64(png_bytes(COLORS["green"]))]})

    t = threading.Thread(target=request)
    t.start()
    deadline = time.monotonic() + 10
    while pool.pending == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.pending == 1
    os.kill(old[0], signal.SIGKILL)
    t.join(30)
    r = answer["r"]
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "UNAVAILABLE" and "image decoding worker process died" in err["message"]
    assert all(f.exception() is not None for f in busy)
    assert pool.restarts == restarts + 1
    images = [png_bytes(COLORS[c], "square") for c in ("yellow", "orange", "white")]
    for _ in range(2):  # the rebuilt pool answers, with new processes
        r = http.post("/v1/embed/image", json={"images": [b64(b) for b in images]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(
            np.array(r.json()["embeddings"], np.float32), reference(model, images), atol=1e-5, rtol=0
        )
    new = pool.pids()
    assert len(new) == 2 and not set(new) & set(old)
    psutil.wait_procs([psutil.Process(p) for p in old if psutil.pid_exists(p)], timeout=10)
    assert not [p for p in old if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
