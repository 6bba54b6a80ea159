"""The command table of ``mmformer``: help without torch, verbs that match their functions,
no abbreviated flags, quiet training output, and one-line answers for missing optional packages."""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmformer.cli import LIGHTNING_COMMANDS, VERBS, build_parser, load, main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "numpy", "jsonargparse", "grpc")


def python(code: str, *args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_hiding(modules: list[str], argv: list[str], cwd: Path, first: str = "") -> subprocess.CompletedProcess:
    """``mmformer ARGV`` in a fresh process where ``modules`` cannot be imported (``first`` runs
    before they are hidden)."""
    code = (
        f"import sys\n{first}\nfor m in {modules!r}: sys.modules[m] = None\n"
        "from mmformer.cli import run\nsys.exit(run(sys.argv[1:]))"
    )
    return python(code, *argv, cwd=cwd)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        [],
        ["fit", "--help"],
        ["index"],
        *[
            [*verb.split(), "--help"]
            for verb in ("demo", "eval", "export", "index build", "index info", "search", "prune", "serve")
        ],
    ],
)
def test_help_loads_no_torch(argv):
    code = (
        "import sys\nfrom mmformer.cli import run\ntry:\n    run(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = python(code, *argv)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout, proc.stdout[-500:]
    if argv[:1] == ["fit"]:
        help_lines = proc.stdout.split("LOADED")[0].splitlines()
        assert len(help_lines) <= 30 and "--help-all" in proc.stdout and "tiny-cpu" in proc.stdout
    elif argv in (["--help"], []):
        assert all(name.split()[0] in proc.stdout for name in [*VERBS, *LIGHTNING_COMMANDS])


def test_flag_choices_name_the_backends_and_dtypes_there_are():
    from mmformer.retrieval.backends import BACKENDS
    from mmformer.retrieval.index import INDEX_DTYPES
    from mmformer.retrieval.options import BACKEND_CHOICES, INDEX_DTYPE_CHOICES

    assert BACKEND_CHOICES == BACKENDS and INDEX_DTYPE_CHOICES == INDEX_DTYPES


def test_fit_help_all_is_lightnings_full_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--help-all"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mmformer") and len(out.splitlines()) > 200
    assert "--trainer.max_steps" in out and "--model.help" in out


def all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_parsers(sub)


@pytest.mark.parametrize("verb", list(VERBS))
def test_each_verb_parser_matches_its_typed_function(verb):
    """Every flag of a verb is a keyword of its function, every function keyword without a default
    is a required flag, and no parser accepts abbreviated flags."""
    parser = build_parser(verb)
    assert all(not p.allow_abbrev for p in all_parsers(parser))
    words = verb.split()
    sub = parser
    for w in words:
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[w]
    dests = {a.dest for a in sub._actions if not isinstance(a, argparse._HelpAction)} - {"_verb", "_group"}
    params = inspect.signature(load(VERBS[verb].function)).parameters
    assert dests <= set(params), f"{verb}: flags without a keyword: {dests - set(params)}"
    required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
    assert required <= dests, f"{verb}: keywords no flag sets: {required - dests}"


def test_flags_are_never_abbreviated(capsys):
    """``prune --data-d x`` is no ``--data-dir x``, ``index build --image x`` no ``--images x``."""
    for argv, unknown in (
        (["prune", "--model", "m", "--heads", "0.5", "--out", "o", "--data-d", "x"], "--data-d x"),
        (["index", "build", "--model", "m", "--out", "o", "--texts", "t", "--image", "x"], "--image x"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert f"unrecognized arguments: {unknown}" in capsys.readouterr().err


BANNERS = (
    "GPU available",
    "TPU available",
    "HPU available",
    "Tip:",
    "litlogger",
    "log_every_n_steps",
    "logging interval",
    "Seed set to",
)


def test_fit_prints_no_lightning_banner(tmp_path):
    """The first screen of ``mmformer fit`` (the tiny recipe, one step, fewer batches than the
    logging interval) has the progress bar and no device banner, tip or logging-interval warning."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [
        sys.executable,
        "-m",
        "mmformer.cli",
        "fit",
        "--config",
        "tiny-cpu",
        "--trainer.max_steps",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--data.batch_size",
        "8",
        "--model.model_config",
        "{width: 32, depth: 1, heads: 2, embed_dim: 16}",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Epoch 0" in out  # the progress bar
    assert not [b for b in BANNERS if b in out], out[-3000:]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    import torch

    from mmformer.config import ModelConfig
    from mmformer.model import MMFormer
    from mmformer.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("extras")
    texts = ["a red square", "a blue circle", "green", "yellow star"] * 5
    (root / "texts.txt").write_text("\n".join(texts) + "\n")
    torch.manual_seed(0)
    tok = Tokenizer.train(texts, vocab_size=30)
    cfg = ModelConfig(
        width=32,
        depth=1,
        heads=2,
        image_size=16,
        patch_size=8,
        vocab_size=tok.vocab_size,
        context_length=8,
        embed_dim=16,
    )
    MMFormer(cfg, tok).save_pretrained(root / "model")
    return root


@pytest.mark.parametrize(
    "hidden,argv,extra,first",
    [
        (["onnx", "onnxruntime"], ["export", "--model", "model", "--onnx", "out-onnx"], "onnx", ""),
        (
            ["torchao", "torch.ao.quantization"],
            ["index", "build", "--model", "model", "--texts", "texts.txt", "--out", "ix", "--int8"],
            "int8",
            "import torch, torchvision",
        ),
        (["grpc"], ["serve", "--model", "model"], "serve", ""),
    ],
)
def test_a_missing_optional_package_is_one_line_naming_the_extra(saved_model, hidden, argv, extra, first):
    proc = run_hiding(hidden, argv, saved_model, first)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"mmformer {' '.join(argv[:2]) if argv[0] == 'index' else argv[0]}:")
    assert f"pip install 'mmformer[{extra}]'" in lines[0], lines


def test_index_build_prints_its_lines_without_lightning_banners(saved_model, tmp_path):
    """``mmformer index build`` embeds through Lightning's predict loop; its screen is the progress
    bar and its own summary, no device banner or tip."""
    out = tmp_path / "ix"
    proc = python(
        "import sys\nfrom mmformer.cli import run\nsys.exit(run(sys.argv[1:]))",
        "index",
        "build",
        "--model",
        "model",
        "--texts",
        "texts.txt",
        "--out",
        str(out),
        cwd=saved_model,
    )
    screen = proc.stdout + proc.stderr
    assert proc.returncode == 0, screen[-3000:]
    assert f"wrote {out}: 20 text rows" in screen
    assert not [b for b in BANNERS if b in screen], screen[-3000:]
