"""Shared pieces of the serve tests: a tiny fresh model, a small captioned image index, a running
service (gRPC + HTTP in a thread of this process), and clients."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmformer.config import get_config
from mmformer.model import MMFormer
from mmformer.retrieval import build_index
from mmformer.serve.engine import Engine, Limits
from mmformer.serve.http_guard import HttpLimits
from mmformer.serve.server import ServerThread, ServeSettings
from mmformer.serve.service import BatchSettings
from mmformer.tokenizer import Tokenizer, default_tokenizer_path

REPO = Path(__file__).resolve().parent.parent
COLORS = {
    "red": (230, 20, 20),
    "green": (20, 200, 40),
    "blue": (20, 40, 230),
    "yellow": (240, 230, 20),
    "black": (5, 5, 5),
    "white": (250, 250, 250),
    "purple": (140, 30, 160),
    "orange": (250, 140, 10),
    "pink": (250, 150, 200),
    "brown": (120, 70, 20),
}
SHAPES = ("square", "circle")
API_KEY = "test-key-123"


def tiny_model() -> MMFormer:
    torch.manual_seed(0)
    tok = Tokenizer.load(default_tokenizer_path())
    return MMFormer(get_config("tiny"), tok).eval()


def png_bytes(rgb, shape: str = "square", size: int = 40) -> bytes:
    import io

    yy, xx = np.mgrid[:size, :size]
    inside = (
        np.ones((size, size), bool)
        if shape == "square"
        else (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 2.5) ** 2
    )
    arr = np.full((size, size, 3), 255, np.uint8)
    arr[inside] = rgb
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def build_gallery(root: Path, model: MMFormer) -> Path:
    """20 PNGs (10 colours x 2 shapes) with a manifest of captions, indexed with ``model``."""
    images = root / "gallery"
    (images / "shapes").mkdir(parents=True)
    rows = []
    for name, rgb in COLORS.items():
        for shape in SHAPES:
            rel = f"shapes/{name}-{shape}.png"
            (images / rel).write_bytes(png_bytes(rgb, shape))
            rows.append({"image": rel, "caption": f"a {name} {shape}"})
    (images / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "secret.txt").write_text("not listed by the index")
    build_index(model, images / "manifest.jsonl", root / "index", part_size=64, batch_size=32, progress=False)
    return root / "index"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(
    model: MMFormer,
    index_dir: Path,
    *,
    api_key: str | None = API_KEY,
    batching: bool = True,
    max_batch_size: int = 64,
    max_delay_ms: float = 5.0,
    max_queue: int = 1024,
    limits: Limits | None = None,
    http_limits: HttpLimits | None = None,
    decode_workers: int | None = None,
) -> ServerThread:
    from mmformer.retrieval import Index

    settings = ServeSettings(
        grpc_port=0,
        http_port=0,
        api_key=api_key,
        batching=BatchSettings(
            enabled=batching, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms, max_queue=max_queue
        ),
        limits=limits or Limits(max_image_bytes=64 << 10, max_pixels=1 << 20),
        max_message_bytes=1 << 20,
        http_limits=http_limits or HttpLimits(),
        decode_workers=decode_workers,
    )
    thread = ServerThread(settings, lambda: Engine(model, {"shapes": Index.open(index_dir)}, limits=settings.limits))
    thread.start()
    return thread


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def grpc_metadata(key: str = API_KEY) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


class LogCapture(logging.Handler):
    """Every record of the package, uvicorn (whose loggers do not propagate), grpc and the rest,
    DEBUG included for ``mmformer`` and uvicorn, while in the ``with`` block."""

    WATCHED = ("mmformer", "uvicorn")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> LogCapture:
        self._levels = {name: logging.getLogger(name).level for name in self.WATCHED}
        for name in ("", "uvicorn"):  # uvicorn's loggers do not propagate to the root
            logging.getLogger(name).addHandler(self)
        for name in self.WATCHED:
            logging.getLogger(name).setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc) -> None:
        for name in ("", "uvicorn"):
            logging.getLogger(name).removeHandler(self)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)

    def text(self) -> str:
        return "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.records)

    def assert_quiet(self, most: int = 1, needle: str = "") -> None:
        """No traceback and nothing above INFO; at most ``most`` records mentioning ``needle``."""
        assert not [r for r in self.records if r.exc_info or r.levelno > logging.INFO], self.text()
        if needle:
            assert len([r for r in self.records if needle in r.getMessage()]) <= most, self.text()
