"""Long documents: chunk collation, cap policy, encode_document exactness, fusion, needle documents."""

import logging

import pytest
import torch
import torch.nn.functional as F

from mmformer.config import ModelConfig
from mmformer.data.emoji import default_data_dir
from mmformer.data.longdoc import Filler, load_prose, needle_documents, split_needle_documents
from mmformer.documents import DocumentCollator, TooManyChunks
from mmformer.model import MMFormer
from mmformer.tokenizer import BOS_ID, EOS_ID, Tokenizer, default_tokenizer_path
from mmformer.training.datamodule import SkippedSamplesCallback

SMALL = dict(width=32, depth=2, heads=4, image_size=16, patch_size=8, context_length=12, embed_dim=24)
PROSE = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and "
    "void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face "
    "of the waters. And God said, Let there be light: and there was light."
)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(default_tokenizer_path())


@pytest.fixture(scope="module")
def prose_ids(tok):
    return load_prose(tok, max_chars=60_000)


def fused_model(tok, **kw):
    torch.manual_seed(0)
    m = MMFormer(ModelConfig(**{**SMALL, "vocab_size": tok.vocab_size, **kw}), tok)
    m.enable_fusion(latents=8)
    with torch.no_grad():  # make the fusion term matter (it starts gated off)
        m.fusion.gate.fill_(1.0)
        torch.nn.init.normal_(m.fusion.chunk_pos.weight, std=0.5)
    return m.eval()


