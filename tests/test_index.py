"""Retrieval indexes: backends against brute force, build/open round trip, resume after a kill,
mismatch and damage errors, skipped inputs, int8 agreement, and the index/search commands."""

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from mmformer.cli import main
from mmformer.compress import quantize_int8
from mmformer.config import ModelConfig
from mmformer.model import MMFormer
from mmformer.retrieval import Index, InvalidIndexError, Retriever, build_index
from mmformer.retrieval.backends import ExactBackend, FaissBackend, choose_backend
from mmformer.tokenizer import Tokenizer, default_tokenizer_path

pytest.importorskip("faiss")

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


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, clusters: int, seed: int = 0, spread: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = unit(rng.standard_normal((clusters, d)))
    return unit(centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)) / np.sqrt(d))


def recall_vs_exact(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, e)) / e.shape[0] for a, e in zip(approx_ids, exact_ids)]))


# ---- backends ---------------------------------------------------------------------------------
def test_exact_backend_equals_brute_force():
    rng = np.random.default_rng(0)
    x, q = unit(rng.standard_normal((500, 24))), unit(rng.standard_normal((7, 24)))
    scores, ids = ExactBackend(x, block_size=3).search(q, 5)
    ref = q.astype(np.float64) @ x.astype(np.float64).T
    np.testing.assert_array_equal(ids, np.argsort(-ref, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.take_along_axis(ref, ids, 1), atol=1e-5)
    # k beyond N pads like FAISS: id -1, score -inf
    s, i = ExactBackend(x[:3]).search(q, 5)
    assert (i[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all() and (i[:, :3] >= 0).all()


def test_faiss_flat_equals_exact_and_float16_storage_is_close():
    rng = np.random.default_rng(1)
    x, q = unit(rng.standard_normal((2000, 32))), unit(rng.standard_normal((20, 32)))
    es, ei = ExactBackend(x).search(q, 10)
    fs, fi = FaissBackend.build("flat", x).search(q, 10)
    np.testing.assert_array_equal(fi, ei)
    np.testing.assert_allclose(fs, es, atol=1e-5)
    hs, hi = ExactBackend(x.astype(np.float16)).search(q, 10)
    assert recall_vs_exact(hi, ei) > 0.97 and np.abs(hs - es).max() < 2e-3


@pytest.mark.parametrize(
    "kind,params,floor",
    [
        ("hnsw", {}, 0.95),  # defaults: M 32, ef_search 128
        # 4000 vectors only train 6-bit PQ codebooks, so the exactly re-ranked shortlist is 16k long
        ("ivfpq", {"nlist": 32, "nprobe": 16, "refine": 16}, 0.95),
    ],
)
def test_approximate_backends_reach_their_recall_on_clustered_data(kind, params, floor):
    from mmformer.retrieval.backends import BackendParams

    x = clustered(4000, 32, 40, seed=2)
    q = clustered(200, 32, 40, seed=3)
    _, exact = ExactBackend(x).search(q, 10)
    _, approx = FaissBackend.build(kind, x, BackendParams.from_dict(params)).search(q, 10)
    assert recall_vs_exact(approx, exact) >= floor


def test_choose_backend_by_size_and_bad_names():
    assert choose_backend(1000) == "exact" and choose_backend(2_000_000) == "hnsw"
    assert choose_backend(10, "ivfpq") == "ivfpq"
    with pytest.raises(ValueError, match="must be one of"):
        choose_backend(10, "annoy")


# ---- building and opening -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    captions = [f"a {c} square" for c in COLORS] + list(COLORS)
    tok = Tokenizer.train(captions * 5, vocab_size=40)
    cfg = ModelConfig(
        width=32, depth=2, heads=4, image_size=16, patch_size=8, vocab_size=64, context_length=8, embed_dim=16
    )
    return MMFormer(cfg, tok).eval()


@pytest.fixture()
def image_folder(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (name, rgb) in enumerate(COLORS.items()):
        noise = rng.integers(-15, 15, (20, 20, 3))
        arr = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / ("sub" if i % 2 else "") / f"{name}.png")
    return d


def test_build_open_search_round_trip(tiny_model, image_folder, tmp_path):
    out = tmp_path / "index"
    built = build_index(tiny_model, image_folder, out, part_size=3, batch_size=2, progress=False)
    reopened = Index.open(out, verify=True)
    files = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.png"))
    assert [reopened.metadata(i)["id"] for i in range(len(reopened))] == files
    assert reopened.manifest["backend"] == "exact" and reopened.manifest["count"] == len(COLORS)
    assert not (out / "parts").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    r = Retriever(tiny_model, reopened)
    # the stored rows are the model's own embeddings of the files, in order
    ref = r.embed_images([image_folder / f for f in files]).numpy()
    np.testing.assert_allclose(np.asarray(reopened.embeddings), ref, atol=1e-5)
    hits = r.search_image([image_folder / files[3]], k=3)[0]
    assert hits[0].id == files[3] and abs(hits[0].score - 1) < 1e-4
    assert [h.row for h in hits] == [
        h.row for h in Retriever(tiny_model, built).search_image([image_folder / files[3]], k=3)[0]
    ]
    # a second build of the same source is a no-op; another source is refused
    assert build_index(tiny_model, image_folder, out, progress=False).manifest == reopened.manifest
    with pytest.raises(InvalidIndexError, match="overwrite"):
        build_index(tiny_model, image_folder / "sub", out, progress=False)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exact_index_round_trip_keeps_dtype_and_checks_queries(tiny_model, image_folder, tmp_path, dtype):
    """What the retired torch ExactIndex asserted, on the index with the exact backend."""
    out = tmp_path / "index"
    build_index(tiny_model, image_folder, out, dtype=dtype, backend="exact", progress=False)
    array = np.load(out / "embeddings.npy", allow_pickle=False)
    assert array.shape == (len(COLORS), 16) and array.dtype == np.dtype(dtype)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left behind
    index = Index.open(out)
    assert index.embeddings.dtype == np.dtype(dtype) and isinstance(index.backend, ExactBackend)
    q = unit(np.random.default_rng(5).standard_normal((3, 16)))
    scores, rows = index.search(q, 4)
    ref_scores, ref_rows = ExactBackend(array).search(q, 4)
    assert np.array_equal(rows, ref_rows) and np.array_equal(scores, ref_scores)
    assert np.array_equal(index.search(torch.from_numpy(q), 4)[1], rows)  # torch queries too
    with pytest.raises(ValueError, match=r"queries must have shape \(Q, 16\), got \(2, 15\)"):
        index.search(q[:2, :15], 3)
    with pytest.raises(ValueError, match=r"queries must have shape \(Q, 16\), got \(16,\)"):
        index.search(q[0], 3)
    with pytest.raises(ValueError, match="k must be a positive int"):
        index.search(q, 0)
    with pytest.raises(ValueError, match="dtype='bfloat16' must be 'float32' or 'float16'"):
        build_index(tiny_model, image_folder, tmp_path / "other", dtype="bfloat16", progress=False)
    # embeddings.npy replaced by a 1-D array of the same size: refused, naming the file and shapes
    flat = out / "flat.npy"
    np.save(flat, array.reshape(-1), allow_pickle=False)
    assert flat.stat().st_size == (out / "embeddings.npy").stat().st_size
    flat.replace(out / "embeddings.npy")
    with pytest.raises(InvalidIndexError, match=r"embeddings.npy: shape \(128,\) .*the manifest says \(8, 16\)"):
        Index.open(out, verify=False)


def test_search_with_another_model_is_refused(tiny_model, image_folder, tmp_path):
    build_index(tiny_model, image_folder, tmp_path / "index", progress=False)
    other = MMFormer(tiny_model.config, tiny_model.tokenizer)
    with pytest.raises(InvalidIndexError, match="was built with model .* cannot be compared"):
        Retriever(other, Index.open(tmp_path / "index"))


def test_damaged_or_unfinished_index_gives_clear_errors(tiny_model, image_folder, tmp_path):
    out = tmp_path / "index"
    build_index(tiny_model, image_folder, out, progress=False)
    meta = (out / "metadata.jsonl").read_bytes()
    (out / "metadata.jsonl").write_bytes(meta.replace(b"red", b"rex", 1))  # same size, altered
    with pytest.raises(InvalidIndexError, match="metadata.jsonl: checksum mismatch"):
        Index.open(out)
    (out / "metadata.jsonl").write_bytes(meta)
    emb = (out / "embeddings.npy").read_bytes()
    (out / "embeddings.npy").write_bytes(emb[:-7])
    with pytest.raises(InvalidIndexError, match="embeddings.npy: .* bytes, the manifest says .*truncated"):
        Index.open(out)
    (out / "index.json").unlink()
    (out / "parts").mkdir()
    with pytest.raises(InvalidIndexError, match="unfinished build"):
        Index.open(out)


def test_corrupt_images_are_skipped_and_listed(tiny_model, image_folder, tmp_path):
    (image_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    idx = build_index(tiny_model, image_folder, tmp_path / "index", progress=False)
    assert len(idx) == len(COLORS) and idx.manifest["skipped"] == 1
    skipped = [json.loads(line) for line in (tmp_path / "index" / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 1 and skipped[0]["source"].endswith("broken.png") and skipped[0]["reason"]


KILL_AFTER_TWO_PARTS = textwrap.dedent("""
    import os, signal, sys, torch
    import mmformer.retrieval.index as ix
    from mmformer.model import MMFormer
    written = []
    real = ix.write_part
    def write_then_die(parts_dir, prediction):
        real(parts_dir, prediction)
        written.append(prediction["part"])
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    ix.write_part = write_then_die
    model = MMFormer.from_pretrained(sys.argv[1])
    ix.build_index(model, sys.argv[2], sys.argv[3], part_size=2, backend="hnsw", progress=False)
""")


def test_killed_build_resumes_to_the_same_index(tiny_model, image_folder, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model")
    model = MMFormer.from_pretrained(tmp_path / "model")
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_TWO_PARTS, str(tmp_path / "model"), str(image_folder), str(killed)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (killed / "index.json").exists()
    assert sorted(p.name for p in (killed / "parts").glob("part-*")) == [
        "part-000000.json",
        "part-000000.npy",
        "part-000001.json",
        "part-000001.npy",
    ]
    with pytest.raises(InvalidIndexError, match="unfinished build"):
        Index.open(killed)
    embedded = []
    import mmformer.retrieval.index as ix

    real = ix.write_part

    def record(parts_dir, prediction):
        embedded.append(prediction["part"])
        real(parts_dir, prediction)

    ix.write_part = record
    try:
        resumed = build_index(model, image_folder, killed, part_size=2, backend="hnsw", progress=False)
    finally:
        ix.write_part = real
    assert sorted(embedded) == [2, 3]  # only the parts the killed run had not finished
    fresh = build_index(model, image_folder, clean, part_size=2, backend="hnsw", progress=False)
    for name in ("embeddings.npy", "metadata.jsonl", "skipped.jsonl"):
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name
    q = np.asarray(fresh.embeddings)[:3]
    np.testing.assert_array_equal(resumed.search(q, 4)[1], fresh.search(q, 4)[1])


# ---- int8 -------------------------------------------------------------------------------------
def test_int8_model_agrees_with_float_on_bundled_data():
    from mmformer.compress import int8_linear_bytes
    from mmformer.data.emoji import InMemoryImageText

    torch.manual_seed(0)
    tok = Tokenizer.load(default_tokenizer_path())
    model = MMFormer(ModelConfig(vocab_size=tok.vocab_size), tok).eval()  # the tiny preset
    ds = InMemoryImageText.eval_split("test", 64)
    images, captions = ds.stacked_images()[:128], ds.captions[:128]
    q = quantize_int8(model)
    assert q is not model and q.is_int8 and not getattr(model, "is_int8", False)
    with torch.inference_mode():
        cos_i = (model.encode_image(images) * q.encode_image(images)).sum(-1)
        cos_t = (model.encode_texts(captions) * q.encode_texts(captions)).sum(-1)
    assert cos_i.min() > 0.99 and cos_t.min() > 0.99
    (fb, n), (qb, nq) = int8_linear_bytes(model), int8_linear_bytes(q)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())  # 7 a block (share=qkv) + 2
    assert n == nq == n_linear >= 23 and fb / qb > 3.5  # every Linear quantized, ~4x smaller weights


# ---- command line -----------------------------------------------------------------------------
def test_index_build_and_search_commands(tiny_model, image_folder, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "model")
    rows = [{"image": str(p), "caption": f"a {p.stem} square"} for p in sorted(image_folder.rglob("*.png"))]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(
            [
                "index",
                "build",
                "--model",
                str(tmp_path / "model"),
                "--images",
                str(tmp_path / "m.jsonl"),
                "--out",
                str(tmp_path / "index"),
                "--backend",
                "flat",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    target = rows[2]["image"]
    assert main(["search", str(tmp_path / "index"), "a red square", "--image", target, "-k", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [g["query"] for g in got] == ["a red square", target] and all(len(g["hits"]) == 2 for g in got)
    assert got[1]["hits"][0]["metadata"]["path"] == target and got[1]["hits"][0]["score"] > 0.9999
    # the int8 model searches the float model's index (same source fingerprint) and finds the same image
    assert main(["search", str(tmp_path / "index"), "--image", target, "-k", "1", "--int8", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["hits"][0]
    assert top["metadata"]["path"] == target and top["score"] > 0.98
    # a text index searched by image: image->text
    (tmp_path / "t.txt").write_text("\n".join(r["caption"] for r in rows) + "\n")
    assert (
        main(
            [
                "index",
                "build",
                "--model",
                str(tmp_path / "model"),
                "--texts",
                str(tmp_path / "t.txt"),
                "--out",
                str(tmp_path / "tindex"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["search", str(tmp_path / "tindex"), "--image", target, "-k", "3", "--json"]) == 0
    texts = [h["metadata"]["text"] for h in json.loads(capsys.readouterr().out)[0]["hits"]]
    assert len(texts) == 3 and set(texts) <= {r["caption"] for r in rows}
    # evaluation through the index equals exact evaluation for the flat backend
    assert main(["eval", "--index", str(tmp_path / "index"), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["flat"]
    assert m["n_queries"] == len(rows) and 0 <= m["R@1"] <= m["R@5"] <= 100


@pytest.mark.slow
def test_two_process_ddp_build_equals_single_process(tiny_model, image_folder, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model")
    for out, extra in (("one", []), ("two", ["--devices", "2", "--strategy", "ddp"])):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "mmformer.cli",
                "index",
                "build",
                "--model",
                str(tmp_path / "model"),
                "--images",
                str(image_folder),
                "--out",
                str(tmp_path / out),
                "--part-size",
                "3",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "one" / "metadata.jsonl").read_bytes() == (tmp_path / "two" / "metadata.jsonl").read_bytes()
    # equal up to float rounding: each DDP process runs its matmuls with its own thread count
    np.testing.assert_allclose(
        np.load(tmp_path / "one" / "embeddings.npy"), np.load(tmp_path / "two" / "embeddings.npy"), atol=1e-5
    )


def test_index_build_texts_and_search_report_truncated_texts(tiny_model, image_folder, tmp_path, capsys):
    """Texts longer than the context are cut, and the commands say how many (as the service's
    pieces_dropped does); the counts are the library's, from the model's tokenizer."""
    from mmformer.retrieval.embed import pieces_dropped

    tiny_model.save_pretrained(tmp_path / "model")
    keep = tiny_model.config.context_length - 2  # 6 pieces beside bos and eos
    long = "a red square " * 4
    texts = ["red", long, "blue", long + "red"]
    drops = pieces_dropped(tiny_model.tokenizer, texts, tiny_model.config.context_length)
    assert [d > 0 for d in drops] == [False, True, False, True]
    assert drops[1] == len(tiny_model.tokenizer.encode(long)) - keep
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    assert (
        main(
            [
                "index",
                "build",
                "--model",
                str(tmp_path / "model"),
                "--texts",
                str(tmp_path / "t.txt"),
                "--out",
                str(tmp_path / "tindex"),
                "--part-size",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"2 of 4 texts were truncated to {keep} pieces (the model's context_length 8 less bos and eos)" in out
    assert Index.open(tmp_path / "tindex").manifest["truncated"] == 2
    assert main(["search", str(tmp_path / "tindex"), "red", long, "-k", "1"]) == 0
    assert f"1 of 2 text queries was truncated to {keep} pieces" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "tindex"), "red", long, "-k", "1", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [g["pieces_dropped"] for g in got] == [0, drops[1]]
    assert main(["search", str(tmp_path / "tindex"), "red", "blue", "-k", "1"]) == 0
    assert "truncated" not in capsys.readouterr().out
