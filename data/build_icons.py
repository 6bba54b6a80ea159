#!/usr/bin/env python3
"""Rebuild the bundled line-icon image-text dataset (``data/icons``) for fine-tuning.

The dataset pairs Tabler "outline" line icons, rendered here to 64x64 RGBA PNG, with their
human-written names and tags from the same package. The emoji models in this repository never
see line icons, so this is a new domain to fine-tune on (``notebooks/01_finetune.ipynb``).

Input: one npm package at a pinned version, ``@tabler/icons`` (MIT), fetched with ``npm pack``
(the same helper as ``build_emoji.py``). The output is deterministic: the same package version
and the same pillow / resvg-py give byte-identical files.

Usage::

    python data/build_icons.py [--out data/icons] [--cache DIR] [--count 800]

Output layout (relative to ``--out``)::

    images/<name>.png   64x64 RGBA PNG (black strokes on a transparent background)
    manifest.jsonl      one row per image: image, caption, id, family, category, split
    concepts.jsonl      one row per icon: id, name, keywords (the tags), category, split
    LICENSE             the package's MIT license, copied unchanged
    ATTRIBUTION.md      what was taken, from where, under which license
    build_info.json     package version and npm integrity hash, selection rules, counts

Build-only dependencies: node/npm on PATH, ``pillow`` and ``resvg-py`` (``pip install -e
".[build-data]"``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

# build_emoji.py lives next to this script: reuse its npm fetching and PNG helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_emoji import (  # noqa: E402
    Package,
    _count,
    fetch_package,
    normalize_png,
    render_svg,
    replace_dir,
    require_npm,
    write_jsonl,
)

log = logging.getLogger("build_icons")

SIZE = 64  # must match build_emoji.SIZE: normalize_png fits images to this side
ICON_PACKAGE = ("@tabler/icons", "3.52.0")
LICENSE_SPDX = "MIT"
STYLE = "outline"
FAMILY = "tabler-outline"

#: Categories left out: brand logos (trademarks), and bare letter / digit / file-extension glyphs.
EXCLUDED_CATEGORIES = ("Brand", "Letters", "Numbers", "Extensions")
DEFAULT_COUNT = 800  # icons kept, chosen by sha1 of the name among the eligible ones
VAL_MODULUS = 5  # sha1("val:" + name) % VAL_MODULUS == 0 -> "val" (about 20%)

_SVG_START = re.compile(r"<svg\b[^>]*>", re.S)
_NUMBERED = re.compile(r"-\d+$")


def _sha1_int(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16)


def caption_of(name: str) -> str:
    """``"arrow-narrow-up"`` -> ``"arrow narrow up"``."""
    return name.replace("-", " ").strip()


def clean_tags(tags: list[str], caption: str) -> list[str]:
    """Lower-cased tags with dashes as spaces, de-duplicated, without the caption itself."""
    out: dict[str, None] = {}
    for tag in tags:
        t = " ".join(str(tag).replace("-", " ").lower().split())
        if t and t != caption:
            out[t] = None
    return list(out)


def eligible(icons: dict[str, dict]) -> tuple[list[str], dict[str, int]]:
    """Base outline icons: the rules below, with how many icons each rule removed.

    - it has an outline style;
    - its category is not in ``EXCLUDED_CATEGORIES``;
    - its name does not end in a variant number (``-2``, ``-3`` ...);
    - it is not a composite of another icon: no dash-prefix of its name is itself an icon
      (``bell-plus`` and ``bell-ringing`` go because ``bell`` exists). Composites differ from
      their base by a small badge that 64 px hardly shows.
    """
    names = set(icons)
    kept, dropped = [], {"no_outline": 0, "category": 0, "numbered": 0, "composite": 0}
    for name in sorted(icons):
        entry = icons[name]
        parts = name.split("-")
        if STYLE not in entry.get("styles", {}):
            dropped["no_outline"] += 1
        elif entry.get("category") in EXCLUDED_CATEGORIES:
            dropped["category"] += 1
        elif _NUMBERED.search(name):
            dropped["numbered"] += 1
        elif any("-".join(parts[:i]) in names for i in range(1, len(parts))):
            dropped["composite"] += 1
        else:
            kept.append(name)
    return kept, dropped


def select(names: list[str], count: int) -> list[str]:
    """The ``count`` names with the smallest sha1, in name order (stable across machines)."""
    if count > len(names):
        sys.exit(f"error: --count {count} is more than the {len(names)} eligible icons")
    return sorted(sorted(names, key=_sha1_int)[:count])


def split_of(name: str) -> str:
    return "val" if _sha1_int("val:" + name) % VAL_MODULUS == 0 else "train"


def sized_svg(svg: str, path: Path) -> str:
    """The icon's SVG with the root element's width/height set to SIZE (the viewBox scales it)."""
    m = _SVG_START.search(svg)
    if m is None or "viewBox" not in m.group(0):
        raise ValueError(f"{path}: no <svg ... viewBox=...> root element")
    start = m.group(0)
    for attr in ("width", "height"):
        start, n = re.subn(rf'\b{attr}="[^"]*"', f'{attr}="{SIZE}"', start, count=1)
        if n == 0:
            start = start[:-1] + f' {attr}="{SIZE}">'
    return svg[: m.start()] + start + svg[m.end() :]


def check_license(package: Package) -> str:
    """The LICENSE text; exit if the package no longer declares MIT."""
    declared = package.json("package.json").get("license")
    text = (package.root / "LICENSE").read_text(encoding="utf-8")
    if declared != LICENSE_SPDX or not text.startswith("MIT License"):
        sys.exit(
            f"error: {package.spec} declares license {declared!r}; expected {LICENSE_SPDX}. "
            "Review the license before bundling."
        )
    return text


def write_attribution(out: Path, package: Package) -> None:
    lines = [
        "# License and attribution",
        "",
        "Every image in `images/` is a Tabler icon (outline style) from the npm package",
        f"`{package.spec}` (integrity `{package.integrity}`), rasterised from its SVG",
        f"(`icons/{STYLE}/<name>.svg`) to {SIZE}x{SIZE} RGBA PNG by `data/build_icons.py`. The",
        "names, tags and categories in `manifest.jsonl` and `concepts.jsonl` come from the same",
        "package's `icons.json`; names are written with spaces instead of dashes and tags are",
        "lower-cased and de-duplicated. Nothing else was changed.",
        "",
        f"- License: {LICENSE_SPDX}. The package's license text, with its copyright notice, is",
        "  copied unchanged in `LICENSE`; keep it with any copy of these files.",
        "- Project: Tabler Icons.",
        "",
    ]
    (out / "ATTRIBUTION.md").write_text("\n".join(lines), encoding="utf-8")


def build(out: Path, cache: Path, count: int) -> dict:
    """Fetch the package, render the selected icons into a temp dir and swap it into ``out``."""
    npm = require_npm()
    cache.mkdir(parents=True, exist_ok=True)
    package = fetch_package(npm, *ICON_PACKAGE, cache)
    license_text = check_license(package)
    icons = package.json("icons.json")
    names, dropped = eligible(icons)
    chosen = select(names, count)
    log.info("%d icons in %s, %d eligible, %d chosen", len(icons), package.spec, len(names), len(chosen))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        manifest, concepts, blank = [], [], []
        for name in chosen:
            svg_path = package.root / "icons" / STYLE / f"{name}.svg"
            png = normalize_png(render_svg(sized_svg(svg_path.read_text(encoding="utf-8"), svg_path)))
            if png is None:
                blank.append(name)
                continue
            rel = f"images/{name}.png"
            (tmp / rel).write_bytes(png)
            entry, caption, split = icons[name], caption_of(name), split_of(name)
            category = entry.get("category") or ""
            manifest.append(
                {"image": rel, "caption": caption, "id": name, "family": FAMILY, "category": category, "split": split}
            )
            concepts.append(
                {
                    "id": name,
                    "name": caption,
                    "keywords": clean_tags(entry.get("tags") or [], caption),
                    "category": category,
                    "split": split,
                }
            )
        if blank:
            log.warning("blank renders skipped: %s", blank)
        write_jsonl(tmp / "manifest.jsonl", manifest)
        write_jsonl(tmp / "concepts.jsonl", concepts)
        (tmp / "LICENSE").write_text(license_text, encoding="utf-8")
        write_attribution(tmp, package)
        stats = {
            "icons_in_package": len(icons),
            "eligible": len(names),
            "dropped_by_rule": dropped,
            "images": len(manifest),
            "blank_skipped": blank,
            "images_by_split": _count(r["split"] for r in manifest),
            "images_by_category": _count(r["category"] for r in manifest),
            "png_bytes": sum((tmp / r["image"]).stat().st_size for r in manifest),
        }
        info = {
            "package": {
                "name": package.name,
                "version": package.version,
                "integrity": package.integrity,
                "license": LICENSE_SPDX,
            },
            "style": STYLE,
            "image_size": SIZE,
            "selection": {
                "excluded_categories": list(EXCLUDED_CATEGORIES),
                "rules": "outline style; category not excluded; no trailing -<number>; "
                "no dash-prefix of the name is another icon",
                "count": count,
                "order": "smallest sha1(name) first",
            },
            "val_rule": f"int(sha1('val:' + name).hexdigest(), 16) % {VAL_MODULUS} == 0",
            "stats": stats,
        }
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o755)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=here / "icons", help="output directory (default: data/icons next to this script)"
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="keep the downloaded npm package here (default: a temporary dir)"
    )
    parser.add_argument(
        "--count", type=int, default=DEFAULT_COUNT, help=f"number of icons to keep (default {DEFAULT_COUNT})"
    )
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    start = time.monotonic()
    if args.cache is None:
        with tempfile.TemporaryDirectory(prefix="icons-npm-") as cache:
            stats = build(args.out.resolve(), Path(cache), args.count)
    else:
        stats = build(args.out.resolve(), args.cache.resolve(), args.count)
    log.info("done in %.1f s: %s", time.monotonic() - start, json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
