"""Attention, positions and the multiway block against plain float64 references."""

import math

import pytest
import torch

from mmformer.layers.attention import SelfAttention, attend, cross_attend, split_fused, split_heads
from mmformer.layers.multiway import MultiwayBlock
from mmformer.layers.positions import sincos_2d, sinusoidal_1d
from mmformer.layers.sparse import compressed_attention, local_global_attention


def reference_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads, mask=None, context=None, kv=None):
    """softmax(Q K^T / sqrt(d_k)) V per head, in float64, written out by hand."""
    x = x.double()
    b, t, d = x.shape
    dh = d // heads
    if context is None:
        q, k, v = (x @ qkv_w.double().T + qkv_b.double()).split(d, dim=-1)
    else:
        q = x @ qkv_w.double().T + qkv_b.double()
        k, v = (context.double() @ kv[0].double().T + kv[1].double()).split(d, dim=-1)
    out = torch.zeros(b, t, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            scores = q[bi, :, sl] @ k[bi, :, sl].T / math.sqrt(dh)  # (T, S)
            if mask is not None:
                scores = scores.masked_fill(~mask[bi][None, :], float("-inf"))
            out[bi, :, sl] = torch.softmax(scores, dim=-1) @ v[bi, :, sl]
    return out @ proj_w.double().T + proj_b.double()


def test_self_attention_matches_float64_reference_with_padding_mask():
    torch.manual_seed(0)
    attn = SelfAttention(32, heads=4)
    x = torch.randn(3, 7, 32)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1:] = False
    got = attn(x, mask)
    ref = reference_attention(x, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, 4, mask)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    # real tokens do not see padding: changing a padded position leaves row 1's real outputs alone
    x2 = x.clone()
    x2[1, 5] += 10
    torch.testing.assert_close(attn(x2, mask)[1, :4], got[1, :4])


