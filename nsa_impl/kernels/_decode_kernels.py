"""Triton kernels of the fused NSA decode step (spec I.3-I.9): four launches per step.

K1 `_cmp_win_kernel` (compressed + window attention, append, emission), K2 `_score_kernel`
(block scores and a top-n per chunk of selection blocks), K3 `_sel_kernel` (the global top-n
from K2's lists, selection attention), K4 `_combine_kernel` (merge, gate, lengths).

Loaded only through `nsa_impl.kernels.decode_step`, which executes this file once per execution
mode (compiled for CUDA tensors, Triton's interpreter for CPU tensors; see `_loader`). The
design and the reasons for it are in the docstring of `nsa_impl.kernels.decode_step`.

Common notation:

* A *row* ``r`` is one query position: sequence ``b = SEQ[r]`` at position ``p = POS[r]``. A
  program owns the ``HPG`` query heads of one KV group ``g`` (padded to ``BH`` MMA rows).
* Caches are ``[B, G, capacity, D]`` with contiguous rows; ``kr_base`` etc. are the int64
  offsets of ``(b, g)``. Positions and offsets are int64 (``B*G*T*D`` passes 2^31 at 64k).
* Partial results of a split (flash-decoding) are ``(m, l, acc)``: running max, sum of
  ``exp(s - m)`` and the unnormalised output; slot ``[0, NC)`` compressed, ``[NC, NC+NW)``
  window, ``[NC+NW, NC+NW+NS)`` selection. An empty split leaves ``(-inf, 0, 0)``.
* Masked logits are ``-inf`` and masked keys are never loaded (``other=0``), so a stale or
  non-finite value outside a row's key set cannot reach its output.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ._loader import executing_mode, load_kernel_module

try:  # the backend-neutral shim (triton >= 3.1)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice


#: Executed by Triton's interpreter (`_loader` sets ``TRITON_INTERPRET`` while this file runs).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


def _direct(jitted):
    """A jitted device helper; under the interpreter, its rewritten Python function.

    The interpreter re-patches ``triton.language`` at every call of a jitted helper (about
    0.3 ms each, a third of a CPU test's time); the kernel that calls the helper has patched it
    already, so the interpreted helper is called directly. Compiled kernels are unaffected.
    """
    rewrite = getattr(jitted, "rewrite", None)
    if type(jitted).__name__ == "InterpretedFunction" and rewrite is not None:
        return rewrite()
    return jitted


def _helper(fn):
    """``triton.jit`` for a device helper of this file, called directly (`_direct`)."""
    return _direct(triton.jit(fn))


@_helper
def _exp(x, PRECISE: tl.constexpr):
    """``exp``; libdevice's ``expf`` when ``PRECISE`` (float32 inputs on CUDA: ``tl.exp`` is
    ``ex2.approx``, ~6e-7 relative at ``|x| = 10``, too coarse for the fp32 class)."""
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@_helper
def _log(x, PRECISE: tl.constexpr):
    """``log``; libdevice's ``logf`` when ``PRECISE`` (see `_exp`)."""
    if PRECISE:
        return libdevice.log(x)
    else:
        return tl.log(x)


#: ``x.to(dt)`` rounding to nearest even, in the interpreter too (`_tl_helpers.round_to`).
_to = _direct(load_kernel_module("_tl_helpers.py", executing_mode()).round_to)


@_helper
def _mma(a, b):
    """``a @ b`` with float32 accumulation for fp16/bf16 operands. The interpreter's ``tl.dot``
    misreads 16-bit floats, so it gets float32 copies there: the same products (a 16-bit
    product is exact in float32) and float32 sums."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@_helper
def _logits(q, k, scale, IEEE: tl.constexpr):
    """``scale * q @ k^T`` as float32 ``[BH, BN]``; float64 products for float32 inputs (a float32
    dot over 128 dims already rounds a logit by ~1e-6, the whole fp32 budget)."""
    if IEEE:
        return (tl.dot(q.to(tl.float64), tl.trans(k).to(tl.float64)) * scale).to(tl.float32)
    else:
        return _mma(q, tl.trans(k)) * scale


@_helper
def _online(s, v, m_i, l_i, acc, IEEE: tl.constexpr, PRECISE: tl.constexpr):
    """One online-softmax update with logits ``s [BH, BN]`` (``-inf`` = masked) and values ``v``."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with nothing visible yet keeps m = -inf; shift by 0 so exp gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = _exp(s - m_safe[:, None], PRECISE)
    alpha = _exp(m_i - m_safe, PRECISE)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + _mma(_to(p, v.dtype), v)
    return m_new, l_i, acc


