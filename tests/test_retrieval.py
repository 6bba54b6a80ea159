"""Tests for mmformer.retrieval: metrics against plain references, exact search, embedding."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmformer.files import atomic_path
from mmformer.retrieval import (
    embed_images,
    embed_texts,
    evaluate_retrieval,
    retrieval_metrics,
    retrieval_ranks,
)
from mmformer.retrieval.backends import ExactBackend

# --------------------------------------------------------------------------------------------
# references, written plainly


def reference_ranks_argsort(image_emb, text_emb, text_to_image):
    """Full float64 similarity matrix, argsort per query, position of the correct item (1-based).
    Only valid without ties (argsort puts tied items in arbitrary order)."""
    img = image_emb.double().numpy()
    txt = text_emb.double().numpy()
    t2i = [int(i) for i in text_to_image]
    sim = txt @ img.T  # (N_txt, N_img)
    t2i_ranks = []
    for c in range(sim.shape[0]):
        order = list(np.argsort(-sim[c], kind="stable"))
        t2i_ranks.append(order.index(t2i[c]) + 1)
    i2t_ranks = []
    for i in range(sim.shape[1]):
        order = list(np.argsort(-sim[:, i], kind="stable"))
        own = [c for c in range(len(t2i)) if t2i[c] == i]
        i2t_ranks.append(min(order.index(c) + 1 for c in own))
    return t2i_ranks, i2t_ranks


def reference_ranks_counting(image_emb, text_emb, text_to_image):
    """Ties the documented way: rank = 1 + number of items with a strictly greater score."""
    img = image_emb.double().tolist()
    txt = text_emb.double().tolist()
    t2i = [int(i) for i in text_to_image]

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    t2i_ranks = []
    for c, t in enumerate(txt):
        scores = [dot(t, im) for im in img]
        t2i_ranks.append(1 + sum(s > scores[t2i[c]] for s in scores))
    i2t_ranks = []
    for i, im in enumerate(img):
        scores = [dot(t, im) for t in txt]
        own = [c for c in range(len(txt)) if t2i[c] == i]
        i2t_ranks.append(min(1 + sum(s > scores[c] for s in scores) for c in own))
    return t2i_ranks, i2t_ranks


def reference_metrics(t2i_ranks, i2t_ranks, ks):
    out = {}
    for name, ranks in (("t2i", t2i_ranks), ("i2t", i2t_ranks)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
        out[f"{name}_mean_rank"] = sum(ranks) / len(ranks)
        out[f"{name}_median_rank"] = float(np.median(ranks))
    return out


def random_retrieval_data(seed=0, n_images=37, dim=16, noise=1.3):
    """Images with 1, 3, 2, 5, 1, 3, ... captions each (shuffled), captions near their image."""
    g = torch.Generator().manual_seed(seed)
    counts = [(1, 3, 2, 5)[i % 4] for i in range(n_images)]
    t2i = torch.tensor([i for i, n in enumerate(counts) for _ in range(n)])
    t2i = t2i[torch.randperm(len(t2i), generator=g)]
    images = F.normalize(torch.randn(n_images, dim, generator=g), dim=1)
    texts = F.normalize(images[t2i] + noise * torch.randn(len(t2i), dim, generator=g) / dim**0.5, dim=1)
    return images, texts, t2i, counts


# --------------------------------------------------------------------------------------------
# retrieval_metrics


@pytest.mark.parametrize("block_size", [1, 7, 4096])
def test_metrics_match_argsort_reference_with_several_captions_per_image(block_size):
    images, texts, t2i, counts = random_retrieval_data()
    assert {1, 3} <= set(counts)
    ks = (1, 5, 10)
    ref_t2i, ref_i2t = reference_ranks_argsort(images, texts, t2i)
    # the data must not make the test trivial: some hits, some misses in both directions
    assert 0 < sum(r == 1 for r in ref_t2i) < len(ref_t2i)
    assert 0 < sum(r == 1 for r in ref_i2t) < len(ref_i2t)

    t2i_ranks, i2t_ranks = retrieval_ranks(images, texts, t2i, block_size=block_size)
    assert t2i_ranks.tolist() == ref_t2i
    assert i2t_ranks.tolist() == ref_i2t

    got = retrieval_metrics(images, texts, t2i, ks, block_size=block_size)
    expected = reference_metrics(ref_t2i, ref_i2t, ks)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["n_images"] == 37 and got["n_texts"] == len(t2i) == sum(counts)
    assert got["t2i_chance_R@1"] == pytest.approx(100 / 37)
    assert got["i2t_chance_R@1"] == pytest.approx(100 * (sum(counts) / 37) / sum(counts))
    expected_keys = (
        {f"{d}_R@{k}" for d in ("t2i", "i2t") for k in ks}
        | {f"{d}_{s}_rank" for d in ("t2i", "i2t") for s in ("mean", "median")}
        | {"t2i_chance_R@1", "i2t_chance_R@1", "n_images", "n_texts"}
    )
    assert set(got) == expected_keys


def test_metrics_even_count_median_is_mean_of_middle_values():
    # caption 0 -> image 0 is rank 1; caption 1 -> image 1 scores 0 < 1 (image 0): rank 2.
    # Two ranks [1, 2]: the median is 1.5 (numpy's), not the lower middle value 1 (torch's).
    images = torch.eye(2)
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    t2i_ranks, i2t_ranks = retrieval_ranks(images, texts, [0, 1])
    assert t2i_ranks.tolist() == [1, 2]
    # image 1 scores both captions 0: its own caption ties and is not pushed down
    assert i2t_ranks.tolist() == [1, 1]
    got = retrieval_metrics(images, texts, [0, 1], ks=(1,))
    assert got["t2i_median_rank"] == 1.5
    assert got["t2i_mean_rank"] == 1.5
    assert got["t2i_R@1"] == 50.0 and got["i2t_R@1"] == 100.0


def test_metrics_identity_embeddings_are_perfect():
    emb = torch.eye(6)
    got = retrieval_metrics(emb, emb, torch.arange(6), ks=(1, 5), block_size=4)
    for key in ("t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@5"):
        assert got[key] == 100.0
    assert got["t2i_mean_rank"] == got["i2t_mean_rank"] == 1.0
    assert got["t2i_median_rank"] == got["i2t_median_rank"] == 1.0
    assert got["t2i_chance_R@1"] == pytest.approx(100 / 6)


def test_metrics_shuffled_pairs_have_known_ranks():
    # image i = e_i and caption c = e_c, but caption c belongs to image 5 - c: each caption
    # scores 1 against image c and 0 against the rest, so its own image (score 0, tied with four
    # others) comes right after image c: rank 2 for every caption and every image.
    emb = torch.eye(6)
    t2i = torch.arange(5, -1, -1)
    got = retrieval_metrics(emb, emb, t2i, ks=(1, 2))
    assert got["t2i_R@1"] == 0.0 and got["t2i_R@2"] == 100.0
    assert got["t2i_mean_rank"] == 2.0 and got["t2i_median_rank"] == 2.0
    assert got["i2t_R@1"] == 0.0 and got["i2t_mean_rank"] == 2.0


@pytest.mark.parametrize("block_size", [1, 2, 3, 1024])
def test_metrics_hand_built_case(block_size):
    # 4 images = e_0..e_3, so a caption's score against image i is its i-th component.
    images = torch.eye(4)
    texts = torch.tensor(
        [
            [1.0, 2.0, 3.0, 4.0],  # c0 -> image 0: score 1, three images above -> rank 4
            [0.0, 5.0, 1.0, 0.0],  # c1 -> image 1: rank 1
            [3.0, 1.0, 2.0, 0.0],  # c2 -> image 2: score 2, image 0 above -> rank 2
            [1.0, 1.0, 1.0, 2.0],  # c3 -> image 3: rank 1
            [2.0, 0.0, 0.0, 1.0],  # c4 -> image 0: rank 1
        ]
    )
    t2i = [0, 1, 2, 3, 0]
    # i2t: image 0 scores captions [1, 0, 3, 1, 2]; own c0=1, c4=2 -> best 2, only c2=3 above -> 2
    #      image 1 scores [2, 5, 1, 1, 0]; own c1=5 -> 1
    #      image 2 scores [3, 1, 2, 1, 0]; own c2=2, c0=3 above -> 2
    #      image 3 scores [4, 0, 0, 2, 1]; own c3=2, c0=4 above -> 2
    t2i_ranks, i2t_ranks = retrieval_ranks(images, texts, t2i, block_size=block_size)
    assert t2i_ranks.tolist() == [4, 1, 2, 1, 1]
    assert i2t_ranks.tolist() == [2, 1, 2, 2]
    got = retrieval_metrics(images, texts, torch.tensor(t2i), ks=(1, 2, 5), block_size=block_size)
    assert got["t2i_R@1"] == pytest.approx(60.0)
    assert got["t2i_R@2"] == pytest.approx(80.0)
    assert got["t2i_R@5"] == pytest.approx(100.0)
    assert got["t2i_mean_rank"] == pytest.approx(1.8)
    assert got["t2i_median_rank"] == 1.0
    assert got["i2t_R@1"] == pytest.approx(25.0)
    assert got["i2t_R@2"] == pytest.approx(100.0)
    assert got["i2t_mean_rank"] == pytest.approx(1.75)
    assert got["i2t_median_rank"] == 2.0
    assert got["t2i_chance_R@1"] == pytest.approx(25.0)
    assert got["i2t_chance_R@1"] == pytest.approx(100 * (5 / 4) / 5)
    assert got["n_images"] == 4 and got["n_texts"] == 5


def test_ties_are_ranked_optimistically():
    # images 0 and 1 are identical; ties never push the correct item down, strictly
    # greater scores always do (each of them, even when they tie among themselves).
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor(
        [
            [1.0, 0.0],  # c0 -> image 1: ties with image 0 at 1.0 -> rank 1
            [0.0, 1.0],  # c1 -> image 2: rank 1
            [1.0, 0.0],  # c2 -> image 0: ties with image 1 -> rank 1
            [1.0, 0.5],  # c3 -> image 2: score 0.5, images 0 and 1 (tied at 1.0) above -> rank 3
        ]
    )
    t2i = [1, 2, 0, 2]
    t2i_ranks, i2t_ranks = retrieval_ranks(images, texts, t2i, block_size=2)
    assert t2i_ranks.tolist() == [1, 1, 1, 3]
    # image 0 scores captions [1, 0, 1, 1]: own c2 = 1 ties c0 and c3 -> rank 1 (same for image 1)
    # image 2 scores [0, 1, 0, 0.5]: own c1 = 1 -> rank 1
    assert i2t_ranks.tolist() == [1, 1, 1]
    # the same ties in fp16
    t2i_half, i2t_half = retrieval_ranks(images.half(), texts.half(), t2i)
    assert t2i_half.tolist() == [1, 1, 1, 3] and i2t_half.tolist() == [1, 1, 1]


def test_tie_heavy_data_matches_counting_reference():
    # small integer vectors: many exact ties, and float32 dot products are exact
    g = torch.Generator().manual_seed(1)
    images = torch.randint(-1, 2, (23, 3), generator=g).float()
    t2i = torch.cat([torch.arange(23), torch.randint(0, 23, (30,), generator=g)])
    texts = torch.randint(-1, 2, (len(t2i), 3), generator=g).float()
    ref_t2i, ref_i2t = reference_ranks_counting(images, texts, t2i)
    t2i_ranks, i2t_ranks = retrieval_ranks(images, texts, t2i, block_size=5)
    assert t2i_ranks.tolist() == ref_t2i
    assert i2t_ranks.tolist() == ref_i2t
    got = retrieval_metrics(images, texts, t2i, ks=(1, 3, 10), block_size=5)
    for key, value in reference_metrics(ref_t2i, ref_i2t, (1, 3, 10)).items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_scored_in_float32(dtype):
    images, texts, t2i, _ = random_retrieval_data(seed=5, n_images=40, dim=64, noise=3.0)
    images, texts = images.to(dtype), texts.to(dtype)
    # reference on exactly the low-precision values, in float64
    ref_t2i, ref_i2t = reference_ranks_argsort(images.float(), texts.float(), t2i)
    t2i_ranks, i2t_ranks = retrieval_ranks(images, texts, t2i, block_size=16)
    assert t2i_ranks.tolist() == ref_t2i
    assert i2t_ranks.tolist() == ref_i2t
    assert retrieval_metrics(images, texts, t2i) == retrieval_metrics(images.float(), texts.float(), t2i)


def test_metrics_validation_errors():
    images, texts = torch.eye(4), torch.eye(4)
    with pytest.raises(ValueError, match=r"dims differ: image_emb has D=4, text_emb has D=3"):
        retrieval_metrics(images, texts[:, :3], [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"must be in \[0, 4\).*caption indices \[2\] -> \[4\]"):
        retrieval_metrics(images, texts, [0, 1, 4, 3])
    with pytest.raises(ValueError, match=r"out of range.*caption indices \[0\] -> \[-1\]"):
        retrieval_metrics(images, texts, [-1, 1, 2, 3])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        retrieval_metrics(images, texts, [0, 1, 2])
    with pytest.raises(TypeError, match="integer image indices"):
        retrieval_metrics(images, texts, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    # images 1 and 3 have no caption: the error names them
    with pytest.raises(ValueError, match=r"2 of 4 image\(s\) have none, image indices \[1, 3\]"):
        retrieval_metrics(images, texts, [0, 0, 2, 2])
    bad = texts.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"text_emb has non-finite values.*rows \[2\]"):
        retrieval_metrics(images, bad, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="ks must be"):
        retrieval_metrics(images, texts, [0, 1, 2, 3], ks=(0, 5))
    with pytest.raises(ValueError, match="block_size"):
        retrieval_metrics(images, texts, [0, 1, 2, 3], block_size=0)
    with pytest.raises(ValueError, match=r"image_emb must have shape \(N, D\)"):
        retrieval_metrics(images[0], texts, [0, 1, 2, 3])


# --------------------------------------------------------------------------------------------
# exact search (retrieval.backends.ExactBackend; the index round trip is in test_index.py)


def brute_force_topk(gallery, queries, k):
    sim = queries.double().numpy() @ gallery.double().numpy().T
    ids, scores = [], []
    for row in sim:
        order = np.argsort(-row, kind="stable")[:k]
        ids.append(order.tolist())
        scores.append(row[order].tolist())
    return np.array(scores), np.array(ids)


def random_unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def test_exact_backend_matches_brute_force_topk():
    gallery, queries = random_unit(203, 16, 0), random_unit(33, 16, 1)
    backend = ExactBackend(gallery.numpy(), block_size=5)
    scores, ids = backend.search(queries.numpy(), 7)
    ref_scores, ref_ids = brute_force_topk(gallery, queries, 7)
    assert scores.shape == ids.shape == (33, 7)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert np.array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)
    # a different block size changes nothing
    scores1, ids1 = ExactBackend(gallery.numpy(), block_size=1000).search(queries.numpy(), 7)
    assert np.array_equal(ids1, ids) and np.allclose(scores1, scores, atol=1e-6)


def test_exact_backend_k_larger_than_ntotal_pads_like_faiss():
    gallery = random_unit(3, 8, 2).numpy()
    scores, ids = ExactBackend(gallery).search(gallery, 5)
    assert ids[:, 0].tolist() == [0, 1, 2]  # each vector finds itself first
    assert np.all(ids[:, 3:] == -1) and np.all(np.isneginf(scores[:, 3:]))
    assert np.all(np.isfinite(scores[:, :3]))
    empty_scores, empty_ids = ExactBackend(np.zeros((0, 8), dtype=np.float32)).search(gallery, 2)
    assert np.all(empty_ids == -1) and np.all(np.isneginf(empty_scores))


def test_exact_backend_over_float16_storage_scores_the_stored_values():
    gallery, queries = random_unit(50, 12, 3).numpy(), random_unit(9, 12, 4).numpy()
    half = gallery.astype(np.float16)  # an index built with --dtype float16
    s16, i16 = ExactBackend(half).search(queries, 4)
    s32, i32 = ExactBackend(half.astype(np.float32)).search(queries, 4)
    assert np.array_equal(i16, i32) and np.array_equal(s16, s32)  # widened once, scored in float32
    ref_scores, ref_ids = brute_force_topk(torch.from_numpy(half.astype(np.float32)), torch.from_numpy(queries), 4)
    assert np.array_equal(i16, ref_ids)
    np.testing.assert_allclose(s16, ref_scores, rtol=0, atol=1e-6)


def test_npy_written_through_atomic_path_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    """How the index writes embeddings.npy: a failed write leaves the old file and no temp file."""
    path = tmp_path / "embeddings.npy"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.eye(4, dtype=np.float32), allow_pickle=False)
    before = path.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["embeddings.npy"]
    real_save = np.save

    def failing_save(file, arr, **kwargs):
        real_save(file, arr[:2], **kwargs)  # half written ...
        raise OSError("disk full")  # ... then the write fails

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ones((10, 4), dtype=np.float32), allow_pickle=False)
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["embeddings.npy"]  # the temp file was removed


# --------------------------------------------------------------------------------------------
# embedding with a fake model


class FakeModel(nn.Module):
    """encode_image / encode_text with the MMFormer contract. Dropout makes eval mode matter."""

    def __init__(self, dim=8, vocab=50):
        super().__init__()
        torch.manual_seed(0)
        self.image_proj = nn.Linear(3 * 4 * 4, dim)
        self.token_emb = nn.Embedding(vocab, dim)
        self.text_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(0.5)
        self.image_batches: list[int] = []
        self.calls_in_inference_mode: list[bool] = []

    def encode_image(self, images, normalize=True):
        assert images.dtype.is_floating_point and images.dim() == 4
        self.image_batches.append(images.shape[0])
        self.calls_in_inference_mode.append(torch.is_inference_mode_enabled())
        x = self.dropout(self.image_proj(images.flatten(1)))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids, attention_mask, normalize=True):
        assert input_ids.dtype == torch.long and attention_mask.dtype == torch.bool
        self.calls_in_inference_mode.append(torch.is_inference_mode_enabled())
        h = self.token_emb(input_ids) * attention_mask[..., None]
        h = h.sum(1) / attention_mask.sum(1, keepdim=True)  # masked mean: padding must not matter
        x = self.dropout(self.text_proj(h))
        return F.normalize(x, dim=-1) if normalize else x


class FakeTokenizer:
    """ids = character codes mod vocab, padded to the longest text in the batch (not max_length)."""

    def __init__(self, vocab=50):
        self.vocab = vocab
        self.max_lengths: list[int] = []

    def __call__(self, texts, max_length):
        self.max_lengths.append(max_length)
        rows = [[1 + ord(ch) % (self.vocab - 1) for ch in t][:max_length] or [1] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.int32)
        mask = torch.zeros(len(rows), width, dtype=torch.uint8)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask


def fake_images(n=11, seed=0):
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


CAPTIONS = ["a cat", "a dog on a mat", "red", "two birds in the sky", "x", "the sea", "a boat at dusk"]


def test_embed_images_batching_equals_one_batch_and_eval_reference():
    model = FakeModel()
    images = fake_images()
    one = embed_images(model, images, batch_size=64)
    batched = embed_images(model, images, batch_size=3)
    assert model.image_batches == [11, 3, 3, 3, 2]
    assert all(model.calls_in_inference_mode)
    assert one.shape == (11, 8) and one.dtype == torch.float32 and one.device.type == "cpu"
    torch.testing.assert_close(batched, one, rtol=0, atol=1e-6)
    model.eval()
    with torch.no_grad():
        reference = model.encode_image(images, normalize=True)
    torch.testing.assert_close(one, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(one.norm(dim=1), torch.ones(11), rtol=0, atol=1e-5)
    assert not one.is_inference() and not one.requires_grad


def test_embed_images_from_loader_items():
    model = FakeModel()
    images = fake_images(10)
    expected = embed_images(model, images, batch_size=10)
    dataset = torch.utils.data.TensorDataset(images, torch.arange(10))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)  # (images, labels) tuples
    torch.testing.assert_close(embed_images(model, loader), expected, rtol=0, atol=1e-6)
    dicts = [{"image": images[i : i + 3], "id": i} for i in range(0, 10, 3)]
    torch.testing.assert_close(embed_images(model, dicts, progress=True), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs one of the keys"):
        embed_images(model, [{"pixels": images}])
    with pytest.raises(ValueError, match="no images"):
        embed_images(model, [])


def test_embed_restores_every_module_mode():
    model = FakeModel()
    model.train()
    model.text_proj.eval()  # a mixed state must come back exactly
    before = {name: m.training for name, m in model.named_modules()}
    embed_images(model, fake_images(4), batch_size=2)
    embed_texts(model, FakeTokenizer(), CAPTIONS, batch_size=2, max_length=12)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert model.training and not model.text_proj.training and model.dropout.training
    model.eval()
    embed_images(model, fake_images(4))
    assert not any(m.training for m in model.modules())
    # the mode comes back even when the model fails
    model.train()
    with pytest.raises(ValueError, match="encode_image of batch 0 must return a"):
        model.encode_image = lambda images, normalize=True: torch.zeros(1)
        embed_images(model, fake_images(4))
    assert all(m.training for m in model.modules())


def test_embed_texts_batching_equals_one_batch():
    model, tokenizer = FakeModel(), FakeTokenizer()
    one = embed_texts(model, tokenizer, CAPTIONS, batch_size=100, max_length=12)
    batched = embed_texts(model, tokenizer, CAPTIONS, batch_size=2, max_length=12, progress=True)
    assert tokenizer.max_lengths == [12] * 5
    assert one.shape == (7, 8) and one.dtype == torch.float32
    torch.testing.assert_close(batched, one, rtol=0, atol=1e-6)
    ids, mask = tokenizer(CAPTIONS, max_length=12)
    model.eval()
    with torch.no_grad():
        reference = model.encode_text(ids.long(), mask.bool())
    torch.testing.assert_close(one, reference, rtol=0, atol=1e-6)
    assert not one.is_inference()
    # bf16 autocast still returns float32, close to the float32 result
    low = embed_texts(model, tokenizer, CAPTIONS, batch_size=3, max_length=12, autocast_dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, one, rtol=0, atol=3e-2)
    assert not torch.equal(low, one)
    with pytest.raises(TypeError, match="sequence of str"):
        embed_texts(model, tokenizer, "a cat")
    with pytest.raises(ValueError, match="no texts"):
        embed_texts(model, tokenizer, [])


def test_evaluate_retrieval_equals_embed_then_metrics():
    model, tokenizer = FakeModel(), FakeTokenizer()
    images = fake_images(4, seed=2)
    caption_to_image = [0, 1, 2, 3, 0, 2, 1]
    got = evaluate_retrieval(
        model, tokenizer, images, CAPTIONS, caption_to_image, batch_size=3, max_length=16, ks=(1, 2)
    )
    img = embed_images(model, images, batch_size=4)
    txt = embed_texts(model, tokenizer, CAPTIONS, batch_size=7, max_length=16)
    assert got == pytest.approx(retrieval_metrics(img, txt, caption_to_image, ks=(1, 2)))
    assert got["n_images"] == 4 and got["n_texts"] == 7 and "t2i_R@2" in got
    with pytest.raises(ValueError, match="same length"):
        evaluate_retrieval(model, tokenizer, images, CAPTIONS, caption_to_image[:-1])


def test_embed_texts_max_length_defaults_to_model_context_length():
    from types import SimpleNamespace

    model, tokenizer = FakeModel(), FakeTokenizer()
    with pytest.raises(ValueError, match="no config.context_length; pass max_length"):
        embed_texts(model, tokenizer, CAPTIONS)
    model.config = SimpleNamespace(context_length=5)
    default = embed_texts(model, tokenizer, CAPTIONS, batch_size=4)
    assert tokenizer.max_lengths == [5, 5]
    torch.testing.assert_close(default, embed_texts(model, tokenizer, CAPTIONS, max_length=5), rtol=0, atol=0)
    # truncation to 5 tokens changes the long captions' embeddings
    assert not torch.allclose(default, embed_texts(model, tokenizer, CAPTIONS, max_length=30))
