"""Triton kernel of the selection scores (spec I.4, Eqs. 9-10), without ``p_cmp`` in memory.

Loaded only through `nsa_impl.kernels.flash_cmp._kernels` (compiled for CUDA tensors, Triton's
interpreter for CPU tensors), for the reason given in `nsa_impl.kernels.triton_sel`.

One program owns a tile of ``BM`` query rows of one sequence, one KV group ``g`` and a tile of
``BS`` selection blocks ``[js0, js0 + BS)``. Those blocks overlap the compressed blocks
``[js0*R - (M-1), (js0+BS)*R)`` (``R = l'/d``, ``M = l/d``; the ``M-1`` blocks before are the
halo), which fit in ``BN`` columns. For each of the ``h`` heads of ``g`` it recomputes the logits
over those columns, turns them into probabilities with the row's log-sum-exp from the compressed
attention, masks the blocks the row does not see, and sums over the heads (Eq. 10). Eq. 9 is a
``[BN, BSP]`` overlap-weight matrix built from aranges and applied by one float32 IEEE dot. Every
output element is written by exactly one program: no atomics, deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _slc_scores_kernel(
    Q,
    K,
    LSE,
    OUT,
    TSTART,
    TROWS,
    TCMP,
    COUNT,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kg,
    stride_lb,
    stride_lh,
    stride_lt,
    stride_ob,
    stride_og,
    stride_ot,
    row0,
    S,
    G,
    scale,
    H_PER_G: tl.constexpr,
    DK: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
    R: tl.constexpr,
    M: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // G
    g = bg % G
    js0 = tl.program_id(2) * BS

    t0 = tl.load(TSTART + tile)  # int64 first row of the tile (row coordinates)
    nrows = tl.load(TROWS + tile)
    cmp0 = tl.load(TCMP + tile)  # int64 index of the sequence's compressed block 0
    r = tl.arange(0, BM)
    valid = r < nrows
    rows = t0 + r.to(tl.int64)
    count = tl.load(COUNT + rows, mask=valid, other=0)  # visible compressed blocks per row
    max_count = tl.load(COUNT + t0 + tl.maximum(nrows - 1, 0))  # counts grow along a sequence

    c0 = js0 * R - (M - 1)  # first (local) compressed block of the band
    ci = c0 + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], tl.float32)
    if max_count > c0:  # a band no row sees scores exactly 0: skip its logits
        d = tl.arange(0, BD)
        kmask = (ci >= 0) & (ci < max_count)
        kptr = K + b.to(tl.int64) * stride_kb + (cmp0 + ci)[:, None] * stride_kn
        k = tl.load(
            kptr + g.to(tl.int64) * stride_kg + d[None, :],
            mask=kmask[:, None] & (d[None, :] < DK),
            other=0.0,
        )
        kt = tl.trans(k)
        vis = valid[:, None] & (ci[None, :] >= 0) & (ci[None, :] < count[:, None])
        for hh in range(H_PER_G):
            head = (g * H_PER_G + hh).to(tl.int64)
            q = tl.load(
                Q
                + b.to(tl.int64) * stride_qb
                + rows[:, None] * stride_qt
                + head * stride_qh
                + d[None, :],
                mask=valid[:, None] & (d[None, :] < DK),
                other=0.0,
            )
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee") * scale
            else:
                s = tl.dot(q, kt) * scale
            lse = tl.load(
                LSE + b.to(tl.int64) * stride_lb + head * stride_lh + rows * stride_lt,
                mask=valid,
                other=0.0,
            )
            p = tl.exp(s - lse[:, None])
            acc += tl.where(vis, p, 0.0)

    # Eq. 9: W[i, j] = |[i, i+M) ∩ [j*R, j*R+R)| in stride units (the spec's overlap / d).
    j = js0 + tl.arange(0, BSP)
    lo = tl.maximum(ci[:, None], j[None, :] * R)
    hi = tl.minimum(ci[:, None] + M, j[None, :] * R + R)
    w = tl.maximum(hi - lo, 0).to(tl.float32)
    out = tl.dot(acc, w, input_precision="ieee")
    optr = OUT + b.to(tl.int64) * stride_ob + g.to(tl.int64) * stride_og
    optr += (rows - row0)[:, None] * stride_ot + j[None, :]
    jmask = (j < S) & (tl.arange(0, BSP) < BS)
    tl.store(optr, out, mask=valid[:, None] & jmask[None, :])


@triton.jit
def _top_n_kernel(
    SC,
    CUR,
    OUT,
    stride_sb,
    stride_sg,
    stride_sr,
    stride_ob,
    stride_or,
    stride_og,
    rows,
    S,
    G,
    N_TOP: tl.constexpr,
    NP: tl.constexpr,
    INIT: tl.constexpr,
    LOCAL: tl.constexpr,
    BR: tl.constexpr,
    SP: tl.constexpr,
):
    """Eq. 11 for ``BR`` rows of one (batch, group): ``n`` rounds of an argmax.

    Keys: forced blocks ``+inf``, non-candidates ``-inf``, the rest their score. Each round takes
    the largest key, lowest index first on ties (``tie_break_left``), which is spec I.5's order;
    the chosen blocks are then sorted ascending and padded with ``-1``.
    """
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    bg = tl.program_id(1)
    b = bg // G
    g = bg % G
    rmask = r < rows
    cur = tl.load(CUR + r, mask=rmask, other=-1)  # b(p); -1 leaves a padding row empty
    j = tl.arange(0, SP)
    base = SC + b.to(tl.int64) * stride_sb + g.to(tl.int64) * stride_sg
    s = tl.load(
        base + r.to(tl.int64)[:, None] * stride_sr + j[None, :],
        mask=rmask[:, None] & (j[None, :] < S),
        other=0.0,
    )
    cand = j[None, :] <= cur[:, None]
    forced = cand & ((j[None, :] < INIT) | (j[None, :] > cur[:, None] - LOCAL))
    key = tl.where(forced, float("inf"), s)
    key = tl.where(cand, key, float("-inf"))
    slot = tl.arange(0, NP)
    big = SP + 1  # sorts after every block index
    chosen = tl.full([BR, NP], big, tl.int32)
    for i in tl.static_range(N_TOP):
        best = tl.max(key, axis=1)
        at = tl.argmax(key, axis=1, tie_break_left=True).to(tl.int32)
        take = best > float("-inf")
        chosen = tl.where((slot[None, :] == i) & take[:, None], at[:, None], chosen)
        key = tl.where(j[None, :] == at[:, None], float("-inf"), key)
    chosen = tl.sort(chosen, dim=1)
    chosen = tl.where(chosen == big, -1, chosen).to(tl.int64)
    optr = OUT + b.to(tl.int64) * stride_ob + g.to(tl.int64) * stride_og
    optr += r.to(tl.int64)[:, None] * stride_or + slot[None, :]
    tl.store(optr, chosen, mask=rmask[:, None] & (slot[None, :] < N_TOP))
