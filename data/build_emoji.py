#!/usr/bin/env python3
"""Rebuild the bundled multi-vendor emoji image-text dataset.

The dataset pairs English emoji captions (emojibase) with 64x64 RGBA PNG
renderings of the same emoji from five independent artwork families:

    google    Noto Color Emoji PNGs         (emoji-datasource-google)
    twitter   Twemoji PNGs                  (emoji-datasource-twitter)
    openmoji  OpenMoji SVGs, rendered here  (@iconify-json/openmoji)
    emojione  EmojiOne 2.x SVGs, rendered   (@iconify-json/emojione)
    noto      Noto Emoji v1 SVGs, rendered  (@iconify-json/noto-v1)

All inputs are npm packages at pinned versions, fetched with ``npm pack``.
The output is deterministic: the same package versions and the same Python
dependencies (pillow, resvg-py) give byte-identical files.

Usage::

    python data/build_emoji.py [--out data/emoji] [--cache DIR]

Output layout (relative to ``--out``)::

    images/<family>/<HEXCODE>.png   64x64 RGBA PNG
    concepts.jsonl                  one caption record per emoji concept
    manifest.jsonl                  one row per image (image, caption, split)
    LICENSES.md, licenses/          attribution and full license texts
    build_info.json                 package versions, integrity hashes, counts

Build-only dependencies: node/npm on PATH, ``pillow`` and ``resvg-py``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("build_emoji")

# --------------------------------------------------------------------------
# Pinned inputs
# --------------------------------------------------------------------------

SIZE = 64  # every output image is SIZE x SIZE pixels

#: family -> (npm package, exact version). Order here is the output order.
IMAGE_PACKAGES: dict[str, tuple[str, str]] = {
    "google": ("emoji-datasource-google", "16.0.0"),
    "twitter": ("emoji-datasource-twitter", "16.0.0"),
    "openmoji": ("@iconify-json/openmoji", "1.2.29"),
    "emojione": ("@iconify-json/emojione", "1.2.3"),
    "noto": ("@iconify-json/noto-v1", "1.2.5"),
}
FAMILIES = tuple(IMAGE_PACKAGES)
PNG_FAMILIES = ("google", "twitter")  # ship ready-made 64 px PNGs
SVG_FAMILIES = ("openmoji", "emojione", "noto")  # Iconify JSON, rendered here

CAPTION_PACKAGE = ("emojibase-data", "17.0.0")
#: Full SPDX license texts (the Iconify packages carry only an SPDX id).
LICENSE_TEXT_PACKAGE = ("spdx-license-list", "6.12.0")

TEST_FAMILY = "twitter"  # all images of this family form the test split
MIN_FAMILIES = 3  # keep a concept only if it has images in >= this many
VAL_MODULUS = 20  # sha1(hexcode) % VAL_MODULUS == 0  ->  "val" concept

SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
VARIATION_SELECTOR_16 = "FE0F"

#: Per family: icon names of the older Iconify sets that no longer match any
#: current emoji label or Unicode character name, mapped by hand
#: to the emoji they depict.  Every entry was checked visually against the
#: rendered icon; they only apply to icons not already claimed automatically.
#: Deliberately absent: noto-v1 "exclamation-mark"/"question-mark" (blue
#: glyphs, so not clearly the *red* marks U+2757/U+2753), the bare
#: "digit-*", "letter-*", "asterisk", "pound-symbol" glyphs (not emoji).
LEGACY_ICON_NAMES: dict[str, dict[str, str]] = {
    "emojione": {
        "a-button": "1F170",
        "b-button": "1F171",
        "ab-button": "1F18E",
        "o-button": "1F17E",
        "on-arrow": "1F51B",
        "up-text-button": "1F199",
        "exclamation-mark": "2757",
        "question-mark": "2753",
        "heavy-heart-exclamation": "2763",
        "man-with-chinese-cap": "1F472",
        "smiling-cat-face-with-heart-eyes": "1F63B",
        "blond-haired-person": "1F471",
        "flag-for-black-flag": "1F3F4",
        "flag-for-white-flag": "1F3F3",
        "flag-for-chequered-flag": "1F3C1",
        "flag-for-triangular-flag": "1F6A9",
        "flag-for-crossed-flags": "1F38C",
        "flag-for-rainbow-flag": "1F3F3-200D-1F308",
        "flag-for-cocos-islands": "1F1E8-1F1E8",
        "flag-for-macau-sar-china": "1F1F2-1F1F4",
        "flag-for-macedonia": "1F1F2-1F1F0",
        "flag-for-myanmar": "1F1F2-1F1F2",
        "flag-for-swaziland": "1F1F8-1F1FF",
        "flag-for-turkey": "1F1F9-1F1F7",
    },
}

# Attribution per family.  "spdx" is what the packages declare (Iconify
# package.json + info.json; emoji-datasource README for its images) and is
# re-checked by check_licenses().  "holder" is the credit line: where the
# package names no copyright holder, the upstream project's holder is given
# and marked as such.
ATTRIBUTION: dict[str, dict[str, str]] = {
    "google": {
        "artwork": "Noto Color Emoji (googlefonts/noto-emoji) v2.048, as packaged by emoji-datasource",
        "spdx": "Apache-2.0",
        "holder": "Google (Noto Emoji project; holder named from upstream, the package names none)",
        "source": "img/google/64/*.png",
        "note": (
            "The emoji-datasource package's own MIT license (Copyright (c) 2013 Cal "
            "Henderson) covers its code and metadata. Its README states: "
            "'Android/Google/Noto images, are available under the Apache License 2.0'."
        ),
    },
    "twitter": {
        "artwork": "Twemoji (jdecked/twemoji fork) v16.0.1, as packaged by emoji-datasource",
        "spdx": "CC-BY-4.0",
        "holder": (
            "Twitter, Inc and other contributors (Twemoji graphics; holder named from upstream, the package names none)"
        ),
        "source": "img/twitter/64/*.png",
        "note": (
            "The emoji-datasource package's own MIT license (Copyright (c) 2013 Cal "
            "Henderson) covers its code and metadata. Its README states: 'Twitter images "
            "are available under the Creative Commons Attribution 4.0 license'."
        ),
    },
    "openmoji": {
        "artwork": "OpenMoji (hfg-gmuend/openmoji), Iconify JSON edition",
        "spdx": "CC-BY-SA-4.0",
        "holder": "OpenMoji - the open-source emoji and icon project (info.json author: OpenMoji)",
        "source": "icons.json SVG bodies, rasterised to 64x64 PNG by build_emoji.py",
        "note": (
            "ShareAlike: the rasterised PNGs in images/openmoji/ are adaptations and are "
            "distributed under CC-BY-SA-4.0 as well. Suggested credit: 'All emojis "
            "designed by OpenMoji - the open-source emoji and icon project. "
            "License: CC BY-SA 4.0'."
        ),
    },
    "emojione": {
        "artwork": "Emoji One (Colored), EmojiOne 2.x artwork (set version 2.3.0), Iconify JSON edition",
        "spdx": "CC-BY-4.0",
        "holder": "Emoji One (info.json author: 'Emoji One')",
        "source": "icons.json SVG bodies, rasterised to 64x64 PNG by build_emoji.py",
        "note": (
            "Only the free EmojiOne 2.x artwork is CC-BY-4.0; later EmojiOne/JoyPixels "
            "versions are not and are not used here."
        ),
    },
    "noto": {
        "artwork": "Noto Emoji v1 (googlefonts/noto-emoji), Iconify JSON edition",
        "spdx": "Apache-2.0",
        "holder": "Google Inc (info.json author: 'Google Inc')",
        "source": "icons.json SVG bodies, rasterised to 64x64 PNG by build_emoji.py",
        "note": "",
    },
}


# --------------------------------------------------------------------------
# Fetching npm packages
# --------------------------------------------------------------------------


def require_npm() -> str:
    """Return the path of the ``npm`` executable or exit with a clear message."""
    npm = shutil.which("npm")
    if npm is None:
        sys.exit(
            "error: 'npm' was not found on PATH. This build downloads its inputs "
            "with 'npm pack'; install Node.js (which ships npm) and retry."
        )
    return npm


@dataclass
class Package:
    """An unpacked npm package."""

    name: str
    version: str
    root: Path  # the tarball's top-level 'package/' directory
    integrity: str = ""

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    def json(self, relpath: str):
        """Load a JSON file from the package."""
        with open(self.root / relpath, encoding="utf-8") as fh:
            return json.load(fh)


def fetch_package(npm: str, name: str, version: str, cache: Path) -> Package:
    """Download ``name@version`` with ``npm pack`` (once) and unpack it in ``cache``."""
    safe = name.replace("@", "").replace("/", "-")
    dest = cache / f"{safe}-{version}"
    meta_file = dest / "npm-pack.json"
    if not meta_file.exists():
        log.info("fetching %s@%s", name, version)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            proc = subprocess.run(
                [npm, "pack", f"{name}@{version}", "--json", "--pack-destination", tmp],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                sys.exit(f"error: 'npm pack {name}@{version}' failed:\n{proc.stderr.strip()}")
            info = json.loads(proc.stdout)[0]
            unpack = Path(tmp) / "unpacked"
            with tarfile.open(Path(tmp) / info["filename"]) as tar:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12
                    tar.extractall(unpack, filter="data")
                else:
                    tar.extractall(unpack)
            if dest.exists():
                shutil.rmtree(dest)
            unpack.rename(dest)
            meta = {"name": name, "version": info["version"], "integrity": info["integrity"]}
            meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    meta = json.loads(meta_file.read_text())
    if meta["version"] != version:
        sys.exit(f"error: npm returned {name}@{meta['version']}, expected {version}")
    return Package(name, version, dest / "package", meta["integrity"])


# --------------------------------------------------------------------------
# Codepoint helpers
# --------------------------------------------------------------------------


def normalize_hexcode(hexcode: str) -> str:
    """Uppercase a dash-separated codepoint sequence and drop U+FE0F."""
    parts = [p.upper().lstrip("0").zfill(4) for p in re.split(r"[-_ ]", hexcode.strip()) if p]
    return "-".join(p for p in parts if p != VARIATION_SELECTOR_16)


def has_skin_tone(hexcode: str) -> bool:
    """True if the sequence contains a Fitzpatrick skin-tone modifier."""
    return any(p in SKIN_TONES for p in hexcode.split("-"))


def slugify(text: str) -> str:
    """Make an Iconify-style icon name from an emoji label or Unicode name.

    ``"flag: Côte d’Ivoire"`` -> ``"flag-cote-divoire"``,
    ``"keycap: #"`` -> ``"keycap-pound"``, ``"Trinidad & Tobago"`` ->
    ``"trinidad-and-tobago"``.
    """
    for symbol, word in (("&", "and"), ("#", "pound"), ("*", "asterisk"), ("!", "exclamation")):
        text = text.replace(symbol, f" {word} ")
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[’'.]", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def val_split(hexcode: str) -> str:
    """Deterministic concept split: ~1/VAL_MODULUS of concepts are 'val'."""
    digest = int(hashlib.sha1(hexcode.encode("ascii")).hexdigest(), 16)
    return "val" if digest % VAL_MODULUS == 0 else "train"


# --------------------------------------------------------------------------
# Captions (emojibase)
# --------------------------------------------------------------------------


@dataclass
class Concept:
    """One emoji (codepoint sequence) with its English caption."""

    hexcode: str
    emoji: str
    name: str
    keywords: list[str]
    group: str
    unicode_name: str = ""
    images: dict[str, bytes] = field(default_factory=dict)  # family -> PNG bytes

    @property
    def split(self) -> str:
        return val_split(self.hexcode)

    def record(self) -> dict:
        return {
            "hexcode": self.hexcode,
            "emoji": self.emoji,
            "name": self.name,
            "keywords": self.keywords,
            "group": self.group,
            "split": self.split,
        }


def load_concepts(emojibase: Package) -> dict[str, Concept]:
    """Read emojibase's English data; skin-tone variants and group-less entries are dropped.

    Entries without a group are the 26 bare regional-indicator letters, which
    are flag components rather than emoji in their own right.
    """
    groups = emojibase.json("meta/groups.json")["groups"]
    unicode_names = {normalize_hexcode(h): n for h, n in emojibase.json("meta/unicode-names.json").items()}
    concepts: dict[str, Concept] = {}
    for entry in emojibase.json("en/data.json"):
        hexcode = normalize_hexcode(entry["hexcode"])
        if has_skin_tone(hexcode) or entry.get("group") is None:
            continue
        keywords = list(dict.fromkeys(t.lower() for t in entry.get("tags") or []))
        if hexcode in concepts:
            raise ValueError(f"duplicate emojibase hexcode {hexcode}")
        concepts[hexcode] = Concept(
            hexcode=hexcode,
            emoji=entry["emoji"],
            name=entry["label"].lower().strip(),
            keywords=keywords,
            group=groups[str(entry["group"])],
            unicode_name=unicode_names.get(hexcode, ""),
        )
    log.info("emojibase: %d candidate concepts", len(concepts))
    return concepts


# --------------------------------------------------------------------------
# Image normalisation
# --------------------------------------------------------------------------


def fit_to_canvas(image):
    """Return ``image`` as SIZE x SIZE RGBA, scaled to fit and centred."""
    from PIL import Image

    image = image.convert("RGBA")
    if image.size == (SIZE, SIZE):
        return image
    scale = SIZE / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    canvas.paste(image.resize((w, h), Image.Resampling.LANCZOS), ((SIZE - w) // 2, (SIZE - h) // 2))
    return canvas


def encode_png(image) -> bytes:
    """Encode an RGBA image as an optimised PNG (no metadata, deterministic)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def normalize_png(data: bytes) -> bytes | None:
    """Return a SIZE x SIZE RGBA PNG for ``data``, or None if the image is blank.

    Source files that are already SIZE x SIZE RGBA are kept byte-for-byte
    when that is smaller than re-encoding them.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as src:
        src.load()
        already_ok = src.size == (SIZE, SIZE) and src.mode == "RGBA"
        image = fit_to_canvas(src)
    if image.getchannel("A").getextrema()[1] == 0:
        return None
    encoded = encode_png(image)
    return data if already_ok and len(data) <= len(encoded) else encoded


# --------------------------------------------------------------------------
# PNG families (emoji-datasource)
# --------------------------------------------------------------------------


def load_datasource_images(package: Package, vendor: str) -> dict[str, Path]:
    """Map normalised hexcode -> 64 px PNG path for entries with ``has_img_<vendor>``.

    Skin-tone variations (``skin_variations``) are ignored on purpose.
    """
    images: dict[str, Path] = {}
    for entry in package.json("emoji.json"):
        if not entry.get(f"has_img_{vendor}"):
            continue
        path = package.root / "img" / vendor / str(SIZE) / entry["image"]
        if not path.is_file():
            log.warning("%s: listed image missing: %s", vendor, path.name)
            continue
        images[normalize_hexcode(entry["unified"])] = path
    log.info("%s: %d base images listed", vendor, len(images))
    return images


# --------------------------------------------------------------------------
# SVG families (Iconify JSON)
# --------------------------------------------------------------------------


@dataclass
class IconSet:
    """An Iconify JSON icon set (``icons.json``) plus optional ``chars.json``."""

    prefix: str
    icons: dict[str, dict]
    aliases: dict[str, dict]
    defaults: dict[str, float]
    chars: dict[str, str]  # normalised hexcode -> icon name

    @classmethod
    def load(cls, package: Package) -> IconSet:
        data = package.json("icons.json")
        chars_path = package.root / "chars.json"
        chars = {}
        if chars_path.is_file():
            chars = {normalize_hexcode(k): v for k, v in package.json("chars.json").items()}
        defaults = {"left": 0, "top": 0, "width": 16, "height": 16}
        defaults.update({k: data[k] for k in defaults if k in data})
        return cls(data["prefix"], data["icons"], data.get("aliases", {}), defaults, chars)

    def names(self) -> set[str]:
        """All icon and alias names."""
        return set(self.icons) | set(self.aliases)

    def target(self, name: str) -> str:
        """Follow alias chains to the underlying icon name."""
        seen = set()
        while name in self.aliases:
            if name in seen:
                raise ValueError(f"{self.prefix}: alias loop at {name}")
            seen.add(name)
            name = self.aliases[name]["parent"]
        return name

    def resolve(self, name: str) -> dict:
        """Return the icon ``name`` with alias overrides and transforms merged in.

        Iconify aliases may override dimensions and add ``rotate`` (quarter
        turns) and ``hFlip``/``vFlip``; transforms accumulate along the chain.
        """
        chain = []
        while name in self.aliases:
            chain.append(self.aliases[name])
            name = self.aliases[name]["parent"]
        icon = dict(self.defaults, rotate=0, hFlip=False, vFlip=False)
        icon.update(self.icons[name])
        for alias in reversed(chain):  # parent first, outermost alias last
            for key in ("left", "top", "width", "height", "body"):
                if key in alias:
                    icon[key] = alias[key]
            icon["rotate"] = (icon["rotate"] + alias.get("rotate", 0)) % 4
            icon["hFlip"] ^= bool(alias.get("hFlip", False))
            icon["vFlip"] ^= bool(alias.get("vFlip", False))
        return icon


def icon_to_svg(icon: dict) -> str:
    """Build a standalone SIZE x SIZE SVG document from a resolved Iconify icon.

    The icon's box (possibly non-square) is fitted and centred in the square
    canvas by ``preserveAspectRatio="xMidYMid meet"``.
    """
    left, top, width, height = (float(icon[k]) for k in ("left", "top", "width", "height"))
    body = icon["body"]
    transforms = []
    if icon["hFlip"] or icon["vFlip"]:
        sx, sy = (-1 if icon["hFlip"] else 1), (-1 if icon["vFlip"] else 1)
        tx = 2 * left + width if icon["hFlip"] else 0
        ty = 2 * top + height if icon["vFlip"] else 0
        transforms.append(f"translate({tx:g} {ty:g}) scale({sx} {sy})")
    if icon["rotate"]:
        cx, cy = left + width / 2, top + height / 2
        transforms.insert(0, f"rotate({90 * icon['rotate']} {cx:g} {cy:g})")
        if icon["rotate"] % 2:  # quarter turn: the visible box swaps sides
            left, top, width, height = cx - height / 2, cy - width / 2, height, width
    if transforms:
        body = f'<g transform="{" ".join(transforms)}">{body}</g>'
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'width="{SIZE}" height="{SIZE}" viewBox="{left:g} {top:g} {width:g} {height:g}" '
        f'preserveAspectRatio="xMidYMid meet">{body}</svg>'
    )


def render_svg(svg: str) -> bytes:
    """Rasterise an SVG document to PNG bytes with resvg."""
    import resvg_py

    return bytes(resvg_py.svg_to_bytes(svg_string=svg, skip_system_fonts=True))


def match_icons(
    iconset: IconSet,
    concepts: dict[str, Concept],
    legacy_names: dict[str, str],
) -> tuple[dict[str, str], dict[str, int]]:
    """Assign at most one icon to each concept and each icon to at most one concept.

    Matching passes, in priority order:

    1. ``chars.json`` codepoint mapping (OpenMoji only);
    2. slug of the emojibase label, e.g. ``grinning-face``;
    3. the old Iconify flag naming ``flag-for-<country>``;
    4. slug of the Unicode character name (emojibase meta);
    5. the family's hand-checked ``LEGACY_ICON_NAMES`` table.

    Within a pass, a name wanted by several concepts is ambiguous and skipped.
    Returns (normalised hexcode -> icon name, pass name -> number of matches).
    """

    def label_slug(c: Concept) -> str | None:
        return slugify(c.name)

    def flag_for(c: Concept) -> str | None:
        if c.name.startswith("flag: "):
            return "flag-for-" + slugify(c.name[len("flag: ") :])
        return None

    def unicode_slug(c: Concept) -> str | None:
        return slugify(c.unicode_name) if c.unicode_name else None

    available = iconset.names()
    assigned: dict[str, str] = {}
    claimed: set[str] = set()
    pass_counts: dict[str, int] = {}

    def claim(wanted: dict[str, list[str]], pass_name: str) -> None:
        count = 0
        for icon, hexcodes in sorted(wanted.items()):
            target = iconset.target(icon)
            if target in claimed:
                continue
            if len(hexcodes) > 1:
                log.debug("%s/%s: %s ambiguous for %s", iconset.prefix, pass_name, icon, hexcodes)
                continue
            assigned[hexcodes[0]] = icon
            claimed.add(target)
            count += 1
        pass_counts[pass_name] = count
        log.info("%s: %d icons matched by %s", iconset.prefix, count, pass_name)

    wanted: dict[str, list[str]] = {}
    for hexcode, icon in iconset.chars.items():
        if hexcode in concepts and icon in available:
            wanted.setdefault(icon, []).append(hexcode)
    claim(wanted, "chars.json")

    for pass_name, candidate in (
        ("label", label_slug),
        ("flag-for", flag_for),
        ("unicode-name", unicode_slug),
    ):
        wanted = {}
        for hexcode, concept in sorted(concepts.items()):
            icon = candidate(concept)
            if hexcode not in assigned and icon in available:
                wanted.setdefault(icon, []).append(hexcode)
        claim(wanted, pass_name)

    wanted = {
        icon: [hexcode]
        for icon, hexcode in legacy_names.items()
        if icon in available and hexcode in concepts and hexcode not in assigned
    }
    claim(wanted, "legacy-names")
    return assigned, pass_counts


# --------------------------------------------------------------------------
# Collecting images
# --------------------------------------------------------------------------


def collect_png_family(family: str, package: Package, concepts: dict[str, Concept]) -> None:
    """Attach emoji-datasource PNGs of one vendor to the concepts."""
    for hexcode, path in sorted(load_datasource_images(package, family).items()):
        if hexcode in concepts:
            png = normalize_png(path.read_bytes())
            if png is None:
                log.warning("%s: blank image skipped: %s", family, hexcode)
            else:
                concepts[hexcode].images[family] = png


def collect_svg_family(family: str, package: Package, concepts: dict[str, Concept]) -> dict[str, int]:
    """Match, render and attach the icons of one Iconify set to the concepts.

    Returns the number of icons matched by each matching pass.
    """
    iconset = IconSet.load(package)
    legacy = LEGACY_ICON_NAMES.get(family, {})
    matches, pass_counts = match_icons(iconset, concepts, legacy)
    for hexcode, icon in sorted(matches.items()):
        png = normalize_png(render_svg(icon_to_svg(iconset.resolve(icon))))
        if png is None:
            log.warning("%s: blank render skipped: %s (%s)", family, hexcode, icon)
        else:
            concepts[hexcode].images[family] = png
    log.info("%s: %d icons rendered", family, len(matches))
    return pass_counts


# --------------------------------------------------------------------------
# Licenses
# --------------------------------------------------------------------------


def check_licenses(packages: dict[str, Package]) -> None:
    """Fail loudly if a package's declared license differs from ATTRIBUTION."""
    for family in SVG_FAMILIES:
        declared = packages[family].json("info.json")["license"]["spdx"]
        if declared != ATTRIBUTION[family]["spdx"]:
            sys.exit(
                f"error: {family}: info.json license is {declared}, expected "
                f"{ATTRIBUTION[family]['spdx']}; review ATTRIBUTION"
            )
        pkg_license = packages[family].json("package.json")["license"]
        if pkg_license != declared:
            sys.exit(f"error: {family}: package.json license {pkg_license} != info.json {declared}")
    for family in PNG_FAMILIES:
        readme = (packages[family].root / "README.md").read_text(encoding="utf-8")
        phrase = {"google": "Apache License 2.0", "twitter": "Creative Commons Attribution 4.0"}
        if phrase[family] not in readme:
            sys.exit(f"error: {family}: README no longer states '{phrase[family]}'")


