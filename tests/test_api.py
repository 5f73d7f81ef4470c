"""nsa_impl.api: `nsa_attention` and `selection_attention` against `nsa_ref`, end to end.

Every fast result is compared with `nsa_ref` run on the same inputs, in the tolerance classes of
spec I.10 (`nsa_impl.tolerances`). Shapes are tiny on purpose: the grids cover the corners
(T in 1..4, w in 1..T and w >= T, l = d, l > l', empty compressed rows) rather than size.
Compile and functorch behaviour of the entry point: see the end of this module.
"""

from __future__ import annotations

import inspect
import math
import time

import pytest
import torch

import nsa_ref
from conformance import dense
from nsa_impl import dispatch, nsa_attention
from nsa_impl.api import selection_attention
from nsa_impl.tolerances import (
    EXACT_ATOL,
    FP32_GRAD_ATOL,
    FP32_OUT_ATOL,
    NEAR_TIE_RTOL,
    lowp_bound,
)
from nsa_ref import NSAConfig

from .helpers import err, inputs, plan_of, requires_cuda


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


def check_against_reference(cfg, B, T, G, h, Dk, Dv, *, seed=0, cu_seqlens=None, **kw):
    """Every aux field and the output of `nsa_attention` against `nsa_ref` (fp32 class)."""
    q, k, v, gates = inputs(B, T, G, h, Dk, Dv, seed=seed)
    o, aux = nsa_attention(q, k, v, gates, cfg, cu_seqlens=cu_seqlens, return_aux=True, **kw)
    ro, raux = nsa_ref.nsa_attention(
        q, k, v, gates, cfg, cu_seqlens=cu_seqlens, return_aux=True, **kw
    )
    for name in ("o_cmp", "o_win", "o_sel", "p_cmp"):
        got, want = getattr(aux, name), getattr(raux, name)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert err(got, want) < FP32_OUT_ATOL, (name, err(got, want))
    # p_slc is a sum of up to h * l/d probabilities (mass conservation, P9): its float32 error
    # scales with that mass.
    assert aux.p_slc.shape == raux.p_slc.shape
    assert err(aux.p_slc, raux.p_slc) < FP32_OUT_ATOL * h * cfg.cmp_block / cfg.cmp_stride
    _assert_same_selection(aux.block_indices, raux.block_indices, raux.p_slc)
    assert err(o, ro) < FP32_OUT_ATOL
    return aux


# ------------------------------------------------------------------------------------------
# Parity grids against nsa_ref (fp32 class)


@pytest.mark.parametrize("T", [1, 2, 3, 4, 7, 12])
def test_window_grid_matches_reference(T):
    for w in range(1, T + 2):  # w = 1 .. T, and w > T
        cfg = NSAConfig(cmp_block=2, cmp_stride=1, sel_block=2, sel_top_n=3, window=w)
        check_against_reference(cfg, 2, T, 2, 2, 4, 3, seed=T * 31 + w)


@pytest.mark.parametrize(
    "l,d,ls",
    [(1, 1, 1), (2, 1, 2), (2, 2, 2), (4, 2, 4), (4, 2, 8), (4, 4, 4), (8, 4, 4), (6, 2, 4)],
)
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 9, 17])
def test_compressed_grid_matches_reference(l, d, ls, T):
    cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=ls, sel_top_n=3, window=3)
    check_against_reference(cfg, 2, T, 2, 2, 4, 3, seed=l * 100 + d * 10 + T)


def test_paper_config_matches_reference_with_selection():
    """Paper l, d, l', n, w scaled down in T; top-n actually drops blocks (b(p) >= n)."""
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, sel_top_n=4, window=16)
    aux = check_against_reference(cfg, 1, 72, 2, 3, 8, 8, seed=5)
    assert (aux.block_indices >= 0).sum(-1).max() == 4  # the budget binds


def test_exact_class_in_float64():
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=5)
    q, k, v, gates = inputs(1, 21, 2, 2, 4, 3, dtype=torch.float64)
    o, aux = nsa_attention(q, k, v, gates, cfg, return_aux=True)
    ro, raux = nsa_ref.nsa_attention(q, k, v, gates, cfg, return_aux=True)
    assert torch.equal(aux.block_indices, raux.block_indices)
    for name in ("o_cmp", "o_win", "p_cmp", "p_slc"):
        assert err(getattr(aux, name), getattr(raux, name)) <= EXACT_ATOL, name
    assert err(o, ro) <= EXACT_ATOL


