"""nsa_impl core: compression, scoring, compressed and sliding branches, the functional API.

Every fast result is compared with `nsa_ref` run on the same inputs, in the tolerance classes of
spec I.10 (`nsa_impl.tolerances`). Shapes are tiny on purpose: the grids cover the corners
(T in 1..4, w in 1..T and w >= T, l = d, l > l', empty compressed rows) rather than size.
"""

from __future__ import annotations

import math

import pytest
import torch

import nsa_ref
from nsa_impl import nsa_attention, routing, scoring
from nsa_impl.branches import BYTES_PER_ELEM, RowRanges, range_attention
from nsa_impl.branches.compressed import CmpLayout, num_cmp
from nsa_impl.branches.sliding import window_attention, window_ranges
from nsa_impl.numerics import compute_dtype
from nsa_impl.tolerances import (
    EXACT_ATOL,
    FP32_GRAD_ATOL,
    FP32_OUT_ATOL,
    NEAR_TIE_RTOL,
    lowp_bound,
)
from nsa_impl.varlen import PackedLayout
from nsa_ref import NSAConfig


def _inputs(B, T, G, h, Dk, Dv, *, seed=0, dtype=torch.float32, grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, G * h, Dk, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, G, Dk, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, G, Dv, generator=gen, dtype=torch.float64)
    gates = torch.rand(B, T, G * h, 3, generator=gen, dtype=torch.float64)
    return [t.to(dtype).requires_grad_(grad) for t in (q, k, v, gates)]


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_same_selection(idx, ref_idx, ref_p_slc):
    """Block indices equal exactly, except at a near-tie (spec I.10): then the multisets of
    selected scores agree within `NEAR_TIE_RTOL`."""
    assert idx.shape == ref_idx.shape and idx.dtype == torch.int64
    differ = (idx != ref_idx).any(-1)
    for row in differ.nonzero().tolist():
        scores = ref_p_slc[tuple(row)]
        got = sorted(scores[i].item() for i in idx[tuple(row)] if i >= 0)
        want = sorted(scores[i].item() for i in ref_idx[tuple(row)] if i >= 0)
        assert len(got) == len(want), f"row {row}: {idx[tuple(row)]} vs {ref_idx[tuple(row)]}"
        for a, b in zip(got, want, strict=False):
            assert abs(a - b) <= NEAR_TIE_RTOL * max(abs(a), abs(b)), f"row {row}: not a near-tie"


def _check_against_ref(cfg, B, T, G, h, Dk, Dv, *, seed=0, cu_seqlens=None, **kw):
    q, k, v, gates = _inputs(B, T, G, h, Dk, Dv, seed=seed)
    o, aux = nsa_attention(q, k, v, gates, cfg, cu_seqlens=cu_seqlens, return_aux=True, **kw)
    ro, raux = nsa_ref.nsa_attention(
        q, k, v, gates, cfg, cu_seqlens=cu_seqlens, return_aux=True, **kw
    )
    for name in ("o_cmp", "o_win", "o_sel", "p_cmp"):
        got, want = getattr(aux, name), getattr(raux, name)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert _err(got, want) < FP32_OUT_ATOL, (name, _err(got, want))
    # p_slc is a sum of up to h * l/d probabilities (mass conservation, P9): its float32 error
    # scales with that mass.
    assert aux.p_slc.shape == raux.p_slc.shape
    assert _err(aux.p_slc, raux.p_slc) < FP32_OUT_ATOL * h * cfg.cmp_block / cfg.cmp_stride
    _assert_same_selection(aux.block_indices, raux.block_indices, raux.p_slc)
    assert _err(o, ro) < FP32_OUT_ATOL
    return aux


# ------------------------------------------------------------------------------------------
# Compression (Eq. 7) and the Eq. 9 band


@pytest.mark.parametrize("l,d", [(1, 1), (2, 1), (4, 2), (4, 4), (8, 2)])
@pytest.mark.parametrize("T", [1, 3, 4, 9, 17])
def test_compress_matches_rules(l, d, T):
    cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=8, sel_top_n=3, window=4)
    x = torch.randn(2, T, 3, 5, dtype=torch.float64)
    cl = CmpLayout.build(cfg, PackedLayout.build(T))
    got = scoring.compress(x, cfg, cl)
    N = cfg.num_cmp(T - 1)
    want = torch.stack([nsa_ref.rules.compress(x[b], N, cfg, None) for b in range(2)])
    assert got.shape == (2, N, 3, 5)
    assert _err(got, want) <= EXACT_ATOL


