"""Sliding-window branch (spec I.7) on CUDA through FlashAttention-2: the ``flash`` path.

``window_attention(q, k, v, window, scale, cu_seqlens=None) -> o`` attends each query ``p`` to
exactly the keys ``p - w < s <= p`` of its own sequence: FlashAttention's local window with
``window_size = (w - 1, 0)`` (left ``w - 1`` keys plus the diagonal, nothing to the right).

Kernels, in order of preference:

1. the ``flash_attn`` package (``flash_attn_varlen_func``) when it is installed;
2. PyTorch's built-in FlashAttention-2 (``torch.ops.aten._flash_attention_forward`` /
   ``_flash_attention_backward`` with ``window_size_left/right``), which ships with every CUDA
   build of torch >= 2.5. We call the aten ops rather than
   ``torch.nn.attention.varlen.varlen_attn`` because the latter has no ``enable_gqa`` before
   torch 2.12, while the aten ops take ``G < H`` key/value heads directly.

Both run the varlen kernel: a batch ``[B, T]`` is packed as ``B`` sequences of length ``T``.
FlashAttention needs one head dim for q, k and v (a multiple of 8, at most 256): ``Dk != Dv``
(the paper's 192/128) is served by zero-padding the shorter side (zero columns of q and k add
nothing to ``q.k``; zero columns of v give zero output columns, sliced off), with the scale of
the true ``Dk`` passed explicitly.

Finiteness: with ``check_finite=True`` (default) an output holding NaN/Inf from finite inputs
is recomputed by the masked path (`nsa_impl.branches.sliding`, or ``fallback`` if given) and a
warning is logged once; the check costs one device sync per call.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16)
_WARNED: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    """Log ``msg`` as a warning the first time ``key`` is seen (fallback notices)."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg)


def flash_attn_installed() -> bool:
    """Whether the ``flash_attn`` package can be found (it is never imported here)."""
    return importlib.util.find_spec("flash_attn") is not None


def _aten_ops_present() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_flash_attention_forward") and hasattr(ops, "_flash_attention_backward")


def available() -> tuple[bool, str]:
    """Whether some FlashAttention-2 kernel can run here at all (no tensors needed).

    True with a CUDA device of compute capability >= 8.0 and either the ``flash_attn``
    package or PyTorch's built-in flash kernels. The router's probe should ask this (not
    merely whether ``flash_attn`` is installed).
    """
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    if getattr(torch.version, "hip", None):
        return False, "ROCm build: not tested with this wrapper"
    if flash_attn_installed():
        return True, "flash-attn package installed"
    if not _aten_ops_present():
        return False, "this torch has no aten::_flash_attention_forward"
    flash_ok = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
    if not flash_ok:
        return False, "this torch build has no FlashAttention kernels"
    return True, "PyTorch built-in FlashAttention-2"


