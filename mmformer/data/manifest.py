"""Image-text datasets described by a manifest file (CSV, TSV or JSONL).

A manifest has one data row per (image, caption) pair, or per image with a list of captions
(JSONL). Paths are relative to the manifest's directory unless absolute. Everything that can be
checked without decoding images (columns, empty image fields, missing files, split values) is
checked when the manifest is loaded, with one error that lists every bad row.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mmformer.data.errors import CorruptSample
from mmformer.data.transforms import DEFAULT_MAX_PIXELS, build_transforms, load_and_transform, sample_rng

__all__ = ["ImageTextManifest", "ManifestError", "ManifestRow", "read_manifest_rows"]

_MAX_LISTED = 20  # bad rows listed in one error before "... and N more"
_DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}


class ManifestError(ValueError):
    """A manifest that cannot be used as a whole (bad columns, bad rows, bad format)."""


@dataclass
class ManifestRow:
    """One data row: ``number`` is 1-based among data rows (the CSV header is not a row)."""

    number: int
    fields: dict[str, Any] = field(default_factory=dict)


def read_manifest_rows(path: str | os.PathLike[str]) -> tuple[list[ManifestRow], list[str]]:
    """Read a manifest's data rows and its column names, choosing the format by extension.

    ``.csv`` (comma), ``.tsv``/``.tab`` (tab) and ``.jsonl`` (one JSON object per line; blank
    lines are ignored and do not count as rows). JSONL columns are the union of all row keys.

    Raises:
        ManifestError: unknown extension, a malformed JSONL line, or a CSV without a header.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix in _DELIMITERS:
        return _read_delimited(path, _DELIMITERS[suffix])
    raise ManifestError(f"{path}: unknown manifest format {suffix!r}; expected .csv, .tsv or .jsonl")


