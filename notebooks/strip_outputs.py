#!/usr/bin/env python3
"""Strip outputs, execution counts and run metadata from notebooks before committing them.

Usage::

    python notebooks/strip_outputs.py                 # every notebooks/*.ipynb
    python notebooks/strip_outputs.py path/to/nb.ipynb ...
    python notebooks/strip_outputs.py --check         # exit 1 and list notebooks that need it

The test suite (``tests/test_notebooks.py``) fails while a committed notebook has outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nbformat

from mmformer.files import write_text_atomic

#: Cell metadata that records a run (nbclient / papermill timings, scroll state), not content.
RUN_METADATA = ("execution", "papermill", "collapsed", "scrolled", "ExecuteTime")
#: Notebook metadata that records a run.
RUN_NB_METADATA = ("papermill", "widgets")


def strip(nb: nbformat.NotebookNode) -> bool:
    """Remove outputs and run metadata in place; True if anything changed."""
    changed = False
    for key in RUN_NB_METADATA:
        if key in nb.metadata:
            del nb.metadata[key]
            changed = True
    for cell in nb.cells:
        for key in RUN_METADATA:
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
        if cell.cell_type == "code":
            if cell.outputs or cell.execution_count is not None:
                cell.outputs, cell.execution_count = [], None
                changed = True
    return changed


def write_atomic(nb: nbformat.NotebookNode, path: Path) -> None:
    """Write ``nb`` to ``path`` as ``nbformat.write`` would, atomically (a temporary file beside
    ``path``, then a rename; :func:`mmformer.files.write_text_atomic`), keeping the file's mode."""
    text = nbformat.writes(nb)
    mode = path.stat().st_mode & 0o777
    write_text_atomic(path, text if text.endswith("\n") else text + "\n")
    os.chmod(path, mode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if any needs stripping")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(Path(__file__).resolve().parent.glob("*.ipynb"))
    dirty = []
    for path in paths:
        if not path.is_file():
            parser.error(f"{path}: no such notebook")
        nb = nbformat.read(path, as_version=4)
        if strip(nb):
            dirty.append(path)
            if not args.check:
                write_atomic(nb, path)
    for path in dirty:
        print(("needs stripping: " if args.check else "stripped: ") + str(path))
    return 1 if args.check and dirty else 0


if __name__ == "__main__":
    sys.exit(main())
