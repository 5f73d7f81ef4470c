"""The v4 Triton kernels on CPU tensors (Triton's interpreter) against `nsa_ref`.

Covers `nsa_impl.kernels.triton_attn` (compressed branch with its log-sum-exp, sliding window;
forward and backward), `triton_topn` (fused scores + top-n), `triton_gate` (Eq. 5) and the
routes that reach them (``force_path("triton")`` through `nsa_impl.nsa_attention`, the device
profiles of `nsa_impl.kernels.tuning`).

* float32: the fp32 class of spec I.10 against `nsa_ref` run in float32 (outputs 1e-6,
  gradients 1e-5), block indices equal to the reference's.
* bfloat16: the low-precision class: ``err <= lowp_bound(naive_err)`` against the masked path
  in float64 on the same rounded inputs; ``naive`` is the masked path in bf16 for the
  compressed branch (as for the flash path) and the window's plain twin
  (`nsa_impl.kernels.naive`) for the window.
* top-n: the kernel's indices equal `nsa_impl.scoring.top_n` applied to the kernel's own
  scores, exactly (ties included: all-zero queries make every interior block tie).

Shapes are tiny and the launch shapes shrunk (`SMALL`) so that a call has several query tiles,
key chunks, selection bands and dK/dV work items; group sizes 1, 2, 3, 4, 16, ``Dk != Dv``,
``cu_seqlens`` with a length-1 sequence and one shorter than ``l``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: the Triton kernels cannot run", allow_module_level=True)

import nsa_impl  # noqa: E402
from nsa_impl import routing, scoring  # noqa: E402
from nsa_impl.branches import cmp_triton, sliding  # noqa: E402
from nsa_impl.branches.compressed import CmpLayout  # noqa: E402
from nsa_impl.kernels import naive, triton_attn, triton_gate, triton_topn, tuning  # noqa: E402
from nsa_impl.tolerances import FP32_GRAD_ATOL, FP32_OUT_ATOL, lowp_bound  # noqa: E402
from nsa_impl.varlen import PackedLayout  # noqa: E402
from nsa_ref import NSAConfig  # noqa: E402
from nsa_ref import nsa_attention as ref_nsa_attention  # noqa: E402
from nsa_ref.reference import gate as ref_gate  # noqa: E402

pytestmark = pytest.mark.triton

CFG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_top_n=3, window=8)
#: l = d = l': one halo-free band per block, two initial blocks forced.
FLAT = NSAConfig(cmp_block=4, cmp_stride=4, sel_block=4, sel_top_n=5, window=4,
                 sel_init_blocks=2, sel_local_blocks=1)
SMALL = tuning.AttnTuning(
    fwd=tuning.Launch(rows=16, block_n=16),
    dq=tuning.Launch(rows=16, block_n=16),
    dkdv=tuning.Launch(rows=16, block_n=16, chunk=16),
)
SMALL_TOPN = tuning.TopNTuning(positions=16, block_n=16)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # Every buffer a kernel must fill starts as NaN: an unwritten element cannot pass.
    monkeypatch.setattr(
        triton_attn, "_empty",
        lambda *shape, like, dtype=None: torch.full(
            shape, float("nan"), device=like.device, dtype=like.dtype if dtype is None else dtype
        ),
    )  # fmt: skip


def _inputs(B, T, H, G, Dk, Dv, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=gen).to(dtype)
    k = torch.randn(B, T, G, Dk, generator=gen).to(dtype)
    v = torch.randn(B, T, G, Dv, generator=gen).to(dtype)
    gates = torch.rand(B, T, H, 3, generator=gen).to(dtype)
    do = torch.randn(B, T, H, Dv, generator=gen).to(dtype)
    return q, k, v, gates, do


def _maxdiff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _layouts(cfg, T, cu):
    layout = PackedLayout.build(T, None if cu is None else cu.tolist())
    return layout, CmpLayout.build(cfg, layout)


def _cmp(select, q, k, v, do, cfg, cu=None, **kw):
    """``(scores, dq, dk, dv)`` of one compressed-and-select call; grads through ``o_cmp``."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    layout, cl = _layouts(cfg, q.shape[1], cu)
    kc, vc = scoring.compress(k, cfg, cl), scoring.compress(v, cfg, cl)
    res = select(q, kc, vc, cfg, 1.0 / math.sqrt(q.shape[-1]), layout, cl, want_aux=True, **kw)
    return res, *torch.autograd.grad(res.o_cmp, (q, k, v), do)


