"""Indexes past memory: a build whose peak RSS does not hold the embeddings, memory-mapped search
that answers as in-memory search, and shards searched as one index (library and service)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from mmformer.config import ModelConfig
from mmformer.model import MMFormer
from mmformer.retrieval import (
    Index,
    InvalidIndexError,
    Retriever,
    ShardedIndex,
    build_from_embeddings,
    build_index,
    write_shard_list,
)
from mmformer.retrieval.backends import IVF_DATA_FILE, BackendParams, FaissBackend
from mmformer.tokenizer import Tokenizer

faiss = pytest.importorskip("faiss")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = unit(rng.standard_normal((64, d)))
    return unit(centers[rng.integers(0, 64, n)] + 0.3 * rng.standard_normal((n, d)) / np.sqrt(d))


# ---- bounded-memory build -----------------------------------------------------------------------
BUILD_SCRIPT = textwrap.dedent("""
    import json, sys
    from mmformer.retrieval import build_from_embeddings
    import faiss, numpy, torch  # everything the build imports, before the baseline

    def status(field):  # kB; VmHWM is this process's peak (ru_maxrss also counts the forking parent)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    base = status("VmRSS")
    index = build_from_embeddings(sys.argv[1], sys.argv[2], backend="ivfpq", dtype="float16",
                                  backend_params={"nlist": 256}, block_rows=16384)
    print(json.dumps({"base_kb": base, "peak_kb": status("VmHWM"), "count": len(index)}))
