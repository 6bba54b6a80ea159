"""The package's layers (docs/architecture.md): each module imports only from layers below it or
from its own package, at module level; no import cycles; function-level mmformer imports only in
cli.py (which loads its verbs lazily to keep ``mmformer --help`` fast).

The checker reads the source with ``ast`` (nothing is imported), so it also runs on a synthetic
tree: the last tests show that it fails on an upward import, a cycle and a hidden import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "mmformer"

# Bottom to top. A module may import any module of a lower layer; inside a layer only modules of
# its own package (e.g. retrieval.index -> retrieval.backends), and never in a cycle.
LAYERS: list[tuple[str, ...]] = [
    ("mmformer.files",),
    ("mmformer.config",),
    ("mmformer.tokenizer",),
    ("mmformer.documents", "mmformer.layers"),
    ("mmformer.model", "mmformer.losses"),
    ("mmformer.data",),
    ("mmformer.compress",),
    ("mmformer.retrieval",),
    ("mmformer.training",),
    ("mmformer.serve",),
    ("mmformer.demo",),
    ("mmformer.cli",),
]
# The package's own __init__ re-exports the public API from these layers and below.
ROOT_INIT_MAX_LAYER = 4
LAZY_IMPORTS_ALLOWED = {"mmformer.cli"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the layer entry it falls under) of an mmformer module."""
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if module == entry or module.startswith(entry + "."):
                return i, entry
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__} and docs/architecture.md")


def imports_of(path: Path, module: str, is_package: bool, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported mmformer module, line, at module level) for every import in ``path``; ``modules``
    are the package's module names (``from mmformer.retrieval import embed`` may name one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, top) for a in child.names if a.name.split(".")[0] == "mmformer")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "mmformer":
                    names = [f"{target}.{a.name}" for a in child.names]
                    out.extend((n if n in modules else target, child.lineno, top) for n in names)
            visit(child, top and not nested)

    visit(tree, True)
    return out


def check(root: Path) -> list[str]:
    """Every layering problem of the package at ``root`` (a folder named mmformer), one line each."""
    # generated gRPC stubs (``*_pb2.py``, ``*_pb2_grpc.py``) follow protoc's import style, not ours
    files = sorted(p for p in root.rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))
    names = {module_name(p, root): p for p in files}
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in names}
    for mod, path in names.items():
        rel = path.relative_to(root.parent)
        for target, line, top in imports_of(path, mod, path.name == "__init__.py", set(names)):
            if target == mod:
                continue
            if target == "mmformer":
                problems.append(f"{rel}:{line}: imports the package root 'mmformer'; import the module itself")
                continue
            if not top and mod not in LAZY_IMPORTS_ALLOWED:
                problems.append(f"{rel}:{line}: function-level import of {target}; import it at module level "
                                "(only mmformer/cli.py may import lazily)")
            graph[mod].add(target if target in names else target.rpartition(".")[0] or target)
            if mod == "mmformer":
                if layer_of(target)[0] > ROOT_INIT_MAX_LAYER:
                    problems.append(f"{rel}:{line}: the package root imports {target} (above layer "
                                    f"{ROOT_INIT_MAX_LAYER}); keep `import mmformer` light")
                continue
            (src, src_entry), (dst, dst_entry) = layer_of(mod), layer_of(target)
            if dst > src:
                problems.append(f"{rel}:{line}: upward import: {mod} (layer {src}, {src_entry}) imports {target} "
                                f"(layer {dst}, {dst_entry})")
            elif dst == src and src_entry != dst_entry:
                problems.append(f"{rel}:{line}: sideways import: {mod} ({src_entry}) imports {target} "
                                f"({dst_entry}) in the same layer")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def test_the_package_keeps_its_layers():
    problems = check(PACKAGE_DIR)
    assert not problems, "layering problems:\n  " + "\n  ".join(problems)


def test_every_module_is_in_a_layer():
    for path in PACKAGE_DIR.rglob("*.py"):
        name = module_name(path, PACKAGE_DIR)
        if name != "mmformer":
            layer_of(name)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "mmformer"
    for rel, text in {"__init__.py": "", "model.py": "", "data/__init__.py": "", **files}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_checker_fails_on_an_upward_import(tmp_path):
    root = _tree(tmp_path, {"model.py": "from mmformer.training.module import MMFormerModule\n",
                            "training/__init__.py": "", "training/module.py": "from mmformer.model import MMFormer\n"})
    problems = check(root)
    assert any("mmformer/model.py:1: upward import: mmformer.model (layer 4" in p
               and "imports mmformer.training.module (layer 8" in p for p in problems), problems
    assert any(p.startswith("import cycle: mmformer.model -> mmformer.training.module -> mmformer.model")
               for p in problems), problems


def test_checker_fails_on_hidden_and_sideways_imports(tmp_path):
    root = _tree(tmp_path, {
        "losses.py": "def f():\n    from mmformer.model import MMFormer\n    return MMFormer\n",
        "documents.py": "from . import layers\n", "layers/__init__.py": "",
        "data/longdoc.py": "import mmformer\n",
    })
    problems = check(root)
    assert any("mmformer/losses.py:2: function-level import of mmformer.model" in p for p in problems), problems
    assert any("mmformer/losses.py:2: sideways import: mmformer.losses (mmformer.losses) imports mmformer.model"
               in p for p in problems), problems
    assert any("mmformer/documents.py:1: sideways import" in p and "mmformer.layers" in p for p in problems), problems
    assert any("mmformer/data/longdoc.py:1: imports the package root" in p for p in problems), problems


def test_checker_accepts_a_clean_tree(tmp_path):
    root = _tree(tmp_path, {"retrieval/__init__.py": "from .index import Index\n",
                            "retrieval/index.py": "from mmformer.model import MMFormer\nfrom mmformer.data import x\n",
                            "cli.py": "def main():\n    from mmformer.retrieval import Index\n"})
    assert check(root) == []


@pytest.mark.parametrize("module,layer", [("mmformer.training.module", 8), ("mmformer.data.transforms", 5),
                                          ("mmformer.layers.attention", 3)])
def test_layer_lookup(module, layer):
    assert layer_of(module)[0] == layer
