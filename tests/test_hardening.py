"""Hardening: files a user is given never run code, never cost unbounded memory, and never make
mmformer delete the user's files; errors are one line naming the file.

Each test here failed on the code before these fixes (see the issue of this name)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mmformer.cli import run
from mmformer.training.checkpoint import CheckpointError, check_checkpoint, export_checkpoint


# ---- 1. checkpoints never execute code ------------------------------------------------------------
class Payload:
    """Unpickling this creates ``flag`` (what an attacker's os.system call would do)."""

    def __init__(self, flag: Path) -> None:
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def _tiny_module():
    from mmformer.training.module import MMFormerModule

    return MMFormerModule(
        preset="tiny",
        model_config=dict(width=32, depth=1, heads=2, embed_dim=16, image_size=32, patch_size=8, context_length=8),
    )


def _ckpt_file_with_payload(path: Path, flag: Path) -> Path:
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "mmformer": {"config": {}, "x": Payload(flag)}}, path)
    return path


def _sharded_with_payload(folder: Path, flag: Path, where: str) -> Path:
    """A folder shaped like a sharded (FSDP) checkpoint, written by torch.distributed.checkpoint
    in one process, with the payload in ``meta.pt``, in ``.metadata`` or in a bytes entry."""
    import pickle

    import torch.distributed.checkpoint as dcp

    state = {
        "state_dict": {"model.w": torch.ones(2)},
        "optimizer_0": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]},
    }
    if where == "entry":
        state["state_dict"]["model.extra"] = Payload(flag)
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    torch.save({"epoch": 0, "global_step": 1}, folder / "meta.pt")
    if where == "meta":
        torch.save({"epoch": 0, "x": Payload(flag)}, folder / "meta.pt")
    if where == "metadata":
        with open(folder / ".metadata", "rb") as f:
            md = pickle.load(f)  # our own file, written just above
        md.planner_data = Payload(flag)
        with open(folder / ".metadata", "wb") as f:
            pickle.dump(md, f)
    return folder


def test_a_clean_single_process_sharded_folder_is_readable(tmp_path):
    folder = _sharded_with_payload(tmp_path / "ok.ckpt", tmp_path / "flag", where="none")
    assert check_checkpoint(folder) == folder  # .metadata and the bytes entries load safely


@pytest.mark.parametrize("where", ["meta", "metadata", "entry"])
def test_export_of_a_sharded_folder_never_runs_its_payload(tmp_path, where, capsys):
    flag = tmp_path / "pwned"
    folder = _sharded_with_payload(tmp_path / "evil.ckpt", flag, where)
    with pytest.raises(CheckpointError, match=r"weights_only|not part of a checkpoint index|refused"):
        check_checkpoint(folder)
    assert not flag.exists()
    assert run(["export", "--ckpt", str(folder), "--out", str(tmp_path / "out")]) != 0
    assert not flag.exists()
    err = capsys.readouterr().err
    assert err.startswith("mmformer export: ") and str(folder) in err and len(err.strip().splitlines()) == 1
    with pytest.raises(CheckpointError):
        export_checkpoint(folder, tmp_path / "out")
    assert not flag.exists() and not (tmp_path / "out").exists()