def _read_jsonl(path: Path) -> tuple[list[ManifestRow], list[str]]:
    """JSONL rows; data row numbers count non-blank lines."""
    rows: list[ManifestRow] = []
    columns: dict[str, None] = {}  # ordered set
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # tolerate a byte-order mark
                raw = raw[3:]
            line = _decode_line(path, line_no, raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ManifestError(
                    f"{path}: line {line_no} is not valid JSON: {err.msg} (column {err.colno})"
                ) from err
            if not isinstance(obj, dict):
                raise ManifestError(f"{path}: line {line_no} is a JSON {type(obj).__name__}, expected an object")
            columns.update(dict.fromkeys(obj))
            rows.append(ManifestRow(len(rows) + 1, obj))
    return rows, list(columns)


def _decode_line(path: Path, line_no: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(
            f"{path}: line {line_no} is not UTF-8 (byte {raw[err.start : err.start + 1]!r} at "
            f"column {err.start + 1}); save the manifest as UTF-8"
        ) from None


def _read_delimited(path: Path, delimiter: str) -> tuple[list[ManifestRow], list[str]]:
    """CSV/TSV rows via ``csv.DictReader``; the first line is the header.

    Cells beyond the header's columns are dropped; missing trailing cells read as empty.
    """
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # tolerate a byte-order mark
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = data[: err.start].count(b"\n") + 1
        raise ManifestError(
            f"{path}: line {line_no} is not UTF-8 (byte {data[err.start : err.start + 1]!r}); "
            "save the manifest as UTF-8"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if reader.fieldnames is None:
        raise ManifestError(f"{path}: empty file, expected a header line with column names")
    rows = [ManifestRow(i, {k: v for k, v in r.items() if k is not None}) for i, r in enumerate(reader, start=1)]
    return rows, list(reader.fieldnames)


def _inside(path: str, root: Path) -> bool:
    """``path`` (symlinks resolved) lies inside ``root`` (resolved)."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, base]) == base


def _format_bad_rows(problems: list[str]) -> str:
    """Join per-row problems, listing at most ``_MAX_LISTED`` then "... and N more"."""
    shown = "\n  ".join(problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    return shown + (f"\n  ... and {more} more" if more > 0 else "")


def _as_captions(value: Any) -> list[str]:
    """A caption cell as a list of strings: a JSON list gives several, None gives ``[""]``."""
    if isinstance(value, (list, tuple)):
        return [("" if v is None else str(v)) for v in value] or [""]
    return ["" if value is None else str(value)]


class ImageTextManifest(Dataset):
    """Map-style dataset of (image, caption) pairs from a CSV/TSV/JSONL manifest.

    One item per caption. Several captions of one image (the same path on several rows, or a
    JSON list in the caption column) share one entry of :attr:`image_paths`.

    Attributes:
        image_paths: unique image paths (resolved), in first-seen order.
        captions: one string per item.
        caption_to_image: LongTensor ``(len(captions),)``: item -> index into ``image_paths``.
        metadata: per item, the row's other columns (e.g. ``hexcode``, ``family``, ``split``).
        row_numbers: per item, its 1-based data row in the manifest.

    Args:
        manifest: path of the ``.csv``, ``.tsv`` or ``.jsonl`` file.
        image_col, caption_col: column names.
        split: keep only rows whose ``split_col`` equals this (error if the column is absent).
        transform: ``PIL.Image -> tensor (3, S, S)``; default: eval ``build_transforms(image_size)``.
        root: directory relative image paths are resolved against (default: the manifest's).
            Paths may be absolute or climb out with ``../`` (a user's own manifest may point
            anywhere it likes).
        confine: a directory every image must resolve into (symlinks followed), for manifests
            taken from elsewhere (``--root DIR`` on the command line); others are bad rows.
        check_files: check at load that every image file exists (one ``stat`` per image).
        max_pixels: passed to :func:`mmformer.data.transforms.load_image`.

    Raises:
        ManifestError: missing columns (naming file, column and the columns found), rows with an
            empty image field or a missing file (listing row numbers and paths), no rows left.
    """

    def __init__(
        self,
        manifest: str | os.PathLike[str],
        *,
        image_col: str = "image",
        caption_col: str = "caption",
        split: str | None = None,
        split_col: str = "split",
        transform: Callable[[Any], torch.Tensor] | None = None,
        image_size: int = 64,
        root: str | os.PathLike[str] | None = None,
        check_files: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        confine: str | os.PathLike[str] | None = None,
    ) -> None:
        self.manifest = Path(manifest)
        self.confine = Path(confine) if confine is not None else None
        self.image_col, self.caption_col = image_col, caption_col
        self.root = Path(root) if root is not None else self.manifest.parent
        self.transform = transform if transform is not None else build_transforms(image_size, train=False)
        self.max_pixels = max_pixels
        rows, columns = read_manifest_rows(self.manifest)
        self._check_columns(columns, [image_col, caption_col] + ([split_col] if split else []))
        if split is not None:
            rows = self._filter_split(rows, split_col, split)
        if not rows:
            raise ManifestError(f"{self.manifest}: no data rows")
        self._index_rows(rows, check_files)

    # -- loading -------------------------------------------------------------------------------

    def _check_columns(self, found: list[str], required: list[str]) -> None:
        """Raise if any required column is absent from the manifest."""
        missing = [c for c in required if c not in found]
        if missing:
            raise ManifestError(f"{self.manifest}: missing column(s) {missing}; columns found: {found}")

    def _filter_split(self, rows: list[ManifestRow], split_col: str, split: str) -> list[ManifestRow]:
        """Rows whose ``split_col`` equals ``split``; error naming the splits present if none."""
        kept = [r for r in rows if str(r.fields.get(split_col)) == split]
        if not kept:
            present = sorted({str(r.fields.get(split_col)) for r in rows})
            raise ManifestError(f"{self.manifest}: no rows with {split_col} == {split!r}; values found: {present}")
        return kept

    def _resolve(self, image: str) -> str:
        """Absolute paths stay; relative ones are joined to :attr:`root`."""
        p = Path(os.path.expanduser(image))
        return str(p if p.is_absolute() else self.root / p)

    def _index_rows(self, rows: list[ManifestRow], check_files: bool) -> None:
        """Fill image_paths / captions / caption_to_image / metadata; one error for all bad rows."""
        problems: list[str] = []
        path_index: dict[str, int] = {}
        exists: dict[str, bool] = {}
        self.image_paths: list[str] = []
        self.captions: list[str] = []
        self.metadata: list[dict[str, Any]] = []
        self.row_numbers: list[int] = []
        c2i: list[int] = []
        for row in rows:
            raw = row.fields.get(self.image_col)
            image = "" if raw is None else str(raw).strip()
            if not image:
                problems.append(f"row {row.number}: empty {self.image_col!r} field")
                continue
            path = self._resolve(image)
            if self.confine is not None and not _inside(path, self.confine):
                problems.append(
                    f"row {row.number}: {image!r} resolves outside the root {self.confine} (confined with --root)"
                )
                continue
            if check_files and not exists.setdefault(path, os.path.isfile(path)):
                problems.append(f"row {row.number}: file not found: {path}")
                continue
            if path not in path_index:
                path_index[path] = len(self.image_paths)
                self.image_paths.append(path)
            meta = {k: v for k, v in row.fields.items() if k not in (self.image_col, self.caption_col)}
            for caption in _as_captions(row.fields.get(self.caption_col)):
                self.captions.append(caption)
                c2i.append(path_index[path])
                self.metadata.append(meta)
                self.row_numbers.append(row.number)
        if problems:
            raise ManifestError(
                f"{self.manifest}: {len(problems)} bad row(s) (rows are 1-based data "
                f"rows; images resolve against {self.root}):\n  " + _format_bad_rows(problems)
            )
        self.caption_to_image = torch.tensor(c2i, dtype=torch.long)  # (N_captions,)

    # -- access --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"image": (3, S, S) float, "caption", "index", "image_index", "path", "meta"}``.

        Raises:
            CorruptSample: empty caption, or an image that cannot be decoded / is too large.
        """
        image_index = int(self.caption_to_image[index])
        path = self.image_paths[image_index]
        caption = self.captions[index].strip()
        if not caption:
            raise CorruptSample(path, f"empty caption ({self.manifest.name} row {self.row_numbers[index]})")
        with sample_rng(index):  # seeded by (seed, epoch, index) under a ResumableSampler
            image = load_and_transform(path, self.transform, max_pixels=self.max_pixels)
        return {
            "image": image,
            "caption": caption,
            "index": index,
            "image_index": image_index,
            "path": path,
            "meta": self.metadata[index],
        }

    def iter_raw(self) -> Iterator[dict[str, Any]]:
        """Yield ``{"image": path, "caption", "meta"}`` per item without decoding (for sharding)."""
        for i, caption in enumerate(self.captions):
            yield {
                "image": self.image_paths[int(self.caption_to_image[i])],
                "caption": caption,
                "meta": self.metadata[i],
            }
