"""nsa_impl.kernels.flash_cmp: the compressed branch on FlashAttention over query groups, with
Triton scores and top-n.

On CPU tensors the scoring kernels run in Triton's interpreter (the root conftest sets
``TRITON_INTERPRET=1`` without a GPU) and FlashAttention's function in dense PyTorch, so the
packing of rows into groups is what these tests check, with the scores, block indices and
gradients, against `nsa_ref`. Shapes are tiny; the kernel tile is shrunk so that several row
tiles and selection-block bands (with their halo) are exercised. GPU tests (marked ``gpu``): the
low-precision criterion against the masked path.
"""

from __future__ import annotations

import math

import pytest
import torch

import nsa_ref
from conformance.checks import selection_slack
from nsa_impl import dispatch, scoring
from nsa_impl.branches.compressed import CmpLayout
from nsa_impl.kernels.ops import Inputs
from nsa_impl.tolerances import FP32_GRAD_ATOL, FP32_OUT_ATOL, lowp_bound
from nsa_impl.varlen import PackedLayout
from nsa_ref import NSAConfig

from ..helpers import err, inputs, plan_of, requires_cuda

pytestmark = pytest.mark.triton
pytest.importorskip("triton", reason="triton is not installed")
from nsa_impl.kernels import flash_cmp  # noqa: E402

PAPER_LIKE = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_top_n=3, window=8)
EQUAL = NSAConfig(cmp_block=4, cmp_stride=4, sel_block=4, sel_top_n=3, window=4)
#: p_slc: float32 relative error bar (scores are sums of probabilities <= h * l'/d).
SCORE_RTOL = 1e-5


def _layout(cfg, B, T, G, cu=None, **kw):
    layout = PackedLayout.build(T, None if cu is None else cu)
    cl = CmpLayout.build(cfg, layout)
    return flash_cmp.FlashCmpLayout.build(cfg, layout.bounds, layout.pos, cl.ranges.lo,
                                          cl.ranges.hi, B=B, G=G, device="cpu", **kw), cl


def _run(q, k, v, cfg, cu=None, **kw):
    B, T, _, _ = q.shape
    lay, cl = _layout(cfg, B, T, k.shape[2], cu, block_m=16, block_n=16, **kw)
    k_cmp, v_cmp = scoring.compress(k, cfg, cl), scoring.compress(v, cfg, cl)
    return flash_cmp.compressed_and_select(q, k_cmp, v_cmp, cfg, 1.0 / math.sqrt(q.shape[-1]),
                                           lay, want_aux=True)  # fmt: skip


def _check(q, k, v, gates, cfg, cu=None, **kw):
    o_cmp, idx, p_slc, p_cmp = _run(q, k, v, cfg, cu, **kw)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    _, ref = nsa_ref.nsa_attention(q, k, v, gates, cfg, cu_seqlens=cu_t, return_aux=True)
    assert p_slc.shape == ref.p_slc.shape and p_cmp.shape == ref.p_cmp.shape
    scale = max(1.0, float(ref.p_slc.abs().max())) if ref.p_slc.numel() else 1.0
    assert err(p_slc, ref.p_slc) <= SCORE_RTOL * scale
    assert err(p_cmp, ref.p_cmp) <= FP32_OUT_ATOL
    assert err(o_cmp, ref.o_cmp) <= FP32_OUT_ATOL
    assert torch.equal(idx, ref.block_indices)


