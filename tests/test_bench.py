"""Smoke runs of every core bench in ``bench/`` at tiny sizes: each script's ``main(argv)`` runs in
this process (or its own workers) on a small slice of the bundled emoji data and tiny random models,
writes its rows with ``--csv``, and the CSV must have the run's context columns, the table's
columns and sane values (positive rates, recalls within [0, 100]%, the exact backend's recall 1).
Nothing here asserts a timing."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from bench.common import CONTEXT_COLUMNS
from mmformer.config import get_config
from mmformer.data.emoji import default_data_dir
from mmformer.model import MMFormer
from mmformer.tokenizer import Tokenizer, default_tokenizer_path

pytestmark = pytest.mark.usefixtures("one_thread")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows, f"{path}: no rows"
    missing = [c for c in CONTEXT_COLUMNS if c not in rows[0]]
    assert not missing, f"{path}: no context columns {missing}"
    for r in rows:
        assert r["date"].endswith("Z") and r["commit"] and r["cpu_model"] and r["torch"] == torch.__version__
    return rows


def values(rows, column: str) -> list[float]:
    assert column in rows[0], f"no column {column!r} in {list(rows[0])}"
    return [float(r[column]) for r in rows if r[column] != ""]


def positive(rows, *columns: str) -> None:
    for c in columns:
        vs = values(rows, c)
        assert vs and all(math.isfinite(v) and v > 0 for v in vs), (c, vs)


def recall(rows, *columns: str, scale: float = 100.0) -> None:
    """Every value of ``columns`` within [0, ``scale``] (the library's recalls are percentages)."""
    for c in columns:
        vs = values(rows, c)
        assert vs and all(0.0 <= v <= scale for v in vs), (c, vs)


@pytest.fixture(scope="module")
def emoji(tmp_path_factory) -> Path:
    """A slice of the bundled emoji data: every row of 40 training and 8 validation concepts (all
    families; the test split is the twitter family), images linked, not copied."""
    src = default_data_dir()
    rows = [json.loads(line) for line in (src / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if line]
    by_split: dict[str, list[str]] = {"train": [], "val": []}
    for r in rows:
        if r["split"] in by_split and r["hexcode"] not in by_split[r["split"]]:
            by_split[r["split"]].append(r["hexcode"])
    keep = set(by_split["train"][:40]) | set(by_split["val"][:8])
    dst = tmp_path_factory.mktemp("emoji")
    (dst / "manifest.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows if r["hexcode"] in keep), encoding="utf-8"
    )
    (dst / "images").symlink_to((src / "images").resolve(), target_is_directory=True)
    if (src / "concepts.jsonl").is_file():
        (dst / "concepts.jsonl").write_bytes((src / "concepts.jsonl").read_bytes())
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Random tiny models as ``save_pretrained`` folders: a teacher (the tiny preset) and a student
    two blocks deep (the distill recipe's student)."""
    root = tmp_path_factory.mktemp("models")
    tok = Tokenizer.load(default_tokenizer_path())
    torch.manual_seed(0)
    out = {}
    for name, overrides in (("teacher", {}), ("student", {"depth": 2})):
        model = MMFormer(get_config("tiny", vocab_size=tok.vocab_size, **overrides), tok)
        out[name] = model.save_pretrained(root / name)
    return out


def test_write_csv_puts_the_context_first_and_leaves_missing_cells_empty(tmp_path):
    from bench.common import write_csv

    out = tmp_path / "sub" / "rows.csv"
    out.parent.mkdir()
    out.write_text("old\n")
    write_csv(out, [{"a": 1.23456789, "b": [1, 2]}, {"c": "x", "a": float("nan")}])
    rows = read_csv(out)
    assert list(rows[0])[: len(CONTEXT_COLUMNS)] == list(CONTEXT_COLUMNS)
    assert list(rows[0])[len(CONTEXT_COLUMNS) :] == ["a", "b", "c"]
    assert (rows[0]["a"], rows[0]["b"], rows[0]["c"]) == ("1.23457", "[1, 2]", "")
    assert (rows[1]["a"], rows[1]["b"], rows[1]["c"]) == ("nan", "", "x")
    assert [p.name for p in out.parent.iterdir()] == ["rows.csv"]  # replaced, no temp file left


def test_train_throughput(tmp_path):
    from bench import train_throughput

    out = tmp_path / "tt.csv"
    assert (
        train_throughput.main(
            [
                "--models",
                "tiny",
                "--impls",
                "mmformer,open_clip",
                "--precisions",
                "fp32",
                "--batch-size",
                "2",
                "--steps",
                "1",
                "--warmup-steps",
                "0",
                "--peak-size",
                "64",
                "--peak-reps",
                "1",
                "--peak-seconds",
                "0.01",
                "--cpu-settings",
                "none",
                "--csv",
                str(out),
            ]
        )
        == 0
    )
    rows = read_csv(out)
    assert [r["impl"] for r in rows] == ["mmformer share=qkv", "open_clip"]
    positive(rows, "samples_per_s", "gflop_per_sample", "achieved_tflops", "pct_of_peak", "step_s_median")
    assert all(r["batch"] == "2" and r["precision"] == "fp32" for r in rows)


def test_baseline_recall(tmp_path, emoji):
    from bench import baseline_recall

    out = tmp_path / "br.csv"
    assert (
        baseline_recall.main(
            [
                "--impl",
                "open_clip",
                "--steps",
                "2",
                "--batch-size",
                "8",
                "--data-dir",
                str(emoji),
                "--model-config",
                '{"width": 64, "depth": 1, "heads": 2}',
                "--csv",
                str(out),
            ]
        )
        == 0
    )
    (row,) = read_csv(out)
    assert row["impl"] == "open_clip" and int(row["steps"]) == 2 and int(row["samples_seen"]) == 16
    positive([row], "samples_per_s")
    recall([row], "t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "chance_R@1")
    assert values([row], "t2i_R@1")[0] <= values([row], "t2i_R@5")[0] <= values([row], "t2i_R@10")[0]


def test_retrieval(tmp_path):
    from bench import retrieval

    out = tmp_path / "r.csv"
    assert (
        retrieval.main(
            [
                "--n",
                "2000",
                "--dims",
                "16",
                "--data",
                "clustered",
                "--backends",
                "exact,hnsw,ivfpq",
                "--queries",
                "64",
                "--csv",
                str(out),
            ]
        )
        == 0
    )
    rows = read_csv(out)
    assert [r["backend"] for r in rows] == ["exact", "hnsw", "ivfpq"] and {r["n"] for r in rows} == {"2000"}
    recall(rows, "recall", scale=1.0)
    assert values(rows, "recall")[0] == 1.0  # exact against itself
    positive(rows, "p50_ms", "p99_ms", "b64_ms", "index_mb")


def test_serve(tmp_path, models):
    from bench import serve

    out = tmp_path / "s.csv"
    assert (
        serve.main(
            [
                "--model",
                str(models["student"]),
                "--servers",
                "mmformer,litserve",
                "--kinds",
                "text",
                "--transports",
                "http",
                "--concurrency",
                "2",
                "--seconds",
                "0.3",
                "--warmup",
                "0.1",
                "--csv",
                str(out),
            ]
        )
        == 0
    )
    rows = read_csv(out)
    alone = [r for r in rows if r["table"] == "model alone"]
    load = [r for r in rows if r["table"] == "load"]
    assert [r["batch"] for r in alone] == ["1", "16", "64"]
    positive(alone, "text_ms", "image_ms")
    assert [r["server"] for r in load] == ["mmformer", "litserve"]
    positive(load, "req_s", "p50", "p99", "mean_batch")
    assert all(float(r["p50"]) <= float(r["p99"]) for r in load)


def test_serve_targets_name_each_target_met_or_not():
    from bench.serve import targets

    cost = [{"batch": 1, "text_per": 2.0, "image_per": 4.0}, {"batch": 16, "text_per": 0.5, "image_per": 1.0}]
    row = dict(transport="http", conc=16, p99=40.0)
    rows = [
        {**row, "server": "mmformer", "kind": "text", "req_s": 390.0},
        {**row, "server": "mmformer --no-batching", "kind": "text", "req_s": 100.0},
        {**row, "server": "litserve", "kind": "text", "req_s": 300.0, "p99": 70.0},
        {**row, "server": "mmformer", "kind": "image", "req_s": 300.0, "p99": 55.0},
        {**row, "server": "mmformer --no-batching", "kind": "image", "req_s": 100.0},
        {**row, "server": "litserve", "kind": "image", "req_s": 250.0},
    ]
    image, text = targets(rows, cost)
    assert text == (
        "text over http, c=16: batching 390 req/s, p99 40.0 ms (met: < 50 ms); 3.9x --no-batching = 98% "
        "of the model's batch-16 gain 4.0x (met: >= 90%); 1.30x LitServe (HTTP) 300 req/s p99 70.0 ms "
        "(met: >= 1.3x)"
    )
    assert image.count("NOT met") == 3 and "75% of the model's batch-16 gain 4.0x" in image and "1.20x" in image


def test_memory(tmp_path):
    from bench import memory

    out = tmp_path / "m.csv"
    assert (
        memory.main(
            [
                "--presets",
                "tiny",
                "--precisions",
                "fp32",
                "--ckpt",
                "off",
                "--batch-size",
                "2",
                "--steps",
                "1",
                "--threads",
                "1",
                "--skip-fsdp",
                "--csv",
                str(out),
            ]
        )
        == 0
    )
    (one,) = read_csv(out)
    assert one["table"] == "one process" and one["preset"] == "tiny"
    positive([one], "state_mib", "peak_rss_mib", "samples_s")
    # parameters + gradients + two AdamW moments of fp32 weights: 16 bytes per parameter
    assert float(one["state_mib"]) == pytest.approx(16 * float(one["params_m"]) * 1e6 / 2**20, rel=0.01)


@pytest.mark.slow
def test_memory_fsdp(tmp_path):
    """The FSDP part: three more processes (a minute on a busy 2-core machine), so only with -m slow."""
    from bench import memory

    out = tmp_path / "m.csv"
    assert memory.main(["--presets", "tiny", "--skip-single", "--fsdp-batch-size", "1", "--csv", str(out)]) == 0
    rows = read_csv(out)
    assert [(r["table"], r["world"]) for r in rows] == [("fsdp", "1"), ("fsdp", "2")]
    positive(rows, "param_mib", "opt_mib", "total_mib")
    assert float(rows[1]["ratio"]) == pytest.approx(0.5, abs=0.02)  # two ranks each hold half


def test_distill(tmp_path, models, emoji):
    from bench import distill

    out = tmp_path / "d.csv"
    assert (
        distill.main(
            [
                "--teacher",
                str(models["teacher"]),
                "--runs",
                "distill",
                "--minutes",
                "0.005",
                "--train-batch-size",
                "16",
                "--precision",
                "32-true",
                "--batch-size",
                "4",
                "--data-dir",
                str(emoji),
                "--csv",
                str(out),
            ]
        )
        == 0
    )
    rows = read_csv(out)
    assert [r["run"] for r in rows] == ["teacher", "distill"]
    positive(rows, "images_s", "params")
    recall(rows, "t2i", "i2t", "t2i10")
    assert int(rows[1]["steps"]) >= 1 and float(rows[1]["params"]) < float(rows[0]["params"])


def test_prune(tmp_path, models, emoji):
    from bench import prune

    out = tmp_path / "p.csv"
    assert (
        prune.main(
            [
                "--model",
                str(models["teacher"]),
                "--fractions",
                "0.25",
                "--criteria",
                "magnitude",
                "--normalize",
                "none",
                "--recover",
                "0,1",
                "--batches",
                "1",
                "--batch-size",
                "8",
                "--precision",
                "32-true",
                "--speed-batch",
                "4",
                "--repeats",
                "1",
                "--min-seconds",
                "0",
                "--data-dir",
                str(emoji),
                "--csv",
                str(out),
            ]
        )
        == 0
    )
    rows = read_csv(out)
    assert [(r["removed"], r["steps"]) for r in rows] == [("0%", "0"), ("25%", "0"), ("25%", "1")]
    assert sum(json.loads(rows[1]["heads"])) == 12 - 3  # a quarter of 3 blocks x 4 heads removed
    assert float(rows[1]["params"]) < float(rows[0]["params"])
    recall(rows, "t2i", "i2t")
    positive(rows, "img_s", "txt_s", "img_x", "txt_x")


def test_compress_table(tmp_path, models, emoji):
    from bench import compress_table

    out = tmp_path / "c.csv"
    assert (
        compress_table.main(
            [
                "--teacher",
                str(models["teacher"]),
                "--student",
                str(models["student"]),
                "--out",
                str(tmp_path / "out"),
                "--batch-sizes",
                "2",
                "--repeats",
                "1",
                "--min-seconds",
                "0",
                "--data-dir",
                str(emoji),
                "--csv",
                str(out),
            ]
        )
        == 0
    )
    rows = read_csv(out)
    assert [r["form"].split(" (")[0] for r in rows] == [
        "fp32 PyTorch",
        "fp32 PyTorch",
        "int8 PyTorch",
        "ONNX fp32",
        "ONNX int8",
    ]
    positive(rows, "disk_mb", "img_2", "txt_2", "params_m")
    recall(rows, "t2i", "i2t")
    assert float(rows[2]["disk_mb"]) < float(rows[1]["disk_mb"])  # int8 smaller on disk than fp32


def test_int8(tmp_path):
    from bench import int8

    out = tmp_path / "i.csv"
    assert (
        int8.main(
            [
                "--presets",
                "tiny",
                "--model",
                "none",
                "--batch-sizes",
                "2",
                "--repeats",
                "1",
                "--min-seconds",
                "0",
                "--skip-bf16",
                "--skip-compile",
                "--skip-onnx",
                "--csv",
                str(out),
            ]
        )
        == 0
    )
    rows = read_csv(out)  # the ONNX rows' OnnxModel is smoke-tested by test_compress_table
    assert rows[0]["variant"] == "fp32" and any("int8" in r["variant"] for r in rows)
    positive(rows, "img_2", "txt_2", "file_mb")
    cos = values(rows, "cos_img") + values(rows, "cos_txt")
    assert all(0.9 < c <= 1.0 + 1e-5 for c in cos), cos  # every variant close to fp32


def test_longdoc(tmp_path, models, emoji):
    from bench import longdoc

    out = tmp_path / "l.csv"
    assert (
        longdoc.main(
            [
                "--model",
                str(models["teacher"]),
                "--lengths",
                "14,40",
                "--queries",
                "8",
                "--long-queries",
                "8",
                "--long-from",
                "40",
                "--split-length",
                "40",
                "--cost-lengths",
                "64",
                "--cost-methods",
                "chunked",
                "--repeats",
                "1",
                "--data-dir",
                str(emoji),
                "--csv",
                str(out),
            ]
        )
        == 0
    )
    rows = read_csv(out)
    assert {r["table"] for r in rows} == {"length", "position", "split", "cost"}
    lengths = [r for r in rows if r["table"] == "length"]
    recall(lengths, "ceiling", "first", "mean", "max")
    recall([r for r in rows if r["table"] == "split"], "r1", "neg")
    positive([r for r in rows if r["table"] == "cost"], "chunked_t")


def test_families(tmp_path, emoji):
    from bench import families

    out = tmp_path / "f.csv"
    assert (
        families.main(
            [
                "--families",
                "google",
                "--steps",
                "1",
                "--batch-size",
                "8",
                "--precision",
                "32-true",
                "--data-dir",
                str(emoji),
                "--out",
                str(tmp_path / "runs"),
                "--csv",
                str(out),
            ]
        )
        == 0
    )
    rows = read_csv(out)
    assert [r["held-out"] for r in rows] == ["google"]
    assert all(int(r["steps"]) == 1 and int(r["test images"]) > 0 for r in rows)
    recall(rows, "t2i R@1", "i2t R@1", "t2i R@10")
