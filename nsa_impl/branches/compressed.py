"""Compression branch geometry and attention (spec I.3, Eqs. 7-8).

Compressed block ``i`` of a sequence covers its local keys ``[i*d, i*d + l)`` and is visible to
local position ``p`` iff ``i < num_cmp(p)``. With ``cu_seqlens`` the compressed blocks of all
sequences are concatenated sequence by sequence, so the blocks visible to a row are one contiguous
range ``[offset(seq), offset(seq) + num_cmp(p))``: a `RowRanges`, attended by the shared chunked
masked softmax (`nsa_impl.branches.range_attention`). No block crosses a sequence boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nsa_ref.config import NSAConfig

from ..varlen import PackedLayout
from . import ProbsHook, RowRanges, range_attention


def num_cmp(pos: torch.Tensor, cfg: NSAConfig) -> torch.Tensor:
    """Vectorised `NSAConfig.num_cmp`: compressed blocks visible to each local position."""
    l, d = cfg.cmp_block, cfg.cmp_stride
    return torch.where(pos + 1 < l, 0, torch.div(pos + 1 - l, d, rounding_mode="floor") + 1)


@dataclass(frozen=True)
class CmpLayout:
    """Where the compressed blocks of a (packed) row come from and who sees them.

    Attributes:
        starts: host int64 ``[N]``: first raw token (row coordinates) of each compressed block,
            sequence by sequence.
        ranges: per query row, its visible compressed blocks ``[lo, hi)`` (indices into
            ``starts``); ``lo`` is the row's sequence offset, ``hi - lo = num_cmp(p)``.
        single: True when the row is one sequence (blocks start at ``i*d``; ``lo == 0``).
    """

    starts: torch.Tensor
    ranges: RowRanges
    single: bool

    @classmethod
    def build(cls, cfg: NSAConfig, layout: PackedLayout) -> CmpLayout:
        """Compressed-block geometry of ``layout`` under ``cfg`` (host work, once per call)."""
        lens = torch.tensor(layout.lengths, dtype=torch.long)
        counts = num_cmp(lens - 1, cfg)  # blocks per sequence
        offsets = torch.cumsum(counts, 0) - counts
        seq_of_block = torch.repeat_interleave(torch.arange(len(counts)), counts)
        local = torch.arange(int(counts.sum())) - offsets[seq_of_block]
        seq_start = torch.tensor(layout.bounds[:-1], dtype=torch.long)
        starts = seq_start[seq_of_block] + local * cfg.cmp_stride
        lo = offsets[layout.seq_id]
        ranges = RowRanges(lo, lo + num_cmp(layout.pos, cfg), int(counts.sum()))
        return cls(starts, ranges, layout.num_seqs == 1)

    @property
    def num_blocks(self) -> int:
        """Compressed blocks in the row (all sequences)."""
        return self.starts.numel()


def compressed_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    cmp_layout: CmpLayout,
    scale: float,
    *,
    on_probs: ProbsHook | None = None,
    budget_bytes: int | None = None,
) -> torch.Tensor:
    """Eq. 8 output ``o_cmp [B, T, H, Dv]``: attention over the visible compressed blocks.

    ``k_cmp [B, N, G, Dk]``, ``v_cmp [B, N, G, Dv]`` come from `nsa_impl.scoring.compress`.
    Rows with no visible block are exactly 0. ``on_probs`` sees ``p_cmp`` chunk by chunk (the
    selection scores are built from it without a second pass).
    """
    return range_attention(
        q, k_cmp, v_cmp, cmp_layout.ranges, scale, on_probs=on_probs, budget_bytes=budget_bytes
    )
