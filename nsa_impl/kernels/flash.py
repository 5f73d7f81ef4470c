"""FlashAttention-2 varlen, causal with an optional left window: the kernel of the ``flash`` path.

Two users: the sliding-window branch (`window_attention`: query ``p`` sees exactly the keys
``p - w < s <= p`` of its own sequence, FlashAttention's ``window_size = (w - 1, 0)``), and the
compressed branch (`causal_attention_lse`: causal attention of query groups over compressed
blocks, with the log-sum-exp; `nsa_impl.kernels.flash_cmp`).

Kernel: PyTorch's built-in FlashAttention-2 (``aten::_flash_attention_forward`` /
``_flash_attention_backward`` with ``window_size_left/right``), in every CUDA build of
torch >= 2.5; it takes ``G < H`` key/value heads directly (GQA). Both directions are the custom
ops ``nsa::flash_forward`` / ``nsa::flash_backward`` (`nsa_impl.kernels.ops.kernel_op`), so
``torch.compile`` traces them as opaque nodes. On CPU tensors the same ops compute the same
function in dense PyTorch (tests of the glue without a GPU; not a fast path).

The caller passes a `FlashLayout` built once on the host (``cu_seqlens``, ``max_seqlen``, the
window, the containment bounds): no call reads a device value, so the path is sync-free.

NaN containment: FlashAttention multiplies masked probabilities (exactly 0) with the values of
their tile, so a NaN ``v`` of a future key (or one left of the window) in the same tile would
reach rows that never read it. The kernel therefore always runs on ``q, k, v`` (and ``dO``) with
non-finite values zeroed, and the rows whose key set really holds a non-finite ``q``/``k``/``v``
are set to NaN afterwards (forward), as are ``dQ`` of such rows and rows with a non-finite
``dO``, and ``dK``/``dV`` of every key such a row reads (backward). Which rows read which keys
follows from the layout by prefix counts (``row_lo``/``key_hi``), with no sync. Everything else
is bit-identical to a run without the non-finite value.

FlashAttention needs one head dim for q, k and v (a multiple of 8, at most 256): ``Dk != Dv``
(the paper's 192/128) is served by zero-padding the shorter side (zero columns of q and k add
nothing to ``q.k``; zero columns of v give zero output columns, sliced off), with the scale of
the true ``Dk`` passed explicitly. The kernel accumulates in float32, so a finite scaled logit
of fp16 inputs never overflows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ops import Inputs, autocast_off_backward, finite_rows, kernel_op, nan_to_zero, poison

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16)


def _aten_ops_present() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_flash_attention_forward") and hasattr(ops, "_flash_attention_backward")


def available() -> tuple[bool, str]:
    """Whether PyTorch's FlashAttention-2 can run here at all (no tensors needed)."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    if getattr(torch.version, "hip", None):
        return False, "ROCm build: not tested with this wrapper"
    if not _aten_ops_present():
        return False, "this torch has no aten::_flash_attention_forward"
    flash_ok = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
    if not flash_ok:
        return False, "this torch build has no FlashAttention kernels"
    return True, "PyTorch built-in FlashAttention-2"


