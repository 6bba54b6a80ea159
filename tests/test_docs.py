"""The documentation cannot rot: its code blocks run, its commands parse, its benchmark pages
render from their CSV files.

How the blocks run (the mechanism the pages' sources state too):

- Every ```bash and ```python block of ``README.md``, ``docs/getting-started.md`` and
  ``docs/own-data.md`` runs, in page order, in a temporary folder in which the checkout's ``data/``
  and ``train/`` are linked (the README and the getting-started page share one, in that order, so
  the demo is trained once). A Python block is executed in-process; a bash block is
  read one command per line (``\\`` continuations joined, ``#`` comments dropped): a ``mmformer``
  command runs in-process as ``mmformer.cli.run(argv)`` (what the console script runs) and must
  return 0, any other command runs as a subprocess and must exit 0.
- A comment ``<!-- docs-test: {JSON} -->`` on the line before a block adjusts it for the test:
  ``"sub": {"old": "new"}`` replaces text (tiny sizes: two steps of a demo of minutes), ``"skip":
  "why"`` leaves the block out (an install, a server that runs until stopped). The comment is
  invisible on the rendered page. ``"same_as": "PAGE"`` runs nothing but asserts that every command
  line of the block appears verbatim in a block of PAGE, which runs (the README's training lines
  need the data that ``docs/own-data.md`` makes first).
- Every other ``mmformer`` command in a bash block of any page (``docs/**/*.md`` and the README),
  also one started by a launcher (``torchrun ... -m mmformer.cli ...``, ``srun mmformer ...``), is
  parsed without running: argparse verbs by the CLI's own parser, ``fit``/``validate``/``test``
  by the recipe CLI's parser (recipe, class paths and every ``--trainer/--model/--data`` key
  checked), so a renamed verb or flag fails here. Each ``python -m bench.NAME --flag`` names a bench
  module that exists and flags it declares.
- Every CSV under ``docs/benchmarks/data`` starts with the context columns and is rendered by a page.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# pages that run in one folder, in this order (the getting-started page continues from the README's demo)
SESSIONS = {"readme-and-getting-started": ["README.md", "docs/getting-started.md"], "own-data": ["docs/own-data.md"]}
MARKER = re.compile(r"^<!-- docs-test: (?P<json>\{.*\}) -->$")
FENCE = re.compile(r"^```(?P<lang>[A-Za-z0-9_+-]*)\s*$")
LIGHTNING_VERBS = ("fit", "validate", "test", "predict")


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    options: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def adjusted(self) -> str:
        code = self.code
        for old, new in self.options.get("sub", {}).items():
            if old not in code:
                raise AssertionError(f"{self.where}: docs-test sub {old!r} is not in the block")
            code = code.replace(old, new)
        return code


def blocks(page: str) -> list[Block]:
    """The fenced code blocks of a markdown file (top-level and indented), with their docs-test options."""
    lines = (ROOT / page).read_text(encoding="utf-8").split("\n")
    found, i, pending = [], 0, {}
    while i < len(lines):
        stripped = lines[i].strip()
        m = MARKER.match(stripped)
        if m:
            try:
                pending = json.loads(m.group("json"))
            except json.JSONDecodeError as e:
                raise AssertionError(f"{page}:{i + 1}: docs-test comment is not JSON: {e}") from e
            unknown = set(pending) - {"sub", "skip", "same_as"}
            assert not unknown, f"{page}:{i + 1}: unknown docs-test keys {sorted(unknown)} (sub, skip, same_as)"
            i += 1
            continue
        f = FENCE.match(stripped)
        if f and stripped != "```":
            indent = len(lines[i]) - len(lines[i].lstrip())
            start, body = i, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i][indent:])
                i += 1
            found.append(Block(page, start + 1, f.group("lang"), "\n".join(body), pending))
            pending = {}
        elif stripped and not stripped.startswith("<!--"):
            pending = {} if not f else pending
        i += 1
    return found


def commands(code: str) -> list[list[str]]:
    """One argv per command line of a bash block (continuations joined, comments dropped)."""
    out = []
    for line in code.replace("\\\n", " ").split("\n"):
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def _link_checkout(tmp: Path) -> None:
    for name in ("data", "train"):
        (tmp / name).symlink_to(ROOT / name, target_is_directory=True)


def run_bash(block: Block) -> None:
    from mmformer.cli import run

    for argv in commands(block.adjusted()):
        if argv[0] == "mmformer":
            rc = run(argv[1:])
            assert rc == 0, f"{block.where}: `{shlex.join(argv)}` returned {rc}"
        else:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            done = subprocess.run(argv, env=env, capture_output=True, text=True)
            assert done.returncode == 0, (
                f"{block.where}: `{shlex.join(argv)}` exited {done.returncode}:\n{done.stderr[-2000:]}"
            )


def check_same_as(block: Block) -> None:
    other = block.options["same_as"]
    ran = [argv for b in blocks(other) if b.lang == "bash" and "skip" not in b.options for argv in commands(b.code)]
    for argv in commands(block.code):
        assert argv in ran, f"{block.where}: `{shlex.join(argv)}` is not a command that {other} runs"


def run_python(block: Block) -> None:
    code = compile(block.adjusted(), block.where, "exec")
    exec(code, {"__name__": "__main__"})  # noqa: S102 (the page's own code, as a reader runs it)


@pytest.fixture
def process_settings():
    """The commands run in this process set torch's threads and flush denormals (as `mmformer fit`
    does); put both back for the tests that follow."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("session", SESSIONS)