""")


@pytest.mark.slow  # IVF-PQ training dominates: over a minute on 2 loaded cores
def test_build_of_200k_vectors_stays_under_a_fixed_memory_bound(tmp_path):
    n, d = 200_000, 256
    src = tmp_path / "emb.npy"
    mm = np.lib.format.open_memmap(src, mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, 50_000):
        mm[s : s + 50_000] = clustered(50_000, d, seed=s)
    mm.flush()
    del mm
    array_mb = n * d * 4 / 2**20  # 195 MiB of float32
    out = subprocess.run(
        [sys.executable, "-c", BUILD_SCRIPT, str(src), str(tmp_path / "index")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grown_mb = (r["peak_kb"] - r["base_kb"]) / 1024
    assert r["count"] == n
    # 1.5x the float32 array: holding the embeddings twice (or once plus a float16 copy) fails this
    print(f"build of {n} x {d}: peak RSS {grown_mb:.0f} MiB above the start")
    assert grown_mb < 1.5 * array_mb, f"build grew the process by {grown_mb:.0f} MiB (array: {array_mb:.0f} MiB)"
    index = Index.open(tmp_path / "index")
    assert index.manifest["backend"] == "ivfpq" and IVF_DATA_FILE in index.manifest["files"]
    x = np.load(src, mmap_mode="r")
    q = np.asarray(x[:: n // 50][:50])
    _, rows = index.search(q, 10)
    assert (rows[:, 0] == np.arange(0, n, n // 50)[:50]).mean() >= 0.9  # each query finds itself


def test_build_from_parts_equals_build_from_one_array(tmp_path):
    x = clustered(3000, 32)
    parts = []
    for i, s in enumerate(range(0, 3000, 700)):
        np.save(tmp_path / f"p{i}.npy", x[s : s + 700])
        parts.append(tmp_path / f"p{i}.npy")
    items = [{"id": f"v{i}"} for i in range(3000)]
    a = build_from_embeddings(parts, tmp_path / "a", items, backend="exact", block_rows=256)
    b = build_from_embeddings(x, tmp_path / "b", items, backend="exact")
    np.testing.assert_array_equal(np.asarray(a.embeddings), x)
    np.testing.assert_array_equal(np.asarray(a.embeddings), np.asarray(b.embeddings))
    assert a.metadata(2999) == {"id": "v2999"}
    with pytest.raises(InvalidIndexError, match="not an empty folder"):
        build_from_embeddings(x, tmp_path / "a")
    np.save(tmp_path / "bad.npy", x[:10, :16])
    with pytest.raises(ValueError, match="same dim"):
        build_from_embeddings([parts[0], tmp_path / "bad.npy"], tmp_path / "c")
    with pytest.raises(ValueError, match="metadata records"):
        build_from_embeddings(x, tmp_path / "d", items[:5], backend="exact")


# ---- memory-mapped search -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["flat", "hnsw", "ivfpq"])
def test_memory_mapped_index_answers_as_the_in_memory_one(tmp_path, backend):
    x, q = clustered(6000, 32), clustered(40, 32, seed=9)
    build_from_embeddings(x, tmp_path / "ix", backend=backend, backend_params={"nlist": 64}, block_rows=1000)
    mapped, loaded = Index.open(tmp_path / "ix", mmap=True), Index.open(tmp_path / "ix", mmap=False)
    assert isinstance(mapped.embeddings, np.memmap) and not isinstance(loaded.embeddings, np.memmap)
    s1, r1 = mapped.search(q, 10)
    s2, r2 = loaded.search(q, 10)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(s1, s2)
    assert mapped.metadata(5999) == loaded.metadata(5999) == {"id": "5999"}
    if backend == "ivfpq":  # the inverted lists are read from faiss.ivfdata through a memory map
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(mapped.backend.index).invlists)
        assert isinstance(lists, faiss.OnDiskInvertedLists)
        (tmp_path / "ix" / IVF_DATA_FILE).unlink()
        with pytest.raises(InvalidIndexError, match="faiss.ivfdata: missing"):
            Index.open(tmp_path / "ix")
        np.testing.assert_array_equal(
            Index.open(tmp_path / "ix", backend="exact").search(q, 10)[1], loaded.search_exact(q, 10)[1]
        )  # exact search needs no FAISS file
    # the streamed build answers as the in-memory build of the same structure
    ref = FaissBackend.build(backend, x, BackendParams(nlist=64))
    ref.embeddings = x if backend == "ivfpq" else None
    assert (ref.search(q, 10)[1] == r1).mean() >= 0.98


def test_single_file_ivfpq_index_still_opens_mapped_and_unmapped(tmp_path):
    x, q = clustered(6000, 32), clustered(40, 32, seed=9)
    build_from_embeddings(x, tmp_path / "ix", backend="exact")
    b = FaissBackend.build("ivfpq", x, BackendParams(nlist=64))
    b.save(tmp_path / "ix")  # the layout FaissBackend.build writes: one faiss.index, lists inside
    a = FaissBackend.load("ivfpq", tmp_path / "ix", b.params, embeddings=x, mmap=True)
    c = FaissBackend.load("ivfpq", tmp_path / "ix", b.params, embeddings=x, mmap=False)
    for (sa, ra), (sc, rc) in [(a.search(q, 10), c.search(q, 10))]:
        np.testing.assert_array_equal(ra, rc)
        np.testing.assert_array_equal(sa, sc)


# ---- shards -------------------------------------------------------------------------------------
def _ids(index, rows):
    return [[index.metadata(int(r))["id"] if r >= 0 else None for r in row] for row in rows]


def test_shards_searched_as_one_equal_one_index_over_the_same_vectors(tmp_path):
    x, q = clustered(2500, 32), clustered(30, 32, seed=5)
    items = [{"id": f"v{i}"} for i in range(len(x))]
    whole = build_from_embeddings(x, tmp_path / "whole", items, backend="exact")
    bounds = [0, 400, 1700, 2500]
    shards = [
        build_from_embeddings(x[a:b], tmp_path / "sharded" / f"shard-{i}", items[a:b], backend="exact")
        for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]
    write_shard_list(tmp_path / "sharded", [s.directory for s in shards])
    listing = json.loads((tmp_path / "sharded" / "shards.json").read_text())
    assert listing["shards"] == ["shard-0", "shard-1", "shard-2"]  # relative: the folder can move
    opened = Index.open(tmp_path / "sharded")
    assert isinstance(opened, ShardedIndex) and len(opened) == len(x)
    for k in (1, 10, 600):  # 600 > the first shard's 400 rows: its padding sorts last
        ws, wr = whole.search(q, k)
        ss, sr = opened.search(q, k)
        assert _ids(opened, sr) == _ids(whole, wr)
        np.testing.assert_allclose(ss, ws, rtol=0, atol=1e-6)
    # rows are numbered shard after shard, as in the whole index
    np.testing.assert_array_equal(opened.search(q, 10)[1], whole.search(q, 10)[1])
    many = Index.open_many([s.directory for s in shards])
    np.testing.assert_array_equal(many.search(q, 5)[1], whole.search(q, 5)[1])
    # approximate shards merge their own top-k (an IVF-PQ shard next to exact ones)
    build_from_embeddings(
        x[400:1700], tmp_path / "pq", items[400:1700], backend="ivfpq", backend_params={"nlist": 16, "nprobe": 16}
    )
    mixed = Index.open_many([shards[0].directory, tmp_path / "pq", shards[2].directory])
    assert mixed.manifest["backend"] == "exact+ivfpq"
    _, mr = mixed.search(q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(_ids(mixed, mr), _ids(whole, wr[:, :10]))]) >= 0.9


def test_shards_that_do_not_fit_together_are_refused(tmp_path):
    a = build_from_embeddings(clustered(100, 32), tmp_path / "a", backend="exact")
    b = build_from_embeddings(clustered(100, 16), tmp_path / "b", backend="exact")
    c = build_from_embeddings(clustered(100, 32), tmp_path / "c", backend="exact", fingerprint="other-model")
    with pytest.raises(InvalidIndexError, match="dim 16 differs"):
        Index.open_many([a.directory, b.directory])
    with pytest.raises(InvalidIndexError, match="model 'other-model' differs"):
        write_shard_list(tmp_path / "s", [a.directory, c.directory])
    assert not (tmp_path / "s" / "shards.json").exists()
    (tmp_path / "s" / "shards.json").write_text('{"format": 1, "shards": []}')
    with pytest.raises(InvalidIndexError, match="non-empty list"):
        Index.open(tmp_path / "s")


COLORS = {
    "red": (230, 20, 20),
    "green": (20, 200, 40),
    "blue": (20, 40, 230),
    "yellow": (240, 230, 20),
    "black": (5, 5, 5),
    "white": (250, 250, 250),
    "purple": (140, 30, 160),
    "orange": (250, 140, 10),
}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    tok = Tokenizer.train([f"a {c} square" for c in COLORS] * 5, vocab_size=40)
    cfg = ModelConfig(
        width=32, depth=2, heads=4, image_size=16, patch_size=8, vocab_size=64, context_length=8, embed_dim=16
    )
    return MMFormer(cfg, tok).eval()


def test_model_build_in_shards_equals_the_whole_build(tiny_model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, rgb in COLORS.items():
        arr = np.clip(np.array(rgb)[None, None] + rng.integers(-15, 15, (20, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{name}.png")
    whole = build_index(tiny_model, folder, tmp_path / "whole", part_size=2, progress=False)
    for i in range(3):  # 4 parts in 3 contiguous ranges: 1, 1 and 2 parts
        build_index(tiny_model, folder, tmp_path / "sharded" / f"s{i}", part_size=2, progress=False, shard=(i, 3))
    write_shard_list(tmp_path / "sharded", [tmp_path / "sharded" / f"s{i}" for i in range(3)])
    sharded = Index.open(tmp_path / "sharded")
    assert [sh.manifest["count"] for sh in sharded.shards] == [2, 2, 4]
    assert [sharded.metadata(i) for i in range(8)] == [whole.metadata(i) for i in range(8)]
    q = Retriever(tiny_model, whole).embed_images([folder / "red.png", folder / "blue.png"])
    ws, wr = whole.search(q, 8)
    ss, sr = Retriever(tiny_model, sharded).index.search(q, 8)
    np.testing.assert_array_equal(sr, wr)
    np.testing.assert_allclose(ss, ws, atol=1e-6)
    with pytest.raises(ValueError, match="0 <= i < n"):
        build_index(tiny_model, folder, tmp_path / "bad", part_size=2, progress=False, shard=(3, 3))
