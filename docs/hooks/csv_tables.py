"""mkdocs hook: render the benchmark CSV files into their pages.

A page writes ``<!-- csv: data/NAME.csv -->`` on a line of its own; the hook replaces it with a
markdown table of that file (path relative to the page). Every CSV starts with the run's context
columns (:data:`META`, the columns the benches' ``--csv PATH`` write); those whose value is the same
in every row are stated once in a line above the table instead of repeated per row, and a link to
the CSV file follows the table. Offline: standard library only.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

MARKER = re.compile(r"^<!-- csv: (?P<path>[^ ]+\.csv) -->$", re.MULTILINE)
#: the context columns every benchmark CSV starts with, in this order
META = ("date", "commit", "cpu_model", "cpu_flags", "logical_cpus", "load_start", "load_end", "torch", "torch_threads")


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a benchmark CSV; a row of the wrong width is an error naming the file and row."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path}: empty CSV, expected a header row")
    header, body = rows[0], rows[1:]
    missing = [c for c in META if c not in header]
    if missing:
        raise ValueError(f"{path}: header lacks {', '.join(missing)} (expected {', '.join(META)} first)")
    for i, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}: row {i} has {len(row)} fields, the header has {len(header)}")
    return header, body


def cell(text: str) -> str:
    return text.replace("|", "\\|") if text else " "


def render(path: Path, link: str) -> str:
    """The CSV as a markdown table, its constant metadata columns as one line above it."""
    header, body = read_csv(path)
    constant = [i for i, name in enumerate(header) if name in META and len({r[i] for r in body}) <= 1]
    kept = [i for i in range(len(header)) if i not in constant]
    lines = []
    if body and constant:
        facts = "; ".join(f"{header[i].replace('_', ' ')}: {body[0][i]}" for i in constant)
        lines += [f"*{facts}*", ""]
    lines.append("| " + " | ".join(cell(header[i]) for i in kept) + " |")
    lines.append("|" + "---|" * len(kept))
    lines += ["| " + " | ".join(cell(r[i]) for i in kept) + " |" for r in body]
    lines += ["", f"Data: [{path.name}]({link})"]
    return "\n".join(lines)


def expand(markdown: str, page_dir: Path) -> str:
    return MARKER.sub(lambda m: render(page_dir / m.group("path"), m.group("path")), markdown)


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 (mkdocs hook signature)
    page_dir = Path(config["docs_dir"]) / Path(page.file.src_path).parent
    return expand(markdown, page_dir)