def test_compress_custom_phi_and_varlen_blocks_stay_inside_sequences():
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=3)
    weights = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)

    def phi(blocks):  # [..., l, D] -> [..., D]: a fixed position-weighted sum
        return (blocks * weights[:, None]).sum(-2)

    lengths = [5, 1, 8, 4]
    cu = torch.tensor([0, 5, 6, 14, 18], dtype=torch.int32)
    x = torch.randn(1, 18, 2, 3, dtype=torch.float64)
    cl = CmpLayout.build(cfg, PackedLayout.build(18, cu.tolist()))
    got = scoring.compress(x, cfg, cl, phi)
    want = torch.cat(
        [
            nsa_ref.rules.compress(x[0, s:e], cfg.num_cmp(e - s - 1), cfg, phi)
            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=False)
        ]
    )
    assert got.shape[1] == sum(cfg.num_cmp(n - 1) for n in lengths)
    assert _err(got[0], want) <= EXACT_ATOL
    assert (
        _err(
            scoring.compress(x, cfg, cl),
            torch.cat(
                [
                    nsa_ref.rules.compress(x[0, s:e], cfg.num_cmp(e - s - 1), cfg, None)
                    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=False)
                ]
            )[None],
        )
        <= EXACT_ATOL
    )


def test_phi_with_wrong_output_shape_is_rejected_by_name():
    cfg = NSAConfig(cmp_block=2, cmp_stride=2, sel_block=2, sel_top_n=3, window=2)
    q, k, v, gates = _inputs(1, 6, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="phi_k"):
        nsa_attention(q, k, v, gates, cfg, phi_k=lambda b: b.sum(-1))


def test_overlap_band_paper_weights():
    assert scoring.overlap_band(NSAConfig()) == [1, 2, 2, 2, 1]
    assert scoring.overlap_band(NSAConfig(cmp_block=8, cmp_stride=8, sel_block=8, sel_top_n=3)) == [
        1
    ]


@pytest.mark.parametrize(
    "l,d,ls", [(32, 16, 64), (1, 1, 1), (2, 1, 2), (4, 2, 4), (8, 2, 4), (4, 4, 16), (6, 2, 4)]
)
def test_overlap_scores_equal_dense_overlap_weights(l, d, ls):
    cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=ls, sel_top_n=3, window=4)
    T = 5 * ls + l
    N, S = cfg.num_cmp(T - 1), cfg.num_sel_blocks(T)
    p = torch.rand(3, 7, N, dtype=torch.float64)
    W = nsa_ref.rules.overlap_weights(S, N, cfg)
    got = scoring.overlap_scores(p, S, cfg)
    assert got.shape == (3, 7, S)
    assert _err(got, p @ W.T) <= EXACT_ATOL


# ------------------------------------------------------------------------------------------
# Top-n (Eq. 11)


@pytest.mark.parametrize("init,local,n", [(1, 2, 4), (0, 1, 2), (2, 0, 3), (1, 2, 3), (0, 0, 1)])
def test_top_n_matches_rules_with_ties(init, local, n):
    cfg = NSAConfig(
        cmp_block=2,
        cmp_stride=2,
        sel_block=2,
        sel_top_n=n,
        sel_init_blocks=init,
        sel_local_blocks=local,
    )
    gen = torch.Generator().manual_seed(n + 10 * init + 100 * local)
    S = 9
    scores = torch.randint(0, 3, (4, S), generator=gen).double()  # many exact ties
    b = torch.tensor([0, 1, 4, 8])
    got = scoring.top_n(scores[None], b, cfg)[0]
    for row in range(4):
        want = nsa_ref.rules.top_n_blocks(scores[row].tolist(), int(b[row]), cfg)
        assert got[row].tolist() == want + [-1] * (n - len(want))


def test_compute_dtype_is_float32_for_low_precision():
    assert compute_dtype(torch.bfloat16) == torch.float32
    assert compute_dtype(torch.float16) == torch.float32
    assert compute_dtype(torch.float32) == torch.float64
    assert compute_dtype(torch.float64) == torch.float64
    seen = []
    q, k, v, _ = _inputs(1, 9, 1, 2, 4, 4, dtype=torch.bfloat16)
    ranges = window_ranges(NSAConfig(window=3), PackedLayout.build(9))
    range_attention(q, k, v, ranges, 0.5, on_probs=lambda r0, r1, s0, p: seen.append(p.dtype))
    assert seen and set(seen) == {torch.float32}


# ------------------------------------------------------------------------------------------
# Parity grids against nsa_ref (fp32 class)


