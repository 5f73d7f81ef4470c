"""nsa_impl.kernels.triton_attn: Triton row-range attention (compressed branch with its
log-sum-exp, sliding window), forward and backward, its sequence layout and NaN containment.

On CPU tensors the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), with launch
shapes shrunk (`SMALL`) so that a call has several query tiles, key chunks and dK/dV work items.

* float32: the fp32 class of spec I.10 against `nsa_ref` run in float32 (outputs 1e-6,
  gradients 1e-5), block indices equal to the reference's.
* bfloat16: the low-precision class, ``err <= lowp_bound(naive_err)`` with truth = the masked
  path in float64 on the same rounded inputs; naive = the masked path in bf16 with bf16 matrix
  products, as on tensor cores (compressed branch; on the CPU the library multiplies half
  precision in float32, `nsa_impl.numerics.product_dtype`), or the dense formulation
  `conformance.dense` in bf16 (window).
* NaN containment: a non-finite value changes only the rows that read it, forward and
  backward; rows that see nothing stay exact zeros.

GPU tests (marked ``gpu``): the same criteria compiled on CUDA at paper head dims, the atomic-dQ
variant, determinism, and sampled rows at T = 65536. The routed path (``force_path("triton")``
through `nsa_attention`): tests/test_dispatch.py; the top-n kernel: test_triton_topn.py; the gate:
test_triton_gate.py; the profiles: test_tuning.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch

from conformance import dense
from conformance.checks import selection_slack
from nsa_impl import numerics, scoring
from nsa_impl.branches import compressed, sliding
from nsa_impl.kernels import ops, tuning
from nsa_impl.tolerances import FP32_GRAD_ATOL, FP32_OUT_ATOL, lowp_bound
from nsa_ref import NSAConfig
from nsa_ref import nsa_attention as ref_nsa_attention

from ..helpers import err, plan_of, requires_cuda

triton = pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run")

from nsa_impl.kernels import triton_attn, triton_topn  # noqa: E402

pytestmark = pytest.mark.triton

CFG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_top_n=3, window=8)
SMALL = tuning.AttnTuning(
    fwd=tuning.Launch(rows=16, block_n=16),
    dq=tuning.Launch(rows=16, block_n=16),
    dkdv=tuning.Launch(rows=16, block_n=16, chunk=16),
)
SMALL_TOPN = tuning.TopNTuning(positions=16, block_n=16)


@pytest.fixture(autouse=True)
def _small_launches_and_poisoned_outputs():
    """Launch shapes shrunk for the CPU runs (the profile's, through `tuning.use_profile`), and
    every buffer a kernel must fill starts as NaN: an unwritten element cannot pass."""
    small = dataclasses.replace(tuning.load_profile("cpu"), cmp=SMALL, win=SMALL, topn=SMALL_TOPN)
    with tuning.use_profile(small), ops.tuning(poison_outputs=True):
        yield


def _inputs(B, T, H, G, Dk, Dv, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=gen)
    k = torch.randn(B, T, G, Dk, generator=gen)
    v = torch.randn(B, T, G, Dv, generator=gen)
    gates = torch.rand(B, T, H, 3, generator=gen)
    do = torch.randn(B, T, H, Dv, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, gates, do)]


def _cu(cu, device="cpu"):
    return None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)


def _cmp(impl, q, k, v, do, cfg, cu=None):
    """``(scores, dq, dk, dv)`` of one compressed-and-select call on ``impl``; gradients through
    ``o_cmp``; the plan is built for these tensors (so float64 inputs get a float64 plan)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    p = plan_of(q, k, v, cfg, cu)
    kc, vc = scoring.compress(k, cfg, p.cmp), scoring.compress(v, cfg, p.cmp)
    res = impl(q, kc, vc, p, 1.0 / math.sqrt(q.shape[-1]), want_aux=True)
    return res, *torch.autograd.grad(res.o_cmp, (q, k, v), do)


def _dense_window(q, k, v, window, scale, cu):
    """The window branch by the dense oracle (gates (0, 0, 1)), in the inputs' dtype."""
    cfg = NSAConfig(cmp_block=8, cmp_stride=8, sel_block=8, sel_top_n=3, window=window)
    gates = torch.zeros(*q.shape[:3], 3, device=q.device, dtype=q.dtype)
    gates[..., 2] = 1
    return dense.nsa_dense(q, k, v, gates, cfg, scale=scale, cu_seqlens=cu).o_win


@contextlib.contextmanager
def _tensor_core_products():
    """Half-precision products in the input dtype on the CPU too (as on CUDA's tensor cores):
    the naive same-dtype computation a bf16 kernel is held to."""
    saved = numerics.TENSOR_CORE_DEVICES
    numerics.TENSOR_CORE_DEVICES = saved | {"cpu"}
    try:
        yield
    finally:
        numerics.TENSOR_CORE_DEVICES = saved


def _win(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do.to(o.dtype)))