def test_cross_attention_matches_float64_reference_with_key_mask_and_logit_scale():
    """cross_attend (DocumentFusion's latents over chunk states): softmax(s_bh q k^T / sqrt(dh)) v
    per batch row b and head h, padded keys never attended, against a float64 loop."""
    g = torch.Generator().manual_seed(1)
    b, m, s_len, heads, d = 2, 3, 5, 2, 16
    dh = d // heads
    q, kv = torch.randn(b, m, d, generator=g), torch.randn(b, s_len, 2 * d, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    scale = torch.rand(b, heads, 1, 1, generator=g) + 0.5
    ref = torch.zeros(b, m, d, dtype=torch.float64)
    k, v = kv.double().split(d, dim=-1)
    for bi in range(b):
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            scores = scale[bi, h].double() * q[bi, :, sl].double() @ k[bi, :, sl].T / math.sqrt(dh)  # (M, S)
            scores = scores.masked_fill(~mask[bi][None, :], float("-inf"))
            ref[bi, :, sl] = torch.softmax(scores, dim=-1) @ v[bi, :, sl]
    torch.testing.assert_close(cross_attend(q, kv, heads, mask, logit_scale=scale).double(), ref, atol=1e-5, rtol=1e-5)
    unscaled = cross_attend(q, kv, heads, mask)
    torch.testing.assert_close(unscaled, cross_attend(q, kv, heads, mask, logit_scale=torch.ones(1, 1, 1, 1)))
    kv2 = kv.clone()
    kv2[0, 3:] += 10  # row 0's padded keys and values change nothing
    torch.testing.assert_close(cross_attend(q, kv2, heads, mask)[0], unscaled[0])
    with pytest.raises(ValueError, match=r"fused keys/values \(B, S, 2D\); got \(2, 3, 16\) and \(2, 5, 24\)"):
        cross_attend(q, kv[..., :24], heads)


def test_sinusoidal_positions_equal_the_formula():
    pe = sinusoidal_1d(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sincos_2d_encodes_row_then_column():
    pe = sincos_2d(3, 4, 16)  # (12, 16)
    row, col = sinusoidal_1d(3, 8), sinusoidal_1d(4, 8)
    for r in range(3):
        for c in range(4):
            torch.testing.assert_close(pe[r * 4 + c], torch.cat([row[r], col[c]]))
    assert len({tuple(p.tolist()) for p in pe}) == 12  # every patch has a distinct code


@pytest.mark.parametrize("share", ["qkv", "attention", "all", "none"])
def test_multiway_block_routes_norms_per_modality(share):
    torch.manual_seed(0)
    block = MultiwayBlock(16, 2, 32, share=share)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        block.norm1["text"].weight.mul_(3.0)
    img, txt = block(x, "image"), block(x, "text")
    assert not torch.allclose(img, txt), "text path must use its own norms"
    with pytest.raises(KeyError, match="unknown modality 'audio'"):
        block(x, "audio")


def test_multiway_block_shares_weights_where_configured():
    shared = MultiwayBlock(16, 2, 32, share="qkv")
    names = {n for n, _ in shared.named_parameters()}
    assert "attn.qkv.weight" in names and "attn.proj.image.weight" in names
    none = MultiwayBlock(16, 2, 32, share="none")
    assert {"attn.qkv.image.weight", "attn.qkv.text.weight"} <= {n for n, _ in none.named_parameters()}


def test_split_fused_takes_q_k_v_from_their_thirds_head_by_head():
    b, t, heads, dh = 2, 5, 3, 4
    d = heads * dh
    x = torch.randn(b, t, 3 * d)
    q, k, v = split_fused(x, 3, heads)
    assert q.shape == k.shape == v.shape == (b, heads, t, dh)
    for i, part in enumerate((q, k, v)):
        for h in range(heads):  # head h of part i is columns [i*D + h*Dh, i*D + (h+1)*Dh)
            assert torch.equal(part[:, h], x[..., i * d + h * dh : i * d + (h + 1) * dh])
    k2, v2 = split_fused(x[..., : 2 * d], 2, heads)
    assert torch.equal(k2, q) and torch.equal(v2, k)
    assert torch.equal(split_heads(x[..., :d], heads), q)
    assert q.data_ptr() == x.data_ptr()  # views, no copy


@pytest.mark.parametrize(
    "bad", [torch.ones(2, 6, dtype=torch.bool), torch.ones(2, 5, dtype=torch.long), torch.ones(5, dtype=torch.bool)]
)
def test_every_attention_kernel_gives_the_same_mask_error(bad):
    qkv = torch.randn(2, 5, 3 * 8)
    message = r"key_padding_mask must be bool of shape \(B, S\) = \(2, 5\), True = real token; got "
    for kernel in (attend, local_global_attention, compressed_attention):
        with pytest.raises(ValueError, match=message):
            kernel(qkv, 2, bad)
    with pytest.raises(ValueError, match=message):
        SelfAttention(8, 2)(torch.randn(2, 5, 8), bad)
    with pytest.raises(ValueError, match=r"dim=8 is not divisible by heads=3"):
        SelfAttention(8, 3)


@pytest.mark.parametrize("t,s", [(17, 17), (5, 33)])
def test_matmul_attention_path_equals_sdpa_in_bf16_with_gradients(t, s):
    """bf16 CPU training takes the two-matmul path of scaled_dot_product (faster than the CPU flash
    kernel's backward); outputs and gradients match SDPA's within bf16 rounding (relative to a
    float64 reference, both paths' errors are of the same size)."""
    from mmformer.layers.attention import scaled_dot_product, use_matmul_path

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 32, generator=g) for n in (t, s, s))
    mask = torch.rand(3, 1, 1, s, generator=g) > 0.3
    mask[..., 0] = True
    grad = torch.randn(3, 4, t, 32, generator=g)

    def run(fn, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = fn(*leaves, mask)
        out.backward(grad.to(dtype))
        return [out.double()] + [x.grad.double() for x in leaves]

    qq = q.bfloat16().requires_grad_()
    assert use_matmul_path(qq, k.bfloat16()) and not use_matmul_path(q.clone().requires_grad_(), k)
    with torch.no_grad():
        assert not use_matmul_path(qq, k.bfloat16())
    ref = run(lambda a, b, c, m: torch.nn.functional.scaled_dot_product_attention(a, b, c, attn_mask=m), torch.float64)
    sdpa = run(
        lambda a, b, c, m: torch.nn.functional.scaled_dot_product_attention(a, b, c, attn_mask=m), torch.bfloat16
    )
    ours = run(scaled_dot_product, torch.bfloat16)
    for r, a, b in zip(ref, sdpa, ours):
        err_sdpa, err_ours = (a - r).abs().max().item(), (b - r).abs().max().item()
        assert err_ours <= max(2 * err_sdpa, 0.02), (err_ours, err_sdpa)


@pytest.mark.parametrize("dtype,masked", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)])
def test_fused_cpu_kernel_equals_the_reference_with_gradients(dtype, masked):
    """The ``fused_cpu`` attention kernel (``ModelConfig.attention_kernel``) takes FusedQKVAttention
    in bf16/fp16 CPU training (its own backward over a head-major copy); its output and qkv gradient
    match the reference ``attend`` (two matmuls and a softmax under autograd) within that dtype's
    rounding of a float64 reference, with and without a padding mask, and in bf16 also inside
    autocast. In fp32, and without gradients, it is the reference."""
    from mmformer.layers.attention import MATMUL_PATH_MAX_LEN
    from mmformer.layers.cpu_attention import use_fused_qkv_path
    from mmformer.model import ATTENTION_KERNEL_FNS

    fused = ATTENTION_KERNEL_FNS["fused_cpu"]
    assert ATTENTION_KERNEL_FNS["default"] is attend
    g = torch.Generator().manual_seed(1)
    b, t, heads, dh = 3, 9, 2, 16
    qkv = torch.randn(b, t, 3 * heads * dh, generator=g)
    mask = None
    if masked:
        mask = torch.rand(b, t, generator=g) > 0.4
        mask[:, 0] = True
    grad = torch.randn(b, t, heads * dh, generator=g)
    floor = 0.02 if dtype == torch.bfloat16 else 4e-3

    def run(fn, dtype, autocast=False):
        leaf = qkv.to(dtype, copy=True).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(leaf, heads, mask)
        out.backward(grad.to(out.dtype))
        return out, leaf.grad.double()

    ref_out, ref_grad = run(attend, torch.float64)
    comp_out, comp_grad = run(attend, dtype)
    real = (mask if masked else torch.ones(b, t, dtype=torch.bool))[:, :, None].expand_as(ref_out)
    for autocast in (False, True) if dtype == torch.bfloat16 else (False,):
        out, dqkv = run(fused, dtype, autocast)
        assert type(out.grad_fn).__name__ == "FusedQKVAttentionBackward" and out.dtype == dtype
        for ours, theirs, ref in (
            (out.double()[real], comp_out.double()[real], ref_out[real]),
            (dqkv, comp_grad, ref_grad),
        ):
            err, err_comp = (ours - ref).abs().max().item(), (theirs - ref).abs().max().item()
            assert err <= max(2 * err_comp, floor), (err, err_comp)
    fp32_out, fp32_grad = run(fused, torch.float32)
    assert type(fp32_out.grad_fn).__name__ != "FusedQKVAttentionBackward"
    assert torch.equal(fp32_out, run(attend, torch.float32)[0])
    x = qkv.to(dtype, copy=True).requires_grad_()
    assert use_fused_qkv_path(x) and not use_fused_qkv_path(qkv.clone().requires_grad_())  # fp32: SDPA
    with torch.no_grad():
        assert not use_fused_qkv_path(x)
    assert use_fused_qkv_path(torch.zeros(1, MATMUL_PATH_MAX_LEN, 6, dtype=dtype, requires_grad=True))
    assert not use_fused_qkv_path(torch.zeros(1, MATMUL_PATH_MAX_LEN + 1, 6, dtype=dtype, requires_grad=True))
    for kernel in (attend, fused):
        with pytest.raises(ValueError, match=r"fused qkv width 96 is not 3 x heads \(5\) x d_head"):
            kernel(x, 5, mask)