@pytest.mark.parametrize("T", [1, 2, 3, 4, 7, 12])
def test_window_grid_matches_reference(T):
    for w in range(1, T + 2):  # w = 1 .. T, and w > T
        cfg = NSAConfig(cmp_block=2, cmp_stride=1, sel_block=2, sel_top_n=3, window=w)
        _check_against_ref(cfg, 2, T, 2, 2, 4, 3, seed=T * 31 + w)


@pytest.mark.parametrize(
    "l,d,ls",
    [(1, 1, 1), (2, 1, 2), (2, 2, 2), (4, 2, 4), (4, 2, 8), (4, 4, 4), (8, 4, 4), (6, 2, 4)],
)
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 9, 17])
def test_compressed_grid_matches_reference(l, d, ls, T):
    cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=ls, sel_top_n=3, window=3)
    _check_against_ref(cfg, 2, T, 2, 2, 4, 3, seed=l * 100 + d * 10 + T)


def test_paper_config_matches_reference_with_selection():
    """Paper l, d, l', n, w scaled down in T; top-n actually drops blocks (b(p) >= n)."""
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, sel_top_n=4, window=16)
    aux = _check_against_ref(cfg, 1, 72, 2, 3, 8, 8, seed=5)
    assert (aux.block_indices >= 0).sum(-1).max() == 4  # the budget binds


def test_exact_class_in_float64():
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=5)
    q, k, v, gates = _inputs(1, 21, 2, 2, 4, 3, dtype=torch.float64)
    o, aux = nsa_attention(q, k, v, gates, cfg, return_aux=True)
    ro, raux = nsa_ref.nsa_attention(q, k, v, gates, cfg, return_aux=True)
    assert torch.equal(aux.block_indices, raux.block_indices)
    for name in ("o_cmp", "o_win", "p_cmp", "p_slc"):
        assert _err(getattr(aux, name), getattr(raux, name)) <= EXACT_ATOL, name
    assert _err(o, ro) <= EXACT_ATOL


def test_ties_break_to_lower_block_index():
    """Identical keys make every compressed probability equal: block scores tie exactly."""
    cfg = NSAConfig(cmp_block=2, cmp_stride=2, sel_block=2, sel_top_n=4, window=2)
    q, k, v, gates = _inputs(1, 20, 1, 2, 4, 4)
    k = torch.ones_like(k)
    _, aux = nsa_attention(q, k, v, gates, cfg, return_aux=True)
    _, raux = nsa_ref.nsa_attention(q, k, v, gates, cfg, return_aux=True)
    assert torch.equal(aux.block_indices, raux.block_indices)
    # block 1 wins the tie among unforced blocks 1..b-2 at the last position
    assert aux.block_indices[0, -1, 0].tolist() == [0, 1, 8, 9]


def test_varlen_matches_reference_and_crosses_no_boundary():
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=5)
    cu = torch.tensor([0, 1, 9, 12, 30], dtype=torch.int32)
    _check_against_ref(cfg, 1, 30, 2, 2, 4, 3, seed=3, cu_seqlens=cu)


def test_branch_kv_and_phi_match_reference():
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=5)
    B, T, G, D = 1, 14, 2, 4
    gen = torch.Generator().manual_seed(9)
    branch_kv = {
        name: (torch.randn(B, T, G, D, generator=gen), torch.randn(B, T, G, D, generator=gen))
        for name in ("cmp", "win")
    }
    w = torch.linspace(0.0, 1.0, 4)
    _check_against_ref(
        cfg,
        B,
        T,
        G,
        2,
        D,
        D,
        seed=4,
        branch_kv=branch_kv,
        phi_k=lambda b: (b * w[:, None]).sum(-2),
        phi_v=lambda b: b.amax(-2),
    )


def test_small_chunks_give_the_same_result():
    """A budget of one row per chunk and chunks straddling sequence boundaries."""
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=6)
    cu = [0, 5, 6, 19, 26]
    layout = PackedLayout.build(26, cu)
    cl = CmpLayout.build(cfg, layout)
    q, k, v, gates = _inputs(1, 26, 2, 2, 4, 3, seed=8)
    scale = 0.5
    k_cmp, v_cmp = scoring.compress(k, cfg, cl), scoring.compress(v, cfg, cl)
    _, raux = nsa_ref.nsa_attention(
        q,
        k,
        v,
        gates,
        cfg,
        scale=scale,
        return_aux=True,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
    )
    for budget in (1, BYTES_PER_ELEM * 4 * 3 * 8, None):  # 1 row; ~3 rows; default
        s = scoring.compressed_and_select(
            q, k_cmp, v_cmp, cfg, scale, layout, cl, want_aux=True, budget_bytes=budget
        )
        assert _err(s.o_cmp, raux.o_cmp) < FP32_OUT_ATOL
        assert torch.equal(s.block_indices, raux.block_indices)
        assert _err(s.p_cmp, raux.p_cmp) < FP32_OUT_ATOL
        o_win = window_attention(q, k, v, cfg, scale, layout, budget_bytes=budget)
        assert _err(o_win, raux.o_win) < FP32_OUT_ATOL


