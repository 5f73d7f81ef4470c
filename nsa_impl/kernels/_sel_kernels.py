"""Triton kernels of the selection branch (spec I.6): forward, dQ, dK/dV and the dK/dV reduction.

Loaded only through `nsa_impl.kernels.triton_sel._kernels`, which executes this file once per
execution mode (compiled for CUDA tensors, Triton's interpreter for CPU tensors) because
``triton.jit`` decides between the two when a function is decorated. The layout, the tiling and
why it was chosen are described in the docstring of `nsa_impl.kernels.triton_sel`.

Common notation inside the kernels:

* ``P`` query positions of one sequence share a program ("tile"); its ``P * h`` rows are the
  ``h`` query heads of group ``g`` at each of those positions, padded to ``BM`` rows.
* Positions, sequence starts and key rows are int64 so that ``row * stride`` never overflows.
* Masked scores are ``-inf`` (never a finite sentinel, spec A7); a row with no visible key ends
  with ``l == 0`` and writes an exact zero output and ``lse = -inf``.
* NaN containment: a tile's keys are shared by rows that may not all read them, so scores and
  probabilities are selected with ``tl.where`` (never multiplied by zero), and the operands
  that products contract over masked entries arrive cleaned (non-finite entries zeroed, by
  `nsa_impl.kernels.triton_sel.contained` before the launch): the hot loops carry no
  containment code. A row that reads a non-finite ``v`` gets NaN scores there (the forward's
  keys are poisoned where ``v`` is not finite), so its output and log-sum-exp are NaN; in the
  dK/dV kernel a row whose ``delta`` (rowsum ``dO * O``) is not finite makes its probabilities
  NaN, so the dK/dV of the keys it reads are NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # the backend-neutral shim (triton >= 3.1)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice

from ._loader import executing_mode, load_kernel_module

# Products, logits and the long-running dK/dV accumulators, shared with the row-range kernels
# (half-precision dots go through float32 in the interpreter, whose bf16 `tl.dot` is wrong).
_h = load_kernel_module("_tl_helpers.py", executing_mode())
_dot, _scores, _acc_zeros, _acc_dot = _h.dot, _h.logits, _h.acc_zeros, _h.acc_dot
_to = _h.round_to  # round-to-nearest casts in the interpreter too


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    """``exp``; libdevice's ``expf`` (about 1 ulp) when ``PRECISE``.

    ``tl.exp`` compiles to ``ex2.approx`` after a multiply by log2(e), whose rounding grows with
    ``|x|`` (about 6e-7 relative at ``|x| = 10``): too coarse for the fp32 class (1e-6 on
    outputs). The interpreter has no libdevice, but its ``tl.exp`` is numpy's, already exact.
    """
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _log(x, PRECISE: tl.constexpr):
    """``log``; libdevice's ``logf`` when ``PRECISE`` (see `_exp`)."""
    if PRECISE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _tile_rows(TSTART, TROWS, TSEQ, tile, g, h: tl.constexpr, P: tl.constexpr, BM: tl.constexpr):
    """Rows of a query tile: global position, local position, query head and validity."""
    t0 = tl.load(TSTART + tile)  # int64 global position of the tile's first query
    nrows = tl.load(TROWS + tile)  # valid positions in this tile (0 for an unused tile)
    s0 = tl.load(TSEQ + tile)  # int64 global start of the tile's sequence
    r = tl.arange(0, BM)
    pr = r // h
    valid = (pr < nrows) & (r < P * h)
    pos = t0 + pr
    head = g * h + r % h
    last_local = t0 - s0 + nrows - 1  # keys beyond the tile's last query are never visible
    return pos, pos - s0, head, valid, s0, last_local


@triton.jit
def _load_rows(PTR, pos, head, valid, stride_n, stride_h, D: tl.constexpr, BD: tl.constexpr):
    """``[rows, BD]`` tile of a ``[N, heads, D]`` tensor at (position, head) rows; 0 padding."""
    d = tl.arange(0, BD)
    return tl.load(
        PTR + pos[:, None] * stride_n + head[:, None] * stride_h + d[None, :],
        mask=valid[:, None] & (d[None, :] < D), other=0.0,
    )


