"""Compression and selection scores, vectorised (spec I.3-I.5, Eqs. 7-11): the "masked" cmp path.

Data path, top to bottom:

1. `compress`: ``k, v [B, T, G, D]`` -> ``k_cmp, v_cmp [B, N, G, D]`` (Eq. 7). Mean pooling reads
   strided windows (``unfold``: no copy of the raw keys); a custom ``phi`` gets blocks shaped
   ``[B, G, N, l, D]`` (``[..., l, D]``, groups at dim -4, like `nsa_ref.rules.compress`).
2. `compressed_and_select`: one chunked pass over the query rows (the custom op
   ``nsa::cmp_select``). Each chunk computes the compressed attention (masked softmax, ``o_cmp``
   with autograd through ``nsa::range_attention_backward``) and hands its probabilities
   ``p_cmp`` to a hook that applies Eq. 9 as a banded overlap weight (`overlap_scores`), Eq. 10
   (sum over the heads of a group) and the top-n of Eq. 11 (`top_n`), writing
   ``block_indices`` for those rows.

Scores are computed in the dtype of the compressed softmax (`nsa_impl.numerics.compute_dtype`:
float64 for float32/float64 inputs, float32 for float16/bfloat16). Nothing ``[T, T]`` or
``[T, T/d]`` exists at once: a chunk of ``c`` rows keeps at most ``BYTES_PER_ELEM * B * H * c * N``
bytes of softmax tiles alive, with ``c`` chosen from ``B * H``, the compressed-key span ``N`` and
the byte budget (`nsa_impl.branches`), plus ``O(B * G * c * T / l')`` for the block scores and
their sort. The chunk table and the hook's per-chunk sizes come from `CmpMaskedLayout` (a
plan's): a call reads only host-side integers, so there is no device synchronisation on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nsa_ref.config import NSAConfig
from nsa_ref.validate import check_phi_output

from .branches import RangeLayout, chunk_forward, range_attention_backward
from .branches.compressed import CmpLayout, Scores
from .kernels.ops import autocast_off_backward, kernel_op
from .varlen import PackedLayout

__all__ = [
    "CmpMaskedLayout",
    "Scores",
    "compress",
    "compressed_and_select",
    "overlap_band",
    "overlap_scores",
    "top_n",
]


def compress(x: torch.Tensor, cfg: NSAConfig, cmp_layout: CmpLayout, phi=None, *, name="phi"):
    """Eq. 7: ``x [B, T, G, D]`` -> ``[B, N, G, D]``, block ``i`` = ``phi(x[s_i : s_i + l])``.

    ``phi`` (``None``: mean) is called once on all blocks, shaped ``[B, G, N, l, D]``, and must
    return ``[B, G, N, D]``. ``name`` labels ``phi`` in error messages.
    """
    B, _, G, D = x.shape
    l, N = cfg.cmp_block, cmp_layout.num_blocks
    if N == 0:
        return x.new_zeros(B, 0, G, D)
    if cmp_layout.single:  # blocks start at i*d: strided windows, no copy
        windows = x.unfold(1, l, cfg.cmp_stride)  # [B, N, G, D, l]
        if phi is None:
            return windows.mean(dim=-1)
        blocks = windows.permute(0, 2, 1, 4, 3)
    else:  # per-sequence starts: gather the l keys of each block
        idx = cmp_layout.device_starts[:, None] + torch.arange(l, device=x.device)
        gathered = x[:, idx]  # [B, N, l, G, D]
        if phi is None:
            return gathered.mean(dim=2)
        blocks = gathered.permute(0, 3, 1, 2, 4)
    return check_phi_output(name, phi(blocks), blocks).permute(0, 2, 1, 3)


def overlap_band(cfg: NSAConfig) -> list[int]:
    """Eq. 9 as a band: ``p_slc[j] = sum_t w[t] * p_cmp[j*r + t - (m-1)]``, ``t = 0..r+m-2``.

    With ``r = l'/d`` and ``m = l/d``, compressed block ``i`` covers stride units ``[i, i+m)``
    and selection block ``j`` covers ``[j*r, j*r + r)``; ``w[t]`` is their overlap in units,
    i.e. ``W[j, i] = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d`` (spec I.4). Paper: ``1, 2, 2, 2, 1``.
    """
    r, m = cfg.sel_block // cfg.cmp_stride, cfg.cmp_block // cfg.cmp_stride
    return [min(t + 1, r) - max(t - m + 1, 0) for t in range(r + m - 1)]


def overlap_scores(p_cmp: torch.Tensor, num_sel: int, cfg: NSAConfig) -> torch.Tensor:
    """Eq. 9 by shifted sums: ``p_cmp [..., N]`` -> ``p_slc [..., num_sel]`` (no dense ``W``).

    ``num_sel * l' / d >= N`` is required (true for ``num_sel = b(p_max) + 1``).
    """
    r, m = cfg.sel_block // cfg.cmp_stride, cfg.cmp_block // cfg.cmp_stride
    N = p_cmp.shape[-1]
    if num_sel * r < N:
        raise ValueError(f"num_sel={num_sel} selection blocks cannot hold {N} compressed blocks")
    padded = F.pad(p_cmp, (m - 1, num_sel * r - N))  # padded[x] = p_cmp[x - (m-1)]
    out = None
    for t, w in enumerate(overlap_band(cfg)):
        term = padded[..., t : t + num_sel * r : r]
        out = term * w if out is None else out.add_(term, alpha=w)
    return out


def top_n(scores: torch.Tensor, b: torch.Tensor, cfg: NSAConfig) -> torch.Tensor:
    """Eq. 11 (spec I.5): ``scores [..., c, S]`` with current blocks ``b [c]`` -> ``[..., c, n]``.

    Candidates are blocks ``0..b``; forced blocks (``j < sel_init_blocks`` or
    ``j > b - sel_local_blocks``) rank first, then higher score, then lower index (a stable
    descending sort). Returns int64 indices ascending, ``-1`` padded, ``min(n, b+1)`` valid.
    """
    S, n = scores.shape[-1], cfg.sel_top_n
    j = torch.arange(S, device=scores.device)
    cand = j <= b[:, None]  # [c, S]
    forced = cand & ((j < cfg.sel_init_blocks) | (j > b[:, None] - cfg.sel_local_blocks))
    key = scores.masked_fill(forced, float("inf")).masked_fill(~cand, float("-inf"))
    keep = min(n, S)
    ranked, order = torch.sort(key, dim=-1, descending=True, stable=True)
    order = order[..., :keep].masked_fill(ranked[..., :keep] == float("-inf"), S)
    order = order.sort(dim=-1).values  # ascending; S (not a candidate) sorts last
    order = order.masked_fill(order == S, -1)
    if keep < n:
        order = F.pad(order, (0, n - keep), value=-1)
    return order


# ---------------------------------------------------------------------------------------------
# The masked path's layout and op


@dataclass(frozen=True)
class CmpMaskedLayout:
    """What `compressed_and_select` needs, built once per plan by `build`.

    Attributes:
        ranges: the rows' visible compressed blocks as a `RangeLayout` (device ``lo``/``hi``,
            host chunk table).
        meta: host int64 ``[C, 2]``: per chunk, the widest local block count and the number of
            selection-block columns its rows need.
        block: int64 ``[T]`` on the device: ``b(p)``, each row's current selection block.
        single: the row is one sequence (the probabilities are already local).
    """

    ranges: RangeLayout
    meta: torch.Tensor
    block: torch.Tensor
    single: bool

    @classmethod
    def build(cls, cfg: NSAConfig, cmp_layout: CmpLayout, layout: PackedLayout, heads: int,
              device, budget_bytes: int | None = None,
              rows: torch.Tensor | None = None) -> CmpMaskedLayout:  # fmt: skip
        """Chunk ``cmp_layout``'s ranges for ``heads = B * H`` (host work); with ``rows`` (host
        int64, strictly increasing) only for those query rows of the layout, in that order."""
        rr, pos = cmp_layout.ranges, layout.pos
        if rows is not None:
            rr, pos = rr.subset(rows), pos[rows]
        ranges = RangeLayout.build(rr, heads, device, budget_bytes)
        count = rr.hi - rr.lo
        meta = [
            (int(count[r0:r1].max()), int(pos[r0:r1].max()) // cfg.sel_block + 1)
            for r0, r1, _, _ in ranges.chunks.tolist()
        ]
        meta = torch.tensor(meta, dtype=torch.int64).reshape(-1, 2)
        block = (pos // cfg.sel_block).to(device)
        return cls(ranges, meta, block, cmp_layout.single)


def _config(sizes: list[int]) -> NSAConfig:
    """The selection-related fields of an `NSAConfig` from an op's integer arguments."""
    l, d, ls, n, init, local = sizes
    return NSAConfig(cmp_block=l, cmp_stride=d, sel_block=ls, sel_top_n=n, sel_init_blocks=init,
                     sel_local_blocks=local, window=1)  # fmt: skip