def test_ties_break_to_lower_block_index():
    """Identical keys make every compressed probability equal: block scores tie exactly."""
    cfg = NSAConfig(cmp_block=2, cmp_stride=2, sel_block=2, sel_top_n=4, window=2)
    q, k, v, gates = inputs(1, 20, 1, 2, 4, 4)
    k = torch.ones_like(k)
    _, aux = nsa_attention(q, k, v, gates, cfg, return_aux=True)
    _, raux = nsa_ref.nsa_attention(q, k, v, gates, cfg, return_aux=True)
    assert torch.equal(aux.block_indices, raux.block_indices)
    # block 1 wins the tie among unforced blocks 1..b-2 at the last position
    assert aux.block_indices[0, -1, 0].tolist() == [0, 1, 8, 9]


def test_varlen_matches_reference():
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=5)
    cu = torch.tensor([0, 1, 9, 12, 30], dtype=torch.int32)
    check_against_reference(cfg, 1, 30, 2, 2, 4, 3, seed=3, cu_seqlens=cu)


def test_branch_kv_and_phi_match_reference():
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=5)
    B, T, G, D = 1, 14, 2, 4
    gen = torch.Generator().manual_seed(9)
    branch_kv = {
        name: (torch.randn(B, T, G, D, generator=gen), torch.randn(B, T, G, D, generator=gen))
        for name in ("cmp", "win")
    }
    w = torch.linspace(0.0, 1.0, 4)
    check_against_reference(
        cfg, B, T, G, 2, D, D, seed=4, branch_kv=branch_kv,
        phi_k=lambda b: (b * w[:, None]).sum(-2), phi_v=lambda b: b.amax(-2),
    )  # fmt: skip


def test_phi_with_wrong_output_shape_is_rejected_by_name():
    cfg = NSAConfig(cmp_block=2, cmp_stride=2, sel_block=2, sel_top_n=3, window=2)
    q, k, v, gates = inputs(1, 6, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="phi_k"):
        nsa_attention(q, k, v, gates, cfg, phi_k=lambda b: b.sum(-1))


def test_small_chunk_budgets_give_the_same_result():
    """A budget of one row per chunk and chunks straddling sequence boundaries (plan option)."""
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=6)
    cu = torch.tensor([0, 5, 6, 19, 26], dtype=torch.int32)
    q, k, v, gates = inputs(1, 26, 2, 2, 4, 3, seed=8)
    ro, raux = nsa_ref.nsa_attention(q, k, v, gates, cfg, scale=0.5, cu_seqlens=cu,
                                     return_aux=True)  # fmt: skip
    for budget in (1, 24 * 4 * 3 * 8, None):  # 1 row; ~3 rows; default
        p = plan_of(q, k, v, cfg, cu, budget_bytes=budget)
        o, aux = nsa_attention(q, k, v, gates, cfg, scale=0.5, plan=p, return_aux=True)
        assert torch.equal(aux.block_indices, raux.block_indices)
        for name in ("o_cmp", "p_cmp", "o_win"):
            assert err(getattr(aux, name), getattr(raux, name)) < FP32_OUT_ATOL, (budget, name)
        assert err(o, ro) < FP32_OUT_ATOL


# ------------------------------------------------------------------------------------------
# Empty rows, autograd


def test_empty_compressed_rows_are_exact_zeros_forward_and_backward():
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, sel_top_n=3, window=3)
    q, k, v, gates = inputs(1, 7, 2, 2, 4, 4, grad=True)  # T < l: every row is empty
    o, aux = nsa_attention(q, k, v, gates, cfg, return_aux=True)
    assert torch.equal(aux.o_cmp, torch.zeros_like(aux.o_cmp))
    aux.o_cmp.sum().backward(retain_graph=True)
    assert torch.equal(q.grad, torch.zeros_like(q))
    for t in (k, v):  # no compressed block exists: k, v do not reach o_cmp at all
        assert t.grad is None or torch.equal(t.grad, torch.zeros_like(t))
    q.grad = k.grad = v.grad = None
    o.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, gates))