CASES = [  # B, T, G, h, Dk, Dv, cu_seqlens
    (1, 100, 2, 4, 16, 16, None),
    (2, 70, 2, 1, 16, 8, None),
    (1, 90, 1, 2, 24, 16, [0, 40, 41, 45, 90]),  # a length-1 and a shorter-than-l sequence
    (1, 64, 1, 16, 16, 16, None),
    (1, 50, 2, 3, 16, 16, None),  # h not a power of two: padded head rows
]


@pytest.mark.parametrize(("B", "T", "G", "h", "Dk", "Dv", "cu"), CASES)
def test_cmp_branch_float32_matches_nsa_ref(B, T, G, h, Dk, Dv, cu):
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v, gates, do = _inputs(B, T, G * h, G, Dk, Dv, seed=T + h)
    got, dq, dk, dv = _cmp(cmp_triton.compressed_and_select, q, k, v, do, CFG, cu,
                           attn_tuning=SMALL, topn_tuning=SMALL_TOPN)
    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    _, ref = ref_nsa_attention(qr, kr, vr, gates, CFG, cu_seqlens=cu, return_aux=True)
    rdq, rdk, rdv = torch.autograd.grad(ref.o_cmp, (qr, kr, vr), do)
    assert _maxdiff(got.o_cmp, ref.o_cmp) <= FP32_OUT_ATOL
    assert _maxdiff(got.p_cmp, ref.p_cmp) <= FP32_OUT_ATOL
    assert _maxdiff(got.p_slc, ref.p_slc) <= FP32_OUT_ATOL * max(1.0, float(ref.p_slc.max()))
    for name, x, r in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert _maxdiff(x, r) <= FP32_GRAD_ATOL, name
    assert torch.equal(got.block_indices, ref.block_indices)
    layout, _ = _layouts(CFG, T, cu)
    empty = layout.pos < CFG.cmp_block - 1  # rows that see no compressed block: exact zeros
    assert torch.equal(got.o_cmp[:, empty], torch.zeros_like(got.o_cmp[:, empty]))


@pytest.mark.parametrize(("B", "T", "G", "h", "Dk", "Dv", "cu", "window"), [
    (1, 70, 2, 4, 16, 16, None, 8),
    (2, 40, 1, 2, 16, 24, None, 1),
    (1, 60, 2, 1, 16, 16, [0, 25, 26, 60], 100),  # window longer than every sequence
    (1, 48, 1, 16, 32, 16, None, 20),
])  # fmt: skip
def test_window_float32_matches_nsa_ref(B, T, G, h, Dk, Dv, cu, window):
    cfg = dataclasses.replace(CFG, window=window)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v, gates, do = _inputs(B, T, G * h, G, Dk, Dv, seed=window + T)
    qt, kt, vt = (t.detach().requires_grad_() for t in (q, k, v))
    layout, _ = _layouts(cfg, T, cu)
    scale = 1.0 / math.sqrt(Dk)
    o = triton_attn.window_attention(qt, kt, vt, window, scale, cu, max_seqlen=max(layout.lengths),
                                     tuning=SMALL)
    grads = torch.autograd.grad(o, (qt, kt, vt), do)
    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    _, ref = ref_nsa_attention(qr, kr, vr, gates, cfg, cu_seqlens=cu, return_aux=True)
    rgrads = torch.autograd.grad(ref.o_win, (qr, kr, vr), do)
    assert _maxdiff(o, ref.o_win) <= FP32_OUT_ATOL
    for x, r in zip(grads, rgrads, strict=True):
        assert _maxdiff(x, r) <= FP32_GRAD_ATOL


