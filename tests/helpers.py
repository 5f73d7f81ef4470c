"""Shared helpers of the unit tests: inputs, errors, the two oracles, GPU-path stand-ins.

The oracles are the project's two: `nsa_ref` (the reference, row by row) and the dense-mask
formulation `conformance.dense` (given block indices, any dtype: also the ``naive_lowp`` of the
low-precision criterion, spec I.10). Nothing here re-implements attention.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import nsa_impl
from conformance import dense
from nsa_impl import dispatch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def inputs(B, T, G, h, Dk, Dv, *, seed=0, dtype=torch.float32, grad=False, device="cpu"):
    """``[q, k, v, gates]`` drawn in float64 from ``seed``, then cast (and moved)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, G * h, Dk, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, G, Dk, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, G, Dv, generator=gen, dtype=torch.float64)
    gates = torch.rand(B, T, G * h, 3, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (q, k, v, gates)]


def err(a, b) -> float:
    """``max |a - b|`` in float64 (0 for empty tensors); ``inf`` when ``a`` is not finite."""
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double().to(a.device)
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - b).abs().max())


def plan_of(q, k, v, cfg, cu_seqlens=None, **kw):
    """`nsa_impl.plan` for these tensors."""
    return nsa_impl.plan(q.shape, cfg, kv_heads=k.shape[2], v_head_dim=v.shape[-1],
                         cu_seqlens=cu_seqlens, device=q.device, dtype=q.dtype, **kw)  # fmt: skip


def dense_o_sel(q, k, v, block_indices, cfg, scale, cu_seqlens=None):
    """The selection branch given block indices, by the dense oracle (differentiable)."""
    gates = q.new_zeros(*q.shape[:3], 3)
    out = dense.nsa_dense(q, k, v, gates, cfg, scale=scale, cu_seqlens=cu_seqlens,
                          block_indices=block_indices)  # fmt: skip
    return out.o_sel


def grads(fn, tensors, weight):
    """``(fn(*tensors), *d sum(fn * weight) / d tensors)`` on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad((out * weight.to(out)).sum(), leaves))


@pytest.fixture
def cpu_gpu_paths(monkeypatch):
    """The "flash" and "triton" declarations widened to CPU tensors (Triton's interpreter,
    FlashAttention's function in dense PyTorch), so their glue runs without a GPU."""
    flash = dispatch.PATHS["flash"]
    monkeypatch.setitem(
        dispatch.PATHS,
        "flash",
        dataclasses.replace(
            flash,
            devices=frozenset({"cpu", "cuda"}),
            dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
            probe=None,
            supports={"cmp": flash.supports["cmp"]},  # the window kernel's own check is CUDA's
        ),
    )
    triton = dispatch.PATHS["triton"]
    monkeypatch.setitem(
        dispatch.PATHS,
        "triton",
        dataclasses.replace(triton, devices=frozenset({"cpu", "cuda"}), probe=None),
    )
    pytest.importorskip("triton", reason="triton is not installed")