class _SelectHook:
    """Turns each chunk's ``p_cmp`` into block indices (Eqs. 9-11), and aux tensors if asked."""

    def __init__(self, q, G, cfg, lo, hi, chunks, meta, block, single: bool, want_aux: bool):
        B, T, H, _ = q.shape
        self.cfg, self.single, self.lo, self.block = cfg, single, lo, block
        self.count = hi - lo
        self.sizes = {c[0]: tuple(m) for c, m in zip(chunks, meta, strict=True)}
        self.block_indices = torch.full(
            (B, T, G, cfg.sel_top_n), -1, dtype=torch.long, device=q.device
        )
        self.p_slc = self.p_cmp = None
        if want_aux:
            self.p_slc = q.new_zeros(B, T, G, cfg.num_sel_blocks(T))
            self.p_cmp = q.new_zeros(B, T, H, cfg.num_cmp(T - 1))

    def _local(self, p, r0, r1, s0, n_loc):
        """Shift each row's probabilities: column ``i`` = its sequence's compressed block ``i``."""
        if self.single:  # s0 == 0 and every row starts at block 0: already local
            return p[..., :n_loc]
        if n_loc == 0:
            return p[..., :0]
        i = torch.arange(n_loc, device=p.device)
        idx = ((self.lo[r0:r1, None] - s0) + i).clamp_(min=0, max=max(p.shape[-1] - 1, 0))
        out = p.gather(-1, idx.expand(*p.shape[:-1], n_loc))
        return out.masked_fill_(i >= self.count[r0:r1, None], 0.0)

    def __call__(self, r0: int, r1: int, s0: int, p: torch.Tensor) -> None:
        B, G, h, c, _ = p.shape
        n_loc, num_sel = self.sizes[r0]
        local = self._local(p, r0, r1, s0, n_loc)  # [B, G, h, c, n_loc], softmax dtype
        # Eq. 10 before Eq. 9: both are linear, and summing heads first does h times less work.
        scores = overlap_scores(local.sum(dim=2), num_sel, self.cfg)  # [B, G, c, num_sel]
        idx = top_n(scores, self.block[r0:r1], self.cfg)
        self.block_indices[:, r0:r1] = idx.permute(0, 2, 1, 3)
        if self.p_slc is not None:
            self.p_slc[:, r0:r1, :, :num_sel] = scores.permute(0, 2, 1, 3)
            self.p_cmp[:, r0:r1, :, :n_loc] = local.reshape(B, G * h, c, n_loc).permute(0, 2, 1, 3)