@pytest.mark.parametrize(("T", "G", "h", "Dk", "Dv", "cu"), [
    (96, 2, 4, 16, 16, None),
    (80, 1, 2, 32, 16, [0, 30, 31, 80]),
])  # fmt: skip
def test_bf16_low_precision_class(T, G, h, Dk, Dv, cu):
    """bf16 kernels within twice the error of the masked path in bf16 (float64 truth)."""
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v, _, do = _inputs(1, T, G * h, G, Dk, Dv, seed=T, dtype=torch.bfloat16)
    f64 = [t.double() for t in (q, k, v, do)]
    got = _cmp(cmp_triton.compressed_and_select, q, k, v, do, CFG, cu, attn_tuning=SMALL,
               topn_tuning=SMALL_TOPN)
    ref = _cmp(scoring.compressed_and_select, *f64, CFG, cu)
    low = _cmp(scoring.compressed_and_select, q, k, v, do, CFG, cu)
    pairs = [("o_cmp", got[0].o_cmp, ref[0].o_cmp, low[0].o_cmp, "out"),
             ("p_slc", got[0].p_slc, ref[0].p_slc, low[0].p_slc, "out")]
    pairs += [(n, got[i], ref[i], low[i], "grad") for i, n in ((1, "dq"), (2, "dk"), (3, "dv"))]
    # The window kernel on the same inputs: truth = the masked window path in float64,
    # naive_lowp = the window's plain-PyTorch twin in bf16 (`nsa_impl.kernels.naive`).
    layout, _ = _layouts(CFG, T, cu)
    scale = 1.0 / math.sqrt(Dk)

    def win(fn, q, k, v, do):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        o = fn(q, k, v)
        return (o, *torch.autograd.grad(o, (q, k, v), do))

    def path(name):
        return lambda q, k, v: sliding.window_attention(q, k, v, CFG, scale, layout, path=name,
                                                        cu_seqlens=cu)

    wg, wr = win(path("triton"), q, k, v, do), win(path("masked"), *f64)
    wl = win(lambda q, k, v: naive.window_attention_naive(q, k, v, CFG.window, scale, cu),
             q, k, v, do)
    pairs += [(f"win {n}", wg[i], wr[i], wl[i], "out" if i == 0 else "grad")
              for i, n in enumerate(("o", "dq", "dk", "dv"))]
    for name, x, r, n, kind in pairs:
        assert torch.isfinite(x).all(), name
        assert _maxdiff(x, r) <= lowp_bound(_maxdiff(n, r), kind), name


def _kernel_selection(q, k, cfg, cu=None):
    """``(block_indices, float32 scores)`` of the fused kernel on ``q`` and compressed ``k``.

    The float32 scores are the ones the kernel ranked (``Scores.p_slc`` is rounded to q's
    dtype, which can tie scores the kernel told apart).
    """
    B, T, H, D = q.shape
    layout, cl = _layouts(cfg, T, cu)
    kc = scoring.compress(k, cfg, cl)
    qs, ks = cmp_triton.boundaries(cfg, layout, B, q.device)
    q3, k3 = q.reshape(B * T, H, D), kc.reshape(-1, kc.shape[2], D)
    _, lse = triton_attn.cmp_attention(q3, k3, k3, qs, ks, max(layout.lengths), cfg.cmp_block,
                                       cfg.cmp_stride, tuning=SMALL)
    idx, sc = triton_topn.select_blocks(
        q3, k3, lse, qs, ks, max(layout.lengths), cmp_block=cfg.cmp_block,
        cmp_stride=cfg.cmp_stride, sel_block=cfg.sel_block, top_n=cfg.sel_top_n,
        init_blocks=cfg.sel_init_blocks, local_blocks=cfg.sel_local_blocks,
        num_scores=cfg.num_sel_blocks(T), tuning=SMALL_TOPN)
    G = k.shape[2]
    return idx.reshape(B, T, G, -1), sc.reshape(B, T, G, -1), layout