def padded_dim(dk: int, dv: int) -> int:
    """The one FlashAttention head dim serving ``Dk`` and ``Dv`` (a multiple of 8)."""
    return -(-max(dk, dv) // 8) * 8


def supports(inp: Inputs) -> tuple[bool, str]:
    """Can the FA-2 window path run this problem? CUDA capability >= 8.0, fp16/bf16,
    ``H % G == 0`` and head dims padded to a multiple of 8 of at most 256. Never raises."""
    if inp.device_type != "cuda":
        return False, "FlashAttention needs a CUDA device"
    if inp.dtype not in _DTYPES:
        return False, f"FlashAttention needs fp16/bf16 (got {inp.dtype})"
    if inp.G == 0 or inp.H % inp.G:
        return False, f"H={inp.H} is not a multiple of G={inp.G}"
    D = padded_dim(inp.Dk, inp.Dv)
    if D > MAX_HEAD_DIM:
        return False, f"head dim {D} > {MAX_HEAD_DIM}"
    major, minor = torch.cuda.get_device_capability(inp.device)
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0"
    return True, "supported"


# ---------------------------------------------------------------------------------------------
# Layout (host work, once per plan)


@dataclass(frozen=True)
class FlashLayout:
    """Packed sequences along one axis of ``N`` rows, as FlashAttention varlen takes them.

    Attributes:
        cu: int32 ``[S+1]`` boundaries on the device.
        max_len: the longest sequence (host int: FlashAttention's grid size).
        left: the left window (``-1``: none, plain causal).
        row_lo: int64 ``[N]``: the first key each row reads (its keys are ``[row_lo, r]``).
        key_hi: int64 ``[N]``: the last row reading each key (its readers are ``[j, key_hi]``).
    """

    cu: torch.Tensor
    max_len: int
    left: int
    row_lo: torch.Tensor
    key_hi: torch.Tensor

    @classmethod
    def build(cls, bounds, window: int | None, device) -> FlashLayout:
        """Layout of sequences ``bounds = [0, c_1, ..., N]`` (host ints) and a window (keys
        ``p - w < s <= p``; ``None``: causal). A window covering every sequence is causal."""
        cu = torch.tensor(list(bounds), dtype=torch.int64)
        lens = cu.diff()
        max_len = int(lens.max()) if lens.numel() else 0
        left = -1 if window is None or int(window) - 1 >= max_len else int(window) - 1
        N = int(cu[-1])
        seq = torch.repeat_interleave(torch.arange(lens.numel()), lens)
        start, end = cu[:-1][seq], cu[1:][seq] - 1
        rows = torch.arange(N)
        row_lo, key_hi = start, end
        if left >= 0:
            row_lo = torch.maximum(start, rows - left)
            key_hi = torch.minimum(end, rows + left)
        return cls(cu.to(device, torch.int32), max_len, left, row_lo.to(device), key_hi.to(device))


# ---------------------------------------------------------------------------------------------
# The kernel ops (CUDA: FlashAttention-2; CPU: the same function in dense PyTorch)


def _dense(q, k, v, cu, left: int, scale: float):
    """FlashAttention's function on CPU tensors: ``(o, lse [Hq, N])``, per packed sequence."""
    acc = torch.float64 if q.dtype in (torch.float32, torch.float64) else torch.float32
    h = q.shape[1] // k.shape[1]
    outs, lses = [], []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        qs = q[a:b].transpose(0, 1).to(acc)  # [Hq, L, Dk]
        ks, vs = (t[a:b].repeat_interleave(h, dim=1).transpose(0, 1).to(acc) for t in (k, v))
        s = torch.matmul(qs * scale, ks.transpose(-1, -2))
        i = torch.arange(b - a)
        d = i[:, None] - i[None, :]
        allowed = (d >= 0) & ((d <= left) if left >= 0 else True)
        s = s.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None]).masked_fill(~allowed, 0.0)
        outs.append(torch.matmul(p, vs).transpose(0, 1).to(q.dtype))
        lses.append(lse.float())
    return torch.cat(outs, 0), torch.cat(lses, 1)