def test_collator_chunks_every_piece_once_with_bos_eos(tok):
    col = DocumentCollator(tok, length=12)
    docs = ["red apple", PROSE, "grinning face with big eyes"]
    batch = col(docs)
    pieces = [tok.encode(d) for d in docs]
    expected_counts = [max(1, -(-len(p) // 10)) for p in pieces]
    assert batch.chunk_counts.tolist() == expected_counts
    assert batch.input_ids.shape == (sum(expected_counts), 12)
    rows = [r[m].tolist() for r, m in zip(batch.input_ids, batch.attention_mask)]
    assert all(r[0] == BOS_ID and r[-1] == EOS_ID for r in rows)
    # the long document: windows of 10 pieces, the last one ending at the text's end
    long_rows = [r[1:-1] for r in rows[1 : 1 + expected_counts[1]]]
    p = pieces[1]
    assert [x for w in long_rows[:-1] for x in w] == p[: 10 * (len(long_rows) - 1)]
    assert long_rows[-1] == p[-10:]
    assert batch.chunk_mask.tolist()[0] == [True] + [False] * (max(expected_counts) - 1)
    # overlapping windows
    over = DocumentCollator(tok, length=12, stride=5)([PROSE])
    assert int(over.chunk_counts[0]) == len(range(0, len(p) - 10, 5)) + 1


def test_chunk_cap_policy_error_names_the_document_and_first_keeps_n(tok, caplog):
    n = int(DocumentCollator(tok, 12)([PROSE]).chunk_counts[0])
    assert n > 3
    with pytest.raises(TooManyChunks, match=rf"document 1: .* {n} chunks .*max_chunks=3"):
        DocumentCollator(tok, 12, max_chunks=3)(["red apple", PROSE])
    with caplog.at_level(logging.WARNING, logger="mmformer.data.longdoc"):
        b = DocumentCollator(tok, 12, max_chunks=3, overflow="first")(["red apple", PROSE])
    assert b.chunk_counts.tolist() == [1, 3] and b.truncated.tolist() == [False, True]
    assert f"keeping the first 3 of {n} chunks" in caplog.text
    full = DocumentCollator(tok, 12)([PROSE])
    assert torch.equal(b.input_ids[1:], full.input_ids[:3])
    with pytest.raises(ValueError, match="overflow='drop' must be one of"):
        DocumentCollator(tok, 12, max_chunks=3, overflow="drop")
    with pytest.raises(ValueError, match="chunk_overflow='x'"):
        ModelConfig(chunk_overflow="x")


def test_one_chunk_document_is_exactly_encode_text(tok):
    m = fused_model(tok)
    texts = ["red apple", "face with tears of joy", "flag: japan"]
    with torch.no_grad():
        for t in texts:
            ids, mask = tok([t], max_length=12)
            ref = m.encode_text(ids, mask)
            for mode in ("first", "mean", "max", "fusion", "auto"):
                assert torch.equal(m.encode_document([t], mode=mode), ref), (t, mode)


def test_padded_batch_equals_per_document_loop_and_fusion_changes_long_documents(tok):
    m = fused_model(tok)
    docs = [PROSE, "red apple", PROSE[:90] + " red apple", PROSE[40:] + " flag: japan " + PROSE[:70]]
    modes = ("first", "mean", "max", "fusion")
    col = m.document_collator()
    with torch.no_grad():
        batch = m.forward_document(col(docs), modes)
        for i, d in enumerate(docs):
            one = m.forward_document(col([d]), modes)
            for mode in modes:
                torch.testing.assert_close(batch[mode][i], one[mode][0], atol=2e-5, rtol=1e-5)
        long = col(docs).chunk_counts > 1
        assert long.sum() == 3
        # the gated fusion term is present exactly for the multi-chunk documents
        diff = (batch["fusion"] - batch["mean"]).norm(dim=-1)
        assert bool((diff[long] > 1e-3).all()) and bool((diff[~long] == 0).all())
        # the chunk-index embedding makes chunk order matter to fusion, not to the mean
        order = col([docs[0]])
        rev = col([docs[0]])
        rev.input_ids, rev.attention_mask = order.input_ids.flip(0), order.attention_mask.flip(0)
        a, b = m.forward_document(order, ("mean", "fusion")), m.forward_document(rev, ("mean", "fusion"))
        torch.testing.assert_close(a["mean"], b["mean"], atol=1e-5, rtol=1e-5)
        assert (a["fusion"] - b["fusion"]).abs().max() > 1e-3


def test_fusion_needs_a_module_and_new_config_fields_round_trip(tok, tmp_path):
    torch.manual_seed(0)
    m = MMFormer(ModelConfig(**{**SMALL, "vocab_size": tok.vocab_size}), tok)
    with pytest.raises(ValueError, match="no fusion module"):
        m.encode_document([PROSE], mode="fusion")
    assert m.encode_document([PROSE]).shape == (1, 24)  # auto = mean
    m = fused_model(tok, max_chunks=50, chunk_overflow="first")
    m.save_pretrained(tmp_path)
    back = MMFormer.from_pretrained(tmp_path).eval()
    assert back.config == m.config and back.fusion is not None
    with torch.no_grad():
        assert torch.equal(back.encode_document([PROSE]), m.encode_document([PROSE]))


def test_needle_documents_hold_the_caption_at_the_recorded_place(tok, prose_ids):
    filler = Filler(tok, prose_ids)
    caps = ["red apple", "grinning face", "flag: japan", "smiling face with sunglasses"]
    docs = needle_documents(tok, caps, 300, filler, seed=1)
    for d, c in zip(docs, caps):
        cid = tok.encode(c)
        s, e = d.spans[0]
        assert d.ids[s:e] == cid and len(d.ids) == 300
        assert d.position == pytest.approx(s / 300)
    assert docs[0].ids != needle_documents(tok, caps, 300, filler, seed=2)[0].ids
    # asked-for deciles are respected
    placed = needle_documents(tok, caps, 1000, filler, seed=3, positions=[0.0, 0.3, 0.6, 0.9])
    for d, lo in zip(placed, [0.0, 0.3, 0.6, 0.9]):
        assert lo - 0.01 <= d.position <= lo + 0.11


def test_split_needles_are_in_distant_chunks_and_hard_negatives_share_one_fragment(tok, prose_ids):
    filler = Filler(tok, prose_ids)
    caps = ["red apple", "green apple", "red heart", "face with tears of joy", "rocket"]
    docs, negs = split_needle_documents(tok, caps, 400, filler, seed=0)
    assert len(docs) == len(negs) == 4  # "rocket" cannot be split
    for d in docs:
        words = caps[d.needle_index].split()
        assert [d.ids[s:e] for s, e in d.spans] == [tok.encode(w) for w in words]
        chunks = [s // 10 for s, _ in d.spans]
        assert all(b - a >= 5 for a, b in zip(chunks, chunks[1:])), chunks  # >= 5 windows apart
    for n in negs:
        words = caps[n.needle_index].split()
        frags = [n.ids[s:e] for s, e in n.spans]
        assert frags[0] == tok.encode(words[0]) and frags[1:] != [tok.encode(w) for w in words[1:]]


def test_text_chunk_unchanged_behaviour(tok):
    ids = tok.encode(PROSE)
    w = tok.chunk(PROSE, 10, 7)
    assert w[0] == ids[:10] and w[-1] == ids[-10:] and all(len(x) == 10 for x in w)
    assert tok.chunk("red apple", 10) == [tok.encode("red apple")]


def test_fusion_trained_briefly_on_needle_documents_beats_truncation(tok, prose_ids):
    """A tiny model learns 24 image-caption pairs; fusion (trunk frozen) is then trained on needle
    documents whose caption sits after the first window. On fresh documents (new filler, new
    positions) truncation is at chance and fusion well above it."""
    from mmformer.losses import clip_loss

    torch.manual_seed(0)
    caps = [
        "red apple",
        "grinning face",
        "rocket",
        "flag: japan",
        "dog face",
        "snowman",
        "pizza",
        "crown",
        "rainbow",
        "ghost",
        "fire",
        "rose",
        "ring",
        "key",
        "bell",
        "anchor",
        "cat face",
        "moon",
        "banana",
        "penguin",
        "tiger",
        "guitar",
        "umbrella",
        "cherries",
    ]
    n = len(caps)
    cfg = ModelConfig(
        width=64,
        depth=2,
        heads=4,
        image_size=16,
        patch_size=8,
        vocab_size=tok.vocab_size,
        context_length=10,
        embed_dim=32,
    )
    m = MMFormer(cfg, tok)
    images = torch.randn(n, 3, 16, 16)
    ids, mask = tok(caps, max_length=10)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(60):  # learn the pairs from short captions
        out = m(images, ids, mask)
        loss = clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.enable_fusion(latents=8)
    for name, p in m.named_parameters():
        p.requires_grad_(name.startswith("fusion."))
    gate = [m.fusion.gate]
    opt = torch.optim.AdamW(
        [{"params": [p for n_, p in m.fusion.named_parameters() if n_ != "gate"]}, {"params": gate, "lr": 0.1}],
        lr=3e-3,
        weight_decay=0.0,
    )
    filler = Filler(tok, prose_ids)
    col = m.document_collator()
    target = torch.arange(n)
    with torch.no_grad():
        img = m.encode_image(images)
    for step in range(80):
        docs = needle_documents(
            tok, caps, 64, filler, seed=100 + step, positions=[0.2 + 0.7 * ((i * 7 + step) % 10) / 10 for i in range(n)]
        )
        emb = F.normalize(m.forward_document(col.collate_ids([d.ids for d in docs]))["fusion"], dim=-1)
        loss = clip_loss(img, emb, m.logit_scale.exp().detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    docs = needle_documents(tok, caps, 64, filler, seed=7, positions=[0.25 + 0.07 * (i % 10) for i in range(n)])
    with torch.no_grad():
        out = m.forward_document(col.collate_ids([d.ids for d in docs]), ("first", "fusion"))
        r1 = {k: ((F.normalize(v, dim=-1) @ img.T).argmax(1) == target).float().mean().item() for k, v in out.items()}
    assert r1["first"] <= 3 / n, r1  # the needle is never in the first window: about chance (1/24)
    assert r1["fusion"] >= 0.5, r1


def test_eval_cli_accepts_long_document_manifests(tok, tmp_path, capsys):
    import json

    from mmformer.cli import main
    from mmformer.data.transforms import build_transforms, load_image
    from mmformer.retrieval import embed_images, retrieval_metrics
    from mmformer.retrieval.embed import embed_documents

    m = fused_model(tok, image_size=64, patch_size=16)
    m.save_pretrained(tmp_path / "model")
    hexes = ["1F34E", "1F600", "1F680"]
    emoji = default_data_dir() / "images" / "twitter"
    docs = [PROSE + " red apple", "grinning face " + PROSE, PROSE[:80] + " rocket " + PROSE[80:]]
    (tmp_path / "d2.txt").write_text(docs[1], encoding="utf-8")
    rows = [
        {"image": str(emoji / f"{h}.png"), "caption": d, "file": f"d{i + 1}.txt"}
        for i, (h, d) in enumerate(zip(hexes, docs))
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "model"),
                "--data",
                str(tmp_path / "m.jsonl"),
                "--documents",
                "text",
                "--json",
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)
    back = MMFormer.from_pretrained(tmp_path / "model").eval()
    tf = build_transforms(64, train=False)
    images = torch.stack([tf(load_image(r["image"])) for r in rows])
    ref = retrieval_metrics(embed_images(back, images), embed_documents(back, docs), torch.arange(3))
    assert got["t2i_R@1"] == pytest.approx(ref["t2i_R@1"]) and got["t2i_mean_rank"] == pytest.approx(
        ref["t2i_mean_rank"]
    )
    # documents as files: missing ones are named; a chunk cap names the caption
    with pytest.raises(SystemExit, match=r"caption 1 \(file\): .*d1.txt"):
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "model"),
                "--data",
                str(tmp_path / "m.jsonl"),
                "--caption-col",
                "file",
                "--documents",
                "file",
            ]
        )
    with pytest.raises(SystemExit, match=r"caption 1 \(caption\): .* over max_chunks=2"):
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "model"),
                "--data",
                str(tmp_path / "m.jsonl"),
                "--documents",
                "text",
                "--max-chunks",
                "2",
            ]
        )


