"""The FlashAttention-2 window wrapper (`nsa_impl.kernels.flash`) on a machine without a GPU.

FlashAttention itself needs CUDA (tests/gpu/test_flash_gpu.py runs it). Here the wrapper's own
logic is checked with a CPU stand-in for the kernel that implements FlashAttention's documented
semantics (causal, ``window_size = (left, right)``, packed ``cu_seqlens``, GQA): the translation
of ``w`` into ``left = w - 1``, zero padding for ``Dk != Dv``, the scale of the true ``Dk``, the
packing of batches, and the non-finite fallback. Oracle: `nsa_ref`'s window branch.
"""

from __future__ import annotations

import logging

import pytest
import torch

from nsa_impl.kernels import flash
from nsa_impl.tolerances import FP32_GRAD_ATOL, FP32_OUT_ATOL
from nsa_ref import NSAConfig, nsa_attention


def ref_window(q, k, v, window, scale, cu_seqlens=None):
    """The window branch of `nsa_ref` (gates select it alone: Eq. 5 with g = (0, 0, 1))."""
    B, T, H, _ = q.shape
    cfg = NSAConfig(cmp_block=8, cmp_stride=8, sel_block=8, sel_top_n=3, window=window)
    gates = torch.zeros(B, T, H, 3)
    gates[..., 2] = 1.0
    return nsa_attention(q, k, v, gates, cfg, scale=scale, cu_seqlens=cu_seqlens)


def fake_fa2(q, k, v, cu, max_len, left, scale):
    """CPU stand-in for FA-2 varlen: query p sees keys s of its sequence with p-left <= s <= p."""
    N, H, _ = q.shape
    h = H // k.shape[1]
    tok = torch.arange(N)
    seq = torch.searchsorted(cu[1:].long(), tok, right=True)
    d = tok[:, None] - tok[None, :]
    allowed = (seq[:, None] == seq[None, :]) & (d >= 0)
    if left >= 0:
        allowed &= d <= left
    kk, vv = k.repeat_interleave(h, dim=1), v.repeat_interleave(h, dim=1)
    logits = torch.einsum("nhd,shd->hns", q, kk) * scale
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hns,shd->nhd", probs, vv)


@pytest.fixture
def cpu_kernel(monkeypatch):
    """Run the wrapper on CPU tensors with `fake_fa2` as its kernel."""
    monkeypatch.setattr(flash, "supports", lambda q, k, v: (True, "test stand-in"))
    monkeypatch.setattr(flash, "_kernel", fake_fa2)


@pytest.mark.parametrize(
    "B,T,G,h,Dk,Dv,window,cu",
    [
        (2, 23, 2, 2, 24, 16, 5, None),  # Dk != Dv: padded to 24
        (1, 30, 1, 3, 16, 20, 1, [0, 7, 30]),  # w = 1: the diagonal only; Dv padded to 24
        (1, 19, 2, 1, 8, 8, 40, None),  # w > T: plain causal (left = -1)
    ],
)
def test_wrapper_translation(cpu_kernel, B, T, G, h, Dk, Dv, window, cu):
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(B, T, G * h, Dk, generator=gen, requires_grad=True)
    k = torch.randn(B, T, G, Dk, generator=gen, requires_grad=True)
    v = torch.randn(B, T, G, Dv, generator=gen, requires_grad=True)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    o = flash.window_attention(q, k, v, window, 0.4, cu)
    ref = ref_window(q, k, v, window, 0.4, cu)
    assert o.shape == (B, T, G * h, Dv)
    assert (o - ref).abs().max().item() <= FP32_OUT_ATOL
    do = torch.randn_like(o)
    got, want = torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= FP32_GRAD_ATOL


def test_nonfinite_output_falls_back_once(cpu_kernel, monkeypatch, caplog):
    """A NaN output from finite inputs is recomputed by the fallback, with one log line."""
    monkeypatch.setattr(flash, "_kernel", lambda q, *a: torch.full_like(q, float("nan")))
    monkeypatch.setattr(flash, "_WARNED", set())
    q = torch.randn(1, 9, 2, 16)
    k = torch.randn(1, 9, 1, 16)
    marker = torch.full((1, 9, 2, 16), 7.0)
    calls = []
    fb = lambda *args: calls.append(args) or marker  # noqa: E731
    with caplog.at_level(logging.WARNING, logger=flash.__name__):
        for _ in range(2):
            assert torch.equal(flash.window_attention(q, k, k, 4, 0.25, fallback=fb), marker)
    assert len(calls) == 2
    assert sum("not finite" in r.message for r in caplog.records) == 1
    # The default fallback is the library's masked window path and agrees with the oracle.
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    o = flash.window_attention(q, k, k, 4, 0.25, cu)
    assert (o - ref_window(q, k, k, 4, 0.25, cu)).abs().max().item() <= FP32_OUT_ATOL


def test_supports_on_cpu():
    q = torch.zeros(1, 4, 2, 16, dtype=torch.bfloat16)
    k = torch.zeros(1, 4, 1, 16, dtype=torch.bfloat16)
    ok, why = flash.supports(q, k, k)
    assert not ok and "CUDA" in why
    if not torch.cuda.is_available():
        assert flash.available() == (False, "no CUDA GPU")
    with pytest.raises(ValueError, match="cannot run"):
        flash.window_attention(q, k, k, 4)
