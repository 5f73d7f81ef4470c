"""nsa_impl.kernels.triton_gate: the fused gate combine of Eq. 5, forward and backward (CPU
tensors in Triton's interpreter; routed on the triton path, tests/test_dispatch.py)."""

from __future__ import annotations

import pytest
import torch

from nsa_impl.kernels import ops, tuning
from nsa_impl.tolerances import FP32_GRAD_ATOL, FP32_OUT_ATOL, lowp_bound
from nsa_ref.reference import gate as ref_gate

from ..helpers import err

pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run")

from nsa_impl.kernels import triton_gate  # noqa: E402

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gate_combine(dtype):
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 9, 4, 20, generator=gen).to(dtype).requires_grad_() for _ in range(3)]
    g = torch.rand(2, 9, 4, 3, generator=gen).to(dtype).requires_grad_()
    do = torch.randn(2, 9, 4, 20, generator=gen).to(dtype)
    with ops.tuning(poison_outputs=True):
        o = triton_gate.gate_combine(*xs, g, tuning=tuning.GateTuning(rows=16))
        grads = torch.autograd.grad(o, (*xs, g), do)
    ref = [t.detach().double().requires_grad_() for t in (*xs, g)]
    r = ref_gate(*ref)
    rgrads = torch.autograd.grad(r, ref, do.double())
    low = [t.detach().requires_grad_() for t in (*xs, g)]
    n = ref_gate(*low)
    ngrads = torch.autograd.grad(n, low, do)
    if dtype == torch.float32:
        assert err(o, r) <= FP32_OUT_ATOL
        assert all(err(a, b) <= FP32_GRAD_ATOL for a, b in zip(grads, rgrads, strict=True))
    else:
        assert err(o, r) <= lowp_bound(err(n, r))
        for a, b, c in zip(grads, rgrads, ngrads, strict=True):
            assert err(a, b) <= lowp_bound(err(c, b), "grad")
    with pytest.raises(ValueError, match="gates"):
        triton_gate.gate_combine(*xs, g[..., :2])


def test_a_nan_stays_in_its_row():
    xs = [torch.randn(1, 6, 2, 8) for _ in range(3)]
    g = torch.rand(1, 6, 2, 3)
    xs[1][0, 2, 1, 3] = float("nan")
    o = triton_gate.gate_combine(*xs, g, tuning=tuning.GateTuning(rows=16))
    assert torch.isnan(o[0, 2, 1]).any()
    keep = torch.ones(6, 2, dtype=torch.bool)
    keep[2, 1] = False
    assert torch.equal(o[0][keep], ref_gate(*xs, g)[0][keep].to(o.dtype)) or (
        err(o[0][keep], ref_gate(*xs, g)[0][keep]) <= FP32_OUT_ATOL
    )