def test_export_of_a_file_never_runs_its_payload(tmp_path, capsys):
    flag = tmp_path / "pwned"
    ckpt = _ckpt_file_with_payload(tmp_path / "evil.ckpt", flag)
    for _ in range(2):
        assert run(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")]) != 0
        assert not flag.exists()
    err = capsys.readouterr().err
    assert f"{ckpt} holds Python objects other than tensors" in err
    assert not (tmp_path / "out").exists()


def test_trainer_fit_with_a_payload_checkpoint_refuses_before_running_it(tmp_path):
    import lightning as L

    flag = tmp_path / "pwned"
    loader = torch.utils.data.DataLoader(_Pairs(), batch_size=4)
    for ckpt in (
        _ckpt_file_with_payload(tmp_path / "evil.ckpt", flag),
        _sharded_with_payload(tmp_path / "evil-dir.ckpt", flag, "meta"),
        _sharded_with_payload(tmp_path / "evil-dir2.ckpt", flag, "metadata"),
    ):
        tr = L.Trainer(
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        with pytest.raises(CheckpointError, match=str(ckpt)):
            tr.fit(_tiny_module(), loader, ckpt_path=str(ckpt))
        assert not flag.exists()


def test_fit_command_with_a_payload_folder_refuses_before_running_it(tmp_path, capsys):
    flag = tmp_path / "pwned"
    folder = _sharded_with_payload(tmp_path / "evil.ckpt", flag, "meta")
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(_FIT_YAML.format(root=tmp_path))
    rc = run(["fit", "--config", str(cfg), "--ckpt_path", str(folder)])
    assert rc != 0 and not flag.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mmformer fit: ") and str(folder) in err[-1]


_FIT_YAML = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {root}
model:
  preset: tiny
  model_config: {{width: 32, depth: 1, heads: 2, embed_dim: 16, image_size: 32, patch_size: 8, context_length: 8}}
data:
  image_size: 32
  batch_size: 8
  max_length: 8
  num_workers: 0
"""


class _Pairs(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return {
            "images": torch.randn(3, 32, 32, generator=g),
            "input_ids": torch.randint(3, 100, (8,), generator=g),
            "attention_mask": torch.ones(8, dtype=torch.bool),
        }


# ---- 2. no user file is ever deleted ----------------------------------------------------------------
COLORS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (20, 40, 230), "black": (5, 5, 5)}


@pytest.fixture(scope="module")
def tiny_model():
    from mmformer.config import ModelConfig
    from mmformer.model import MMFormer
    from mmformer.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.train([f"a {c} square" for c in COLORS] * 10, vocab_size=30)
    cfg = ModelConfig(
        width=32, depth=1, heads=4, image_size=16, patch_size=8, vocab_size=64, context_length=8, embed_dim=16
    )
    return MMFormer(cfg, tok).eval()


@pytest.fixture()
def images(tmp_path):
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    for name, rgb in COLORS.items():
        Image.new("RGB", (20, 20), rgb).save(d / f"{name}.png")
    return d


def _user_folder(path: Path) -> Path:
    (path / "parts").mkdir(parents=True)
    (path / "parts" / "important.txt").write_text("my notes")
    (path / "metadata.jsonl").write_text('{"mine": 1}\n')
    return path


def test_index_build_refuses_a_folder_that_is_not_an_index(tiny_model, images, tmp_path, capsys):
    from mmformer.retrieval import InvalidIndexError, build_index

    out = _user_folder(tmp_path / "user")
    with pytest.raises(InvalidIndexError, match=r"not empty and is not an mmformer index.*--overwrite"):
        build_index(tiny_model, images, out, progress=False)
    tiny_model.save_pretrained(tmp_path / "model")
    rc = run(["index", "build", "--model", str(tmp_path / "model"), "--images", str(images), "--out", str(out)])
    assert rc == 1 and capsys.readouterr().err.startswith(f"mmformer index build: {out} is not empty")
    assert (out / "parts" / "important.txt").read_text() == "my notes"
    assert (out / "metadata.jsonl").read_text() == '{"mine": 1}\n'
    assert sorted(p.name for p in out.rglob("*")) == ["important.txt", "metadata.jsonl", "parts"]
    # an empty folder is fine; --overwrite replaces the folder only once the new index is complete
    idx = build_index(tiny_model, images, out, overwrite=True, progress=False)
    assert len(idx) == len(COLORS) and not (out / "parts").exists()
    assert not list(tmp_path.glob(".user*"))  # no staging folder left behind
    assert len(build_index(tiny_model, images, tmp_path / "empty", progress=False)) == len(COLORS)


def test_failed_overwrite_rebuild_leaves_the_old_index_working(tiny_model, images, tmp_path, monkeypatch):
    import mmformer.retrieval.index as ix
    from mmformer.retrieval import Index, build_index

    out = tmp_path / "index"
    build_index(tiny_model, images, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (images / "extra.png").write_bytes((images / "red.png").read_bytes())

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ix, "_assemble", fail)
    with pytest.raises(OSError, match="disk full"):
        build_index(tiny_model, images, out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert len(Index.open(out, verify=True)) == len(COLORS)
    monkeypatch.undo()
    # a rerun finishes the rebuild (its parts are reused) and swaps it in
    assert len(build_index(tiny_model, images, out, overwrite=True, progress=False)) == len(COLORS) + 1
    assert not list(tmp_path.glob(".index*"))


def test_export_refuses_an_existing_model_folder_unless_overwrite(tmp_path, capsys):
    import lightning as L

    from mmformer.model import MMFormer

    module = _tiny_module()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    out = tmp_path / "trained"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"my trained weights")
    assert run(["export", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(out)]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"my trained weights"
    assert run(["export", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(out), "--overwrite"]) == 0
    MMFormer.from_pretrained(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---- 3. bounded memory per input ------------------------------------------------------------------
MEMORY_PROBE = r"""
import resource, sys, torch
torch.set_num_threads(1)
from mmformer.data.transforms import build_transforms, load_and_transform
tf = build_transforms(64, train=False)
tf_train = build_transforms(64, train=True)
load_and_transform(sys.argv[2], tf)  # warm up allocators and lazy imports before the limit
def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
limit = vm_bytes() + int(float(sys.argv[1]) * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for path in sys.argv[3:]:
    for t in (tf, tf_train):
        out = load_and_transform(path, t)
        assert tuple(out.shape) == (3, 64, 64), out.shape
print("ok")
"""


@pytest.fixture(scope="module")
def hostile_images(tmp_path_factory):
    """A 1 x 1,000,000 grey PNG (2 KB) and a 16-bit 8192 x 8192 grey PNG (about 130 KB)."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("hostile")
    Image.new("L", (1, 1_000_000), 128).save(d / "thin.png")
    Image.new("L", (1_000_000, 1), 128).save(d / "wide.png")
    Image.fromarray(np.full((8192, 8192), 40000, dtype=np.uint16)).save(d / "deep16.png")
    Image.new("RGB", (20, 20), (200, 10, 10)).save(d / "small.png")
    return d


def test_one_input_costs_bounded_memory(hostile_images):
    import subprocess
    import sys

    d = hostile_images
    assert (d / "thin.png").stat().st_size < 10_000 and (d / "deep16.png").stat().st_size < 500_000
    # 1 GiB above what the process holds after imports: the 16-bit image itself decodes to
    # 128 MiB (+ 64 MiB grey, 192 MiB RGB); the old code needed 12 GB / 1.8 GB for these
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_PROBE,
            "1.0",
            str(d / "small.png"),
            str(d / "thin.png"),
            str(d / "wide.png"),
            str(d / "deep16.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_aspect_cap_keeps_eval_output_of_ordinary_images():
    import numpy as np
    from PIL import Image
    from torchvision.transforms import v2

    from mmformer.data.transforms import CapAspect, build_transforms

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (30, 100, 3), dtype=np.uint8))  # 10:3, under the cap
    plain = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(16, antialias=True),
            v2.CenterCrop(16),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.5] * 3),
            v2.ToPureTensor(),
        ]
    )
    assert torch.equal(build_transforms(16, train=False)(img), plain(img))
    long = Image.fromarray(rng.integers(0, 255, (10, 200, 3), dtype=np.uint8))  # 20:1 -> centre 40 x 10
    assert CapAspect(4)(long).size == (40, 10)
    # the central square the eval crop keeps is the same, up to the resize filter at the new edges
    torch.testing.assert_close(build_transforms(16, train=False)(long), plain(long), atol=0.08, rtol=0)


