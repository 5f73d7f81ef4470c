"""Fused selection scores + top-n (spec I.4-I.5, Eqs. 9-11) in one Triton kernel.

``select_blocks(q, k_cmp, lse, ...) -> (block_indices, scores)`` returns, for every token and KV
group, the ``n`` selected blocks (int64, ascending, ``-1`` padded, the rule of
`nsa_impl.scoring.top_n`: forced blocks ``j < sel_init_blocks`` and
``b(p) - sel_local_blocks < j <= b(p)`` first, then higher score, ties to the lower index), and
the block scores ``p_slc`` only when asked for (``num_scores > 0``, for ``return_aux``).

Design (why it looks like this)
-------------------------------
The scores never exist in memory. A program keeps the queries of ``P`` positions x the ``h``
heads of one group resident (``P * h`` rows, ``P >= 16``) and walks the selection blocks of
those positions in ascending bands: per band one MMA recomputes the logits against the band's
compressed keys (plus the ``l/d - 1`` blocks of halo that Eq. 9 reaches back to), exponentiates
them against the compressed attention's log-sum-exp (`nsa_impl.kernels.triton_attn`, so
``p_cmp`` is exact and never stored), sums over the heads (Eq. 10), applies the overlap band of
Eq. 9 as a small IEEE float32 matrix product over the positions, and merges the band into each
position's running top-n (`_topn_kernels` docstring: exact under the spec's order).

Against the v3 path (scores kernel that reloads ``q`` for every band + a ``[T, G, T/l']`` float32
score tensor + a separate top-n kernel): ``q`` is read once, the score tensor (1 GiB written and
read at T=64k, G=4) and the second kernel disappear, and the top-n costs a few small reductions
per band instead of ``n`` passes over ``T/l'`` columns per row. Writing the scores once in
float32 and keeping the v3 top-n kernel was the alternative; the merge is cheaper than that
round trip (docs/gpu_notes.md, v4).

The launch is the custom op ``nsa::triton_select_blocks`` (`nsa_impl.kernels.ops.kernel_op`,
with ``register_fake``); it has no derivative (the selection is discrete), so callers pass
detached tensors. NaN containment: probabilities of blocks a row does not see are selected to
0 before the head sum and the Eq. 9 product, so a non-finite compressed key changes only the
scores (and selections) of the rows that see it.
"""

from __future__ import annotations

import math

import torch

from . import tuning as _tuning
from ._loader import load_kernel_module
from .ops import kernel_op

_LOG2E = 1.0 / math.log(2.0)


def _kernels(interpret: bool):
    """`_topn_kernels` executed in the given mode (cached)."""
    return load_kernel_module("_topn_kernels.py", interpret)


def band(cmp_block: int, cmp_stride: int, sel_block: int, block_n: int,
         top_n: int) -> tuple[int, int, int]:
    """``(BN, BS, BSP)``: compressed columns per band, selection blocks per band, and the
    padded band width, which is also the length of the running top-n list (``>= n``).

    ``BN`` is at least one selection block plus its halo; ``BS = (BN - (M - 1)) // R``.
    """
    R, M = sel_block // cmp_stride, cmp_block // cmp_stride
    bn = max(int(block_n), 16, _tuning.next_pow2(R + M - 1))
    bs = (bn - (M - 1)) // R
    return bn, bs, max(16, _tuning.next_pow2(bs), _tuning.next_pow2(top_n))


def _select_fake(q, k_cmp, lse, qstart, kstart, sizes, scale, launch):
    max_len, l, d, ls, n, init, local, num_scores = sizes
    return (q.new_empty(q.shape[0], k_cmp.shape[1], n, dtype=torch.int64),
            q.new_empty(q.shape[0], k_cmp.shape[1], num_scores, dtype=torch.float32))  # fmt: skip


