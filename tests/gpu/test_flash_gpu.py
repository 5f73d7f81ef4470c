"""FlashAttention-2 window path on a CUDA GPU: parity (fp16/bf16), GQA, Dk != Dv, varlen.

Skips with a reason where no CUDA GPU or no FlashAttention kernel is present. Criterion: the
low-precision class of spec I.10 against a float64 reference, with the naive same-dtype twin
(`nsa_impl.kernels.naive.window_attention_naive`) as ``naive_lowp``.
"""

from __future__ import annotations

import math

import pytest
import torch

from nsa_impl.tolerances import lowp_bound

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


def _flash():
    from nsa_impl.kernels import flash

    ok, why = flash.available()
    if not ok:
        pytest.skip(f"no FlashAttention kernel: {why}")
    return flash


def _run(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    return (o.detach(), *torch.autograd.grad(o, (q, k, v), do))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "B,T,G,h,Dk,Dv,window,cu",
    [
        (2, 1000, 2, 8, 128, 128, 512, None),
        (1, 1500, 4, 4, 192, 128, 256, [0, 200, 1111, 1500]),
        (1, 300, 1, 2, 64, 64, 1, None),
        (1, 700, 2, 2, 64, 64, 5000, [0, 350, 700]),
    ],
)
def test_window_parity(dtype, B, T, G, h, Dk, Dv, window, cu):
    from nsa_impl.kernels.naive import window_attention_naive as naive

    flash = _flash()
    gen = torch.Generator(device=DEV).manual_seed(T + window)
    q = torch.randn(B, T, G * h, Dk, device=DEV, generator=gen).to(dtype)
    k = torch.randn(B, T, G, Dk, device=DEV, generator=gen).to(dtype)
    v = torch.randn(B, T, G, Dv, device=DEV, generator=gen).to(dtype)
    do = torch.randn(B, T, G * h, Dv, device=DEV, generator=gen).to(dtype)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    scale = 1.0 / math.sqrt(Dk)
    assert flash.supports(q, k, v)[0]
    got = _run(lambda a, b, c: flash.window_attention(a, b, c, window, scale, cu), q, k, v, do)
    ref = _run(lambda a, b, c: naive(a, b, c, window, scale, cu), q.double(), k.double(),
               v.double(), do.double())
    low = _run(lambda a, b, c: naive(a, b, c, window, scale, cu), q, k, v, do)
    for i, (name, x, r, n) in enumerate(zip(("o", "dq", "dk", "dv"), got, ref, low, strict=False)):
        bound = lowp_bound((n.double() - r).abs().max().item(), "out" if i == 0 else "grad")
        err = (x.double() - r).abs().max().item()
        print(f"window {dtype} T={T} w={window} {name}: err {err:.3g} bound {bound:.3g}")
        assert torch.isfinite(x).all()
        assert err <= bound, f"{name}: {err:.3g} > {bound:.3g}"