CASES = [  # B, T, G, h, Dk, Dv, cu_seqlens
    (1, 100, 2, 4, 16, 16, None),
    (2, 70, 2, 1, 16, 8, None),
    (1, 90, 1, 2, 24, 16, [0, 40, 41, 45, 90]),  # a length-1 and a shorter-than-l sequence
    (1, 64, 1, 16, 16, 16, None),
    (1, 50, 2, 3, 16, 16, None),  # h not a power of two: padded head rows
]


@pytest.mark.parametrize(("B", "T", "G", "h", "Dk", "Dv", "cu"), CASES)
def test_cmp_branch_float32_matches_nsa_ref(B, T, G, h, Dk, Dv, cu):
    cu = _cu(cu)
    q, k, v, gates, do = _inputs(B, T, G * h, G, Dk, Dv, seed=T + h)
    got, dq, dk, dv = _cmp(compressed.triton, q, k, v, do, CFG, cu)
    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    _, ref = ref_nsa_attention(qr, kr, vr, gates, CFG, cu_seqlens=cu, return_aux=True)
    rdq, rdk, rdv = torch.autograd.grad(ref.o_cmp, (qr, kr, vr), do)
    assert err(got.o_cmp, ref.o_cmp) <= FP32_OUT_ATOL
    assert err(got.p_cmp, ref.p_cmp) <= FP32_OUT_ATOL
    assert err(got.p_slc, ref.p_slc) <= FP32_OUT_ATOL * max(1.0, float(ref.p_slc.max()))
    for name, x, r in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert err(x, r) <= FP32_GRAD_ATOL, name
    assert torch.equal(got.block_indices, ref.block_indices)
    pos = plan_of(q, k, v, CFG, cu).layout.pos
    empty = pos < CFG.cmp_block - 1  # rows that see no compressed block: exact zeros
    assert torch.equal(got.o_cmp[:, empty], torch.zeros_like(got.o_cmp[:, empty]))


@pytest.mark.parametrize(("B", "T", "G", "h", "Dk", "Dv", "cu", "window"), [
    (1, 70, 2, 4, 16, 16, None, 8),
    (2, 40, 1, 2, 16, 24, None, 1),
    (1, 60, 2, 1, 16, 16, [0, 25, 26, 60], 100),  # window longer than every sequence
    (1, 48, 1, 16, 32, 16, None, 20),
])  # fmt: skip
def test_window_float32_matches_nsa_ref(B, T, G, h, Dk, Dv, cu, window):
    cfg = dataclasses.replace(CFG, window=window)
    cu = _cu(cu)
    q, k, v, gates, do = _inputs(B, T, G * h, G, Dk, Dv, seed=window + T)
    p = plan_of(q, k, v, cfg, cu)
    scale = 1.0 / math.sqrt(Dk)
    got = _win(lambda *a: sliding.triton(*a, p, scale), q, k, v, do)
    # the plan-free entry (boundaries read from cu_seqlens) computes the same bits
    free = _win(lambda *a: triton_attn.window_attention(*a, window, scale, cu), q, k, v, do)
    assert all(torch.equal(a, b) for a, b in zip(got, free, strict=True))
    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    _, ref = ref_nsa_attention(qr, kr, vr, gates, cfg, cu_seqlens=cu, return_aux=True)
    rgrads = torch.autograd.grad(ref.o_win, (qr, kr, vr), do)
    assert err(got[0], ref.o_win) <= FP32_OUT_ATOL
    for x, r in zip(got[1:], rgrads, strict=True):
        assert err(x, r) <= FP32_GRAD_ATOL