@pytest.mark.parametrize(
    ("cfg", "T", "H", "G", "Dk", "Dv"),
    [(PAPER_LIKE, 77, 4, 2, 16, 16), (EQUAL, 41, 2, 1, 16, 16), (PAPER_LIKE, 50, 4, 1, 8, 24)],
    ids=["paper-like", "l=d=l'", "Dk=8,Dv=24"],
)
def test_matches_reference(cfg, T, H, G, Dk, Dv):
    """p_slc, p_cmp, o_cmp and the top-n agree with nsa_ref (several tiles and bands)."""
    _check(*inputs(2, T, G, H // G, Dk, Dv, seed=T), cfg)


def test_cu_seqlens_and_row_chunks():
    """Packed sequences (one shorter than l) and a budget forcing many row chunks."""
    lay, _ = _layout(PAPER_LIKE, 1, 90, 2, [0, 37, 42, 90], budget_bytes=1024)
    assert len(lay.chunks) == 3
    _check(*inputs(1, 90, 2, 2, 16, 16, seed=1), PAPER_LIKE, [0, 37, 42, 90], budget_bytes=1024)


def test_gradients_match_and_empty_rows_are_zero():
    """o_cmp gradients reach q, k, v like the reference; rows seeing no block stay exact 0."""
    q, k, v, gates = inputs(1, 40, 2, 2, 16, 16, seed=3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o_cmp = _run(*leaves, PAPER_LIKE)[0]
    do = torch.randn_like(o_cmp)
    got = torch.autograd.grad(o_cmp, leaves, do)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    _, ref = nsa_ref.nsa_attention(*ref_leaves, gates, PAPER_LIKE, return_aux=True)
    for g, r in zip(got, torch.autograd.grad(ref.o_cmp, ref_leaves, do), strict=True):
        assert err(g, r) <= FP32_GRAD_ATOL
    empty = PAPER_LIKE.cmp_block - 1  # positions 0..l-2 see no compressed block
    assert torch.equal(o_cmp[:, :empty].detach(), torch.zeros_like(o_cmp[:, :empty]))
    assert torch.equal(got[0][:, :empty], torch.zeros_like(got[0][:, :empty]))


@pytest.mark.parametrize(("init", "local", "n", "S"), [(1, 2, 5, 23), (0, 1, 3, 40), (2, 0, 16, 9)])
def test_top_n_kernel_equals_the_torch_rule_with_ties(init, local, n, S):
    """The argmax-round kernel picks exactly `scoring.top_n`'s blocks, ties included."""
    cfg = NSAConfig(cmp_block=4, cmp_stride=4, sel_block=4, sel_top_n=n, sel_init_blocks=init,
                    sel_local_blocks=local, window=4)  # fmt: skip
    gen = torch.Generator().manual_seed(S)
    scores = torch.randint(0, 4, (2, 3, 37, S), generator=gen).float() / 4  # many exact ties
    block = torch.randint(0, S, (37,), generator=gen)
    want = scoring.top_n(scores, block, cfg).permute(0, 2, 1, 3)
    assert torch.equal(flash_cmp.top_n(scores, block, n, init, local), want)


def _inp(**kw):
    base = dict(device=torch.device("cpu"), dtype=torch.float32, B=1, T=64, H=2, G=1, Dk=16,
                Dv=16, max_seqlen=64, varlen=False, backward=True, cfg=PAPER_LIKE)  # fmt: skip
    base.update(kw)
    return Inputs(**base)


def test_supports_declines_what_it_cannot_run():
    assert flash_cmp.supports(_inp())[0]
    for kw, word in (
        (dict(dtype=torch.float64), "dtype"),
        (dict(Dv=300), "Dv=300"),
        (dict(max_seqlen=5), "shorter than l"),
        (dict(H=20000), "packed heads"),
        (dict(max_seqlen=16 * 16385, T=16 * 16385), "selection blocks"),
    ):
        ok, why = flash_cmp.supports(_inp(**kw))
        assert not ok and word in why, (kw, why)


def test_short_sequences_route_cmp_to_masked(cpu_gpu_paths):
    """Every sequence shorter than l: nothing to attend, the compressed branch is "masked" (the
    dispatcher's one exception to forcing: a forced flash or triton run answers such inputs,
    which the conformance edge cases need), and explain says why; the kernel declines them."""
    q, k, v, _ = inputs(1, 6, 2, 2, 16, 16)
    p = plan_of(q, k, v, PAPER_LIKE)
    assert p.route["cmp"].path == "masked" and "shorter than l" in p.route["cmp"].reason
    for forced in ("flash", "triton"):
        with dispatch.force_path(cmp=forced):
            p = plan_of(q, k, v, PAPER_LIKE)
        assert p.route["cmp"].path == "masked" and "shorter than l" in p.route["cmp"].reason
    with dispatch.force_path(cmp="reference"):
        assert plan_of(q, k, v, PAPER_LIKE).route["cmp"].path == "reference"
    inp = plan_of(q, k, v, PAPER_LIKE).inputs
    assert not flash_cmp.supports(inp)[0] and "shorter than l" in flash_cmp.supports(inp)[1]


def test_query_packing_groups_rows_that_see_the_same_blocks():
    """Each row that sees a block sits in the group of its last visible block, alone in its
    slot; groups hold consecutive rows of one sequence; the other rows see nothing."""
    cfg = PAPER_LIKE  # l = 8, d = 4
    bounds = [0, 5, 21, 40]  # a sequence shorter than l, one ending mid-group, one exact
    layout = PackedLayout.build(40, bounds)
    cl = CmpLayout.build(cfg, layout)
    packing = flash_cmp.QueryPacking.build(cfg, bounds, cl.ranges.lo, cl.ranges.hi)
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
    assert list(packing.bounds) == [0, lengths[1], lengths[1] + lengths[2]]  # empty seq dropped


# ------------------------------------------------------------------------------------------
# GPU: the low-precision criterion against the masked path (float64 reference, same-dtype
# naive), and a long sequence

PAPER = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_top_n=16, window=512)


def _plans(q, k, v, cu):
    with dispatch.force_path(cmp="flash"):
        flash_plan = plan_of(q, k, v, PAPER, cu)
    with dispatch.force_path(cmp="masked"):
        masked = [plan_of(t, t2, t3, PAPER, cu) for t, t2, t3 in
                  ((q.double(), k.double(), v.double()), (q, k, v))]  # fmt: skip
    return flash_plan, masked


def _gpu_run(impl, q, k, v, do, plan, scale):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    k_cmp, v_cmp = scoring.compress(k, PAPER, plan.cmp), scoring.compress(v, PAPER, plan.cmp)
    res = impl(q, k_cmp, v_cmp, plan, scale, want_aux=True)
    grads = torch.autograd.grad(res.o_cmp, (q, k, v), do.to(res.o_cmp.dtype))
    return (res.o_cmp.detach(), *grads, res.p_slc.float(), res.block_indices)


@pytest.mark.gpu
@requires_cuda
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
    from nsa_impl.branches.compressed import flash as flash_path

    q, k, v, _ = inputs(B, T, G, h, Dk, Dv, seed=T + h, dtype=dtype, device="cuda")
    do = torch.randn(B, T, G * h, Dv, device="cuda").to(dtype)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    flash_plan, (f64_plan, low_plan) = _plans(q, k, v, cu_t)
    scale = 1.0 / math.sqrt(Dk)
    got = _gpu_run(flash_path, q, k, v, do, flash_plan, scale)
    ref = _gpu_run(scoring.compressed_and_select, *(t.double() for t in (q, k, v, do)),
                   f64_plan, scale)  # fmt: skip
    low = _gpu_run(scoring.compressed_and_select, q, k, v, do, low_plan, scale)
    for i, name in enumerate(("o_cmp", "dq", "dk", "dv", "p_slc")):
        bound = lowp_bound(err(low[i], ref[i]), "grad" if name.startswith("d") else "out")
        assert err(got[i], ref[i]) <= bound, f"{name}: {err(got[i], ref[i]):.3g} > {bound:.3g}"
    score_bound = lowp_bound(err(low[4], ref[4]))
    assert selection_slack(got[5], ref[4], PAPER, flash_plan.positions) <= 2 * score_bound
    empty = flash_plan.positions < PAPER.cmp_block - 1  # rows that see no block: exact zeros
    assert torch.equal(got[0][:, empty], torch.zeros_like(got[0][:, empty]))


@pytest.mark.gpu
@requires_cuda
def test_flash_cmp_long_rows_match_the_masked_path():
    """T = 65536 (bf16, h = 4): sampled rows' o_cmp within the low-precision bound of masked."""
    from nsa_impl.branches.compressed import flash as flash_path

    T, G, h, D = 65536, 1, 4, 64
    q, k, v, _ = inputs(1, T, G, h, D, D, seed=7, dtype=torch.bfloat16, device="cuda")
    with dispatch.force_path(cmp="flash"):
        fp = plan_of(q, k, v, PAPER, backward=False)
    with dispatch.force_path(cmp="masked"):
        mp = plan_of(q, k, v, PAPER, backward=False)
        mp32 = plan_of(q.float(), k.float(), v.float(), PAPER, backward=False)
    scale = 1.0 / math.sqrt(D)
    with torch.no_grad():
        kc, vc = scoring.compress(k, PAPER, fp.cmp), scoring.compress(v, PAPER, fp.cmp)
        got = flash_path(q, kc, vc, fp, scale)
        low = scoring.compressed_and_select(q, kc, vc, mp, scale)
        ref = scoring.compressed_and_select(q.float(), kc.float(), vc.float(), mp32, scale)
    rows = torch.tensor([0, 30, 31, 32, 47, 48, 1000, 40_000, T - 2, T - 1], device="cuda")
    bound = lowp_bound(err(low.o_cmp[:, rows], ref.o_cmp[:, rows]))
    assert torch.isfinite(got.o_cmp).all() and err(got.o_cmp[:, rows], ref.o_cmp[:, rows]) <= bound
    idx = got.block_indices
    b = (fp.positions // PAPER.sel_block).view(1, T, 1, 1)
    assert bool(((idx == -1) | ((idx >= 0) & (idx <= b))).all())