def _own_rule(idx, scores, layout, cfg):
    """`nsa_impl.scoring.top_n` applied to ``scores [B, T, G, S]``, as ``[B, T, G, n]``."""
    block = (layout.pos // cfg.sel_block).to(scores.device)
    return scoring.top_n(scores.permute(0, 2, 1, 3), block, cfg).permute(0, 2, 1, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("cfg", "T", "G", "h", "cu"), [
    (CFG, 120, 2, 4, None), (FLAT, 60, 1, 1, None), (CFG, 100, 1, 16, [0, 37, 100]),
])  # fmt: skip
def test_top_n_is_the_scoring_rule_on_its_own_scores(cfg, T, G, h, cu, dtype):
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, _, _, _ = _inputs(1, T, G * h, G, 16, 16, seed=h, dtype=dtype)
    idx, sc, layout = _kernel_selection(q, k, cfg, cu)
    assert torch.equal(idx, _own_rule(idx, sc, layout, cfg))


@pytest.mark.parametrize("cfg", [CFG, FLAT])
def test_top_n_ties_go_to_the_lower_index(cfg):
    """Zero queries: every visible compressed block is equally likely, interior blocks tie."""
    T, G, h = 100, 1, 2
    _, k, v, gates, _ = _inputs(1, T, G * h, G, 16, 16, seed=3)
    q = torch.zeros(1, T, G * h, 16)
    idx, sc, layout = _kernel_selection(q, k, cfg)
    _, ref = ref_nsa_attention(q, k, v, gates, cfg, return_aux=True)
    assert torch.equal(idx, ref.block_indices)
    assert torch.equal(idx, _own_rule(idx, sc, layout, cfg))


def test_dkdv_is_deterministic_and_splits_items():
    """The split dK/dV (several work items per key chunk) is bit-identical run to run; the
    atomic-dQ variant agrees within the fp32 class."""
    T, G, h = 100, 1, 4
    q, k, v, _, do = _inputs(1, T, G * h, G, 16, 16, seed=11)
    layout, cl = _layouts(CFG, T, None)
    kc, vc = scoring.compress(k, CFG, cl), scoring.compress(v, CFG, cl)
    qs, ks = cmp_triton.boundaries(CFG, layout, 1, q.device)
    leaves = [t.reshape(-1, t.shape[2], t.shape[3]).requires_grad_() for t in (q, kc, vc)]
    outs = []
    for _ in range(2):
        o, _ = triton_attn.cmp_attention(*leaves, qs, ks, T, CFG.cmp_block, CFG.cmp_stride,
                                         tuning=SMALL)
        outs.append(torch.autograd.grad(o, leaves, do.reshape(o.shape)))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    atomic = dataclasses.replace(SMALL, dq_atomic=True)  # dQ added by the dK/dV kernel
    o, _ = triton_attn.cmp_attention(*leaves, qs, ks, T, CFG.cmp_block, CFG.cmp_stride,
                                     tuning=atomic)
    for a, b in zip(torch.autograd.grad(o, leaves, do.reshape(o.shape)), outs[0], strict=True):
        assert _maxdiff(a, b) <= FP32_GRAD_ATOL
    kv = tuning.resolve(SMALL.dkdv, h, 16, 16, True)
    nit, _ = triton_attn._items(triton_attn.MODE_CMP, T, kc.shape[1], CFG.cmp_block, 1, 1, G,
                                kv, 32, 8)
    assert nit > 1  # the test exercises the partial buffers and the ordered reduction


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gate_combine(dtype):
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 9, 4, 20, generator=gen).to(dtype).requires_grad_() for _ in range(3)]
    g = torch.rand(2, 9, 4, 3, generator=gen).to(dtype).requires_grad_()
    do = torch.randn(2, 9, 4, 20, generator=gen).to(dtype)
    o = triton_gate.gate_combine(*xs, g, tuning=tuning.GateTuning(rows=16))
    grads = torch.autograd.grad(o, (*xs, g), do)
    ref = [t.detach().double().requires_grad_() for t in (*xs, g)]
    r = ref_gate(*ref)
    rgrads = torch.autograd.grad(r, ref, do.double())
    low = [t.detach().requires_grad_() for t in (*xs, g)]
    n = ref_gate(*low)
    ngrads = torch.autograd.grad(n, low, do)
    if dtype == torch.float32:
        assert _maxdiff(o, r) <= FP32_OUT_ATOL
        assert all(_maxdiff(a, b) <= FP32_GRAD_ATOL for a, b in zip(grads, rgrads, strict=True))
    else:
        assert _maxdiff(o, r) <= lowp_bound(_maxdiff(n, r))
        for a, b, c in zip(grads, rgrads, ngrads, strict=True):
            assert _maxdiff(a, b) <= lowp_bound(_maxdiff(c, b), "grad")
    with pytest.raises(ValueError, match="gates"):
        triton_gate.gate_combine(*xs, g[..., :2])