@pytest.mark.parametrize(("T", "G", "h", "Dk", "Dv", "cu"), [
    (96, 2, 4, 16, 16, None),
    (80, 1, 2, 32, 16, [0, 30, 31, 80]),
])  # fmt: skip
def test_bf16_low_precision_class(T, G, h, Dk, Dv, cu):
    """bf16 kernels within twice the error of the same-dtype computation (float64 truth)."""
    cu = _cu(cu)
    q, k, v, _, do = _inputs(1, T, G * h, G, Dk, Dv, seed=T, dtype=torch.bfloat16)
    f64 = [t.double() for t in (q, k, v, do)]
    got = _cmp(compressed.triton, q, k, v, do, CFG, cu)
    ref = _cmp(scoring.compressed_and_select, *f64, CFG, cu)
    with _tensor_core_products():
        low = _cmp(scoring.compressed_and_select, q, k, v, do, CFG, cu)
    pairs = [("o_cmp", got[0].o_cmp, ref[0].o_cmp, low[0].o_cmp, "out"),
             ("p_slc", got[0].p_slc, ref[0].p_slc, low[0].p_slc, "out")]  # fmt: skip
    pairs += [(n, got[i], ref[i], low[i], "grad") for i, n in ((1, "dq"), (2, "dk"), (3, "dv"))]
    scale = 1.0 / math.sqrt(Dk)
    p_low, p_64 = plan_of(q, k, v, CFG, cu), plan_of(*f64[:3], CFG, cu)
    wg = _win(lambda *a: sliding.triton(*a, p_low, scale), q, k, v, do)
    wr = _win(lambda *a: sliding.masked(*a, p_64, scale), *f64)
    wl = _win(lambda *a: _dense_window(*a, CFG.window, scale, cu), q, k, v, do)
    pairs += [(f"win {n}", wg[i], wr[i], wl[i], "out" if i == 0 else "grad")
              for i, n in enumerate(("o", "dq", "dk", "dv"))]  # fmt: skip
    for name, x, r, n, kind in pairs:
        assert torch.isfinite(x).all(), name
        assert err(x, r) <= lowp_bound(err(n, r), kind), name


def test_dkdv_is_deterministic_and_splits_items():
    """The split dK/dV (several work items per key chunk) is bit-identical run to run; the
    atomic-dQ variant agrees within the fp32 class."""
    T, G, h = 100, 1, 4
    q, k, v, _, do = _inputs(1, T, G * h, G, 16, 16, seed=11)
    p = plan_of(q, k, v, CFG)
    kc, vc = scoring.compress(k, CFG, p.cmp), scoring.compress(v, CFG, p.cmp)
    lay = p.cmp_triton
    leaves = [t.reshape(-1, t.shape[2], t.shape[3]).requires_grad_() for t in (q, kc, vc)]
    outs = []
    for _ in range(2):
        o, _ = triton_attn.cmp_attention(*leaves, lay.qstart, lay.kstart, T, CFG.cmp_block,
                                         CFG.cmp_stride, tuning=SMALL)  # fmt: skip
        outs.append(torch.autograd.grad(o, leaves, do.reshape(o.shape)))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    atomic = dataclasses.replace(SMALL, dq_atomic=True)  # dQ added by the dK/dV kernel
    o, _ = triton_attn.cmp_attention(*leaves, lay.qstart, lay.kstart, T, CFG.cmp_block,
                                     CFG.cmp_stride, tuning=atomic)  # fmt: skip
    for a, b in zip(torch.autograd.grad(o, leaves, do.reshape(o.shape)), outs[0], strict=True):
        assert err(a, b) <= FP32_GRAD_ATOL
    kv = tuning.resolve(SMALL.dkdv, h, 16, 16, True)
    nit, _ = triton_attn._items(triton_attn.MODE_CMP, T, kc.shape[1], CFG.cmp_block, 1, 1, G,
                                kv, 32, 8)  # fmt: skip
    assert nit > 1  # the test exercises the partial buffers and the ordered reduction