def test_16bit_conversion_is_unchanged_and_chunked(monkeypatch):
    import numpy as np

    import mmformer.data.transforms as T

    rng = np.random.default_rng(0)
    a16 = rng.integers(0, 65536, (37, 53), dtype=np.uint16)
    ref = np.clip(np.rint(a16.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    monkeypatch.setattr(T, "_CHUNK", 100)  # many chunks
    assert np.array_equal(T._high_depth_to_uint8(a16, "I;16"), ref)
    f = rng.random((9, 11)).astype(np.float32)
    f[0, 0] = np.nan
    ref_f = np.clip(np.rint(np.nan_to_num(f.astype(np.float64)) * 255.0), 0, 255).astype(np.uint8)
    assert np.array_equal(T._high_depth_to_uint8(f, "F"), ref_f)


def test_a_transform_failure_is_a_skipped_listed_sample(tiny_model, images, tmp_path, monkeypatch):
    """Any failure of one input (here a MemoryError from the transform) skips and lists it: in
    index build, and in the manifest dataset that training and eval read."""
    import json

    import mmformer.data.transforms as T
    from mmformer.data.errors import CorruptSample
    from mmformer.retrieval import build_index

    real = T.load_image

    def load(src, **kw):
        img = real(src, **kw)
        if str(src).endswith("green.png"):
            img.info["boom"] = True
        return img

    class Boom:
        def __init__(self, tf):
            self.tf = tf

        def __call__(self, img):
            if img.info.get("boom"):
                raise MemoryError("cannot allocate 12 GB")
            return self.tf(img)

    monkeypatch.setattr(T, "load_image", load)
    real_build = T.build_transforms
    import mmformer.retrieval.index as ix

    monkeypatch.setattr(ix, "build_transforms", lambda *a, **k: Boom(real_build(*a, **k)))
    idx = build_index(tiny_model, images, tmp_path / "index", progress=False)
    assert len(idx) == len(COLORS) - 1 and idx.manifest["skipped"] == 1
    skipped = [json.loads(x) for x in (tmp_path / "index" / "skipped.jsonl").read_text().splitlines()]
    assert skipped[0]["source"].endswith("green.png") and "MemoryError" in skipped[0]["reason"]
    from mmformer.data.manifest import ImageTextManifest

    (images / "m.jsonl").write_text("".join(json.dumps({"image": f"{c}.png", "caption": c}) + "\n" for c in COLORS))
    man = ImageTextManifest(images / "m.jsonl", transform=Boom(real_build(16, train=True)))
    with pytest.raises(CorruptSample, match=r"green.png: cannot transform .*MemoryError"):
        man[1]
    assert man[0]["image"].shape == (3, 16, 16)


# ---- 4. one-line errors naming the file, line and field -------------------------------------------
def _saved(tiny_model, path: Path) -> Path:
    tiny_model.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("width", "128", r"'width' must be int, got '128'"),
        ("depth", 2.5, r"'depth' must be int, got 2.5"),
        ("qkv_bias", "false", r"'qkv_bias' must be bool, got 'false'"),
        ("context_length", 4, r"'context_length' = 4 but the weights were saved with 8"),
    ],
)
def test_config_json_is_type_checked_and_cross_checked(tiny_model, tmp_path, field, value, message):
    import json

    from mmformer.model import MMFormer

    d = _saved(tiny_model, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{d / 'config.json'}: .*{message}"):
        MMFormer.from_pretrained(d)


def test_tokenizer_is_cross_checked_and_never_left_stale(tiny_model, tmp_path):
    from mmformer.model import MMFormer
    from mmformer.tokenizer import Tokenizer

    d = _saved(tiny_model, tmp_path / "m")
    big = Tokenizer.train([f"word{i} thing{i * 7} other{i * 13}" for i in range(400)], vocab_size=200)
    assert big.vocab_size > tiny_model.config.vocab_size
    big.save(d / "tokenizer.model")
    with pytest.raises(ValueError, match=r"tokenizer.model has \d+ pieces, more than vocab_size=64"):
        MMFormer.from_pretrained(d)
    # save_pretrained of a model without a tokenizer removes the old tokenizer.model
    _saved(tiny_model, d)
    MMFormer(tiny_model.config, None).save_pretrained(d)
    assert not (d / "tokenizer.model").exists()
    assert MMFormer.from_pretrained(d).tokenizer is None


def test_index_manifest_faiss_file_and_exact_backend_checked_at_open(tiny_model, images, tmp_path):
    import json

    from mmformer.retrieval import Index, InvalidIndexError, build_index

    a = tmp_path / "a"
    build_index(tiny_model, images, a, backend="flat", progress=False)
    (images / "more.png").write_bytes((images / "red.png").read_bytes())
    b = tmp_path / "b"
    build_index(tiny_model, images, b, backend="flat", progress=False)
    # a foreign faiss.index (other ntotal) under a manifest that lists its size and hash
    man = json.loads((a / "index.json").read_text())
    (a / "faiss.index").write_bytes((b / "faiss.index").read_bytes())
    man["files"]["faiss.index"] = json.loads((b / "index.json").read_text())["files"]["faiss.index"]
    (a / "index.json").write_text(json.dumps(man))
    with pytest.raises(InvalidIndexError, match=r"faiss.index: holds 5 vectors of dim 16, .* says 4 of dim 16"):
        Index.open(a)
    # exact search needs no faiss.index
    (a / "faiss.index").unlink()
    assert len(Index.open(a, backend="exact")) == 4
    with pytest.raises(InvalidIndexError, match="faiss.index: missing"):
        Index.open(a)
    for key in ("count", "files", "model"):
        broken = {k: v for k, v in man.items() if k != key}
        (a / "index.json").write_text(json.dumps(broken))
        with pytest.raises(InvalidIndexError, match=rf"index.json: missing or malformed field\(s\) '{key}'"):
            Index.open(a, backend="exact")


def test_non_utf8_inputs_name_the_file_and_line(tiny_model, images, tmp_path, capsys):
    from mmformer.data.manifest import ImageTextManifest, ManifestError

    bad = b'{"image": "red.png", "caption": "ok"}\n{"image": "red.png", "caption": "caf\xe9"}\n'
    (images / "m.jsonl").write_bytes(bad)
    with pytest.raises(ManifestError, match=r"m.jsonl: line 2 is not UTF-8"):
        ImageTextManifest(images / "m.jsonl")
    (images / "m.csv").write_bytes(b"image,caption\nred.png,ok\nred.png,caf\xe9\n")
    with pytest.raises(ManifestError, match=r"m.csv: line 3 is not UTF-8"):
        ImageTextManifest(images / "m.csv")
    (images / "j.jsonl").write_text('{"image": "red.png", "caption": "a"}\n{"image": "red.png", "caption": }\n')
    with pytest.raises(ManifestError, match=r"j.jsonl: line 2 is not valid JSON: .*\(column \d+\)"):
        ImageTextManifest(images / "j.jsonl")
    # tokenizer input and search queries: one line naming file and line
    (tmp_path / "t.txt").write_bytes(b"hello\nwor\xffld\n")
    assert run(["tokenizer", "--input", str(tmp_path / "t.txt"), "--out", str(tmp_path / "tok.model")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mmformer tokenizer: {tmp_path / 't.txt'}: line 2 is not UTF-8") and err.count("\n") == 1
    (tmp_path / "t.jsonl").write_text('{"caption": "a"}\n{"caption": \n')
    assert run(["tokenizer", "--input", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "tok.model")]) == 1
    assert "t.jsonl: line 2 is not valid JSON" in capsys.readouterr().err
    from mmformer.retrieval import build_index

    build_index(tiny_model, images, tmp_path / "index", progress=False)
    _saved(tiny_model, tmp_path / "model")
    assert (
        run(
            [
                "search",
                str(tmp_path / "index"),
                "--model",
                str(tmp_path / "model"),
                "--queries",
                str(tmp_path / "t.txt"),
            ]
        )
        == 1
    )
    assert f"mmformer search: {tmp_path / 't.txt'}: line 2 is not UTF-8" in capsys.readouterr().err


def test_zero_sizes_are_refused_before_any_work(tiny_model, images, tmp_path, capsys):
    _saved(tiny_model, tmp_path / "model")
    for flag in ("--batch-size", "--part-size"):
        rc = run(
            [
                "index",
                "build",
                "--model",
                str(tmp_path / "model"),
                "--images",
                str(images),
                "--out",
                str(tmp_path / "i"),
                flag,
                "0",
            ]
        )
        assert rc == 1 and capsys.readouterr().err.strip() == f"mmformer index build: {flag} must be >= 1, got 0"
        assert not (tmp_path / "i").exists()


def test_search_output_escapes_control_characters(tiny_model, tmp_path, capsys):
    import json

    from PIL import Image

    from mmformer.retrieval import build_index

    Image.new("RGB", (20, 20), (200, 0, 0)).save(tmp_path / "x.png")
    evil = "red\x1b[2J\x1b[H\nfake result line\x9b31m"
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "x.png", "caption": evil}) + "\n")
    build_index(tiny_model, tmp_path / "m.jsonl", tmp_path / "index", progress=False)
    _saved(tiny_model, tmp_path / "model")
    assert run(["search", str(tmp_path / "index"), "red\x1b]0;x\x07", "--model", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x9b" not in out and "\x07" not in out
    assert "red\\x1b[2J\\x1b[H\\nfake result line\\u009b31m" in out and len(out.strip().splitlines()) == 2
    assert run(["search", str(tmp_path / "index"), "red", "--model", str(tmp_path / "model"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["hits"][0]["metadata"]["caption"] == evil


def test_stale_temp_files_of_killed_writers_are_removed_by_the_next_writer(tmp_path):
    import subprocess
    import sys

    from mmformer.files import atomic_dir, write_text_atomic
    from mmformer.training.checkpoint import AtomicCheckpointIO

    # a writer killed inside atomic_path leaves its temp file (its process is gone)
    code = (
        "import os, sys; from mmformer.files import atomic_path\n"
        "held = [atomic_path(os.path.join(sys.argv[1], name)) for name in sys.argv[2:]]\n"
        "for ctx in held:\n"
        "    open(ctx.__enter__(), 'wb').write(b'half')\n"
        "os._exit(0)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), "last.ckpt", "epoch=0-step=3.ckpt", "embeddings.npy", "notes.txt"],
        check=True,
    )
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 4 and all(n.startswith(".") and n.endswith(".tmp") for n in left)
    (tmp_path / ".mine.tmp").write_text("a user's file that only looks like a temp file")
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "last.ckpt")
    assert not [p for p in tmp_path.iterdir() if "ckpt." in p.name and p.name.endswith(".tmp")]
    write_text_atomic(tmp_path / "embeddings.npy", "x")
    with atomic_dir(tmp_path / "sub") as d:
        (d / "f").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".mine.tmp", "last.ckpt", "embeddings.npy", "sub", next(n for n in left if n.startswith(".notes.txt"))]
    )


# ---- eval: unreadable images skipped, listed and counted; empty captions and duplicates ---------
@pytest.fixture()
def eval_set(tiny_model, tmp_path):

    from PIL import Image

    rows = []
    for name, rgb in COLORS.items():
        Image.new("RGB", (20, 20), rgb).save(tmp_path / f"{name}.png")
        rows.append({"image": f"{name}.png", "caption": f"a {name} square"})
    _saved(tiny_model, tmp_path / "model")
    return tmp_path, rows


def _write_rows(path: Path, rows) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _eval(tmp, manifest, *extra, capsys):
    import json

    rc = run(["eval", "--model", str(tmp / "model"), "--data", str(manifest), "--json", *extra])
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc == 0 else None), cap.err


def test_eval_skips_lists_and_counts_unreadable_images(eval_set, capsys):
    tmp, rows = eval_set
    clean = _eval(tmp, _write_rows(tmp / "clean.jsonl", rows), capsys=capsys)[1]
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with_bad = rows[:2] + [{"image": "broken.png", "caption": "a broken square"}] + rows[2:]
    rc, m, err = _eval(tmp, _write_rows(tmp / "bad.jsonl", with_bad), capsys=capsys)
    assert rc == 0 and m["skipped_images"] == 1 and m["n_images"] == len(rows) and m["n_texts"] == len(rows)
    assert "skipped 1 unreadable image(s)" in err and "broken.png: cannot decode image" in err
    assert {k: m[k] for k in clean} == clean  # the metrics of the readable images, as if alone
    rc, _, err = _eval(tmp, tmp / "bad.jsonl", "--strict", capsys=capsys)
    last = err.replace("\r", "\n").strip().splitlines()[-1]  # after the progress bar
    assert rc == 1 and last.startswith("mmformer eval: ") and "broken.png: cannot decode image" in last


def test_eval_warns_on_empty_captions_and_counts_duplicates_once(eval_set, capsys):
    tmp, rows = eval_set
    clean = _eval(tmp, _write_rows(tmp / "clean.jsonl", rows), capsys=capsys)[1]
    noisy = rows + [rows[0]] * 5 + [{"image": "red.png", "caption": "  "}]
    rc, m, err = _eval(tmp, _write_rows(tmp / "noisy.jsonl", noisy), capsys=capsys)
    assert rc == 0 and m["duplicate_rows"] == 5 and m["empty_captions"] == 1
    assert "5 duplicate (image, caption) row(s) counted once (rows 5, 6, 7, 8, 9)" in err
    assert "1 empty caption(s) left out (rows 10)" in err
    assert {k: m[k] for k in clean} == clean


def test_manifest_paths_may_leave_the_folder_unless_root_confines_them(eval_set, capsys):
    from mmformer.data.manifest import ImageTextManifest, ManifestError

    tmp, rows = eval_set
    sub = tmp / "sub"
    sub.mkdir()
    outside = [{"image": f"../{r['image']}", "caption": r["caption"]} for r in rows]
    outside[1]["image"] = str(tmp / "green.png")  # absolute
    man = _write_rows(sub / "m.jsonl", outside)
    assert len(ImageTextManifest(man).image_paths) == len(rows)  # a user's own manifest: fine
    with pytest.raises(ManifestError, match=r"row 1: '../red.png' resolves outside the root"):
        ImageTextManifest(man, confine=sub)
    rc, _, err = _eval(tmp, man, "--root", str(sub), capsys=capsys)
    assert rc == 1 and "resolves outside the root" in err
    (sub / "link.png").symlink_to(tmp / "red.png")
    with pytest.raises(ManifestError, match="link.png' resolves outside"):
        ImageTextManifest(_write_rows(sub / "l.jsonl", [{"image": "link.png", "caption": "x"}]), confine=sub)
    rc, m, _ = _eval(tmp, man, "--root", str(tmp), capsys=capsys)
    assert rc == 0 and m["n_images"] == len(rows)


# ---- a fit on corrupt data fails ----------------------------------------------------------------
def _fit_yaml(tmp: Path, manifest: Path, extra: str = "") -> Path:
    cfg = tmp / "fit.yaml"
    cfg.write_text(
        _FIT_YAML.format(root=tmp).replace("  max_steps: 1\n", "  max_steps: 4\n")
        + f"  train_manifest: {manifest}\n  max_length: 8\n"
        + extra
    )
    return cfg


def test_fit_where_every_sample_is_corrupt_fails(tmp_path, capsys):

    from PIL import Image

    rows = []
    for i in range(16):
        (tmp_path / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
        rows.append({"image": f"bad{i}.png", "caption": f"thing {i}"})
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "good.png")
    man = _write_rows(tmp_path / "train.jsonl", rows)
    cfg = _fit_yaml(tmp_path, man)
    rc = run(["fit", "--config", str(cfg)])
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert rc == 1 and last.startswith("mmformer fit: epoch 0: 16 of 16 training samples were skipped as corrupt")
    assert "bad" in last and not list(tmp_path.rglob("*.ckpt"))
    # a fraction: 4 of 16 corrupt is fine by default, refused with max_skipped_fraction 0.25
    rows = rows[:4] + [{"image": "good.png", "caption": f"thing {i}"} for i in range(4, 16)]
    man = _write_rows(tmp_path / "train.jsonl", rows)
    assert run(["fit", "--config", str(cfg)]) == 0
    rc = run(["fit", "--config", str(cfg), "--data.max_skipped_fraction", "0.25"])
    assert rc == 1 and "4 of 16 training samples were skipped" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--steps", "-1"], "mmformer demo: --steps must be >= 1, got -1"),
        (["demo", "--steps", "0"], "mmformer demo: --steps must be >= 1, got 0"),
        (["demo", "--batch-size", "0"], "mmformer demo: --batch-size must be >= 1, got 0"),
        (["eval", "--model", "nowhere", "--batch-size", "0"], "mmformer eval: --batch-size must be >= 1, got 0"),
    ],
)
def test_bad_counts_are_one_line_errors_before_any_work(tmp_path, argv, message, capsys):
    assert run(argv + (["--out", str(tmp_path / "demo")] if argv[0] == "demo" else [])) == 1
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "demo").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        run(["export", "--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "o"), "--debug"])


def test_fit_ckpt_path_empty_or_truncated_names_the_file(tmp_path, capsys):
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(_FIT_YAML.format(root=tmp_path))
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert run(["fit", "--config", str(cfg), "--ckpt_path", str(empty)]) == 1
    assert capsys.readouterr().err.strip().startswith(f"mmformer fit: checkpoint {empty} is empty (0 bytes)")
    torch.save({"state_dict": {"w": torch.ones(1000)}}, tmp_path / "full.ckpt")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((tmp_path / "full.ckpt").read_bytes()[:1500])
    assert run(["fit", "--config", str(cfg), f"--ckpt_path={cut}"]) == 1
    assert capsys.readouterr().err.strip().startswith(f"mmformer fit: checkpoint {cut} is corrupt or truncated")