def test_gradcheck_float64():
    """All blocks fit in the budget (T <= n*l'), so selection is locally constant."""
    cfg = NSAConfig(cmp_block=2, cmp_stride=1, sel_block=2, sel_top_n=4, window=3)
    q, k, v, gates = inputs(1, 8, 1, 2, 3, 2, dtype=torch.float64, grad=True)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)

    def f(q, k, v, gates):
        return nsa_attention(q, k, v, gates, cfg, phi_k=lambda b: (b * w[:, None]).sum(-2))

    assert torch.autograd.gradcheck(f, (q, k, v, gates))


@pytest.mark.parametrize("cu", [None, [0, 9, 10, 33]])
def test_float32_gradients_match_reference(cu):
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=6)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    B = 2 if cu is None else 1
    ins = inputs(B, 33, 2, 2, 8, 4, seed=11, grad=True)
    grad_out = torch.randn(B, 33, 4, 4, generator=torch.Generator().manual_seed(12))
    o = nsa_attention(*ins, cfg, cu_seqlens=cu_t)
    got = torch.autograd.grad(o, ins, grad_out)
    ro = nsa_ref.nsa_attention(*ins, cfg, cu_seqlens=cu_t)
    want = torch.autograd.grad(ro, ins, grad_out)
    for name, a, b in zip(("q", "k", "v", "gates"), got, want, strict=False):
        assert err(a, b) <= FP32_GRAD_ATOL, (name, err(a, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_branches_within_naive_bound(dtype):
    """Spec I.10 low precision: against the dense formulation in float32 on the same rounded
    inputs, within twice the error of the same formulation in the low dtype."""
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=6)
    low = inputs(1, 24, 2, 2, 16, 16, seed=21, dtype=dtype)
    _, aux = nsa_attention(*low, cfg, return_aux=True)
    idx = aux.block_indices
    ref32 = dense.nsa_dense(*[t.float() for t in low], cfg, block_indices=idx)
    naive = dense.nsa_dense(*low, cfg, block_indices=idx)
    for name in ("o_cmp", "o_sel", "o_win"):
        got, want, base = getattr(aux, name), getattr(ref32, name), getattr(naive, name)
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert err(got, want) <= lowp_bound(err(base, want), "out"), name


@pytest.mark.triton
@pytest.mark.parametrize("route", ["cpu", "cuda-route"])
def test_nan_in_one_packed_sequence_leaves_the_other_bit_identical(request, route):
    """The acceptance case of issue 9: NaN in v at one token of sequence 0 (cu_seqlens): every
    output and gradient of sequence 1 is bit-identical to a clean run, and sequence 0's rows
    before the token too; on the CPU route and on the CUDA route's glue (CPU stand-ins)."""
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_top_n=3, window=12)
    cu = torch.tensor([0, 40, 70], dtype=torch.int32)
    if route == "cuda-route":
        request.getfixturevalue("cpu_gpu_paths")
    forced = dict(cmp="flash", sel="triton", win="flash") if route == "cuda-route" else {}
    clean = inputs(1, 70, 2, 2, 16, 16, seed=4)
    dirty = [t.clone() for t in clean]
    dirty[2][0, 30] = float("nan")
    runs = []
    for tensors in (clean, dirty):
        leaves = [t.clone().requires_grad_() for t in tensors]
        with dispatch.force_path(**forced):
            o = nsa_attention(*leaves, cfg, cu_seqlens=cu, validate=False)
        runs.append((o.detach(), *torch.autograd.grad((o * 1.5).sum(), leaves)))
    for a, b in zip(*runs, strict=True):  # o, dq, dk, dv, dgates
        assert torch.equal(a[0, 40:], b[0, 40:])  # sequence 1
    for i in (0, 1, 4):  # o, dq and dgates of sequence 0's rows before the NaN (causality)
        assert torch.equal(runs[1][i][0, :30], runs[0][i][0, :30])
    assert torch.isnan(runs[1][0][0, 30]).all()  # the row that reads it is NaN


# ------------------------------------------------------------------------------------------
# Bad input (spec I.11): errors name the argument


def _bad_call(**changes):
    cfg = NSAConfig(cmp_block=2, cmp_stride=2, sel_block=2, sel_top_n=3, window=2)
    q, k, v, gates = inputs(1, 6, 2, 2, 4, 4)
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


