"""Triton kernels of the gate combine (Eq. 5), forward and backward.

Loaded only through `nsa_impl.kernels.triton_gate._kernels`. A program owns ``BR`` (token, head)
rows of ``Dv`` columns; the three branch outputs and the gates of those rows are read once, the
products are summed in float32 and rounded once (to nearest even, also in the interpreter:
`_tl_helpers.round_to`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._loader import executing_mode, load_kernel_module

_round = load_kernel_module("_tl_helpers.py", executing_mode()).round_to


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
    tl.store(O + r.to(tl.int64)[:, None] * so + d[None, :], _round(o, O.dtype.element_ty),
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
    tl.store(DC + out, _round(g0[:, None] * do, DC.dtype.element_ty), mask=m)
    tl.store(DS + out, _round(g1[:, None] * do, DS.dtype.element_ty), mask=m)
    tl.store(DW + out, _round(g2[:, None] * do, DW.dtype.element_ty), mask=m)
    dg = DG + r.to(tl.int64) * 3
    gt = DG.dtype.element_ty
    tl.store(dg, _round(tl.sum(do * _rows(C, r, ok, sc, D, BD), 1), gt), mask=ok)
    tl.store(dg + 1, _round(tl.sum(do * _rows(S, r, ok, ss, D, BD), 1), gt), mask=ok)
    tl.store(dg + 2, _round(tl.sum(do * _rows(W, r, ok, sw, D, BD), 1), gt), mask=ok)