def _dense_backward(do, q, k, v, o, lse, cu, left: int, scale: float):
    """Gradients of `_dense` (the FlashAttention backward identities, dense, per sequence)."""
    acc = torch.float64 if q.dtype in (torch.float32, torch.float64) else torch.float32
    G, h = k.shape[1], q.shape[1] // k.shape[1]
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc) for t in (q, k, v))
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        qs, dos, os_ = (t[a:b].transpose(0, 1).to(acc) for t in (q, do, o))
        ks, vs = (t[a:b].repeat_interleave(h, dim=1).transpose(0, 1).to(acc) for t in (k, v))
        i = torch.arange(b - a)
        d = i[:, None] - i[None, :]
        allowed = (d >= 0) & ((d <= left) if left >= 0 else True)
        s = torch.matmul(qs * scale, ks.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
        p = torch.exp(s - lse[:, a:b, None].to(acc)).masked_fill(~allowed, 0.0)
        dvs = torch.matmul(p.transpose(-1, -2), dos)
        dp = torch.matmul(dos, vs.transpose(-1, -2))
        ds = (p * (dp - (dos * os_).sum(-1, keepdim=True))).masked_fill(~allowed, 0.0)
        dq[a:b] = (torch.matmul(ds, ks) * scale).transpose(0, 1)
        dks = (torch.matmul(ds.transpose(-1, -2), qs) * scale).transpose(0, 1)
        dk[a:b] = dks.reshape(b - a, G, h, -1).sum(2)
        dv[a:b] = dvs.transpose(0, 1).reshape(b - a, G, h, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _forward_fake(q, k, v, cu, max_len, left, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@kernel_op("flash_forward", _forward_fake)
def flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    max_len: int,
    left: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA-2 varlen causal forward on packed ``[N, heads, D]``: ``(o, lse [Hq, N] float32)``."""
    if not q.is_cuda:
        return _dense(q, k, v, cu, left, scale)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, 0.0, True, False,
        scale=scale, window_size_left=left, window_size_right=0,
    )  # fmt: skip
    return out.contiguous(), lse.float().contiguous()  # the fake's layout (contiguous)


def _backward_fake(do, q, k, v, o, lse, cu, max_len, left, scale):
    # contiguous, like the real outputs (a fake must match their strides, not the inputs')
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@kernel_op("flash_backward", _backward_fake)
def flash_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    cu: torch.Tensor,
    max_len: int,
    left: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA-2 varlen causal backward: ``(dq, dk, dv)``."""
    if not q.is_cuda:
        return _dense_backward(do, q, k, v, o, lse, cu, left, scale)
    # No dropout: the kernel never reads the philox state, so placeholders of the forward's
    # output types serve (the forward's state is not kept).
    seed = torch.empty(2, dtype=torch.uint64, device=q.device)
    offset = torch.empty((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        do, q, k, v, o, lse, cu, cu, max_len, max_len, 0.0, True, seed, offset,
        scale=scale, window_size_left=left, window_size_right=0,
    )  # fmt: skip
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


# ---------------------------------------------------------------------------------------------
# Containment (module docstring) around the ops


def _rows_reading(bad_kv: torch.Tensor, row_lo: torch.Tensor, heads: int) -> torch.Tensor:
    """Bool ``[N, heads]``: rows whose keys ``[row_lo, r]`` hold a row of ``bad_kv [N, G]``."""
    N, G = bad_kv.shape
    c = F.pad(torch.cumsum(bad_kv.to(torch.int32), 0), (0, 0, 1, 0))  # [N + 1, G]
    reads = (c[1:] - c[row_lo]) > 0
    return reads[:, :, None].expand(N, G, heads // G).reshape(N, heads)


def _keys_read_by(rows: torch.Tensor, key_hi: torch.Tensor, G: int) -> torch.Tensor:
    """Bool ``[N, G]``: keys read by a row of ``rows [N, heads]`` (readers are ``[j, key_hi]``)."""
    N = rows.shape[0]
    per_group = rows.view(N, G, -1).any(-1).to(torch.int32)
    c = F.pad(torch.cumsum(per_group, 0), (0, 0, 1, 0))  # [N + 1, G]
    j = torch.arange(N, device=rows.device)
    return (c[key_hi + 1] - c[j]) > 0


class _Flash(torch.autograd.Function):
    """The ops on zeroed-non-finite inputs; ``bad`` rows are poisoned by the caller (forward)
    and here (backward). Saves only tensors."""

    @staticmethod
    def forward(q, k, v, bad, cu, row_lo, key_hi, max_len, left, scale):
        return flash_forward(
            nan_to_zero(q), nan_to_zero(k), nan_to_zero(v), cu, max_len, left, scale
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, bad, cu, row_lo, key_hi, max_len, left, scale = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse, bad, cu, key_hi)
        ctx.mark_non_differentiable(lse)
        ctx.max_len, ctx.left, ctx.scale = max_len, left, scale

    @staticmethod
    @autocast_off_backward
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, bad, cu, key_hi = ctx.saved_tensors
        with torch.no_grad():  # the backward op has no derivative of its own
            rows = bad | ~finite_rows(do)
            dq, dk, dv = flash_backward(
                nan_to_zero(do).contiguous(), nan_to_zero(q), nan_to_zero(k), nan_to_zero(v),
                o, lse, cu, ctx.max_len, ctx.left, ctx.scale,
            )  # fmt: skip
            keys = _keys_read_by(rows, key_hi, k.shape[1])
        return poison(dq, rows), poison(dk, keys), poison(dv, keys), *([None] * 7)


def contained_attention(q, k, v, layout: FlashLayout, scale: float):
    """Causal (windowed) FA-2 varlen of packed ``q [N, Hq, D]``, ``k/v [N, G, D]`` (one head
    dim), NaN-contained (module docstring): ``(o [N, Hq, D], lse [Hq, N] float32)``."""
    bad_kv = ~(finite_rows(k) & finite_rows(v))
    bad = ~finite_rows(q) | _rows_reading(bad_kv, layout.row_lo, q.shape[1])
    o, lse = _Flash.apply(
        q, k, v, bad, layout.cu, layout.row_lo, layout.key_hi, layout.max_len, layout.left,
        float(scale),
    )  # fmt: skip
    return poison(o, bad), lse


def _pad_heads(q, k, v):
    """Zero-pad ``Dk``/``Dv`` to one FlashAttention head dim (module docstring)."""
    D = padded_dim(q.shape[-1], v.shape[-1])
    return tuple(t if t.shape[-1] == D else F.pad(t, (0, D - t.shape[-1])) for t in (q, k, v))


def causal_attention_lse(q, k, v, layout: FlashLayout, scale: float):
    """Causal FA-2 varlen attention of packed sequences, with the log-sum-exp.

    ``q [N, Hq, Dk]``, ``k [N, G, Dk]``, ``v [N, G, Dv]`` (``Hq % G == 0``). Returns
    ``o [N, Hq, Dv]`` (differentiable) and ``lse [Hq, N]`` float32 (natural log, detached).
    """
    Dv = v.shape[-1]
    qp, kp, vp = (t.contiguous() for t in _pad_heads(q, k, v))
    o, lse = contained_attention(qp, kp, vp, layout, scale)
    return o[..., :Dv], lse


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: FlashLayout, scale: float
) -> torch.Tensor:
    """Sliding-window attention ``o_win [B, T, H, Dv]`` (spec I.7) with FlashAttention-2.

    ``q [B, T, H, Dk]``; ``k, v [B, T, G, Dk]`` / ``[B, T, G, Dv]`` (GQA). ``layout`` packs the
    ``B * T`` rows: ``B`` sequences of ``T`` (or the ``cu_seqlens`` sequences, ``B == 1``) with
    the window (`FlashLayout.build`). Differentiable with respect to q, k and v.
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if layout.row_lo.numel() != B * T:
        raise ValueError(f"layout packs {layout.row_lo.numel()} rows, q has B*T = {B * T}")
    qp, kp, vp = (t.reshape(B * T, t.shape[2], -1).contiguous() for t in _pad_heads(q, k, v))
    o, _ = contained_attention(qp, kp, vp, layout, scale)
    return o[..., :Dv].reshape(B, T, H, Dv)