def test_signature_is_the_reference_signature_plus_a_plan():
    ours = inspect.signature(nsa_attention).parameters
    ref = inspect.signature(nsa_ref.nsa_attention).parameters
    assert list(ours)[: len(ref)] == list(ref) and list(ours)[len(ref) :] == ["plan"]
    for name in ref:
        assert ours[name].default == ref[name].default and ours[name].kind == ref[name].kind


def test_default_scale_and_the_reference_path_agree():
    """``scale=None`` means 1/sqrt(Dk); the "reference" path reproduces nsa_ref bit for bit."""
    cfg = NSAConfig(cmp_block=2, cmp_stride=1, sel_block=2, sel_top_n=3, window=3)
    q, k, v, gates = inputs(1, 9, 1, 2, 4, 4)
    o1 = nsa_attention(q, k, v, gates, cfg)
    o2 = nsa_attention(q, k, v, gates, cfg, scale=1 / math.sqrt(4))
    assert torch.equal(o1, o2)
    with dispatch.force_path("reference"):
        o3 = nsa_attention(q, k, v, gates, cfg)
    assert torch.equal(o3, nsa_ref.nsa_attention(q, k, v, gates, cfg))


def test_selection_entry_point_routes_and_maps_reference_to_masked():
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=5)
    q, k, v, gates = inputs(1, 21, 2, 2, 8, 4, seed=2)
    _, aux = nsa_ref.nsa_attention(q, k, v, gates, cfg, scale=0.4, return_aux=True)
    for path in (None, "reference", "masked", "packed", "varlen"):
        with dispatch.force_path(path) if path else dispatch.force_path():
            o = selection_attention(q, k, v, aux.block_indices, cfg, 0.4)
        assert err(o, aux.o_sel) < FP32_OUT_ATOL, path
    with pytest.raises(ValueError, match="block_indices"):
        selection_attention(q, k, v, aux.block_indices[:, :3], cfg, 0.4)


# ------------------------------------------------------------------------------------------
# torch.compile and torch.func (CPU: the masked paths; CUDA: fullgraph with a plan)

CFG_C = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, sel_top_n=4, window=12)


def test_func_grad_equals_autograd():
    """torch.func.grad through nsa_attention (every path's Function has setup_context)."""
    q, k, v, gates = inputs(1, 40, 2, 2, 8, 8, seed=3, dtype=torch.float64)
    w = torch.randn(1, 40, 4, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    for path in ("masked", "packed", "varlen", "reference"):

        def loss(q, k, v, gates, path=path):
            with dispatch.force_path(path):
                return (nsa_attention(q, k, v, gates, CFG_C, cu_seqlens=cu) * w).sum()

        got = torch.func.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, gates)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, gates)]
        want = torch.autograd.grad(loss(*leaves), leaves)
        for a, b in zip(got, want, strict=True):
            assert err(a, b) <= EXACT_ATOL, path


def _graphs(backend="aot_eager", **kw):
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    return counter, kw


def test_compile_masked_paths_dynamic_shapes_no_recompile():
    """torch.compile of nsa_attention (masked paths, a plan per call) traces every custom op
    with dynamic shapes: a second and third T reuse the first graph, forward and backward."""
    import torch._dynamo

    torch._dynamo.reset()
    counter, _ = _graphs()
    fn = torch.compile(nsa_attention, backend=counter, dynamic=True)
    with dispatch.force_path("masked"):
        for T in (40, 53, 64):
            q, k, v, gates = inputs(1, T, 2, 2, 8, 8, seed=T, grad=True)
            o = fn(q, k, v, gates, CFG_C, validate=False)
            o.sum().backward()
            assert err(o, nsa_ref.nsa_attention(q, k, v, gates, CFG_C)) < FP32_OUT_ATOL
    # plan building is a graph break (host work): the autocast rule's wrapper (`amp.entry`),
    # the body up to the plan and the rest are three frames, each compiled once for all T
    assert counter.frame_count <= 3, counter.frame_count
    torch._dynamo.reset()


