"""Build hook (everything else is in pyproject.toml): a wheel carries the bundled datasets.

``build_py`` copies ``data/emoji``, ``data/icons`` and ``data/prose`` (with their license and
attribution files, without the build scripts) into the wheel as ``mmformer/_data/<name>/``, where
:mod:`mmformer.data.bundled` finds them, so that ``pip install .`` + ``mmformer demo`` work in
any folder. The repository keeps them at the top level in ``data/``; editable installs read them
there and get no copy.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BUNDLED = ("emoji", "icons", "prose")  # folders of data/ that ship in the wheel (about 22 MB zipped)
SKIP = shutil.ignore_patterns("__pycache__", "*.py[cod]", ".*")


class BuildPyWithData(build_py):
    """``build_py``, then ``data/<name>`` -> ``<build_lib>/mmformer/_data/<name>`` for each bundled set."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # editable installs find data/ in the checkout
            return
        for name in BUNDLED:
            src = Path(__file__).resolve().parent / "data" / name
            if not src.is_dir():
                raise SystemExit(
                    f"setup.py: {src} is missing; the wheel bundles data/{', data/'.join(BUNDLED)} "
                    "(build from a full checkout, or rebuild it with data/build_*.py)"
                )
            dst = Path(self.build_lib) / "mmformer" / "_data" / name
            if dst.exists():
                shutil.rmtree(dst)  # no stale files from an earlier build
            shutil.copytree(src, dst, ignore=SKIP)


setup(cmdclass={"build_py": BuildPyWithData})
