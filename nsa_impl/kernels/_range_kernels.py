"""Triton kernels of row-range attention: the compressed branch (Eq. 8) and the sliding window.

Loaded only through `nsa_impl.kernels.triton_attn._kernels` (compiled for CUDA tensors, Triton's
interpreter for CPU tensors; see `nsa_impl.kernels._loader`). The design is described in the
docstring of `nsa_impl.kernels.triton_attn`; the notation used here:

* A sequence ``s`` has query tokens ``[QSTART[s], QSTART[s+1])`` and key tokens starting at
  ``KSTART[s]`` (compressed blocks for the compressed branch, raw tokens for the window). Local
  query position ``p`` sees the local keys ``[lo(p), hi(p))`` (`_key_range`): ``MODE == 0``
  (compressed): ``[0, num_cmp(p))``; ``MODE == 1`` (window): ``[max(0, p - WIN + 1), p + 1)``.
  Both bounds grow with ``p``, which is what makes chunks of whole tiles masked or mask-free.
* A query tile is ``P`` consecutive positions ``t*P - A .. t*P - A + P - 1`` of one sequence and
  one KV group ``g``; its ``BM = P * HP`` rows are (position, head) pairs, position-major, with
  the ``h`` heads of ``g`` padded to ``HP`` (a power of two). ``A`` shifts the tiles so that,
  for the compressed branch, a tile never straddles two query groups when ``P`` divides ``d``
  (then every row of a tile sees the same keys).
* Logits are ``qk_scale * q.k`` with ``qk_scale = scale * DOM`` (``DOM = log2(e)`` in half
  precision: base-2 softmax; ``1`` for float32); ``lse`` is stored as a natural log and read back
  as ``lse * DOM``. Masked logits are ``-inf``; probabilities of masked keys are *selected* to 0.
* Every key loop runs in three parts: chunks where some row needs a mask, chunks every row sees
  whole (no mask), and the masked tail.
* NaN containment (`nsa_impl.kernels.triton_sel`'s rule): in a masked chunk a key may be outside
  some rows' ranges, so probabilities and ``dS`` are selected with ``tl.where``; the operands
  the products contract over masked entries arrive cleaned (``v`` forward, ``k``, ``q`` and the
  dK/dV kernel's ``dO`` backward), the forward sets to NaN the rows that read a non-finite
  ``v``: it reads, at its store, two entries of the launcher's int32 prefix counts of such keys
  (``BADC [G, NK+1]``, `nsa_impl.kernels.triton_attn.marked_counts`) per row, and
  the dK/dV probabilities carry ``delta - delta`` (NaN for a row whose ``dO`` or ``O`` is not
  finite). The loops carry no containment code. Rows that see no key give exact zeros; a row
  whose sum is NaN (it read a NaN) stays NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._loader import executing_mode, load_kernel_module

_h = load_kernel_module("_tl_helpers.py", executing_mode())
_dot, _logits, _exp_d, _log_d = _h.dot, _h.logits, _h.exp_d, _h.log_d
_acc_zeros, _acc_dot, _load_tile = _h.acc_zeros, _h.acc_dot, _h.load_tile
_to = _h.round_to  # round-to-nearest casts in the interpreter too


@triton.jit
def _key_range(p, MODE: tl.constexpr, CL: tl.constexpr, CD: tl.constexpr, WIN: tl.constexpr):
    """Local keys ``[lo, hi)`` visible to local query position(s) ``p`` (may be negative)."""
    if MODE == 0:
        # num_cmp(p): blocks 0..(p+1-l)//d; the division only sees non-negative values.
        hi = tl.where(p + 1 < CL, 0, (tl.maximum(p + 1 - CL, 0) // CD) + 1)
        lo = hi * 0
    else:
        hi = tl.maximum(p + 1, 0)
        lo = tl.maximum(p - WIN + 1, 0)
    return lo, hi


@triton.jit
def _seq(QSTART, KSTART, s):
    """Query start (int64), query length, key start (int64) and key count of sequence ``s``."""
    qs = tl.load(QSTART + s)
    L = tl.load(QSTART + s + 1) - qs
    ks = tl.load(KSTART + s)
    NK = tl.load(KSTART + s + 1) - ks
    return qs, L, ks, NK


@triton.jit
def _tile(t, g, L, H_PER_G: tl.constexpr, HP: tl.constexpr, P: tl.constexpr, A: tl.constexpr,
          BM: tl.constexpr):
    """Rows of query tile ``t``: local position, head, validity, first/last valid position."""
    r = tl.arange(0, BM)
    p0 = t * P - A
    p = p0 + r // HP
    hh = r % HP
    valid = (hh < H_PER_G) & (p >= 0) & (p < L)
    head = g * H_PER_G + hh
    pa = tl.maximum(p0, 0)
    pb = tl.minimum(p0 + P, L) - 1  # < pa: the tile holds no position of this sequence
    return p, head, valid, pa, pb


@triton.jit
def _chunk_bounds(pa, pb, BN: tl.constexpr, MODE: tl.constexpr, CL: tl.constexpr,
                  CD: tl.constexpr, WIN: tl.constexpr):
    """Key-chunk loop bounds of a tile: masked ``[a, b)``, mask-free ``[b, c)``, masked ``[c, e)``.

    A chunk ``[j, j+BN)`` is mask-free when every row sees all of it: ``j >= lo(pb)`` and
    ``j + BN <= hi(pa)``. An empty tile gets an empty loop.
    """
    lo_min, hi_min = _key_range(pa, MODE, CL, CD, WIN)
    lo_max, hi_max = _key_range(pb, MODE, CL, CD, WIN)
    some = pb >= pa
    a = tl.where(some, (lo_min // BN) * BN, 0)
    b = tl.where(some, tl.maximum(a, ((lo_max + BN - 1) // BN) * BN), 0)
    c = tl.where(some, tl.maximum(b, (hi_min // BN) * BN), 0)
    e = tl.where(some, hi_max, 0)
    return a, tl.minimum(b, e), b, c, e


@triton.jit
def _fwd_step(q, K, V, ks, kcol, vcol, j, e, lo, hi, m_i, l_i, acc, skn, svn, qk_scale,
              BN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr,
              BDV: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
              PRECISE: tl.constexpr):
    """One key chunk ``[j, j+BN)`` of the online softmax (``lo, hi``: the rows' key ranges)."""
    kj = j + tl.arange(0, BN)
    kin = kj < e
    k = _load_tile(K, (ks + kj) * skn + kcol, kin, DK, BDK, MASKED)
    v = _load_tile(V, (ks + kj) * svn + vcol, kin, DV, BDV, MASKED)
    s = _logits(q, tl.trans(k), qk_scale, IEEE)
    if MASKED:
        ok = (kj[None, :] >= lo[:, None]) & (kj[None, :] < hi[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing visible yet keep m = -inf; shift them by 0 so exp gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
    p = _exp_d(s - m_safe[:, None], IEEE, PRECISE)
    alpha = _exp_d(m_i - m_safe, IEEE, PRECISE)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(_to(p, v.dtype), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _range_fwd_kernel(
    Q, K, V, O, LSE, QSTART, KSTART, BADC,
    sqn, sqh, skn, skg, svn, svg, son, soh, sln, sbg,
    qk_scale, LN_DOM,
    MODE: tl.constexpr, CL: tl.constexpr, CD: tl.constexpr, WIN: tl.constexpr,
    H_PER_G: tl.constexpr, HP: tl.constexpr, P: tl.constexpr, A: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr, PRECISE: tl.constexpr,
):
    """Forward: ``o`` and the natural-log ``lse`` of one (query tile, sequence, group)."""
    t = tl.program_id(0)
    s = tl.program_id(1)
    g = tl.program_id(2)
    qs, L, ks, NK = _seq(QSTART, KSTART, s)
    p, head, valid, pa, pb = _tile(t, g, L, H_PER_G, HP, P, A, BM)
    row = qs + p
    q = _load_tile(Q, row * sqn + head * sqh, valid, DK, BDK, True)
    lo, hi = _key_range(p, MODE, CL, CD, WIN)
    a, ab, b, c, e = _chunk_bounds(pa, pb, BN, MODE, CL, CD, WIN)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    kcol = g.to(tl.int64) * skg
    vcol = g.to(tl.int64) * svg
    for j in range(a, ab, BN):
        m_i, l_i, acc = _fwd_step(q, K, V, ks, kcol, vcol, j, e, lo, hi, m_i, l_i, acc, skn,
                                  svn, qk_scale, BN, DK, DV, BDK, BDV, True, IEEE, PRECISE)
    for j in range(b, c, BN):
        m_i, l_i, acc = _fwd_step(q, K, V, ks, kcol, vcol, j, e, lo, hi, m_i, l_i, acc, skn,
                                  svn, qk_scale, BN, DK, DV, BDK, BDV, False, IEEE, PRECISE)
    for j in range(c, e, BN):
        m_i, l_i, acc = _fwd_step(q, K, V, ks, kcol, vcol, j, e, lo, hi, m_i, l_i, acc, skn,
                                  svn, qk_scale, BN, DK, DV, BDK, BDV, True, IEEE, PRECISE)
    # Empty rows (l == 0) give exact zeros; a NaN l (the row read a NaN) must stay NaN.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    # Rows whose range holds a key with a non-finite v (which the loop read cleaned) are NaN;
    # the lse stays that of the keys. Counts of such keys before each key, per group.
    badc = BADC + g.to(tl.int64) * sbg + ks
    hi_c = tl.minimum(hi, NK)
    lo_c = tl.minimum(lo, hi_c)
    nbad = tl.load(badc + hi_c, mask=valid, other=0) - tl.load(badc + lo_c, mask=valid, other=0)
    o = tl.where((nbad > 0)[:, None], float("nan"), o)
    lse = tl.where(empty, float("-inf"), (m_i + _log_d(l_safe, IEEE, PRECISE)) * LN_DOM)
    dv = tl.arange(0, BDV)
    tl.store(O + (row * son + head * soh)[:, None] + dv[None, :], o.to(O.dtype.element_ty),
             mask=valid[:, None] & (dv[None, :] < DV))
    tl.store(LSE + row * sln + head, lse, mask=valid)


@triton.jit
def _dq_step(q, do, lse, delta, dq, K, V, ks, kcol, vcol, j, e, lo, hi, skn, svn, qk_scale,
             BN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr,
             BDV: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
             PRECISE: tl.constexpr):
    """dQ contribution of key chunk ``[j, j+BN)``; probabilities recomputed from ``lse``."""
    kj = j + tl.arange(0, BN)
    kin = kj < e
    k = _load_tile(K, (ks + kj) * skn + kcol, kin, DK, BDK, MASKED)
    v = _load_tile(V, (ks + kj) * svn + vcol, kin, DV, BDV, MASKED)
    p = _exp_d(_logits(q, tl.trans(k), qk_scale, IEEE) - lse[:, None], IEEE, PRECISE)
    dp = _dot(do, tl.trans(v), IEEE)
    if MASKED:  # selected (k arrives cleaned: a masked key adds nothing, module docstring)
        ok = (kj[None, :] >= lo[:, None]) & (kj[None, :] < hi[:, None])
        ds = tl.where(ok, p * (dp - delta[:, None]), 0.0)
    else:
        ds = p * (dp - delta[:, None])
    return dq + _dot(_to(ds, k.dtype), k, IEEE)


@triton.jit
def _range_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, QSTART, KSTART,
    sqn, sqh, skn, skg, svn, svg, son, soh, sdon, sdoh, sdqn, sdqh, sln,
    qk_scale, DOM, scale,
    MODE: tl.constexpr, CL: tl.constexpr, CD: tl.constexpr, WIN: tl.constexpr,
    H_PER_G: tl.constexpr, HP: tl.constexpr, P: tl.constexpr, A: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr, PRECISE: tl.constexpr,
    DELTA_ONLY: tl.constexpr,
):
    """dQ over the forward's tiling; also stores ``delta = rowsum(dO * O)`` for the dK/dV kernel.

    ``DELTA_ONLY``: only ``delta`` (the dK/dV kernel then adds dQ itself, with atomics).
    """
    t = tl.program_id(0)
    s = tl.program_id(1)
    g = tl.program_id(2)
    qs, L, ks, NK = _seq(QSTART, KSTART, s)
    p, head, valid, pa, pb = _tile(t, g, L, H_PER_G, HP, P, A, BM)
    row = qs + p
    q = _load_tile(Q, row * sqn + head * sqh, valid, DK, BDK, True)
    do = _load_tile(DO, row * sdon + head * sdoh, valid, DV, BDV, True)
    o = _load_tile(O, row * son + head * soh, valid, DV, BDV, True)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + row * sln + head, delta, mask=valid)
    if not DELTA_ONLY:
        lse = tl.load(LSE + row * sln + head, mask=valid, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse) * DOM  # no key: p = 0 anyway
        lo, hi = _key_range(p, MODE, CL, CD, WIN)
        a, ab, b, c, e = _chunk_bounds(pa, pb, BN, MODE, CL, CD, WIN)
        dq = tl.zeros([BM, BDK], tl.float32)
        kcol = g.to(tl.int64) * skg
        vcol = g.to(tl.int64) * svg
        for j in range(a, ab, BN):
            dq = _dq_step(q, do, lse, delta, dq, K, V, ks, kcol, vcol, j, e, lo, hi, skn, svn,
                          qk_scale, BN, DK, DV, BDK, BDV, True, IEEE, PRECISE)
        for j in range(b, c, BN):
            dq = _dq_step(q, do, lse, delta, dq, K, V, ks, kcol, vcol, j, e, lo, hi, skn, svn,
                          qk_scale, BN, DK, DV, BDK, BDV, False, IEEE, PRECISE)
        for j in range(c, e, BN):
            dq = _dq_step(q, do, lse, delta, dq, K, V, ks, kcol, vcol, j, e, lo, hi, skn, svn,
                          qk_scale, BN, DK, DV, BDK, BDV, True, IEEE, PRECISE)
        dk = tl.arange(0, BDK)
        tl.store(DQ + (row * sdqn + head * sdqh)[:, None] + dk[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=valid[:, None] & (dk[None, :] < DK))


@triton.jit
def _query_bounds(j0, L, NK, it, MODE: tl.constexpr, CL: tl.constexpr, CD: tl.constexpr,
                  WIN: tl.constexpr, BKN: tl.constexpr, QP: tl.constexpr, QCH: tl.constexpr):
    """Query positions of work item ``it`` of key chunk ``[j0, j0+BKN)``, as step-loop bounds.

    The positions that see some key of the chunk are ``[q_lo, q_hi)``. Compressed branch: item
    ``it`` takes the positions of ``[it*QCH, (it+1)*QCH)`` among them: *absolute* windows, so
    the programs of all key chunks with the same item (launched next to each other) read the
    same query rows and share them through L2. Window: the ``it``-th run of ``QCH`` from
    ``q_lo`` (one item in practice). Returns ``(ia, b, c, ie)``: steps of ``QP`` positions from
    ``ia``, masked in ``[ia, b)`` and ``[c, ie)``, mask-free in ``[b, c)`` where every position
    sees every key of the chunk (never for a partial chunk).
    """
    if MODE == 0:
        q_lo = CL - 1 + j0 * CD
        q_hi = L
        full_lo = CL - 1 + (j0 + BKN - 1) * CD
        full_hi = L
    else:
        q_lo = j0
        q_hi = tl.minimum(L, j0 + BKN - 1 + WIN)
        full_lo = j0 + BKN - 1
        full_hi = j0 + WIN
    if MODE == 0:
        ia = tl.maximum(q_lo, it * QCH)
        ie = tl.maximum(tl.minimum(q_hi, (it + 1) * QCH), ia)
    else:
        ia = q_lo + it * QCH
        ie = tl.maximum(tl.minimum(q_hi, ia + QCH), ia)
    full_lo = tl.where(j0 + BKN <= NK, full_lo, ie)  # a partial chunk is always masked
    b = ia + ((tl.maximum(full_lo - ia, 0) + QP - 1) // QP) * QP
    b = tl.minimum(b, ie)
    # Whole steps only: a mask-free step must end inside the item (and the sequence).
    c = ia + (tl.maximum(tl.minimum(full_hi, ie) - ia, 0) // QP) * QP
    c = tl.maximum(b, c)
    return ia, b, c, ie


@triton.jit
def _kv_step(k, v, kj, kin, acc_k, acc_v, Q, DO, LSE, DELTA, DQ_ACC, qs, g, pos0, ie, L,
             sqn, sqh, sdon, sdoh, sln, sdqn, sdqh, qk_scale, DOM, scale,
             MODE: tl.constexpr, CL: tl.constexpr, CD: tl.constexpr, WIN: tl.constexpr,
             H_PER_G: tl.constexpr, HP: tl.constexpr, BR: tl.constexpr, DK: tl.constexpr,
             DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, MASKED: tl.constexpr,
             IEEE: tl.constexpr, PRECISE: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """dK/dV contribution of the ``BR`` (position, head) rows starting at position ``pos0``.

    ``k``, ``q`` and ``dO`` arrive cleaned; ``delta - delta`` in the exponent makes the
    probabilities of a row whose ``dO`` or ``O`` is not finite NaN (module docstring).
    ``ATOMIC_DQ``: also adds these rows' dQ contribution ``scale * dS^T K`` to the float32
    ``DQ_ACC`` with atomics (one kernel for the whole backward: 5 matrix products instead of
    7, at the price of a run-to-run varying float32 summation order in dQ).
    """
    r = tl.arange(0, BR)
    pq = pos0 + r // HP
    hh = r % HP
    head = g * H_PER_G + hh
    if MASKED:
        ok_r = (hh < H_PER_G) & (pq < ie)
    else:
        ok_r = hh < H_PER_G  # the caller's bounds keep these steps inside [ia, min(ie, L))
    row = qs + pq
    q = _load_tile(Q, row * sqn + head * sqh, ok_r, DK, BDK, True)
    do = _load_tile(DO, row * sdon + head * sdoh, ok_r, DV, BDV, True)
    lse = tl.load(LSE + row * sln + head, mask=ok_r, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * DOM
    delta = tl.load(DELTA + row * sln + head, mask=ok_r, other=0.0)
    flag = (delta - delta)[None, :]  # 0, or NaN for a row whose dO or O is not finite
    pt = _exp_d(_logits(k, tl.trans(q), qk_scale, IEEE) - lse[None, :] + flag, IEEE, PRECISE)
    dpt = _dot(v, tl.trans(do), IEEE)
    if MASKED:  # selected: a masked (key, row) pair adds nothing
        lo, hi = _key_range(pq, MODE, CL, CD, WIN)
        ok = (kin[:, None] & ok_r[None, :] & (kj[:, None] >= lo[None, :])
              & (kj[:, None] < hi[None, :]))
        pt = tl.where(ok, pt, 0.0)
        dst = tl.where(ok, pt * (dpt - delta[None, :]), 0.0)
    else:
        dst = pt * (dpt - delta[None, :])
    # Rows outside the item (zero q, dO, lse, delta) add exactly 0 to both sums.
    acc_v += _acc_dot(_to(pt, do.dtype), do, IEEE)
    acc_k += _acc_dot(_to(dst, q.dtype), q, IEEE)
    if ATOMIC_DQ:
        dq = _dot(tl.trans(_to(dst, k.dtype)), k, IEEE) * scale  # [BR, BDK]
        dk_ = tl.arange(0, BDK)
        tl.atomic_add(DQ_ACC + (row * sdqn + head * sdqh)[:, None] + dk_[None, :], dq,
                      mask=ok_r[:, None] & (dk_[None, :] < DK) & (pq < L)[:, None], sem="relaxed")
    return acc_k, acc_v


@triton.jit
def _range_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK_OUT, DV_OUT, PART_K, PART_V, DQ_ACC, QSTART, KSTART,
    sqn, sqh, skn, skg, svn, svg, sdon, sdoh, sln, sdkn, sdkg, sdvn, sdvg, sdqn, sdqh,
    qk_scale, DOM, scale, NKC, G,
    MODE: tl.constexpr, CL: tl.constexpr, CD: tl.constexpr, WIN: tl.constexpr,
    H_PER_G: tl.constexpr, HP: tl.constexpr, BKN: tl.constexpr, QP: tl.constexpr,
    BR: tl.constexpr, QCH: tl.constexpr, NIT: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr,
    PRECISE: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """dK/dV of one key chunk (and one work item of its queries when ``NIT > 1``).

    ``NIT == 1``: the chunk's gradients are complete and stored in ``DK_OUT``/``DV_OUT``.
    Otherwise each item stores float32 (float64 for float32 inputs) partial sums in
    ``PART_K/PART_V[((s*G + g)*NKC + kc)*NIT + it]`` and `_range_reduce_kernel` adds them in item
    order: deterministic, no atomics. Programs are numbered item-major (``it * NKC + kc``):
    neighbours in launch order walk the same query rows (`_query_bounds`).
    """
    it = tl.program_id(0) // NKC
    kc = tl.program_id(0) % NKC
    s = tl.program_id(1)
    g = tl.program_id(2)
    qs, L, ks, NK = _seq(QSTART, KSTART, s)
    j0 = kc * BKN
    kj = j0 + tl.arange(0, BKN)
    kin = kj < NK
    k = _load_tile(K, (ks + kj) * skn + g.to(tl.int64) * skg, kin, DK, BDK, True)
    v = _load_tile(V, (ks + kj) * svn + g.to(tl.int64) * svg, kin, DV, BDV, True)
    ia, b, c, ie = _query_bounds(j0, L, NK, it, MODE, CL, CD, WIN, BKN, QP, QCH)
    acc_k = _acc_zeros(BKN, BDK, IEEE)
    acc_v = _acc_zeros(BKN, BDV, IEEE)
    for pos in range(ia, b, QP):
        acc_k, acc_v = _kv_step(k, v, kj, kin, acc_k, acc_v, Q, DO, LSE, DELTA, DQ_ACC, qs, g,
                                pos, ie, L, sqn, sqh, sdon, sdoh, sln, sdqn, sdqh, qk_scale, DOM,
                                scale, MODE, CL, CD, WIN, H_PER_G, HP, BR, DK, DV, BDK, BDV,
                                True, IEEE, PRECISE, ATOMIC_DQ)
    for pos in range(b, c, QP):
        acc_k, acc_v = _kv_step(k, v, kj, kin, acc_k, acc_v, Q, DO, LSE, DELTA, DQ_ACC, qs, g,
                                pos, ie, L, sqn, sqh, sdon, sdoh, sln, sdqn, sdqh, qk_scale, DOM,
                                scale, MODE, CL, CD, WIN, H_PER_G, HP, BR, DK, DV, BDK, BDV,
                                False, IEEE, PRECISE, ATOMIC_DQ)
    for pos in range(c, ie, QP):
        acc_k, acc_v = _kv_step(k, v, kj, kin, acc_k, acc_v, Q, DO, LSE, DELTA, DQ_ACC, qs, g,
                                pos, ie, L, sqn, sqh, sdon, sdoh, sln, sdqn, sdqh, qk_scale, DOM,
                                scale, MODE, CL, CD, WIN, H_PER_G, HP, BR, DK, DV, BDK, BDV,
                                True, IEEE, PRECISE, ATOMIC_DQ)
    acc_k = acc_k * scale
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    if NIT == 1:
        krow = (ks + kj).to(tl.int64)
        tl.store(DK_OUT + (krow * sdkn + g.to(tl.int64) * sdkg)[:, None] + dk[None, :],
                 acc_k.to(DK_OUT.dtype.element_ty), mask=kin[:, None] & (dk[None, :] < DK))
        tl.store(DV_OUT + (krow * sdvn + g.to(tl.int64) * sdvg)[:, None] + dv[None, :],
                 acc_v.to(DV_OUT.dtype.element_ty), mask=kin[:, None] & (dv[None, :] < DV))
    else:
        slot = ((s.to(tl.int64) * G + g) * NKC + kc) * NIT + it
        key = tl.arange(0, BKN)
        tl.store(PART_K + slot * (BKN * BDK) + key[:, None] * BDK + dk[None, :],
                 acc_k.to(PART_K.dtype.element_ty))
        tl.store(PART_V + slot * (BKN * BDV) + key[:, None] * BDV + dv[None, :],
                 acc_v.to(PART_V.dtype.element_ty))


@triton.jit
def _range_reduce_kernel(
    PART_K, PART_V, DK_OUT, DV_OUT, KSTART, sdkn, sdkg, sdvn, sdvg, NKC, G,
    BKN: tl.constexpr, NIT: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr,
):
    """dK/dV of one key chunk: the sum of its items' partials in item order."""
    kc = tl.program_id(0)
    s = tl.program_id(1)
    g = tl.program_id(2)
    ks = tl.load(KSTART + s)
    NK = tl.load(KSTART + s + 1) - ks
    key = tl.arange(0, BKN)
    kj = kc * BKN + key
    kin = kj < NK
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    acc_k = _acc_zeros(BKN, BDK, IEEE)
    acc_v = _acc_zeros(BKN, BDV, IEEE)
    base = ((s.to(tl.int64) * G + g) * NKC + kc) * NIT
    for it in range(NIT):
        acc_k += tl.load(PART_K + (base + it) * (BKN * BDK) + key[:, None] * BDK + dk[None, :])
        acc_v += tl.load(PART_V + (base + it) * (BKN * BDV) + key[:, None] * BDV + dv[None, :])
    krow = (ks + kj).to(tl.int64)
    tl.store(DK_OUT + (krow * sdkn + g.to(tl.int64) * sdkg)[:, None] + dk[None, :],
             acc_k.to(DK_OUT.dtype.element_ty), mask=kin[:, None] & (dk[None, :] < DK))
    tl.store(DV_OUT + (krow * sdvn + g.to(tl.int64) * sdvg)[:, None] + dv[None, :],
             acc_v.to(DV_OUT.dtype.element_ty), mask=kin[:, None] & (dv[None, :] < DV))
