"""Triton selection kernels on a CUDA GPU: parity per dtype, long-T index bounds, determinism.

Every test skips with a reason where no CUDA GPU (or no triton) is present. Tolerances are the
classes of spec I.10 from `nsa_impl.tolerances`: float32 kernels against a float64 reference at
the fp32 bounds, fp16/bf16 kernels by the low-precision criterion against the naive same-dtype
twin (`nsa_impl.kernels.naive`).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from nsa_impl.tolerances import FP32_GRAD_ATOL, FP32_OUT_ATOL, lowp_bound

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

DEV = "cuda"


def _ts():
    from nsa_impl.kernels import triton_sel

    return triton_sel


def random_indices(B, T, G, n, sel, gen):
    from nsa_impl.kernels.naive import random_block_indices

    return random_block_indices(B, T, G, n, sel, generator=gen, device=DEV)


def _inputs(B, T, G, h, Dk, Dv, dtype, seed):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, T, G * h, Dk, device=DEV, generator=gen).to(dtype)
    k = torch.randn(B, T, G, Dk, device=DEV, generator=gen).to(dtype)
    v = torch.randn(B, T, G, Dv, device=DEV, generator=gen).to(dtype)
    return q, k, v, gen


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    return (o.detach(), *torch.autograd.grad(o, (q, k, v), do))


# name: (B, T, G, h, Dk, Dv, n, l', cu_seqlens)
SHAPES = {
    "h16-128": (1, 1536, 2, 16, 128, 128, 16, 64, None),
    "h4-192-128": (1, 1300, 4, 4, 192, 128, 8, 64, [0, 300, 1037, 1300]),
    "h1-64": (2, 777, 2, 1, 64, 64, 6, 32, None),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_parity_per_dtype(shape, dtype):
    """Outputs and q/k/v gradients vs a float64 reference (spec I.10 classes)."""
    from nsa_impl.kernels.naive import selection_attention_naive as naive

    ts = _ts()
    B, T, G, h, Dk, Dv, n, sel, cu = SHAPES[shape]
    q, k, v, gen = _inputs(B, T, G, h, Dk, Dv, dtype, seed=list(SHAPES).index(shape))
    ok, why = ts.supports(q, k, v)
    assert ok, why
    idx = random_indices(B, T, G, n, sel, gen)
    idx[..., -1] = idx[..., 0]  # a repeated block must not count twice
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    scale = 1.0 / math.sqrt(Dk)
    do = torch.randn(B, T, G * h, Dv, device=DEV, generator=gen).to(dtype)
    ref = _grads(lambda a, b, c: naive(a, b, c, idx, sel, scale, cu), q.double(), k.double(),
                 v.double(), do.double())
    ts.POISON_OUTPUTS = True
    try:
        kernel = lambda a, b, c: ts.selection_attention(a, b, c, idx, sel, scale, cu)  # noqa: E731
        got = _grads(kernel, q, k, v, do)
    finally:
        ts.POISON_OUTPUTS = False
    if dtype == torch.float32:
        bounds = [FP32_OUT_ATOL] + [FP32_GRAD_ATOL] * 3
    else:
        low = _grads(lambda a, b, c: naive(a, b, c, idx, sel, scale, cu), q, k, v, do)
        bounds = [
            lowp_bound((x.double() - r).abs().max().item(), "out" if i == 0 else "grad")
            for i, (x, r) in enumerate(zip(low, ref, strict=False))
        ]
    for name, x, r, bound in zip(("o", "dq", "dk", "dv"), got, ref, bounds, strict=False):
        assert torch.isfinite(x).all(), f"{name} has NaN/Inf"
        err = (x.double() - r).abs().max().item()
        print(f"{shape} {dtype} {name}: err {err:.3g} bound {bound:.3g}")
        assert err <= bound, f"{name}: {err:.3g} > {bound:.3g}"


def _row_oracle(q, k, v, idx, rows, sel, scale, dtype=torch.float64, seq_start=0):
    """Plain selection attention in ``dtype`` for the given global rows of one sequence (B = 1).

    float64: the reference; the inputs' own dtype: the naive same-dtype twin of spec I.10.
    """
    G = k.shape[2]
    h = q.shape[2] // G
    out = []
    for p in rows:
        heads = []
        for g in range(G):
            blocks = sorted({int(j) for j in idx[0, p, g].tolist() if j >= 0})
            local = p - seq_start
            keys = [s for j in blocks for s in range(j * sel, min((j + 1) * sel, local + 1))]
            kk = torch.tensor(keys, device=q.device, dtype=torch.long) + seq_start
            qs = q[0, p, g * h:(g + 1) * h].to(dtype)
            if not keys:
                heads.append(torch.zeros(h, v.shape[-1], device=q.device, dtype=dtype))
                continue
            logits = qs @ k[0, kk, g].to(dtype).T * scale
            heads.append(torch.softmax(logits, -1) @ v[0, kk, g].to(dtype))
        out.append(torch.cat(heads))
    return torch.stack(out)


@pytest.mark.parametrize(
    "T,G,h,Dk,Dv",
    [(65536, 2, 4, 64, 64), (131072, 4, 16, 256, 256)],
    ids=["T64k", "T128k-int64-offsets"],
)
def test_long_sequence_index_bounds(T, G, h, Dk, Dv):
    """Long T: sampled rows (the last ones included) meet the low-precision criterion.

    The 128k case has ``T * H * Dk = 2^31`` elements in q: any int32 row offset would overflow.
    """
    ts = _ts()
    free, _ = torch.cuda.mem_get_info()
    need = T * G * h * Dk * 2 * 4 + T * G * (Dk + Dv) * 2 * 4
    if free < need * 2:
        pytest.skip(f"needs ~{2 * need / 2**30:.1f} GiB free GPU memory, {free / 2**30:.1f} free")
    q, k, v, gen = _inputs(1, T, G, h, Dk, Dv, torch.bfloat16, seed=T % 97)
    sel, n = 64, 16
    idx = random_indices(1, T, G, n, sel, gen)
    scale = 1.0 / math.sqrt(Dk)
    q.requires_grad_()
    o = ts.selection_attention(q, k, v, idx, sel, scale)
    rows = [0, 1, 63, 64, 4097, T // 2 + 5, T - 65, T - 2, T - 1]
    ref = _row_oracle(q.detach(), k, v, idx, rows, sel, scale)
    low = _row_oracle(q.detach(), k, v, idx, rows, sel, scale, dtype=q.dtype)
    err = (o[0, rows].double() - ref).abs().max().item()
    bound = lowp_bound((low.double() - ref).abs().max().item(), "out")
    print(f"T={T}: sampled-row error {err:.3g} bound {bound:.3g}")
    assert err <= bound
    # Backward: a gradient on the last row only reaches q at that row and its selected keys.
    do = torch.zeros_like(o)
    do[0, -1] = 1.0
    (dq,) = torch.autograd.grad(o, (q,), do)
    assert torch.isfinite(dq).all()
    assert dq[0, :-1].abs().max().item() == 0.0
    assert dq[0, -1].abs().max().item() > 0.0


def test_backward_deterministic_on_gpu():
    """Two backward passes are bit-identical (no atomics)."""
    ts = _ts()
    q, k, v, gen = _inputs(1, 4096, 2, 8, 128, 128, torch.bfloat16, seed=1)
    idx = random_indices(1, 4096, 2, 16, 64, gen)
    do = torch.randn(1, 4096, 16, 128, device=DEV, generator=gen).to(torch.bfloat16)
    g1 = _grads(lambda a, b, c: ts.selection_attention(a, b, c, idx, 64), q, k, v, do)
    g2 = _grads(lambda a, b, c: ts.selection_attention(a, b, c, idx, 64), q, k, v, do)
    for a, b in zip(g1, g2, strict=False):
        assert torch.equal(a, b)
