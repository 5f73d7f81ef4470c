"""Sliding-window branch (spec I.7): query ``p`` attends to keys ``p - w < s <= p``.

"masked" path (`masked`): the shared chunked masked softmax (`nsa_impl.branches.range_attention`)
over banded chunks: a chunk of rows ``[r0, r1)`` reads only keys ``[r0 - w + 1, r1)``, so memory
is ``O(B * H * c * (c + w))`` however long ``T`` is. With ``cu_seqlens`` each row's range starts
no earlier than its own sequence. "flash" path (`flash`): FlashAttention-2 varlen with a left
window (`nsa_impl.kernels.flash.window_attention`). "triton" path (`triton`): the Triton
row-range kernels (`nsa_impl.kernels.triton_attn.window_attention`). All read the layout a plan
prepared.
"""

from __future__ import annotations

import torch

from nsa_ref.config import NSAConfig

from ..kernels import flash as flash_kernel
from ..kernels import triton_attn
from ..varlen import PackedLayout
from . import RowRanges, range_attention


def window_ranges(cfg: NSAConfig, layout: PackedLayout) -> RowRanges:
    """Row ``r`` sees ``[max(start of its sequence, r - w + 1), r + 1)``: ``min(w, p+1)`` keys."""
    rows = torch.arange(layout.T)
    lo = torch.maximum(layout.seq_start, rows - cfg.window + 1)
    return RowRanges(lo, rows + 1, layout.T)


def masked(q, k, v, plan, scale: float) -> torch.Tensor:
    """The "masked" path: ``o_win [B, T, H, Dv]`` over the plan's window `RangeLayout`."""
    return range_attention(q, k, v, plan.win_masked, scale)


def flash(q, k, v, plan, scale: float) -> torch.Tensor:
    """The "flash" path: FlashAttention-2 with the plan's varlen window layout."""
    return flash_kernel.window_attention(q, k, v, plan.win_flash, scale)


def triton(q, k, v, plan, scale: float) -> torch.Tensor:
    """The "triton" path: the Triton window kernels with the plan's sequence starts."""
    lay = plan.layout_of("win", "triton")
    return triton_attn.window_attention(q, k, v, plan.cfg.window, scale, layout=lay,
                                        tuning=plan.tuning("win"))  # fmt: skip
