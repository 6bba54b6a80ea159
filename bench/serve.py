"""Load benchmark of ``mmformer serve``: dynamic batching on and off, beside LitServe.

    flock /tmp/mmformer-bench.lock python -m bench.serve             # tiny model, ~3 minutes
    python -m bench.serve --seconds 1 --concurrency 1,16 --kinds text  # quicker look

Each server runs in its own process on this machine; an asyncio client in this process
(``grpc.aio`` for gRPC, ``aiohttp`` for HTTP) keeps C requests in flight (closed loop: every
worker sends its next request when the previous one is answered) for ``--seconds`` after a
short warm-up, with one-item requests (one text, or one 64x64 PNG). Servers:

- ``mmformer``: ``mmformer serve`` with dynamic batching (``--max-batch-size 64``,
  ``--max-delay-ms``) and its default image decoding processes (``--decode-workers``); driven over
  gRPC and HTTP;
- ``mmformer --no-batching``: every request alone;
- ``litserve``: the same model in a LitServe ``LitAPI`` with LitServe's own batching
  (``max_batch_size=64``, ``batch_timeout`` = the same delay), over HTTP (LitServe has no gRPC).

The model is a fresh ``tiny`` MMFormer with the bundled tokenizer (weights do not change speed).
Both servers use ``--threads`` torch threads. The client shares the machine's cores with the
server: the table gives the CPU time each side used (client: this process; server: its process
tree), in percent of one core, and the server's CPU milliseconds per request (the figure
least disturbed by other load on the machine). Mean batch: inputs per model call, from the server's
``/metrics`` (mmformer) or counted in the LitAPI's ``predict`` (LitServe).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import add_csv_argument, markdown_table, module_command, subprocess_env, write_csv

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "red green blue yellow purple orange heart face smiling cat dog apple flag keycap star moon sun "
    "with a the and of big small round square"
).split()


# ---- inputs ------------------------------------------------------------------------------------
def make_texts(n: int = 256, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 9)))) for _ in range(n)]


def make_images(n: int = 32, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = np.full((64, 64, 3), rng.integers(0, 255, 3), np.uint8)
        arr[16:48, 16:48] = rng.integers(0, 255, 3)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def save_tiny_model(directory: Path) -> Path:
    import torch

    from mmformer.config import get_config
    from mmformer.model import MMFormer
    from mmformer.tokenizer import Tokenizer, default_tokenizer_path

    torch.manual_seed(0)
    MMFormer(get_config("tiny"), Tokenizer.load(default_tokenizer_path())).save_pretrained(directory)
    return directory


# ---- LitServe worker (run in its own process by this script) ------------------------------------
try:  # bench-only dependency (pip install -e .[bench]); the class must live at module level (spawned workers)
    import litserve as ls
except ImportError:  # pragma: no cover
    ls = None

if ls is not None:

    class EmbedAPI(ls.LitAPI):
        """The same calls as mmformer's EmbedText / EmbedImage, one input per request, batched by LitServe."""

        def __init__(self, model_dir: str, threads: int, batch_log: str, **kw) -> None:
            super().__init__(**kw)
            self.model_dir, self.threads, self.batch_log = model_dir, threads, batch_log

        def setup(self, device):
            import torch

            from mmformer.data.transforms import build_transforms
            from mmformer.model import MMFormer

            torch.set_num_threads(self.threads)
            self.model = MMFormer.from_pretrained(self.model_dir).eval()
            c = self.model.config
            self.tf = build_transforms(c.image_size, train=False, mean=c.image_mean, std=c.image_std)
            self.log = open(self.batch_log, "a", buffering=1)

        def decode_request(self, request):
            from mmformer.data.transforms import load_image

            if "text" in request:
                return ("text", request["text"])
            return ("image", self.tf(load_image(base64.b64decode(request["image"]))))

        def batch(self, inputs):
            return list(inputs)

        def predict(self, batch):
            import torch

            if isinstance(batch, tuple):  # max_batch_size 1: one input
                batch = [batch]
            self.log.write(f"{len(batch)}\n")
            out: list = [None] * len(batch)
            texts = [(i, x) for i, (k, x) in enumerate(batch) if k == "text"]
            images = [(i, x) for i, (k, x) in enumerate(batch) if k == "image"]
            with torch.inference_mode():
                if texts:  # padded to the longest text of the batch, like mmformer serve
                    z = self.model.encode_texts([x for _, x in texts]).numpy()
                    for (i, _), row in zip(texts, z):
                        out[i] = row
                if images:
                    z = self.model.encode_image(torch.stack([x for _, x in images])).numpy()
                    for (i, _), row in zip(images, z):
                        out[i] = row
            return out

        def unbatch(self, output):
            return list(output)

        def encode_response(self, output):
            return {"embedding": output.tolist()}