def test_sequence_starts_of_a_plan():
    """`SeqStarts`: token boundaries per batch row or per packed sequence, compressed-block
    boundaries ``num_cmp(length)`` per sequence, host-side maxima."""
    lay = triton_attn.SeqStarts.build([0, 10], 3, 10, "cpu", cmp=(4, 2))
    assert lay.qstart.tolist() == [0, 10, 20, 30] and lay.kstart.tolist() == [0, 4, 8, 12]
    assert (lay.max_len, lay.max_keys) == (10, 4)
    lay = triton_attn.SeqStarts.build([0, 3, 4, 12], 1, 12, "cpu", cmp=(4, 2))
    assert lay.kstart.tolist() == [0, 0, 0, 3] and (lay.max_len, lay.max_keys) == (8, 3)
    win = triton_attn.SeqStarts.build([0, 3, 4, 12], 1, 12, "cpu")
    assert win.kstart is win.qstart and win.max_keys == 8
    with pytest.raises(ValueError, match="B == 1"):
        triton_attn.SeqStarts.build([0, 3, 12], 2, 12, "cpu")


def _run_window(q, k, v, do, window, cu):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = triton_attn.window_attention(q, k, v, window, 0.5, cu)
    return (o.detach(), *torch.autograd.grad(o, (q, k, v), do))


# bfloat16 too: the masked chunks' cleaning must see a bf16 NaN (the interpreter once took
# NaN - NaN for 0 on raw bf16 bits, so the masked NaN reached non-readers).
NAN_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", NAN_DTYPES)
@pytest.mark.parametrize("which", ["q", "k", "v", "do"])
def test_window_nan_changes_only_the_rows_that_read_it(which, dtype):
    """Two packed sequences, a window of 5, a NaN at token 40 (sequence 1): sequence 0 and the
    rows of sequence 1 that do not read token 40 are bit-identical to a clean run, forward and
    backward (tiles of 16 rows and chunks of 16 keys hold non-readers next to the NaN); the
    readers are NaN."""
    T, j, w = 64, 40, 5
    cu = torch.tensor([0, 29, T], dtype=torch.int32)
    q, k, v, _, do = _inputs(1, T, 4, 2, 16, 16, seed=4, dtype=dtype)
    dirty = {"q": q, "k": k, "v": v, "do": do}
    dirty = {n: t.clone() for n, t in dirty.items()}
    dirty[which][0, j] = float("nan")
    got = _run_window(dirty["q"], dirty["k"], dirty["v"], dirty["do"], w, cu)
    want = _run_window(q, k, v, do, w, cu)
    rows = torch.arange(T)
    readers = (rows == j) if which in ("q", "do") else ((rows >= j) & (rows < j + w))
    read = torch.zeros(T, dtype=torch.bool)  # keys some reader reads
    for r in rows[readers].tolist():
        read[max(29, r - w + 1) : r + 1] = True
    o, dq, dk, dv = got
    o0, dq0, dk0, dv0 = want
    assert torch.equal(o[0, ~readers], o0[0, ~readers])
    assert torch.equal(dq[0, ~readers], dq0[0, ~readers])
    assert torch.equal(dk[0, ~read], dk0[0, ~read]) and torch.equal(dv[0, ~read], dv0[0, ~read])
    if which != "do":
        assert torch.isnan(o[0, readers]).any(-1).all()
    assert torch.isnan(dq[0, readers]).any(-1).any(-1).all()
    assert torch.isnan(dk[0, read]).any()  # dS of a reader is NaN (through O, P or dP)
    if which != "v":  # dV = P^T dO reads no value
        assert torch.isnan(dv[0, read]).any()