# ------------------------------------------------------------------------------------------
# Empty rows, memory bound


def test_empty_compressed_rows_are_exact_zeros_forward_and_backward():
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, sel_top_n=3, window=3)
    q, k, v, gates = _inputs(1, 7, 2, 2, 4, 4, grad=True)  # T < l: every row is empty
    o, aux = nsa_attention(q, k, v, gates, cfg, return_aux=True)
    assert torch.equal(aux.o_cmp, torch.zeros_like(aux.o_cmp))
    aux.o_cmp.sum().backward(retain_graph=True)
    assert torch.equal(q.grad, torch.zeros_like(q))
    for t in (k, v):  # no compressed block exists: k, v do not reach o_cmp at all
        assert t.grad is None or torch.equal(t.grad, torch.zeros_like(t))
    q.grad = k.grad = v.grad = None
    o.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, gates))


def test_chunks_respect_the_budget_at_long_T():
    """T=8192, paper config, B*H=16: no chunk tile exceeds the budget, window chunks are banded."""
    cfg, T, heads, budget = NSAConfig(), 8192, 16, 8 * 2**20
    layout = PackedLayout.build(T)
    for ranges, band in (
        (window_ranges(cfg, layout), cfg.window - 1),
        (CmpLayout.build(cfg, layout).ranges, None),
    ):
        rows = ranges.chunk_rows(heads, budget)
        chunks = ranges.chunks(rows)
        assert chunks[0][0] == 0 and chunks[-1][1] == T
        for r0, r1, s0, s1 in chunks:
            assert BYTES_PER_ELEM * heads * (r1 - r0) * (s1 - s0) <= budget
            if band is not None:
                assert s1 - s0 <= (r1 - r0) + band
    assert RowRanges(torch.tensor([0, 0]), torch.tensor([0, 1]), 1).chunk_rows(1, 1) == 1


def test_row_ranges_reject_unsupported_shapes():
    with pytest.raises(ValueError, match="non-decreasing"):
        RowRanges(torch.tensor([1, 0]), torch.tensor([2, 2]), 3)
    with pytest.raises(ValueError, match="lo <= hi"):
        RowRanges(torch.tensor([0, 2]), torch.tensor([1, 1]), 3)


def test_num_cmp_vectorised():
    cfg = NSAConfig(cmp_block=32, cmp_stride=16)
    pos = torch.arange(200)
    assert num_cmp(pos, cfg).tolist() == [cfg.num_cmp(p) for p in range(200)]


# ------------------------------------------------------------------------------------------
# Autograd


def test_gradcheck_range_attention_float64():
    cfg = NSAConfig(cmp_block=2, cmp_stride=1, sel_block=2, sel_top_n=3, window=3)
    layout = PackedLayout.build(7, [0, 3, 7])
    q, k, v, _ = _inputs(1, 7, 2, 2, 3, 2, dtype=torch.float64, grad=True)
    win = window_ranges(cfg, layout)
    cl = CmpLayout.build(cfg, layout)  # includes empty rows (p = 0 of each sequence)
    kc = torch.randn(1, cl.num_blocks, 2, 3, dtype=torch.float64, requires_grad=True)
    vc = torch.randn(1, cl.num_blocks, 2, 2, dtype=torch.float64, requires_grad=True)
    for budget in (1, None):
        for ranges, args in ((win, (q, k, v)), (cl.ranges, (q, kc, vc))):

            def f(q, k, v, ranges=ranges, budget=budget):
                return range_attention(q, k, v, ranges, 0.7, budget_bytes=budget)

            assert torch.autograd.gradcheck(f, args)


def test_gradcheck_api_float64():
    """All blocks fit in the budget (T <= n*l'), so selection is locally constant."""
    cfg = NSAConfig(cmp_block=2, cmp_stride=1, sel_block=2, sel_top_n=4, window=3)
    q, k, v, gates = _inputs(1, 8, 1, 2, 3, 2, dtype=torch.float64, grad=True)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)

    def f(q, k, v, gates):
        return nsa_attention(q, k, v, gates, cfg, phi_k=lambda b: (b * w[:, None]).sum(-2))

    assert torch.autograd.gradcheck(f, (q, k, v, gates))


