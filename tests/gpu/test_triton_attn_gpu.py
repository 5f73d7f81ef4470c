"""The v4 Triton kernels (compressed branch + fused top-n, window, gate) compiled on a CUDA GPU.

Criterion: spec I.10. Low precision (bf16, fp16): ``err <= lowp_bound(naive_err)`` with the
truth = the masked path in float64 on the same rounded inputs, ``naive`` = the masked path in
the low dtype (compressed branch, as for the flash path) or the window's plain twin
(`nsa_impl.kernels.naive`); selections: the selection slack by the float64 scores is at most
twice the scores' bound, and the kernel's indices equal `nsa_impl.scoring.top_n` on its own
scores exactly. float32 (IEEE dots, float64 logits): the fp32 class against float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from conformance.checks import selection_slack
from nsa_impl import scoring
from nsa_impl.branches import sliding
from nsa_impl.branches.compressed import CmpLayout
from nsa_impl.tolerances import FP32_GRAD_ATOL, FP32_OUT_ATOL, lowp_bound
from nsa_impl.varlen import PackedLayout
from nsa_ref import NSAConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
PAPER = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_top_n=16, window=512)


def _mods():
    pytest.importorskip("triton", reason="triton is not installed")
    from nsa_impl.branches import cmp_triton
    from nsa_impl.kernels import naive, triton_attn

    return cmp_triton, naive, triton_attn


def _err(a, b) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _cmp_run(select, q, k, v, do, layout, cl, scale):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    kc, vc = scoring.compress(k, PAPER, cl), scoring.compress(v, PAPER, cl)
    res = select(q, kc, vc, PAPER, scale, layout, cl, want_aux=True)
    grads = torch.autograd.grad(res.o_cmp, (q, k, v), do)
    return (res.o_cmp.detach(), *grads, res.p_slc.float(), res.block_indices)


def _kernel_selection(q, k, layout, cl):
    """The fused kernel's ``(block_indices, float32 scores)`` (``p_slc`` is rounded to q's dtype,
    which can tie scores the kernel told apart)."""
    cmp_triton, _, triton_attn = _mods()
    from nsa_impl.kernels import triton_topn

    B, T, H, D = q.shape
    kc = scoring.compress(k, PAPER, cl)
    qs, ks = cmp_triton.boundaries(PAPER, layout, B, q.device)
    q3, k3 = q.reshape(B * T, H, D), kc.reshape(-1, kc.shape[2], D)
    with torch.no_grad():
        _, lse = triton_attn.cmp_attention(q3, k3, k3, qs, ks, max(layout.lengths),
                                           PAPER.cmp_block, PAPER.cmp_stride, D**-0.5)
        idx, sc = triton_topn.select_blocks(
            q3, k3, lse, qs, ks, max(layout.lengths), cmp_block=PAPER.cmp_block,
            cmp_stride=PAPER.cmp_stride, sel_block=PAPER.sel_block, top_n=PAPER.sel_top_n,
            init_blocks=PAPER.sel_init_blocks, local_blocks=PAPER.sel_local_blocks,
            scale=D**-0.5, num_scores=PAPER.num_sel_blocks(T))
    G = k.shape[2]
    return idx.reshape(B, T, G, -1), sc.reshape(B, T, G, -1)


def _inputs(B, T, H, G, Dk, Dv, dtype, seed):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(B, T, n, d, device=DEV, generator=gen).to(dtype)
            for n, d in ((H, Dk), (G, Dk), (G, Dv), (H, Dv))]


BF16, FP16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize(("dtype", "B", "T", "G", "h", "Dk", "Dv", "cu"), [
    (BF16, 2, 2048, 4, 16, 128, 128, None),
    (FP16, 2, 2048, 4, 16, 128, 128, None),
    (BF16, 1, 1500, 2, 4, 192, 128, [0, 20, 700, 1500]),  # one sequence shorter than l
    (FP16, 1, 1500, 2, 4, 192, 128, [0, 20, 700, 1500]),
    (BF16, 1, 777, 1, 1, 64, 64, None),
    (BF16, 1, 1100, 2, 3, 64, 64, [0, 1, 600, 1100]),  # h = 3 (padded heads), a length-1 seq
])  # fmt: skip
def test_cmp_triton_parity(dtype, B, T, G, h, Dk, Dv, cu):
    cmp_triton, _, triton_attn = _mods()
    q, k, v, do = _inputs(B, T, G * h, G, Dk, Dv, dtype, seed=T + h)
    assert triton_attn.supports(q, k, v)[0], triton_attn.supports(q, k, v)[1]
    layout = PackedLayout.build(T, cu)
    cl = CmpLayout.build(PAPER, layout)
    args = (layout, cl, 1.0 / math.sqrt(Dk))
    got = _cmp_run(cmp_triton.compressed_and_select, q, k, v, do, *args)
    ref = _cmp_run(scoring.compressed_and_select, *(t.double() for t in (q, k, v, do)), *args)
    low = _cmp_run(scoring.compressed_and_select, q, k, v, do, *args)
    for name, x, r, n in zip(("o_cmp", "dq", "dk", "dv", "p_slc"), got, ref, low, strict=False):
        kind = "grad" if name.startswith("d") else "out"
        bound = lowp_bound(_err(n, r), kind)
        err = _err(x, r)
        print(f"triton cmp {dtype} B={B} T={T} h={h} {Dk}/{Dv} {name}: err {err:.3g} / {bound:.3g}")
        assert torch.isfinite(x).all(), name
        assert err <= bound, f"{name}: {err:.3g} > {bound:.3g}"
    score_bound = lowp_bound(_err(low[4], ref[4]))
    slack = selection_slack(got[5], ref[4], PAPER, layout.pos.to(DEV))
    print(f"  selection: slack {slack:.3g} bound {2 * score_bound:.3g}")
    assert slack <= 2 * score_bound
    idx, sc = _kernel_selection(q, k, layout, cl)
    assert torch.equal(idx, got[5])
    own = scoring.top_n(sc.permute(0, 2, 1, 3), (layout.pos // PAPER.sel_block).to(DEV), PAPER)
    assert torch.equal(idx, own.permute(0, 2, 1, 3)), "top-n differs from the rule on its scores"
    empty = layout.pos < PAPER.cmp_block - 1
    assert torch.equal(got[0][:, empty], torch.zeros_like(got[0][:, empty]))


@pytest.mark.parametrize(("dtype", "B", "T", "G", "h", "Dk", "Dv", "cu", "w"), [
    (BF16, 1, 1000, 2, 8, 128, 128, None, 512),
    (FP16, 1, 1000, 2, 8, 128, 128, None, 512),
    (BF16, 2, 700, 4, 4, 192, 128, None, 512),
    (BF16, 1, 1300, 1, 16, 64, 64, [0, 1, 400, 1300], 512),
    (BF16, 1, 300, 2, 2, 64, 64, None, 1),
    (BF16, 1, 300, 2, 2, 64, 64, None, 1000),  # a window longer than the sequence
])  # fmt: skip
def test_window_triton_parity(dtype, B, T, G, h, Dk, Dv, cu, w):
    _, naive, _ = _mods()
    cfg = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_top_n=16, window=w)
    q, k, v, do = _inputs(B, T, G * h, G, Dk, Dv, dtype, seed=T + w)
    layout = PackedLayout.build(T, cu)
    cut = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    scale = 1.0 / math.sqrt(Dk)

    def run(fn, *ts):
        ts = [t.detach().requires_grad_() for t in ts[:3]] + [ts[3]]
        o = fn(*ts[:3])
        return (o, *torch.autograd.grad(o, ts[:3], ts[3]))

    got = run(lambda *a: sliding.window_attention(*a, cfg, scale, layout, path="triton",
                                                  cu_seqlens=cut), q, k, v, do)
    ref = run(lambda *a: sliding.window_attention(*a, cfg, scale, layout, path="masked",
                                                  cu_seqlens=cut),
              *(t.double() for t in (q, k, v, do)))
    low = run(lambda *a: naive.window_attention_naive(*a, w, scale, cut), q, k, v, do)
    for name, x, r, n in zip(("o", "dq", "dk", "dv"), got, ref, low, strict=True):
        bound = lowp_bound(_err(n, r), "out" if name == "o" else "grad")
        err = _err(x, r)
        print(f"triton win {dtype} T={T} h={h} w={w} {Dk}/{Dv} {name}: err {err:.3g} / {bound:.3g}")
        assert torch.isfinite(x).all() and err <= bound, name


def test_atomic_dq_matches_the_dq_kernel():
    """``dq_atomic=True`` (dQ added by the dK/dV kernel) against the separate dQ kernel."""
    import dataclasses

    from nsa_impl.kernels import tuning

    _, _, triton_attn = _mods()
    prof = tuning.profile_for(DEV)
    T, G, h, D = 4096, 4, 16, 128
    q, k, v, do = _inputs(1, T, G * h, G, D, D, torch.bfloat16, seed=9)
    grads = []
    for atomic in (False, True):
        tn = dataclasses.replace(prof.win, dq_atomic=atomic)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o = triton_attn.window_attention(*leaves, 512, tuning=tn)
        grads.append(torch.autograd.grad(o, leaves, do))
    assert torch.equal(grads[0][1], grads[1][1]) and torch.equal(grads[0][2], grads[1][2])
    err = _err(grads[0][0], grads[1][0])
    scale = grads[0][0].abs().max().item()
    print(f"atomic dq vs dq kernel: {err:.3g} (max |dq| {scale:.3g})")
    assert err <= 2 ** -7 * scale  # two bf16 roundings of float32 sums in different orders


def test_float32_path_is_in_the_fp32_class():
    """float32 inputs: float64 logits and dK/dV sums compiled for the GPU."""
    cmp_triton, _, _ = _mods()
    T, G, h, D = 700, 2, 4, 64
    q, k, v, do = _inputs(1, T, G * h, G, D, D, torch.float32, seed=3)
    layout = PackedLayout.build(T)
    cl = CmpLayout.build(PAPER, layout)
    args = (layout, cl, 1.0 / math.sqrt(D))
    got = _cmp_run(cmp_triton.compressed_and_select, q, k, v, do, *args)
    ref = _cmp_run(scoring.compressed_and_select, *(t.double() for t in (q, k, v, do)), *args)
    for name, x, r in zip(("o_cmp", "dq", "dk", "dv"), got, ref, strict=False):
        tol = FP32_OUT_ATOL if name == "o_cmp" else FP32_GRAD_ATOL
        print(f"triton cmp fp32 {name}: err {_err(x, r):.3g} / {tol}")
        assert _err(x, r) <= tol, name
    assert torch.equal(got[5], ref[5])
    scale = 1.0 / math.sqrt(D)
    wins = []
    for t in ((q, k, v), tuple(x.double() for x in (q, k, v))):
        leaves = [x.detach().requires_grad_() for x in t]
        path = "triton" if t[0].dtype == torch.float32 else "masked"
        o = sliding.window_attention(*leaves, PAPER, scale, layout, path=path)
        wins.append((o, *torch.autograd.grad(o, leaves, do.to(o.dtype))))
    for name, x, r in zip(("o_win", "dq", "dk", "dv"), *wins, strict=True):
        tol = FP32_OUT_ATOL if name == "o_win" else FP32_GRAD_ATOL
        print(f"triton win fp32 {name}: err {_err(x, r):.3g} / {tol}")
        assert _err(x, r) <= tol, name


def test_backward_is_deterministic():
    """With ``dq_atomic=False`` every gradient is bit-identical run to run."""
    import dataclasses

    from nsa_impl.kernels import tuning

    cmp_triton, _, triton_attn = _mods()
    prof = tuning.profile_for(DEV)
    tn_cmp, tn_win = (dataclasses.replace(t, dq_atomic=False) for t in (prof.cmp, prof.win))
    T, G, h, D = 16384, 4, 16, 128
    q, k, v, do = _inputs(1, T, G * h, G, D, D, torch.bfloat16, seed=5)
    layout = PackedLayout.build(T)
    cl = CmpLayout.build(PAPER, layout)

    def select(*a, **kw):
        return cmp_triton.compressed_and_select(*a, **kw, attn_tuning=tn_cmp)

    runs = [_cmp_run(select, q, k, v, do, layout, cl, D**-0.5) for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    wins = []
    for _ in range(2):
        o = triton_attn.window_attention(*leaves, 512, tuning=tn_win)
        wins.append(torch.autograd.grad(o, leaves, do))
    for a, b in zip(*wins, strict=True):
        assert torch.equal(a, b)


def _row_attention(q, k, v, scale, dtype):
    """One query row ``q [H, D]`` over ``k/v [n, H, D]`` in ``dtype`` (a plain softmax)."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if k.shape[0] == 0:
        return torch.zeros_like(q)
    p = torch.softmax(torch.einsum("hd,nhd->hn", q * scale, k), -1)
    return torch.einsum("hn,nhd->hd", p, v)


