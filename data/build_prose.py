"""Build ``data/prose/``: long public-domain prose (King James Bible, 1611) for long-document tests.

The text comes from Debian's ``bible-kjv-text`` package (a compressed verse database) and is
decoded with the ``bible`` program of the ``bible-kjv`` package. Both are fetched with
``apt-get download`` (no root needed, nothing is installed), unpacked with ``dpkg-deb -x`` into
a temporary directory, and only a small subset of books is kept:

    data/prose/kjv.txt      one verse per line, verse references removed (about 0.7 MB)
    data/prose/copyright    the package's copyright file (see LICENSE.md)
    data/prose/LICENSE.md   what the license is and where the text came from
    data/prose/build_info.json   package versions, sha256 of the .deb files and of kjv.txt

Usage::

    python data/build_prose.py [--out data/prose]

Requires a Debian/Ubuntu system with ``apt-get`` and ``dpkg-deb`` and an apt source that has the
two packages. The output is written to a temporary folder and renamed into place, so an
interrupted build leaves the old copy untouched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ("bible-kjv-text", "bible-kjv")
# Genesis, Exodus, Psalms, Proverbs: ~0.72 MB of plain text, ~30k verses.
BOOKS = ("gen1:1-gen50:26", "ex1:1-ex40:38", "ps1:1-ps150:6", "pr1:1-pr31:31")
VERSE_REF = re.compile(r"^[1-3]?[A-Z][a-z]{1,2}\d+:\d+ ")


def run(cmd: list[str], cwd: Path) -> str:
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError as e:
        raise SystemExit(f"{cmd[0]} not found: this build needs a Debian-style system ({e})") from e
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {e.returncode}): {e.stderr.strip()}") from e


def build(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        run(["apt-get", "download", *PACKAGES], tmp)
        debs = {p: next(iter(sorted(tmp.glob(f"{p}_*.deb"))), None) for p in PACKAGES}
        missing = [p for p, d in debs.items() if d is None]
        if missing:
            raise SystemExit(f"apt-get download did not produce {missing}")
        root = tmp / "root"
        for deb in debs.values():
            run(["dpkg-deb", "-x", str(deb), str(root)], tmp)
        data_dir, program = root / "usr/lib", root / "usr/bin/bible"
        if not (data_dir / "bible.data").is_file() or not program.is_file():
            raise SystemExit(f"unexpected package layout: need {data_dir}/bible.data and {program}")
        lines: list[str] = []
        for ref in BOOKS:
            for line in run([str(program), "-f", "-p", str(data_dir), ref], tmp).splitlines():
                if not VERSE_REF.match(line):
                    raise SystemExit(f"unexpected line from bible {ref}: {line[:80]!r}")
                lines.append(VERSE_REF.sub("", line).strip())
        text = "\n".join(lines) + "\n"
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            (staging / "kjv.txt").write_text(text, encoding="utf-8")
            (staging / "copyright").write_text(copyright_text(root), encoding="utf-8")
            (staging / "LICENSE.md").write_text(LICENSE_MD, encoding="utf-8")
            info = {
                "packages": {
                    p: {"file": d.name, "sha256": hashlib.sha256(d.read_bytes()).hexdigest()} for p, d in debs.items()
                },
                "books": list(BOOKS),
                "verses": len(lines),
                "kjv.txt": {"bytes": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest()},
            }
            (staging / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            for f in staging.iterdir():
                os.chmod(f, 0o644)
            os.chmod(staging, 0o755)
            if out.exists():
                old = out.with_name(f".{out.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
                os.replace(staging, out)
                shutil.rmtree(old)
            else:
                os.replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    print(f"wrote {out}: {len(lines)} verses, {len(text.encode()) / 1e6:.2f} MB")


def copyright_text(root: Path) -> str:
    """The package's copyright file, with the two lines that name historical download sites
    replaced by a note (this project names no download hosts); the license legend is verbatim."""
    src = (root / "usr/share/doc/bible-kjv-text/copyright").read_text(encoding="utf-8")
    out = []
    for line in src.splitlines():
        if re.search(r"(ftp|sunsite)[.\w]*\.(fi|edu):", line):
            out.append("[a historical download location, omitted in this copy]")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


LICENSE_MD = """# data/prose: license

`kjv.txt` is the text of the King James Version of the Bible (1611): Genesis, Exodus, Psalms
and Proverbs, one verse per line, verse references removed. The translation's copyright has
expired; the text is in the public domain (see `copyright`, the Debian package's copyright
file, which states this and carries the legend of the verse database the text was decoded
from: "Users may copy, modify or distribute this file at will").

Source: the Debian packages `bible-kjv-text` (data) and `bible-kjv` (the `bible` decoder),
version in `build_info.json`. Rebuild with `python data/build_prose.py`.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "prose"))
    args = p.parse_args(argv)
    build(Path(args.out).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