def test_page_blocks_run(session, tmp_path, monkeypatch, process_settings):
    """Every bash and python block of the pages runs at tiny size, in order, in one folder."""
    monkeypatch.chdir(tmp_path)
    _link_checkout(tmp_path)
    for page in SESSIONS[session]:
        ran = 0
        for block in blocks(page):
            if block.lang not in ("bash", "python") or "skip" in block.options:
                continue
            if "same_as" in block.options:
                check_same_as(block)
                continue
            (run_bash if block.lang == "bash" else run_python)(block)
            ran += 1
        assert ran, f"{page}: no block ran"


def _documented_commands() -> list[tuple[str, list[str]]]:
    pages = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md"))
    found = []
    for page in pages:
        for block in blocks(page):
            if block.lang != "bash":
                continue
            for argv in commands(block.code):
                args = mmformer_args(argv)
                if args is not None and not any("$" in a for a in args):
                    found.append((f"{block.where}", args))
    return found


def mmformer_args(argv: list[str]) -> list[str] | None:
    """The arguments of the mmformer command of a line: ``mmformer ARGS``, a launcher's
    ``torchrun ... -m mmformer.cli ARGS`` (or ``python -m mmformer.cli ARGS``), ``srun [OPTIONS]
    mmformer ARGS``; None for a line that runs no mmformer command."""
    if argv[0] == "mmformer":
        return argv[1:]
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m" and argv[i + 1] == "mmformer.cli":
            return argv[i + 2 :]
    if argv[0] == "srun" and "mmformer" in argv:
        return argv[argv.index("mmformer") + 1 :]
    return None


def test_every_documented_command_parses(monkeypatch):
    """Each `mmformer ...` line of every page parses with today's verbs and flags (nothing runs)."""
    monkeypatch.setattr(sys, "argv", ["mmformer"])  # LightningCLI is handed the page's args only
    from mmformer.cli import build_parser, verb_of
    from mmformer.training.recipes import RecipeCLI

    class ParseOnly(RecipeCLI):
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    found = _documented_commands()
    assert len(found) > 20, "expected the pages to hold more mmformer commands"
    for where, argv in found:
        try:
            if argv and argv[0] in LIGHTNING_VERBS:
                ParseOnly(argv[1:], run=False)
            else:
                build_parser(verb_of(argv)).parse_args(argv)  # the verb's flags are declared when it is named
        except SystemExit as e:
            if e.code not in (0, None):
                raise AssertionError(f"{where}: `mmformer {shlex.join(argv)}` does not parse") from e


BENCH_COMMAND = re.compile(r"python -m (?P<module>bench(?:\.diagnostics)?\.[a-z_][a-z0-9_]*)(?![.\w])(?P<args>[^\n`]*)")