def test_saved_models_without_the_long_document_fields_load_with_old_behaviour(tok, tmp_path):
    import json

    torch.manual_seed(0)
    m = MMFormer(ModelConfig(**{**SMALL, "vocab_size": tok.vocab_size}), tok)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    new = [
        "attention",
        "attention_window",
        "attention_global",
        "attention_compression",
        "fusion_latents",
        "fusion_heads",
        "chunk_stride",
        "max_chunks",
        "chunk_overflow",
    ]
    for k in new:
        cfg.pop(k)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    back = MMFormer.from_pretrained(tmp_path).eval()
    assert back.fusion is None and back.config.attention == "dense"
    ids = torch.tensor([[2, 40, 41, 3]])
    with torch.no_grad():
        assert torch.equal(back.encode_text(ids), m.eval().encode_text(ids))


def _fit_longdoc(tok, tmp_path, max_steps=3, callbacks=(), **module_kw):
    """A few Lightning steps of LongDocModule on a tiny emoji layout; returns (base model, module, trainer)."""
    from test_data import make_emoji_layout

    from mmformer.training.datamodule import NeedleDataModule
    from mmformer.training.longdoc import LongDocModule
    from mmformer.training.trainer import make_trainer

    torch.manual_seed(0)
    base = MMFormer(ModelConfig(**{**SMALL, "vocab_size": tok.vocab_size}), tok)
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "prose.txt").write_text(PROSE + "\n" + PROSE[::-1] + "\n", encoding="utf-8")
    data = NeedleDataModule(
        root=str(make_emoji_layout(tmp_path / "emoji")),
        prose=str(tmp_path / "prose.txt"),
        lengths=[1, 40],
        val_length=40,
        batch_size=4,
        image_size=16,
    )
    kw = dict(
        fusion_latents=4, lr=1e-2, warmup_steps=1, chunk_stride=5, export_dir=str(tmp_path / "out"), gate_lr_scale=10.0
    )
    module = LongDocModule(pretrained=str(tmp_path / "base"), **{**kw, **module_kw})
    trainer = make_trainer(max_steps=max_steps, limit_val_batches=0, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(module, datamodule=data)
    return base, module, trainer


@pytest.mark.parametrize("trainable", ["document", "text", "fusion"])
def test_longdoc_module_trains_only_what_it_says(tok, tmp_path, trainable):
    """The parameters outside ``trainable`` are bit-identical in the exported model (image
    embeddings always; short texts too unless the text path trains), the chosen ones moved, the
    gate has its own learning rate and the chunk stride is stored with the model."""
    from mmformer.training.longdoc import trains

    base, module, trainer = _fit_longdoc(
        tok, tmp_path, trainable=trainable, clip_weight=1.0, window_distill_weight=1.0 if trainable != "fusion" else 0.0
    )
    groups = trainer.optimizers[0].param_groups
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-2, 1e-2, 0.1])
    assert groups[2]["params"] == [module.model.fusion.gate]

    out = MMFormer.from_pretrained(tmp_path / "out")
    assert out.config.chunk_stride == 5 and out.config.fusion_latents == 4
    assert out.config.document_expert == (trainable == "document")
    before, after = base.state_dict(), out.state_dict()
    roles = out.parameter_roles()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert not {k for k in moved if not trains(roles[k], trainable)}, sorted(moved)
    if trainable == "text":
        assert {"token_embed.weight", "text_proj.weight"} <= moved
        assert "blocks.0.attn.qkv.weight" not in moved and "patch_embed.proj.weight" not in moved
    if trainable == "document":
        assert not moved  # every original weight is as it was ...
        new = [k for k in after if k not in before and not k.startswith("fusion.")]
        assert new and all(roles[k] == "document" for k in new)  # ... and the expert, copied from
        for k in ("document_embed.weight", "norm.document.weight", "blocks.0.mlp.document.fc1.weight"):
            assert not torch.equal(
                after[k], after[k.replace("document_embed", "token_embed").replace("document", "text")]
            )
    assert not torch.equal(out.fusion.gate, torch.zeros(()))
    images = torch.randn(2, 3, 16, 16)
    ids, mask = tok(["red apple", "grinning face"], max_length=12)
    with torch.no_grad():
        assert torch.equal(base.eval().encode_image(images), out.eval().encode_image(images))
        if trainable != "text":
            assert torch.equal(base.encode_text(ids, mask), out.encode_text(ids, mask))
            assert torch.equal(out.encode_document(["red apple"]), out.encode_text(*tok(["red apple"], max_length=12)))