@_helper
def _online_one(q, k, v, m_i, l_i, acc, scale, IEEE: tl.constexpr, PRECISE: tl.constexpr):
    """The online-softmax update for one more key ``k [BDK]`` and value ``v [BDV]`` (the token a
    step appends, or the block it emits), outside the tiled loop so that loop needs no select.
    Returns ``(s [BH], m, l, acc)``."""
    if IEEE:
        s = (tl.sum(q.to(tl.float64) * k.to(tl.float64)[None, :], axis=1) * scale).to(tl.float32)
    else:
        s = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1) * scale
    m_new = tl.maximum(m_i, s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = _exp(m_i - m_safe, PRECISE)
    p = _exp(s - m_safe, PRECISE)
    acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)[None, :]
    return s, m_new, l_i * alpha + p, acc


@_helper
def _load_q(Q, r, g, stride_qr, stride_qh,
            HPG: tl.constexpr, BH: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr):
    """The ``HPG`` query heads of group ``g`` at row ``r``: ``[BH, BDK]``, zero padded."""
    hh = tl.arange(0, BH)
    d = tl.arange(0, BDK)
    head = (g * HPG + hh).to(tl.int64)
    return tl.load(Q + r * stride_qr + head[:, None] * stride_qh + d[None, :],
                   mask=(hh[:, None] < HPG) & (d[None, :] < DK), other=0.0)


@_helper
def _load_rows(BUF, base, rows, valid, D: tl.constexpr, BD: tl.constexpr):
    """Rows ``rows`` of one ``(b, g)`` slab of a cache with contiguous ``D``-wide rows.

    The int64 slab offset goes into the scalar pointer and the tile's offsets are int32
    (a slab holds ``capacity * D < 2^31`` elements), and a column mask is applied only when
    ``D`` is padded: per-element masks and int64 pointers turned the 16-byte vector loads of a
    ``[64, 128]`` tile into scalar ones and took every register (measured on the sm_90 build).
    """
    d = tl.arange(0, BD)
    offs = rows.to(tl.int32)[:, None] * D + d[None, :]
    if D == BD:  # no column mask: the loads stay 16-byte vectors
        return tl.load((BUF + base) + offs, mask=valid[:, None], other=0.0)
    else:
        return tl.load((BUF + base) + offs, mask=valid[:, None] & (d[None, :] < D), other=0.0)


@_helper
def _load_vec(PTR, D: tl.constexpr, BD: tl.constexpr):
    """A ``D``-vector (one token of one group), zero padded to ``BD``."""
    d = tl.arange(0, BD)
    return tl.load(PTR + d, mask=d < D, other=0.0)


@_helper
def _and(mask, flag):
    """``mask & flag`` for a tensor ``mask`` and a scalar ``flag``, broadcast explicitly
    (Triton's interpreter mis-types scalar-by-tensor boolean operations)."""
    return tl.where(flag, mask, False)


@_helper
def _store_vec(PTR, x, ok, D: tl.constexpr, BD: tl.constexpr):
    """Store a ``D``-vector where ``ok`` (a scalar: the row is inside the buffer)."""
    d = tl.arange(0, BD)
    tl.store(PTR + d, x, mask=_and(d < D, ok))


@_helper
def _store_partial(PM, PL, PACC, slot_base, m_i, l_i, acc, BH: tl.constexpr, BDV: tl.constexpr):
    """``(m, l, acc)`` of one split at ``slot_base = ((r*G + g)*NSPLIT + slot) * BH``."""
    hh = tl.arange(0, BH)
    dv = tl.arange(0, BDV)
    tl.store(PM + slot_base + hh, m_i)
    tl.store(PL + slot_base + hh, l_i)
    tl.store(PACC + (slot_base + hh)[:, None] * BDV + dv[None, :], acc)


