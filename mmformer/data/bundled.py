"""Where the bundled datasets are: ``emoji`` (training/eval), ``icons`` (fine-tuning), ``prose`` (long documents).

The datasets live in the repository's top-level ``data/`` folder (with the scripts that build
them, see ``data/README.md``); a wheel carries a copy inside the package (``mmformer/_data/``,
put there by ``setup.py`` at build time). :func:`bundled_dir` finds one of them, in this order:

1. ``explicit`` (a ``--data-dir`` option or a ``root``/``data_dir`` argument): the dataset's own
   folder, or a folder holding it as ``<name>/`` (like the checkout's ``data/``).
2. ``$MMFORMER_DATA``: a folder holding ``emoji/``, ``icons/``, ``prose/``, or one dataset's own
   folder when it is named after the dataset (``.../emoji``).
3. the repository checkout: ``<repo>/data/<name>`` when the package runs from a source tree
   (an editable install or ``PYTHONPATH``).
4. the copy inside an installed wheel: ``mmformer/_data/<name>``.

When 1. or 2. is given it is the only place looked at (a wrong path is an error, never silently
replaced by another copy). Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATASETS", "ENV_VAR", "BundledDataNotFound", "bundled_dir"]

ENV_VAR = "MMFORMER_DATA"
# dataset name -> the file whose presence marks its folder
DATASETS = {"emoji": "manifest.jsonl", "icons": "manifest.jsonl", "prose": "kjv.txt"}
_HERE = Path(__file__).resolve()
_CHECKOUT = _HERE.parents[2] / "data"  # mmformer/data/bundled.py -> <repo>/data
_PACKAGED = _HERE.parents[1] / "_data"  # mmformer/data/bundled.py -> mmformer/_data (wheel installs)


class BundledDataNotFound(FileNotFoundError):
    """A bundled dataset is in none of the places looked at; the message says how to get it."""


def bundled_dir(name: str, explicit: str | os.PathLike[str] | None = None) -> Path:
    """The folder of the bundled dataset ``name`` (``"emoji"``, ``"icons"`` or ``"prose"``).

    Args:
        name: which dataset.
        explicit: a folder given by the caller; wins over ``$MMFORMER_DATA`` and the defaults.

    Raises:
        ValueError: ``name`` is not a bundled dataset.
        BundledDataNotFound: naming every place looked at and how to get the data.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown bundled dataset {name!r}; expected one of {sorted(DATASETS)}")
    marker = DATASETS[name]
    env = os.environ.get(ENV_VAR) or None
    if explicit is not None:
        where, candidates = f"the given folder {str(explicit)!r}", [Path(explicit), Path(explicit) / name]
    elif env is not None:
        candidates = [Path(env) / name] + ([Path(env)] if Path(env).name == name else [])
        where = f"${ENV_VAR}={env!r}"
    else:
        where, candidates = "the repository checkout or the installed package", [_CHECKOUT / name, _PACKAGED / name]
    for folder in candidates:
        if (folder / marker).is_file():
            return folder
    looked = ", ".join(str(c / marker) for c in candidates)
    raise BundledDataNotFound(
        f"bundled {name} data not found in {where} (looked for {looked}); get it from a checkout of the "
        f"mmformer repository (its data/{name}/ folder) and pass --data-dir DIR or set {ENV_VAR}=DIR "
        f"(DIR = the checkout's data/ or data/{name}/), or rebuild it with 'python data/build_{name}.py'"
    )