def run_litserve(
    model_dir: str, port: int, threads: int, max_batch_size: int, batch_timeout: float, batch_log: str
) -> None:
    if ls is None:
        raise SystemExit("LitServe is not installed: pip install -e .[bench] (or run with --no-litserve)")
    api = EmbedAPI(model_dir, threads, batch_log, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


# ---- server processes ---------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(
        self,
        name: str,
        argv: list[str],
        http_port: int,
        grpc_port: int | None,
        ready_path: str,
        batch_log: str | None = None,
    ) -> None:
        self.name, self.http_port, self.grpc_port, self.batch_log = name, http_port, grpc_port, batch_log
        self.proc = subprocess.Popen(
            argv,
            env=subprocess_env(),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.ready_path = ready_path

    async def wait_ready(self, timeout: float = 180.0) -> None:
        import aiohttp

        end = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.proc.stderr.read().decode()[-2000:]}")
                try:
                    async with s.get(f"http://127.0.0.1:{self.http_port}{self.ready_path}") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.25)
        raise RuntimeError(f"{self.name} did not become ready in {timeout:.0f} s")

    def cpu_seconds(self) -> float:
        """User + system CPU of the server and all its child processes (alive now)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return float("nan")
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


async def batch_counts(server: ServerProcess, kind: str) -> tuple[float, float]:
    """(inputs, model calls) so far: from /metrics (mmformer) or the LitAPI's log (LitServe)."""
    if server.batch_log is not None:
        sizes = [int(x) for x in Path(server.batch_log).read_text().split()] if os.path.exists(server.batch_log) else []
        return float(sum(sizes)), float(len(sizes))
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{server.http_port}/metrics") as r:
            text = await r.text()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(f'mmformer_batch_size_sum{{kind="{kind}"}}'):
            total = float(line.split()[-1])
        elif line.startswith(f'mmformer_batch_size_count{{kind="{kind}"}}'):
            count = float(line.split()[-1])
    return total, count