@pytest.fixture
def _forced_triton(monkeypatch):
    routing.reload_settings({"TRITON_INTERPRET": "1"})
    yield
    routing.reload_settings()


@pytest.mark.parametrize("cu", [None, [0, 30, 31, 80]])
def test_force_path_triton_runs_every_branch_on_cpu(_forced_triton, cu):
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v, gates, do = _inputs(1, 80, 4, 2, 16, 24, seed=5)
    leaves = [t.requires_grad_() for t in (q, k, v, gates)]
    with routing.force_path("triton"):
        plan = routing.explain(q, CFG, k=k, v=v, cu_seqlens=cu)
        o = nsa_impl.nsa_attention(*leaves, CFG, cu_seqlens=cu)
    assert plan.paths() == {"cmp": "triton", "sel": "triton", "win": "triton"}
    assert "profile: cpu" in str(plan)
    grads = torch.autograd.grad(o, leaves, do)
    ref = ref_nsa_attention(*leaves, CFG, cu_seqlens=cu)
    rgrads = torch.autograd.grad(ref, leaves, do)
    assert _maxdiff(o, ref) <= FP32_OUT_ATOL
    for a, b in zip(grads, rgrads, strict=True):
        assert _maxdiff(a, b) <= FP32_GRAD_ATOL


def test_cpu_tensors_never_choose_triton_unforced(_forced_triton):
    q, k, v, _, _ = _inputs(1, 64, 4, 2, 16, 16, seed=0)
    assert "triton" not in routing.explain(q, CFG, k=k, v=v).paths().values()


def test_profiles_load_and_resolve():
    for name in ("sm90", "sm89", "sm80", "cpu"):
        prof = tuning.load_profile(name)
        assert prof.name == name and isinstance(prof.cmp.fwd, tuning.Launch)
    assert not tuning.load_profile("sm89").route("sel_triton", True)  # Ada: selection stays off
    assert "triton" in tuning.load_profile("sm90").route("cmp", [])
    assert tuning.profile_name("cpu") == "cpu"
    tile = tuning.resolve(tuning.Launch(rows=128, block_n=64), h=16, dk=128, dv=128, ieee=False)
    assert (tile.P, tile.HP, tile.BM, tile.BN) == (8, 16, 128, 64)
    tile = tuning.resolve(tuning.Launch(rows=128, block_n=64), h=3, dk=192, dv=128, ieee=True)
    assert (tile.P, tile.HP, tile.BM, tile.BN) == (8, 4, 32, 32)
    with pytest.raises(ValueError, match="unknown kernel profile"):
        tuning.load_profile("sm70")
    with pytest.raises(ValueError, match="rows"):
        tuning.Launch(rows=96)
    with pytest.raises(ValueError, match="positions"):
        tuning.TopNTuning(positions=8)


def test_bad_inputs_raise():
    q = torch.randn(10, 4, 16)
    k = torch.randn(3, 2, 16)
    starts = torch.tensor([0, 10])
    with pytest.raises(ValueError, match="3-D"):
        triton_attn.cmp_attention(q[None], k, k, starts, torch.tensor([0, 3]), 10, 4, 4)
    with pytest.raises(ValueError, match="multiple"):
        triton_attn.cmp_attention(torch.randn(10, 3, 16), k, k, starts, torch.tensor([0, 3]),
                                  10, 4, 4)
    with pytest.raises(ValueError, match="divide"):
        triton_attn.cmp_attention(q, k, k, starts, torch.tensor([0, 3]), 10, 6, 4)
    with pytest.raises(TypeError, match="qstart"):
        triton_attn.cmp_attention(q, k, k, starts.float(), torch.tensor([0, 3]), 10, 4, 4)
    with pytest.raises(ValueError, match="window"):
        triton_attn.window_attention(q[None], k[None], k[None], 0)
    with pytest.raises(ValueError, match="lse"):
        triton_topn.select_blocks(q, k, torch.zeros(10, 4, dtype=torch.float64), starts,
                                  torch.tensor([0, 3]), 10, cmp_block=4, cmp_stride=4,
                                  sel_block=4, top_n=2, init_blocks=1, local_blocks=1)
