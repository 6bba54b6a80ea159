"""Launches across nodes the standard way, on one machine: two "nodes" on 127.0.0.1, one process
each, started by ``torchrun --nnodes 2`` (or given the environment SLURM's ``srun`` gives its
tasks), gloo on the CPU.

- ``mmformer index build --num-nodes 2 --strategy ddp`` writes the files of a 1-process build:
  the same metadata and manifest entries, the same ids, embeddings within 1e-6;
- ``mmformer fit`` (the tiny-cpu recipe, a tiny model, ``--trainer.num_nodes 2``, strategy ddp,
  per-rank batch 4) ends with the weights of a 1-process run on batches of 8 in the same order
  (fp32, 3 AdamW steps: within 2e-5 absolute + 1e-4 relative; every step's loss within 1e-5
  relative);
- the same build launched with SLURM's variables instead of torchrun's (Lightning's
  ``SLURMEnvironment``) gives the same files again.

Each launch is bounded by :data:`TIMEOUT` seconds; a launch that runs past it is killed and the
test fails with both processes' output.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import free_port

from mmformer.config import ModelConfig
from mmformer.model import MMFormer
from mmformer.retrieval.index import MANIFEST, PARTS, SKIPPED
from mmformer.tokenizer import Tokenizer

pytest.importorskip("faiss")

TIMEOUT = 300  # seconds for one launch (both processes); a loaded 2-core machine needs well under that
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
MMFORMER = [sys.executable, "-m", "mmformer.cli"]
# torchrun's own environment variables and SLURM's: a test launched under either must not leak them
LAUNCH_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "GLOBAL_RANK",
)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, one thread per process, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env


def run_all(commands: list[tuple[list[str], dict[str, str]]], cwd: Path, expect_fail: bool = False) -> list[str]:
    """Start every (argv, env) at once (each in a session of its own) and return their output once
    all have exited 0. When one fails, or :data:`TIMEOUT` s pass, every process group still
    running is killed (torchrun's workers with it) and the test fails with each one's output tail.
    ``expect_fail``: every process must exit non-zero by itself within the timeout instead."""
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    procs = [
        subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for (argv, env), log in zip(commands, logs)
    ]
    deadline, late = time.monotonic() + TIMEOUT, ""
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if None not in codes or (not expect_fail and any(code not in (None, 0) for code in codes)):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                if time.monotonic() >= deadline:
                    late = f" (killed after {TIMEOUT} s)"
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    tails = "\n".join(
        f"--- process {i} (exit {p.returncode}):\n{out[-3000:]}" for i, (p, out) in enumerate(zip(procs, outputs))
    )
    if expect_fail:
        assert not late and all(p.returncode > 0 for p in procs), f"expected every process to fail{late}:\n{tails}"
    elif any(p.returncode != 0 for p in procs):
        pytest.fail(f"launch of {len(procs)} process(es) failed{late}:\n{tails}")
    return outputs


def torchrun(node_rank: int, port: int, args: list[str]) -> list[str]:
    """The line run on node ``node_rank`` of 2 (one process a node), rendezvous at 127.0.0.1:port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--node-rank",
        str(node_rank),
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--max-restarts",
        "0",
        "-m",
        "mmformer.cli",
        *args,
    ]