# ---- the client ---------------------------------------------------------------------------------
class Client:
    """One-item requests to one server over one transport."""

    def __init__(self, server: ServerProcess, transport: str, texts: list[str], images: list[bytes]) -> None:
        self.server, self.transport = server, transport
        self.texts, self.images = texts, images
        self.images_b64 = [base64.b64encode(b).decode() for b in images]

    async def __aenter__(self):
        if self.transport == "grpc":
            import grpc

            from mmformer.serve.proto import mmformer_pb2 as pb
            from mmformer.serve.proto import mmformer_pb2_grpc as pb_grpc

            self.pb = pb
            self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.server.grpc_port}")
            self.stub = pb_grpc.RetrievalStub(self.channel)
        else:
            import aiohttp

            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc):
        if self.transport == "grpc":
            await self.channel.close()
        else:
            await self.session.close()

    async def one(self, kind: str, i: int) -> None:
        if self.transport == "grpc":
            if kind == "text":
                r = await self.stub.EmbedText(self.pb.EmbedTextRequest(texts=[self.texts[i % len(self.texts)]]))
            else:
                r = await self.stub.EmbedImage(self.pb.EmbedImageRequest(images=[self.images[i % len(self.images)]]))
            assert len(r.embeddings) == 1
            return
        lit = self.server.batch_log is not None
        if kind == "text":
            t = self.texts[i % len(self.texts)]
            path, body = ("/predict", {"text": t}) if lit else ("/v1/embed/text", {"texts": [t]})
        else:
            b = self.images_b64[i % len(self.images_b64)]
            path, body = ("/predict", {"image": b}) if lit else ("/v1/embed/image", {"images": [b]})
        async with self.session.post(f"http://127.0.0.1:{self.server.http_port}{path}", json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"{self.server.name} {path}: HTTP {r.status}: {(await r.text())[:300]}")
            data = json.loads(await r.read())
            assert ("embedding" in data) if lit else len(data["embeddings"]) == 1

    async def load(self, kind: str, concurrency: int, seconds: float, warmup: float) -> dict:
        latencies: list[float] = []
        counter = iter(range(10**9))
        state = {"record": False, "stop": False}

        async def worker():
            while not state["stop"]:
                t0 = time.perf_counter()
                await self.one(kind, next(counter))
                if state["record"]:
                    latencies.append(time.perf_counter() - t0)

        tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        inputs0, calls0 = await batch_counts(self.server, kind)
        cpu_client0, cpu_server0 = time.process_time(), self.server.cpu_seconds()
        state["record"] = True
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        state["record"] = False
        wall = time.perf_counter() - t0
        cpu_client, cpu_server = time.process_time() - cpu_client0, self.server.cpu_seconds() - cpu_server0
        state["stop"] = True
        await asyncio.gather(*tasks)
        inputs1, calls1 = await batch_counts(self.server, kind)
        lat = np.array(latencies) * 1000
        return {
            "req_s": len(latencies) / wall,
            "p50": float(np.percentile(lat, 50)),
            "p95": float(np.percentile(lat, 95)),
            "p99": float(np.percentile(lat, 99)),
            "batch": (inputs1 - inputs0) / max(calls1 - calls0, 1),
            "client_cpu": 100 * cpu_client / wall,
            "server_cpu": 100 * cpu_server / wall,
            "n": len(latencies),
            "server_ms_req": 1000 * cpu_server / max(len(latencies), 1),
        }


# ---- model cost alone ---------------------------------------------------------------------------
def model_cost(model_dir: Path, threads: int, batches=(1, 16, 64), repeats: int = 30) -> list[dict]:
    """Best-of-``repeats`` time of one encode call at each batch size, in this process: the ceiling
    of what batching can gain (a batch of B costs less than B single calls by this ratio)."""
    import torch

    from mmformer.data.transforms import build_transforms, load_image
    from mmformer.model import MMFormer

    torch.set_num_threads(threads)
    model = MMFormer.from_pretrained(model_dir).eval()
    c = model.config
    tf = build_transforms(c.image_size, train=False, mean=c.image_mean, std=c.image_std)
    images = torch.stack([tf(load_image(b)) for b in make_images(max(batches))])
    texts = make_texts(max(batches))
    rows = []
    with torch.inference_mode():
        for b in batches:
            best = {"text": float("inf"), "image": float("inf")}
            for _ in range(repeats):
                t0 = time.perf_counter()
                model.encode_texts(texts[:b])
                t1 = time.perf_counter()
                model.encode_image(images[:b])
                t2 = time.perf_counter()
                best["text"], best["image"] = min(best["text"], t1 - t0), min(best["image"], t2 - t1)
            rows.append(
                {
                    "batch": b,
                    "text_ms": 1000 * best["text"],
                    "image_ms": 1000 * best["image"],
                    "text_per": 1000 * best["text"] / b,
                    "image_per": 1000 * best["image"] / b,
                }
            )
    return rows


