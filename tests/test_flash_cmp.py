"""The compressed branch's "flash" path (`nsa_impl.kernels.flash_cmp`) against `nsa_ref`.

On CPU tensors the scoring kernel runs in Triton's interpreter (the root conftest sets
``TRITON_INTERPRET=1`` without a GPU) and the causal attention over query groups as plain math
on the same packed layout, so the packing of rows into groups is what these tests check, with
the scores, block indices and gradients. Shapes are tiny; the kernel tile is shrunk so that
several row tiles and selection-block bands (with their halo) are exercised. The GPU twin,
with FlashAttention-2 doing the attention, is tests/gpu/test_flash_cmp_gpu.py.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import nsa_ref
from nsa_impl import scoring
from nsa_impl.branches.compressed import CmpLayout
from nsa_impl.scoring import compress
from nsa_impl.tolerances import FP32_GRAD_ATOL, FP32_OUT_ATOL
from nsa_impl.varlen import PackedLayout
from nsa_ref.config import NSAConfig

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from nsa_impl.kernels import flash_cmp  # noqa: E402

if not flash_cmp.interpret_mode():
    pytest.skip(
        "TRITON_INTERPRET is not set: CPU tensors cannot run the kernel", allow_module_level=True
    )

PAPER_LIKE = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_top_n=3, window=8)
EQUAL = NSAConfig(cmp_block=4, cmp_stride=4, sel_block=4, sel_top_n=3, window=4)
#: p_slc: float32 relative error bar of the brief (scores are sums of probabilities <= h * l'/d).
SCORE_RTOL = 1e-5


def _inputs(B, T, H, G, D, seed, dtype=torch.float32, Dv=None):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, n, D, generator=gen, dtype=dtype) for n in (H, G))
    v = torch.randn(B, T, G, D if Dv is None else Dv, generator=gen, dtype=dtype)
    gates = torch.rand(B, T, H, 3, generator=gen, dtype=dtype)
    return q, k, v, gates


def _run(q, k, v, cfg, cu_seqlens=None, **kw):
    T = q.shape[1]
    bounds = None if cu_seqlens is None else cu_seqlens.tolist()
    layout = PackedLayout.build(T, bounds)
    cl = CmpLayout.build(cfg, layout)
    scale = 1.0 / math.sqrt(q.shape[-1])
    k_cmp, v_cmp = compress(k, cfg, cl), compress(v, cfg, cl)
    return flash_cmp.compressed_and_select(
        q, k_cmp, v_cmp, cfg, scale, layout, cl, want_aux=True, block_m=16, block_n=16, **kw
    )


def _maxdiff(a, b):
    return float((a - b).abs().max()) if a.numel() else 0.0


def _check(q, k, v, gates, cfg, cu_seqlens=None, **kw):
    got = _run(q, k, v, cfg, cu_seqlens, **kw)
    _, ref = nsa_ref.nsa_attention(q, k, v, gates, cfg, cu_seqlens=cu_seqlens, return_aux=True)
    assert got.p_slc.shape == ref.p_slc.shape and got.p_cmp.shape == ref.p_cmp.shape
    scale = max(1.0, float(ref.p_slc.abs().max())) if ref.p_slc.numel() else 1.0
    assert _maxdiff(got.p_slc, ref.p_slc) <= SCORE_RTOL * scale
    assert _maxdiff(got.p_cmp, ref.p_cmp) <= FP32_OUT_ATOL
    assert _maxdiff(got.o_cmp, ref.o_cmp) <= FP32_OUT_ATOL
    assert torch.equal(got.block_indices, ref.block_indices)
    return got, ref


@pytest.mark.parametrize(
    ("cfg", "T", "H", "G", "Dk", "Dv"),
    [
        (PAPER_LIKE, 77, 4, 2, 16, 16),
        (EQUAL, 41, 2, 1, 16, 16),
        (PAPER_LIKE, 6, 2, 2, 16, 16),
        (PAPER_LIKE, 50, 4, 1, 8, 24),
    ],
    ids=["paper-like", "l=d=l'", "T<l", "Dk=8,Dv=24"],
)
def test_matches_reference(cfg, T, H, G, Dk, Dv):
    """p_slc, p_cmp, o_cmp and the top-n agree with nsa_ref (several tiles and bands)."""
    _check(*_inputs(2, T, H, G, Dk, seed=T, Dv=Dv), cfg)


def test_cu_seqlens_and_row_chunks():
    """Packed sequences (one shorter than l) and a budget forcing many row chunks."""
    cu = torch.tensor([0, 37, 42, 90], dtype=torch.int32)
    _check(*_inputs(1, 90, 4, 2, 16, seed=1), PAPER_LIKE, cu, budget_bytes=2048)  # 3 chunks


def test_gradients_match_and_empty_rows_are_zero():
    """o_cmp gradients reach q, k, v like the reference; rows seeing no block stay exact 0."""
    q, k, v, gates = _inputs(1, 40, 4, 2, 16, seed=3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = _run(*leaves, PAPER_LIKE)
    do = torch.randn_like(got.o_cmp)
    grads = torch.autograd.grad(got.o_cmp, leaves, do)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    _, ref = nsa_ref.nsa_attention(*ref_leaves, gates, PAPER_LIKE, return_aux=True)
    ref_grads = torch.autograd.grad(ref.o_cmp, ref_leaves, do)
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - r).abs().max() <= FP32_GRAD_ATOL
    empty = PAPER_LIKE.cmp_block - 1  # positions 0..l-2 see no compressed block
    assert torch.equal(got.o_cmp[:, :empty].detach(), torch.zeros_like(got.o_cmp[:, :empty]))
    assert torch.equal(grads[0][:, :empty], torch.zeros_like(grads[0][:, :empty]))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(("init", "local", "n", "S"), [(1, 2, 5, 23), (0, 1, 3, 40), (2, 0, 16, 9)])
def test_top_n_kernel_equals_the_torch_rule_with_ties(init, local, n, S):
    """The argmax-round kernel picks exactly `scoring.top_n`'s blocks, ties included."""
    cfg = NSAConfig(
        cmp_block=4, cmp_stride=4, sel_block=4, sel_top_n=n, sel_init_blocks=init,
        sel_local_blocks=local, window=4,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(S)
    rows = 37
    scores = torch.randint(0, 4, (2, 3, rows, S), generator=gen).float() / 4  # many exact ties
    block = torch.randint(0, S, (rows,), generator=gen)
    want = scoring.top_n(scores, block, cfg).permute(0, 2, 1, 3)
    got = torch.full((2, rows, 3, n), 99, dtype=torch.long)
    flash_cmp.top_n(scores, block, cfg, got)
    assert torch.equal(got, want)


def test_nonfinite_attention_falls_back_to_the_masked_path(monkeypatch, caplog):
    """NaN from the attention kernel on finite inputs: the masked path's result, logged once."""
    import logging

    from nsa_impl.kernels import flash

    def nan_attention(qp, kp, vp, cu, scale):
        o, lse = real(qp, kp, vp, cu, scale)
        return o * float("nan"), lse

    real = flash_cmp._causal_math
    monkeypatch.setattr(flash_cmp, "_causal_math", nan_attention)
    monkeypatch.setattr(flash, "_WARNED", set())
    q, k, v, gates = _inputs(1, 40, 4, 2, 16, seed=9)
    with caplog.at_level(logging.WARNING, logger=flash.__name__):
        for _ in range(2):
            _check(q, k, v, gates, PAPER_LIKE)  # equals nsa_ref: the masked result
    assert sum("not finite" in r.message for r in caplog.records) == 1


def test_supports_declines_what_it_cannot_run():
    """Float64, mismatched dtypes and head dims over 256 are declined with a reason."""
    q, k, v, _ = _inputs(1, 8, 2, 1, 16, seed=0)
    assert flash_cmp.supports(q, k, v)[0]
    ok, why = flash_cmp.supports(q.double(), k.double(), v.double())
    assert not ok and "dtype" in why
    ok, why = flash_cmp.supports(q, k.double(), v)
    assert not ok and "dtype" in why
    wide = torch.zeros(1, 8, 1, 300)
    ok, why = flash_cmp.supports(q, k, wide)
    assert not ok and "Dv=300" in why


def test_query_packing_groups_rows_that_see_the_same_blocks():
    """Each row that sees a block sits in the group of its last visible block, alone in its
    slot; groups hold consecutive rows of one sequence; the other rows see nothing."""
    cfg = PAPER_LIKE  # l = 8, d = 4
    bounds = [0, 5, 21, 40]  # a sequence shorter than l, one ending mid-group, one exact
    layout = PackedLayout.build(40, bounds)
    cl = CmpLayout.build(cfg, layout)
    packing = flash_cmp.QueryPacking.build(cfg, layout, cl)
    d = cfg.cmp_stride
    assert tuple(packing.src.shape) == (cl.num_blocks, d)
    seen = set()
    for row in range(40):
        group, slot = int(packing.group[row]), int(packing.slot[row])
        if cfg.num_cmp(int(layout.pos[row])) == 0:
            assert group == -1
            continue
        assert group == int(cl.ranges.hi[row]) - 1  # its last visible compressed block
        assert int(packing.src[group, slot]) == row and (group, slot) not in seen
        seen.add((group, slot))
    lengths = [cfg.num_cmp(n - 1) for n in layout.lengths]
    assert packing.cu.tolist() == [0, lengths[1], lengths[1] + lengths[2]]  # empty seq dropped
    assert packing.max_groups == max(lengths)


def test_nsa_attention_routes_cmp_to_flash(monkeypatch):
    """`nsa_impl.nsa_attention` with cmp on "flash" matches nsa_ref end to end.

    The "flash" declaration is CUDA-only; here it is widened to CPU (interpreter) for the
    compressed branch alone, so the routing-to-kernel wiring of `nsa_impl.api` runs without a
    GPU (the window keeps the router's choice).
    """
    import dataclasses

    from nsa_impl import nsa_attention, routing

    decl = routing.PATHS["flash"]
    widened = dataclasses.replace(
        decl, branches=frozenset({"cmp"}), devices=frozenset({"cpu", "cuda"}), probe=None,
        dtypes=frozenset({torch.float32}),
    )  # fmt: skip
    monkeypatch.setitem(routing.PATHS, "flash", widened)
    q, k, v, gates = _inputs(1, 70, 4, 2, 16, seed=5)
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    with routing.force_path("flash"):
        assert routing.route(q, k, v).paths()["cmp"] == "flash"
        o, aux = nsa_attention(q, k, v, gates, PAPER_LIKE, cu_seqlens=cu, return_aux=True)
    ref_o, ref = nsa_ref.nsa_attention(
        q, k, v, gates, PAPER_LIKE, cu_seqlens=cu, return_aux=True
    )
    assert torch.equal(aux.block_indices, ref.block_indices)
    assert _maxdiff(aux.o_cmp, ref.o_cmp) <= FP32_OUT_ATOL
    assert _maxdiff(o, ref_o) <= FP32_OUT_ATOL