def slurm_env(task: int, port: int) -> dict[str, str]:
    """What ``srun`` gives task ``task`` of a 2-node job with one task a node (node ``task``), plus
    the rendezvous address Lightning reads from MASTER_ADDR/MASTER_PORT."""
    return clean_env(
        SLURM_NTASKS="2",
        SLURM_NNODES="2",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_PROCID=str(task),
        SLURM_LOCALID="0",
        SLURM_NODEID=str(task),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="mmformer-test",
        SLURM_NODELIST="127.0.0.1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


# ---- index build ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def build_inputs(tmp_path_factory):
    """A tiny saved model, 8 images in a folder, and the index a 1-process build writes (3 parts)."""
    root = tmp_path_factory.mktemp("nodes-index")
    torch.manual_seed(0)
    captions = [f"a {c} square" for c in COLORS] + list(COLORS)
    tok = Tokenizer.train(captions * 5, vocab_size=40)
    cfg = ModelConfig(
        width=32, depth=2, heads=4, image_size=16, patch_size=8, vocab_size=64, context_length=8, embed_dim=16
    )
    MMFormer(cfg, tok).eval().save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    (root / "imgs" / "sub").mkdir(parents=True)
    for i, (name, rgb) in enumerate(COLORS.items()):
        arr = np.clip(np.array(rgb)[None, None] + rng.integers(-15, 15, (20, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "imgs" / ("sub" if i % 2 else "") / f"{name}.png")
    run_all([([*MMFORMER, *build_args(root, "one")], clean_env())], root)
    return root


def build_args(root: Path, out: str, *extra: str) -> list[str]:
    """``mmformer index build`` arguments: the model and images of ``root``, index ``root/out``, 3 parts."""
    return [
        "index",
        "build",
        "--model",
        str(root / "model"),
        "--images",
        str(root / "imgs"),
        "--out",
        str(root / out),
        "--part-size",
        "3",
        "--backend",
        "flat",
        *extra,
    ]


def assert_same_index(one: Path, two: Path) -> None:
    assert (one / "metadata.jsonl").read_bytes() == (two / "metadata.jsonl").read_bytes()
    ids = [json.loads(line)["id"] for line in (one / "metadata.jsonl").read_text().splitlines()]
    assert len(ids) == len(COLORS) and ids == sorted(ids)
    a, b = np.load(one / "embeddings.npy"), np.load(two / "embeddings.npy")
    assert a.shape == b.shape == (len(COLORS), 16)
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    assert (one / SKIPPED).read_bytes() == (two / SKIPPED).read_bytes()
    m1, m2 = (json.loads((d / MANIFEST).read_text()) for d in (one, two))
    for key in (
        "format",
        "count",
        "dim",
        "dtype",
        "metric",
        "kind",
        "backend",
        "backend_params",
        "build",
        "skipped",
        "model",
    ):
        assert m1[key] == m2[key], key
    assert not (two / PARTS).exists()


def test_two_node_torchrun_index_build_equals_one_process(build_inputs):
    root, port = build_inputs, free_port()
    args = build_args(root, "two", "--num-nodes", "2", "--strategy", "ddp")
    outputs = run_all([(torchrun(r, port, args), clean_env()) for r in (0, 1)], root)
    assert_two_members(outputs)
    assert_same_index(root / "one", root / "two")


def test_two_node_slurm_index_build_equals_one_process(build_inputs):
    """The same build with the environment ``srun`` gives each task instead of torchrun's: Lightning
    picks its SLURM environment, takes the ranks from SLURM_PROCID/LOCALID/NODEID and the world
    size from SLURM_NTASKS, and the files are those of the 1-process build."""
    root, port = build_inputs, free_port()
    args = [*MMFORMER, *build_args(root, "slurm", "--num-nodes", "2", "--strategy", "ddp")]
    outputs = run_all([(args, slurm_env(task, port)) for task in (0, 1)], root)
    assert_two_members(outputs)
    assert_same_index(root / "one", root / "slurm")


def test_two_node_build_into_a_foreign_folder_stops_both_nodes_with_one_line(build_inputs, tmp_path):
    """Rank 0 refuses the folder; the other rank stops too (it does not wait for rank 0 forever),
    each with a one-line error."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("not an index")
    root, port = build_inputs, free_port()
    args = build_args(root, "unused", "--num-nodes", "2", "--strategy", "ddp")
    args[args.index("--out") + 1] = str(tmp_path / "taken")
    outputs = run_all([(torchrun(r, port, args), clean_env()) for r in (0, 1)], root, expect_fail=True)
    text = "\n".join(outputs)
    assert "mmformer index build: " in text and "is not an mmformer index" in text, text[-3000:]
    assert "mmformer index build: rank 0 stopped the index build: InvalidIndexError: " in text, text[-3000:]
    assert (tmp_path / "taken" / "notes.txt").read_text() == "not an index"


# ---- fit --------------------------------------------------------------------------------------
FIT_STEPS = 3
FIT_BATCH = 8  # the global batch: 8 in one process, 4 on each of the 2 nodes
TINY_MODEL = "{depth: 1, width: 32, heads: 2, image_size: 32, patch_size: 8, embed_dim: 32, context_length: 8}"


def fit_args(root: Path, per_rank_batch: int, *extra: str) -> list[str]:
    """``mmformer fit`` of the tiny-cpu recipe with a tiny model for :data:`FIT_STEPS` steps, fp32,
    no augmentation (the samples of a step are the same in any number of processes), writing
    under ``root``."""
    return [
        "fit",
        "--config",
        "tiny-cpu",
        "--trainer.max_steps",
        str(FIT_STEPS),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.log_every_n_steps",
        "1",
        "--model.model_config",
        TINY_MODEL,
        "--model.warmup_steps",
        "1",
        "--data.batch_size",
        str(per_rank_batch),
        "--data.augment",
        "false",
        *extra,
    ]


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    """The state dict of the run's ``last.ckpt`` (written by rank 0)."""
    (ckpt,) = root.rglob("last.ckpt")
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_two_node_torchrun_fit_equals_one_process_with_the_same_global_batch(tmp_path):
    run_all([([*MMFORMER, *fit_args(tmp_path / "one", FIT_BATCH)], clean_env())], tmp_path)
    port = free_port()
    args = fit_args(
        tmp_path / "two",
        FIT_BATCH // 2,
        "--trainer.strategy",
        "ddp",
        "--trainer.num_nodes",
        "2",
        "--trainer.devices",
        "1",
    )
    outputs = run_all([(torchrun(r, port, args), clean_env()) for r in (0, 1)], tmp_path)
    assert_two_members(outputs)
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 10
    for name, want in one.items():
        got = two[name]
        if name.endswith("attn.qkv.bias"):
            # the key bias has an exactly-zero gradient (softmax ignores a per-query constant);
            # Adam turns its rounding noise into +-lr steps, so only q and v are compared
            d = want.shape[0] // 3
            got, want = torch.cat([got[:d], got[2 * d :]]), torch.cat([want[:d], want[2 * d :]])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    # every step's loss (rank 0's log) is the loss over the whole global batch: a loss over each
    # node's 4 pairs alone would differ (tests/test_fsdp.py shows by how much)
    losses = [logged_losses(tmp_path / run) for run in ("one", "two")]
    assert len(losses[0]) == FIT_STEPS and len(set(losses[0])) == FIT_STEPS
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def logged_losses(root: Path) -> list[float]:
    """``train/loss`` of every step, from the CSV logger's metrics.csv under ``root``."""
    (path,) = root.rglob("metrics.csv")
    with open(path, newline="") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def assert_two_members(outputs: list[str]) -> None:
    """The launch ran as one world of 2 processes, one a node (Lightning's line for each rank)."""
    text = "\n".join(outputs)
    for rank in (0, 1):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in text, text[-3000:]