def _padded_dim(dk: int, dv: int) -> int:
    return -(-max(dk, dv) // 8) * 8


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[bool, str]:
    """Can the FA-2 window path run on ``q [B,T,H,Dk]``, ``k [B,T,G,Dk]``, ``v [B,T,G,Dv]``?

    Needs CUDA (capability >= 8.0), fp16/bf16, ``H % G == 0`` and head dims padded to a
    multiple of 8 of at most 256. Never raises.
    """
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return False, "q, k, v must be 4-D tensors"
    if q.device.type != "cuda" or k.device != q.device or v.device != q.device:
        return False, "FlashAttention needs all of q, k, v on one CUDA device"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        return False, f"FlashAttention needs fp16/bf16 (got {q.dtype}, {k.dtype}, {v.dtype})"
    H, G = q.shape[2], k.shape[2]
    if G == 0 or H % G:
        return False, f"H={H} is not a multiple of G={G}"
    D = _padded_dim(q.shape[-1], v.shape[-1])
    if D > MAX_HEAD_DIM:
        return False, f"head dim {D} > {MAX_HEAD_DIM}"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0"
    return available()


class _AtenFlash(torch.autograd.Function):
    """PyTorch's FA-2 varlen forward/backward, causal, with an optional left window.

    Packed ``[N, heads, D]`` tensors, ``left = -1`` for no window. Returns ``(o, lse)``; the
    log-sum-exp ``[heads, N]`` (float32) is not differentiable.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, left, scale):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False,
            scale=scale, window_size_left=left, window_size_right=0,
        )
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.max_len, ctx.left, ctx.scale = max_len, left, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            do.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True,
            rng, unused, scale=ctx.scale, window_size_left=ctx.left, window_size_right=0,
        )
        return dq, dk, dv, None, None, None, None


def _kernel(q, k, v, cu, max_len: int, left: int, scale: float, *, want_lse: bool = False):
    """One FA-2 varlen causal call on packed ``[N, heads, D]`` tensors (one head dim for all).

    Returns ``o``, or ``(o, lse)`` with ``lse [heads, N]`` float32 when ``want_lse``.
    """
    if flash_attn_installed():
        from flash_attn import flash_attn_varlen_func

        res = flash_attn_varlen_func(
            q, k, v, cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scale,
            causal=True, window_size=(left, 0), return_attn_probs=want_lse,
        )
        return (res[0], _packed_lse(res[1], cu, q.shape[0])) if want_lse else res
    out, lse = _AtenFlash.apply(q, k, v, cu, max_len, left, scale)
    return (out, _packed_lse(lse, cu, q.shape[0])) if want_lse else out


def _packed_lse(lse: torch.Tensor, cu: torch.Tensor, total: int) -> torch.Tensor:
    """FA-2's varlen log-sum-exp as ``[heads, total]`` float32.

    Releases since 2.4 return that already; older ones a padded ``[batch, heads, max_len]``,
    which is unpadded here.
    """
    if lse.dim() == 2 and lse.shape[1] == total:
        return lse.float()
    if lse.dim() != 3:
        raise RuntimeError(f"unexpected FlashAttention log-sum-exp shape {tuple(lse.shape)}")
    lens = (cu[1:] - cu[:-1]).long()
    pos = torch.arange(total, device=lse.device) - torch.repeat_interleave(cu[:-1].long(), lens)
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=lse.device), lens)
    return lse[seq, :, pos].transpose(0, 1).float()


def _pad_heads(q, k, v):
    """Zero-pad ``Dk``/``Dv`` to one FlashAttention head dim (module docstring)."""
    D = _padded_dim(q.shape[-1], v.shape[-1])
    return tuple(t if t.shape[-1] == D else F.pad(t, (0, D - t.shape[-1])) for t in (q, k, v))


def causal_attention_lse(q, k, v, cu, max_len: int, scale: float):
    """Causal FA-2 varlen attention of packed sequences, with the log-sum-exp.

    ``q [N, Hq, Dk]``, ``k [N, G, Dk]``, ``v [N, G, Dv]`` (``Hq % G == 0``), ``cu`` int32
    boundaries on the device, ``max_len`` the longest sequence. Returns ``o [N, Hq, Dv]``
    (differentiable) and ``lse [Hq, N]`` float32 (natural log, detached).
    """
    Dv = v.shape[-1]
    qp, kp, vp = (t.contiguous() for t in _pad_heads(q, k, v))
    o, lse = _kernel(qp, kp, vp, cu, int(max_len), -1, float(scale), want_lse=True)
    return o[..., :Dv], lse


def _masked_fallback(q, k, v, window, scale, cu_seqlens):
    """The library's masked window path (`nsa_impl.branches.sliding`), for non-finite outputs."""
    from nsa_ref.config import NSAConfig

    from ..branches import sliding
    from ..varlen import PackedLayout

    T = q.shape[1]
    bounds = None if cu_seqlens is None else [int(c) for c in cu_seqlens.tolist()]
    layout = PackedLayout.build(T, bounds)
    cfg = NSAConfig(window=int(window))
    return sliding.window_attention(q, k, v, cfg, scale, layout, path="masked")


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    max_seqlen: int | None = None,
    check_finite: bool = True,
    fallback: Callable | None = None,
) -> torch.Tensor:
    """Sliding-window attention ``o_win [B, T, H, Dv]`` (spec I.7) with FlashAttention-2.

    Args:
        q: ``[B, T, H, Dk]``; k, v: ``[B, T, G, Dk]`` / ``[B, T, G, Dv]`` (GQA, ``H % G == 0``).
        window: ``w``; query ``p`` sees keys ``p - w < s <= p`` (exactly ``min(w, p+1)``).
        scale: softmax scale, default ``1/sqrt(Dk)``.
        cu_seqlens: int32 ``[S+1]`` packed-sequence boundaries (``B == 1``).
        max_seqlen: the longest sequence, if known (saves one device sync with ``cu_seqlens``).
        check_finite: recompute with the masked path when the output is not finite.
        fallback: ``(q, k, v, window, scale, cu_seqlens) -> o`` used by that check (default:
            `nsa_impl.branches.sliding` "masked").

    Returns:
        ``o [B, T, H, Dv]`` in q's dtype, differentiable with respect to q, k and v.
    """
    ok, why = supports(q, k, v)
    if not ok:
        raise ValueError(f"FlashAttention window path cannot run: {why}")
    if int(window) < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens requires B == 1, got B={B}")
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    qp, kp, vp = (t.reshape(B * T, t.shape[2], -1) for t in _pad_heads(q, k, v))
    if cu_seqlens is None:
        cu = torch.arange(B + 1, device=q.device, dtype=torch.int32) * T
        max_len = T
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max()) if max_seqlen is None else int(max_seqlen)
    # A window covering the whole sequence is plain causal attention (FA-2 wants -1 then).
    left = int(window) - 1 if int(window) - 1 < max_len else -1
    o = _kernel(qp.contiguous(), kp.contiguous(), vp.contiguous(), cu, max_len, left, scale)
    o = o[..., :Dv].reshape(B, T, H, Dv)
    if check_finite and nonfinite_output(o, (q, k, v), "window"):
        return (fallback or _masked_fallback)(q, k, v, window, scale, cu_seqlens)
    return o


def nonfinite_output(out: torch.Tensor, inputs, what: str) -> bool:
    """True when ``out`` holds NaN/Inf although every tensor of ``inputs`` is finite.

    The finiteness check of the FlashAttention paths (one device sync): the caller then
    recomputes with the masked path; that is logged once per ``what``.
    """
    if bool(torch.isfinite(out).all()) or not all(bool(torch.isfinite(t).all()) for t in inputs):
        return False
    warn_once(
        f"nonfinite-{what}",
        f"FlashAttention {what} output is not finite for finite inputs; recomputing with the "
        "masked path (logged once)",
    )
    return True
