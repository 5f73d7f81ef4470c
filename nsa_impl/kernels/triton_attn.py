"""Triton row-range attention, forward and backward: the compressed branch and the sliding window.

Two branches of NSA attend each query row to one contiguous range of keys whose bounds only
grow with the position ``p``: the compressed branch (spec I.3, Eq. 8) to the compressed blocks
``[0, num_cmp(p))`` and the sliding window (spec I.7) to the raw keys ``[p - w + 1, p]``. One
family of kernels (`nsa_impl.kernels._range_kernels`) serves both:

* `cmp_attention(q, k_cmp, v_cmp, ...) -> (o_cmp, lse)`: Eq. 8 with the natural-log
  log-sum-exp of every (token, head) row, which the fused selection-score kernel
  (`nsa_impl.kernels.triton_topn`) needs; rows that see no block give exact zeros and
  ``lse = -inf``.
* `window_attention(q, k, v, window, ...) -> o_win`.

Design (why it looks like this)
-------------------------------
*Group-centric tiles, no packing copies.* A program owns ``P`` consecutive positions of one
sequence and one KV group ``g``: its ``P * h`` rows are the ``h`` query heads of ``g`` at those
positions (position-major), read with strided loads straight from ``q [tokens, H, Dk]``; every
key/value chunk it loads serves all of them (GQA without repeating K/V, and without the
gather/permute packing of the FlashAttention-over-query-groups path, ~5.6 ms at T=64k). With
``P`` dividing the compression stride ``d`` and tiles shifted to start at query-group
boundaries, all rows of a compressed-branch tile see exactly the same blocks, so chunks need a
mask only at the causal edge, and not at all when the tile shares one group.

*Causal block skipping, three loops.* A tile's key loop runs over masked edge chunks, mask-free
middle chunks (every row sees the whole chunk) and a masked tail, with bounds from the first
and last position of the tile (`_range_kernels._chunk_bounds`).

*Backward without atomics.* dQ: the forward's tiling; it also writes ``delta = rowsum(dO * O)``.
dK/dV: one program per key chunk of ``BKN`` keys walks the queries that see it (for the
compressed branch: every position from ``l - 1 + j*d`` to the end of the sequence), ``QP``
positions x ``h`` heads per step. Long walks are cut into work items of ``chunk`` positions
whose partial sums a second kernel adds in item order: deterministic, and the forced-causal
imbalance (key chunk 0 is seen by every query) does not serialise the launch. For the
compressed branch the items are absolute position windows and programs are launched
item-major, so the key-chunk programs running side by side read the same ``q``/``dO`` rows
(an L2 working set of ``chunk`` positions) instead of each streaming its own: without that,
``q`` and ``dO`` would come from HBM once per key chunk that sees them (~64 GB at T=64k).

*Numerics.* fp16/bf16: tensor-core dots, float32 softmax in base 2. float32 (the parity
dtype): float64 logits, IEEE float32 dots, float64 dK/dV sums (`_tl_helpers`). int64 token
offsets throughout.

*NaN containment.* Masked keys contribute exactly nothing (`_range_kernels` docstring): other
rows are bit-identical to a run without the non-finite value.

*Custom ops.* Forward and backward are the ops ``nsa::triton_range_forward`` /
``nsa::triton_range_backward`` (`nsa_impl.kernels.ops.kernel_op`, with ``register_fake``); the
autograd Function around them has ``setup_context`` and saves only tensors. The sequence
geometry (`SeqStarts`) is built once on the host by a plan: a call reads no device value.

Launch shapes come from an explicit `nsa_impl.kernels.tuning.AttnTuning` (``tuning=``) or, by
default, the device's profile (`tuning.profile_for`): ``profile.cmp`` / ``profile.win``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import tuning as _tuning
from ._loader import load_kernel_module
from .ops import (
    Inputs,
    autocast_off_backward,
    finite_rows,
    kernel_op,
    nan_to_zero,
    new_output,
)
from .triton_sel import triton_available

#: Head dims the kernels accept (padded to a power of two >= 16 inside; 256 keeps tiles on chip).
MAX_HEAD_DIM = 256
MODE_CMP, MODE_WIN = 0, 1
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Partial dK/dV buffers (split key chunks) are kept under this many bytes by longer work items.
PARTIAL_BUDGET_BYTES = 1 << 30
_LOG2E = 1.0 / math.log(2.0)


def _kernels(interpret: bool):
    """`_range_kernels` executed in the given mode (cached)."""
    return load_kernel_module("_range_kernels.py", interpret)


def _supports(inp: Inputs) -> tuple[bool, str]:
    ok, why = triton_available()
    if not ok:
        return False, why
    if inp.dtype not in _DTYPES:
        return False, f"dtype {inp.dtype} not supported (fp16, bf16, fp32)"
    if max(inp.Dk, inp.Dv) > MAX_HEAD_DIM:
        return False, f"head dims Dk={inp.Dk}, Dv={inp.Dv} > {MAX_HEAD_DIM}"
    if inp.G == 0 or inp.H % inp.G:
        return False, f"H={inp.H} is not a multiple of G={inp.G}"
    if inp.device_type == "cpu":
        return True, "CPU tensors, Triton interpreter"
    if inp.device_type != "cuda" or getattr(torch.version, "hip", None):
        return False, f"device {inp.device_type} not supported"
    major, minor = torch.cuda.get_device_capability(inp.device)
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0"
    return True, f"CUDA sm_{major}{minor}"


def supports_cmp(inp: Inputs) -> tuple[bool, str]:
    """Can these kernels run the compressed branch of ``inp``? ``(ok, reason)``, never raises.

    Needs triton, fp16/bf16/fp32, head dims ``<= 256``, ``H % G == 0``, and CUDA with compute
    capability >= 8.0 (CPU tensors run in Triton's interpreter, which the dispatcher allows only
    when the path is forced under ``TRITON_INTERPRET=1``). The selection scores and top-n of
    the same path (`nsa_impl.kernels.triton_topn`) have the same needs.
    """
    return _supports(inp)


def supports_win(inp: Inputs) -> tuple[bool, str]:
    """Can these kernels run the sliding-window branch of ``inp``? As `supports_cmp`."""
    return _supports(inp)


def num_cmp(length: int, cmp_block: int, cmp_stride: int) -> int:
    """Compressed blocks of a sequence of ``length`` tokens (``NSAConfig.num_cmp(length - 1)``)."""
    return 0 if length < cmp_block else (length - cmp_block) // cmp_stride + 1


@dataclass(frozen=True)
class SeqStarts:
    """The sequence geometry a launch reads, built once on the host (a plan's).

    Attributes:
        qstart: int64 ``[S+1]`` token boundaries of the sequences in the ``[tokens, H, D]`` rows
            (on the device).
        kstart: int64 ``[S+1]`` boundaries of each sequence's keys: compressed blocks for the
            compressed branch, raw tokens (``qstart``) for the window.
        max_len: the longest sequence (host int: the grid size).
        max_keys: the most keys of one sequence (host int).
    """

    qstart: torch.Tensor
    kstart: torch.Tensor
    max_len: int
    max_keys: int

    @classmethod
    def build(cls, bounds, B: int, T: int, device, *, cmp: tuple[int, int] | None = None):
        """For ``B`` rows of ``T`` tokens (``bounds = (0, T)``) or one row of packed sequences
        ``bounds`` (host ints, ``B == 1``). ``cmp = (l, d)``: compressed-block key starts."""
        bounds = [int(b) for b in bounds]
        lengths = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
        if len(lengths) == 1:  # one sequence per batch row
            lengths = lengths * B
            starts = [i * T for i in range(B + 1)]
        else:
            if B != 1:
                raise ValueError(f"packed sequences require B == 1, got B={B}")
            starts = bounds
        keys = lengths if cmp is None else [num_cmp(n, *cmp) for n in lengths]
        kst = [0]
        for n in keys:
            kst.append(kst[-1] + n)
        q = torch.tensor(starts, dtype=torch.int64).to(device, non_blocking=True)
        k = q if cmp is None else torch.tensor(kst, dtype=torch.int64).to(device, non_blocking=True)
        return cls(q, k, max(lengths), max(keys))


def _opts(tile: _tuning.Tile, interpret: bool) -> dict:
    return {} if interpret else dict(num_warps=tile.warps, num_stages=tile.stages)


def _shift(mode: int, cmp_block: int, P: int) -> int:
    """Tile shift ``A``: compressed-branch tiles start at query-group boundaries ``l-1+m*d``."""
    return (P - (cmp_block - 1) % P) % P if mode == MODE_CMP else 0


def _domain(dtype: torch.dtype) -> tuple[bool, float]:
    """``(ieee, DOM)``: float32 runs in the natural-log domain, fp16/bf16 in base 2."""
    ieee = dtype == torch.float32
    return ieee, 1.0 if ieee else _LOG2E


def _geometry(q, k, v, mode, cmp_block, cmp_stride, window):
    """Group size, arithmetic regime and the kernels' shared constexprs."""
    h = q.shape[1] // k.shape[1]
    ieee, dom = _domain(q.dtype)
    dk, dv = q.shape[-1], v.shape[-1]
    consts = dict(MODE=mode, CL=int(cmp_block), CD=int(cmp_stride), WIN=int(window),
                  H_PER_G=h, DK=dk, DV=dv, BDK=max(16, _tuning.next_pow2(dk)),
                  BDV=max(16, _tuning.next_pow2(dv)), IEEE=ieee)
    return h, ieee, dom, consts


def _forward(q, k, v, qstart, kstart, max_len, mode, cmp_block, cmp_stride, window, scale,
             tn: _tuning.AttnTuning, bad_counts: torch.Tensor | None = None):
    """``q [NQ,H,Dk], k [NK,G,Dk], v [NK,G,Dv]`` -> ``o [NQ,H,Dv]``, ``lse [NQ,H]`` float32;
    rows whose range holds a key counted in ``bad_counts`` (`marked_counts`) are NaN
    (``None``: no key is marked, for callers that know ``v`` is finite, e.g. benchmarks)."""
    interpret = q.device.type == "cpu"
    if bad_counts is None:
        bad_counts = torch.zeros(k.shape[1], k.shape[0] + 1, device=q.device, dtype=torch.int32)
    h, ieee, dom, c = _geometry(q, k, v, mode, cmp_block, cmp_stride, window)
    tile = _tuning.resolve(tn.fwd, h, c["DK"], c["DV"], ieee)
    A = _shift(mode, cmp_block, tile.P)
    S, G = qstart.numel() - 1, k.shape[1]
    o = new_output(q.shape[0], q.shape[1], v.shape[-1], like=q)
    lse = new_output(q.shape[0], q.shape[1], like=q, dtype=torch.float32)
    grid = (-(-(max_len + A) // tile.P), S, G)
    _kernels(interpret)._range_fwd_kernel[grid](
        q, k, v, o, lse, qstart, kstart, bad_counts,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), lse.stride(0), bad_counts.stride(0),
        float(scale) * dom, 1.0 / dom,
        HP=tile.HP, P=tile.P, A=A, BM=tile.BM, BN=tile.BN,
        PRECISE=ieee and not interpret, **c, **_opts(tile, interpret),
    )  # fmt: skip
    return o, lse


def _items(mode, max_len, max_keys, cmp_block, window, S, G, kv: _tuning.Tile, bd: int,
           itemsize: int) -> tuple[int, int]:
    """``(NIT, chunk)``: work items per key chunk, positions per item (within the budget)."""
    if mode == MODE_CMP:
        span = max(1, max_len)  # absolute position windows (`_range_kernels._query_bounds`)
    else:
        span = max(1, min(max_len, kv.BN - 1 + window))
    chunk = kv.chunk
    nkc = -(-max_keys // kv.BN)
    while True:
        nit = -(-span // chunk)
        if nit == 1 or S * G * nkc * nit * kv.BN * bd * itemsize <= PARTIAL_BUDGET_BYTES:
            return nit, chunk
        chunk *= 2


def _dq(do, q, k, v, o, lse, qstart, kstart, max_len, mode, cmp_block, cmp_stride, window,
        scale, tn: _tuning.AttnTuning, delta_only: bool = False):
    """``(dq, delta)``: the dQ kernel (it also writes ``delta = rowsum(dO * O)``).

    ``delta_only``: just ``delta`` (``dq`` is returned unwritten), for the atomic-dQ backward.
    """
    interpret = q.device.type == "cpu"
    h, ieee, dom, c = _geometry(q, k, v, mode, cmp_block, cmp_stride, window)
    S, G = qstart.numel() - 1, k.shape[1]
    delta = new_output(q.shape[0], q.shape[1], like=q, dtype=torch.float32)
    dq = new_output(*q.shape, like=q)
    t = _tuning.resolve(tn.dq, h, c["DK"], c["DV"], ieee)
    A = _shift(mode, cmp_block, t.P)
    _kernels(interpret)._range_dq_kernel[(-(-(max_len + A) // t.P), S, G)](
        q, k, v, o, do, dq, lse, delta, qstart, kstart,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        lse.stride(0), float(scale) * dom, dom, float(scale),
        HP=t.HP, P=t.P, A=A, BM=t.BM, BN=t.BN, PRECISE=ieee and not interpret,
        DELTA_ONLY=delta_only, **c, **_opts(t, interpret),
    )  # fmt: skip
    return dq, delta


def _dkdv(do, q, k, v, lse, delta, qstart, kstart, max_len, max_keys, mode, cmp_block,
          cmp_stride, window, scale, tn: _tuning.AttnTuning, dq_acc=None):
    """``(dk, dv)``: the dK/dV kernel, plus the ordered reduction of split key chunks.

    ``dq_acc``: a zeroed float32 ``[NQ, H, Dk]`` buffer the kernel adds dQ into (atomics).
    """
    interpret = q.device.type == "cpu"
    kern = _kernels(interpret)
    h, ieee, dom, c = _geometry(q, k, v, mode, cmp_block, cmp_stride, window)
    S, G = qstart.numel() - 1, k.shape[1]
    kv = _tuning.resolve(tn.dkdv, h, c["DK"], c["DV"], ieee, dkdv=True)
    part_dtype = torch.float64 if ieee else torch.float32
    nkc = max(1, -(-max_keys // kv.BN))
    nit, chunk = _items(mode, max_len, max_keys, cmp_block, window, S, G, kv,
                        c["BDK"] + c["BDV"], part_dtype.itemsize)
    dk = new_output(*k.shape, like=k)
    dv = new_output(*v.shape, like=v)
    if nit > 1:
        part_k = torch.empty(S * G * nkc * nit, kv.BN, c["BDK"], device=q.device, dtype=part_dtype)
        part_v = torch.empty(S * G * nkc * nit, kv.BN, c["BDV"], device=q.device, dtype=part_dtype)
    else:
        part_k = part_v = dk  # unused by the kernel (NIT == 1 stores straight into dk/dv)
    atomic = dq_acc is not None
    dq_acc = dq_acc if atomic else delta  # unused by the kernel without ATOMIC_DQ
    kern._range_dkdv_kernel[(nkc * nit, S, G)](
        q, k, v, do, lse, delta, dk, dv, part_k, part_v, dq_acc, qstart, kstart,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), lse.stride(0),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        dq_acc.stride(0), dq_acc.stride(1) if dq_acc.dim() > 1 else 0,
        float(scale) * dom, dom, float(scale), nkc, G,
        HP=kv.HP, BKN=kv.BN, QP=kv.P, BR=kv.BM, QCH=chunk, NIT=nit,
        PRECISE=ieee and not interpret, ATOMIC_DQ=atomic, **c, **_opts(kv, interpret),
    )  # fmt: skip
    if nit > 1:
        kern._range_reduce_kernel[(nkc, S, G)](
            part_k, part_v, dk, dv, kstart, dk.stride(0), dk.stride(1), dv.stride(0),
            dv.stride(1), nkc, G, BKN=kv.BN, NIT=nit, DK=c["DK"], DV=c["DV"], BDK=c["BDK"],
            BDV=c["BDV"], IEEE=ieee, **({} if interpret else dict(num_warps=4, num_stages=1)),
        )
    return dk, dv


# --------------------------------------------------------------------------------------------
# The custom ops (forward, backward) and their autograd Function


def _forward_fake(q, k, v, qstart, kstart, sizes, scale, launch):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), q.new_empty(
        q.shape[0], q.shape[1], dtype=torch.float32
    )


@kernel_op("triton_range_forward", _forward_fake)
def range_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qstart: torch.Tensor,
    kstart: torch.Tensor,
    sizes: list[int],
    scale: float,
    launch: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [NQ,H,Dv], lse [NQ,H] float32)`` of the row-range attention (module docstring).

    ``sizes = [max_len, max_keys, mode, cmp_block, cmp_stride, window]``; ``launch`` is an
    `nsa_impl.kernels.tuning.AttnTuning` as a list.
    """
    max_len, _, mode, cl, cd, win = sizes
    # NaN containment (`_range_kernels` docstring): the product reads a cleaned v, and the
    # kernel sets to NaN the rows whose range holds a non-finite v (the log-sum-exp, which the
    # top-n reads, stays that of the keys: a NaN in v changes no selection). The counts are
    # int32: a bool row flag loaded at the store made ptxas crash at Dk=16 on the H200.
    return _forward(q, k, nan_to_zero(v), qstart, kstart, max_len, mode, cl, cd, win, scale,
                    _tuning.AttnTuning.from_list(launch), marked_counts(~finite_rows(v)))


def marked_counts(marked: torch.Tensor) -> torch.Tensor:
    """Int32 ``[G, NK+1]``: entry ``[g, i]`` counts the ``marked`` keys (bool ``[NK, G]``) of
    group ``g`` before key ``i``, so a row's range ``[lo, hi)`` holds one iff the difference of
    two entries is positive (read by the forward kernel; no host sync).

    The scan runs along the last axis of a ``[G, NK]`` copy: a scan over the outer axis of
    ``[NK, G]`` runs one thread per group (6.3 ms at T=64k on an H200, against ~0.02)."""
    per_group = marked.t().to(torch.int32)
    return F.pad(per_group.cumsum(1, dtype=torch.int32), (1, 0))


def _backward_fake(do, q, k, v, o, lse, qstart, kstart, sizes, scale, launch):
    # contiguous, like the real outputs (a fake must match their strides, not the inputs')
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@kernel_op("triton_range_backward", _backward_fake)
def range_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    qstart: torch.Tensor,
    kstart: torch.Tensor,
    sizes: list[int],
    scale: float,
    launch: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of `range_forward` (deterministic unless ``dq_atomic``)."""
    max_len, max_keys, mode, cl, cd, win = sizes
    return _backward(do, q, k, v, o, lse, qstart, kstart, max_len, max_keys, mode, cl, cd, win,
                     scale, _tuning.AttnTuning.from_list(launch))  # fmt: skip


def _backward(do, q, k, v, o, lse, qstart, kstart, max_len, max_keys, mode, cmp_block,
              cmp_stride, window, scale, tn: _tuning.AttnTuning):
    """``(dq, dk, dv)`` of `_forward`: the dQ kernel then the dK/dV kernel (or, with
    ``dq_atomic``, dQ added by the dK/dV kernel)."""
    do = do if do.stride(-1) == 1 else do.contiguous()
    geo = (mode, cmp_block, cmp_stride, window, scale, tn)
    # NaN containment (`nsa_impl.kernels.ops`): the products read cleaned k (both
    # kernels), q and dO (dK/dV); delta comes from the raw dO and O.
    k = nan_to_zero(k)
    if not tn.dq_atomic:
        dq, delta = _dq(do, q, k, v, o, lse, qstart, kstart, max_len, *geo)
        dk, dv = _dkdv(nan_to_zero(do), nan_to_zero(q), k, v, lse, delta, qstart, kstart,
                       max_len, max_keys, *geo)  # fmt: skip
        return dq, dk, dv
    _, delta = _dq(do, q, k, v, o, lse, qstart, kstart, max_len, *geo, delta_only=True)
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dk, dv = _dkdv(nan_to_zero(do), nan_to_zero(q), k, v, lse, delta, qstart, kstart,
                   max_len, max_keys, *geo, dq_acc=dq_acc)  # fmt: skip
    return dq_acc.to(q.dtype), dk, dv


class _RangeAttention(torch.autograd.Function):
    """Autograd of the two ops: ``(o, lse)`` out (``lse`` not differentiable).

    ``setup_context`` style; saves only tensors (the integer sizes and the launch list ride on
    ``ctx``), so ``torch.func`` transforms work.
    """

    @staticmethod
    def forward(q, k, v, qstart, kstart, sizes, scale, launch):
        return range_forward(q, k, v, qstart, kstart, sizes, scale, launch)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, qstart, kstart, sizes, scale, launch = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, qstart, kstart, o, lse)
        ctx.mark_non_differentiable(lse)
        ctx.sizes, ctx.scale, ctx.launch = sizes, scale, launch

    @staticmethod
    @autocast_off_backward
    def backward(ctx, do, _dlse):
        q, k, v, qstart, kstart, o, lse = ctx.saved_tensors
        with torch.no_grad():  # the backward op has no derivative of its own
            dq, dk, dv = range_backward(do, q, k, v, o, lse, qstart, kstart, ctx.sizes,
                                        ctx.scale, ctx.launch)  # fmt: skip
        return dq, dk, dv, None, None, None, None, None


def _check_3d(q, k, v):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k, v must be 3-D [tokens, heads, dim]")
    if k.shape[:2] != v.shape[:2] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"H={q.shape[1]} must be a multiple of G={k.shape[1]}")
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))


def _check_starts(name: str, starts: torch.Tensor, device) -> torch.Tensor:
    if not isinstance(starts, torch.Tensor) or starts.dim() != 1 or starts.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor of at least 2 boundaries")
    if starts.dtype.is_floating_point:
        raise TypeError(f"{name} must hold integers, got {starts.dtype}")
    return starts.to(device=device, dtype=torch.int64)


def cmp_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    qstart: torch.Tensor,
    kstart: torch.Tensor,
    max_len: int,
    cmp_block: int,
    cmp_stride: int,
    scale: float | None = None,
    tuning: _tuning.AttnTuning | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed attention (Eq. 8) and its log-sum-exp, differentiable in q, k_cmp and v_cmp.

    Args:
        q: ``[NQ, H, Dk]`` query tokens of all sequences back to back (``[B*T, H, Dk]``).
        k_cmp, v_cmp: ``[NK, G, Dk]`` / ``[NK, G, Dv]`` compressed blocks, sequence by sequence.
        qstart: int ``[S+1]`` token boundaries of the sequences in ``q`` (on q's device).
        kstart: int ``[S+1]`` boundaries of each sequence's blocks in ``k_cmp``; sequence ``s``
            must have ``num_cmp(length_s)`` blocks.
        max_len: the longest sequence (a host int: no device sync).
        cmp_block, cmp_stride: ``l`` and ``d``.
        scale: softmax scale (default ``1/sqrt(Dk)``).
        tuning: launch shapes (default: the device profile's ``cmp``).

    Returns:
        ``o_cmp [NQ, H, Dv]`` in q's dtype (exact zeros for rows that see no block) and
        ``lse [NQ, H]`` float32 natural log (``-inf`` for those rows; not differentiable).
    """
    q, k_cmp, v_cmp = _check_3d(q, k_cmp, v_cmp)
    if int(cmp_block) < 1 or int(cmp_stride) < 1 or int(cmp_block) % int(cmp_stride):
        raise ValueError(f"cmp_stride={cmp_stride} must divide cmp_block={cmp_block} (both >= 1)")
    qstart = _check_starts("qstart", qstart, q.device)
    kstart = _check_starts("kstart", kstart, q.device)
    if qstart.numel() != kstart.numel():
        raise ValueError(f"qstart ({qstart.numel()}) and kstart ({kstart.numel()}) disagree")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    tn = _tuning.profile_for(q.device).cmp if tuning is None else tuning
    max_len = int(max_len)
    max_keys = num_cmp(max_len, int(cmp_block), int(cmp_stride))
    sizes = [max_len, max_keys, MODE_CMP, int(cmp_block), int(cmp_stride), 1]
    return _RangeAttention.apply(q, k_cmp, v_cmp, qstart, kstart, sizes, scale, tn.as_list())


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    max_seqlen: int | None = None,
    layout: SeqStarts | None = None,
    tuning: _tuning.AttnTuning | None = None,
) -> torch.Tensor:
    """Sliding-window attention ``o_win [B, T, H, Dv]`` (spec I.7): keys ``p - w < s <= p``.

    ``q [B, T, H, Dk]``, ``k/v [B, T, G, D]``; ``cu_seqlens`` int ``[S+1]`` needs ``B == 1``.
    ``layout`` (a plan's `SeqStarts`) holds the boundaries and ``max_seqlen``; without it they
    come from ``cu_seqlens`` (``max_seqlen``, a host int, saves reading it: one sync).
    ``tuning`` defaults to the device profile's ``win``. Differentiable in q, k, v.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D [B, T, heads, dim]")
    if int(window) < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    B, T, H, _ = q.shape
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T):
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens requires B == 1, got B={B}")
    q3, k3, v3 = _check_3d(q.reshape(B * T, H, -1), k.reshape(B * T, k.shape[2], -1),
                           v.reshape(B * T, v.shape[2], -1))  # fmt: skip
    if layout is None:
        if cu_seqlens is None:
            starts = torch.arange(B + 1, device=q.device, dtype=torch.int64) * T
            max_seqlen = T
        else:
            starts = _check_starts("cu_seqlens", cu_seqlens, q.device)
            if max_seqlen is None:
                max_seqlen = int(starts.diff().max())
        layout = SeqStarts(starts, starts, int(max_seqlen), int(max_seqlen))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    tn = _tuning.profile_for(q.device).win if tuning is None else tuning
    sizes = [layout.max_len, layout.max_len, MODE_WIN, 1, 1, int(window)]
    o, _ = _RangeAttention.apply(q3, k3, v3, layout.qstart, layout.qstart, sizes, scale,
                                 tn.as_list())  # fmt: skip
    return o.reshape(B, T, H, v.shape[-1])