@triton.jit
def _kv_chunk(K, V, KD, VD, s0, g, b, c, last_local, stride_kn, stride_kg, stride_vn, stride_vg,
              SEL: tl.constexpr, BN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
              BDK: tl.constexpr, BDV: tl.constexpr, TMA: tl.constexpr):
    """Keys ``c .. c+BN`` of local block ``b`` of group ``g``: ``(k, v, local key, in range)``.

    ``TMA``: ``KD``/``VD`` are tensor descriptors of ``[N, G*D]`` views with ``[BN, D]`` boxes
    (``D`` a power of two): one bulk copy per operand instead of ``BN*D`` masked addresses.
    Rows outside the range (after the tile's last query, another sequence, past the end: zeros)
    are loaded too; their scores are never selected (``kin`` is part of every row's mask), and
    the operands they could poison are clean (``v`` in the forward, ``k`` in the backward).
    """
    kl = b * SEL + c + tl.arange(0, BN)  # local key positions of this chunk
    kin = (c + tl.arange(0, BN) < SEL) & (kl <= last_local)
    if TMA:
        row = (s0 + b * SEL + c).to(tl.int32)
        k = KD.load([row, g * DK])
        v = VD.load([row, g * DV])
    else:
        krow = s0 + kl
        k = _load_rows(K, krow, g + 0 * kl, kin, stride_kn, stride_kg, DK, BDK)
        v = _load_rows(V, krow, g + 0 * kl, kin, stride_vn, stride_vg, DV, BDV)
    return k, v, kl, kin


@triton.jit
def _membership(IDX, pos, valid, g, b, stride_in, stride_ig, NSEL: tl.constexpr,
                NP: tl.constexpr, P: tl.constexpr, BM: tl.constexpr):
    """Per row: did that row's position select block ``b``? (duplicates are harmless here)."""
    if P == 1:
        # One position per tile: its deduplicated union *is* its own selection.
        return valid
    else:
        j = tl.arange(0, NP)
        rowidx = tl.load(
            IDX + pos[:, None] * stride_in + g * stride_ig + j[None, :],
            mask=valid[:, None] & (j[None, :] < NSEL), other=-1,
        )
        return tl.max(tl.where(rowidx == b, 1, 0), axis=1) > 0


@triton.jit
def _chunk_scores(q, K, V, KD, VD, IDX, uni, u, c, pos, ploc, valid, g, s0, last_local, scale,
                  stride_kn, stride_kg, stride_vn, stride_vg, stride_in, stride_ig,
                  h: tl.constexpr, P: tl.constexpr, BM: tl.constexpr, NSEL: tl.constexpr,
                  NP: tl.constexpr, SEL: tl.constexpr, BN: tl.constexpr, DK: tl.constexpr,
                  DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr,
                  TMA: tl.constexpr):
    """Chunk ``c`` of the tile's ``u``-th union block: ``(k, v, scores, visible)``.

    ``visible[row, key]``: the row's position selected the block and the key is ``<= p``.
    """
    b = tl.load(uni + u)
    member = _membership(IDX, pos, valid, g, b, stride_in, stride_ig, NSEL, NP, P, BM)
    k, v, kl, kin = _kv_chunk(K, V, KD, VD, s0, g, b, c, last_local, stride_kn, stride_kg,
                              stride_vn, stride_vg, SEL, BN, DK, DV, BDK, BDV, TMA)
    s = _scores(q, tl.trans(k), scale, IEEE)
    ok = member[:, None] & kin[None, :] & (kl[None, :] <= ploc[:, None])
    return k, v, s, ok


