"""Triton selection kernels on CPU tensors (Triton's interpreter) against `nsa_ref`.

Forward and backward parity in float32 at the fp32 tolerance class (spec I.10) on tiny shapes:
group sizes 1/2/4, ``Dk != Dv``, ``-1`` padding, repeated and unsorted indices, blocks after the
query, packed sequences (``cu_seqlens``), empty selections; plus determinism, the
``NSA_TRITON_SEL_FORCE`` route through `nsa_impl.nsa_attention`, and `supports`.

TRITON_INTERPRET: ``triton.jit`` chooses compiled or interpreted code when a function is
*decorated*, which usually forces tests to set the variable before the kernel module is first
imported. `nsa_impl.kernels.triton_sel` avoids that trap: it executes its kernel file lazily,
once per mode, and sends CPU tensors to the interpreted copy whatever the environment said at
import time. The variable still matters to `supports` (CPU tensors are declined without it)
and to the router's settings, so the autouse fixture below sets it for every test here and
re-reads the routing settings around the routing test.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: the Triton kernels cannot run", allow_module_level=True)

from nsa_impl.kernels import triton_sel  # noqa: E402
from nsa_impl.tolerances import FP32_GRAD_ATOL, FP32_OUT_ATOL  # noqa: E402
from nsa_ref import NSAConfig, rules  # noqa: E402
from nsa_ref import nsa_attention as ref_nsa_attention  # noqa: E402

pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_sel, "POISON_OUTPUTS", True)  # unwritten outputs read as NaN


def _sel_cfg(sel_block: int) -> NSAConfig:
    """A valid config whose only field the selection rules read is ``sel_block``."""
    s = sel_block
    return NSAConfig(cmp_block=s, cmp_stride=s, sel_block=s, window=s)


def ref_selection(q, k, v, idx, sel_block, scale, cu_seqlens=None):
    """Selection attention row by row from `nsa_ref.rules` (selected_keys + attend).

    ``selected_keys`` treats the indices as a set and drops keys after ``p``, so this oracle
    accepts exactly the inputs the kernel does (``-1``, repeats, unsorted, late blocks).
    """
    B, T, H, _ = q.shape
    G = k.shape[2]
    h = H // G
    cfg = _sel_cfg(sel_block)
    bounds = [0, T] if cu_seqlens is None else [int(c) for c in cu_seqlens.tolist()]
    out = []
    for b in range(B):
        rows = []
        for s0, s1 in zip(bounds, bounds[1:], strict=False):
            for p in range(s1 - s0):
                heads = []
                for g in range(G):
                    keys = rules.selected_keys(idx[b, s0 + p, g].tolist(), p, cfg)
                    kk = torch.tensor(keys, dtype=torch.long) + s0
                    kg = k[b, kk, g].unsqueeze(1).expand(-1, h, -1)
                    vg = v[b, kk, g].unsqueeze(1).expand(-1, h, -1)
                    heads.append(rules.attend(q[b, s0 + p, g * h:(g + 1) * h], kg, vg, scale)[0])
                rows.append(torch.cat(heads))
        out.append(torch.stack(rows))
    return torch.stack(out)


def _inputs(B, T, G, h, Dk, Dv, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, G * h, Dk, generator=gen)
    k = torch.randn(B, T, G, Dk, generator=gen)
    v = torch.randn(B, T, G, Dv, generator=gen)
    return [t.requires_grad_() for t in (q, k, v)], gen


def _messy_indices(B, T, G, n, sel_block, gen):
    """Random indices in ``[-1, ceil(T/l'))``: padding, repeats, unsorted, blocks after p."""
    return torch.randint(-1, -(-T // sel_block), (B, T, G, n), generator=gen)


def _max_err(a, b):
    return (a - b).abs().max().item()


def _check_parity(q, k, v, idx, sel_block, scale, cu=None, seed=0):
    o = triton_sel.selection_attention(q, k, v, idx, sel_block, scale, cu)
    ref = ref_selection(q, k, v, idx, sel_block, scale, cu)
    assert torch.isfinite(o).all()
    assert _max_err(o, ref) <= FP32_OUT_ATOL, f"forward error {_max_err(o, ref):.3g}"
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + 1))
    got = torch.autograd.grad(o, (q, k, v), do)
    want = torch.autograd.grad(ref, (q, k, v), do)
    for name, a, b in zip("qkv", got, want, strict=False):
        assert torch.isfinite(a).all(), f"d{name} has NaN/Inf (an unwritten element?)"
        assert _max_err(a, b) <= FP32_GRAD_ATOL, f"d{name} error {_max_err(a, b):.3g}"
    return o, got


# B, T, G, h, Dk, Dv, n, l', cu_seqlens
CASES = {
    "h2-dk32-dv16": (1, 40, 2, 2, 32, 16, 3, 16, None),
    "h1-batch2-dv32": (2, 70, 1, 1, 16, 32, 4, 16, None),
    "h4-l32-varlen": (1, 100, 2, 4, 32, 16, 3, 32, [0, 37, 100]),
    "h2-varlen-len1": (1, 130, 1, 2, 16, 16, 2, 32, [0, 1, 65, 130]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_messy_indices(case):
    """Forward/backward vs the rules oracle on random indices (padding, repeats, late blocks)."""
    B, T, G, h, Dk, Dv, n, sel, cu = CASES[case]
    (q, k, v), gen = _inputs(B, T, G, h, Dk, Dv, seed=len(case))
    idx = _messy_indices(B, T, G, n, sel, gen)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    _check_parity(q, k, v, idx, sel, 0.3, cu)


def test_parity_with_reference_selection():
    """Indices chosen by `nsa_ref` (gates = selection only): kernel output equals ref ``o``."""
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=16, sel_top_n=3, window=16)
    B, T, G, h, Dk, Dv = 1, 64, 2, 2, 32, 16
    (q, k, v), _ = _inputs(B, T, G, h, Dk, Dv, seed=7)
    gates = torch.zeros(B, T, G * h, 3)
    gates[..., 1] = 1.0
    o_ref, aux = ref_nsa_attention(q, k, v, gates, cfg, return_aux=True)
    scale = 1.0 / math.sqrt(Dk)
    o = triton_sel.selection_attention(q, k, v, aux.block_indices, cfg.sel_block, scale)
    assert _max_err(o, o_ref) <= FP32_OUT_ATOL
    do = torch.randn_like(o)
    for name, a, b in zip("qkv", torch.autograd.grad(o, (q, k, v), do),
                          torch.autograd.grad(o_ref, (q, k, v), do), strict=False):
        assert _max_err(a, b) <= FP32_GRAD_ATOL, f"d{name}"


def test_duplicates_never_double_count():
    """Repeating every index (and shuffling) gives bit-identical outputs and gradients."""
    B, T, G, h, sel = 1, 48, 1, 4, 16
    (q, k, v), gen = _inputs(B, T, G, h, 16, 16, seed=3)
    idx = torch.randint(0, 3, (B, T, G, 2), generator=gen)
    noisy = torch.cat([idx, idx.flip(-1), torch.full_like(idx, -1)], dim=-1)  # [.., 6]
    o1 = triton_sel.selection_attention(q, k, v, idx, sel, 0.25)
    o2 = triton_sel.selection_attention(q, k, v, noisy, sel, 0.25)
    assert torch.equal(o1, o2)
    do = torch.randn_like(o1)
    got1, got2 = torch.autograd.grad(o1, (q, k, v), do), torch.autograd.grad(o2, (q, k, v), do)
    for a, b in zip(got1, got2, strict=True):
        assert torch.equal(a, b)


def test_empty_selection_is_exact_zero():
    """Rows selecting nothing (all -1, or only blocks after p) give exact 0 and finite grads."""
    B, T, G, h, sel = 1, 40, 2, 2, 16
    (q, k, v), gen = _inputs(B, T, G, h, 16, 32, seed=5)
    idx = torch.randint(0, 3, (B, T, G, 2), generator=gen)
    idx[0, :10] = -1  # nothing selected
    idx[0, 10:16] = 2  # block 2 starts at 32 > p: nothing visible
    o = triton_sel.selection_attention(q, k, v, idx, sel, 0.25)
    assert torch.equal(o[0, :16], torch.zeros_like(o[0, :16]))
    do = torch.randn_like(o)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    assert torch.equal(dq[0, :16], torch.zeros_like(dq[0, :16]))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    ref = ref_selection(q, k, v, idx, sel, 0.25)
    assert _max_err(o, ref) <= FP32_OUT_ATOL


def test_backward_is_deterministic():
    """Two backward passes are bit-identical (no atomics; fixed reduction order)."""
    (q, k, v), gen = _inputs(1, 64, 1, 2, 16, 16, seed=11)
    idx = _messy_indices(1, 64, 1, 3, 16, gen)
    do = torch.randn(1, 64, 2, 16, generator=gen)
    grads = [
        torch.autograd.grad(triton_sel.selection_attention(q, k, v, idx, 16, 0.25), (q, k, v), do)
        for _ in range(2)
    ]
    for a, b in zip(*grads, strict=False):
        assert torch.equal(a, b)


def test_force_route_through_nsa_attention(monkeypatch):
    """NSA_TRITON_SEL_FORCE=1 + TRITON_INTERPRET=1 route selection through the kernels."""
    import nsa_impl
    from nsa_impl import routing

    monkeypatch.setenv("NSA_TRITON_SEL_FORCE", "1")
    routing.reload_settings()
    try:
        cfg = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=16, sel_top_n=3, window=24)
        B, T, G, h, Dk, Dv = 1, 70, 2, 2, 16, 16
        (q, k, v), gen = _inputs(B, T, G, h, Dk, Dv, seed=13)
        gates = torch.rand(B, T, G * h, 3, generator=gen)
        q_ = torch.zeros_like(q)
        assert routing.route(q_, k.detach(), v.detach(), backward=True).paths()["sel"] == "triton"
        calls = []
        real = triton_sel.selection_attention
        monkeypatch.setattr(
            triton_sel, "selection_attention",
            lambda *a, **kw: calls.append(1) or real(*a, **kw),
        )
        o = nsa_impl.nsa_attention(q, k, v, gates, cfg)
        assert calls, "selection did not go through the Triton kernels"
        o_ref = ref_nsa_attention(q, k, v, gates, cfg)
        assert _max_err(o, o_ref) <= FP32_OUT_ATOL
        do = torch.randn_like(o)
        for name, a, b in zip("qkv", torch.autograd.grad(o, (q, k, v), do),
                              torch.autograd.grad(o_ref, (q, k, v), do), strict=False):
            assert _max_err(a, b) <= FP32_GRAD_ATOL, f"d{name}"
    finally:
        monkeypatch.delenv("NSA_TRITON_SEL_FORCE")
        routing.reload_settings()


def test_supports_reasons(monkeypatch):
    """`supports` declines with a reason, never raises."""
    q = torch.zeros(1, 4, 2, 16)
    k = torch.zeros(1, 4, 1, 16)
    v = torch.zeros(1, 4, 1, 16)
    assert triton_sel.supports(q, k, v)[0]
    ok, why = triton_sel.supports(q.double(), k.double(), v.double())
    assert not ok and "dtype" in why
    ok, why = triton_sel.supports(q[..., :8], k[..., :8], v)
    assert not ok and "Dk=8" in why
    ok, why = triton_sel.supports(q, k, torch.zeros(1, 4, 1, 512))
    assert not ok and "Dv=512" in why
    ok, why = triton_sel.supports(q, k, v.half())
    assert not ok and "differ" in why
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = triton_sel.supports(q, k, v)
    assert not ok and "TRITON_INTERPRET" in why
    assert triton_sel.long_enough(triton_sel.SEL_TRITON_MIN_L)
    assert not triton_sel.long_enough(triton_sel.SEL_TRITON_MIN_L - 1)


def test_bad_shapes_raise():
    q = torch.zeros(1, 4, 3, 16)
    k = torch.zeros(1, 4, 2, 16)
    with pytest.raises(ValueError, match="multiple"):
        triton_sel.selection_attention(q, k, k, torch.zeros(1, 4, 2, 1, dtype=torch.long), 16)