@pytest.mark.parametrize("dtype", NAN_DTYPES)
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("j", [6, 30])
def test_cmp_nan_changes_only_the_rows_that_read_it(which, dtype, j):
    """A NaN at token 6 (inside compressed blocks 0 and 1: l = 8, d = 4) or 30 (blocks 6 and 7,
    first seen by row 31: rows 16..30 share a tile and a masked key chunk with that reader):
    rows that see no block stay exact zeros, rows of the other batch row are bit-identical, the
    rows that see no block holding it too, and those that do are NaN (o_cmp, forward and
    backward)."""
    T = 60
    q, k, v, _, do = _inputs(2, T, 4, 2, 16, 16, seed=5, dtype=dtype)
    dirty = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    dirty[which][0, j] = float("nan")
    got = _cmp(compressed.triton, dirty["q"], dirty["k"], dirty["v"], do, CFG)
    want = _cmp(compressed.triton, q, k, v, do, CFG)
    rows = torch.arange(T)
    first = max(0, -(-(j - CFG.cmp_block + 1) // CFG.cmp_stride))  # first block holding j
    readers = rows == j if which == "q" else rows >= first * CFG.cmp_stride + CFG.cmp_block - 1
    readers = readers & (rows >= CFG.cmp_block - 1)  # a row that sees no block reads nothing
    o, o0 = got[0].o_cmp, want[0].o_cmp
    assert torch.equal(o[1], o0[1]) and torch.equal(o[0, ~readers], o0[0, ~readers])
    assert torch.equal(o[0, : CFG.cmp_block - 1], torch.zeros_like(o[0, : CFG.cmp_block - 1]))
    for g, g0 in zip(got[1:], want[1:], strict=True):
        assert torch.equal(g[1], g0[1])  # the other batch row's gradients
    assert torch.equal(got[1][0, ~readers], want[1][0, ~readers])  # dq of non-readers
    if which == "q":  # tokens only in blocks row j does not see: dK/dV sum no row j terms
        seen = max(0, (j + 1 - CFG.cmp_block) // CFG.cmp_stride + 1)
        unread = max(0, (seen - 1) * CFG.cmp_stride + CFG.cmp_block) if seen else 0
        for g, g0 in zip(got[2:], want[2:], strict=True):
            assert torch.equal(g[0, unread:], g0[0, unread:])
    if readers.any():
        assert torch.isnan(o[0, readers]).any(-1).all()


def test_bad_inputs_raise():
    q = torch.randn(10, 4, 16)
    k = torch.randn(3, 2, 16)
    starts = torch.tensor([0, 10])
    with pytest.raises(ValueError, match="3-D"):
        triton_attn.cmp_attention(q[None], k, k, starts, torch.tensor([0, 3]), 10, 4, 4)
    with pytest.raises(ValueError, match="multiple"):
        triton_attn.cmp_attention(torch.randn(10, 3, 16), k, k, starts, torch.tensor([0, 3]),
                                  10, 4, 4)  # fmt: skip
    with pytest.raises(ValueError, match="divide"):
        triton_attn.cmp_attention(q, k, k, starts, torch.tensor([0, 3]), 10, 6, 4)
    with pytest.raises(TypeError, match="qstart"):
        triton_attn.cmp_attention(q, k, k, starts.float(), torch.tensor([0, 3]), 10, 4, 4)
    with pytest.raises(ValueError, match="window"):
        triton_attn.window_attention(q[None], k[None], k[None], 0)


def test_supports_reads_shapes_only():
    from nsa_impl.kernels.ops import Inputs

    def inp(**kw):
        base = dict(device=torch.device("cpu"), dtype=torch.bfloat16, B=1, T=8, H=4, G=2, Dk=16,
                    Dv=16, max_seqlen=8, varlen=False, backward=True, cfg=CFG)  # fmt: skip
        return Inputs(**{**base, **kw})

    assert triton_attn.supports_cmp(inp())[0] and triton_attn.supports_win(inp())[0]
    for kw, word in (({"dtype": torch.float64}, "dtype"), ({"Dv": 512}, "head dims"),
                     ({"H": 3}, "multiple")):  # fmt: skip
        ok, why = triton_attn.supports_cmp(inp(**kw))
        assert not ok and word in why, (kw, why)


# ------------------------------------------------------------------------------------------
# GPU (compiled kernels; the criteria above at paper head dims)

PAPER = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_top_n=16, window=512)
BF16, FP16 = torch.bfloat16, torch.float16


@pytest.fixture
def _profile_defaults():
    """GPU tests run the device profile's own launch shapes, not the CPU tests' `SMALL`."""
    with tuning.use_profile(tuning.profile_for("cuda")), ops.tuning(poison_outputs=True):
        yield


def _cuda_inputs(B, T, H, G, Dk, Dv, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, T, n, d, device="cuda", generator=gen).to(dtype)
            for n, d in ((H, Dk), (G, Dk), (G, Dv), (H, Dv))]  # fmt: skip


def _cmp_fields(impl, q, k, v, do, cfg, cu=None):
    res, dq, dk, dv = _cmp(impl, q, k, v, do, cfg, cu)
    return res.o_cmp.detach(), dq, dk, dv, res.p_slc.float(), res.block_indices


def _kernel_selection(q, k, cfg, cu=None):
    """The fused kernel's ``(block_indices, float32 scores)`` (``p_slc`` is rounded to q's
    dtype, which can tie scores the kernel told apart)."""
    B, T, H, D = q.shape
    p = plan_of(q, k, k, cfg, cu)
    kc = scoring.compress(k, cfg, p.cmp)
    lay = p.cmp_triton
    q3, k3 = q.reshape(B * T, H, D), kc.reshape(-1, kc.shape[2], D)
    with torch.no_grad():
        _, lse = triton_attn.cmp_attention(q3, k3, k3, lay.qstart, lay.kstart, lay.max_len,
                                           cfg.cmp_block, cfg.cmp_stride, D**-0.5)  # fmt: skip
        idx, sc = triton_topn.select_blocks(
            q3, k3, lse, lay.qstart, lay.kstart, lay.max_len, cmp_block=cfg.cmp_block,
            cmp_stride=cfg.cmp_stride, sel_block=cfg.sel_block, top_n=cfg.sel_top_n,
            init_blocks=cfg.sel_init_blocks, local_blocks=cfg.sel_local_blocks, scale=D**-0.5,
            num_scores=cfg.num_sel_blocks(T),
        )  # fmt: skip
    G = k.shape[2]
    return idx.reshape(B, T, G, -1), sc.reshape(B, T, G, -1), p


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("dtype", "B", "T", "G", "h", "Dk", "Dv", "cu"), [
    (BF16, 2, 2048, 4, 16, 128, 128, None),
    (FP16, 2, 2048, 4, 16, 128, 128, None),
    (BF16, 1, 1500, 2, 4, 192, 128, [0, 20, 700, 1500]),  # one sequence shorter than l
    (FP16, 1, 1500, 2, 4, 192, 128, [0, 20, 700, 1500]),
    (BF16, 1, 777, 1, 1, 64, 64, None),
    (BF16, 1, 1100, 2, 3, 64, 64, [0, 1, 600, 1100]),  # h = 3 (padded heads), a length-1 seq
])  # fmt: skip
def test_cmp_triton_parity_cuda(_profile_defaults, dtype, B, T, G, h, Dk, Dv, cu):
    cu = _cu(cu, "cuda")
    q, k, v, do = _cuda_inputs(B, T, G * h, G, Dk, Dv, dtype, seed=T + h)
    got = _cmp_fields(compressed.triton, q, k, v, do, PAPER, cu)
    ref = _cmp_fields(scoring.compressed_and_select, *(t.double() for t in (q, k, v, do)),
                      PAPER, cu)  # fmt: skip
    low = _cmp_fields(scoring.compressed_and_select, q, k, v, do, PAPER, cu)
    for name, x, r, n in zip(("o_cmp", "dq", "dk", "dv", "p_slc"), got, ref, low, strict=False):
        kind = "grad" if name.startswith("d") else "out"
        bound = lowp_bound(err(n, r), kind)
        print(f"triton cmp {dtype} B={B} T={T} h={h} {Dk}/{Dv} {name}: "
              f"{err(x, r):.3g} / {bound:.3g}")
        assert torch.isfinite(x).all(), name
        assert err(x, r) <= bound, f"{name}: {err(x, r):.3g} > {bound:.3g}"
    idx, sc, p = _kernel_selection(q, k, PAPER, cu)
    pos = p.layout.pos.to("cuda")
    score_bound = lowp_bound(err(low[4], ref[4]))
    slack = selection_slack(got[5], ref[4], PAPER, pos)
    print(f"  selection: slack {slack:.3g} bound {2 * score_bound:.3g}")
    assert slack <= 2 * score_bound
    assert torch.equal(idx, got[5])
    own = scoring.top_n(sc.permute(0, 2, 1, 3), pos // PAPER.sel_block, PAPER)
    assert torch.equal(idx, own.permute(0, 2, 1, 3)), "top-n differs from the rule on its scores"
    empty = p.layout.pos < PAPER.cmp_block - 1
    assert torch.equal(got[0][:, empty], torch.zeros_like(got[0][:, empty]))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("dtype", "B", "T", "G", "h", "Dk", "Dv", "cu", "w"), [
    (BF16, 1, 1000, 2, 8, 128, 128, None, 512),
    (FP16, 1, 1000, 2, 8, 128, 128, None, 512),
    (BF16, 2, 700, 4, 4, 192, 128, None, 512),
    (BF16, 1, 1300, 1, 16, 64, 64, [0, 1, 400, 1300], 512),
    (BF16, 1, 300, 2, 2, 64, 64, None, 1),
    (BF16, 1, 300, 2, 2, 64, 64, None, 1000),  # a window longer than the sequence
])  # fmt: skip
def test_window_triton_parity_cuda(_profile_defaults, dtype, B, T, G, h, Dk, Dv, cu, w):
    cfg = dataclasses.replace(PAPER, window=w)
    cu = _cu(cu, "cuda")
    q, k, v, do = _cuda_inputs(B, T, G * h, G, Dk, Dv, dtype, seed=T + w)
    scale = 1.0 / math.sqrt(Dk)
    p_low = plan_of(q, k, v, cfg, cu)
    p_64 = plan_of(*(t.double() for t in (q, k, v)), cfg, cu)
    got = _win(lambda *a: sliding.triton(*a, p_low, scale), q, k, v, do)
    ref = _win(lambda *a: sliding.masked(*a, p_64, scale), *(t.double() for t in (q, k, v, do)))
    low = _win(lambda *a: _dense_window(*a, w, scale, cu), q, k, v, do)
    for name, x, r, n in zip(("o", "dq", "dk", "dv"), got, ref, low, strict=True):
        bound = lowp_bound(err(n, r), "out" if name == "o" else "grad")
        print(f"triton win {dtype} T={T} h={h} w={w} {Dk}/{Dv} {name}: "
              f"{err(x, r):.3g} / {bound:.3g}")
        assert torch.isfinite(x).all() and err(x, r) <= bound, name


