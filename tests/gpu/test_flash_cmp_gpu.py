"""The compressed branch's "flash" path on a CUDA GPU: FA-2 over query groups + Triton scores.

Criterion: spec I.10 low precision. The reference is the masked path
(`nsa_impl.scoring.compressed_and_select`, itself checked against `nsa_ref` by the
conformance suite) on float64 copies of the same rounded inputs; ``naive_lowp`` is that masked
path in the low dtype. Outputs and gradients: ``err <= lowp_bound(naive_err)``. Scores
``p_slc``: the same bound. Selections: the selection slack (conformance P16 in low precision)
by the float64 scores is at most twice the scores' bound, as in the conformance suite.
"""

from __future__ import annotations

import math

import pytest
import torch

from conformance.checks import selection_slack
from nsa_impl import scoring
from nsa_impl.branches.compressed import CmpLayout
from nsa_impl.tolerances import lowp_bound
from nsa_impl.varlen import PackedLayout
from nsa_ref import NSAConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
PAPER = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_top_n=16, window=512)


def _flash_cmp():
    pytest.importorskip("triton", reason="triton is not installed")
    from nsa_impl.kernels import flash_cmp

    return flash_cmp


def _run(select, q, k, v, do, layout, cl, scale):
    """``(o_cmp, dq, dk, dv, p_slc, block_indices)`` of one compressed-and-select call."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    k_cmp, v_cmp = scoring.compress(k, PAPER, cl), scoring.compress(v, PAPER, cl)
    res = select(q, k_cmp, v_cmp, PAPER, scale, layout, cl, want_aux=True)
    grads = torch.autograd.grad(res.o_cmp, (q, k, v), do)
    return (res.o_cmp.detach(), *grads, res.p_slc.float(), res.block_indices)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "B,T,G,h,Dk,Dv,cu",
    [
        (2, 2048, 4, 16, 128, 128, None),
        (1, 1500, 2, 4, 192, 128, [0, 20, 700, 1500]),  # one sequence shorter than l
        (1, 777, 1, 1, 64, 64, None),
    ],
)
def test_flash_cmp_parity(dtype, B, T, G, h, Dk, Dv, cu):
    flash_cmp = _flash_cmp()
    gen = torch.Generator(device=DEV).manual_seed(T + h)
    H = G * h
    q = torch.randn(B, T, H, Dk, device=DEV, generator=gen).to(dtype)
    k = torch.randn(B, T, G, Dk, device=DEV, generator=gen).to(dtype)
    v = torch.randn(B, T, G, Dv, device=DEV, generator=gen).to(dtype)
    do = torch.randn(B, T, H, Dv, device=DEV, generator=gen).to(dtype)
    assert flash_cmp.supports(q, k, v)[0], flash_cmp.supports(q, k, v)[1]
    layout = PackedLayout.build(T, cu)
    cl = CmpLayout.build(PAPER, layout)
    scale = 1.0 / math.sqrt(Dk)
    args = (layout, cl, scale)
    got = _run(flash_cmp.compressed_and_select, q, k, v, do, *args)
    f64 = (t.double() for t in (q, k, v, do))
    ref = _run(scoring.compressed_and_select, *f64, *args)
    low = _run(scoring.compressed_and_select, q, k, v, do, *args)
    names = ("o_cmp", "dq", "dk", "dv", "p_slc")
    for name, x, r, n in zip(names, got, ref, low, strict=False):
        kind = "grad" if name.startswith("d") else "out"
        bound = lowp_bound((n.double() - r).abs().max().item(), kind)
        err = (x.double() - r).abs().max().item()
        print(f"flash cmp {dtype} B={B} T={T} h={h} {Dk}/{Dv} {name}: err {err:.3g} / {bound:.3g}")
        assert torch.isfinite(x).all(), name
        assert err <= bound, f"{name}: {err:.3g} > {bound:.3g}"
    score_bound = lowp_bound((low[4].double() - ref[4]).abs().max().item())
    slack = selection_slack(got[5], ref[4], PAPER, layout.pos.to(DEV))
    same = (got[5] == ref[5]).all(-1).float().mean().item()
    print(f"  selection: slack {slack:.3g} bound {2 * score_bound:.3g}; rows equal {same:.4f}")
    assert slack <= 2 * score_bound
    empty = layout.pos < PAPER.cmp_block - 1  # rows that see no compressed block: exact zeros
    assert torch.equal(got[0][:, empty], torch.zeros_like(got[0][:, empty]))


def test_flash_cmp_long_rows_match_the_masked_path():
    """T = 65536 (bf16, h = 4): sampled rows' o_cmp within the low-precision bound of masked."""
    flash_cmp = _flash_cmp()
    T, G, h, D = 65536, 1, 4, 64
    gen = torch.Generator(device=DEV).manual_seed(7)
    q, k, v = (torch.randn(1, T, n, D, device=DEV, generator=gen).bfloat16() for n in (G * h, G, G))
    layout = PackedLayout.build(T)
    cl = CmpLayout.build(PAPER, layout)
    k_cmp, v_cmp = scoring.compress(k, PAPER, cl), scoring.compress(v, PAPER, cl)
    scale = 1.0 / math.sqrt(D)
    with torch.no_grad():
        got = flash_cmp.compressed_and_select(q, k_cmp, v_cmp, PAPER, scale, layout, cl)
        low = scoring.compressed_and_select(q, k_cmp, v_cmp, PAPER, scale, layout, cl)
        f32 = [t.float() for t in (q, k_cmp, v_cmp)]
        ref = scoring.compressed_and_select(*f32, PAPER, scale, layout, cl)
    rows = torch.tensor([0, 30, 31, 32, 47, 48, 1000, 40_000, T - 2, T - 1], device=DEV)
    bound = lowp_bound((low.o_cmp[:, rows].float() - ref.o_cmp[:, rows]).abs().max().item())
    err = (got.o_cmp[:, rows].float() - ref.o_cmp[:, rows]).abs().max().item()
    print(f"flash cmp T=65536 sampled rows: err {err:.3g} bound {bound:.3g}")
    assert torch.isfinite(got.o_cmp).all() and err <= bound
    # every row's indices in range and ascending (the structure of spec I.5)
    idx = got.block_indices
    b = (layout.pos.to(DEV) // PAPER.sel_block).view(1, T, 1, 1)
    assert bool(((idx == -1) | ((idx >= 0) & (idx <= b))).all())