def test_state_cache_trains_the_fusion_like_live_states(tok, tmp_path):
    """cache_states (float32) gives the same training run as encoding every window: same losses,
    same exported fusion, within float tolerance; the batches did use cached windows."""
    runs = {}
    for cache in (False, True):
        _, module, _ = _fit_longdoc(
            tok,
            tmp_path / str(cache),
            trainable="fusion",
            cache_states=cache,
            cache_dtype="float32",
            clip_weight=1.0,
            distill_weight=1.0,
        )
        runs[cache] = MMFormer.from_pretrained(tmp_path / str(cache) / "out").state_dict()
        if cache:
            assert module.state_cache is not None and len(module.state_cache) > 0
    for k in runs[False]:
        torch.testing.assert_close(runs[True][k], runs[False][k], atol=1e-5, rtol=1e-4, msg=k)


def test_longdoc_module_rejects_bad_options(tok, tmp_path):
    from mmformer.training.longdoc import LongDocModule

    MMFormer(ModelConfig(**{**SMALL, "vocab_size": tok.vocab_size}), tok).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="trainable='trunk' must be one of"):
        LongDocModule(pretrained=str(tmp_path / "m"), trainable="trunk")
    with pytest.raises(ValueError, match="cache_states needs frozen chunk encoders"):
        LongDocModule(pretrained=str(tmp_path / "m"), trainable="document", cache_states=True)
    with pytest.raises(ValueError, match="loss weights .* must be >= 0, one of them > 0"):
        LongDocModule(pretrained=str(tmp_path / "m"), clip_weight=0.0, distill_weight=0.0)


