"""nsa_impl.numerics: the precision rule (the dtype attention is computed in)."""

from __future__ import annotations

import torch

from nsa_impl import branches
from nsa_impl.numerics import compute_dtype, product_dtype


def test_compute_and_product_dtypes():
    assert compute_dtype(torch.bfloat16) == torch.float32
    assert compute_dtype(torch.float16) == torch.float32
    assert compute_dtype(torch.float32) == torch.float64
    assert compute_dtype(torch.float64) == torch.float64
    for device in ("cpu", "cuda", "meta"):
        assert product_dtype(torch.float32, device) == torch.float64
        assert product_dtype(torch.float64, device) == torch.float64
    # half precision: tensor cores on CUDA; float32 where there are none (the CPU)
    assert product_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert product_dtype(torch.float16, torch.device("cuda", 0)) == torch.float16
    assert product_dtype(torch.bfloat16, "cpu") == torch.float32
    assert product_dtype(torch.float16, torch.device("cpu")) == torch.float32


def test_low_precision_softmax_runs_in_float32():
    seen = []
    q = torch.randn(1, 9, 2, 4, dtype=torch.bfloat16)
    k = torch.randn(1, 9, 1, 4, dtype=torch.bfloat16)
    lo = torch.clamp(torch.arange(9) - 2, min=0)
    branches.chunk_forward(q, k, k, lo, torch.arange(1, 10), [(0, 9, 0, 9)], 0.5,
                           on_probs=lambda r0, r1, s0, p: seen.append(p.dtype))  # fmt: skip
    assert seen == [torch.float32]


def test_cpu_half_precision_products_run_in_float32(monkeypatch):
    """Every torch path's matrix products on a CPU see float32 (or wider) operands for bfloat16
    inputs (the masked chunk loops, the packed and varlen buckets' SDPA); the output and the
    aux fields come back in bfloat16."""
    import nsa_impl
    import nsa_ref
    from nsa_impl import dispatch

    seen = set()
    real_mm, real_sdpa = torch.matmul, torch.nn.functional.scaled_dot_product_attention

    def mm(a, b, *args, **kw):
        seen.add(a.dtype)
        return real_mm(a, b, *args, **kw)

    def sdpa(q, *args, **kw):
        seen.add(q.dtype)
        return real_sdpa(q, *args, **kw)

    monkeypatch.setattr(torch, "matmul", mm)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    cfg = nsa_ref.NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=5)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, g, 8, generator=gen).bfloat16() for g in (4, 2, 2))
    gates = torch.rand(1, 40, 4, 3, generator=gen).bfloat16()
    for path in ("masked", "packed", "varlen"):
        with dispatch.force_path(path):
            o, aux = nsa_impl.nsa_attention(q, k, v, gates, cfg, return_aux=True)
        assert o.dtype == aux.o_cmp.dtype == aux.o_sel.dtype == aux.p_slc.dtype == torch.bfloat16
    assert torch.bfloat16 not in seen


def test_work_dtype_and_the_gate_round_once():
    from nsa_impl.numerics import work_dtype
    from nsa_ref.reference import gate

    assert work_dtype(torch.bfloat16, "cpu") == torch.float32
    assert work_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert work_dtype(torch.float32, "cpu") == torch.float32  # float32 keeps its own dtype
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 7, 3, 5, generator=gen).bfloat16() for _ in range(3)]
    g = torch.rand(2, 7, 3, 3, generator=gen).bfloat16()
    wide = [t.float() for t in (*xs, g)]
    once = (wide[3][..., 0:1] * wide[0] + wide[3][..., 1:2] * wide[1]
            + wide[3][..., 2:3] * wide[2]).bfloat16()  # fmt: skip
    assert torch.equal(gate(*xs, g), once)  # half precision: float32, one rounding


def test_shared_inputs_are_cast_once_so_their_gradients_meet_in_float32():
    """On the CPU a bfloat16 v read by three branches gets one float32 gradient, rounded once:
    equal to the float32 computation's gradient rounded (the masked paths, float64 inside)."""
    import nsa_impl
    import nsa_ref
    from nsa_impl import dispatch

    cfg = nsa_ref.NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=5)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 30, g, 8, generator=gen).bfloat16() for g in (4, 2, 2))
    gates = torch.rand(1, 30, 4, 3, generator=gen).bfloat16()
    w = torch.randn(1, 30, 4, 8, generator=gen)
    with dispatch.force_path("masked"):
        half = [t.clone().requires_grad_() for t in (q, k, v, gates)]
        o = nsa_impl.nsa_attention(*half, cfg)
        grads = torch.autograd.grad((o.float() * w).sum(), half)
        full = [t.float().requires_grad_() for t in (q, k, v, gates)]
        o32 = nsa_impl.nsa_attention(*full, cfg)
        grads32 = torch.autograd.grad((o32.bfloat16().float() * w).sum(), full)
    assert torch.equal(o, o32.bfloat16())
    for a, b in zip(grads, grads32, strict=True):
        assert torch.equal(a, b.bfloat16())
