"""The import rules of docs/architecture.md, as import-linter contracts in pyproject.toml.

``lint-imports`` runs on the package; a copy of the package with one planted violation shows that
the contracts do fail (a contract that never fails checks nothing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path, package_parent: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with ``root``'s pyproject.toml, finding ``mmformer`` under ``package_parent``."""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    cmd = [
        sys.executable,
        "-c",
        "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())",
        "--no-cache",
        str(root / "pyproject.toml"),
    ]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_import_contracts():
    result = lint_imports(ROOT, ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "KEPT" in result.stdout


def test_a_planted_violation_breaks_a_contract(tmp_path):
    shutil.copytree(
        ROOT / "mmformer",
        tmp_path / "mmformer",
        ignore=shutil.ignore_patterns("__pycache__", "_data", "*.safetensors", "*.model"),
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    planted = tmp_path / "mmformer" / "retrieval" / "planted.py"
    planted.write_text("from mmformer.training.module import MMFormerModule\n")
    result = lint_imports(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "mmformer.retrieval.planted -> mmformer.training.module" in result.stdout, result.stdout[-3000:]
    assert "the library never imports the application BROKEN" in result.stdout