def test_document_expert_starts_as_the_text_path_and_never_touches_short_texts(tok, tmp_path):
    """enable_document_expert changes no embedding; once its weights move, documents of more than
    one window change while images, short texts and one-window documents stay bit-identical;
    the expert round-trips through save/load."""
    m = fused_model(tok)
    docs = [PROSE, "red apple", PROSE[:60] + " flag: japan " + PROSE[60:]]
    images = torch.randn(2, 3, 16, 16)
    ids, mask = tok(["red apple", "grinning face"], max_length=12)
    with torch.no_grad():
        before = {mode: m.encode_document(docs, mode=mode) for mode in ("first", "mean", "fusion")}
        text, image = m.encode_text(ids, mask), m.encode_image(images)
        m.enable_document_expert()
        assert m.config.document_expert
        for mode, ref in before.items():
            torch.testing.assert_close(m.encode_document(docs, mode=mode), ref, atol=1e-6, rtol=1e-5)
        for name, p in m.named_parameters():
            if "document" in name:
                p.add_(0.05 * torch.randn_like(p))
        after = m.encode_document(docs, mode="fusion")
        long = m.document_collator()(docs).chunk_counts > 1
        assert long.tolist() == [True, False, True]
        assert bool(((after - before["fusion"]).norm(dim=-1)[long] > 1e-2).all())
        assert torch.equal(after[1], before["fusion"][1])
        # alone, the one-window document is the same up to batch-shape float noise
        torch.testing.assert_close(after[1:2], m.encode_document(["red apple"]), atol=1e-6, rtol=1e-5)
        assert torch.equal(m.encode_text(ids, mask), text) and torch.equal(m.encode_image(images), image)
    m.save_pretrained(tmp_path)
    back = MMFormer.from_pretrained(tmp_path).eval()
    assert back.config.document_expert and back.document_embed is not None
    with torch.no_grad():
        assert torch.equal(back.encode_document(docs), m.encode_document(docs))


