"""Triton kernel of the fused selection scores and top-n (spec I.4-I.5, Eqs. 9-11).

Loaded only through `nsa_impl.kernels.triton_topn._kernels` (compiled or interpreted, see
`nsa_impl.kernels._loader`); the design is in the docstring of `nsa_impl.kernels.triton_topn`.

One program owns ``P`` consecutive positions of one sequence and one KV group ``g``; its
``P * HP`` rows are (position, head) pairs, position-major (heads padded to ``HP``). The query
tile stays in registers while the program walks the selection blocks in bands of ``BS``; band
``js0`` needs the compressed blocks ``[js0*R - (M-1), js0*R - (M-1) + BN)`` (``R = l'/d``,
``M = l/d``; the ``M - 1`` blocks before the band are its halo). Per band: logits of all rows
against those blocks (one MMA), probabilities against the compressed attention's log-sum-exp,
the sum over the group's heads (Eq. 10), the overlap weights of Eq. 9 as a ``[BN, BSP]`` matrix
(one IEEE float32 dot), then a merge into each position's running top-n.

The running top-n is exact under spec I.5's total order (forced blocks first, then higher
score, then lower index). Each candidate's rank is one int64 (`_rank`: the float's bits in an
order-preserving integer form, then the complemented block index), so the order is integer
order. The list is ``BSP`` ranks sorted descending; a band's ``BSP`` ranks are sorted
ascending, and the element-wise maximum of the two sequences holds the ``BSP`` best of their
union (the first step of a bitonic merge), which one more sort orders again. Two fixed-size
sorts per band, no data-dependent loop: the earlier merge, one argmax round per entering
candidate with the count maxed over the tile's positions, took more time than the logits
(docs/gpu_notes.md). ``BSP >= n``, so the first ``n`` entries are the top-n.

float32 inputs (``IEEE``) form the logits in float64. A resident float64 query tile of
``P * HP = 256`` rows by 128 dims, staged through shared memory for the dot, needs 256 KB on its
own (sm_90 has 227 KB per block). So with ``KC > 0`` the query tile is not kept: each band's
logits are summed over ``KC``-column slices of ``q`` and of the band's keys, both reloaded per
band (L1/L2 hits; only the float32 parity path pays it). The sum over slices is a float64 sum of
exact float64 products, as in one dot.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._loader import executing_mode, load_kernel_module

_h = load_kernel_module("_tl_helpers.py", executing_mode())
_logits, _exp_d, _load_tile, _sort_rows = _h.logits, _h.exp_d, _h.load_tile, _h.sort_rows

_BIG = tl.constexpr(1 << 30)  # an index that sorts after every real block
_LOW = tl.constexpr(0x7FFFFFFF)  # complement base of the index half of a rank


@triton.jit
def _num_cmp(p, CL: tl.constexpr, CD: tl.constexpr):
    """Compressed blocks visible to local position(s) ``p``."""
    return tl.where(p + 1 < CL, 0, (tl.maximum(p + 1 - CL, 0) // CD) + 1)


@triton.jit
def _mono(key):
    """int32 that orders as float32 ``key`` (no NaN): non-negative float bits order as integers;
    flipping the other 31 bits of a negative float reverses its order. ``-0.0`` counts as ``0``."""
    bits = (key + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ _LOW)


@triton.jit
def _rank(key, j):
    """int64 ranks of ``key`` at block indices ``j`` (same shape): a higher key ranks higher,
    then a lower index (spec I.5's order as integer order)."""
    return (_mono(key).to(tl.int64) << 32) | (-j + _LOW).to(tl.int64)


@triton.jit
def _sliced_logits(Q, q_off, q_ok, K, k_off, k_ok, qk_scale, BM: tl.constexpr, BN: tl.constexpr,
                   DK: tl.constexpr, KC: tl.constexpr):
    """``qk_scale * q @ k^T`` as float32 ``[BM, BN]`` from float64 dots over ``KC``-column
    slices of the query rows ``q_off`` and key rows ``k_off`` (module docstring)."""
    acc = tl.zeros([BM, BN], tl.float64)
    for c0 in tl.static_range(0, DK, KC):
        qc = _load_tile(Q + c0, q_off, q_ok, DK - c0, KC, True)
        kc = _load_tile(K + c0, k_off, k_ok, DK - c0, KC, True)
        acc += tl.dot(qc.to(tl.float64), tl.trans(kc).to(tl.float64))
    return (acc * qk_scale).to(tl.float32)


@triton.jit
def _select_kernel(
    Q, K, LSE, IDX, SC, QSTART, KSTART,
    sqn, sqh, skn, skg, sln, sin, sig, ssn, ssg,
    qk_scale, DOM, SMAX,
    CL: tl.constexpr, CD: tl.constexpr, SELB: tl.constexpr, R: tl.constexpr, M: tl.constexpr,
    NTOP: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
    H_PER_G: tl.constexpr, HP: tl.constexpr, P: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr, LOG_BSP: tl.constexpr,
    DK: tl.constexpr, BDK: tl.constexpr,
    KC: tl.constexpr, IEEE: tl.constexpr, PRECISE: tl.constexpr, WRITE_SCORES: tl.constexpr,
):
    """Block indices (and optionally the scores) of ``P`` positions of one sequence and group.
    ``KC > 0``: float64 logits over ``KC``-column slices, nothing resident (module docstring)."""
    t = tl.program_id(0)
    s = tl.program_id(1)
    g = tl.program_id(2)
    qs = tl.load(QSTART + s)
    L = tl.load(QSTART + s + 1) - qs
    ks = tl.load(KSTART + s)
    # Rows: (position, head) pairs.
    r = tl.arange(0, BM)
    pr = t * P + r // HP
    hh = r % HP
    valid_r = (hh < H_PER_G) & (pr < L)
    head = g * H_PER_G + hh
    q_off = (qs + pr) * sqn + head * sqh
    if KC == 0:
        q = _load_tile(Q, q_off, valid_r, DK, BDK, True)
    lse = tl.load(LSE + (qs + pr) * sln + head, mask=valid_r, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * DOM  # such rows see no block: p = 0
    cnt_r = _num_cmp(pr, CL, CD)
    # Positions: current block b(p) and the tile's extent.
    pos = t * P + tl.arange(0, P)
    valid_p = pos < L
    bp = pos // SELB
    last = tl.minimum(t * P + P, L) - 1
    cnt_max = _num_cmp(last, CL, CD)
    b_end = tl.where(t * P < L, last // SELB + 1, 0).to(tl.int32)  # int32 loop: int32 indices
    # Eq. 9 weights of column i (block js0*R - (M-1) + i) for band block jj: overlap / d.
    i = tl.arange(0, BN)
    jj = tl.arange(0, BSP)
    lo = tl.maximum(i[:, None] - (M - 1), jj[None, :] * R)
    hi = tl.minimum(i[:, None] + 1, jj[None, :] * R + R)
    w = tl.where(jj[None, :] < BS, tl.maximum(hi - lo, 0), 0).to(tl.float32)
    # Running top-n per position: BSP ranks, sorted descending; empty slots rank lowest.
    slots = tl.arange(0, BSP)
    none = tl.full([P, BSP], float("-inf"), tl.float32)
    top = _rank(none, tl.zeros([P, BSP], tl.int32) + _BIG)
    kcol = g.to(tl.int64) * skg
    # The next band's keys are loaded one iteration ahead by hand (their L2 latency hides behind
    # the MMA; Triton did not pipeline this loop when its merge was a data-dependent loop).
    c_first = i - (M - 1)
    if KC == 0:
        k_next = _load_tile(K, (ks + c_first) * skn + kcol, (c_first >= 0) & (c_first < cnt_max),
                            DK, BDK, True)
    for js0 in range(0, b_end, BS):
        ci = js0 * R - (M - 1) + i
        if KC == 0:
            k = k_next
            cn = ci + BS * R
            k_next = _load_tile(K, (ks + cn) * skn + kcol, (cn >= 0) & (cn < cnt_max), DK, BDK,
                                True)
            logit = _logits(q, tl.trans(k), qk_scale, IEEE)
        else:
            # The query slices depend on the band (a mask always true inside the loop): loaded
            # loop-invariantly they would be hoisted out of it and all stay resident again.
            logit = _sliced_logits(Q, q_off, valid_r & (js0 < b_end), K, (ks + ci) * skn + kcol,
                               (ci >= 0) & (ci < cnt_max), qk_scale, BM, BN, DK, KC)
        prob = _exp_d(logit - lse[:, None], IEEE, PRECISE)
        vis = valid_r[:, None] & (ci[None, :] >= 0) & (ci[None, :] < cnt_r[:, None])
        prob = tl.where(vis, prob, 0.0)
        pc = tl.sum(tl.reshape(prob, [P, HP, BN]), 1)  # Eq. 10: sum over the group's heads
        sc = tl.dot(pc, w, input_precision="ieee")  # Eq. 9: [P, BSP]
        j = js0 + jj
        if WRITE_SCORES:
            tl.store(SC + ((qs + pos) * ssn + g * ssg)[:, None] + j[None, :], sc,
                     mask=valid_p[:, None] & (jj[None, :] < BS) & (j[None, :] < SMAX))
        # Eq. 11 keys: forced blocks +inf, non-candidates -inf, else the score (a NaN score,
        # which only a row that read a NaN has, counts as -inf: ranks must be ordered).
        cand = valid_p[:, None] & (jj[None, :] < BS) & (j[None, :] <= bp[:, None])
        forced = cand & ((j[None, :] < INIT) | (j[None, :] > bp[:, None] - LOCAL))
        key = tl.where(forced, float("inf"), tl.where(cand & (sc == sc), sc, float("-inf")))
        band = _sort_rows(_rank(key, j[None, :] + 0 * pos[:, None]), BSP, LOG_BSP, False, False)
        top = _sort_rows(tl.maximum(top, band), BSP, LOG_BSP, True, True)
    real = slots[None, :] < NTOP
    picked = real & ((top >> 32).to(tl.int32) > _mono(none))  # a candidate filled the slot
    block = (-(top & _LOW) + _LOW).to(tl.int32)
    chosen = tl.where(picked, block, _BIG)
    chosen = _sort_rows(chosen, BSP, LOG_BSP, False, False)
    chosen = tl.where(chosen == _BIG, -1, chosen).to(tl.int64)
    tl.store(IDX + ((qs + pos) * sin + g * sig)[:, None] + slots[None, :], chosen,
             mask=valid_p[:, None] & real)