def test_long_rows_at_64k():
    """T = 65536, paper heads: sampled rows of o_cmp and o_win in the low-precision class.

    Truth: each row computed in float64 from the same bf16 inputs; naive: the same rows in
    bf16; the bound is taken over all sampled rows of a branch (as in the flash path's test).
    """
    cmp_triton, _, triton_attn = _mods()
    T, G, h, D = 65536, 4, 16, 128
    q, k, v, _ = _inputs(1, T, G * h, G, D, D, torch.bfloat16, seed=7)
    layout = PackedLayout.build(T)
    cl = CmpLayout.build(PAPER, layout)
    scale = 1.0 / math.sqrt(D)
    with torch.no_grad():
        kc, vc = scoring.compress(k, PAPER, cl), scoring.compress(v, PAPER, cl)
        got = cmp_triton.compressed_and_select(q, kc, vc, PAPER, scale, layout, cl)
        o_win = triton_attn.window_attention(q, k, v, PAPER.window, scale)
    errs = {"o_cmp": [0.0, 0.0], "o_win": [0.0, 0.0]}  # name -> [kernel, naive] worst
    for r in [0, 30, 31, 32, 47, 48, 1000, 40_000, T - 2, T - 1]:
        n = PAPER.num_cmp(r)
        lo = max(0, r - PAPER.window + 1)
        for name, out, kk, vv in (
            ("o_cmp", got.o_cmp, kc[0, :n], vc[0, :n]),
            ("o_win", o_win, k[0, lo : r + 1], v[0, lo : r + 1]),
        ):
            kk, vv = (t.repeat_interleave(h, 1) for t in (kk, vv))
            truth = _row_attention(q[0, r], kk, vv, scale, torch.float64)
            naive = _row_attention(q[0, r], kk, vv, scale, torch.bfloat16)
            assert torch.isfinite(out[0, r]).all(), (name, r)
            errs[name][0] = max(errs[name][0], _err(out[0, r], truth))
            errs[name][1] = max(errs[name][1], _err(naive, truth))
    for name, (err, naive_err) in errs.items():
        print(f"{name} T={T} sampled rows: err {err:.3g} bound {lowp_bound(naive_err):.3g}")
        assert err <= lowp_bound(naive_err), name
    idx = got.block_indices
    b = (layout.pos.to(DEV) // PAPER.sel_block).view(1, T, 1, 1)
    assert bool(((idx == -1) | ((idx >= 0) & (idx <= b))).all())
    assert bool((idx[..., 0] == 0).all())  # the forced initial block is always chosen
