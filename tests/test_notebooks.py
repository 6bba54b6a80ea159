"""The notebooks in ``notebooks/``: committed without outputs, and every cell runs without error.

The run uses the notebooks' small mode (``MMFORMER_NOTEBOOK_FAST=1``: a base model trained for
seconds, a few fine-tuning steps) and writes into a temporary directory
(``MMFORMER_NOTEBOOK_OUT``). The notebooks run in file-name order in one output directory, so
``02_retrieval`` uses the model that ``01_finetune`` saved. A cell that raises (the notebooks'
own ``assert`` checks included) fails the test with the cell's traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

from mmformer.data.emoji import EmojiData
from mmformer.data.icons import icons_data_dir

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600

sys.path.insert(0, str(NB_DIR))
from strip_outputs import RUN_METADATA, RUN_NB_METADATA, strip  # noqa: E402


def test_the_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_finetune.ipynb", "02_retrieval.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]
    run_meta = [i for i, c in enumerate(nb.cells) if any(k in c.metadata for k in RUN_METADATA)]
    run_meta += ["notebook"] if any(k in nb.metadata for k in RUN_NB_METADATA) else []
    assert not dirty and not run_meta, (
        f"{path.name}: cells {dirty} have outputs or execution counts, {run_meta} have run metadata; "
        "strip them with: python notebooks/strip_outputs.py"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_a_parameters_cell_read_from_the_environment(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected one cell tagged 'parameters'"
    assert 'os.environ.get("MMFORMER_NOTEBOOK_FAST"' in tagged[0].source


def test_strip_removes_outputs_counts_and_run_metadata():
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# title"),
            nbformat.v4.new_code_cell(
                "1 + 1",
                execution_count=3,
                metadata={"execution": {"iopub.status.idle": "2026-01-01T00:00:00Z"}, "tags": ["keep"]},
                outputs=[nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=3)],
            ),
        ],
        metadata={"papermill": {}, "kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    assert strip(nb) is True
    code = nb.cells[1]
    assert code.outputs == [] and code.execution_count is None
    assert code.metadata == {"tags": ["keep"]} and "papermill" not in nb.metadata
    assert nb.metadata["kernelspec"]["name"] == "python3" and code.source == "1 + 1"
    assert strip(nb) is False  # idempotent


def test_bundled_icon_data_matches_its_build_info_and_split_rule():
    root = icons_data_dir()
    info = json.loads((root / "build_info.json").read_text())
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    concepts = [json.loads(line) for line in (root / "concepts.jsonl").read_text().splitlines()]
    assert info["package"]["name"] == "@tabler/icons" and info["package"]["license"] == "MIT"
    assert (root / "LICENSE").read_text().startswith("MIT License")
    assert len(rows) == info["stats"]["images"] == len({r["id"] for r in rows}) == len(concepts)
    assert [c["id"] for c in concepts] == [r["id"] for r in rows]
    for r in rows:  # the documented rule, recomputed
        val = int(hashlib.sha1(("val:" + r["id"]).encode()).hexdigest(), 16) % 5 == 0
        assert r["split"] == ("val" if val else "train"), r
        assert r["image"] == f"images/{r['id']}.png" and r["caption"] == r["id"].replace("-", " ")
    splits = {s: sum(r["split"] == s for r in rows) for s in ("train", "val")}
    assert splits == info["stats"]["images_by_split"]
    for r in rows[::40]:
        with Image.open(root / r["image"]) as im:
            assert im.size == (64, 64) and im.mode == "RGBA"
    val = EmojiData.load(root, "val", 64)
    assert len(val) == splits["val"] and val.images.shape[1:] == (3, 64, 64)
    # tags reach the loader as keywords (the concept key is the icon id)
    assert sum(bool(k) for k in val.concept_keywords) > 0.9 * len(val)


@pytest.fixture(scope="module")
def notebook_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("notebooks")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFORMER_NOTEBOOK_FAST", "1")
        mp.setenv("MMFORMER_NOTEBOOK_OUT", str(out))
        mp.delenv("MMFORMER_MODEL", raising=False)  # 02 then takes the model 01 saved
        mp.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns figures into PNG outputs
        mp.setenv("PYTHONWARNINGS", "ignore::DeprecationWarning")
        yield out


def _execute(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NB_DIR)}}
    )
    client.execute()  # raises CellExecutionError (with the cell's traceback) on any error
    return nb


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_finetune_notebook_runs(notebook_out, monkeypatch):
    # "train": a tiny base model trained in the notebook, as on a fresh clone (not runs/demo/model)
    monkeypatch.setenv("MMFORMER_MODEL", "train")
    nb = _execute(NB_DIR / "01_finetune.ipynb")
    # icon samples, the before / after search grids and the curves were drawn
    assert _images(nb) >= 4
    tuned = notebook_out / "icons-finetuned"
    assert {p.name for p in tuned.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model"}
    assert (notebook_out / "base-model" / "model.safetensors").is_file()
    metrics = list((notebook_out / "logs").rglob("metrics.csv"))
    assert len(metrics) == 1 and "val/t2i_R@1" in metrics[0].read_text().splitlines()[0]


def test_retrieval_notebook_runs(notebook_out):
    nb = _execute(NB_DIR / "02_retrieval.ipynb")
    assert _images(nb) >= 2  # text -> image and image -> image results
    assert os.path.isdir(notebook_out / "icons-index")