@triton.jit
def _sel_fwd_kernel(
    Q, K, V, KD, VD, O, LSE, IDX, UNI, CNT, TSTART, TROWS, TSEQ,
    stride_qn, stride_qh, stride_kn, stride_kg, stride_vn, stride_vg, stride_on, stride_oh,
    stride_in, stride_ig, stride_ut, stride_ug, stride_lsen,
    scale, G,
    h: tl.constexpr, P: tl.constexpr, BM: tl.constexpr, NSEL: tl.constexpr, NP: tl.constexpr,
    SEL: tl.constexpr, BN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr, PRECISE: tl.constexpr,
    TMA: tl.constexpr,
):
    """Forward: one program per (query tile, group); loop over the tile's union of blocks."""
    tile = tl.program_id(0)
    g = tl.program_id(1)
    pos, ploc, head, valid, s0, last_local = _tile_rows(TSTART, TROWS, TSEQ, tile, g, h, P, BM)
    dv = tl.arange(0, BDV)
    q = _load_rows(Q, pos, head, valid, stride_qn, stride_qh, DK, BDK)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    cnt = tl.load(CNT + tile * G + g)
    uni = UNI + tile * stride_ut + g * stride_ug
    for u in range(0, cnt):
        for c in tl.static_range(0, SEL, BN):
            k, v, s, ok = _chunk_scores(
                q, K, V, KD, VD, IDX, uni, u, c, pos, ploc, valid, g, s0, last_local, scale,
                stride_kn, stride_kg, stride_vn, stride_vg, stride_in, stride_ig,
                h, P, BM, NSEL, NP, SEL, BN, DK, DV, BDK, BDV, IEEE, TMA,
            )
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # Rows with nothing visible yet keep m = -inf; shift by 0 so exp gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.where(ok, _exp(s - m_safe[:, None], PRECISE), 0.0)
            alpha = _exp(m_i - m_safe, PRECISE)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(_to(p, v.dtype), v, IEEE)
            m_i = m_new
    # Empty rows (l == 0) give exact zeros; a NaN l (a row that read a NaN) must stay NaN.
    empty = l_i == 0.0
    o = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, float("-inf"), m_i + _log(tl.where(empty, 1.0, l_i), PRECISE))
    tl.store(
        O + pos[:, None] * stride_on + head[:, None] * stride_oh + dv[None, :],
        o.to(O.dtype.element_ty), mask=valid[:, None] & (dv[None, :] < DV),
    )
    tl.store(LSE + pos * stride_lsen + head, lse, mask=valid)


