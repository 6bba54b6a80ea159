"""mmformer.data: manifests, skip-and-count collation, WebDataset shards, emoji data, DataModule."""

from __future__ import annotations

import csv
import io
import json
import logging
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmformer.data import (
    CorruptSample,
    EmojiData,
    ImageTextCollator,
    ImageTextManifest,
    InMemoryImageText,
    ManifestError,
    ShardDataset,
    SkipCorrupt,
    Skipped,
    SkipStats,
    default_data_dir,
    is_empty_batch,
    write_shards,
)
from mmformer.training.datamodule import ImageTextDataModule, SkippedSamplesCallback

T = 8  # tokens per caption in these tests


class CharTokenizer:
    """Fake tokenizer honouring the contract: ids (B, T) long, mask (B, T) bool."""

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, text in enumerate(texts):
            codes = [ord(c) % 1000 + 1 for c in text[:max_length]]
            ids[i, : len(codes)] = torch.tensor(codes)
        return ids, ids != 0


def decode_ids(ids: torch.Tensor) -> str:
    return "".join(chr(int(i) - 1) for i in ids if i != 0)


# -- file helpers ---------------------------------------------------------------------------------


def save_png(path: Path, color=(255, 0, 0, 255), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", size, color).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def truncated_png(path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[:300])
    return path


def header_bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


# -- manifests ------------------------------------------------------------------------------------


@pytest.fixture
def csv_manifest(tmp_path: Path) -> Path:
    save_png(tmp_path / "img" / "a.png", (255, 0, 0, 255))
    save_png(tmp_path / "img" / "b.png", (0, 0, 255, 0))  # fully transparent -> white
    rows = [
        ["img/a.png", "red square", "F1", "train"],
        ["img/b.png", "nothing", "F2", "val"],
        ["img/a.png", "a red thing", "F1", "train"],
    ]
    return write_csv(tmp_path / "m.csv", ["image", "caption", "family", "split"], rows)


def test_csv_manifest_resolves_paths_and_keeps_metadata(csv_manifest: Path):
    ds = ImageTextManifest(csv_manifest, image_size=4)
    root = csv_manifest.parent
    assert ds.image_paths == [str(root / "img" / "a.png"), str(root / "img" / "b.png")]
    assert ds.captions == ["red square", "nothing", "a red thing"]
    assert ds.caption_to_image.tolist() == [0, 1, 0]  # two captions of one image
    assert ds.metadata[1] == {"family": "F2", "split": "val"}
    assert ds.row_numbers == [1, 2, 3]
    item = ds[2]
    assert (item["caption"], item["index"], item["image_index"]) == ("a red thing", 2, 0)
    assert item["image"].shape == (3, 4, 4)
    torch.testing.assert_close(item["image"][:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(ds[1]["image"], torch.ones(3, 4, 4))  # transparent -> white


def test_jsonl_and_tsv_manifests_with_caption_lists(tmp_path: Path):
    save_png(tmp_path / "x.png")
    absolute = save_png(tmp_path / "elsewhere" / "y.png")
    m = write_jsonl(
        tmp_path / "sub.jsonl",
        [
            {"image": "x.png", "caption": ["one", "two"], "hexcode": "1F600"},
            {"image": str(absolute), "caption": "three"},
        ],
    )
    ds = ImageTextManifest(m)
    assert ds.image_paths == [str(tmp_path / "x.png"), str(absolute)]
    assert ds.captions == ["one", "two", "three"]
    assert ds.caption_to_image.tolist() == [0, 0, 1]
    assert ds.metadata[0] == {"hexcode": "1F600"} and ds.metadata[2] == {}
    tsv = write_csv(tmp_path / "m.tsv", ["file", "text"], [["x.png", "a, b"]], delimiter="\t")
    ds = ImageTextManifest(tsv, image_col="file", caption_col="text")
    assert ds.captions == ["a, b"]


def test_csv_with_byte_order_mark_and_ragged_rows(tmp_path: Path):
    save_png(tmp_path / "x.png")
    m = tmp_path / "bom.csv"
    m.write_bytes("\ufeffimage,caption\nx.png,hello,extra cell\n".encode("utf-8"))
    ds = ImageTextManifest(m)
    assert ds.captions == ["hello"] and ds.metadata == [{}]


def test_missing_column_error_names_file_column_and_columns_found(tmp_path: Path):
    m = write_csv(tmp_path / "m.csv", ["image", "text"], [["x.png", "hi"]])
    with pytest.raises(ManifestError) as info:
        ImageTextManifest(m)
    assert str(info.value) == f"{m}: missing column(s) ['caption']; columns found: ['image', 'text']"


def test_missing_files_listed_by_row_in_one_error(tmp_path: Path):
    save_png(tmp_path / "ok.png")
    rows = [["ok.png", "fine"], ["", "no image"]] + [[f"gone{i}.png", "c"] for i in range(25)]
    m = write_csv(tmp_path / "m.csv", ["image", "caption"], rows)
    with pytest.raises(ManifestError) as info:
        ImageTextManifest(m)
    msg = str(info.value)
    assert msg.startswith(f"{m}: 26 bad row(s)")
    assert "row 2: empty 'image' field" in msg
    assert f"row 3: file not found: {tmp_path / 'gone0.png'}" in msg
    assert "row 21: file not found" in msg and "row 22:" not in msg  # 20 listed ...
    assert msg.endswith("... and 6 more")  # ... then the rest counted
    assert "row 1:" not in msg


def test_split_filter(csv_manifest: Path, tmp_path: Path):
    ds = ImageTextManifest(csv_manifest, split="val")
    assert ds.captions == ["nothing"] and ds.row_numbers == [2]
    with pytest.raises(ManifestError, match=r"no rows with split == 'test'; values found: \['train', 'val'\]"):
        ImageTextManifest(csv_manifest, split="test")
    m = write_csv(tmp_path / "nosplit.csv", ["image", "caption"], [["img/a.png", "x"]])
    with pytest.raises(ManifestError, match=r"nosplit.csv: missing column\(s\) \['split'\]"):
        ImageTextManifest(m, split="train")


def test_bad_jsonl_line_and_unknown_extension(tmp_path: Path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "a.png", "caption": "x"}\n\n{oops\n')
    with pytest.raises(ManifestError, match="m.jsonl: line 3 is not valid JSON"):
        ImageTextManifest(m)
    with pytest.raises(ManifestError, match=r"unknown manifest format '\.txt'"):
        ImageTextManifest(tmp_path / "m.txt")


# -- bad samples: skipped and counted -------------------------------------------------------------


@pytest.fixture
def bad_manifest(tmp_path: Path) -> Path:
    save_png(tmp_path / "good.png", (0, 255, 0, 255))
    truncated_png(tmp_path / "cut.png")
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(1).bytes(400))
    header_bomb_png(tmp_path / "bomb.png")
    rows = [
        ["good.png", "green"],
        ["cut.png", "cut"],
        ["noise.png", "noise"],
        ["bomb.png", "bomb"],
        ["good.png", "   "],
    ]
    return write_csv(tmp_path / "m.csv", ["image", "caption"], rows)


def test_dataset_raises_corrupt_sample(bad_manifest: Path):
    ds = ImageTextManifest(bad_manifest)
    with pytest.raises(CorruptSample, match=r"good.png: empty caption \(m.csv row 5\)"):
        ds[4]
    with pytest.raises(CorruptSample, match="bomb.png: image too large"):
        ds[3]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_skipped_and_counted_across_workers(bad_manifest: Path, num_workers: int):
    ds = SkipCorrupt(ImageTextManifest(bad_manifest, image_size=8))
    loader = DataLoader(
        ds,
        batch_size=5,
        num_workers=num_workers,
        collate_fn=ImageTextCollator(CharTokenizer(), max_length=T, image_size=8),
    )
    (batch,) = list(loader)
    assert batch["images"].shape == (1, 3, 8, 8)
    assert batch["captions"] == ["green"] and batch["indices"].tolist() == [0]
    assert decode_ids(batch["input_ids"][0]) == "green"
    assert batch["attention_mask"][0].tolist() == [True] * 5 + [False] * 3
    assert batch["n_skipped"] == 4
    reasons = {Path(s.path).name: s.reason for s in batch["skipped"]}
    assert sorted(reasons) == ["bomb.png", "cut.png", "good.png", "noise.png"]
    assert "truncated" in reasons["cut.png"]
    assert reasons["noise.png"].startswith("cannot decode image: UnidentifiedImageError")
    assert reasons["bomb.png"].startswith("image too large")
    assert reasons["good.png"] == "empty caption (m.csv row 5)"


def test_all_bad_batch_is_empty_not_a_crash(bad_manifest: Path):
    ds = SkipCorrupt(ImageTextManifest(bad_manifest, image_size=8))
    loader = DataLoader(ds, batch_size=2, collate_fn=ImageTextCollator(CharTokenizer(), T, image_size=8))
    batches = list(loader)
    assert [b["n_skipped"] for b in batches] == [1, 2, 1]
    empty = batches[1]
    assert is_empty_batch(empty) and not is_empty_batch(batches[0])
    assert empty["images"].shape == (0, 3, 8, 8)
    assert empty["input_ids"].shape == (0, T) and empty["attention_mask"].dtype == torch.bool
    assert empty["indices"].shape == (0,) and empty["captions"] == []


def test_skip_stats_summary():
    stats = SkipStats(max_examples=2)
    stats.update({"n_skipped": 0, "skipped": []})
    assert stats.summary() == ""
    stats.update({"n_skipped": 2, "skipped": [Skipped("a.png", "bad"), Skipped("b.png", "worse")]})
    stats.update({"n_skipped": 1, "skipped": [Skipped("c.png", "ugly")]})
    assert stats.summary() == "skipped 3 corrupt samples (e.g. a.png: bad; b.png: worse)"
    stats.reset()
    stats.update({"n_skipped": 1, "skipped": [Skipped("c.png", "ugly")]})
    assert stats.summary() == "skipped 1 corrupt sample (e.g. c.png: ugly)"
    assert stats.total == 4
    assert stats.summary(period=False) == "skipped 4 corrupt samples (e.g. a.png: bad; b.png: worse)"


def test_collator_checks_tokenizer_contract():
    sample = {"image": torch.zeros(3, 2, 2), "caption": "x", "index": 0}
    with pytest.raises(RuntimeError, match="no tokenizer"):
        ImageTextCollator(None, T)([sample])
    bad = lambda texts, max_length: (torch.zeros(len(texts), 9), torch.ones(len(texts), 9))  # noqa: E731
    with pytest.raises(ValueError, match=r"expected both \(B, T\) with B=1, T <= max_length=8"):
        ImageTextCollator(bad, T)([sample])
    out = ImageTextCollator(CharTokenizer(), T)([sample, None])
    assert out["n_skipped"] == 1 and out["skipped"] == [Skipped("<unknown>", "sample was None")]


# -- shards ---------------------------------------------------------------------------------------


def shard_samples(n: int) -> list[dict]:
    return [
        {"key": f"s{i:03d}", "image": Image.new("RGB", (8, 8), (i * 20, 0, 0)), "caption": f"cap {i}"} for i in range(n)
    ]


def test_write_and_read_shards_roundtrip(tmp_path: Path):
    paths = write_shards(shard_samples(5), str(tmp_path / "out" / "shard-%04d.tar"), maxcount=2)
    assert [Path(p).name for p in paths] == ["shard-0000.tar", "shard-0001.tar", "shard-0002.tar"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [Path(p).name for p in paths]  # no temp files
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames() == ["s000.png", "s000.txt", "s001.png", "s001.txt"]
    ds = ShardDataset(str(tmp_path / "out" / "shard-{0000..0002}.tar"), image_size=8, train=False, shuffle=0)
    items = list(ds)
    assert [it["caption"] for it in items] == [f"cap {i}" for i in range(5)]
    assert [it["key"] for it in items] == [f"s{i:03d}" for i in range(5)]
    red = [round(float(it["image"][0, 0, 0]) * 0.5 * 255 + 127.5) for it in items]
    assert red == [0, 20, 40, 60, 80]  # the right image with the right caption
    shuffled = list(ShardDataset(paths, image_size=8, shuffle=10, seed=1))
    assert sorted(it["caption"] for it in shuffled) == [f"cap {i}" for i in range(5)]


def test_json_captions_and_metadata(tmp_path: Path):
    samples = [{"key": "k0", "image": Image.new("RGB", (4, 4)), "caption": "json caption", "meta": {"id": 7}}]
    paths = write_shards(samples, str(tmp_path / "j-%02d.tar"), maxcount=10, caption_format="json")
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames() == ["k0.json", "k0.png"]
        assert json.loads(tar.extractfile("k0.json").read()) == {"id": 7, "caption": "json caption"}
    (item,) = list(ShardDataset(paths, image_size=4, train=False, shuffle=0))
    assert item["caption"] == "json caption"


def _write_raw_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_shard_members_skipped_and_counted(tmp_path: Path):
    good = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 0, 255)).save(good, format="PNG")
    _write_raw_tar(
        tmp_path / "bad-0.tar",
        {
            "a.png": good.getvalue(),
            "a.txt": b"blue",
            "b.png": b"garbage bytes",
            "b.txt": b"broken image",
            "c.png": good.getvalue(),  # no caption
            "d.jpg": good.getvalue(),
            "d.txt": b"  ",  # empty caption
        },
    )
    paths = write_shards(shard_samples(2), str(tmp_path / "bad-%d.tar"), maxcount=10, start=1)
    (tmp_path / "bad-2.tar").write_bytes(b"\0" * 10 + b"not a tar file" * 100)  # unreadable shard
    paths.append(str(tmp_path / "bad-2.tar"))
    ds = ShardDataset(str(tmp_path / "bad-{0..2}.tar"), image_size=4, train=False, shuffle=0)
    loader = DataLoader(ds, batch_size=16, collate_fn=ImageTextCollator(CharTokenizer(), T, image_size=4))
    (batch,) = list(loader)
    assert batch["captions"] == ["blue", "cap 0", "cap 1"]
    assert batch["n_skipped"] == 4
    by_path = {s.path: s.reason for s in batch["skipped"]}
    bad0 = str(tmp_path / "bad-0.tar")
    assert by_path[f"{bad0}/b.png"].startswith("cannot decode image")
    assert by_path[f"{bad0}/c"] == "no caption member (.txt or .json)"
    assert by_path[f"{bad0}/d"] == "empty caption"
    assert by_path[str(tmp_path / "bad-2.tar")].startswith("unreadable shard data: ReadError")


def test_shards_split_across_workers_and_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    paths = write_shards(shard_samples(8), str(tmp_path / "w-%d.tar"), maxcount=2)
    ds = ShardDataset(paths, image_size=4, shuffle=4)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=ImageTextCollator(CharTokenizer(), T))
    seen = [c for b in loader for c in b["captions"]]
    assert sorted(seen) == [f"cap {i}" for i in range(8)]  # each sample exactly once
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rank1 = sorted(it["caption"] for it in ShardDataset(paths, image_size=4, shuffle=0))
    assert rank1 == ["cap 2", "cap 3", "cap 6", "cap 7"]  # shards 1 and 3 of 0..3


def test_shard_epoch_size_cycles_to_a_fixed_length(tmp_path: Path):
    paths = write_shards(shard_samples(3), str(tmp_path / "e-%d.tar"), maxcount=2)
    ds = ShardDataset(paths, image_size=4, shuffle=0, epoch_size=7)
    captions = [it["caption"] for it in ds]
    assert captions == ["cap 0", "cap 1", "cap 2"] * 2 + ["cap 0"]
    loader = DataLoader(
        ShardDataset(paths, image_size=4, shuffle=2, epoch_size=5),
        batch_size=2,
        num_workers=2,
        collate_fn=ImageTextCollator(CharTokenizer(), T),
    )
    assert sum(len(b["captions"]) for b in loader) == 6  # ceil(5 / 2) per worker x 2 workers


def test_write_shards_rejects_dotted_keys(tmp_path: Path):
    with pytest.raises(ValueError, match="must not contain"):
        write_shards([{"key": "a.b", "image": Image.new("RGB", (2, 2)), "caption": "x"}], str(tmp_path / "x-%d.tar"))
    assert list(tmp_path.iterdir()) == []


def test_manifest_to_shards(csv_manifest: Path, tmp_path: Path):
    ds = ImageTextManifest(csv_manifest)
    paths = write_shards(ds.iter_raw(), str(tmp_path / "conv-%d.tar"), maxcount=100)
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames()[:3] == ["000000000.json", "000000000.png", "000000000.txt"]
        assert json.loads(tar.extractfile("000000000.json").read()) == {"family": "F1", "split": "train"}
    read = list(ShardDataset(paths, image_size=4, train=False, shuffle=0))
    assert [it["caption"] for it in read] == ds.captions


# -- emoji ----------------------------------------------------------------------------------------

CONCEPTS = [
    {
        "hexcode": "1F600",
        "emoji": "x",
        "name": "grinning face",
        "keywords": ["face", "grin"],
        "group": "g",
        "split": "train",
    },
    {"hexcode": "1F431", "emoji": "x", "name": "cat face", "keywords": [], "group": "g", "split": "train"},
    {"hexcode": "1F680", "emoji": "x", "name": "rocket", "keywords": ["space"], "group": "g", "split": "val"},
]


def make_emoji_layout(root: Path) -> Path:
    """Tiny copy of data/emoji: 3 concepts x families google/noto (+ twitter = test)."""
    rows = []
    for c in CONCEPTS:
        for family, color in (("google", (255, 0, 0)), ("noto", (0, 255, 0)), ("twitter", (0, 0, 255))):
            img = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # transparent corners
            img.paste(color + (255,), (4, 4, 12, 12))
            save_png(root / "images" / family / f"{c['hexcode']}.png", size=(16, 16)).write_bytes(_png(img))
            split = "test" if family == "twitter" else c["split"]
            rows.append(
                {
                    "image": f"images/{family}/{c['hexcode']}.png",
                    "caption": c["name"],
                    "hexcode": c["hexcode"],
                    "family": family,
                    "split": split,
                }
            )
    write_jsonl(root / "manifest.jsonl", rows)
    write_jsonl(root / "concepts.jsonl", CONCEPTS)
    return root


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def emoji_root(tmp_path: Path) -> Path:
    return make_emoji_layout(tmp_path / "emoji")


def test_emoji_load_split_and_captions(emoji_root: Path):
    data = EmojiData.load(emoji_root, "train", image_size=8)
    assert data.images.shape == (4, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.captions == ["grinning face", "grinning face", "cat face", "cat face"]
    assert data.families == ["google", "noto", "google", "noto"]
    assert data.hexcodes == ["1F600", "1F600", "1F431", "1F431"]
    assert data.concept_ids.tolist() == [0, 0, 1, 1]
    assert data.concept_names == ["grinning face", "cat face"]
    assert data.concept_keywords == [["face", "grin"], []]
    assert data.images[:, :, 0, 0].eq(255).all()  # transparent -> white
    assert data.images[0, :, 4, 4].tolist() == [255, 0, 0]  # google = red centre
    assert data.images[1, :, 4, 4].tolist() == [0, 255, 0]  # noto = green centre
    val = EmojiData.load(emoji_root, "val", image_size=16)
    assert val.captions == ["rocket", "rocket"] and val.images.shape == (2, 3, 16, 16)
    test = EmojiData.load(emoji_root, "test", image_size=16)
    assert set(test.families) == {"twitter"} and len(test) == 3
    only = EmojiData.load(emoji_root, None, image_size=16, families=["noto"])
    assert only.families == ["noto"] * 3


def test_emoji_cache_dir(emoji_root: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    first = EmojiData.load(emoji_root, "val", image_size=8, cache_dir=cache)
    (npy,) = list(cache.glob("emoji-val-8-*.npy"))
    assert np.array_equal(np.load(npy), first.images.numpy())
    save_png(emoji_root / "images" / "google" / "1F680.png", (9, 9, 9, 255), (16, 16))  # change a file
    cached = EmojiData.load(emoji_root, "val", image_size=8, cache_dir=cache)
    assert torch.equal(cached.images, first.images)  # served from the cache, not re-decoded
    fresh = EmojiData.load(emoji_root, "val", image_size=8)
    assert fresh.images[0, :, 0, 0].tolist() == [9, 9, 9]


def test_default_data_dir_env(emoji_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MMFORMER_DATA", str(emoji_root))
    assert default_data_dir() == emoji_root
    monkeypatch.setenv("MMFORMER_DATA", str(emoji_root.parent))  # the parent of emoji/ also works
    assert default_data_dir() == emoji_root
    monkeypatch.setenv("MMFORMER_DATA", str(emoji_root / "nope"))
    with pytest.raises(FileNotFoundError, match="MMFORMER_DATA"):
        default_data_dir()


@pytest.fixture
def no_default_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $MMFORMER_DATA, and the checkout and wheel locations point at empty folders."""
    from mmformer.data import bundled

    monkeypatch.delenv("MMFORMER_DATA", raising=False)
    monkeypatch.setattr(bundled, "_CHECKOUT", tmp_path / "checkout" / "data")
    monkeypatch.setattr(bundled, "_PACKAGED", tmp_path / "site-packages" / "mmformer" / "_data")
    return tmp_path


def test_bundled_dir_order(emoji_root: Path, no_default_data: Path, monkeypatch: pytest.MonkeyPatch):
    """explicit > $MMFORMER_DATA > checkout > wheel copy; an explicit or env path is the only place looked at."""
    from mmformer.data import bundled
    from mmformer.data.bundled import BundledDataNotFound, bundled_dir
    from mmformer.data.icons import icons_data_dir

    packaged = make_emoji_layout(no_default_data / "site-packages" / "mmformer" / "_data" / "emoji")
    assert bundled_dir("emoji") == packaged == default_data_dir()  # 4. the wheel's copy
    checkout = make_emoji_layout(no_default_data / "checkout" / "data" / "emoji")
    assert bundled_dir("emoji") == checkout  # 3. the checkout wins over it
    monkeypatch.setenv("MMFORMER_DATA", str(emoji_root.parent))
    assert bundled_dir("emoji") == emoji_root  # 2. the variable wins
    other = make_emoji_layout(no_default_data / "other" / "emoji")
    assert default_data_dir(other) == other == default_data_dir(other.parent)  # 1. explicit wins
    assert bundled_dir("emoji", str(other.parent)) == other
    monkeypatch.setenv("MMFORMER_DATA", str(no_default_data / "nowhere"))
    with pytest.raises(BundledDataNotFound, match="MMFORMER_DATA"):
        bundled_dir("emoji")  # never falls back silently
    assert bundled_dir("emoji", other) == other  # explicit still wins
    with pytest.raises(BundledDataNotFound, match="the given folder"):
        default_data_dir(no_default_data / "nowhere")
    # $MMFORMER_DATA naming the emoji folder itself does not make it the icons folder
    monkeypatch.setenv("MMFORMER_DATA", str(emoji_root))
    assert default_data_dir() == emoji_root
    with pytest.raises(BundledDataNotFound, match="icons"):
        icons_data_dir()
    icons = make_emoji_layout(no_default_data / "d" / "icons")
    monkeypatch.setenv("MMFORMER_DATA", str(icons.parent))
    assert icons_data_dir() == icons and icons_data_dir(icons) == icons
    with pytest.raises(ValueError, match="unknown bundled dataset 'fonts'"):
        bundled_dir("fonts")
    assert bundled._CHECKOUT == no_default_data / "checkout" / "data"  # the fixture's patch held


def test_bundled_data_missing_says_how_to_get_it(no_default_data: Path):
    from mmformer.data.bundled import BundledDataNotFound, bundled_dir
    from mmformer.data.longdoc import default_prose_path

    for name, find in (("emoji", default_data_dir), ("prose", default_prose_path), ("icons", None)):
        with pytest.raises(BundledDataNotFound) as err:
            find() if find else bundled_dir(name)
        msg = str(err.value)
        assert isinstance(err.value, FileNotFoundError) and "\n" not in msg
        for hint in (
            f"data/{name}/",
            "--data-dir",
            "MMFORMER_DATA=DIR",
            f"python data/build_{name}.py",
            str(no_default_data / "checkout" / "data" / name),
        ):
            assert hint in msg, (hint, msg)


def test_default_prose_path(no_default_data: Path, monkeypatch: pytest.MonkeyPatch):
    from mmformer.data.longdoc import default_prose_path

    prose = no_default_data / "d" / "prose"
    prose.mkdir(parents=True)
    (prose / "kjv.txt").write_text("In the beginning\n")
    monkeypatch.setenv("MMFORMER_DATA", str(prose.parent))
    assert default_prose_path() == prose / "kjv.txt"
    monkeypatch.delenv("MMFORMER_DATA")
    assert default_prose_path(prose) == default_prose_path(prose.parent) == prose / "kjv.txt"


def test_cli_data_dir(emoji_root: Path, no_default_data: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """``mmformer eval --data-dir`` reads the given copy (over $MMFORMER_DATA); a wrong one is a one-line exit."""
    from mmformer.cli import main
    from mmformer.config import ModelConfig
    from mmformer.model import MMFormer
    from mmformer.tokenizer import Tokenizer, default_tokenizer_path

    torch.manual_seed(0)
    cfg = ModelConfig(width=32, depth=2, heads=4, image_size=16, patch_size=8, context_length=8, embed_dim=16)
    MMFormer(cfg, Tokenizer.load(default_tokenizer_path())).save_pretrained(no_default_data / "model")
    model = str(no_default_data / "model")
    monkeypatch.setenv("MMFORMER_DATA", str(emoji_root.parent))
    assert main(["eval", "--model", model, "--json"]) == 0
    from_env = json.loads(capsys.readouterr().out)
    assert from_env["n_images"] == 3 and from_env["n_texts"] == 3  # the 3 'test' (twitter) images
    monkeypatch.setenv("MMFORMER_DATA", str(no_default_data / "nowhere"))
    assert main(["eval", "--model", model, "--json", "--data-dir", str(emoji_root)]) == 0
    assert json.loads(capsys.readouterr().out) == from_env
    for argv in (["eval", "--model", model], ["demo", "--steps", "1", "--out", str(no_default_data / "demo")]):
        with pytest.raises(SystemExit) as err:
            main(argv + ["--data-dir", str(no_default_data / "nowhere")])
        assert str(err.value).startswith(f"mmformer {argv[0]}: bundled emoji data not found in the given folder")
        assert "\n" not in str(err.value)
    assert not (no_default_data / "demo").exists()  # the demo stopped before writing anything
    with pytest.raises(SystemExit, match="pass one"):
        main(["eval", "--model", model, "--data", "m.jsonl", "--data-dir", str(emoji_root)])


def test_in_memory_dataset_caption_modes(emoji_root: Path):
    data = EmojiData.load(emoji_root, "train", image_size=8)
    torch.manual_seed(0)
    train = InMemoryImageText(data, train=True, image_size=8, caption_mode="name+keywords")
    import random

    random.seed(0)
    seen = {train[0]["caption"] for _ in range(40)}
    assert seen == {"grinning face", "face, grin"}
    assert {train[2]["caption"] for _ in range(10)} == {"cat face"}  # no keywords -> name
    name_only = InMemoryImageText(data, train=True, image_size=8, caption_mode="name")
    assert {name_only[1]["caption"] for _ in range(10)} == {"grinning face"}
    item = train[3]  # training items stay uint8; the collator augments the batch
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.uint8
    assert train.batch_transform(item["image"][None]).dtype == torch.float32
    assert (item["index"], item["image_index"], item["concept"]) == (3, 3, 1)
    ev = InMemoryImageText(data, train=False, caption_mode="name+keywords")
    assert [ev[i]["caption"] for i in range(4)] == data.captions
    assert ev.captions == data.captions and ev.caption_to_image.tolist() == [0, 1, 2, 3]
    expected = data.images[0].float() / 255 * 2 - 1  # eval at the stored size: just normalised
    torch.testing.assert_close(ev[0]["image"], expected)
    with pytest.raises(ValueError, match="caption_mode"):
        InMemoryImageText(data, train=True, caption_mode="keywords")  # type: ignore[arg-type]


def test_in_memory_training_item_seeded_caption_leaves_torch_rng_alone(emoji_root: Path):
    """A seeded training item (a SampleKey from the resumable sampler) picks its caption from its
    own seed alone, and neither reads nor advances the global torch RNG (the batch augmentation
    is seeded in the collator)."""
    import random

    from mmformer.data.transforms import SampleKey

    data = EmojiData.load(emoji_root, "train", image_size=8)
    train = InMemoryImageText(data, train=True, image_size=8, caption_mode="name+keywords")
    picks = {seed: train[SampleKey(0, seed)]["caption"] for seed in range(30)}
    assert picks == {seed: random.Random(seed).choice(["grinning face", "face, grin"]) for seed in range(30)}
    assert set(picks.values()) == {"grinning face", "face, grin"}
    assert train[SampleKey(0, 7)]["seed"] == 7
    state = torch.get_rng_state()
    for seed in range(5):
        train[SampleKey(1, seed)]
    assert torch.equal(torch.get_rng_state(), state)


def test_bundled_emoji_val_split_matches_manifest():
    try:
        root = default_data_dir()
    except FileNotFoundError:
        pytest.skip("bundled emoji data not present")
    rows = [json.loads(line) for line in open(root / "manifest.jsonl", encoding="utf-8")]
    val_rows = [r for r in rows if r["split"] == "val"]
    data = EmojiData.load(root, "val", image_size=32)
    assert len(data) == len(val_rows) and data.images.shape[1:] == (3, 32, 32)
    assert data.captions == [r["caption"] for r in val_rows]
    assert data.families == [r["family"] for r in val_rows]
    names = {json.loads(line)["hexcode"]: json.loads(line)["name"] for line in open(root / "concepts.jsonl")}
    assert data.concept_names == [names[h] for h in data.concept_hexcodes]
    assert not data.skipped


# -- DataModule -----------------------------------------------------------------------------------


def test_datamodule_emoji_splits(emoji_root: Path):
    dm = ImageTextDataModule(
        data_dir=str(emoji_root), image_size=8, batch_size=3, max_length=T, caption_mode="name+keywords"
    )
    dm.set_tokenizer(CharTokenizer())
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())  # 4 train images, batch 3, drop_last
    assert batch["images"].shape == (3, 3, 8, 8) and batch["input_ids"].shape == (3, T)
    assert batch["attention_mask"].dtype == torch.bool and batch["n_skipped"] == 0
    assert batch["concepts"].tolist() == [[0, 0, 1, 1][i] for i in batch["indices"].tolist()]
    assert torch.equal(batch["image_ids"], batch["indices"])
    val_batches = list(dm.val_dataloader())
    assert [b["captions"] for b in val_batches] == [["rocket", "rocket"]]
    assert dm.val_dataloader().dataset.captions == ["rocket", "rocket"]
    assert dm.val_dataloader().dataset.caption_to_image.tolist() == [0, 1]
    dm.setup("test")
    assert set(dm.test_dataset.data.families) == {"twitter"}


def test_datamodule_manifests_expose_retrieval_metadata(csv_manifest: Path):
    dm = ImageTextDataModule(
        data_dir=str(csv_manifest.parent),
        train_manifest="m.csv",
        val_manifest="m.csv",
        image_size=4,
        batch_size=8,
        max_length=T,
    )
    dm.set_tokenizer(CharTokenizer())
    dm.setup("fit")
    val = dm.val_dataloader()
    assert val.dataset.captions == ["red square", "nothing", "a red thing"]
    assert val.dataset.caption_to_image.tolist() == [0, 1, 0]
    (batch,) = list(val)
    assert batch["image_ids"].tolist() == [0, 1, 0] and batch["indices"].tolist() == [0, 1, 2]
    assert "concepts" not in batch
    assert dm.test_dataloader() == []  # no test data: Lightning runs no test loop


def test_datamodule_with_sentencepiece_tokenizer(csv_manifest: Path, tmp_path: Path):
    from mmformer.tokenizer import Tokenizer

    tok_path = tmp_path / "tok.model"
    Tokenizer.train(["red square", "nothing", "a red thing"] * 20, vocab_size=40).save(tok_path)
    dm = ImageTextDataModule(
        train_manifest=str(csv_manifest), image_size=4, batch_size=3, max_length=T, tokenizer_path=str(tok_path)
    )
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] <= T
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["input_ids"][:, 0].tolist() == [2, 2, 2]  # bos


def test_datamodule_needs_tokenizer(emoji_root: Path):
    dm = ImageTextDataModule(data_dir=str(emoji_root), image_size=8)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="set_tokenizer"):
        dm.train_dataloader()


def test_datamodule_manifest_skips_and_summarises(bad_manifest: Path, caplog: pytest.LogCaptureFixture):
    import lightning.pytorch as pl

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.batch_sizes: list[int] = []

        def training_step(self, batch, batch_idx):
            self.batch_sizes.append(batch["images"].shape[0])
            if is_empty_batch(batch):
                return None  # Lightning skips the optimizer step
            return (self.w * batch["images"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    # 1 good + 3 bad rows in batches of 2: whatever the shuffle, one batch of 1 and one empty batch
    lines = bad_manifest.read_text().splitlines()
    manifest = bad_manifest.with_name("four.csv")
    manifest.write_text("\n".join(lines[:5]) + "\n")
    dm = ImageTextDataModule(train_manifest=str(manifest), image_size=8, batch_size=2, max_length=T)
    dm.set_tokenizer(CharTokenizer())
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SkippedSamplesCallback()],
        limit_val_batches=0,
    )
    model = Probe()
    with caplog.at_level(logging.WARNING, logger="mmformer.training.datamodule"):
        trainer.fit(model, datamodule=dm)
    assert sorted(model.batch_sizes) == [0, 1]
    assert dm.skip_stats["train"].total == 3
    warnings = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("train epoch 0 (rank 0): skipped 3 corrupt samples (e.g. ")
    assert dm.skipped_summary().startswith("train: skipped 3 corrupt samples (e.g. ")
    assert dm.skipped_summary("test") == ""


def test_datamodule_signature_is_cli_friendly():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ImageTextDataModule, "data")
    cfg = parser.parse_args(
        ["--data.image_size=32", "--data.caption_mode=name+keywords", "--data.train_manifest=m.csv"]
    )
    assert cfg.data.image_size == 32 and cfg.data.caption_mode == "name+keywords"
    assert cfg.data.data_dir is None and cfg.data.batch_size == 128 and cfg.data.max_length == 16
    with pytest.raises(SystemExit):
        parser.parse_args(["--data.caption_mode=keywords"])