def test_attention_kernel_is_one_config_switch_with_the_reference_as_default(tmp_path, monkeypatch):
    """``ModelConfig.attention_kernel`` picks the blocks' attention: the default model never takes
    FusedQKVAttention, a ``fused_cpu`` one does in bf16 CPU training (image and dense text routes)
    and trains the same loss and gradients within bf16 rounding; fp32 is bit for bit the same. The
    choice is saved in config.json, switchable on a built model, and not part of the fingerprint."""
    from mmformer.config import get_config
    from mmformer.layers import cpu_attention
    from mmformer.losses import clip_loss
    from mmformer.model import MMFormer, model_fingerprint

    calls = []
    apply = cpu_attention.FusedQKVAttention.apply
    monkeypatch.setattr(cpu_attention.FusedQKVAttention, "apply", lambda *a: calls.append(a[0].shape) or apply(*a))
    torch.manual_seed(0)
    ref = MMFormer(get_config("tiny", depth=2)).train()
    fused = MMFormer(get_config("tiny", depth=2, attention_kernel="fused_cpu")).train()
    fused.load_state_dict(ref.state_dict())
    images = torch.randn(4, 3, 64, 64)
    ids = torch.randint(4, 4000, (4, 16))
    mask = torch.arange(16)[None] < torch.tensor([16, 9, 5, 12])[:, None]

    def step(model, bf16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images, ids, mask)
            loss = clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], gather=False)
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    loss_ref, grads_ref = step(ref, True)
    assert calls == []
    loss_fused, grads_fused = step(fused, True)
    assert len(calls) == 4  # 2 blocks x (image, text)
    torch.testing.assert_close(loss_fused, loss_ref, atol=2e-2, rtol=2e-2)
    for name, g in grads_ref.items():
        assert (grads_fused[name] - g).norm() <= 0.1 * g.norm() + 1e-3, name
    calls.clear()
    loss32_ref, _ = step(ref, False)
    loss32_fused, _ = step(fused, False)
    assert calls == [] and torch.equal(loss32_ref, loss32_fused)

    fused.save_pretrained(tmp_path / "m")
    assert MMFormer.from_pretrained(tmp_path / "m").config.attention_kernel == "fused_cpu"
    assert model_fingerprint(fused) == model_fingerprint(ref)
    ref.set_text_attention("local", window=2)
    ref.set_attention_kernel("fused_cpu")
    assert ref.config.attention_kernel == "fused_cpu" and ref.config.attention == "local"
    assert all(b.attn.attend is cpu_attention.attend_fused_cpu for b in ref.blocks)
    assert all(b.attn.text_attend.func.__name__ == "local_global_attention" for b in ref.blocks)
    with pytest.raises(ValueError, match=r"attention_kernel='fast' must be one of \('default', 'fused_cpu'\)"):
        get_config("tiny", attention_kernel="fast")
    with pytest.raises(ValueError, match="attention_kernel='fast' must be one of"):
        ref.set_attention_kernel("fast")


def test_patch_embedding_matmul_equals_the_convolution():
    from mmformer.model import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(16, 3, 64)
    x = torch.randn(2, 3, 64, 48)
    ref = pe.proj(x).flatten(2).transpose(1, 2)
    assert torch.allclose(pe(x), ref, atol=1e-5)
    with pytest.raises(ValueError, match="64x50 is not divisible by the patch size 16"):
        pe(torch.randn(1, 3, 64, 50))