# ---- main ---------------------------------------------------------------------------------------
def start_servers(which: str, model_dir: Path, args, tmp: Path) -> ServerProcess:
    py = sys.executable
    http, grpc_port = free_port(), free_port()
    if which == "litserve":
        log = str(tmp / "litserve-batches.txt")
        return ServerProcess(
            "litserve",
            module_command(
                "bench.serve",
                "--litserve-worker",
                "--model",
                str(model_dir),
                "--port",
                str(http),
                "--threads",
                str(args.threads),
                "--max-delay-ms",
                str(args.max_delay_ms),
                "--batch-log",
                log,
            ),
            http,
            None,
            "/health",
            batch_log=log,
        )
    argv = [
        py,
        "-m",
        "mmformer.cli",
        "serve",
        "--model",
        str(model_dir),
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http),
        "--threads",
        str(args.threads),
        "--max-delay-ms",
        str(args.max_delay_ms),
        "--max-batch-size",
        "64",
        "--loop",
        args.loop,
    ]
    if which == "mmformer --no-batching":
        argv.append("--no-batching")
    if args.decode_workers is not None:
        argv += ["--decode-workers", str(args.decode_workers)]
    return ServerProcess(which, argv, http, grpc_port, "/readyz")


async def bench(args) -> list[dict]:
    texts, images = make_texts(), make_images()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model).resolve() if args.model else save_tiny_model(tmp / "model")
        for which in args.servers:
            server = start_servers(which, model_dir, args, tmp)
            try:
                await server.wait_ready()
                transports = ["http"] if which == "litserve" else args.transports
                for transport in transports:
                    async with Client(server, transport, texts, images) as client:
                        for kind in args.kinds:
                            for c in args.concurrency:
                                r = await client.load(kind, c, args.seconds, args.warmup)
                                row = {"server": which, "transport": transport, "kind": kind, "conc": c, **r}
                                rows.append(row)
                                print(
                                    f"{which:24s} {transport:4s} {kind:5s} c={c:<3d} {r['req_s']:8.1f} req/s  "
                                    f"p50 {r['p50']:6.2f}  p95 {r['p95']:6.2f}  p99 {r['p99']:6.2f} ms  "
                                    f"batch {r['batch']:5.2f}  client CPU {r['client_cpu']:4.0f}%  "
                                    f"server CPU {r['server_cpu']:4.0f}%",
                                    flush=True,
                                )
            finally:
                server.stop()
    return rows


def targets(rows: list[dict], cost: list[dict], conc: int = 16) -> list[str]:
    """The issue's three targets at concurrency ``conc``, per transport and kind: p99 under 50 ms;
    batching's gain over ``--no-batching`` at least 90% of the model's own batch-16 per-input gain
    (``cost``, measured in the same run); at least 1.3x LitServe's requests/s."""

    def get(server, transport, kind):
        return next(
            (
                r
                for r in rows
                if r["server"] == server and r["transport"] == transport and r["kind"] == kind and r["conc"] == conc
            ),
            None,
        )

    per = {r["batch"]: r for r in cost}
    lines = []
    for kind in sorted({r["kind"] for r in rows}):
        for transport in sorted({r["transport"] for r in rows if r["server"] == "mmformer"}):
            on, off = get("mmformer", transport, kind), get("mmformer --no-batching", transport, kind)
            lit = get("litserve", "http", kind)
            if on is None:
                continue
            parts = [
                f"{kind} over {transport}, c={conc}: batching {on['req_s']:.0f} req/s, p99 {on['p99']:.1f} ms "
                f"({'met' if on['p99'] < 50 else 'NOT met'}: < 50 ms)"
            ]
            if off and 1 in per and 16 in per:
                gain = on["req_s"] / off["req_s"]
                model_gain = per[1][f"{kind}_per"] / per[16][f"{kind}_per"]
                parts.append(
                    f"{gain:.1f}x --no-batching = {100 * gain / model_gain:.0f}% of the model's batch-16 "
                    f"gain {model_gain:.1f}x ({'met' if gain >= 0.9 * model_gain else 'NOT met'}: >= 90%)"
                )
            if lit:
                ratio = on["req_s"] / lit["req_s"]
                parts.append(
                    f"{ratio:.2f}x LitServe (HTTP) {lit['req_s']:.0f} req/s p99 {lit['p99']:.1f} ms "
                    f"({'met' if ratio >= 1.3 else 'NOT met'}: >= 1.3x)"
                )
            lines.append("; ".join(parts))
    return lines


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        ),
        "?",
    )
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"CPU: {model}, {os.cpu_count()} logical CPUs; uptime: {load}"