@pytest.mark.gpu
@requires_cuda
def test_atomic_dq_matches_the_dq_kernel_cuda(_profile_defaults):
    """``dq_atomic=True`` (dQ added by the dK/dV kernel) against the separate dQ kernel."""
    prof = tuning.profile_for("cuda")
    T, G, h, D = 4096, 4, 16, 128
    q, k, v, do = _cuda_inputs(1, T, G * h, G, D, D, BF16, seed=9)
    grads = []
    for atomic in (False, True):
        tn = dataclasses.replace(prof.win, dq_atomic=atomic)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o = triton_attn.window_attention(*leaves, 512, tuning=tn)
        grads.append(torch.autograd.grad(o, leaves, do))
    assert torch.equal(grads[0][1], grads[1][1]) and torch.equal(grads[0][2], grads[1][2])
    scale = grads[0][0].abs().max().item()
    print(f"atomic dq vs dq kernel: {err(grads[0][0], grads[1][0]):.3g} (max |dq| {scale:.3g})")
    assert err(grads[0][0], grads[1][0]) <= 2**-7 * scale  # two bf16 roundings, other orders


@pytest.mark.gpu
@requires_cuda
def test_float32_path_is_in_the_fp32_class_cuda(_profile_defaults):
    """float32 inputs: float64 logits and dK/dV sums compiled for the GPU."""
    T, G, h, D = 700, 2, 4, 64
    q, k, v, do = _cuda_inputs(1, T, G * h, G, D, D, torch.float32, seed=3)
    f64 = [t.double() for t in (q, k, v, do)]
    got = _cmp_fields(compressed.triton, q, k, v, do, PAPER)
    ref = _cmp_fields(scoring.compressed_and_select, *f64, PAPER)
    for name, x, r in zip(("o_cmp", "dq", "dk", "dv"), got, ref, strict=False):
        tol = FP32_OUT_ATOL if name == "o_cmp" else FP32_GRAD_ATOL
        print(f"triton cmp fp32 {name}: {err(x, r):.3g} / {tol}")
        assert err(x, r) <= tol, name
    assert torch.equal(got[5], ref[5])
    scale = 1.0 / math.sqrt(D)
    p32, p64 = plan_of(q, k, v, PAPER), plan_of(*f64[:3], PAPER)
    wins = [_win(lambda *a: sliding.triton(*a, p32, scale), q, k, v, do),
            _win(lambda *a: sliding.masked(*a, p64, scale), *f64)]  # fmt: skip
    for name, x, r in zip(("o_win", "dq", "dk", "dv"), *wins, strict=True):
        tol = FP32_OUT_ATOL if name == "o_win" else FP32_GRAD_ATOL
        print(f"triton win fp32 {name}: {err(x, r):.3g} / {tol}")
        assert err(x, r) <= tol, name