@kernel_op("triton_select_blocks", _select_fake)
def select_op(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    qstart: torch.Tensor,
    kstart: torch.Tensor,
    sizes: list[int],
    scale: float,
    launch: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx [NQ, G, n] int64, scores [NQ, G, num_scores] float32)`` (`select_blocks`).

    ``sizes = [max_len, l, d, l', n, init_blocks, local_blocks, num_scores]``; ``launch`` is a
    `nsa_impl.kernels.tuning.TopNTuning` as a list. Inputs contiguous in their last dim.
    """
    max_len, cmp_block, cmp_stride, sel_block, top_n, init_blocks, local_blocks, num_scores = sizes
    dev = q.device
    NQ, H, DK = q.shape
    G = k_cmp.shape[1]
    idx = torch.empty(NQ, G, top_n, device=dev, dtype=torch.int64)
    scores = torch.zeros(NQ, G, num_scores, device=dev, dtype=torch.float32)
    if top_n == 0 or NQ == 0:
        idx.fill_(-1)
        return idx, scores
    interpret = dev.type == "cpu"
    ieee = q.dtype == torch.float32
    tile = _tuning.resolve_topn(_tuning.TopNTuning(*launch), ieee, DK)
    dom = 1.0 if ieee else _LOG2E
    h = H // G
    HP = _tuning.next_pow2(h)
    P = tile.P
    bn, bs, bsp = band(cmp_block, cmp_stride, sel_block, tile.BN, top_n)
    grid = (-(-int(max_len) // P), qstart.numel() - 1, G)
    _kernels(interpret)._select_kernel[grid](
        q, k_cmp, lse, idx, scores, qstart, kstart,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), lse.stride(0),
        idx.stride(0), idx.stride(1), scores.stride(0), scores.stride(1),
        scale * dom, dom, num_scores,
        CL=cmp_block, CD=cmp_stride, SELB=sel_block, R=sel_block // cmp_stride,
        M=cmp_block // cmp_stride, NTOP=top_n,
        INIT=init_blocks, LOCAL=local_blocks, H_PER_G=h, HP=HP, P=P, BM=P * HP, BN=bn, BS=bs,
        BSP=bsp, LOG_BSP=bsp.bit_length() - 1, DK=DK, BDK=max(16, _tuning.next_pow2(DK)),
        KC=tile.KC, IEEE=ieee,
        PRECISE=ieee and not interpret, WRITE_SCORES=num_scores > 0,
        **({} if interpret else dict(num_warps=tile.warps, num_stages=tile.stages)),
    )  # fmt: skip
    return idx, scores


def select_blocks(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    qstart: torch.Tensor,
    kstart: torch.Tensor,
    max_len: int,
    *,
    cmp_block: int,
    cmp_stride: int,
    sel_block: int,
    top_n: int,
    init_blocks: int,
    local_blocks: int,
    scale: float | None = None,
    num_scores: int = 0,
    tuning: _tuning.TopNTuning | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eqs. 9-11 fused: block indices ``[NQ, G, n]`` int64 and, if asked, scores.

    Args:
        q: ``[NQ, H, Dk]`` query tokens of all sequences back to back.
        k_cmp: ``[NK, G, Dk]`` compressed keys, sequence by sequence (`kstart`).
        lse: ``[NQ, H]`` float32 natural-log log-sum-exp of the compressed attention
            (`nsa_impl.kernels.triton_attn.cmp_attention`); ``-inf`` where a row sees no block.
        qstart, kstart: int ``[S+1]`` boundaries of the sequences in ``q`` and ``k_cmp``.
        max_len: the longest sequence (host int).
        cmp_block, cmp_stride, sel_block, top_n, init_blocks, local_blocks: ``l, d, l', n`` and
            the forced-block counts of `nsa_ref.config.NSAConfig`.
        scale: softmax scale of the compressed attention (default ``1/sqrt(Dk)``).
        num_scores: when positive, also return the scores ``[NQ, G, num_scores]`` float32
            (zeros beyond each position's current block), the spec's ``p_slc``.
        tuning: launch shape (default: the device profile's ``topn``); float32 inputs adapt it
            (`nsa_impl.kernels.tuning.resolve_topn`).

    Not differentiable (the selection is discrete): ``q``, ``k_cmp`` are read detached.
    """
    if q.dim() != 3 or k_cmp.dim() != 3 or k_cmp.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} / k_cmp {tuple(k_cmp.shape)}: expected [N, heads, Dk]"
        )
    if lse.shape != q.shape[:2] or lse.dtype != torch.float32:
        raise ValueError(
            f"lse must be float32 {tuple(q.shape[:2])}, got {lse.dtype} {tuple(lse.shape)}"
        )
    G = k_cmp.shape[1]
    if G == 0 or q.shape[1] % G:
        raise ValueError(f"H={q.shape[1]} must be a multiple of G={G}")
    if cmp_block % cmp_stride or sel_block % cmp_stride:
        raise ValueError(f"cmp_stride={cmp_stride} must divide cmp_block={cmp_block} and "
                         f"sel_block={sel_block}")
    if top_n < 0 or init_blocks < 0 or local_blocks < 0:
        raise ValueError("top_n, init_blocks and local_blocks must be >= 0")
    q, k_cmp, lse = (t.detach() if t.stride(-1) == 1 else t.detach().contiguous()
                     for t in (q, k_cmp, lse))  # fmt: skip
    dev = q.device
    qstart = qstart.to(device=dev, dtype=torch.int64)
    kstart = kstart.to(device=dev, dtype=torch.int64)
    tn = _tuning.profile_for(dev).topn if tuning is None else tuning
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    sizes = [int(max_len), int(cmp_block), int(cmp_stride), int(sel_block), int(top_n),
             int(init_blocks), int(local_blocks), max(0, int(num_scores))]  # fmt: skip
    with torch.no_grad():
        idx, scores = select_op(q, k_cmp, lse, qstart, kstart, sizes, scale, tn.as_list())
    return idx, (scores if num_scores > 0 else None)