@triton.jit
def _sel_dq_kernel(
    Q, K, V, KD, VD, O, DO, DQ, LSE, DELTA, IDX, UNI, CNT, TSTART, TROWS, TSEQ,
    stride_qn, stride_qh, stride_kn, stride_kg, stride_vn, stride_vg, stride_on, stride_oh,
    stride_don, stride_doh, stride_dqn, stride_dqh, stride_in, stride_ig, stride_ut, stride_ug,
    stride_lsen,
    scale, G,
    h: tl.constexpr, P: tl.constexpr, BM: tl.constexpr, NSEL: tl.constexpr, NP: tl.constexpr,
    SEL: tl.constexpr, BN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr, PRECISE: tl.constexpr,
    TMA: tl.constexpr,
):
    """dQ: the forward's tiling, recomputing probabilities from the saved log-sum-exp.

    Also computes ``delta = rowsum(dO * O)`` for its rows and stores it in ``DELTA`` for the
    dK/dV kernel that runs next (saves a float32 copy of dO and O in torch).
    """
    tile = tl.program_id(0)
    g = tl.program_id(1)
    pos, ploc, head, valid, s0, last_local = _tile_rows(TSTART, TROWS, TSEQ, tile, g, h, P, BM)
    dk = tl.arange(0, BDK)
    q = _load_rows(Q, pos, head, valid, stride_qn, stride_qh, DK, BDK)
    do = _load_rows(DO, pos, head, valid, stride_don, stride_doh, DV, BDV)
    lse = tl.load(LSE + pos * stride_lsen + head, mask=valid, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # empty rows: every score is -inf -> p = 0
    o = _load_rows(O, pos, head, valid, stride_on, stride_oh, DV, BDV)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(DELTA + pos * stride_lsen + head, delta, mask=valid)
    dq = tl.zeros([BM, BDK], tl.float32)
    cnt = tl.load(CNT + tile * G + g)
    uni = UNI + tile * stride_ut + g * stride_ug
    for u in range(0, cnt):
        for c in tl.static_range(0, SEL, BN):
            k, v, s, ok = _chunk_scores(
                q, K, V, KD, VD, IDX, uni, u, c, pos, ploc, valid, g, s0, last_local, scale,
                stride_kn, stride_kg, stride_vn, stride_vg, stride_in, stride_ig,
                h, P, BM, NSEL, NP, SEL, BN, DK, DV, BDK, BDV, IEEE, TMA,
            )
            p = tl.where(ok, _exp(s - lse[:, None], PRECISE), 0.0)
            dp = _dot(do, tl.trans(v), IEEE)
            ds = tl.where(ok, p * (dp - delta[:, None]), 0.0)
            dq += _dot(_to(ds, k.dtype), k, IEEE)
    tl.store(
        DQ + pos[:, None] * stride_dqn + head[:, None] * stride_dqh + dk[None, :],
        (dq * scale).to(DQ.dtype.element_ty), mask=valid[:, None] & (dk[None, :] < DK),
    )


@triton.jit
def _sel_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, PART_K, PART_V,
    ENT_POS, ITEM_SEG, ITEM_START, ITEM_END, BLK_SEQ0, BLK_LOCAL, BLK_LEN,
    stride_qn, stride_qh, stride_kn, stride_kg, stride_vn, stride_vg, stride_don, stride_doh,
    stride_lsen, stride_pk, stride_pv,
    scale, NB,
    h: tl.constexpr, QB: tl.constexpr, BR: tl.constexpr,
    SEL: tl.constexpr, BKEY: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr, PRECISE: tl.constexpr,
):
    """dK/dV partials: one program per (work item, key chunk of the block).

    A work item is a run of at most CH consecutive entries of one inverse-index segment, i.e.
    positions that selected block ``gb`` for group ``g`` (segment ``g * NB + gb``). Its partial
    sums go to ``PART_K/PART_V[item]``; `_sel_reduce_kernel` adds the items of a segment in a
    fixed order, so the result is deterministic without atomics.
    """
    item = tl.program_id(0)
    kc = tl.program_id(1) * BKEY
    seg = tl.load(ITEM_SEG + item)
    e0 = tl.load(ITEM_START + item)
    e1 = tl.load(ITEM_END + item)  # e1 == e0 for an unused item: the loop below is empty
    segc = tl.maximum(seg, 0)
    g = segc // NB
    gb = segc % NB
    s0 = tl.load(BLK_SEQ0 + gb)
    b = tl.load(BLK_LOCAL + gb)
    L = tl.load(BLK_LEN + gb)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    kl = b * SEL + kc + tl.arange(0, BKEY)
    kin = (kc + tl.arange(0, BKEY) < SEL) & (kl < L)
    krow = s0 + kl
    k = _load_rows(K, krow, g + 0 * kl, kin, stride_kn, stride_kg, DK, BDK)
    v = _load_rows(V, krow, g + 0 * kl, kin, stride_vn, stride_vg, DV, BDV)
    acc_k = _acc_zeros(BKEY, BDK, IEEE)
    acc_v = _acc_zeros(BKEY, BDV, IEEE)
    r = tl.arange(0, BR)
    pr = r // h
    head = g * h + r % h
    for e in range(e0, e1, QB):
        ent = e + pr
        ok_row = (pr < QB) & (ent < e1)
        pos = tl.load(ENT_POS + ent, mask=ok_row, other=0)  # int64 global positions
        ploc = pos - s0
        q = _load_rows(Q, pos, head, ok_row, stride_qn, stride_qh, DK, BDK)
        do = _load_rows(DO, pos, head, ok_row, stride_don, stride_doh, DV, BDV)
        lse = tl.load(LSE + pos * stride_lsen + head, mask=ok_row, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        delta = tl.load(DELTA + pos * stride_lsen + head, mask=ok_row, other=0.0)
        st = _scores(k, tl.trans(q), scale, IEEE)  # [BKEY, BR]
        ok = kin[:, None] & ok_row[None, :] & (kl[:, None] <= ploc[None, :])
        # + (delta - delta): 0 for a finite delta, NaN for a row whose dO or O is not finite,
        # whose probabilities (and so the dK/dV of the keys it reads) become NaN.
        pt = tl.where(ok, _exp(st - lse[None, :] + (delta - delta)[None, :], PRECISE), 0.0)
        dpt = _dot(v, tl.trans(do), IEEE)
        dst = tl.where(ok, pt * (dpt - delta[None, :]), 0.0)
        acc_v += _acc_dot(_to(pt, do.dtype), do, IEEE)
        acc_k += _acc_dot(_to(dst, q.dtype), q, IEEE)
    key = kc + tl.arange(0, BKEY)
    # Scalar-by-tensor masks are broadcast explicitly (Triton's interpreter mis-types them).
    used = key[:, None] * 0 + seg >= 0
    tl.store(
        PART_K + item.to(tl.int64) * stride_pk + key[:, None] * BDK + dk[None, :],
        (acc_k * scale).to(PART_K.dtype.element_ty),
        mask=(key[:, None] < SEL) & (dk[None, :] < BDK) & used,
    )
    tl.store(
        PART_V + item.to(tl.int64) * stride_pv + key[:, None] * BDV + dv[None, :],
        acc_v.to(PART_V.dtype.element_ty), mask=(key[:, None] < SEL) & (dv[None, :] < BDV) & used,
    )


@triton.jit
def _sel_reduce_kernel(
    PART_K, PART_V, DKOUT, DVOUT, ITEM_OFF, BLK_SEQ0, BLK_LOCAL, BLK_LEN,
    stride_kn, stride_kg, stride_vn, stride_vg, stride_pk, stride_pv, NB,
    SEL: tl.constexpr, BKEY: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr,
):
    """dK/dV of one (block, group, key chunk): the sum of its items' partials, in item order."""
    seg = tl.program_id(0)
    kc = tl.program_id(1) * BKEY
    g = seg // NB
    gb = seg % NB
    i0 = tl.load(ITEM_OFF + seg)
    i1 = tl.load(ITEM_OFF + seg + 1)
    s0 = tl.load(BLK_SEQ0 + gb)
    b = tl.load(BLK_LOCAL + gb)
    L = tl.load(BLK_LEN + gb)
    key = kc + tl.arange(0, BKEY)
    kl = b * SEL + key
    kin = (key < SEL) & (kl < L)
    krow = s0 + kl
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    acc_k = _acc_zeros(BKEY, BDK, IEEE)
    acc_v = _acc_zeros(BKEY, BDV, IEEE)
    for i in range(i0, i1):  # i0, i1 are int64: i * stride cannot overflow
        acc_k += tl.load(
            PART_K + i * stride_pk + key[:, None] * BDK + dk[None, :],
            mask=(key[:, None] < SEL) & (dk[None, :] < BDK), other=0.0,
        )
        acc_v += tl.load(
            PART_V + i * stride_pv + key[:, None] * BDV + dv[None, :],
            mask=(key[:, None] < SEL) & (dv[None, :] < BDV), other=0.0,
        )
    some = key[:, None] * 0 + i1 > i0  # a block nobody selected keeps its zero gradient
    tl.store(
        DKOUT + krow[:, None] * stride_kn + g * stride_kg + dk[None, :],
        acc_k.to(DKOUT.dtype.element_ty), mask=kin[:, None] & (dk[None, :] < DK) & some,
    )
    tl.store(
        DVOUT + krow[:, None] * stride_vn + g * stride_vg + dv[None, :],
        acc_v.to(DVOUT.dtype.element_ty), mask=kin[:, None] & (dv[None, :] < DV) & some,
    )
