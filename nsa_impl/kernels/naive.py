"""Naive twins of the kernels: plain PyTorch, dense masks, computed in the input dtype.

They define the same functions as `triton_sel.selection_attention` and
`flash.window_attention` in the most direct way (a boolean ``[N, G, N]`` key mask over the
packed tokens, then masked softmax attention), so they serve as

* the ``naive_lowp`` implementation of the low-precision tolerance class (spec I.10): run in
  fp16/bf16 they show how much error plain same-dtype arithmetic makes, and
* a readable statement of what the kernels compute.

Memory is ``O(N^2 * H)``: tests and benchmarks use them only for a few thousand tokens.
"""

from __future__ import annotations

import math

import torch


def _tokens(B: int, T: int, cu_seqlens, device):
    """Per packed token: sequence id and local position (batch rows act as sequences)."""
    if cu_seqlens is None:
        cu = torch.arange(B + 1, device=device, dtype=torch.int64) * T
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
    tok = torch.arange(B * T, device=device)
    seq = torch.searchsorted(cu[1:], tok, right=True)
    return seq, tok - cu[seq]


def masked_attention(q, k, v, allowed, scale: float) -> torch.Tensor:
    """``q [N,H,Dk]``, ``k [N,G,Dk]``, ``v [N,G,Dv]``, ``allowed [N,G,N]`` -> ``o [N,H,Dv]``.

    Softmax over the allowed keys in q's dtype; a row with no allowed key gives exact zeros.
    """
    N, H, _ = q.shape
    G = k.shape[1]
    h = H // G
    qg = q.reshape(N, G, h, -1)
    logits = torch.einsum("ngid,sgd->gins", qg, k) * scale  # [G, h, N, N]
    mask = allowed.permute(1, 0, 2)[:, None]  # [G, 1, N, N]
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    o = torch.einsum("gins,sgd->ngid", probs, v)
    return o.reshape(N, H, -1)


def selection_attention_naive(q, k, v, block_indices, sel_block: int, scale=None, cu_seqlens=None):
    """Same contract as `nsa_impl.kernels.triton_sel.selection_attention`, dense and slow."""
    B, T, H, Dk = q.shape
    G, n = k.shape[2], block_indices.shape[-1]
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    N = B * T
    seq, local = _tokens(B, T, cu_seqlens, q.device)
    idx = block_indices.reshape(N, G, n).to(device=q.device, dtype=torch.int64)
    nblk = -(-T // sel_block) + 1  # local block ids are < ceil(T / l'); the extra slot eats -1
    chosen = torch.zeros(N, G, nblk + 1, dtype=torch.bool, device=q.device)
    slot = torch.where((idx >= 0) & (idx < nblk), idx, nblk)
    chosen.scatter_(2, slot, True)  # a set: repeats write the same True
    chosen = chosen[..., :nblk]
    key_blk = (local // sel_block).clamp(max=nblk - 1)  # [N] block of each key
    allowed = chosen[:, :, key_blk]  # [N, G, N]: key's block selected by the query row
    allowed &= (seq[:, None] == seq[None, :])[:, None, :]
    allowed &= (local[None, :] <= local[:, None])[:, None, :]
    o = masked_attention(
        q.reshape(N, H, Dk), k.reshape(N, G, Dk), v.reshape(N, G, -1), allowed, scale
    )
    return o.reshape(B, T, H, -1)


def window_attention_naive(q, k, v, window: int, scale=None, cu_seqlens=None):
    """Same contract as `nsa_impl.kernels.flash.window_attention`: keys ``p - w < s <= p``."""
    B, T, H, Dk = q.shape
    G = k.shape[2]
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    N = B * T
    seq, local = _tokens(B, T, cu_seqlens, q.device)
    d = local[:, None] - local[None, :]
    allowed = (seq[:, None] == seq[None, :]) & (d >= 0) & (d < window)
    allowed = allowed[:, None, :].expand(N, G, N)
    o = masked_attention(
        q.reshape(N, H, Dk), k.reshape(N, G, Dk), v.reshape(N, G, -1), allowed, scale
    )
    return o.reshape(B, T, H, -1)


def random_block_indices(B, T, G, n, sel_block, *, generator=None, device=None, coherent=False,
                         chunk=8192):
    """Paper-shaped selections for tests and benchmarks: ``[B, T, G, n]`` int64, ascending.

    Each (position, group) gets the forced blocks ``0, b(p)-1, b(p)`` and ``n - 3`` further
    distinct candidates ``<= b(p)`` drawn at random, ``-1`` padded when fewer exist (spec I.5's
    shape, random scores). ``coherent=True`` draws one score vector per query block of
    ``sel_block`` positions (neighbours then select the same blocks, as trained models tend to);
    the default draws per position, the worst case for sharing. Memory is bounded by ``chunk``.
    """
    nb = -(-T // sel_block)
    j = torch.arange(nb, device=device)
    out = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        b = torch.arange(t0, t1, device=device) // sel_block
        if coherent:
            draw = torch.rand(B, nb, G, nb, device=device, generator=generator)
            score = draw[:, b]
        else:
            score = torch.rand(B, t1 - t0, G, nb, device=device, generator=generator)
        cand = (j[None, :] <= b[:, None])[None, :, None, :]
        forced = ((j[None, :] == 0) | (j[None, :] >= b[:, None] - 1))[None, :, None, :]
        score = torch.where(cand & forced, 2.0, torch.where(cand, score, -1.0))
        top = torch.topk(score, min(n, nb), dim=-1)
        idx = torch.where(top.values >= 0, top.indices, nb)
        idx = torch.sort(idx, dim=-1).values
        out.append(torch.where(idx == nb, -1, idx))
    idx = torch.cat(out, dim=1)
    if idx.shape[-1] < n:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], n - idx.shape[-1]), -1)], -1)
    return idx
