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
score, then lower index): a candidate replaces the current worst entry iff it ranks above it.
Bands come in ascending block order and each band's candidates in descending rank (argmax,
lowest index on ties), and every candidate that enters beat the band's initial worst, so the
number of merge rounds per band is bounded by that count (few after the first bands).

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
_logits, _exp_d, _load_tile = _h.logits, _h.exp_d, _h.load_tile

_BIG = tl.constexpr(1 << 30)  # an index that sorts after every real block


@triton.jit
def _num_cmp(p, CL: tl.constexpr, CD: tl.constexpr):
    """Compressed blocks visible to local position(s) ``p``."""
    return tl.where(p + 1 < CL, 0, (tl.maximum(p + 1 - CL, 0) // CD) + 1)


@triton.jit
def _worst(tv, ti):
    """Per position, the lowest-ranked entry of the running list: (score, index)."""
    wv = tl.min(tv, 1)
    wi = tl.max(tl.where(tv == wv[:, None], ti, -1), 1)
    return wv, wi


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
    NTOP: tl.constexpr, NP: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
    H_PER_G: tl.constexpr, HP: tl.constexpr, P: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr,
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
    # Running top-n per position: slots >= NTOP hold (+inf, -1) and are never evicted.
    slots = tl.arange(0, NP)
    real = slots[None, :] < NTOP
    tv = tl.where(real, float("-inf"), float("inf")) + tl.zeros([P, NP], tl.float32)
    ti = tl.where(real, _BIG, -1) + tl.zeros([P, NP], tl.int32)
    wv, wi = _worst(tv, ti)
    kcol = g.to(tl.int64) * skg
    # The band loop holds the merge loop, so Triton does not software-pipeline it: the next
    # band's keys are loaded one iteration ahead by hand (their L2 latency hides behind the MMA).
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
        # Eq. 11 keys: forced blocks +inf, non-candidates -inf, else the score.
        cand = valid_p[:, None] & (jj[None, :] < BS) & (j[None, :] <= bp[:, None])
        forced = cand & ((j[None, :] < INIT) | (j[None, :] > bp[:, None] - LOCAL))
        key = tl.where(cand, tl.where(forced, float("inf"), sc), float("-inf"))
        beats = (key > float("-inf")) & ((key > wv[:, None])
                                         | ((key == wv[:, None]) & (j[None, :] < wi[:, None])))
        rounds = tl.minimum(tl.max(tl.sum(beats.to(tl.int32), 1), 0), NTOP)
        for _ in range(0, rounds):
            best = tl.max(key, 1)
            at = tl.argmax(key, 1, tie_break_left=True).to(tl.int32)
            jb = js0 + at
            ok = (best > float("-inf")) & ((best > wv) | ((best == wv) & (jb < wi)))
            hit = (tv == wv[:, None]) & (ti == wi[:, None])
            ws = tl.argmax(hit.to(tl.int32), 1, tie_break_left=True)
            repl = ok[:, None] & (slots[None, :] == ws[:, None])
            tv = tl.where(repl, best[:, None], tv)
            ti = tl.where(repl, jb[:, None], ti)
            key = tl.where(jj[None, :] == at[:, None], float("-inf"), key)
            wv, wi = _worst(tv, ti)
    chosen = tl.where(real & (tv > float("-inf")), ti, _BIG)
    chosen = tl.sort(chosen, 1)
    chosen = tl.where(chosen == _BIG, -1, chosen).to(tl.int64)
    tl.store(IDX + ((qs + pos) * sin + g * sig)[:, None] + slots[None, :], chosen,
             mask=valid_p[:, None] & real)