@pytest.mark.gpu
@requires_cuda
def test_backward_is_deterministic_cuda():
    """With ``dq_atomic=False`` every gradient is bit-identical run to run."""
    prof = tuning.profile_for("cuda")
    det = dataclasses.replace(prof, cmp=dataclasses.replace(prof.cmp, dq_atomic=False),
                              win=dataclasses.replace(prof.win, dq_atomic=False))  # fmt: skip
    T, G, h, D = 16384, 4, 16, 128
    q, k, v, do = _cuda_inputs(1, T, G * h, G, D, D, BF16, seed=5)
    with tuning.use_profile(det):
        runs = [_cmp_fields(compressed.triton, q, k, v, do, PAPER) for _ in range(2)]
        for a, b in zip(*runs, strict=True):
            assert torch.equal(a, b)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        wins = []
        for _ in range(2):
            o = triton_attn.window_attention(*leaves, 512)
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


@pytest.mark.gpu
@requires_cuda
def test_long_rows_at_64k_cuda(_profile_defaults):
    """T = 65536, paper heads: sampled rows of o_cmp and o_win in the low-precision class.

    Truth: each row computed in float64 from the same bf16 inputs; naive: the same rows in
    bf16; the bound is taken over all sampled rows of a branch (as in the flash path's test).
    """
    T, G, h, D = 65536, 4, 16, 128
    q, k, v, _ = _cuda_inputs(1, T, G * h, G, D, D, BF16, seed=7)
    p = plan_of(q, k, v, PAPER)
    scale = 1.0 / math.sqrt(D)
    with torch.no_grad():
        kc, vc = scoring.compress(k, PAPER, p.cmp), scoring.compress(v, PAPER, p.cmp)
        got = compressed.triton(q, kc, vc, p, scale)
        o_win = sliding.triton(q, k, v, p, scale)
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
            errs[name][0] = max(errs[name][0], err(out[0, r], truth))
            errs[name][1] = max(errs[name][1], err(naive, truth))
    for name, (e, naive_err) in errs.items():
        print(f"{name} T={T} sampled rows: err {e:.3g} bound {lowp_bound(naive_err):.3g}")
        assert e <= lowp_bound(naive_err), name
    idx = got.block_indices
    b = (p.layout.pos.to("cuda") // PAPER.sel_block).view(1, T, 1, 1)
    assert bool(((idx == -1) | ((idx >= 0) & (idx <= b))).all())
    assert bool((idx[..., 0] == 0).all())  # the forced initial block is always chosen


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("which", ["q", "k", "v", "do"])
def test_window_nan_containment_cuda(_profile_defaults, which):
    """The containment test above on the compiled kernels (bf16, paper-sized tiles)."""
    T, j, w = 1024, 700, 128
    cu = torch.tensor([0, 500, T], dtype=torch.int32, device="cuda")
    q, k, v, do = _cuda_inputs(1, T, 8, 2, 64, 64, BF16, seed=8)
    dirty = {n: t.clone() for n, t in zip("qkv", (q, k, v), strict=True)}
    dirty["do"] = do.clone()
    dirty[which][0, j] = float("nan")
    got = _run_window(dirty["q"], dirty["k"], dirty["v"], dirty["do"], w, cu)
    want = _run_window(q, k, v, do, w, cu)
    rows = torch.arange(T, device="cuda")
    readers = (rows == j) if which in ("q", "do") else ((rows >= j) & (rows < j + w))
    assert torch.equal(got[0][0, ~readers], want[0][0, ~readers])
    assert torch.equal(got[1][0, ~readers], want[1][0, ~readers])
    assert torch.equal(got[2][0, :500], want[2][0, :500]) and torch.equal(got[3][0, :500],
                                                                           want[3][0, :500])