def write_licenses(out: Path, packages: dict[str, Package], spdx: Package) -> None:
    """Write LICENSES.md and copy the full license texts into ``licenses/``."""
    lic_dir = out / "licenses"
    lic_dir.mkdir()
    captions = packages["captions"]
    copied = {
        "emoji-datasource-LICENSE.txt": packages["google"].root / "LICENSE",
        "emojibase-data-LICENSE.txt": captions.root / "LICENSE",
    }
    for name, src in copied.items():
        shutil.copyfile(src, lic_dir / name)
    # Unicode-3.0 is included because emojibase's labels/tags come from CLDR.
    for spdx_id in sorted({a["spdx"] for a in ATTRIBUTION.values()} | {"Unicode-3.0"}):
        text = spdx.json(f"licenses/{spdx_id}.json")["licenseText"]
        (lic_dir / f"{spdx_id}.txt").write_text(text.rstrip() + "\n", encoding="utf-8")

    lines = [
        "# Licenses and attribution",
        "",
        "This dataset combines artwork from five emoji families and captions from",
        "emojibase. Each part keeps its own license; full texts are in `licenses/`.",
        "`data/build_emoji.py` copied the 64x64 google/twitter PNGs unchanged (or",
        "re-encoded them losslessly when that was smaller) and rasterised the",
        "openmoji/emojione/noto SVGs to 64x64 PNG; no other changes were made.",
        "",
        "| family | directory | npm package | license | copyright / attribution |",
        "|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        a, p = ATTRIBUTION[family], packages[family]
        lines.append(f"| {family} | `images/{family}/` | `{p.spec}` | {a['spdx']} | {a['holder']} |")
    lines += ["", "## Per family", ""]
    for family in FAMILIES:
        a, p = ATTRIBUTION[family], packages[family]
        lines += [
            f"### {family}",
            "",
            f"- Artwork: {a['artwork']}",
            f"- Package: `{p.spec}` (integrity `{p.integrity}`), files used: {a['source']}",
            f"- License: {a['spdx']} - full text in `licenses/{a['spdx']}.txt`",
            f"- Copyright / attribution: {a['holder']}",
        ]
        if a["note"]:
            lines.append(f"- Note: {a['note']}")
        lines.append("")
    lines += [
        "### captions (concepts.jsonl, manifest.jsonl captions)",
        "",
        f"- Package: `{captions.spec}` (integrity `{captions.integrity}`), files used: "
        "`en/data.json`, `meta/groups.json`, `meta/unicode-names.json`",
        "- License: MIT, Copyright (c) 2017-2019 Miles Johnson - full text in `licenses/emojibase-data-LICENSE.txt`",
        "- The labels and tags are Unicode CLDR emoji annotations as compiled by emojibase",
        "  (per the upstream emojibase project; the npm package itself states only MIT).",
        "  CLDR data is under the Unicode License v3, copied as `licenses/Unicode-3.0.txt`.",
        "",
        "### tooling-only inputs",
        "",
        f"- `{spdx.spec}` (CC0-1.0) supplied the standard license texts in `licenses/`.",
        "- The emoji-datasource MIT license (Cal Henderson) covers that package's code and",
        "  metadata, not the images; it is copied as `licenses/emoji-datasource-LICENSE.txt`.",
        "",
    ]
    (out / "LICENSES.md").write_text("\n".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------
# Writing the dataset
# --------------------------------------------------------------------------


def write_jsonl(path: Path, rows) -> None:
    """Write rows as UTF-8 JSON Lines (non-ASCII kept literal)."""
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def image_split(family: str, concept: Concept) -> str:
    """The test family is held out entirely; other images follow their concept."""
    return "test" if family == TEST_FAMILY else concept.split


def write_dataset(
    out: Path,
    kept: list[Concept],
    packages: dict[str, Package],
    spdx: Package,
    match_passes: dict[str, dict[str, int]],
) -> dict:
    """Write images, JSONL files, licenses and build info into the empty dir ``out``."""
    for family in FAMILIES:
        (out / "images" / family).mkdir(parents=True)
    manifest = []
    for family in FAMILIES:
        for concept in kept:
            png = concept.images.get(family)
            if png is None:
                continue
            rel = f"images/{family}/{concept.hexcode}.png"
            (out / rel).write_bytes(png)
            manifest.append(
                {
                    "image": rel,
                    "caption": concept.name,
                    "hexcode": concept.hexcode,
                    "family": family,
                    "split": image_split(family, concept),
                }
            )
    write_jsonl(out / "concepts.jsonl", (c.record() for c in kept))
    write_jsonl(out / "manifest.jsonl", manifest)
    write_licenses(out, packages, spdx)

    stats = {
        "concepts": len(kept),
        "concepts_by_split": _count(c.split for c in kept),
        "images": len(manifest),
        "images_by_family": {f: sum(f in c.images for c in kept) for f in FAMILIES},
        "images_by_split": _count(r["split"] for r in manifest),
        "concepts_by_family_count": _count(str(len(c.images)) for c in kept),
        "svg_icon_matches_by_pass": match_passes,
    }
    info = {
        "image_size": SIZE,
        "min_families": MIN_FAMILIES,
        "test_family": TEST_FAMILY,
        "val_rule": f"int(sha1(hexcode).hexdigest(), 16) % {VAL_MODULUS} == 0",
        "packages": {
            key: {"name": p.name, "version": p.version, "integrity": p.integrity}
            for key, p in list(packages.items()) + [("license-texts", spdx)]
        },
        "stats": stats,
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return stats


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items()))


def replace_dir(new: Path, out: Path) -> None:
    """Move the finished ``new`` directory to ``out``, replacing any old build."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    new.rename(out)
    if old.exists():
        shutil.rmtree(old)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def build(out: Path, cache: Path) -> dict:
    """Fetch all inputs, build the dataset into a temp dir and swap it into ``out``."""
    npm = require_npm()
    cache.mkdir(parents=True, exist_ok=True)
    packages = {f: fetch_package(npm, *IMAGE_PACKAGES[f], cache) for f in FAMILIES}
    packages["captions"] = fetch_package(npm, *CAPTION_PACKAGE, cache)
    spdx = fetch_package(npm, *LICENSE_TEXT_PACKAGE, cache)
    check_licenses(packages)

    concepts = load_concepts(packages["captions"])
    for family in PNG_FAMILIES:
        collect_png_family(family, packages[family], concepts)
    match_passes = {family: collect_svg_family(family, packages[family], concepts) for family in SVG_FAMILIES}

    kept = [c for _, c in sorted(concepts.items()) if len(c.images) >= MIN_FAMILIES]
    dropped = len(concepts) - len(kept)
    log.info("keeping %d concepts with images in >= %d families (%d dropped)", len(kept), MIN_FAMILIES, dropped)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        stats = write_dataset(tmp, kept, packages, spdx, match_passes)
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
        "--out", type=Path, default=here / "emoji", help="output directory (default: data/emoji next to this script)"
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="keep downloaded npm packages here (default: a temporary dir)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)

    start = time.monotonic()
    if args.cache is None:
        with tempfile.TemporaryDirectory(prefix="emoji-npm-") as cache:
            stats = build(args.out.resolve(), Path(cache))
    else:
        stats = build(args.out.resolve(), args.cache.resolve())
    log.info("done in %.1f s: %s", time.monotonic() - start, json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