@_helper
def _position(POS, r, CAP):
    """Row ``r``'s position, clamped into the buffers, and whether it fits (``p < CAP``).

    A row past the capacity only happens when a captured step is replayed more often than the
    buffers hold: its writes are masked, its reads stay in bounds, and the host raises
    (`NSACache.note_replay`).
    """
    p = tl.load(POS + r).to(tl.int64)
    return tl.minimum(p, CAP - 1), p < CAP


@triton.jit
def _cmp_win_kernel(
    Q, KN_C, VN_C, KN_S, VN_S, KN_W, VN_W,
    KR_C, VR_C, KR_S, VR_S, KR_W, VR_W, KC, VC,
    SEQ, POS, LOGITS, PM, PL, PACC,
    stride_qr, stride_qh, stride_knr, stride_kng, stride_vnr, stride_vng,
    stride_krb, stride_krg, stride_vrb, stride_vrg,
    stride_kcb, stride_kcg, stride_vcb, stride_vcg, stride_lr, stride_lh,
    scale, G, NC, NW, NSPLIT, CAP,
    HPG: tl.constexpr, BH: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, L: tl.constexpr, D: tl.constexpr, BL: tl.constexpr,
    W: tl.constexpr, BN: tl.constexpr, APPEND: tl.constexpr, SHARED: tl.constexpr,
    IEEE: tl.constexpr, PRECISE: tl.constexpr,
):
    """K1: compressed attention (Eqs. 7-8) split over ``NC`` programs and the window (spec I.7)
    over ``NW``, for row ``r`` and group ``g``; grid ``(R, G, NC + NW)``.

    Compressed splits also store the scaled logits (K2 turns them into ``p_cmp``). With
    ``APPEND`` (a decode step), split 0 writes the new token's raw K/V at row ``p`` of every
    branch buffer, and the split holding block ``i = num_cmp(p) - 1``, when it completes at this
    step (``i*d + l == p + 1``), pools it from the raw keys ``p+1-l .. p-1`` and the new token
    (mean, spec I.3), stores it in the compressed cache and attends to it. No program reads a
    row another program of this launch writes: the new token comes from the step's input. The
    fresh block and the new token are attended after the tiled loops (`_online_one`), so the
    loops only load what is already cached.
    """
    r = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    b = tl.load(SEQ + r).to(tl.int64)
    p, room = _position(POS, r, CAP)
    hh = tl.arange(0, BH)
    q = _load_q(Q, r, g, stride_qr, stride_qh, HPG, BH, DK, BDK)
    m_i = tl.full([BH], float("-inf"), tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, BDV], tl.float32)
    kn_off = r * stride_knr + g * stride_kng
    vn_off = r * stride_vnr + g * stride_vng
    if sp < NC:
        kr_base = b * stride_krb + g * stride_krg
        vr_base = b * stride_vrb + g * stride_vrg
        if APPEND:
            if sp == 0:  # the new token's raw K/V, once per (row, group) and branch buffer
                kr_p = kr_base + p * DK
                vr_p = vr_base + p * DV
                _store_vec(KR_C + kr_p, _load_vec(KN_C + kn_off, DK, BDK), room, DK, BDK)
                _store_vec(VR_C + vr_p, _load_vec(VN_C + vn_off, DV, BDV), room, DV, BDV)
                if not SHARED:
                    _store_vec(KR_S + kr_p, _load_vec(KN_S + kn_off, DK, BDK), room, DK, BDK)
                    _store_vec(VR_S + vr_p, _load_vec(VN_S + vn_off, DV, BDV), room, DV, BDV)
                    _store_vec(KR_W + kr_p, _load_vec(KN_W + kn_off, DK, BDK), room, DK, BDK)
                    _store_vec(VR_W + vr_p, _load_vec(VN_W + vn_off, DV, BDV), room, DV, BDV)
        M = tl.where(p + 1 >= L, (p + 1 - L) // D + 1, 0)
        chunk = ((M + NC - 1) // NC + BN - 1) // BN * BN  # whole tiles per split
        lo = sp * chunk
        hi = tl.minimum(lo + chunk, M)
        kc_base = b * stride_kcb + g * stride_kcg
        vc_base = b * stride_vcb + g * stride_vcg
        m_old = M
        if APPEND:
            fresh = (p + 1 >= L) & ((p + 1 - L) % D == 0)  # block M-1 completes at this step
            i_new = M - 1
            m_old = tl.where(fresh, M - 1, M)
            own = fresh & (lo <= i_new) & (i_new < hi)
            kc_new = tl.zeros([BDK], KC.dtype.element_ty)
            vc_new = tl.zeros([BDV], VC.dtype.element_ty)
            if own:
                jl = tl.arange(0, BL)
                old = jl < L - 1
                rows = p + 1 - L + jl
                k_old = _load_rows(KR_C, kr_base, rows, old, DK, BDK).to(tl.float32)
                v_old = _load_rows(VR_C, vr_base, rows, old, DV, BDV).to(tl.float32)
                k_sum = tl.sum(k_old, axis=0) + _load_vec(KN_C + kn_off, DK, BDK).to(tl.float32)
                v_sum = tl.sum(v_old, axis=0) + _load_vec(VN_C + vn_off, DV, BDV).to(tl.float32)
                kc_new = _to(k_sum / L, KC.dtype.element_ty)
                vc_new = _to(v_sum / L, VC.dtype.element_ty)
                _store_vec(KC + kc_base + i_new * DK, kc_new, room, DK, BDK)
                _store_vec(VC + vc_base + i_new * DV, vc_new, room, DV, BDV)
        lrow = LOGITS + r * stride_lr + (g * HPG + hh).to(tl.int64) * stride_lh
        top = tl.minimum(hi, m_old)  # blocks already in the cache (a fresh one comes after)
        for t0 in range(lo, top, BN):
            i = t0 + tl.arange(0, BN)
            iv = i < top
            k = _load_rows(KC, kc_base, i, iv, DK, BDK)
            v = _load_rows(VC, vc_base, i, iv, DV, BDV)
            s = tl.where(iv[None, :], _logits(q, k, scale, IEEE), float("-inf"))
            tl.store(lrow[:, None] + i[None, :], s, mask=(hh[:, None] < HPG) & iv[None, :])
            m_i, l_i, acc = _online(s, v, m_i, l_i, acc, IEEE, PRECISE)
        if APPEND:
            if own:
                s1, m_i, l_i, acc = _online_one(q, kc_new, vc_new, m_i, l_i, acc, scale, IEEE,
                                                PRECISE)
                tl.store(lrow + i_new, s1, mask=hh < HPG)
    else:
        kw_base = b * stride_krb + g * stride_krg
        vw_base = b * stride_vrb + g * stride_vrg
        cnt = tl.minimum(p + 1, W)  # exactly min(w, p+1) keys: p-w < s <= p
        chunk = ((cnt + NW - 1) // NW + BN - 1) // BN * BN
        lo = p + 1 - cnt + (sp - NC) * chunk
        hi = tl.minimum(lo + chunk, p + 1)
        top = hi
        if APPEND:  # row p is being written by split 0: it comes from the input, below
            top = tl.minimum(hi, p)
        for t0 in range(lo, top, BN):
            kk = t0 + tl.arange(0, BN)
            kv = kk < top
            k = _load_rows(KR_W, kw_base, kk, kv, DK, BDK)
            v = _load_rows(VR_W, vw_base, kk, kv, DV, BDV)
            s = tl.where(kv[None, :], _logits(q, k, scale, IEEE), float("-inf"))
            m_i, l_i, acc = _online(s, v, m_i, l_i, acc, IEEE, PRECISE)
        if APPEND:
            if (lo <= p) & (p < hi):
                k_now = _load_vec(KN_W + kn_off, DK, BDK)
                v_now = _load_vec(VN_W + vn_off, DV, BDV)
                _, m_i, l_i, acc = _online_one(q, k_now, v_now, m_i, l_i, acc, scale, IEEE,
                                               PRECISE)
    _store_partial(PM, PL, PACC, ((r * G + g) * NSPLIT + sp) * BH, m_i, l_i, acc, BH, BDV)


#: Packed candidates (`_pack_key`): the empty entry (key ``-inf``, block ``-1``) and the least
#: packed value of a finite-or-``+inf`` key (``-inf`` keys are below it: never chosen).
_PACKED_EMPTY = tl.constexpr(-2139095041 * 2**32 + 2**31)
_PACKED_VALID = tl.constexpr(-2139095040 * 2**32)


@_helper
def _pack_key(key, blk):
    """``(key, blk)`` as one int64 whose order is Eq. 11's: higher key first, then lower block
    (forced blocks carry ``+inf``). High word: the float32 bits mapped to an int32 of the same
    order (negative floats' magnitude bits flipped); low word: ``2^31 - 1 - blk`` (``blk >=
    -1``). One plain max then picks the next block, with no index reduction and no tie rule to
    apply. Keys are sums of exponentials (no ``-0.0``; NaN only from NaN inputs)."""
    bits = key.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) + (0x7FFFFFFF - blk.to(tl.int64))


@_helper
def _packed_block(packed):
    """The block of a `_pack_key` value (``-1`` for a ``-inf`` key)."""
    blk = 0x7FFFFFFF - (packed & 0xFFFFFFFF)
    return tl.where(packed >= _PACKED_VALID, blk, -1).to(tl.int32)


@triton.jit
def _score_kernel(
    POS, LOGITS, PM, PL, CAND,
    stride_lr, stride_lh, G, NC, NSPLIT, NQ, CAP,
    HPG: tl.constexpr, BH: tl.constexpr, NCP: tl.constexpr, L: tl.constexpr, D: tl.constexpr,
    LS: tl.constexpr, R: tl.constexpr, MM: tl.constexpr, RP: tl.constexpr, MP: tl.constexpr,
    CH: tl.constexpr, NL: tl.constexpr, NLP: tl.constexpr, INIT: tl.constexpr,
    LOCAL: tl.constexpr, HC: tl.constexpr, PRECISE: tl.constexpr,
):
    """K2: selection scores (Eqs. 9-10) of the ``CH`` selection blocks ``[c*CH, (c+1)*CH)`` of
    row ``r``, group ``g``, and their local top-``NL`` (Eq. 11's order); grid ``(R, G, NQ)``.

    ``p_cmp = exp(s - lse)`` per head from K1's logits and the log-sum-exp of its compressed
    partials, summed over the group's heads (Eq. 10), then Eq. 9 as band weights: selection block
    ``j`` takes compressed blocks ``j*R + u`` (``u < R = l'/d``, weight ``min(u+MM, R) - u``) and
    the halo ``j*R - (MM-1) + t`` (``t < MM-1``, weight ``min(t+1, R)``), ``MM = l/d``; this is
    `nsa_impl.scoring.overlap_band`. The chunk's logits are gathered ``HC`` heads at a time
    (``[HC, CH, RP]``): all heads in one gather keeps every load in flight together (latency,
    small batches), fewer per pass keep the registers and so more programs per SM.

    Local top-n: keys are ``+inf`` for forced blocks, the score for the other candidates
    ``j <= b(p)``, ``-inf`` otherwise, packed with their blocks (`_pack_key`, Eq. 11's order);
    ``NL = min(n, CH)`` rounds of a max store the chunk's list in rank order at slots
    ``[0, NL)`` (``-inf`` keys when fewer candidates are left). The global top-n is inside the
    union of the chunks' lists: a block of the global top-n has fewer than ``n`` blocks of its
    chunk ranked above it. A chunk past ``b(p)`` has no candidate and writes nothing (K3 reads
    only chunks ``<= b(p) // CH``).
    """
    r = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    p, _ = _position(POS, r, CAP)
    bcur = p // LS
    j0 = c * CH
    if j0 <= bcur:
        M = tl.where(p + 1 >= L, (p + 1 - L) // D + 1, 0)
        jl = tl.arange(0, CH)
        j = j0 + jl
        u = tl.arange(0, RP)
        i_main = j[:, None] * R + u[None, :]  # [CH, RP]
        ok_main = (u[None, :] < R) & (i_main < M)
        t = tl.arange(0, MP)
        i_halo = j[:, None] * R - (MM - 1) + t[None, :]  # [CH, MP]
        ok_halo = (t[None, :] < MM - 1) & (i_halo >= 0) & (i_halo < M)
        acc = tl.zeros([CH, RP], tl.float32)
        acc_halo = tl.zeros([CH, MP], tl.float32)
        sp = tl.arange(0, NCP)
        for h0 in tl.static_range(0, BH, HC):  # HC heads per pass (registers vs latency)
            hh = h0 + tl.arange(0, HC)
            hok = hh < HPG
            # Natural-log log-sum-exp per head over the compressed splits (m, l).
            ml = ((r * G + g) * NSPLIT + sp)[None, :] * BH + hh[:, None]  # [HC, NCP]
            pm = tl.load(PM + ml, mask=(sp < NC)[None, :], other=float("-inf"))
            pl = tl.load(PL + ml, mask=(sp < NC)[None, :], other=0.0)
            mg = tl.max(pm, axis=1)
            mg = tl.where(mg == float("-inf"), 0.0, mg)
            lsum = tl.sum(pl * _exp(pm - mg[:, None], PRECISE), axis=1)
            lse = mg + _log(tl.where(lsum > 0.0, lsum, 1.0), PRECISE)  # empty row: all masked
            row = LOGITS + r * stride_lr + (g * HPG + hh).to(tl.int64) * stride_lh  # [HC]
            s_main = tl.load(row[:, None, None] + i_main[None, :, :],
                             mask=hok[:, None, None] & ok_main[None, :, :], other=float("-inf"))
            acc += tl.sum(_exp(s_main - lse[:, None, None], PRECISE), axis=0)  # Eq. 10
            if MM > 1:
                s_halo = tl.load(row[:, None, None] + i_halo[None, :, :],
                                 mask=hok[:, None, None] & ok_halo[None, :, :],
                                 other=float("-inf"))
                acc_halo += tl.sum(_exp(s_halo - lse[:, None, None], PRECISE), axis=0)
        w_main = tl.where(u < R, tl.minimum(u + MM, R) - u, 0).to(tl.float32)
        score = tl.sum(acc * w_main[None, :], axis=1)
        if MM > 1:
            w_halo = tl.where(t < MM - 1, tl.minimum(t + 1, R), 0).to(tl.float32)
            score += tl.sum(acc_halo * w_halo[None, :], axis=1)
        cand = j <= bcur
        forced = cand & ((j < INIT) | (j > bcur - LOCAL))
        key = tl.where(forced, float("inf"), score)
        key = tl.where(cand, key, float("-inf"))
        packed = _pack_key(key, j)
        slot = tl.arange(0, NLP)
        top = tl.full([NLP], _PACKED_EMPTY, tl.int64)
        for it in tl.static_range(NL):
            best = tl.max(packed, axis=0)
            top = tl.where(slot == it, best, top)
            packed = tl.where(packed == best, _PACKED_EMPTY, packed)  # blocks are unique
        tl.store(CAND + ((r * G + g) * NQ + c) * NLP + slot, top)


@_helper
def _merge_top_n(CAND, rg, bcur, NQ, CH: tl.constexpr, NQP: tl.constexpr, NLP: tl.constexpr,
                 N_TOP: tl.constexpr, NP: tl.constexpr):
    """The global top-n of a (row, group) from K2's chunk lists: ``[NP]`` blocks in selection
    order (forced, then higher score, then lower index; `_pack_key` orders the candidates so),
    ``-1`` for empty slots: ``N_TOP`` rounds of a max over the ``NQP * NLP`` packed candidates.
    ``-inf`` keys (non-candidates, empty slots, chunks past ``b(p)``, which K2 did not write)
    are never chosen."""
    E: tl.constexpr = NQP * NLP
    e = tl.arange(0, E)
    ok = ((e // NLP) <= bcur // CH) & ((e // NLP) < NQ)  # chunks past b(p) were not written
    packed = tl.load(CAND + rg * NQ * NLP + e, mask=ok, other=_PACKED_EMPTY)
    slot = tl.arange(0, NP)
    chosen = tl.full([NP], -1, tl.int32)
    for it in tl.static_range(N_TOP):
        best = tl.max(packed, axis=0)
        chosen = tl.where(slot == it, _packed_block(best), chosen)
        packed = tl.where(packed == best, _PACKED_EMPTY, packed)
    return chosen


@triton.jit
def _sel_kernel(
    Q, KR_S, VR_S, SEQ, POS, CAND, SELIDX, SELCNT, PM, PL, PACC,
    stride_qr, stride_qh, stride_krb, stride_krg, stride_vrb, stride_vrg,
    scale, G, NSPLIT, SLOT0, NS, NQ, CAP,
    HPG: tl.constexpr, BH: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BDK: tl.constexpr, BDV: tl.constexpr, LS: tl.constexpr, BN: tl.constexpr,
    CH: tl.constexpr, NQP: tl.constexpr, NLP: tl.constexpr,
    N_TOP: tl.constexpr, NP: tl.constexpr, IEEE: tl.constexpr, PRECISE: tl.constexpr,
):
    """K3: top-n from K2's chunk lists (`_merge_top_n`, every program of the (row, group) the
    same), then selection attention (Eq. 12) over the chosen blocks' keys ``<= p``, the ``N_TOP``
    slots split over ``NS`` programs; grid ``(R, G, NS)``. ``-1`` slots read nothing. Program 0
    stores the blocks in selection order and the number of their keys ``<= p`` (spec I.9)."""
    r = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    b = tl.load(SEQ + r).to(tl.int64)
    p, _ = _position(POS, r, CAP)
    rg = r * G + g
    q = _load_q(Q, r, g, stride_qr, stride_qh, HPG, BH, DK, BDK)  # in flight during the merge
    chosen = _merge_top_n(CAND, rg, p // LS, NQ, CH, NQP, NLP, N_TOP, NP)
    slot = tl.arange(0, NP)
    if s == 0:
        keys = tl.minimum(tl.maximum(p + 1 - chosen.to(tl.int64) * LS, 0), LS)
        count = tl.sum(tl.where(chosen >= 0, keys, 0), axis=0)
        tl.store(SELIDX + rg * NP + slot, chosen)
        tl.store(SELCNT + rg, count.to(tl.int32))
    ks_base = b * stride_krb + g * stride_krg
    vs_base = b * stride_vrb + g * stride_vrg
    m_i = tl.full([BH], float("-inf"), tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, BDV], tl.float32)
    per = (N_TOP + NS - 1) // NS
    for u in range(0, per):
        # chosen[s*per + u], -1 past the list: a gather from registers (+1 so no match is -1)
        blk = tl.sum(tl.where(slot == s * per + u, chosen + 1, 0), axis=0) - 1
        blk = blk.to(tl.int64)
        # A loop, not unrolled: two unrolled float64-logit tiles spilled 840 bytes (fp32,
        # Dk=192; 0 as a loop, and bf16 has one tile per block anyway).
        for c in range(0, LS, BN):
            off = c + tl.arange(0, BN)
            kk = blk * LS + off
            kv = _and((off < LS) & (kk <= p), blk >= 0)
            k = _load_rows(KR_S, ks_base, kk, kv, DK, BDK)
            v = _load_rows(VR_S, vs_base, kk, kv, DV, BDV)
            sc = tl.where(kv[None, :], _logits(q, k, scale, IEEE), float("-inf"))
            m_i, l_i, acc = _online(sc, v, m_i, l_i, acc, IEEE, PRECISE)
    _store_partial(PM, PL, PACC, (rg * NSPLIT + SLOT0 + s) * BH, m_i, l_i, acc, BH, BDV)


@_helper
def _merge(PM, PL, PACC, base, count, hh, BH: tl.constexpr, BDV: tl.constexpr,
           NSP: tl.constexpr, PRECISE: tl.constexpr):
    """Normalised output ``[HBP, BDV]`` of ``count`` splits from slot ``base`` for head rows
    ``hh``: ``sum_s acc_s e^(m_s - m) / sum_s l_s e^(m_s - m)``; exact zeros when nothing was
    visible."""
    sp = tl.arange(0, NSP)
    ok = sp < count
    idx = (base + sp)[:, None] * BH + hh[None, :]  # [NSP, HBP]
    pm = tl.load(PM + idx, mask=ok[:, None], other=float("-inf"))
    pl = tl.load(PL + idx, mask=ok[:, None], other=0.0)
    dv = tl.arange(0, BDV)
    pa = tl.load(PACC + idx[:, :, None] * BDV + dv[None, None, :], mask=ok[:, None, None],
                 other=0.0)
    m = tl.max(pm, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = _exp(pm - m[None, :], PRECISE)
    lsum = tl.sum(pl * w, axis=0)
    o = tl.sum(pa * w[:, :, None], axis=0)
    return tl.where(lsum[:, None] > 0.0, o / tl.where(lsum > 0.0, lsum, 1.0)[:, None], 0.0)


@triton.jit
def _combine_kernel(
    OUT, GATES, PM, PL, PACC, SEQ, POS, LEN,
    stride_or, stride_oh, stride_gr, stride_gh, stride_gc,
    G, NSPLIT, NC, NW, NS,
    HPG: tl.constexpr, BH: tl.constexpr, HB: tl.constexpr, HBP: tl.constexpr,
    DV: tl.constexpr, BDV: tl.constexpr, NCP: tl.constexpr, NWP: tl.constexpr,
    NSP: tl.constexpr, INC: tl.constexpr, PRECISE: tl.constexpr, HALF: tl.constexpr,
):
    """K4: merge each branch's splits, round each branch to the output dtype, gate (Eq. 5) as
    `nsa_ref.reference.gate` does: float32 outputs with one rounding per operation, fp16/bf16
    (``HALF``) in float32 rounded once; grid ``(R, G, cdiv(HPG, HB))``, ``HB`` heads of group
    ``g`` per program. ``NCP``/``NWP``/``NSP``: each branch's split count padded to a power of
    two (its partials are one load).

    With ``INC`` (a decode step, where ``POS`` is the lengths tensor) the first program of row
    ``r`` advances ``LEN[b]`` to ``p + 1``; no other program of this launch reads it.
    """
    r = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    j = tl.arange(0, HBP)
    hh = c * HB + j
    hok = (j < HB) & (hh < HPG)
    base = (r * G + g) * NSPLIT
    o_cmp = _merge(PM, PL, PACC, base, NC, hh, BH, BDV, NCP, PRECISE)
    o_win = _merge(PM, PL, PACC, base + NC, NW, hh, BH, BDV, NWP, PRECISE)
    o_sel = _merge(PM, PL, PACC, base + NC + NW, NS, hh, BH, BDV, NSP, PRECISE)
    dt = OUT.dtype.element_ty
    head = (g * HPG + hh).to(tl.int64)
    gp = GATES + r * stride_gr + head * stride_gh
    g_cmp = tl.load(gp, mask=hok, other=0.0).to(tl.float32)[:, None]
    g_sel = tl.load(gp + stride_gc, mask=hok, other=0.0).to(tl.float32)[:, None]
    g_win = tl.load(gp + 2 * stride_gc, mask=hok, other=0.0).to(tl.float32)[:, None]
    f32 = tl.float32
    if HALF:  # the branches rounded to dt, then g_cmp*o_cmp + g_sel*o_sel + g_win*o_win in f32
        o = (g_cmp * _to(o_cmp, dt).to(f32) + g_sel * _to(o_sel, dt).to(f32)
             + g_win * _to(o_win, dt).to(f32))
    else:  # each product and sum rounded to dt
        a = _to(g_cmp * _to(o_cmp, dt).to(f32), dt).to(f32)
        bsel = _to(g_sel * _to(o_sel, dt).to(f32), dt).to(f32)
        ab = _to(a + bsel, dt).to(f32)
        cw = _to(g_win * _to(o_win, dt).to(f32), dt).to(f32)
        o = ab + cw
    dv = tl.arange(0, BDV)
    tl.store(OUT + r * stride_or + head[:, None] * stride_oh + dv[None, :], _to(o, dt),
             mask=hok[:, None] & (dv[None, :] < DV))
    if INC:
        if (g == 0) & (c == 0):
            b = tl.load(SEQ + r)
            tl.store(LEN + b, tl.load(POS + r) + 1)