def test_caption_windows_and_prose_state_cache(tok, prose_ids):
    """caption_windows finds exactly the windows holding the whole caption; the prose cache
    (float32) gives the states of the live encoder for every chunk, takes the pure-prose windows
    from the cache, and refuses documents made from other prose."""
    from mmformer.data.longdoc import NeedleCollator, NeedleDataset, caption_windows
    from mmformer.training.longdoc import ProseStateCache

    m = fused_model(tok, chunk_stride=5)
    m.enable_document_expert()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "document" in name:
                p.add_(0.05 * torch.randn_like(p))
    filler = Filler(tok, prose_ids[:3000])
    caps = ["red apple", "flag: japan", "smiling face with sunglasses", "rocket"]
    ds = NeedleDataset(
        torch.zeros(4, 3, 16, 16), caps, tok, filler, [1, 37, 120], seed=4, fixed=True
    )  # lengths 120, 120, 1, 37 in any process
    batch = NeedleCollator(m.document_collator())([ds[i] for i in range(4)])
    docs, sources = batch["documents"], batch["doc_sources"]
    assert docs.chunk_counts.min() == 1 and docs.chunk_counts.max() > 1  # one-window and long documents
    rows, owners = caption_windows(sources, docs.chunk_counts, 10, 5)
    assert len(rows) > 0
    for r, o in zip(rows.tolist(), owners.tolist()):
        window = docs.input_ids[r][docs.attention_mask[r]].tolist()[1:-1]
        cap = tok.encode(caps[o])
        assert any(window[i : i + len(cap)] == cap for i in range(len(window))), (caps[o], window)
    assert set(owners.tolist()) == {i for i, c in enumerate(docs.chunk_counts.tolist()) if c > 1}

    cache = ProseStateCache(m, filler.ids, 10, 5, dtype=torch.float32)
    cached, _ = cache.cached_windows(docs, sources)
    assert 0 < len(cached) < docs.input_ids.shape[0] and not set(cached.tolist()) & set(rows.tolist())
    with torch.no_grad():
        live = m.chunk_states(
            docs.input_ids, docs.attention_mask, (docs.chunk_counts > 1).repeat_interleave(docs.chunk_counts)
        )
        from_cache = cache.states_for(m, docs, sources)
        torch.testing.assert_close(from_cache, live, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            m.forward_document(docs, ("fusion",), states=from_cache)["fusion"],
            m.forward_document(docs, ("fusion",))["fusion"],
            atol=1e-5,
            rtol=1e-5,
        )
    other = ProseStateCache(m, prose_ids[5000:8000], 10, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="not made from the prose this cache was built on"):
        other.states_for(m, docs, sources)


def test_keep_freed_memory_keeps_large_blocks_on_the_heap():
    """After keep_freed_memory a freed 128 MB tensor stays in the process (reused by the next
    step) instead of being unmapped; without it glibc returns it to the system."""
    import subprocess
    import sys

    code = """
import sys, torch
from mmformer.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
before = rss()
x = torch.ones(32 * 2**20)  # 128 MB
del x
print(rss() - before)
"""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc and /proc only")
    kept = {
        mode: float(
            subprocess.run(
                [sys.executable, "-c", code, mode], check=True, capture_output=True, text=True
            ).stdout.split()[-1]
        )
        for mode in ("keep", "default")
    }
    assert kept["keep"] > 100 and kept["default"] < 30, kept


class _PoisonStep(__import__("lightning").Callback):
    """Makes the loss of the batch at optimizer step ``step`` NaN (through the module's
    ``training_loss``, which both modules' training_step calls); records the logged names after
    each batch and whether that batch left the trainable parameters as they were."""

    def __init__(self, step: int) -> None:
        self.step, self.logged, self.before, self.unchanged = step, [], None, None

    def on_train_start(self, trainer, module) -> None:
        loss_of = module.training_loss

        def poisoned(batch):
            loss, logs = loss_of(batch)
            return (loss * float("nan"), logs) if trainer.global_step == self.step else (loss, logs)

        module.training_loss = poisoned

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.before is None:
            self.before = [p.detach().clone() for p in module.parameters() if p.requires_grad]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.logged.append(set(trainer.callback_metrics))
        if self.before is not None and self.unchanged is None:
            after = [p for p in module.parameters() if p.requires_grad]
            self.unchanged = all(torch.equal(a, b) for a, b in zip(self.before, after))


