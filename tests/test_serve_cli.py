"""``mmformer serve`` as a user starts it: one command on a saved model and its index, the key
from the environment, and SIGTERM draining: requests in flight are answered, new ones refused,
then the process exits 0."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time

import grpc
import httpx
import numpy as np
import psutil
import pytest
import torch
from serve_helpers import COLORS, REPO, auth, build_gallery, free_port, grpc_metadata, png_bytes, tiny_model

from mmformer.cli import main
from mmformer.data.transforms import build_transforms, load_image
from mmformer.serve.proto import mmformer_pb2 as pb
from mmformer.serve.proto import mmformer_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-cli")
    model = tiny_model()
    model.save_pretrained(root / "model")
    index = build_gallery(root, model)
    return model, root / "model", index


def wait_ready(proc, base: str, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"mmformer serve exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("mmformer serve did not become ready")


def test_serve_command_drains_on_sigterm(saved):
    model, model_dir, index_dir = saved
    gport, hport = free_port(), free_port()
    env = {
        **os.environ,
        "MMFORMER_API_KEY": "env-key",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmformer.cli",
            "serve",
            "--model",
            str(model_dir),
            "--index",
            f"shapes={index_dir}",
            "--grpc-port",
            str(gport),
            "--http-port",
            str(hport),
            "--max-delay-ms",
            "1500",
            "--threads",
            "1",
            "--decode-workers",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
    )
    base = f"http://127.0.0.1:{hport}"
    try:
        wait_ready(proc, base)
        assert httpx.post(base + "/v1/search", json={"text": "red", "k": 1}).status_code == 401  # key from env
        texts = [f"a {c} circle" for c in ("red", "green", "blue", "pink", "black", "white")]
        image = png_bytes(COLORS["orange"], "circle")
        children = psutil.Process(proc.pid).children(recursive=True)  # the decoding workers and their fork server
        workers = [p for p in children if p.ppid() != proc.pid]  # forked by the fork server
        assert len(workers) == 2, [(p.pid, p.ppid(), p.cmdline()[:3]) for p in children]

        async def main():
            async with (
                httpx.AsyncClient(base_url=base, timeout=30) as client,
                grpc.aio.insecure_channel(f"127.0.0.1:{gport}") as ch,
            ):
                stub = pb_grpc.RetrievalStub(ch)
                md = grpc_metadata("env-key")
                pending = [
                    asyncio.ensure_future(client.post("/v1/embed/text", json={"texts": [t]}, headers=auth("env-key")))
                    for t in texts
                ]
                pending += [
                    asyncio.ensure_future(stub.EmbedText(pb.EmbedTextRequest(texts=[t]), metadata=md)) for t in texts
                ]
                pending.append(
                    asyncio.ensure_future(
                        client.post(
                            "/v1/embed/image",
                            json={"images": [base64.b64encode(image).decode()]},
                            headers=auth("env-key"),
                        )
                    )
                )
                await asyncio.sleep(0.4)  # all queued, waiting for the 1.5 s batch delay
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                try:
                    late = (
                        await client.post("/v1/embed/text", json={"texts": ["late"]}, headers=auth("env-key"))
                    ).status_code
                except httpx.HTTPError:
                    late = "refused"
                return await asyncio.gather(*pending), late

        answers, late = asyncio.run(main())
        with torch.inference_mode():
            ref = np.stack([model.encode_texts([t])[0].numpy() for t in texts])
        http_rows = np.array([a.json()["embeddings"][0] for a in answers[:6]], np.float32)
        grpc_rows = np.array([a.embeddings[0].values for a in answers[6:12]], np.float32)
        tf = build_transforms(
            model.config.image_size, train=False, mean=model.config.image_mean, std=model.config.image_std
        )
        with torch.inference_mode():
            image_ref = model.encode_image(tf(load_image(image))[None])[0].numpy()
        np.testing.assert_allclose(
            np.array(answers[12].json()["embeddings"][0], np.float32), image_ref, atol=1e-5, rtol=0
        )
        np.testing.assert_allclose(http_rows, ref, atol=1e-6, rtol=0)
        np.testing.assert_allclose(grpc_rows, ref, atol=1e-6, rtol=0)
        assert late in (503, "refused")
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read()
        assert "ready. gRPC 127.0.0.1:" in out and "stopped (all requests in flight answered)" in out
        _, alive = psutil.wait_procs(children, timeout=10)  # no orphan: every worker and the fork server gone
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_index_argument_is_a_one_line_error(saved):
    _, model_dir, _ = saved
    with pytest.raises(SystemExit, match="--index 'nonsense': expected NAME=DIR"):
        main(["serve", "--model", str(model_dir), "--index", "nonsense"])


def test_http_deadline_options_are_documented_and_reach_the_settings(capsys):
    from mmformer.cli import build_parser
    from mmformer.serve.commands import settings_from_args
    from mmformer.serve.http_guard import HttpLimits

    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--header-timeout S", "--body-timeout S", "--max-connections N"):
        assert flag in text
    assert "default: 10)" in text and "(default: 60)" in text and "(default: 1000)" in text
    args = build_parser("serve").parse_args(
        ["serve", "--model", "m", "--header-timeout", "0.5", "--body-timeout", "3", "--max-connections", "7"]
    )
    assert settings_from_args(args).http_limits == HttpLimits(header_timeout=0.5, body_timeout=3.0, max_connections=7)
    assert settings_from_args(build_parser("serve").parse_args(["serve", "--model", "m"])).http_limits == HttpLimits()


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--header-timeout", "0", "--header-timeout 0: expected a positive number of seconds"),
        ("--header-timeout", "-1", "--header-timeout -1: expected a positive number of seconds"),
        ("--body-timeout", "nan", "--body-timeout nan: expected a positive number of seconds"),
        ("--body-timeout", "inf", "--body-timeout inf: expected a positive number of seconds"),
        ("--max-connections", "0", "--max-connections 0: expected at least 1"),
        ("--decode-workers", "-1", "--decode-workers -1: expected 0 or more"),
    ],
)
def test_bad_http_deadline_options_are_one_line_errors(flag, value, message):
    with pytest.raises(SystemExit, match=f"^mmformer serve: {message}$"):
        main(["serve", "--model", "nowhere", flag, value])


#: Each module hidden in turn, in one fresh interpreter (one torch import instead of four). The order
#: matters: a module of the service that an earlier check imported stays imported, so
#: prometheus_client (imported by serve/metrics.py, which the FastAPI check imports) goes first.
HIDE_IN_TURN = """
import contextlib, io, sys
from mmformer.cli import run
for module in ["prometheus_client", "grpc", "fastapi", "uvicorn"]:
    sys.modules[module] = None  # as if the package were not installed
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = run(["serve", "--model", "nowhere"])
    del sys.modules[module]
    print(repr((module, status, out.getvalue(), err.getvalue())))
"""


def test_without_the_serve_extra_serve_says_what_to_install(tmp_path):
    import ast

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, "-c", HIDE_IN_TURN], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert r.returncode == 0, r.stderr
    answers = [ast.literal_eval(line) for line in r.stdout.splitlines()]
    line = "mmformer serve: needs the [serve] extra: pip install 'mmformer[serve]'\n"
    assert answers == [(m, 1, "", line) for m in ("prometheus_client", "grpc", "fastapi", "uvicorn")]
