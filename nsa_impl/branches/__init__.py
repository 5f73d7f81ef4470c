"""The three NSA branches, and the row-range attention the compressed and sliding branches share.

Both dense branches attend, for each query row ``r``, to one contiguous range of keys
``[lo[r], hi[r])`` (window: ``[max(start, p-w+1), p+1)``; compressed: the visible compressed
blocks of the row's sequence). `range_attention` computes that as an explicit masked softmax over
chunks of rows, with a custom backward that recomputes the probabilities chunk by chunk, so
neither direction ever holds more than one chunk's ``[B, H, c, span]`` tile.

Memory bound (per call, besides inputs, outputs and gradients): one chunk of ``c`` rows over
``span`` keys keeps at most `BYTES_PER_ELEM` bytes per element of its ``B * H * c * span`` tile
alive (the logits, the probabilities in the softmax dtype, the probability gradient or the
scoring hook's working set), and ``c`` is the largest row count with
``BYTES_PER_ELEM * B * H * c * span <= budget_bytes`` (default: `default_budget`, 8 MiB on a
CPU where small cache-resident tiles are fastest, 512 MiB on CUDA where fewer launches are).
Only when a single row already exceeds the budget (``B * H * span`` huge) does a chunk of one
row go over it.

Numerics follow `nsa_impl.numerics`: float32/float64 inputs compute logits, softmax and
``p @ v`` in float64 and round the output once; float16/bfloat16 multiply ``(q * scale) @ k^T``
and ``p @ v`` in their own dtype (tensor cores) with a float32 softmax.

Empty rows (``lo == hi``) give exact zeros forward and backward, never NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ..amp import autocast_off_backward
from ..numerics import compute_dtype, product_dtype

#: Default byte budget of one chunk's live tiles, per device type (see the module docstring).
DEFAULT_BUDGET_BYTES = {"cpu": 8 * 2**20, "cuda": 512 * 2**20}
#: Bytes alive per element of a chunk's ``[B, H, c, span]`` tile, at most: for float32 inputs the
#: float64 logits (8), the float64 probabilities (8) and the hook's or the backward's float64
#: working tile (8).
BYTES_PER_ELEM = 24


def default_budget(device: torch.device) -> int:
    """Default chunk budget in bytes for tensors on ``device``."""
    return DEFAULT_BUDGET_BYTES.get(device.type, DEFAULT_BUDGET_BYTES["cuda"])


#: ``on_probs(r0, r1, s0, p)``: sees the probabilities ``p [B, G, h, r1-r0, span]`` of rows
#: ``[r0, r1)`` over keys ``[s0, s0+span)`` during the forward pass (read only, no autograd).
ProbsHook = Callable[[int, int, int, torch.Tensor], None]


@dataclass(frozen=True)
class RowRanges:
    """Allowed keys ``[lo[r], hi[r])`` of every query row, host int64 tensors ``[T]``.

    Requirements (checked): ``lo`` non-decreasing and ``hi`` growing by at most one key per row,
    so a chunk of ``c`` rows spans at most ``width + c - 1`` keys (``width = max(hi - lo)``).

    Attributes:
        lo, hi: the ranges.
        num_keys: length of the key axis the ranges index.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    num_keys: int

    def __post_init__(self) -> None:
        lo, hi = self.lo, self.hi
        if lo.shape != hi.shape or lo.dim() != 1 or lo.device.type != "cpu":
            raise ValueError("RowRanges.lo/hi must be host 1-D tensors of one shape")
        if bool((hi < lo).any()) or bool((lo < 0).any()) or bool((hi > self.num_keys).any()):
            raise ValueError("RowRanges need 0 <= lo <= hi <= num_keys")
        if lo.numel() > 1 and (bool((lo.diff() < 0).any()) or bool((hi.diff() > 1).any())):
            raise ValueError("RowRanges need lo non-decreasing and hi growing by <= 1 per row")

    @property
    def width(self) -> int:
        """Widest single row range."""
        return int((self.hi - self.lo).max()) if self.lo.numel() else 0

    def max_span(self, rows: int) -> int:
        """Upper bound on the keys a chunk of ``rows`` consecutive rows touches."""
        return min(self.num_keys, self.width + rows - 1)

    def chunk_rows(self, heads: int, budget_bytes: int) -> int:
        """Most rows per chunk keeping ``BYTES_PER_ELEM * heads * rows * span <= budget_bytes``.

        ``heads`` is ``B * H``. Returns at least 1.
        """
        T = self.lo.numel()
        per_elem = BYTES_PER_ELEM * heads

        def fits(c: int) -> bool:
            return c * max(self.max_span(c), 1) * per_elem <= budget_bytes

        lo, hi = 1, max(T, 1)
        if fits(hi):
            return hi
        while lo < hi:  # largest c with fits(c); fits is monotone in c
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    def chunks(self, rows: int) -> list[tuple[int, int, int, int]]:
        """``(r0, r1, s0, s1)``: row chunk ``[r0, r1)`` and the key span ``[s0, s1)`` it reads."""
        T = self.lo.numel()
        starts = list(range(0, T, rows))
        lo = self.lo[starts].tolist()
        ends = [min(r + rows, T) for r in starts]
        hi = self.hi[[e - 1 for e in ends]].tolist()
        return [
            (r0, r1, s0, max(s0, s1)) for r0, r1, s0, s1 in zip(starts, ends, lo, hi, strict=False)
        ]


