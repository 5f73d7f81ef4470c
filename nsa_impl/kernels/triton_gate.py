"""The gate combine of Eq. 5 fused into one Triton kernel each way.

``gate_combine(o_cmp, o_sel, o_win, gates) -> o``: ``o = g_cmp * o_cmp + g_sel * o_sel + g_win *
o_win`` per query head, the contract of `nsa_ref.reference.gate`, differentiable in all four.
PyTorch runs it as five elementwise passes over ``[B, T, H, Dv]`` (three products, two sums,
each a full read and write: ~12 GiB of traffic at T=64k, H=64, Dv=128, bf16) and its backward
as about as many again; the fused forward reads the three outputs and the gates once and
writes ``o`` once (4 GiB), the backward reads ``dO``, the three outputs and the gates once and
writes the four gradients once (7 GiB). Products are summed in float32 and rounded once (the
reference rounds after each product in the input dtype; both are within the dtype's class).

Both directions are custom ops (``nsa::triton_gate_forward`` / ``nsa::triton_gate_backward``,
`nsa_impl.kernels.ops.kernel_op` with ``register_fake``); the autograd Function saves only its
four input tensors. Every row is its own: a non-finite value changes only its row.
"""

from __future__ import annotations

import torch

from . import tuning as _tuning
from ._loader import load_kernel_module
from .ops import Inputs, autocast_off_backward, kernel_op, new_output
from .triton_sel import triton_available

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels(interpret: bool):
    """`_gate_kernels` executed in the given mode (cached)."""
    return load_kernel_module("_gate_kernels.py", interpret)


def supports(inp: Inputs) -> tuple[bool, str]:
    """Whether the fused gate can run this problem (fp16/bf16/fp32, triton, CUDA or CPU tensors
    in Triton's interpreter: the dispatcher asks only for a route already on "triton"). Never
    raises."""
    ok, why = triton_available()
    if not ok:
        return False, why
    if inp.dtype not in _DTYPES:
        return False, f"dtype {inp.dtype} not supported (fp16, bf16, fp32)"
    if inp.device_type not in ("cuda", "cpu"):
        return False, f"device {inp.device_type} not supported"
    return True, "supported"


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """``t`` as ``[rows, D]`` with unit column stride (a view when possible)."""
    t = t.reshape(-1, D)
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward_fake(o_cmp, o_sel, o_win, gates, launch):
    return o_cmp.new_empty(o_cmp.shape)


@kernel_op("triton_gate_forward", _forward_fake)
def gate_forward(o_cmp: torch.Tensor, o_sel: torch.Tensor, o_win: torch.Tensor,
                 gates: torch.Tensor, launch: list[int]) -> torch.Tensor:  # fmt: skip
    """The fused forward kernel: ``o`` shaped like ``o_cmp`` (``launch``: a `GateTuning`)."""
    tn = _tuning.GateTuning(*launch)
    D = o_cmp.shape[-1]
    c, s, w = (_rows(t, D) for t in (o_cmp, o_sel, o_win))
    g = gates.reshape(-1, 3)
    R = c.shape[0]
    o = new_output(R, D, like=c)
    interpret = c.device.type == "cpu"
    _kernels(interpret)._gate_fwd_kernel[(-(-R // tn.rows),)](
        c, s, w, g, o, R, c.stride(0), s.stride(0), w.stride(0), g.stride(0), g.stride(1),
        o.stride(0), D=D, BD=_tuning.next_pow2(D), BR=tn.rows,
        **({} if interpret else dict(num_warps=tn.warps)),
    )
    return o.view(o_cmp.shape)


def _backward_fake(do, o_cmp, o_sel, o_win, gates, launch):
    return (o_cmp.new_empty(o_cmp.shape), o_cmp.new_empty(o_cmp.shape),
            o_cmp.new_empty(o_cmp.shape), gates.new_empty(gates.shape))  # fmt: skip


@kernel_op("triton_gate_backward", _backward_fake)
def gate_backward(do: torch.Tensor, o_cmp: torch.Tensor, o_sel: torch.Tensor,
                  o_win: torch.Tensor, gates: torch.Tensor, launch: list[int],
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The fused backward kernel: ``(d o_cmp, d o_sel, d o_win, d gates)``."""
    tn = _tuning.GateTuning(*launch)
    D = o_cmp.shape[-1]
    c, s, w, dor = (_rows(t, D) for t in (o_cmp, o_sel, o_win, do))
    g = gates.reshape(-1, 3)
    R = c.shape[0]
    dc, ds, dw = (new_output(R, D, like=c) for _ in range(3))
    dg = new_output(R, 3, like=gates)
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
    def forward(o_cmp, o_sel, o_win, gates, launch):
        return gate_forward(o_cmp, o_sel, o_win, gates, launch)

    @staticmethod
    def setup_context(ctx, inputs, output):
        o_cmp, o_sel, o_win, gates, launch = inputs
        ctx.save_for_backward(o_cmp, o_sel, o_win, gates)
        ctx.launch = launch

    @staticmethod
    @autocast_off_backward
    def backward(ctx, do):
        with torch.no_grad():  # the backward op has no derivative of its own
            grads = gate_backward(do.contiguous(), *ctx.saved_tensors, ctx.launch)
        return (*grads, None)


def gate_combine(o_cmp, o_sel, o_win, gates, *, tuning: _tuning.GateTuning | None = None):
    """Eq. 5 fused: ``o [..., H, Dv]`` from three ``[..., H, Dv]`` outputs and
    ``gates [..., H, 3]``.

    ``tuning`` defaults to the device profile's ``gate``. Raises ``ValueError`` on shape
    mismatch.
    """
    if not (o_cmp.shape == o_sel.shape == o_win.shape):
        raise ValueError(
            f"branch outputs differ in shape: {o_cmp.shape}, {o_sel.shape}, {o_win.shape}"
        )
    if gates.shape != (*o_cmp.shape[:-1], 3):
        raise ValueError(f"gates must be {(*o_cmp.shape[:-1], 3)}, got {tuple(gates.shape)}")
    tn = _tuning.profile_for(o_cmp.device).gate if tuning is None else tuning
    return _GateCombine.apply(o_cmp, o_sel, o_win, gates, tn.as_list())
