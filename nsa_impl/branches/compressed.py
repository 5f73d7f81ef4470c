"""Compression branch geometry (spec I.3, Eqs. 7-8), its result type, and its "flash" path.

Compressed block ``i`` of a sequence covers its local keys ``[i*d, i*d + l)`` and is visible to
local position ``p`` iff ``i < num_cmp(p)``. With ``cu_seqlens`` the compressed blocks of all
sequences are concatenated sequence by sequence, so the blocks visible to a row are one contiguous
range ``[offset(seq), offset(seq) + num_cmp(p))``: a `RowRanges`, attended by the shared chunked
masked softmax (the "masked" path, `nsa_impl.scoring.compressed_and_select`). No block crosses a
sequence boundary.

The "flash" path (`flash`) runs the branch on FlashAttention-2 over query groups with Triton
selection scores (`nsa_impl.kernels.flash_cmp`); the "triton" path (`triton`) in two launches
and no copies of ``q``: the row-range attention with its log-sum-exp
(`nsa_impl.kernels.triton_attn`) and the fused scores + top-n
(`nsa_impl.kernels.triton_topn`). Both read the layout a plan prepared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nsa_ref.config import NSAConfig

from ..kernels import flash_cmp, triton_attn, triton_topn
from ..varlen import PackedLayout
from . import RowRanges


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
        device_starts: ``starts`` on the inputs' device (the gather of Eq. 7 with
            ``cu_seqlens``).
    """

    starts: torch.Tensor
    ranges: RowRanges
    single: bool
    device_starts: torch.Tensor

    @classmethod
    def build(cls, cfg: NSAConfig, layout: PackedLayout, device="cpu") -> CmpLayout:
        """Compressed-block geometry of ``layout`` under ``cfg`` (host work, once per plan)."""
        lens = torch.tensor(layout.lengths, dtype=torch.long)
        counts = num_cmp(lens - 1, cfg)  # blocks per sequence
        offsets = torch.cumsum(counts, 0) - counts
        total = int(counts.sum())
        seq_of_block = torch.repeat_interleave(torch.arange(len(counts)), counts)
        local = torch.arange(total) - offsets[seq_of_block]
        seq_start = torch.tensor(layout.bounds[:-1], dtype=torch.long)
        starts = seq_start[seq_of_block] + local * cfg.cmp_stride
        lo = offsets[layout.seq_id]
        ranges = RowRanges(lo, lo + num_cmp(layout.pos, cfg), total)
        return cls(starts, ranges, layout.num_seqs == 1, starts.to(device))

    @property
    def num_blocks(self) -> int:
        """Compressed blocks in the row (all sequences)."""
        return self.starts.numel()


@dataclass
class Scores:
    """Result of the compressed branch with the selection (Eqs. 8-11), on any path.

    Attributes:
        o_cmp: ``[B, T, H, Dv]`` compressed-branch output (autograd).
        block_indices: ``[B, T, G, n]`` int64, ascending, ``-1`` padded (local block indices).
        p_slc: ``[B, T, G, ceil(T/l')]`` group scores (in ``q``'s dtype) or None.
        p_cmp: ``[B, T, H, num_cmp(T-1)]`` compressed probabilities (local index) or None.
        canonical: the producer guarantees `block_indices` in the fused top-n kernel's form
            (each row's blocks distinct and visible to the row, valid entries first, ``-1``
            after them), so the Triton selection may skip cleaning them
            (`nsa_impl.kernels.triton_sel.selection_attention`'s ``canonical``).
    """

    o_cmp: torch.Tensor
    block_indices: torch.Tensor
    p_slc: torch.Tensor | None
    p_cmp: torch.Tensor | None
    canonical: bool = False


def flash(q, k_cmp, v_cmp, plan, scale: float, *, want_aux: bool = False) -> Scores:
    """The "flash" path of the compressed branch (`nsa_impl.kernels.flash_cmp`)."""
    o_cmp, block_indices, p_slc, p_cmp = flash_cmp.compressed_and_select(
        q, k_cmp, v_cmp, plan.cfg, scale, plan.cmp_flash, want_aux=want_aux
    )
    return Scores(o_cmp, block_indices, p_slc, p_cmp)


def triton(q, k_cmp, v_cmp, plan, scale: float, *, want_aux: bool = False) -> Scores:
    """The "triton" path of the compressed branch and the selection (Eqs. 8-11).

    ``o_cmp`` (autograd) and the log-sum-exp from `triton_attn.cmp_attention`, then the block
    indices from `triton_topn.select_blocks` (scores written only for ``want_aux``; ``p_cmp``
    is then rebuilt from the log-sum-exp, aux only). The plan's `triton_attn.SeqStarts` holds
    the token and block boundaries: nothing here waits for the device.
    """
    cfg, lay = plan.cfg, plan.layout_of("cmp", "triton")
    B, T, H, Dk = q.shape
    G, Dv = k_cmp.shape[2], v_cmp.shape[-1]
    q3 = q.reshape(B * T, H, Dk)
    kc3 = k_cmp.reshape(-1, G, Dk)
    o, lse = triton_attn.cmp_attention(
        q3, kc3, v_cmp.reshape(-1, G, Dv), lay.qstart, lay.kstart, lay.max_len,
        cfg.cmp_block, cfg.cmp_stride, scale, tuning=plan.tuning("cmp"),
    )  # fmt: skip
    num_scores = cfg.num_sel_blocks(T) if want_aux else 0
    idx, sc = triton_topn.select_blocks(
        q3, kc3, lse, lay.qstart, lay.kstart, lay.max_len,
        cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride, sel_block=cfg.sel_block,
        top_n=cfg.sel_top_n, init_blocks=cfg.sel_init_blocks, local_blocks=cfg.sel_local_blocks,
        scale=scale, num_scores=num_scores, tuning=plan.tuning("topn"),
    )  # fmt: skip
    p_slc = p_cmp = None
    if want_aux:
        with torch.no_grad():
            p_slc = sc.reshape(B, T, G, num_scores).to(q.dtype)
            lse_bht = lse.reshape(B, T, H).transpose(1, 2)  # the flash path's aux helper's layout
            r = plan.cmp.ranges  # host tensors: copied for the aux outputs only
            lo, count = r.lo.to(q.device), (r.hi - r.lo).to(q.device)
            p_cmp = flash_cmp.aux_p_cmp(q, k_cmp, lse_bht, lo, count, cfg, scale)
    # The kernel's indices are canonical (`triton_topn` module docstring).
    return Scores(o.reshape(B, T, H, Dv), idx.reshape(B, T, G, cfg.sel_top_n), p_slc, p_cmp,
                  canonical=True)