def _fit_base_module(tmp_path, max_steps, callbacks, **module_kw):
    from train_helpers import make_loader, make_module

    from mmformer.training.trainer import make_trainer

    module = make_module(**module_kw)
    trainer = make_trainer(max_steps=max_steps, limit_val_batches=0, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(module, make_loader(8))
    return None, module, trainer


@pytest.mark.parametrize("kind", ["base", "longdoc"])
def test_nonfinite_loss_stops_or_is_skipped_under_both_modules(tok, tmp_path, caplog, kind):
    """The nonfinite policy is the parent's under LongDocModule too: "stop" raises naming the
    optimizer step, "skip" skips the update, counts it, logs it, and training goes on to
    max_steps; samples/s and lr are logged under both."""
    fit = (
        (lambda **kw: _fit_longdoc(tok, tmp_path / kind, **kw))
        if kind == "longdoc"
        else (lambda **kw: _fit_base_module(tmp_path / kind, **kw))
    )
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at optimizer step 1, epoch"):
        fit(max_steps=3, callbacks=[_PoisonStep(1)], nonfinite="stop")
    poison = _PoisonStep(1)
    with caplog.at_level(logging.WARNING, logger="mmformer.training.module"):
        _, module, trainer = fit(max_steps=3, callbacks=[poison], nonfinite="skip")
    assert module.nonfinite_skipped == 1 and trainer.global_step == 3
    assert (
        "non-finite training loss (nan) at optimizer step 1" in caplog.text and "step skipped (1 so far)" in caplog.text
    )
    assert float(trainer.callback_metrics["train/nonfinite_skipped"]) == 1.0
    assert poison.unchanged is True  # the skipped batch did not update the model
    assert len(poison.logged) == 3  # Lightning counts the skipped step: 3 batches for max_steps=3
    assert {"train/loss", "train/samples_per_s", "train/lr", "train/nonfinite_skipped"} <= poison.logged[-1]
    # skipped samples are counted by the one SkippedSamplesCallback the module adds (none here)
    counters = [c for c in trainer.callbacks if isinstance(c, SkippedSamplesCallback)]
    assert len(counters) == 1 and counters[0]._stats(trainer, "train").total == 0


def test_longdoc_module_refuses_contrastive_accumulation(tok, tmp_path):
    from mmformer.training.longdoc import LongDocModule

    MMFormer(ModelConfig(**{**SMALL, "vocab_size": tok.vocab_size}), tok).save_pretrained(tmp_path / "m")
    with pytest.raises(
        ValueError, match="contrastive_accum=2: LongDocModule does not support contrastive accumulation"
    ):
        LongDocModule(pretrained=str(tmp_path / "m"), contrastive_accum=2)
    module = LongDocModule(pretrained=str(tmp_path / "m"), nonfinite="skip", time_budget_s=30.0)
    # the parent's options are recorded with the given values or the parent's defaults
    assert module.hparams.nonfinite == "skip" and module.hparams.contrastive_accum == 1
    assert module.hparams.lr == 1e-3 and module.hparams.betas == (0.9, 0.98) and module.hparams.compile is False


def test_document_fusion_loads_and_computes_as_saved_before_it_shared_cross_attend():
    """A DocumentFusion state dict saved before the fusion used layers.attention.cross_attend
    (tests/fixtures/document-fusion-1a49fae.safetensors: weights, inputs and outputs) loads with the
    same keys, strictly, and gives the same outputs within 1e-6."""
    from pathlib import Path

    from safetensors.torch import load_file

    from mmformer.layers.fusion import DocumentFusion

    saved = load_file(Path(__file__).parent / "fixtures" / "document-fusion-1a49fae.safetensors")
    state = {k.removeprefix("state."): v for k, v in saved.items() if k.startswith("state.")}
    fusion = DocumentFusion(32, 16, latents=4, heads=4).eval()
    assert sorted(fusion.state_dict()) == sorted(state)
    fusion.load_state_dict(state, strict=True)
    args = saved["input.states"], saved["input.mask"], saved["input.counts"]
    with torch.no_grad():
        torch.testing.assert_close(fusion.fuse(*args), saved["output.fuse"], atol=1e-6, rtol=0)
        out = fusion(saved["input.base"], *args)
    torch.testing.assert_close(out, saved["output.forward"], atol=1e-6, rtol=0)
    assert torch.equal(out[0], saved["input.base"][0])  # the one-chunk document keeps its base embedding
