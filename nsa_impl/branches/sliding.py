"""Sliding-window branch (spec I.7): query ``p`` attends to keys ``p - w < s <= p``.

"masked" path: rows ``p < w`` of a single (unpacked) sequence are plain causal attention (fused
SDPA); the other rows use banded chunks of the shared masked softmax
(`nsa_impl.branches.range_attention`): a chunk of rows ``[r0, r1)`` reads only keys
``[r0 - w + 1, r1)``, so memory is ``O(B * H * c * (c + w))`` however long ``T`` is. With
``cu_seqlens`` each row's range starts no earlier than its own sequence. "flash" path:
`nsa_impl.kernels.flash.window_attention` (FlashAttention-2 varlen with a left window); "triton"
path: `nsa_impl.kernels.triton_attn.window_attention`; each imported only when chosen.
"""

from __future__ import annotations

import importlib

import torch

from nsa_ref.config import NSAConfig

from ..varlen import PackedLayout
from . import RowRanges, causal_attention, range_attention


def window_ranges(cfg: NSAConfig, layout: PackedLayout) -> RowRanges:
    """Row ``r`` sees ``[max(start of its sequence, r - w + 1), r + 1)``: ``min(w, p+1)`` keys."""
    rows = torch.arange(layout.T)
    lo = torch.maximum(layout.seq_start, rows - cfg.window + 1)
    return RowRanges(lo, rows + 1, layout.T)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: NSAConfig,
    scale: float,
    layout: PackedLayout,
    *,
    path: str = "masked",
    cu_seqlens: torch.Tensor | None = None,
    budget_bytes: int | None = None,
) -> torch.Tensor:
    """``o_win [B, T, H, Dv]`` for ``q [B, T, H, Dk]``, ``k/v [B, T, G, D]`` (differentiable).

    ``path`` is "masked" (banded chunks, any device/dtype), "flash" (the FA-2 wrapper) or
    "triton" (the Triton window kernels).
    """
    if path == "flash":
        flash = importlib.import_module("nsa_impl.kernels.flash")
        return flash.window_attention(q, k, v, cfg.window, scale, cu_seqlens=cu_seqlens)
    if path == "triton":
        triton_attn = importlib.import_module("nsa_impl.kernels.triton_attn")
        return triton_attn.window_attention(
            q, k, v, cfg.window, scale, cu_seqlens=cu_seqlens, max_seqlen=max(layout.lengths)
        )
    if path != "masked":
        raise ValueError(f"window path must be 'masked', 'flash' or 'triton', got {path!r}")
    ranges = window_ranges(cfg, layout)
    L = min(cfg.window, layout.T) if len(layout.lengths) == 1 else 0
    if L == 0:
        return range_attention(q, k, v, ranges, scale, budget_bytes=budget_bytes)
    # Rows p < w see every key 0..p: plain causal attention; the rest go through banded chunks.
    head = causal_attention(q[:, :L], k[:, :L], v[:, :L], scale)
    if L == layout.T:
        return head
    tail_ranges = RowRanges(ranges.lo[L:], ranges.hi[L:], ranges.num_keys)
    tail = range_attention(q[:, L:], k, v, tail_ranges, scale, budget_bytes=budget_bytes)
    return torch.cat([head, tail], dim=1)
