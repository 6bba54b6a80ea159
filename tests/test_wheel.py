"""The package as a user gets it: a wheel installed into a fresh virtual environment, run from a
folder outside the checkout, with the checkout on neither ``sys.path`` nor ``PYTHONPATH``.

The wheel is built without build isolation (nothing is downloaded) from a copy of the files it is
built from, so that a ``build/`` folder in the checkout can neither leak stale files into it nor be
written by the test. The fresh environment gets mmformer only from the wheel (``pip install
--no-deps``); its dependencies (torch, lightning, ...) come from the running interpreter's
site-packages through a ``.pth`` line written after the install, so torch is not installed twice.
The wheel carries the bundled datasets (``setup.py``), so ``mmformer demo`` runs with no data
location given at all; ``mmformer eval --data-dir`` reads the checkout's ``data/`` instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILT_FROM = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "mmformer", "data")
TIMEOUT = 900


def _run(argv: list, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.py[cod]", ".*", "_data")  # _data: an in-place build's copy
    src.mkdir()
    for name in BUILT_FROM:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=skip)
        else:
            shutil.copy2(ROOT / name, src / name)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            tmp / "dist",
            src,
        ],
        dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"),
        tmp,
    )
    (whl,) = (tmp / "dist").glob("mmformer-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_env(wheel: Path, tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(the fresh environment's python, its environment variables, a working folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("venv")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], dict(os.environ), tmp)
    python = venv / "bin" / "python"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "MMFORMER_DATA")
    }
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1"
    )
    # pip of the running interpreter installs into the fresh environment, which sees nothing else yet
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], env, tmp)
    site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env, tmp).stdout.strip()
    )
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_mmformer_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))  # appended after site
    work = tmp / "elsewhere"
    work.mkdir()
    assert ROOT not in work.parents
    return python, env, work


def test_wheel_contents(wheel: Path):
    """The tokenizers (CLIP's merges with their license) and the three datasets (with their license
    files) ship; the build scripts do not."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "mmformer/assets/tokenizer.model",
        "mmformer/cli.py",
        "mmformer/assets/clip_bpe_simple_vocab_16e6.txt.gz",
        "mmformer/assets/LICENSE-clip-bpe.txt",
        "mmformer/_data/emoji/manifest.jsonl",
        "mmformer/_data/emoji/concepts.jsonl",
        "mmformer/_data/emoji/LICENSES.md",
        "mmformer/_data/emoji/images/twitter/1F600.png",
        "mmformer/_data/icons/manifest.jsonl",
        "mmformer/_data/icons/LICENSE",
        "mmformer/_data/prose/kjv.txt",
        "mmformer/_data/prose/LICENSE.md",
    ):
        assert name in names, name
    emoji = {p.relative_to(ROOT / "data").as_posix() for p in (ROOT / "data" / "emoji").rglob("*") if p.is_file()}
    assert {f"mmformer/_data/{p}" for p in emoji} <= names  # every file of data/emoji, licenses/ included
    assert not [n for n in names if n.endswith(".pyc") or (n.startswith("mmformer/_data/") and n.endswith(".py"))]
    with zipfile.ZipFile(wheel) as z:
        assert z.read("mmformer/assets/tokenizer.model") == (ROOT / "mmformer/assets/tokenizer.model").read_bytes()


def test_installed_wheel_runs_outside_the_checkout(fresh_env):
    python, env, work = fresh_env
    site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env, work).stdout.strip()
    )

    # the library: imported from the wheel, default tokenizer from the package, the checkout nowhere
    probe = (
        "import json, sys, mmformer\n"
        "from mmformer.training.module import MMFormerModule\n"
        "from mmformer.data.emoji import default_data_dir\n"
        "m = MMFormerModule()\n"
        "print(json.dumps({'file': mmformer.__file__, 'vocab': m.tokenizer.vocab_size, 'path': sys.path,\n"
        "                  'tokenizer': m.hparams.tokenizer, 'data': str(default_data_dir())}))\n"
    )
    got = json.loads(_run([python, "-c", probe], env, work).stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve() == (site / "mmformer" / "__init__.py").resolve()
    assert got["vocab"] == 2000 and got["tokenizer"] is None
    assert Path(got["data"]).resolve() == (site / "mmformer" / "_data" / "emoji").resolve()
    # the running environment's site-packages (on the path through the .pth, for torch) may itself
    # live inside the checkout, as CI's .ci-venv does: it is not the checkout's code
    import sysconfig

    host = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    in_checkout = [
        p
        for p in got["path"]
        if p
        and (Path(p).resolve() == ROOT or ROOT in Path(p).resolve().parents)
        and not any(h == Path(p).resolve() or h in Path(p).resolve().parents for h in host)
    ]
    assert not in_checkout

    # mmformer demo: no data location given -> the copy inside the wheel
    out = work / "demo"
    demo = _run(["mmformer", "demo", "--steps", "2", "--out", out], env, work)
    assert f"loading the bundled emoji data from {site / 'mmformer' / '_data' / 'emoji'}" in demo.stdout
    assert {p.name for p in (out / "model").iterdir()} == {"config.json", "model.safetensors", "tokenizer.model"}
    assert (out / "model" / "tokenizer.model").read_bytes() == (ROOT / "mmformer/assets/tokenizer.model").read_bytes()
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and (out / "search.png").stat().st_size > 0

    # mmformer eval on the saved model, data from the checkout's data/ through --data-dir
    ev = _run(["mmformer", "eval", "--model", out / "model", "--data-dir", ROOT / "data"], env, work)
    rows = {
        line.split()[0]: [float(x) for x in line.split()[1:]]
        for line in ev.stdout.splitlines()
        if line.startswith(("text->image", "image->text"))
    }
    assert set(rows) == {"text->image", "image->text"}
    header = next(line.split() for line in ev.stdout.splitlines() if line.startswith("direction"))
    assert header[1] == "R@1"
    # the same model and held-out split as the demo's own evaluation: the same R@1 as it printed
    for direction, key in (("text->image", "t2i_R@1"), ("image->text", "i2t_R@1")):
        assert rows[direction][0] == pytest.approx(results["test_metrics"][key], abs=0.006), direction