def _bench_sources(module: str) -> str:
    """The source of a bench module and of the bench modules it imports (where shared flags live)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"{module} is not a module of bench/"
    text = path.read_text(encoding="utf-8")
    for used in set(re.findall(r"(?:from|import) (bench(?:\.\w+)+)", text)):
        other = ROOT / (used.replace(".", "/") + ".py")
        if other.is_file():
            text += other.read_text(encoding="utf-8")
    return text


def test_every_documented_bench_command_names_existing_flags():
    """Each `python -m bench.NAME --flag ...` on a page names a bench module that exists and flags that
    the module (or a bench module it imports) declares, so a renamed bench or flag fails here."""
    pages = ["README.md", "CHANGELOG.md"] + sorted(str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md"))
    seen = 0
    for page in pages:
        text = (ROOT / page).read_text(encoding="utf-8").replace("\\\n", " ")
        for m in BENCH_COMMAND.finditer(text):
            source = _bench_sources(m.group("module"))
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group("args")):
                assert f'"{flag}"' in source, f"{page}: `python -m {m.group('module')}` has no flag {flag}"
            seen += 1
    assert seen > 10, "expected the benchmark pages to name their bench commands"


def test_benchmark_pages_render_every_csv():
    """Every CSV under docs/benchmarks/data is valid, has the metadata columns, and is rendered by a page."""
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        import csv_tables
    finally:
        sys.path.pop(0)
    bench = DOCS / "benchmarks"
    used = set()
    for page in bench.glob("*.md"):
        text = page.read_text(encoding="utf-8")
        for m in csv_tables.MARKER.finditer(text):
            path = (page.parent / m.group("path")).resolve()
            assert path.is_file(), f"{page.name}: marker names {m.group('path')}, which does not exist"
            used.add(path)
        rendered = csv_tables.expand(text, page.parent)
        assert csv_tables.MARKER.search(rendered) is None, f"{page.name}: a csv marker was left unrendered"
    for path in sorted((bench / "data").glob("*.csv")):
        header, rows = csv_tables.read_csv(path)
        assert header[: len(csv_tables.META)] == list(csv_tables.META), f"{path.name}: header starts {header[:9]}"
        assert rows, f"{path.name}: no rows"
        for i, row in enumerate(rows, start=2):
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2}Z)?", row[0]), (
                f"{path.name} row {i}: date {row[0]!r}"
            )
            assert re.fullmatch(r"[0-9a-f]{7,40}", row[1]), f"{path.name} row {i}: commit {row[1]!r}"
        assert path.resolve() in used, f"{path.name} is rendered by no page of docs/benchmarks"


def test_csv_table_hook_renders_constant_columns_once(tmp_path):
    """Context columns equal in every row become one line above the table; the rest stay columns;
    a pipe in a cell is escaped; a short row or a missing context column is an error naming the file."""
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        import csv_tables
    finally:
        sys.path.pop(0)
    meta = ",".join(csv_tables.META)
    (tmp_path / "t.csv").write_text(
        f"{meta},x,y\n"
        "2026-01-01,abc1234,CPU A,avx2,2,0.5,1.5,2.14.1,2,1,a|b\n"
        "2026-01-02,abc1234,CPU A,avx2,2,0.7,1.9,2.14.1,2,2,c\n"
    )
    out = csv_tables.expand("<!-- csv: t.csv -->", tmp_path).split("\n")
    assert (
        out[0]
        == "*commit: abc1234; cpu model: CPU A; cpu flags: avx2; logical cpus: 2; torch: 2.14.1; torch threads: 2*"
    )
    assert out[2] == "| date | load_start | load_end | x | y |"
    assert out[4] == "| 2026-01-01 | 0.5 | 1.5 | 1 | a\\|b |"
    assert out[-1] == "Data: [t.csv](t.csv)"
    (tmp_path / "short.csv").write_text(f"{meta},x\n2026-01-01,abc1234,A,f,2,1,1,2.14.1,2\n")
    with pytest.raises(ValueError, match=r"short\.csv: row 2 has 9 fields, the header has 10"):
        csv_tables.expand("<!-- csv: short.csv -->", tmp_path)
    (tmp_path / "old.csv").write_text("date,commit,cpu,load,x\n2026-01-01,abc1234,A,1,2\n")
    with pytest.raises(ValueError, match=r"old\.csv: header lacks cpu_model, cpu_flags, logical_cpus"):
        csv_tables.expand("<!-- csv: old.csv -->", tmp_path)