def test_compile_fullgraph_with_a_plan_on_cpu():
    """With a prebuilt plan the whole call is one graph (fullgraph=True), forward+backward."""
    import torch._dynamo

    torch._dynamo.reset()
    counter, _ = _graphs()
    fn = torch.compile(nsa_attention, backend=counter, fullgraph=True, dynamic=True)
    with dispatch.force_path("masked"):
        for T in (40, 57):
            q, k, v, gates = inputs(1, T, 2, 2, 8, 8, seed=T, grad=True)
            p = plan_of(q, k, v, CFG_C)
            o = fn(q, k, v, gates, CFG_C, validate=False, plan=p)
            o.sum().backward()
            assert err(o, nsa_ref.nsa_attention(q, k, v, gates, CFG_C)) < FP32_OUT_ATOL
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.triton
def test_compile_fullgraph_of_the_cuda_route_glue_on_cpu(cpu_gpu_paths):
    """The CUDA route (flash / triton / flash) traced whole with a plan (fullgraph=True): the
    packing, index set-up and containment glue around its custom ops, run here on CPU tensors
    (Triton's interpreter, FlashAttention's function in dense PyTorch)."""
    import torch._dynamo

    torch._dynamo.reset()
    counter, _ = _graphs()
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_top_n=3, window=12)
    q, k, v, gates = inputs(1, 70, 2, 2, 16, 16, seed=3, grad=True)
    with dispatch.force_path(cmp="flash", sel="triton", win="flash"):
        p = plan_of(q, k, v, cfg)
    eager = nsa_attention(q, k, v, gates, cfg, validate=False, plan=p)
    ge = torch.autograd.grad(eager.sum(), (q, k, v, gates))
    fn = torch.compile(nsa_attention, backend=counter, fullgraph=True)
    got = fn(q, k, v, gates, cfg, validate=False, plan=p)
    gc = torch.autograd.grad(got.sum(), (q, k, v, gates))
    assert counter.frame_count == 1
    assert torch.equal(got, eager)
    for a, b in zip(gc, ge, strict=True):
        assert torch.equal(a, b)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_inductor_cpu_times(capsys):
    """Inductor on CPU (the docs/compile.md numbers): first T, second T, graph breaks."""
    import torch._dynamo

    torch._dynamo.reset()
    fn = torch.compile(nsa_attention, dynamic=True)
    times = []
    with dispatch.force_path("masked"):
        for T in (64, 80, 96):
            q, k, v, gates = inputs(1, T, 2, 2, 8, 8, seed=T, grad=True)
            t0 = time.perf_counter()
            fn(q, k, v, gates, CFG_C, validate=False).sum().backward()
            times.append(time.perf_counter() - t0)
    explained = torch._dynamo.explain(nsa_attention)(q, k, v, gates, CFG_C, validate=False)
    with capsys.disabled():
        print(f"\ninductor: first {times[0]:.1f}s, second T {times[1]:.1f}s, third "
              f"{times[2]:.1f}s; graphs {explained.graph_count}, breaks "
              f"{explained.graph_break_count}")  # fmt: skip
    assert times[1] < times[0] / 2  # a new T reuses the dynamic graph
    torch._dynamo.reset()


@pytest.mark.gpu
@requires_cuda
def test_compile_fullgraph_with_a_plan_matches_eager_on_cuda():
    pytest.importorskip("triton", reason="triton is not installed")
    import torch._dynamo

    torch._dynamo.reset()
    cfg = NSAConfig()
    q, k, v, gates = inputs(1, 2048, 2, 8, 128, 128, dtype=torch.bfloat16, grad=True,
                            device="cuda")  # fmt: skip
    p = plan_of(q, k, v, cfg)
    assert set(p.route.paths().values()) <= {"triton", "flash"}, p.route  # the kernel ops
    eager = nsa_attention(q, k, v, gates, cfg, plan=p, validate=False)
    ge = torch.autograd.grad(eager.float().sum(), (q, k, v, gates))
    fn = torch.compile(nsa_attention, fullgraph=True)
    compiled = fn(q, k, v, gates, cfg, plan=p, validate=False)
    gc = torch.autograd.grad(compiled.float().sum(), (q, k, v, gates))
    # inductor fuses the bf16 glue (gate, casts) in float32: equal up to bf16 rounding
    assert torch.allclose(compiled, eager, atol=1e-2, rtol=1e-2)
    for a, b in zip(gc, ge, strict=True):
        assert torch.allclose(a, b, atol=1e-2, rtol=1e-2)
    torch._dynamo.reset()