SERVERS = ("mmformer", "mmformer --no-batching", "litserve")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="save_pretrained directory (default: a fresh tiny model)")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--kinds", default="text,image")
    p.add_argument("--transports", default="grpc,http")
    p.add_argument("--seconds", type=float, default=2.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each server")
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"], help="mmformer serve --loop")
    p.add_argument(
        "--decode-workers",
        type=int,
        default=None,
        help="mmformer serve --decode-workers (default: the server's own, from the CPU count)",
    )
    p.add_argument(
        "--servers", default=",".join(SERVERS), help="comma-separated servers to load (default: %(default)s)"
    )
    p.add_argument("--no-litserve", action="store_true", help="leave litserve out of --servers")
    p.add_argument("--model-cost-only", action="store_true", help="only time the model alone (batch 1, 16, 64)")
    p.add_argument("--json", default=None, help="also write the rows here")
    add_csv_argument(p)
    # internal: the LitServe server process
    p.add_argument("--litserve-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--batch-log", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.litserve_worker:
        run_litserve(args.model, args.port, args.threads, 64, args.max_delay_ms / 1000, args.batch_log)
        return 0
    args.servers = [x for x in args.servers.split(",") if x and not (args.no_litserve and x == "litserve")]
    unknown = [x for x in args.servers if x not in SERVERS]
    if unknown or not args.servers:
        p.error(f"--servers {unknown or 'empty'}: choose from {', '.join(SERVERS)}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.kinds = args.kinds.split(",")
    args.transports = args.transports.split(",")
    before = machine()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        cost = model_cost(Path(args.model) if args.model else save_tiny_model(Path(tmp) / "model"), args.threads)
    print(f"model alone, best of 30 calls, {args.threads} torch thread(s):")
    print(
        markdown_table(
            cost,
            [
                ("batch", "batch", 0),
                ("text ms", "text_ms", 2),
                ("image ms", "image_ms", 2),
                ("text ms/input", "text_per", 2),
                ("image ms/input", "image_per", 2),
            ],
        )
    )
    print(flush=True)
    if args.model_cost_only:
        print(
            f"\ncommand: python -m bench.serve {' '.join(sys.argv[1:] if argv is None else argv)}\n"
            f"before: {before}\nafter:  {machine()}"
        )
        if args.csv:
            print(f"wrote {write_csv(args.csv, [{'table': 'model alone', **r} for r in cost])}")
        return 0
    rows = asyncio.run(bench(args))
    print()
    print(
        markdown_table(
            rows,
            [
                ("server", "server", 0),
                ("transport", "transport", 0),
                ("input", "kind", 0),
                ("concurrency", "conc", 0),
                ("req/s", "req_s", 0),
                ("p50 ms", "p50", 1),
                ("p95 ms", "p95", 1),
                ("p99 ms", "p99", 1),
                ("mean batch", "batch", 1),
                ("client CPU %", "client_cpu", 0),
                ("server CPU %", "server_cpu", 0),
                ("server CPU ms/req", "server_ms_req", 2),
            ],
        )
    )
    print()
    for line in targets(rows, cost):
        print(line)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\ncommand: python -m bench.serve {command}  ({time.time() - t0:.0f} s)")
    print(f"before: {before}\nafter:  {machine()}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.csv:
        load_rows = [
            {"table": "load", **{("mean_batch" if k == "batch" else k): v for k, v in r.items()}} for r in rows
        ]
        print(f"wrote {write_csv(args.csv, [{'table': 'model alone', **r} for r in cost] + load_rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