def _select_fake(q, k_cmp, v_cmp, lo, hi, chunks, meta, block, scale, sizes, single, want_aux):
    B, T, H, _ = q.shape
    G = k_cmp.shape[2]
    l, d, ls, n = sizes[:4]
    o = q.new_empty(B, T, H, v_cmp.shape[-1])
    idx = q.new_empty(B, T, G, n, dtype=torch.int64)
    if not want_aux:
        return o, idx, q.new_empty(0), q.new_empty(0)
    n_cmp = torch.sym_max(0, (T - l) // d + 1)
    return o, idx, q.new_empty(B, T, G, (T + ls - 1) // ls), q.new_empty(B, T, H, n_cmp)


@kernel_op("cmp_select", _select_fake)
def _cmp_select(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    chunks: torch.Tensor,
    meta: torch.Tensor,
    block: torch.Tensor,
    scale: float,
    sizes: list[int],
    single: bool,
    want_aux: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    chunk_list = chunks.tolist()
    hook = _SelectHook(q, k_cmp.shape[2], _config(sizes), lo, hi, chunk_list, meta.tolist(),
                       block, single, want_aux)  # fmt: skip
    o = chunk_forward(q, k_cmp, v_cmp, lo, hi, chunk_list, scale, on_probs=hook)
    if hook.p_slc is None:  # two distinct empty tensors: outputs must not alias each other
        return o, hook.block_indices, q.new_empty(0), q.new_empty(0)
    return o, hook.block_indices, hook.p_slc, hook.p_cmp


class _CmpSelect(torch.autograd.Function):
    """``o_cmp`` differentiable (range-attention backward); indices and scores are not."""

    @staticmethod
    def forward(q, k_cmp, v_cmp, lo, hi, chunks, meta, block, scale, sizes, single, want_aux):
        return _cmp_select(q, k_cmp, v_cmp, lo, hi, chunks, meta, block, scale, sizes, single,
                           want_aux)  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k_cmp, v_cmp, lo, hi, chunks, *_ = inputs
        o, idx, p_slc, p_cmp = output
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lo, hi, chunks)
        ctx.mark_non_differentiable(idx, p_slc, p_cmp)
        ctx.scale = inputs[8]

    @staticmethod
    @autocast_off_backward
    def backward(ctx, do, *_):
        with torch.no_grad():  # the backward op has no derivative of its own
            dq, dk, dv = range_attention_backward(do, *ctx.saved_tensors, ctx.scale)
        return dq, dk, dv, *([None] * 9)


def compressed_and_select(q, k_cmp, v_cmp, plan, scale: float, *, want_aux: bool = False) -> Scores:
    """The "masked" path of the compressed branch and the selection (Eqs. 8-11).

    ``q [B, T, H, Dk]``; ``k_cmp/v_cmp [B, N, G, D]`` from `compress`; ``plan`` a
    `nsa_impl.plan.Plan` (its ``cfg`` and ``cmp_masked`` layout). The selection is detached
    (top-n is discrete); gradients reach q and the compressed keys/values through ``o_cmp``.
    """
    cfg, lay = plan.cfg, plan.cmp_masked
    sizes = [cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, cfg.sel_top_n, cfg.sel_init_blocks,
             cfg.sel_local_blocks]  # fmt: skip
    o_cmp, idx, p_slc, p_cmp = _CmpSelect.apply(
        q, k_cmp, v_cmp, lay.ranges.lo, lay.ranges.hi, lay.ranges.chunks, lay.meta, lay.block,
        float(scale), sizes, lay.single, want_aux,
    )  # fmt: skip
    if not want_aux:
        return Scores(o_cmp, idx, None, None)
    return Scores(o_cmp, idx, p_slc, p_cmp)
