"""Gated cross-attention fusion of a document's chunk states into one document embedding.

A long document is encoded as N windows ("chunks") of at most L tokens in one encoder call;
:class:`DocumentFusion` reads the token states of all chunks of a batch of documents, (C, L, D)
with the per-document chunk counts, and attends over each document's chunks (keys and values
padded to the batch's largest chunk count, (B, Nmax * L), with a key padding mask):

1. keys = LayerNorm(states) + chunk-index embedding (a zero-initialised linear map of a
   sinusoidal table of the chunk index, so nothing caps the number of chunks);
2. M learned latent queries (B, M, D) cross-attend over the keys. The attention logits are
   multiplied by ``s_h * log(n)`` (n = the document's number of real keys, s_h a learned
   per-head scale initialised to 1 / log(256)): with plain softmax the weight on a few
   relevant tokens shrinks like 1/n as a document grows, so latents trained on 1k-token
   documents would wash out at 16k; the log(n) factor keeps the logit gap growing with n
   (the "scalable softmax" idea);
3. one pre-norm self-attention + FFN block over the latents;
4. mean over the latents -> LayerNorm -> linear to the joint space E.

The result f (B, E) is added to the document's base embedding through a tanh gate that starts
at zero, and only for documents of more than one chunk:
``z = base + [n_chunks > 1] * tanh(gate) * f``. So a one-chunk document gives exactly its
plain text embedding, and training starts from the base (mean of the chunk embeddings).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmformer.layers.attention import SelfAttention, check_heads, cross_attend
from mmformer.layers.init import init_linears_and_norms
from mmformer.layers.multiway import Mlp
from mmformer.layers.positions import sinusoidal_1d


class DocumentFusion(nn.Module):
    """Latent queries cross-attend over all chunk token states; gated residual onto a base embedding.

    Args:
        dim: width D of the encoder's token states.
        embed_dim: joint-space width E.
        latents: number M of learned queries.
        heads: attention heads (``dim`` must divide by it).
        mlp_ratio: FFN width of the latent block, in multiples of ``dim``.
        eps: LayerNorm epsilon.
        ref_keys: the key count at which the log-length logit factor is 1 at initialisation.
    """

    def __init__(
        self,
        dim: int,
        embed_dim: int,
        latents: int = 16,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        eps: float = 1e-6,
        ref_keys: int = 256,
    ) -> None:
        super().__init__()
        check_heads(dim, heads)
        if latents < 1:
            raise ValueError(f"latents must be >= 1, got {latents}")
        self.dim, self.heads = dim, heads
        self.latents = nn.Parameter(torch.empty(latents, dim))
        self.chunk_pos = nn.Linear(dim, dim, bias=False)
        self.norm_ctx = nn.LayerNorm(dim, eps=eps)
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.length_scale = nn.Parameter(torch.empty(heads))
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_out = nn.LayerNorm(dim, eps=eps)
        self.out = nn.Linear(dim, embed_dim, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))
        self.ref_keys = ref_keys
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Latents N(0, 0.02); linears N(0, D^-1/2) (outputs onto a residual N(0, (2D)^-1/2));
        chunk-index map and gate zero; log-length scale 1/log(ref_keys); norms 1/0."""
        d = self.dim
        nn.init.normal_(self.latents, std=0.02)
        residual = {self.proj, self.attn.proj, self.mlp.fc2}  # outputs added to a residual stream
        init_linears_and_norms(self.named_modules(), lambda name, m: (2 * d) ** -0.5 if m in residual else d**-0.5)
        nn.init.zeros_(self.chunk_pos.weight)
        nn.init.constant_(self.length_scale, 1.0 / math.log(self.ref_keys))
        with torch.no_grad():
            self.gate.zero_()

    def fuse(self, states: torch.Tensor, mask: torch.Tensor, chunk_counts: torch.Tensor) -> torch.Tensor:
        """The fusion term f before the gate.

        states: (C, L, D) token states of every chunk, the chunks of document 0 first, in order
        (C = sum of ``chunk_counts``); mask: (C, L) bool, True = a real token (each chunk needs
        one); chunk_counts: (B,) chunks per document. Returns (B, E).

        The per-token work (norm, chunk-index embedding, key/value projection) runs on the C
        chunks as they are; only the keys and values are padded to the batch's largest chunk
        count for the attention, (B, H, Nmax * L, Dh) with a key padding mask.
        """
        c, length, d = states.shape
        if mask.shape != (c, length) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool of shape {(c, length)}, got {mask.dtype} {tuple(mask.shape)}")
        if int(chunk_counts.sum()) != c or not bool((chunk_counts > 0).all()):
            raise ValueError(f"chunk_counts {chunk_counts.tolist()} must be positive and sum to the {c} chunks")
        if not bool(mask.any(1).all()):
            raise ValueError("every chunk needs at least one real token")
        b, n_max = chunk_counts.shape[0], int(chunk_counts.max())
        doc_mask = torch.arange(n_max, device=states.device)[None] < chunk_counts[:, None]  # (B, Nmax)
        chunk_index = torch.arange(n_max, device=states.device).expand(b, n_max)[doc_mask]  # (C,)
        table = sinusoidal_1d(n_max, d).to(device=states.device, dtype=states.dtype)  # (Nmax, D)
        ctx = self.norm_ctx(states) + self.chunk_pos(table)[chunk_index][:, None]  # (C, L, D)
        kv = self.kv(ctx)  # (C, L, 2D)
        padded = kv.new_zeros(b, n_max, length, 2 * d)
        padded[doc_mask] = kv
        key_mask = mask.new_zeros(b, n_max, length)
        key_mask[doc_mask] = mask
        s = n_max * length
        key_mask = key_mask.view(b, s)
        n_keys = key_mask.sum(1)  # (B,)
        q = self.q(self.norm_q(self.latents)).expand(b, -1, -1)  # (B, M, D)
        factor = self.length_scale.view(1, -1, 1, 1) * torch.log(n_keys.to(q.dtype).clamp(min=2)).view(b, 1, 1, 1)
        h = cross_attend(q, padded.view(b, s, 2 * d), self.heads, key_mask, logit_scale=factor)  # (B, M, D)
        x = self.latents + self.proj(h)  # (B, M, D)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.out(self.norm_out(x.mean(1)))  # (B, E)

    def forward(
        self, base: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, chunk_counts: torch.Tensor
    ) -> torch.Tensor:
        """base: (B, E) un-normalised document embedding; states, mask, chunk_counts as in
        :meth:`fuse`. Returns (B, E).

        Documents of one chunk get ``base`` unchanged (bit for bit).
        """
        f = self.fuse(states, mask, chunk_counts)
        gated = torch.tanh(self.gate).to(f.dtype) * f
        return torch.where((chunk_counts > 1).view(-1, 1), base + gated, base)
