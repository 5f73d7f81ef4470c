"""Triton kernels of the gate combine (Eq. 5), forward and backward.

Loaded only through `nsa_impl.kernels.triton_gate._kernels`. A program owns ``BR`` (token, head)
rows of ``Dv`` columns; the three branch outputs and the gates of those rows are read once, the
products are summed in float32 and rounded once.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows(PTR, r, ok, stride, D: tl.constexpr, BD: tl.constexpr):
    d = tl.arange(0, BD)
    return tl.load(PTR + r.to(tl.int64)[:, None] * stride + d[None, :],
                   mask=ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def _gate_fwd_kernel(C, S, W, GATES, O, R, sc, ss, sw, sg, sgi, so,
                     D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    """``o = g0 * o_cmp + g1 * o_sel + g2 * o_win`` for ``BR`` rows."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = r < R
    g = GATES + r.to(tl.int64) * sg
    g0 = tl.load(g, mask=ok, other=0.0).to(tl.float32)
    g1 = tl.load(g + sgi, mask=ok, other=0.0).to(tl.float32)
    g2 = tl.load(g + 2 * sgi, mask=ok, other=0.0).to(tl.float32)
    o = (g0[:, None] * _rows(C, r, ok, sc, D, BD) + g1[:, None] * _rows(S, r, ok, ss, D, BD)
         + g2[:, None] * _rows(W, r, ok, sw, D, BD))
    d = tl.arange(0, BD)
    tl.store(O + r.to(tl.int64)[:, None] * so + d[None, :], o.to(O.dtype.element_ty),
             mask=ok[:, None] & (d[None, :] < D))


@triton.jit
def _gate_bwd_kernel(DO, C, S, W, GATES, DC, DS, DW, DG, R, sdo, sc, ss, sw, sg, sgi, sd,
                     D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    """``d o_i = g_i * dO`` and ``d g_i = rowsum(dO * o_i)`` for ``BR`` rows."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = r < R
    d = tl.arange(0, BD)
    g = GATES + r.to(tl.int64) * sg
    g0 = tl.load(g, mask=ok, other=0.0).to(tl.float32)
    g1 = tl.load(g + sgi, mask=ok, other=0.0).to(tl.float32)
    g2 = tl.load(g + 2 * sgi, mask=ok, other=0.0).to(tl.float32)
    do = _rows(DO, r, ok, sdo, D, BD)
    out = r.to(tl.int64)[:, None] * sd + d[None, :]
    m = ok[:, None] & (d[None, :] < D)
    tl.store(DC + out, (g0[:, None] * do).to(DC.dtype.element_ty), mask=m)
    tl.store(DS + out, (g1[:, None] * do).to(DS.dtype.element_ty), mask=m)
    tl.store(DW + out, (g2[:, None] * do).to(DW.dtype.element_ty), mask=m)
    dg = DG + r.to(tl.int64) * 3
    tl.store(dg, tl.sum(do * _rows(C, r, ok, sc, D, BD), 1).to(DG.dtype.element_ty), mask=ok)
    tl.store(dg + 1, tl.sum(do * _rows(S, r, ok, ss, D, BD), 1).to(DG.dtype.element_ty), mask=ok)
    tl.store(dg + 2, tl.sum(do * _rows(W, r, ok, sw, D, BD), 1).to(DG.dtype.element_ty), mask=ok)
