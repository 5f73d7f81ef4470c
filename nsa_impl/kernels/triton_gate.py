"""The gate combine of Eq. 5 fused into one Triton kernel each way.

``gate_combine(o_cmp, o_sel, o_win, gates) -> o``: ``o = g_cmp * o_cmp + g_sel * o_sel + g_win *
o_win`` per query head, the contract of `nsa_ref.reference.gate`, differentiable in all four.
PyTorch runs it as five elementwise passes over ``[B, T, H, Dv]`` (three products, two sums,
each a full read and write: ~12 GiB of traffic at T=64k, H=64, Dv=128, bf16) and its backward
as about as many again; the fused forward reads the three outputs and the gates once and
writes ``o`` once (4 GiB), the backward reads ``dO``, the three outputs and the gates once and
writes the four gradients once (7 GiB). Products are summed in float32 and rounded once (the
reference rounds after each product in the input dtype; both are within the dtype's class).
"""

from __future__ import annotations

import torch

from . import tuning as _tuning
from ._loader import load_kernel_module

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels(interpret: bool):
    """`_gate_kernels` executed in the given mode (cached)."""
    return load_kernel_module("_gate_kernels.py", interpret)


def supports(*tensors: torch.Tensor) -> tuple[bool, str]:
    """Whether the fused gate can run on these tensors (same device and dtype). Never raises."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install may raise anything
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    dev, dt = tensors[0].device, tensors[0].dtype
    if any(t.device != dev or t.dtype != dt for t in tensors) or dt not in _DTYPES:
        return False, "tensors must share one device and one dtype among fp16/bf16/fp32"
    if dev.type == "cpu":
        import os

        ok = os.environ.get("TRITON_INTERPRET", "0").strip() == "1"
        return ok, "Triton interpreter" if ok else "CPU needs TRITON_INTERPRET=1"
    return (dev.type == "cuda", f"device {dev.type}")


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """``t`` as ``[rows, D]`` with unit column stride (a view when possible)."""
    t = t.reshape(-1, D)
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(o_cmp, o_sel, o_win, gates, tn: _tuning.GateTuning) -> torch.Tensor:
    """The fused forward kernel: ``o`` shaped like ``o_cmp``."""
    D = o_cmp.shape[-1]
    c, s, w = (_rows(t, D) for t in (o_cmp, o_sel, o_win))
    g = gates.reshape(-1, 3)
    R = c.shape[0]
    o = torch.empty(R, D, device=c.device, dtype=c.dtype)
    interpret = c.device.type == "cpu"
    _kernels(interpret)._gate_fwd_kernel[(-(-R // tn.rows),)](
        c, s, w, g, o, R, c.stride(0), s.stride(0), w.stride(0), g.stride(0), g.stride(1),
        o.stride(0), D=D, BD=_tuning.next_pow2(D), BR=tn.rows,
        **({} if interpret else dict(num_warps=tn.warps)),
    )
    return o.view(o_cmp.shape)


def _backward(do, o_cmp, o_sel, o_win, gates, tn: _tuning.GateTuning):
    """The fused backward kernel: ``(d o_cmp, d o_sel, d o_win, d gates)``."""
    D = o_cmp.shape[-1]
    c, s, w, dor = (_rows(t, D) for t in (o_cmp, o_sel, o_win, do))
    g = gates.reshape(-1, 3)
    R = c.shape[0]
    dc, ds, dw = (torch.empty(R, D, device=c.device, dtype=c.dtype) for _ in range(3))
    dg = torch.empty(R, 3, device=c.device, dtype=gates.dtype)
    interpret = c.device.type == "cpu"
    _kernels(interpret)._gate_bwd_kernel[(-(-R // tn.rows),)](
        dor, c, s, w, g, dc, ds, dw, dg, R, dor.stride(0), c.stride(0), s.stride(0),
        w.stride(0), g.stride(0), g.stride(1), dc.stride(0), D=D, BD=_tuning.next_pow2(D),
        BR=tn.rows, **({} if interpret else dict(num_warps=tn.warps)),
    )
    shape = o_cmp.shape
    return dc.view(shape), ds.view(shape), dw.view(shape), dg.view(gates.shape)


class _GateCombine(torch.autograd.Function):
    """Autograd of the fused gate; saves only its four input tensors (``setup_context``)."""

    @staticmethod
    def forward(o_cmp, o_sel, o_win, gates, tn):
        return _forward(o_cmp, o_sel, o_win, gates, tn)

    @staticmethod
    def setup_context(ctx, inputs, output):
        o_cmp, o_sel, o_win, gates, tn = inputs
        ctx.save_for_backward(o_cmp, o_sel, o_win, gates)
        ctx.tn = tn

    @staticmethod
    def backward(ctx, do):
        return (*_backward(do, *ctx.saved_tensors, ctx.tn), None)


def gate_combine(o_cmp, o_sel, o_win, gates, *, tuning: _tuning.GateTuning | None = None):
    """Eq. 5 fused: ``o [..., H, Dv]`` from three ``[..., H, Dv]`` outputs and ``gates [..., H, 3]``.

    ``tuning`` defaults to the device profile's ``gate``. Raises ``ValueError`` on shape
    mismatch.
    """
    if not (o_cmp.shape == o_sel.shape == o_win.shape):
        raise ValueError(f"branch outputs differ in shape: {o_cmp.shape}, {o_sel.shape}, {o_win.shape}")
    if gates.shape != (*o_cmp.shape[:-1], 3):
        raise ValueError(f"gates must be {(*o_cmp.shape[:-1], 3)}, got {tuple(gates.shape)}")
    tn = _tuning.profile_for(o_cmp.device).gate if tuning is None else tuning
    return _GateCombine.apply(o_cmp, o_sel, o_win, gates, tn)
