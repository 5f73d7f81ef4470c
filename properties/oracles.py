"""Independent formulations the properties compare `nsa_ref` against.

Dense boolean masks built straight from spec Part I and one masked softmax; no code is shared
with `nsa_ref`'s per-row loops or its `rules`, so a wrong rule there cannot hide behind the same
wrong rule here.
"""

from __future__ import annotations

import math

import torch

from nsa_ref import NSAConfig

from .strategies import Inputs, phi_function


def masked_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """Attention over the keys a mask allows, exact zeros for rows that allow none.

    ``q [B, T, H, Dk]``, ``k [B, S, G, Dk]``, ``v [B, S, G, Dv]``, ``mask [B or 1, T, G or 1, S]``
    (bool); query head ``i`` reads group ``i // (H // G)``. Returns ``[B, T, H, Dv]``.
    """
    B, T, H, _ = q.shape
    S, G, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if S == 0:
        return q.new_zeros(B, T, H, Dv)
    qg = q.reshape(B, T, G, H // G, -1)
    logits = torch.einsum("btgid,bsgd->btgis", qg, k) * scale
    allowed = mask.expand(B, T, G, S)[:, :, :, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    top = logits.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # empty rows: no NaN
    weights = torch.exp(logits - top)
    den = weights.sum(dim=-1, keepdim=True)
    out = torch.einsum("btgis,bsge->btgie", weights, v) / torch.where(den > 0, den, 1.0)
    return out.reshape(B, T, H, Dv)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` as a float, 0 for empty tensors (a comparison of nothing passes)."""
    return float((a - b).abs().max()) if a.numel() else 0.0


def causal_mask(T: int) -> torch.Tensor:
    """``[1, T, 1, T]``: key ``s`` visible to query ``p`` iff ``s <= p`` (Eq. 1)."""
    p = torch.arange(T)
    return (p[None, :] <= p[:, None])[None, :, None, :]


def window_mask(T: int, w: int) -> torch.Tensor:
    """``[1, T, 1, T]``: ``p - w < s <= p`` (spec I.7)."""
    p = torch.arange(T)
    diff = p[:, None] - p[None, :]
    return ((diff >= 0) & (diff < w))[None, :, None, :]


def selection_mask(block_indices: torch.Tensor, cfg: NSAConfig) -> torch.Tensor:
    """``[B, T, G, T]`` from ``block_indices [B, T, G, n]``: keys of listed blocks with ``s <= p``.

    ``-1`` never matches a block (``s // l' >= 0``) and a duplicate matches the same keys.
    """
    T = block_indices.shape[1]
    key_block = torch.arange(T) // cfg.sel_block
    listed = (block_indices[..., None] == key_block).any(dim=-2)
    return listed & causal_mask(T)


def compressed(x: torch.Tensor, cfg: NSAConfig, phi=None) -> torch.Tensor:
    """Eq. 7 by unfolding: ``x [B, T, G, D] -> [B, N, G, D]``, block ``i`` = ``x[i*d : i*d+l]``."""
    B, T, G, D = x.shape
    l, d = cfg.cmp_block, cfg.cmp_stride
    if T < l:
        return x.new_zeros(B, 0, G, D)
    blocks = x.unfold(1, l, d).permute(0, 1, 2, 4, 3)  # [B, N, G, l, D]
    return blocks.mean(dim=-2) if phi is None else phi(blocks)


def cmp_visible_mask(T: int, N: int, cfg: NSAConfig) -> torch.Tensor:
    """``[1, T, 1, N]``: compressed block ``i`` is visible to ``p`` iff ``i*d + l <= p + 1``."""
    p, i = torch.arange(T), torch.arange(N)
    return (i[None, :] * cfg.cmp_stride + cfg.cmp_block <= p[:, None] + 1)[None, :, None, :]


def overlap_weights(num_sel: int, num_cmp: int, cfg: NSAConfig) -> torch.Tensor:
    """Eq. 9 weights by counting shared tokens: ``W[j, i] = |C_i ∩ S_j| / d`` (spec §2.9)."""
    l, d, ls = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block
    W = torch.zeros(num_sel, num_cmp, dtype=torch.float64)
    for j in range(num_sel):
        sel = set(range(j * ls, (j + 1) * ls))
        for i in range(num_cmp):
            W[j, i] = len(sel & set(range(i * d, i * d + l))) / d
    return W


def default_scale(inputs: Inputs) -> float:
    """The spec's softmax scale ``1/sqrt(Dk)``."""
    return 1.0 / math.sqrt(inputs.q.shape[-1])


@torch.no_grad()
def branches(inputs: Inputs, cfg: NSAConfig, block_indices: torch.Tensor) -> dict:
    """Independent ``cmp``, ``sel``, ``win`` and causal ``full`` outputs, ``[B, T, H, Dv]`` each.

    Selection uses the given ``block_indices`` (the reference's choice, checked elsewhere); every
    packed sequence is handled on its own with positions restarting at 0. ``full`` is plain causal
    attention over the ``sel`` branch's keys.
    """
    s = inputs.structure
    phi = phi_function(s.phi)
    scale = default_scale(inputs)
    shape = (*inputs.q.shape[:3], s.Dv)
    out = {name: inputs.q.new_zeros(shape) for name in ("cmp", "sel", "win", "full")}
    for b, start, end in s.sequences():
        rows = slice(start, end)
        q = inputs.q[b : b + 1, rows]
        T = end - start
        kc, vc, ks, vs, kw, vw = (
            t[b : b + 1, rows] for name in ("cmp", "sel", "win") for t in inputs.kv(name)
        )
        ck, cv = compressed(kc, cfg, phi), compressed(vc, cfg, phi)
        visible = cmp_visible_mask(T, ck.shape[1], cfg)
        out["cmp"][b, rows] = masked_attention(q, ck, cv, visible, scale)[0]
        sel_mask = selection_mask(block_indices[b : b + 1, rows], cfg)
        out["sel"][b, rows] = masked_attention(q, ks, vs, sel_mask, scale)[0]
        out["win"][b, rows] = masked_attention(q, kw, vw, window_mask(T, cfg.window), scale)[0]
        out["full"][b, rows] = masked_attention(q, ks, vs, causal_mask(T), scale)[0]
    return out