@pytest.mark.parametrize("cu", [None, [0, 9, 10, 33]])
def test_float32_gradients_match_reference(cu):
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=6)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    B = 2 if cu is None else 1
    ins = _inputs(B, 33, 2, 2, 8, 4, seed=11, grad=True)
    gen = torch.Generator().manual_seed(12)
    grad_out = torch.randn(B, 33, 4, 4, generator=gen)
    o = nsa_attention(*ins, cfg, cu_seqlens=cu_t)
    got = torch.autograd.grad(o, ins, grad_out)
    ro = nsa_ref.nsa_attention(*ins, cfg, cu_seqlens=cu_t)
    want = torch.autograd.grad(ro, ins, grad_out)
    for name, a, b in zip(("q", "k", "v", "gates"), got, want, strict=False):
        assert _err(a, b) <= FP32_GRAD_ATOL, (name, _err(a, b))


# ------------------------------------------------------------------------------------------
# Low precision (spec I.10 low-precision class) for the branches this module computes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_branches_within_naive_bound(dtype):
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=6)
    low = _inputs(1, 24, 2, 2, 16, 16, seed=21, dtype=dtype)
    ref32 = nsa_ref.nsa_attention(*[t.float() for t in low], cfg, return_aux=True)[1]
    naive = nsa_ref.nsa_attention(*low, cfg, return_aux=True)[1]
    _, aux = nsa_attention(*low, cfg, return_aux=True)
    for name in ("o_cmp", "o_win"):
        got, want, base = getattr(aux, name), getattr(ref32, name), getattr(naive, name)
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert _err(got, want) <= lowp_bound(_err(base, want), "out"), name


# ------------------------------------------------------------------------------------------
# Bad input (spec I.11): errors name the argument


def _bad_call(**changes):
    cfg = NSAConfig(cmp_block=2, cmp_stride=2, sel_block=2, sel_top_n=3, window=2)
    q, k, v, gates = _inputs(1, 6, 2, 2, 4, 4)
    args = dict(q=q, k=k, v=v, gates=gates, cfg=cfg)
    kwargs = {key: changes.pop(key) for key in list(changes) if key not in args}
    args.update(changes)
    return nsa_attention(args["q"], args["k"], args["v"], args["gates"], args["cfg"], **kwargs)


@pytest.mark.parametrize(
    "changes,error,match",
    [
        (dict(q=torch.randn(6, 4, 4)), ValueError, "q must have rank 4"),
        (
            dict(k=torch.randn(1, 6, 3, 4), v=torch.randn(1, 6, 3, 4)),
            ValueError,
            "multiple of the KV groups",
        ),
        (dict(k=torch.randn(1, 6, 2, 4, dtype=torch.float64)), TypeError, "k dtype"),
        (dict(v=torch.randn(1, 5, 2, 4)), ValueError, "v must have shape"),
        (dict(gates=torch.full((1, 6, 4, 3), 1.5)), ValueError, "gates"),
        (dict(gates=torch.rand(1, 6, 4, 2)), ValueError, "gates must have shape"),
        (dict(cu_seqlens=torch.tensor([0, 4, 3, 6], dtype=torch.int32)), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 4], dtype=torch.int32)), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0.0, 6.0])), TypeError, "cu_seqlens"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(cfg="paper"), TypeError, "cfg"),
        (dict(branch_kv={"bogus": (None, None)}), ValueError, "branch_kv"),
    ],
)
def test_bad_input_names_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        _bad_call(**changes)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="sel_top_n"):
        NSAConfig(sel_top_n=2, sel_init_blocks=1, sel_local_blocks=2)
    with pytest.raises(ValueError, match="cmp_stride"):
        NSAConfig(cmp_block=6, cmp_stride=4)


def test_signature_is_the_reference_signature():
    import inspect

    assert inspect.signature(nsa_attention) == inspect.signature(nsa_ref.nsa_attention)


def test_default_scale_and_routing_reference_agree():
    """``scale=None`` means 1/sqrt(Dk); the "reference" path reproduces nsa_ref bit for bit."""
    cfg = NSAConfig(cmp_block=2, cmp_stride=1, sel_block=2, sel_top_n=3, window=3)
    q, k, v, gates = _inputs(1, 9, 1, 2, 4, 4)
    o1 = nsa_attention(q, k, v, gates, cfg)
    o2 = nsa_attention(q, k, v, gates, cfg, scale=1 / math.sqrt(4))
    assert torch.equal(o1, o2)
    with routing.force_path("reference"):
        o3 = nsa_attention(q, k, v, gates, cfg)
    assert torch.equal(o3, nsa_ref.nsa_attention(q, k, v, gates, cfg))