def _rows(x: torch.Tensor, r0: int, r1: int, G: int) -> torch.Tensor:
    """``x[:, r0:r1]`` ``[B, c, H, D]`` -> ``[B, G, h*c, D]`` (heads of a group, row-major)."""
    B, _, H, D = x.shape
    c = r1 - r0
    return x[:, r0:r1].reshape(B, c, G, H // G, D).permute(0, 2, 3, 1, 4).reshape(B, G, -1, D)


def _unrows(x: torch.Tensor, c: int) -> torch.Tensor:
    """Inverse of `_rows`: ``[B, G, h*c, D]`` -> ``[B, c, H, D]``."""
    B, G, hc, D = x.shape
    return x.reshape(B, G, hc // c, c, D).permute(0, 3, 1, 2, 4).reshape(B, c, -1, D)


def _keys(x: torch.Tensor, s0: int, s1: int) -> torch.Tensor:
    """``x[:, s0:s1]`` ``[B, span, G, D]`` -> ``[B, G, span, D]``."""
    return x[:, s0:s1].permute(0, 2, 1, 3)


@dataclass
class _Plan:
    chunks: list[tuple[int, int, int, int]]
    has_empty: list[bool]  # per chunk: does it hold a row with an empty range?
    lo: torch.Tensor  # on the device of q
    hi: torch.Tensor
    G: int

    def allowed(self, r0: int, r1: int, s0: int, s1: int) -> torch.Tensor:
        """Bool ``[1, 1, 1, c, span]``: key ``j`` is allowed for row ``r`` iff ``lo <= j < hi``."""
        j = torch.arange(s0, s1, device=self.lo.device)
        mask = (j >= self.lo[r0:r1, None]) & (j < self.hi[r0:r1, None])
        return mask[None, None, None]

    def empty(self, r0: int, r1: int) -> torch.Tensor:
        """Bool ``[1, 1, 1, c, 1]``: rows whose range is empty."""
        return (self.hi[r0:r1] == self.lo[r0:r1])[None, None, None, :, None]


def _probs(plan: _Plan, chunk: int, qc, kc, scale: float, acc) -> torch.Tensor:
    """Softmax probabilities ``[B, G, h, c, span]`` (``acc`` dtype) of one chunk.

    Disallowed keys get exactly ``-inf`` logits; rows with no allowed key get exact zeros (the
    softmax of an all ``-inf`` row is NaN, overwritten). Forward and backward call this same
    function, so the backward's recomputed probabilities equal the forward's bit for bit.
    """
    r0, r1, s0, s1 = plan.chunks[chunk]
    B, G, hc, _ = qc.shape
    shape = (B, G, hc // (r1 - r0), r1 - r0, s1 - s0)
    mm = product_dtype(qc.dtype)  # scaled before the product: a finite logit never overflows
    s = torch.matmul(qc.to(mm) * scale, kc.to(mm).transpose(-1, -2)).view(shape).to(acc)
    p = torch.softmax(s.masked_fill_(~plan.allowed(r0, r1, s0, s1), float("-inf")), dim=-1)
    if plan.has_empty[chunk]:
        p.masked_fill_(plan.empty(r0, r1), 0.0)
    return p


def _forward(q, k, v, plan: _Plan, scale: float, on_probs: ProbsHook | None):
    B, T, H, _ = q.shape
    G, h, Dv = plan.G, H // plan.G, v.shape[-1]
    acc, mm = compute_dtype(q.dtype), product_dtype(q.dtype)
    o = q.new_zeros(B, T, H, Dv)
    for i, (r0, r1, s0, s1) in enumerate(plan.chunks):
        c, span = r1 - r0, s1 - s0
        if span == 0:  # every row of the chunk is empty: o stays 0
            if on_probs is not None:
                on_probs(r0, r1, s0, q.new_zeros(B, G, h, c, 0, dtype=acc))
            continue
        p = _probs(plan, i, _rows(q, r0, r1, G), _keys(k, s0, s1), scale, acc)
        if on_probs is not None:
            on_probs(r0, r1, s0, p)
        oc = torch.matmul(p.view(B, G, h * c, span).to(mm), _keys(v, s0, s1).to(mm))
        o[:, r0:r1] = _unrows(oc, c)  # the one rounding to q's dtype
    return o


class _RangeAttention(torch.autograd.Function):
    """Chunked masked attention; backward recomputes each chunk's probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, on_probs):
        o = _forward(q, k, v, plan, scale, on_probs)
        ctx.save_for_backward(q, k, v, o)
        ctx.plan, ctx.scale = plan, scale
        return o

    @staticmethod
    @once_differentiable
    @autocast_off_backward
    def backward(ctx, do):
        q, k, v, o = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        B, T, H, _ = q.shape
        G, h = plan.G, H // plan.G
        acc, mm = compute_dtype(q.dtype), product_dtype(q.dtype)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        # dq rows are written once (chunks own disjoint rows); dk/dv accumulate across chunks.
        dq = torch.zeros_like(q) if need_q else None
        dk = torch.zeros(k.shape, dtype=acc, device=k.device) if need_k else None
        dv = torch.zeros(v.shape, dtype=acc, device=v.device) if need_v else None
        do = do.to(q.dtype)
        for i, (r0, r1, s0, s1) in enumerate(plan.chunks):
            c, span = r1 - r0, s1 - s0
            if span == 0:
                continue
            qc, kc, vc = _rows(q, r0, r1, G), _keys(k, s0, s1), _keys(v, s0, s1)
            doc = _rows(do, r0, r1, G).to(mm)
            p = _probs(plan, i, qc, kc, scale, acc)
            if need_v:
                pt = p.view(B, G, h * c, span).transpose(-1, -2).to(mm)
                dv[:, s0:s1] += torch.matmul(pt, doc).permute(0, 2, 1, 3)
            if not (need_q or need_k):
                continue
            dp = torch.matmul(doc, vc.to(mm).transpose(-1, -2)).view(p.shape).to(acc)
            delta = (doc.to(acc) * _rows(o, r0, r1, G).to(acc)).sum(-1).view(B, G, h, c, 1)
            ds = p.mul_(dp.sub_(delta)).view(B, G, h * c, span).to(mm)  # dS = P (dP - D)
            if need_q:
                dq[:, r0:r1] = _unrows(torch.matmul(ds, kc.to(mm)).to(acc).mul_(scale), c)
            if need_k:
                dk_c = torch.matmul(ds.transpose(-1, -2), qc.to(mm)).to(acc).mul_(scale)
                dk[:, s0:s1] += dk_c.permute(0, 2, 1, 3)
        return _cast(dq, q), _cast(dk, k), _cast(dv, v), None, None, None


def _cast(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain causal attention ``[B, L, H, Dv]`` of ``q [B, L, H, Dk]`` over ``k/v [B, L, G, D]``.

    The fast path for rows whose key set is every key ``0..p`` of their sequence: the selection
    rows before the first unselected block, and the window rows ``p < w``. PyTorch's fused SDPA,
    differentiable, in `product_dtype` (float64 for float32 inputs, rounded once).
    """
    mm = product_dtype(q.dtype)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).to(mm),
        k.transpose(1, 2).to(mm),
        v.transpose(1, 2).to(mm),
        is_causal=True,
        scale=scale,
        enable_gqa=True,
    )
    return o.transpose(1, 2).to(q.dtype)


def range_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ranges: RowRanges,
    scale: float,
    *,
    on_probs: ProbsHook | None = None,
    budget_bytes: int | None = None,
) -> torch.Tensor:
    """Attention of each query row over its own key range, chunked, with autograd.

    Args:
        q: ``[B, T, H, Dk]`` queries.
        k, v: ``[B, S, G, Dk]`` / ``[B, S, G, Dv]`` keys and values (``H % G == 0``; query head
            ``i`` reads group ``i // (H // G)``).
        ranges: row ``r`` attends to keys ``[ranges.lo[r], ranges.hi[r])``.
        scale: softmax scale.
        on_probs: optional hook receiving each chunk's probabilities (see `ProbsHook`).
        budget_bytes: byte budget of the live tiles of one chunk (``None``: `default_budget`).

    Returns:
        ``o [B, T, H, Dv]``; rows with an empty range are exactly 0.
    """
    B, T, H, _ = q.shape
    if ranges.lo.numel() != T or ranges.num_keys != k.shape[1]:
        raise ValueError(
            f"ranges cover {ranges.lo.numel()} rows / {ranges.num_keys} keys, "
            f"q has T={T} rows and k has {k.shape[1]} keys"
        )
    budget = default_budget(q.device) if budget_bytes is None else int(budget_bytes)
    rows = ranges.chunk_rows(B * H, budget)
    chunks = ranges.chunks(rows)
    empty_rows = (ranges.hi == ranges.lo).tolist()
    plan = _Plan(
        chunks,
        [any(empty_rows[r0:r1]) for r0, r1, _, _ in chunks],
        ranges.lo.to(q.device, non_blocking=True),
        ranges.hi.to(q.device, non_blocking=True),
        k.shape[2],
    )
    return _RangeAttention.apply(q, k, v, plan, float(scale), on_probs)
